//! The node's config from mesh-control: a numbered version of mesh-proxy's
//! TOML, streamed by the bridge with the routes ([`pb::NodeConfig`]).
//!
//! A version is checked whole before anything changes: its digest, its
//! keys (only `[default_route]`, `[routes.<service>]` and `services` can
//! be applied at run time; any other key refuses the version), and its
//! tables with the very validation the proxy's own file gets
//! ([`Args::validate`]), then merged over the local file's policies
//! ([`Policies::from_config`]). A good version takes the place of the
//! policies at once (one swap: requests in flight keep theirs), is saved
//! in the data folder (atomically) and applied again at the next start
//! before the bridge answers. A bad one is refused with one line naming
//! the key; the last good version stays in effect.
//!
//! How the two sources combine: mesh-control wins for the tables it sets.
//! A `[routes.<service>]` table from mesh-control replaces the local
//! file's table for that service whole; the keys of its `[default_route]`
//! take the place of the local default route's (and of the `lb`, `retries`
//! and `request_timeout` flags); local tables mesh-control does not set
//! stay. `services` (what the node may call) is the local config's to
//! decide: the version's list is checked but does not change the
//! subscription. A SIGHUP reload replaces the local layer and keeps the
//! node config over it.
//!
//! The proxy reports what is in effect (and what it refused, and why) to
//! its bridge ([`Reporter`]) after every change and every
//! [`REPORT_EVERY`], so mesh-control sees each node's version and when it
//! was last heard of.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use mesh_proto::v1::{self as pb, registry_client::RegistryClient};
use mesh_runtime::shutdown::Shutdown;
use mesh_runtime::telemetry::{TracedChannel, traced};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::{
    config::{Args, Config},
    metrics::ProxyMetrics,
    policy::{Policies, RouteSpec},
    table::now_unix_ms,
};

/// The last good node config, in the data folder.
pub const FILE_NAME: &str = "node-config.json";

/// How often the proxy reports even when nothing changed.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The keys of a node config the proxy applies at run time.
const KEYS: [&str; 3] = ["services", "default_route", "routes"];

/// A node config version as received and saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Its number.
    pub version: u64,
    /// mesh-proxy's TOML.
    pub text: String,
    /// Hex SHA-256 of `text`.
    pub sha256: String,
}

/// A node config that passed every check.
#[derive(Clone, Debug)]
pub struct Checked {
    config: NodeConfig,
    tables: Tables,
}

/// The tables of a node config: `[default_route]` as written, and the
/// routes as validated (lowercase names).
#[derive(Clone, Debug, Default)]
struct Tables {
    default_route: Option<RouteSpec>,
    routes: BTreeMap<String, RouteSpec>,
}

/// Where the policies in effect come from, and what was refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Status {
    /// The node config version in effect; 0: none (the local file only).
    pub version: u64,
    /// Its digest.
    pub sha256: String,
    /// `bridge` (received now), `saved` (applied from the data folder at
    /// start, until the bridge sends one) or `none`.
    pub source: &'static str,
    /// When it took effect, Unix milliseconds; 0: never.
    pub applied_at_unix_ms: u64,
    /// The newest version refused since the one in effect.
    pub refused: Option<Refusal>,
    /// Each route table in effect and where it comes from (`control` or
    /// `file`).
    pub routes: BTreeMap<String, &'static str>,
}

/// A refused node config version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// Its number.
    pub version: u64,
    /// Its digest.
    pub sha256: String,
    /// Why, naming the key.
    pub reason: String,
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
}

/// Makes policies the ones every request uses from now on
/// ([`crate::proxy::Proxy::set_policies`]).
pub type SetPolicies = Box<dyn Fn(Policies) + Send + Sync>;

/// The two layers of route policies (the local file, the node config) and
/// where the merged policies go.
pub struct Layers {
    set_policies: SetPolicies,
    path: PathBuf,
    metrics: Arc<ProxyMetrics>,
    state: Mutex<State>,
    status: watch::Sender<Status>,
}

#[derive(Debug)]
struct State {
    local: Config,
    applied: Option<Checked>,
}

/// Sends the status to the bridge (`Registry.ReportStatus`).
#[derive(Debug)]
pub struct Reporter {
    client: RegistryClient<TracedChannel>,
    node: String,
    timeout: Duration,
}

// === impl NodeConfig ===

impl NodeConfig {
    /// Checks `self` whole against the proxy's rules; the error is one
    /// line naming what is wrong.
    pub fn check(self) -> Result<Checked, String> {
        if self.version == 0 {
            return Err("version: must be more than 0".into());
        }
        let digest = hex::encode(Sha256::digest(self.text.as_bytes()));
        if !digest.eq_ignore_ascii_case(self.sha256.trim()) {
            return Err(format!(
                "sha256: {:?} is not the text's ({digest})",
                self.sha256
            ));
        }
        let tables = tables(&self.text)?;
        Ok(Checked {
            config: self,
            tables,
        })
    }
}

impl From<pb::NodeConfig> for NodeConfig {
    fn from(c: pb::NodeConfig) -> Self {
        Self {
            version: c.version,
            text: c.text,
            sha256: c.sha256,
        }
    }
}

/// The tables of `text`, validated as the proxy's own file is.
fn tables(text: &str) -> Result<Tables, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| {
            text.as_bytes()[..s.start.min(text.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1
        });
        let message = e.message().trim().to_owned();
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })?;
    if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!(
            "{key}: cannot be applied while the proxy runs (a node config sets only {})",
            KEYS.join(", ")
        ));
    }
    let json = serde_json::to_value(table).map_err(|e| e.to_string())?;
    let args: Args = serde_json::from_value(json).map_err(|e| e.to_string())?;
    let default_route = args.default_route.clone();
    // The file's own validation, on the config's keys alone.
    let config = Args {
        node: Some("node-config".into()),
        ..args
    }
    .validate()?;
    Ok(Tables {
        default_route,
        routes: config.routes,
    })
}

// === impl Checked ===

impl Checked {
    /// The version.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// `local` with this config's tables over it.
    fn over(&self, local: &Config) -> Config {
        over(local, Some(&self.tables))
    }
}

/// `local` with `tables` over it: mesh-control's keys of the default
/// route, and its route tables whole.
fn over(local: &Config, tables: Option<&Tables>) -> Config {
    let mut config = local.clone();
    let Some(tables) = tables else {
        return config;
    };
    if let Some(d) = &tables.default_route {
        let mut d = d.clone();
        if let Some(lb) = d.lb.take() {
            config.lb = lb;
        }
        if let Some(retries) = d.retries.take() {
            config.retries = retries;
        }
        if let Some(timeout) = d.timeout.take() {
            config.request_timeout = timeout.get();
        }
        config.default_route = d.over(&config.default_route);
    }
    for (name, spec) in &tables.routes {
        config.routes.insert(name.clone(), spec.clone());
    }
    config
}

// === impl Layers ===

impl Layers {
    /// The layers over `config` (the local layer), applied with
    /// `set_policies`; the node config is saved in `config.data_dir`.
    pub fn new(set_policies: SetPolicies, config: &Config, metrics: Arc<ProxyMetrics>) -> Self {
        let status = Status {
            source: "none",
            routes: config.routes.keys().map(|k| (k.clone(), "file")).collect(),
            ..Status::default()
        };
        Self {
            set_policies,
            path: config.data_dir.join(FILE_NAME),
            metrics,
            state: Mutex::new(State {
                local: config.clone(),
                applied: None,
            }),
            status: watch::channel(status).0,
        }
    }

    /// Applies the node config saved by the last run, if there is one and
    /// it still checks out; one line is logged either way.
    pub fn load_saved(&self) {
        let saved = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "saved node config unreadable; waiting for the bridge");
                return;
            }
        };
        let checked = serde_json::from_slice::<NodeConfig>(&saved)
            .map_err(|e| e.to_string())
            .and_then(NodeConfig::check);
        match checked.and_then(|c| self.apply(c, "saved")) {
            Ok(version) => {
                tracing::info!(file = %self.path.display(), version, "node config applied from the data folder until the bridge sends one")
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), reason = %e, "saved node config refused; waiting for the bridge")
            }
        }
    }

    /// Takes a node config from the bridge: applies it when it checks out
    /// and is new, else keeps the one in effect and records the refusal.
    pub fn offer(&self, config: pb::NodeConfig) {
        let config = NodeConfig::from(config);
        let status = self.status.borrow().clone();
        let same = |version: u64, sha: &str| version == config.version && sha == config.sha256;
        if same(status.version, &status.sha256) {
            if status.source != "bridge" {
                // The saved version is the bridge's too: now it says so.
                self.status.send_modify(|s| s.source = "bridge");
            }
            return;
        }
        if status
            .refused
            .as_ref()
            .is_some_and(|r| same(r.version, &r.sha256))
        {
            return;
        }
        let (version, sha256) = (config.version, config.sha256.clone());
        let result = config.check().and_then(|c| self.apply(c, "bridge"));
        match result {
            Ok(_) => {
                self.metrics.node_configs_applied.increment(1);
                self.save();
                tracing::info!(version, "node config applied");
            }
            Err(reason) => {
                self.metrics.node_configs_refused.increment(1);
                tracing::error!(version, %reason, in_effect = status.version, "node config refused; keeping the last good one");
                let refusal = Refusal {
                    version,
                    sha256,
                    reason,
                    at_unix_ms: now_unix_ms(),
                };
                self.status.send_modify(|s| s.refused = Some(refusal));
            }
        }
    }

    /// Replaces the local layer (a SIGHUP reload), keeping the node config
    /// over it; an error changes nothing.
    pub fn set_local(&self, local: Config) -> Result<(), String> {
        let mut state = self.lock();
        let merged = over(&local, state.applied.as_ref().map(|c| &c.tables));
        let policies = Policies::from_config(&merged)?;
        (self.set_policies)(policies);
        state.local = local;
        let routes = route_sources(&state.local, state.applied.as_ref());
        drop(state);
        self.status.send_modify(|s| s.routes = routes);
        Ok(())
    }

    /// Follows the status: changes after every applied or refused config.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Makes `checked` the node config in effect; returns its version.
    fn apply(&self, checked: Checked, source: &'static str) -> Result<u64, String> {
        let mut state = self.lock();
        let policies = Policies::from_config(&checked.over(&state.local))?;
        (self.set_policies)(policies);
        let version = checked.config.version;
        let status = Status {
            version,
            sha256: checked.config.sha256.clone(),
            source,
            applied_at_unix_ms: now_unix_ms(),
            refused: None,
            routes: route_sources(&state.local, Some(&checked)),
        };
        state.applied = Some(checked);
        drop(state);
        self.metrics.node_config_version.set(version as f64);
        self.status.send_replace(status);
        Ok(version)
    }

    /// Saves the config in effect for the next start; a failure is logged
    /// (the config stays in effect, the next start waits for the bridge).
    fn save(&self) {
        let Some(config) = self.lock().applied.as_ref().map(|c| c.config.clone()) else {
            return;
        };
        let written = serde_json::to_vec(&config)
            .map_err(std::io::Error::other)
            .and_then(|bytes| mesh_runtime::fs::write_atomic(&self.path, &bytes));
        if let Err(e) = written {
            tracing::error!(file = %self.path.display(), error = %e, "node config not saved; the next start waits for the bridge");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change of the state is done before the guard drops.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layers")
            .field("path", &self.path)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

/// Each route table in effect and where it comes from.
fn route_sources(local: &Config, node: Option<&Checked>) -> BTreeMap<String, &'static str> {
    let mut routes: BTreeMap<String, &'static str> =
        local.routes.keys().map(|k| (k.clone(), "file")).collect();
    for name in node.into_iter().flat_map(|c| c.tables.routes.keys()) {
        routes.insert(name.clone(), "control");
    }
    routes
}

/// The saved config at `path`, if any (for tests and tools).
pub fn read_saved(path: &Path) -> std::io::Result<Option<NodeConfig>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

// === impl Reporter ===

impl Reporter {
    /// Reports for `node` over `channel`; one call may take `timeout`.
    pub fn new(channel: Channel, node: String, timeout: Duration) -> Self {
        Self {
            client: RegistryClient::new(traced(channel)),
            node,
            timeout,
        }
    }

    /// Reports the status at once, after every change, and every
    /// [`REPORT_EVERY`], until shutdown.
    pub async fn run(self, mut status: watch::Receiver<Status>, mut stop: Shutdown) {
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = status.changed() => if changed.is_err() { return },
                _ = stop.requested() => return,
            }
            let request = self.request(&status.borrow_and_update());
            match (self.send(request).await, failing) {
                (Ok(()), true) => {
                    failing = false;
                    tracing::info!("config status reported again");
                }
                (Ok(()), false) => {}
                (Err(e), false) => {
                    failing = true;
                    tracing::warn!(error = %e, "config status not reported; retrying");
                }
                (Err(e), true) => tracing::debug!(error = %e, "config status still not reported"),
            }
        }
    }

    fn request(&self, status: &Status) -> pb::ReportStatusRequest {
        let (refused_version, reason) = status
            .refused
            .as_ref()
            .map_or((0, String::new()), |r| (r.version, r.reason.clone()));
        pb::ReportStatusRequest {
            node: self.node.clone(),
            version_in_effect: status.version,
            refused_version,
            reason,
        }
    }

    async fn send(&self, request: pb::ReportStatusRequest) -> Result<(), tonic::Status> {
        let mut client = self.client.clone();
        tokio::time::timeout(self.timeout, client.report_status(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("the bridge did not answer in time"))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
