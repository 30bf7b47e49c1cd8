//! The state that outlives the deployer: one JSON file per wanted instance,
//! `<state_dir>/<instance_id>.json`, written atomically. A record exists
//! from the start of an instance until it is stopped on request; while the
//! instance waits to be restarted it keeps the pid of the process that died.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_runtime::fs::write_atomic;
use serde::{Deserialize, Serialize};

use super::ProcessSpec;

/// What is known about an instance's current process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessRecord {
    /// The process (and process group) id.
    pub(crate) pid: u32,
    /// Its start time from `/proc/<pid>/stat`, to tell a reused pid.
    pub(crate) starttime: u64,
    /// When it was started, in milliseconds since the Unix epoch.
    pub(crate) started_at_ms: u64,
    /// How often the instance was restarted after a crash.
    #[serde(default)]
    pub(crate) restarts: u32,
    /// What runs.
    pub(crate) spec: ProcessSpec,
}

// === impl ProcessRecord ===

impl ProcessRecord {
    /// When the process was started.
    pub(crate) fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_at_ms)
    }
}

/// Milliseconds since the Unix epoch of `t` (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The record file of `instance_id`.
pub(crate) fn path(state_dir: &Path, instance_id: &str) -> PathBuf {
    state_dir.join(format!("{instance_id}.json"))
}

/// Writes (replacing) the record of `record.spec.instance_id`.
pub(crate) fn write(state_dir: &Path, record: &ProcessRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    write_atomic(&path(state_dir, &record.spec.instance_id), &bytes)
}

/// Reads the record of `instance_id`, if there is one.
pub(crate) fn read(state_dir: &Path, instance_id: &str) -> io::Result<Option<ProcessRecord>> {
    match fs::read(path(state_dir, instance_id)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the record of `instance_id`; a missing one is fine.
pub(crate) fn remove(state_dir: &Path, instance_id: &str) -> io::Result<()> {
    match fs::remove_file(path(state_dir, instance_id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every record in `state_dir`, each with its file and what reading it gave
/// (a record that does not parse, or whose file name is not its instance
/// id, is an error naming why). Temp files of atomic writes are skipped.
pub(crate) fn read_all(
    state_dir: &Path,
) -> io::Result<Vec<(PathBuf, Result<ProcessRecord, String>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(state_dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ProcessRecord>(&b).map_err(|e| e.to_string()))
            .and_then(|r| {
                if r.spec.instance_id == stem {
                    Ok(r)
                } else {
                    Err(format!(
                        "record is for instance {:?}, not {stem:?}",
                        r.spec.instance_id
                    ))
                }
            });
        out.push((path, parsed));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
