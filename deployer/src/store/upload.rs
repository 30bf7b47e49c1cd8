//! One upload in progress: its bytes go to the part file, hashed as they
//! come; on [`Upload::finish`] the whole is checked and moved into place.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::{
    ArtifactMeta, Claim, PartInfo, Store, StoreError, UploadStart, io_at, now_ms, remove_file,
};

/// An upload in progress, holding its `(service, version)` until dropped.
/// Dropping it keeps the bytes received (the upload can resume); every
/// error that does not keep them says so.
pub struct Upload {
    store: Store,
    start: UploadStart,
    part: PathBuf,
    info: PathBuf,
    file: File,
    /// SHA-256 of the bytes in the part file so far.
    hasher: Sha256,
    /// Bytes in the part file so far.
    received: u64,
    _claim: Claim,
}

const READ_BUF: usize = 64 * 1024;

// === impl Upload ===

impl Upload {
    /// Opens the part file: anew at offset 0, else the kept one, whose
    /// bytes are hashed again.
    pub(super) fn open(store: Store, start: UploadStart, claim: Claim) -> Result<Self, StoreError> {
        let part = store.part_path(&start.service, &start.version, &start.sha256);
        let info = part.with_extension("json");
        let mut upload = Self {
            file: open_part(&part, start.offset)?,
            store,
            start,
            part,
            info,
            hasher: Sha256::new(),
            received: 0,
            _claim: claim,
        };
        if upload.start.offset == 0 {
            upload.write_info()?;
        } else {
            upload.resume()?;
        }
        Ok(upload)
    }

    /// What the upload announced.
    pub fn start(&self) -> &UploadStart {
        &self.start
    }

    /// Bytes kept so far (the offset to resume from).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends the next bytes. More bytes than announced, or a full
    /// disk, discard the upload; another error keeps what was written.
    pub fn write(mut self, data: &[u8]) -> Result<Self, StoreError> {
        let received = self.received + data.len() as u64;
        if received > self.start.size {
            self.discard();
            return Err(StoreError::TooManyBytes {
                size: self.start.size,
                received,
            });
        }
        if let Err(e) = self.file.write_all(data) {
            return Err(self.failed(e));
        }
        self.hasher.update(data);
        self.received = received;
        Ok(self)
    }

    /// Ends the upload: with every byte received and the SHA-256 right,
    /// stores the artifact. Short of bytes, keeps them (resumable); with
    /// a wrong SHA-256, discards them.
    pub fn finish(self) -> Result<ArtifactMeta, StoreError> {
        if self.received < self.start.size {
            // Kept for a resume, so worth making durable.
            if let Err(e) = self.file.sync_data() {
                return Err(self.failed(e));
            }
            return Err(StoreError::Incomplete {
                received: self.received,
                size: self.start.size,
            });
        }
        if let Err(e) = self.file.sync_all() {
            return Err(self.failed(e));
        }
        let actual = hex::encode(self.hasher.clone().finalize());
        if actual != self.start.sha256 {
            self.discard();
            return Err(StoreError::Checksum {
                expected: self.start.sha256.clone(),
                actual,
            });
        }
        let start = &self.start;
        let meta = ArtifactMeta {
            service: start.service.clone(),
            version: start.version.clone(),
            file_name: start.file_name.clone(),
            size: start.size,
            sha256: start.sha256.clone(),
            stored_at_ms: now_ms(),
        };
        match self.store.install(&self.part, &meta) {
            Ok(()) => {
                let _ = remove_file(&self.info);
                Ok(meta)
            }
            Err(e @ StoreError::DiskFull { .. }) => {
                self.discard();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Records what the upload announced beside its bytes.
    fn write_info(&self) -> Result<(), StoreError> {
        let info = PartInfo::from(&self.start);
        let json = serde_json::to_vec(&info).map_err(|e| StoreError::Metadata {
            path: self.info.clone(),
            message: e.to_string(),
        })?;
        mesh_runtime::fs::write_atomic(&self.info, &json).map_err(|e| {
            let err = io_at(&self.info)(e);
            if matches!(err, StoreError::DiskFull { .. }) {
                self.discard();
            }
            err
        })
    }

    /// Checks that the kept upload is this one and `start.offset` is
    /// where its bytes end, and hashes them again.
    fn resume(&mut self) -> Result<(), StoreError> {
        let kept = self.file.metadata().map_err(io_at(&self.part))?.len();
        let info = match std::fs::read(&self.info) {
            Ok(bytes) => serde_json::from_slice::<PartInfo>(&bytes).ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at(&self.info)(e)),
        };
        // Without its sidecar (or with more bytes than announced) the
        // part is no upload to resume.
        let kept = match info {
            Some(info) if kept <= info.size => {
                self.check_same(&info)?;
                kept
            }
            _ => 0,
        };
        if kept != self.start.offset {
            return Err(StoreError::Offset {
                given: self.start.offset,
                kept,
            });
        }
        let mut buf = vec![0; READ_BUF];
        let mut file = &self.file;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_at(&self.part)(e)),
            }
        }
        self.received = kept;
        Ok(())
    }

    fn check_same(&self, info: &PartInfo) -> Result<(), StoreError> {
        let mismatch = |field, kept: &dyn ToString, given: &dyn ToString| {
            Err(StoreError::StartMismatch {
                field,
                kept: kept.to_string(),
                given: given.to_string(),
            })
        };
        if info.size != self.start.size {
            return mismatch("size", &info.size, &self.start.size);
        }
        if info.file_name != self.start.file_name {
            return mismatch("file_name", &info.file_name, &self.start.file_name);
        }
        Ok(())
    }

    /// Maps a write error: a full disk discards the upload.
    fn failed(&self, e: io::Error) -> StoreError {
        let err = io_at(&self.part)(e);
        if matches!(err, StoreError::DiskFull { .. }) {
            self.discard();
        }
        err
    }

    /// Removes the bytes and the sidecar: the upload starts over.
    fn discard(&self) {
        for path in [&self.part, &self.info] {
            if let Err(error) = remove_file(path) {
                tracing::warn!(%error, "cannot remove a discarded upload");
            }
        }
    }
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("start", &self.start)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

// === impl PartInfo ===

impl From<&UploadStart> for PartInfo {
    fn from(start: &UploadStart) -> Self {
        Self {
            service: start.service.clone(),
            version: start.version.clone(),
            file_name: start.file_name.clone(),
            size: start.size,
            sha256: start.sha256.clone(),
            started_at_ms: now_ms(),
        }
    }
}

/// Opens the part file to append: created (or emptied) at offset 0, else
/// the kept one, which must exist.
fn open_part(part: &Path, offset: u64) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options.read(true);
    if offset == 0 {
        options.write(true).create(true).truncate(true);
    } else {
        options.append(true);
    }
    match options.open(part) {
        Err(e) if offset > 0 && e.kind() == io::ErrorKind::NotFound => Err(StoreError::Offset {
            given: offset,
            kept: 0,
        }),
        result => result.map_err(io_at(part)),
    }
}
