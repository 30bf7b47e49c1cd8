//! The versioned artifact store, in the data folder:
//!
//! - `artifacts/<service>/<version>/`: a stored artifact, its file and
//!   `artifact.json` ([`ArtifactMeta`]). A version folder appears whole
//!   (renamed into place) and never changes; old ones are pruned.
//! - `uploads/<service>.<version>.<sha256>.part`: the bytes of an upload
//!   in progress, and `….json` beside it, what the upload announced, so
//!   that an upload cut short resumes from the bytes kept. (A service
//!   name has no `.` and a SHA-256 is 64 hex digits, so the name is
//!   unambiguous.) Parts older than [`PART_MAX_AGE`] go at start-up.
//! - `staging/`: version folders being assembled or removed; emptied at
//!   start-up.
//!
//! The store is synchronous (plain file I/O): async callers run it on the
//! blocking pool.
//!
//! - `names`: the checks on every name that becomes a path.
//! - `upload`: one upload in progress ([`Upload`]).

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

mod names;
mod upload;

pub use names::{
    MAX_FILE_NAME_LEN, MAX_SERVICE_LEN, MAX_VERSION_LEN, RESERVED_SERVICES, check_file_name,
    check_service, check_sha256, check_version,
};
pub use upload::Upload;

/// How long the bytes of an interrupted upload are kept (removed at
/// start-up when older).
pub const PART_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The metadata file in each version folder.
const META_FILE: &str = "artifact.json";

/// The store. Cheap to clone; clones share the uploads in progress.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

/// What the store accepts and keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest artifact, in bytes.
    pub max_size: u64,
    /// Versions kept per service by [`Store::prune`].
    pub keep: NonZeroUsize,
}

/// What an upload announces before its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadStart {
    /// The service the artifact runs.
    pub service: String,
    /// Its version.
    pub version: String,
    /// The file name it is stored under.
    pub file_name: String,
    /// Its whole size in bytes.
    pub size: u64,
    /// SHA-256 of the whole artifact, hex.
    pub sha256: String,
    /// Where the bytes that follow start: 0, or what [`Store::offset`] said.
    pub offset: u64,
}

/// A stored artifact (`artifact.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// The artifact's file name in the version folder.
    pub file_name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// When it was stored, in milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
}

/// What [`Store::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// This exact artifact is stored already: nothing to upload.
    Stored(ArtifactMeta),
    /// Send the bytes from `start.offset` on.
    Upload(Box<Upload>),
}

/// Why the store refused or failed. Each names the field, the path or the
/// numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name or value the caller gave is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The artifact announced is over the size limit.
    #[error("size: {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The size announced.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// More bytes came than announced.
    #[error(
        "more bytes came than the {size} announced in start.size (at least {received}); the upload was discarded"
    )]
    TooManyBytes {
        /// The size announced.
        size: u64,
        /// The bytes received so far.
        received: u64,
    },
    /// The upload does not start where the kept bytes end.
    #[error("offset: {given}, but {kept} bytes of this upload are kept: resume from offset {kept}")]
    Offset {
        /// The offset given.
        given: u64,
        /// The bytes kept.
        kept: u64,
    },
    /// A resumed upload announces something else than it started with.
    #[error(
        "{field}: the kept upload was started with {kept}, not {given}; start again from offset 0"
    )]
    StartMismatch {
        /// The field that differs.
        field: &'static str,
        /// The value the upload started with.
        kept: String,
        /// The value given now.
        given: String,
    },
    /// The stream ended before every byte came.
    #[error(
        "the upload ended after {received} of {size} bytes; they are kept: resume from offset {received}"
    )]
    Incomplete {
        /// The bytes kept.
        received: u64,
        /// The size announced.
        size: u64,
    },
    /// The bytes do not hash to the SHA-256 announced.
    #[error(
        "sha256: expected {expected}, but the bytes received hash to {actual}; the upload was discarded"
    )]
    Checksum {
        /// The SHA-256 announced.
        expected: String,
        /// The SHA-256 of the bytes received.
        actual: String,
    },
    /// The version is stored with other bytes.
    #[error("version {version} of {service} exists with sha256 {sha256}; versions are immutable")]
    Immutable {
        /// The service.
        service: String,
        /// The version.
        version: String,
        /// The SHA-256 stored.
        sha256: String,
    },
    /// Another upload of the same version is in progress.
    #[error("an upload of version {version} of {service} is in progress; retry when it ends")]
    Busy {
        /// The service.
        service: String,
        /// The version.
        version: String,
    },
    /// The disk (or the quota) is full.
    #[error("disk full writing {path}; the upload was discarded")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A metadata file could not be read.
    #[error("{path}: unreadable metadata: {message}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

struct Inner {
    root: PathBuf,
    limits: Limits,
    /// `(service, version)` of the uploads in progress: one at a time each.
    active: Mutex<HashSet<(String, String)>>,
    /// Numbers the folders of versions being removed.
    removals: AtomicU64,
}

/// One `(service, version)` claimed by an upload in progress, released on
/// drop.
#[derive(Debug)]
struct Claim {
    store: Store,
    key: (String, String),
}

/// What an upload announced, kept beside its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PartInfo {
    service: String,
    version: String,
    file_name: String,
    size: u64,
    sha256: String,
    started_at_ms: u64,
}

// === impl Store ===

impl Store {
    /// Opens (creating) the store in `data_dir`, empties `staging/` and
    /// removes uploads older than [`PART_MAX_AGE`].
    pub fn open(data_dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        let store = Self {
            inner: Arc::new(Inner {
                root: data_dir.to_owned(),
                limits,
                active: Mutex::default(),
                removals: AtomicU64::new(0),
            }),
        };
        for dir in [store.artifacts(), store.uploads()] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        let staging = store.staging();
        match fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&staging)(e)),
            _ => fs::create_dir_all(&staging).map_err(io_at(&staging))?,
        }
        let removed = store.remove_stale_uploads(PART_MAX_AGE)?;
        if removed > 0 {
            tracing::info!(removed, "removed uploads older than 24h");
        }
        Ok(store)
    }

    /// The limits the store was opened with.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Checks `start` and begins (or resumes) its upload; or finds the
    /// same artifact stored already.
    pub fn begin(&self, start: UploadStart) -> Result<Begin, StoreError> {
        let start = self.check_start(start)?;
        if let Some(found) = self.existing(&start)? {
            return Ok(Begin::Stored(found));
        }
        let claim = self.claim(&start.service, &start.version)?;
        // Another upload of this version may have finished in between.
        if let Some(found) = self.existing(&start)? {
            return Ok(Begin::Stored(found));
        }
        Upload::open(self.clone(), start, claim).map(|u| Begin::Upload(Box::new(u)))
    }

    /// How many bytes of the upload of `sha256` as `version` of `service`
    /// are kept (0 when none).
    pub fn offset(&self, service: &str, version: &str, sha256: &str) -> Result<u64, StoreError> {
        check_service(service)?;
        check_version(version)?;
        let sha256 = check_sha256(sha256)?;
        let part = self.part_path(service, version, &sha256);
        match fs::metadata(&part) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_at(&part)(e)),
        }
    }

    /// The stored artifact `version` of `service`, if any.
    pub fn get(&self, service: &str, version: &str) -> Result<Option<ArtifactMeta>, StoreError> {
        check_service(service)?;
        check_version(version)?;
        let path = self.version_dir(service, version).join(META_FILE);
        match fs::read(&path) {
            Ok(bytes) => read_meta(&path, &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// The path of a stored artifact's file.
    pub fn artifact_path(&self, meta: &ArtifactMeta) -> PathBuf {
        self.version_dir(&meta.service, &meta.version)
            .join(&meta.file_name)
    }

    /// The stored artifacts of `service` (`None`: of every service),
    /// newest first. A version whose metadata cannot be read is left out
    /// (and logged).
    pub fn list(&self, service: Option<&str>) -> Result<Vec<ArtifactMeta>, StoreError> {
        let services = match service {
            Some(s) => {
                check_service(s)?;
                vec![s.to_owned()]
            }
            None => dir_names(&self.artifacts())?
                .into_iter()
                .filter(|s| check_service(s).is_ok())
                .collect(),
        };
        let mut found = Vec::new();
        for service in services {
            for version in dir_names(&self.artifacts().join(&service))? {
                match self.get(&service, &version) {
                    Ok(Some(meta)) => found.push(meta),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%service, %version, %error, "skipping a stored version")
                    }
                }
            }
        }
        found.sort_by(|a, b| {
            (b.stored_at_ms, &b.service, &b.version).cmp(&(a.stored_at_ms, &a.service, &a.version))
        });
        Ok(found)
    }

    /// Removes the versions of `service` beyond the newest
    /// [`Limits::keep`], except those in `protect` (in use); returns the
    /// versions removed.
    pub fn prune(&self, service: &str, protect: &[String]) -> Result<Vec<String>, StoreError> {
        let keep = self.inner.limits.keep.get();
        let mut removed = Vec::new();
        for meta in self.list(Some(service))?.into_iter().skip(keep) {
            if protect.contains(&meta.version) {
                continue;
            }
            self.remove_version(service, &meta.version)?;
            removed.push(meta.version);
        }
        Ok(removed)
    }

    /// Removes the kept bytes of uploads last written more than `max_age`
    /// ago, and leftovers without bytes; returns how many uploads went.
    /// For start-up only: it would take an upload in progress for a
    /// leftover.
    fn remove_stale_uploads(&self, max_age: Duration) -> Result<usize, StoreError> {
        let uploads = self.uploads();
        let entries = fs::read_dir(&uploads).map_err(io_at(&uploads))?;
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_at(&uploads))?;
            let path = entry.path();
            let is_part = path.extension().is_some_and(|e| e == "part");
            let stale = if is_part {
                let modified = entry.metadata().and_then(|m| m.modified());
                modified.is_ok_and(|at| now.duration_since(at).unwrap_or_default() > max_age)
            } else {
                // A sidecar lives as long as its part; anything else is
                // a leftover temp file.
                path.extension().is_none_or(|e| e != "json")
                    || !path.with_extension("part").exists()
            };
            if stale {
                remove_file(&path)?;
                if is_part {
                    remove_file(&path.with_extension("json"))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn check_start(&self, mut start: UploadStart) -> Result<UploadStart, StoreError> {
        check_service(&start.service)?;
        check_version(&start.version)?;
        check_file_name(&start.file_name)?;
        start.sha256 = check_sha256(&start.sha256)?;
        let max = self.inner.limits.max_size;
        if start.size == 0 {
            return Err(StoreError::Invalid {
                field: "size",
                message: "an artifact must not be empty".into(),
            });
        }
        if start.size > max {
            return Err(StoreError::TooLarge {
                size: start.size,
                max,
            });
        }
        Ok(start)
    }

    /// The stored artifact when it is the one `start` announces; an error
    /// when the version is stored with other bytes.
    fn existing(&self, start: &UploadStart) -> Result<Option<ArtifactMeta>, StoreError> {
        match self.get(&start.service, &start.version)? {
            Some(meta) if meta.sha256 == start.sha256 => Ok(Some(meta)),
            Some(meta) => Err(StoreError::Immutable {
                service: meta.service,
                version: meta.version,
                sha256: meta.sha256,
            }),
            None => Ok(None),
        }
    }

    fn claim(&self, service: &str, version: &str) -> Result<Claim, StoreError> {
        let key = (service.to_owned(), version.to_owned());
        let mut active = self
            .inner
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !active.insert(key.clone()) {
            return Err(StoreError::Busy {
                service: key.0,
                version: key.1,
            });
        }
        Ok(Claim {
            store: self.clone(),
            key,
        })
    }

    /// Moves a complete, verified upload into place: the file and its
    /// metadata into a staging folder, then the folder to its version
    /// path in one rename.
    fn install(&self, part: &Path, meta: &ArtifactMeta) -> Result<(), StoreError> {
        let staging = self
            .staging()
            .join(part_key(&meta.service, &meta.version, &meta.sha256));
        let file = staging.join(&meta.file_name);
        let result = self.assemble(part, &staging, &file, meta);
        if let Err(e) = &result {
            // Put the bytes back so the upload can still complete
            // (resuming at its size), unless the disk is full.
            if !matches!(e, StoreError::DiskFull { .. }) && file.exists() {
                let _ = fs::rename(&file, part);
            }
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    fn assemble(
        &self,
        part: &Path,
        staging: &Path,
        file: &Path,
        meta: &ArtifactMeta,
    ) -> Result<(), StoreError> {
        if staging.exists() {
            fs::remove_dir_all(staging).map_err(io_at(staging))?;
        }
        fs::create_dir(staging).map_err(io_at(staging))?;
        fs::rename(part, file).map_err(io_at(file))?;
        let meta_path = staging.join(META_FILE);
        let json = serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Metadata {
            path: meta_path.clone(),
            message: e.to_string(),
        })?;
        // Also syncs the staging folder, with the file's entry in it.
        mesh_runtime::fs::write_atomic(&meta_path, &json).map_err(io_at(&meta_path))?;
        let service_dir = self.artifacts().join(&meta.service);
        fs::create_dir_all(&service_dir).map_err(io_at(&service_dir))?;
        let target = service_dir.join(&meta.version);
        fs::rename(staging, &target).map_err(io_at(&target))?;
        sync_dir(&service_dir)?;
        sync_dir(&self.artifacts())
    }

    /// Moves a version folder out of `artifacts/` (one rename), then
    /// deletes it.
    fn remove_version(&self, service: &str, version: &str) -> Result<(), StoreError> {
        let dir = self.version_dir(service, version);
        let n = self.inner.removals.fetch_add(1, Ordering::Relaxed);
        let trash = self
            .staging()
            .join(format!("removing.{service}.{version}.{n}"));
        match fs::rename(&dir, &trash) {
            // A concurrent prune took it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            result => result.map_err(io_at(&dir))?,
        }
        sync_dir(&self.artifacts().join(service))?;
        fs::remove_dir_all(&trash).map_err(io_at(&trash))
    }

    fn artifacts(&self) -> PathBuf {
        self.inner.root.join("artifacts")
    }

    fn uploads(&self) -> PathBuf {
        self.inner.root.join("uploads")
    }

    fn staging(&self) -> PathBuf {
        self.inner.root.join("staging")
    }

    fn version_dir(&self, service: &str, version: &str) -> PathBuf {
        self.artifacts().join(service).join(version)
    }

    fn part_path(&self, service: &str, version: &str, sha256: &str) -> PathBuf {
        self.uploads()
            .join(format!("{}.part", part_key(service, version, sha256)))
    }
}

// === impl Inner ===

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

// === impl Claim ===

impl Drop for Claim {
    fn drop(&mut self) {
        self.store
            .inner
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

// === impl StoreError ===

impl StoreError {
    /// Whether the caller is at fault (a bad or conflicting request), as
    /// opposed to the node (its disk).
    pub fn is_caller_fault(&self) -> bool {
        !matches!(
            self,
            Self::DiskFull { .. } | Self::Io { .. } | Self::Metadata { .. }
        )
    }
}

/// `<service>.<version>.<sha256>`: unambiguous, since a service has no
/// `.` and a SHA-256 has a fixed length.
fn part_key(service: &str, version: &str, sha256: &str) -> String {
    format!("{service}.{version}.{sha256}")
}

/// Maps an I/O error on `path` to [`StoreError`], telling a full disk
/// (or quota) apart.
fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| {
        let full = matches!(
            source.raw_os_error(),
            Some(nix::libc::ENOSPC | nix::libc::EDQUOT)
        );
        if full {
            StoreError::DiskFull {
                path: path.to_owned(),
            }
        } else {
            StoreError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

fn read_meta(path: &Path, bytes: &[u8]) -> Result<ArtifactMeta, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Metadata {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The names of the folders in `dir`; none when it does not exist.
fn dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Ok(name) = entry.file_name().into_string()
        {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes a file; one that is gone already is fine.
fn remove_file(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(path)(e)),
        _ => Ok(()),
    }
}

/// Makes the entries of `dir` (renames into or out of it) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
