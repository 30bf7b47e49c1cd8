//! The last deploy of each service, `<data_dir>/deploys/<service>.json`,
//! written atomically: what Rollback runs again (command, environment,
//! settings) with another version, also after the deployer restarted.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use mesh_runtime::fs::write_atomic;
use serde::{Deserialize, Serialize};

use super::DeploySpec;

/// The last successful deploy of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    /// What was deployed.
    pub spec: DeploySpec,
    /// The instance it started.
    pub instance_id: String,
    /// When, in milliseconds since the Unix epoch.
    pub deployed_at_ms: u64,
}

/// The record file of `service` in `dir`.
pub(super) fn path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.json"))
}

/// Writes (replacing) the record of `record.spec.service`.
pub(super) fn write(dir: &Path, record: &DeployRecord) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    write_atomic(&path(dir, &record.spec.service), &bytes)
}

/// Reads the record of `service`, if there is one.
pub(super) fn read(dir: &Path, service: &str) -> io::Result<Option<DeployRecord>> {
    match fs::read(path(dir, service)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
