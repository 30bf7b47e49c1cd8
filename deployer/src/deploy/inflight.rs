//! The deploy under way of each service,
//! `<data_dir>/deploys/in-flight/<service>.json`, written atomically before
//! the new instance is started and removed once the deploy ended, either
//! way. A marker still there when the deployer starts names a deploy the
//! last deployer died in: the new instance, the ones it was to replace,
//! and when it began (see [`super::reconcile`]).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use mesh_runtime::fs::write_atomic;
use serde::{Deserialize, Serialize};

/// A deploy that started its new instance and has not ended yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InFlight {
    /// The service.
    pub(super) service: String,
    /// The instance the deploy starts.
    pub(super) instance_id: String,
    /// The instances it replaces once the new one is routable.
    pub(super) replaces: Vec<String>,
    /// When the deploy began, in milliseconds since the Unix epoch: a
    /// deploy record older than this is an earlier deploy's.
    pub(super) started_at_ms: u64,
    /// How long a replaced instance serves after its deregistration.
    pub(super) drain_ms: u64,
    /// How long an instance has to exit after SIGTERM.
    pub(super) stop_grace_ms: u64,
}

/// The marker file of `service` in `dir`.
fn path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.json"))
}

/// Writes (replacing) the marker of `marker.service`.
pub(super) fn write(dir: &Path, marker: &InFlight) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let bytes = serde_json::to_vec_pretty(marker).map_err(io::Error::other)?;
    write_atomic(&path(dir, &marker.service), &bytes)
}

/// Removes the marker of `service`; a missing one is fine.
pub(super) fn remove(dir: &Path, service: &str) -> io::Result<()> {
    match fs::remove_file(path(dir, service)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every marker in `dir` (none when it does not exist), each with its file
/// and what reading it gave: a marker that does not parse, or whose file
/// name is not its service, is an error naming why. Temp files of atomic
/// writes are skipped.
pub(super) fn read_all(dir: &Path) -> io::Result<Vec<(PathBuf, Result<InFlight, String>)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name
            .strip_suffix(".json")
            .filter(|_| !name.starts_with('.'))
        else {
            continue;
        };
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<InFlight>(&b).map_err(|e| e.to_string()))
            .and_then(|m| {
                if m.service == stem {
                    Ok(m)
                } else {
                    Err(format!(
                        "marker is for service {:?}, not {stem:?}",
                        m.service
                    ))
                }
            });
        out.push((path, parsed));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(service: &str) -> InFlight {
        InFlight {
            service: service.into(),
            instance_id: format!("{service}-2-4000"),
            replaces: vec![format!("{service}-1-3000")],
            started_at_ms: 7,
            drain_ms: 5000,
            stop_grace_ms: 10000,
        }
    }

    #[test]
    fn markers_are_written_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let in_flight = dir.path().join("in-flight");
        assert!(read_all(&in_flight).unwrap().is_empty());
        write(&in_flight, &marker("orders")).unwrap();
        write(&in_flight, &marker("billing")).unwrap();
        let read: Vec<_> = read_all(&in_flight)
            .unwrap()
            .into_iter()
            .map(|(_, m)| m.unwrap().service)
            .collect();
        assert_eq!(read, ["billing", "orders"]);
        remove(&in_flight, "orders").unwrap();
        remove(&in_flight, "orders").unwrap();
        assert_eq!(read_all(&in_flight).unwrap().len(), 1);
    }

    #[test]
    fn a_marker_under_another_name_or_unreadable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &marker("orders")).unwrap();
        fs::rename(
            dir.path().join("orders.json"),
            dir.path().join("other.json"),
        )
        .unwrap();
        fs::write(dir.path().join("bad.json"), b"{").unwrap();
        let read = read_all(dir.path()).unwrap();
        assert_eq!(read.len(), 2);
        assert!(read[0].1.is_err(), "{:?}", read[0]);
        assert_eq!(
            read[1].1,
            Err(r#"marker is for service "orders", not "other""#.into())
        );
    }
}
