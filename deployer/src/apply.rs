//! Config apply for a web server the node still runs (nginx, OpenResty):
//! [`ConfigApplier`] writes a file atomically under one of the allowed
//! folders, validates it, reloads the server and asks it a question; any
//! step that fails puts the previous file back, so the server keeps
//! serving what it served.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    path::{Component, Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::deploy::http;

/// The largest file accepted: 4 MiB.
pub const MAX_CONTENT: usize = 4 * 1024 * 1024;
/// How long validate and reload each may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `verify_url` has to answer 2xx by default.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// The folder config files go under by default.
pub const DEFAULT_CONFIG_ROOT: &str = "/etc/nginx";
/// The validate command by default.
pub const DEFAULT_VALIDATE: [&str; 4] = ["nginx", "-t", "-c", "{path}"];
/// The reload command by default.
pub const DEFAULT_RELOAD: [&str; 3] = ["nginx", "-s", "reload"];

/// How much of a command's output an error carries (its end).
const MAX_OUTPUT: usize = 4096;
/// Pause between two verify requests.
const VERIFY_INTERVAL: Duration = Duration::from_millis(100);
/// The most one verify request may take.
const VERIFY_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Applies config files under its folders, one call per path at a time.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConfigApplier {
    roots: Arc<[PathBuf]>,
    /// One lock per path applied so far.
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

/// What to apply.
#[derive(Clone, Debug)]
pub struct ApplySpec {
    /// Absolute path of the file.
    pub path: String,
    /// The whole new file.
    pub content: Vec<u8>,
    /// The validate command (`{path}` is put in); empty: none.
    pub validate: Vec<String>,
    /// The reload command (`{path}` is put in); empty: none.
    pub reload: Vec<String>,
    /// Asked after the reload until it answers 2xx, if set.
    pub verify_url: Option<String>,
    /// How long `verify_url` has to answer 2xx.
    pub verify_timeout: Duration,
}

/// What an apply did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// SHA-256 of the file now in place, lowercase hex.
    pub sha256: String,
    /// False when the file held this content already.
    pub changed: bool,
}

/// Why an apply did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request is wrong; nothing was touched.
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Reading or writing the file failed before anything changed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A step failed; `restored` says what became of the previous file.
    #[error("{step} failed: {detail}; {restored}")]
    Failed {
        /// validate, reload or verify.
        step: &'static str,
        /// The command's output, or the verify answer.
        detail: String,
        /// Whether the previous file is back (and reloaded).
        restored: String,
    },
}

// === impl ConfigApplier ===

impl ConfigApplier {
    /// Applies files under `roots` (absolute folders) only.
    pub fn new(roots: Vec<PathBuf>) -> Self {
        Self {
            roots: roots.into(),
            locks: Arc::default(),
        }
    }

    /// Writes, validates, reloads and verifies `spec`; on a failed step the
    /// previous file is put back.
    pub async fn apply(&self, spec: ApplySpec) -> Result<Applied, ApplyError> {
        let path = self.check_path(&spec.path)?;
        if spec.content.len() > MAX_CONTENT {
            return Err(invalid(
                "content",
                format!("{} bytes is more than {MAX_CONTENT}", spec.content.len()),
            ));
        }
        let verify = spec.verify_url.as_deref().map(verify_addr).transpose()?;
        let lock = self.lock(&path);
        let _held = lock.lock().await;

        let sha256 = hex::encode(Sha256::digest(&spec.content));
        let previous = read_previous(&path).await?;
        if previous.as_deref() == Some(spec.content.as_slice()) {
            return Ok(Applied {
                sha256,
                changed: false,
            });
        }
        write(&path, spec.content.clone())
            .await
            .map_err(|source| ApplyError::Io {
                path: path.clone(),
                source,
            })?;
        let apply = Apply {
            path: &path,
            previous,
            spec: &spec,
        };
        apply.run(verify).await?;
        tracing::info!(path = %path.display(), %sha256, "config applied");
        Ok(Applied {
            sha256,
            changed: true,
        })
    }

    /// The path if it is absolute, plain and under a root whose folder
    /// exists.
    fn check_path(&self, given: &str) -> Result<PathBuf, ApplyError> {
        let path = Path::new(given);
        let plain = path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
        if !path.is_absolute() || !plain || given.contains("/./") || given.ends_with('/') {
            return Err(invalid(
                "path",
                format!("{given:?} must be an absolute path without `.` or `..` parts"),
            ));
        }
        let outside = || {
            invalid(
                "path",
                format!(
                    "{given:?} is not under an allowed folder ({})",
                    self.roots_list()
                ),
            )
        };
        let root = self
            .roots
            .iter()
            .find(|r| path.starts_with(r) && path != r.as_path())
            .ok_or_else(outside)?;
        // A symlink on the way must not lead out of the root.
        let parent = path.parent().ok_or_else(outside)?;
        let (real_parent, real_root) = (parent.canonicalize(), root.canonicalize());
        match (real_parent, real_root) {
            (Ok(p), Ok(r)) if p.starts_with(&r) => Ok(path.to_path_buf()),
            (Err(e), _) => Err(invalid(
                "path",
                format!("{given:?}: its folder {}: {e}", parent.display()),
            )),
            _ => Err(outside()),
        }
    }

    fn roots_list(&self) -> String {
        let names: Vec<_> = self.roots.iter().map(|r| r.display().to_string()).collect();
        names.join(", ")
    }

    fn lock(&self, path: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(path.to_path_buf()).or_default().clone()
    }
}

/// One apply under way, after the new file is written.
struct Apply<'a> {
    path: &'a Path,
    previous: Option<Vec<u8>>,
    spec: &'a ApplySpec,
}

// === impl Apply ===

impl Apply<'_> {
    async fn run(&self, verify: Option<(SocketAddr, String)>) -> Result<(), ApplyError> {
        if !self.spec.validate.is_empty()
            && let Err(detail) = run(&self.spec.validate, self.path).await
        {
            let restored = self.restore(false).await;
            return Err(failed("validate", detail, restored));
        }
        if !self.spec.reload.is_empty()
            && let Err(detail) = run(&self.spec.reload, self.path).await
        {
            let restored = self.restore(true).await;
            return Err(failed("reload", detail, restored));
        }
        if let Some((addr, target)) = verify
            && let Err(detail) = verify_get(addr, &target, self.spec.verify_timeout).await
        {
            let restored = self.restore(true).await;
            return Err(failed("verify", detail, restored));
        }
        Ok(())
    }

    /// Puts the previous file back (or removes the new one), then reloads
    /// if `reload`; says how that went.
    async fn restore(&self, reload: bool) -> String {
        let path = self.path.to_path_buf();
        let result = match self.previous.clone() {
            Some(bytes) => write(&path, bytes).await,
            None => blocking(move || std::fs::remove_file(&path)).await,
        };
        let what = if self.previous.is_some() {
            "the previous file was restored"
        } else {
            "the new file was removed (there was none before)"
        };
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot restore the config");
            return format!("restoring the previous file failed too: {e}");
        }
        if !reload || self.spec.reload.is_empty() {
            return what.to_owned();
        }
        match run(&self.spec.reload, self.path).await {
            Ok(()) => format!("{what} and reloaded"),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot reload the restored config");
                format!("{what} but reloading it failed: {e}")
            }
        }
    }
}

fn invalid(field: &'static str, message: String) -> ApplyError {
    ApplyError::Invalid { field, message }
}

fn failed(step: &'static str, detail: String, restored: String) -> ApplyError {
    tracing::warn!(step, %detail, %restored, "config apply failed");
    ApplyError::Failed {
        step,
        detail,
        restored,
    }
}

/// The loopback address and request target of `url`
/// (`http://127.0.0.1:PORT/path`).
fn verify_addr(url: &str) -> Result<(SocketAddr, String), ApplyError> {
    let bad = |why: &str| invalid("verify_url", format!("{url:?} {why}"));
    let uri: ::http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("must start with http://"));
    }
    let host = uri.host().unwrap_or_default();
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad("must name a loopback IP address"))?;
    if !ip.is_loopback() {
        return Err(bad("must name a loopback IP address"));
    }
    let port = uri.port_u16().ok_or_else(|| bad("must name a port"))?;
    let target = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    Ok((SocketAddr::new(ip, port), target))
}

/// GETs `target` from `addr` until it answers 2xx or `timeout` passes.
async fn verify_get(addr: SocketAddr, target: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match http::get(addr, target, left.min(VERIFY_REQUEST_TIMEOUT), 64 * 1024).await
        {
            Ok((status, _)) if status.is_success() => return Ok(()),
            Ok((status, body)) => format!("answered {status}: {}", String::from_utf8_lossy(&body)),
            Err(e) => e.to_string(),
        };
        if Instant::now() + VERIFY_INTERVAL >= deadline {
            return Err(format!(
                "http://{addr}{target} gave no 2xx within {timeout:?} (last: {})",
                last.trim()
            ));
        }
        tokio::time::sleep(VERIFY_INTERVAL).await;
    }
}

/// Runs `argv` with `{path}` put in, within [`COMMAND_TIMEOUT`]; its
/// output (the end of it) when it fails.
async fn run(argv: &[String], path: &Path) -> Result<(), String> {
    let path = path.to_string_lossy();
    let args: Vec<String> = argv.iter().map(|a| a.replace("{path}", &path)).collect();
    let Some((program, rest)) = args.split_first() else {
        return Ok(());
    };
    let child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("{program}: {e}")),
        Err(_) => return Err(format!("{program} did not end within {COMMAND_TIMEOUT:?}")),
    };
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let text = text.trim();
    let start = text.len().saturating_sub(MAX_OUTPUT);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    Err(format!(
        "{} ({}): {}",
        args.join(" "),
        out.status,
        &text[start..]
    ))
}

async fn read_previous(path: &Path) -> Result<Option<Vec<u8>>, ApplyError> {
    let owned = path.to_path_buf();
    match blocking(move || std::fs::read(&owned)).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ApplyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

async fn write(path: &Path, bytes: Vec<u8>) -> io::Result<()> {
    let path = path.to_path_buf();
    blocking(move || mesh_runtime::fs::write_atomic(&path, &bytes)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("the file task failed: {e}"))))
}

#[cfg(test)]
mod tests;
