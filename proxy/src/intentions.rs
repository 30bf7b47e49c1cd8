//! Intentions, enforced by the inbound listener in mtls mode: which
//! service may call which (see `mesh_runtime::intentions` for the
//! decision), on the identity of the peer's certificate.
//!
//! The bridge sends the mesh's whole set on the Discovery stream, with
//! Consul's index as its revision. [`Enforcer::offer`] swaps it in (the
//! request path reads it without a lock) and saves it to
//! `intentions.dump` in the data folder (`meshwork-intentions v1
//! sha256=<hex>` and the JSON body it sums, written atomically off the
//! request path), which the next start loads: a proxy restarted while the
//! bridge or Consul is down enforces the last set it had.
//!
//! Never fail open: a set that does not read is refused whole and the
//! last one stays in force; a proxy that never had one (nothing from the
//! bridge, no dump) denies every request. In direct mode nothing is
//! enforced: without certificates a caller has no identity to judge.
//!
//! Each decision is counted in
//! `mesh_proxy_intention_decisions_total{decision, source, destination}`
//! (`source` is `-` for a peer without a service identity), and the
//! revision in force is `mesh_proxy_intentions_revision` (0: none).

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use mesh_proto::v1 as pb;
use mesh_runtime::{
    fs::write_atomic,
    intentions::{Action, Decision, Intentions},
    metrics::{Counter, Gauge, Registry},
    shutdown::Shutdown,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::table::now_unix_ms;

/// The intentions' file name in the data folder.
pub const FILE_NAME: &str = "intentions.dump";

const HEADER: &str = "meshwork-intentions v1 sha256=";
const DECISIONS: &str = "mesh_proxy_intention_decisions_total";
const REVISION: &str = "mesh_proxy_intentions_revision";

/// The intentions in force, and the decisions made with them.
pub struct Enforcer {
    current: ArcSwapOption<Loaded>,
    /// The sets to save, latest only.
    saves: watch::Sender<Option<Arc<Loaded>>>,
    registry: Registry,
    counters: ArcSwap<HashMap<(Action, String, String), Counter>>,
    revision: Gauge,
}

/// A set of intentions in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loaded {
    /// Consul's index of the bridge's read.
    pub revision: u64,
    /// When the proxy got it from the bridge, Unix milliseconds.
    pub received_at_unix_ms: u64,
    /// The set.
    pub intentions: Intentions,
}

/// Why a request may not reach its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// The intentions deny it.
    Intention {
        /// The calling service; `None`: a peer without a service identity.
        caller: Option<String>,
        /// The service called.
        callee: String,
        /// What decided.
        decision: Decision,
    },
    /// The proxy never got a set of intentions.
    NoIntentions {
        /// The calling service; `None`: a peer without a service identity.
        caller: Option<String>,
        /// The service called.
        callee: String,
    },
}

/// Why an intentions file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read it: {0}")]
    Read(#[from] io::Error),
    /// Not this format, truncated, or corrupt.
    #[error("{0}")]
    Format(String),
    /// The body sums right but does not read.
    #[error("body is not a set of intentions: {0}")]
    Json(#[from] serde_json::Error),
}

/// `/routes`' view of the intentions.
#[derive(Debug, Serialize)]
pub struct IntentionsView {
    /// The revision in force; absent: none, every request is denied.
    pub revision: Option<u64>,
    /// When the proxy got it, Unix milliseconds.
    pub received_at_unix_ms: Option<u64>,
    /// The default action.
    pub default: Option<Action>,
    /// How many intentions the set has.
    pub count: usize,
}

// === impl Enforcer ===

impl Enforcer {
    /// An enforcer without intentions (it denies everything), counting on
    /// `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe_counter(
            DECISIONS,
            "Inbound requests judged by intentions (mtls mode), by decision, source and destination service.",
        );
        registry.describe_gauge(
            REVISION,
            "The revision (Consul index) of the intentions in force; 0: none, every inbound request is denied.",
        );
        Self {
            current: ArcSwapOption::empty(),
            saves: watch::channel(None).0,
            registry: registry.clone(),
            counters: ArcSwap::default(),
            revision: registry.gauge(REVISION, &[]),
        }
    }

    /// Loads the set saved at `path` by an earlier run, unless a set is in
    /// force already. A file that does not check out is refused whole (and
    /// logged): every request is then denied until the bridge sends a set.
    pub fn load(&self, path: &Path) {
        match Loaded::load(path) {
            Ok(None) => {
                tracing::info!(file = %path.display(), "no saved intentions; denying inbound requests until the bridge sends them")
            }
            Ok(Some(loaded)) => {
                tracing::info!(file = %path.display(), revision = loaded.revision, intentions = loaded.intentions.list().len(), "intentions loaded from the dump");
                self.put(Arc::new(loaded));
            }
            Err(e) => {
                tracing::error!(file = %path.display(), reason = %e, "saved intentions refused; denying inbound requests until the bridge sends them")
            }
        }
    }

    /// Takes the set the bridge sent: in force at once, and saved. One
    /// that does not read is refused and the last one stays.
    pub fn offer(&self, sent: pb::Intentions) {
        let intentions: Intentions = match serde_json::from_str(&sent.json) {
            Ok(intentions) => intentions,
            Err(e) => {
                tracing::error!(revision = sent.revision, error = %e, "the bridge sent intentions that do not read; the last ones stay in force");
                return;
            }
        };
        if let Some(current) = self.current.load().as_ref()
            && current.revision == sent.revision
            && current.intentions == intentions
        {
            return;
        }
        tracing::info!(
            revision = sent.revision,
            intentions = intentions.list().len(),
            default = %intentions.default_action(),
            "intentions in force"
        );
        let loaded = Arc::new(Loaded {
            revision: sent.revision,
            received_at_unix_ms: now_unix_ms(),
            intentions,
        });
        self.put(loaded.clone());
        self.saves.send_replace(Some(loaded));
    }

    /// Judges a call from `source` (`None`: a peer without a service
    /// identity) to `destination`, for `method` and the normalized `path`;
    /// counts the decision.
    pub fn authorize(
        &self,
        source: Option<&str>,
        destination: &str,
        method: &str,
        path: &str,
    ) -> Result<(), Denied> {
        let current = self.current.load();
        let Some(loaded) = current.as_ref() else {
            self.count(Action::Deny, source, destination);
            return Err(Denied::NoIntentions {
                caller: source.map(str::to_owned),
                callee: destination.to_owned(),
            });
        };
        let decision = loaded.intentions.decide(source, destination, method, path);
        self.count(decision.action, source, destination);
        match decision.action {
            Action::Allow => Ok(()),
            Action::Deny => Err(Denied::Intention {
                caller: source.map(str::to_owned),
                callee: destination.to_owned(),
                decision,
            }),
        }
    }

    /// The set in force, if any.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    /// What `/routes` shows.
    pub fn view(&self) -> IntentionsView {
        let current = self.current.load();
        let loaded = current.as_ref();
        IntentionsView {
            revision: loaded.map(|l| l.revision),
            received_at_unix_ms: loaded.map(|l| l.received_at_unix_ms),
            default: loaded.map(|l| l.intentions.default_action()),
            count: loaded.map_or(0, |l| l.intentions.list().len()),
        }
    }

    /// Saves every set the bridge sends to `path`, until shutdown (then
    /// the last one if it is still pending). Subscribes at once: a set
    /// offered before the future first runs is saved too.
    pub fn run_writer(
        &self,
        path: PathBuf,
        shutdown: Shutdown,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut saves = self.saves.subscribe();
        saves.mark_changed();
        write_saves(saves, path, shutdown)
    }

    fn put(&self, loaded: Arc<Loaded>) {
        // A revision beyond 2^53 reads approximately; none is that large.
        #[allow(clippy::cast_precision_loss)]
        self.revision.set(loaded.revision as f64);
        self.current.store(Some(loaded));
    }

    fn count(&self, action: Action, source: Option<&str>, destination: &str) {
        let source = source.unwrap_or("-");
        let find = |map: &HashMap<(Action, String, String), Counter>| {
            map.iter()
                .find(|((a, s, d), _)| *a == action && s == source && d == destination)
                .map(|(_, c)| c.clone())
        };
        // Services are few: the map is small, and grows once per pair.
        if let Some(counter) = find(&self.counters.load()) {
            counter.increment(1);
            return;
        }
        let counter = self.registry.counter(
            DECISIONS,
            &[
                ("decision", action.as_str()),
                ("source", source),
                ("destination", destination),
            ],
        );
        self.counters.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(
                (action, source.to_owned(), destination.to_owned()),
                counter.clone(),
            );
            map
        });
        counter.increment(1);
    }
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field(
                "revision",
                &self.current.load().as_ref().map(|l| l.revision),
            )
            .finish_non_exhaustive()
    }
}

async fn write_saves(
    mut saves: watch::Receiver<Option<Arc<Loaded>>>,
    path: PathBuf,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            changed = saves.changed() => if changed.is_err() { return },
            _ = shutdown.requested() => {
                if saves.has_changed().unwrap_or(false) {
                    let pending = saves.borrow_and_update().clone();
                    save(&path, pending).await;
                }
                return;
            }
        }
        let pending = saves.borrow_and_update().clone();
        save(&path, pending).await;
    }
}

async fn save(path: &Path, loaded: Option<Arc<Loaded>>) {
    let Some(loaded) = loaded else { return };
    let bytes = loaded.encode();
    let target = path.to_owned();
    // fsync blocks: keep it off the async workers.
    match tokio::task::spawn_blocking(move || write_atomic(&target, &bytes)).await {
        Ok(Ok(())) => {
            tracing::debug!(file = %path.display(), revision = loaded.revision, "intentions saved")
        }
        Ok(Err(e)) => {
            tracing::error!(file = %path.display(), error = %e, "cannot save intentions")
        }
        Err(e) => tracing::error!(file = %path.display(), error = %e, "intentions writer failed"),
    }
}

// === impl Denied ===

impl Denied {
    /// The service called.
    pub fn callee(&self) -> &str {
        match self {
            Self::Intention { callee, .. } | Self::NoIntentions { callee, .. } => callee,
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (caller, callee) = match self {
            Self::Intention { caller, callee, .. } | Self::NoIntentions { caller, callee } => {
                (caller.as_deref().unwrap_or("(no service identity)"), callee)
            }
        };
        write!(f, "intentions: {caller} -> {callee} refused: ")?;
        match self {
            Self::Intention { decision, .. } => write!(f, "{decision}"),
            Self::NoIntentions { .. } => f.write_str(
                "no intentions received from the bridge yet, and none saved (deny until they are)",
            ),
        }
    }
}

impl std::error::Error for Denied {}

// === impl Loaded ===

impl Loaded {
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
    pub fn decode(bytes: &[u8]) -> Result<Self, FileError> {
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| FileError::Format("truncated: no complete header line".into()))?;
        let (header, body) = (&bytes[..newline], &bytes[newline + 1..]);
        let header = String::from_utf8_lossy(header);
        let expected = match header.strip_prefix(HEADER) {
            Some(sum) if sum.len() == 64 => sum.to_owned(),
            _ => {
                let shown: String = header.chars().take(60).collect();
                return Err(FileError::Format(format!(
                    "not a meshwork-intentions v1 file (header {shown:?})"
                )));
            }
        };
        let actual = hex::encode(Sha256::digest(body));
        if !actual.eq_ignore_ascii_case(&expected) {
            return Err(FileError::Format(format!(
                "checksum mismatch (truncated or corrupt): header says {expected}, body sums to {actual}"
            )));
        }
        Ok(serde_json::from_slice(body)?)
    }

    /// Reads `path`; `Ok(None)` when there is no file.
    pub fn load(path: &Path) -> Result<Option<Self>, FileError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::decode(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests;
