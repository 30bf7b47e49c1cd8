//! The routing dump: the last good live table on disk, so a proxy that
//! starts while the bridge (or Consul) is down routes at once.
//!
//! Format: a header line `meshwork-dump v1 sha256=<hex>` and the JSON
//! body it sums (`version`, `written_at_unix_ms`, `services` → endpoints).
//! Writes are atomic (temp file, fsync, rename, fsync folder) and happen in
//! a task fed by a watch channel, off the request path; a burst of updates
//! writes only the latest table. A table without endpoints is never
//! written: a good dump is never replaced by an empty one. A dump that
//! does not check out is refused whole.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_proto::v1 as pb;
use mesh_runtime::{fs::write_atomic, shutdown::Shutdown};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::table::{RoutingTable, Source, now_unix_ms};

/// The dump's file name in the data folder.
pub const FILE_NAME: &str = "routes.dump";

const HEADER: &str = "meshwork-dump v1 sha256=";

/// A dump's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpFile {
    /// The bridge's version of the table.
    pub version: u64,
    /// When it was written, Unix milliseconds.
    pub written_at_unix_ms: u64,
    /// Services and their endpoints.
    pub services: BTreeMap<String, Vec<DumpEndpoint>>,
}

/// One endpoint in a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpEndpoint {
    /// Instance ID.
    pub id: String,
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Consul node.
    pub node: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Meta.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// Why a dump was refused.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The file could not be read.
    #[error("cannot read it: {0}")]
    Read(#[from] io::Error),
    /// No complete header line.
    #[error("truncated: no complete header line")]
    NoHeader,
    /// Not a Meshwork dump, or a version this proxy does not read.
    #[error("not a meshwork-dump v1 file (header {0:?})")]
    BadHeader(String),
    /// The body does not match its checksum.
    #[error(
        "checksum mismatch (truncated or corrupt): header says {expected}, body sums to {actual}"
    )]
    Checksum {
        /// From the header.
        expected: String,
        /// Of the body.
        actual: String,
    },
    /// The body sums right but is not a dump.
    #[error("body is not a routing dump: {0}")]
    Json(#[from] serde_json::Error),
}

/// When the last good dump was written or loaded (Unix ms, 0 = none), for
/// the dump age metric.
#[derive(Debug, Default)]
pub struct DumpClock(AtomicU64);

// === impl DumpFile ===

impl DumpFile {
    /// The dump of `table`, stamped now.
    pub fn of(table: &RoutingTable) -> Self {
        let services = table.map_endpoints(|e| DumpEndpoint {
            id: e.id.clone(),
            address: e.upstream.host().to_owned(),
            port: e.upstream.port(),
            node: e.node.clone(),
            tags: e.tags.clone(),
            meta: e.meta.clone(),
        });
        Self {
            version: table.version,
            written_at_unix_ms: now_unix_ms(),
            services,
        }
    }

    /// The file's bytes: header line with the body's checksum, then body.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let sum = hex::encode(Sha256::digest(&body));
        let mut out = Vec::with_capacity(HEADER.len() + sum.len() + 1 + body.len());
        out.extend_from_slice(HEADER.as_bytes());
        out.extend_from_slice(sum.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&body);
        out
    }

    /// Parses and verifies a file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DumpError> {
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(DumpError::NoHeader)?;
        let (header, body) = (&bytes[..newline], &bytes[newline + 1..]);
        let header = String::from_utf8_lossy(header);
        let expected = match header.strip_prefix(HEADER) {
            Some(sum) if sum.len() == 64 => sum.to_owned(),
            _ => {
                return Err(DumpError::BadHeader(header.chars().take(60).collect()));
            }
        };
        let actual = hex::encode(Sha256::digest(body));
        if !actual.eq_ignore_ascii_case(&expected) {
            return Err(DumpError::Checksum { expected, actual });
        }
        Ok(serde_json::from_slice(body)?)
    }

    /// Reads `path`; `Ok(None)` when there is no dump.
    pub fn load(path: &Path) -> Result<Option<Self>, DumpError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::decode(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The services in the bridge's form, to build a table from.
    pub fn to_proto(&self) -> Vec<pb::ServiceEndpoints> {
        self.services
            .iter()
            .map(|(name, endpoints)| pb::ServiceEndpoints {
                name: name.clone(),
                endpoints: endpoints
                    .iter()
                    .map(|e| pb::Endpoint {
                        id: e.id.clone(),
                        address: e.address.clone(),
                        port: u32::from(e.port),
                        node: e.node.clone(),
                        tags: e.tags.clone(),
                        meta: e.meta.clone().into_iter().collect(),
                    })
                    .collect(),
            })
            .collect()
    }
}

// === impl DumpClock ===

impl DumpClock {
    /// Records a good dump of `at_unix_ms`.
    pub fn set(&self, at_unix_ms: u64) {
        self.0.store(at_unix_ms, Ordering::Relaxed);
    }

    /// The last good dump's time, if any.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }
}

/// Writes every live table published on `tables` to `path`, until
/// shutdown (then writes the last one if it is still pending).
pub async fn run_writer(
    path: PathBuf,
    mut tables: watch::Receiver<Arc<RoutingTable>>,
    clock: Arc<DumpClock>,
    mut shutdown: Shutdown,
) {
    // The table current at start may be live already: write it too.
    tables.mark_changed();
    loop {
        tokio::select! {
            changed = tables.changed() => if changed.is_err() { return },
            _ = shutdown.requested() => {
                if tables.has_changed().unwrap_or(false) {
                    let table = tables.borrow_and_update().clone();
                    write(&path, &table, &clock).await;
                }
                return;
            }
        }
        let table = tables.borrow_and_update().clone();
        write(&path, &table, &clock).await;
    }
}

async fn write(path: &Path, table: &RoutingTable, clock: &DumpClock) {
    if table.source != Source::Live {
        return; // a dump's own table is on disk already
    }
    if table.endpoint_count() == 0 {
        tracing::warn!(file = %path.display(), version = table.version, "routing table has no endpoints; keeping the last good dump");
        return;
    }
    let dump = DumpFile::of(table);
    let at = dump.written_at_unix_ms;
    let bytes = dump.encode();
    let target = path.to_owned();
    // fsync blocks: keep it off the async workers.
    match tokio::task::spawn_blocking(move || write_atomic(&target, &bytes)).await {
        Ok(Ok(())) => {
            clock.set(at);
            tracing::debug!(file = %path.display(), version = table.version, "routing dump written");
        }
        Ok(Err(e)) => {
            tracing::error!(file = %path.display(), error = %e, "cannot write routing dump")
        }
        Err(e) => tracing::error!(file = %path.display(), error = %e, "routing dump writer failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DumpFile {
        let mut services = BTreeMap::new();
        services.insert(
            "orders".to_owned(),
            vec![DumpEndpoint {
                id: "orders-1".into(),
                address: "10.0.0.5".into(),
                port: 8080,
                node: "n1".into(),
                tags: vec!["v1".into()],
                meta: BTreeMap::new(),
            }],
        );
        DumpFile {
            version: 7,
            written_at_unix_ms: 1_700_000_000_000,
            services,
        }
    }

    #[test]
    fn round_trips_with_its_checksum() {
        let bytes = sample().encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("meshwork-dump v1 sha256="), "{text}");
        assert_eq!(DumpFile::decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn truncated_corrupt_and_foreign_files_are_refused_with_a_reason() {
        let good = sample().encode();
        let truncated = &good[..good.len() - 10];
        let e = DumpFile::decode(truncated).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");

        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x20;
        assert!(matches!(
            DumpFile::decode(&flipped),
            Err(DumpError::Checksum { .. })
        ));

        let e = DumpFile::decode(b"meshwork-dump v1 sha256=abc").unwrap_err();
        assert!(matches!(e, DumpError::NoHeader), "{e}");
        let e = DumpFile::decode(b"{\"services\":{}}\n").unwrap_err();
        assert!(matches!(e, DumpError::BadHeader(_)), "{e}");
        let e = DumpFile::decode(b"").unwrap_err();
        assert!(matches!(e, DumpError::NoHeader), "{e}");
    }

    #[test]
    fn a_missing_dump_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            DumpFile::load(&dir.path().join(FILE_NAME))
                .unwrap()
                .is_none()
        );
    }
}
