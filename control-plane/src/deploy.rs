//! Rolling deployments of artifacts (jars) to the nodes' mesh-deployers,
//! one node at a time.
//!
//! `Deploy` keeps the artifact in Consul KV (in [`CHUNK_SIZE`] chunks, its
//! metadata written last, so a stored version is whole and never changes)
//! and stores a [`Deployment`] record (`mesh/deployments/<id>`) with an
//! active marker per service, so one deployment of a service runs at a
//! time. The leader replica drives it ([`driver`]): per node `pending` →
//! `uploading` → `deploying` → `soaking` → `done`, each state written
//! (check-and-set) before what it does, and every step first looks at
//! what the node's deployer already has and runs, so a new leader, or the
//! same one after a deployer restart, carries on where things stand.
//!
//! A node whose new version fails its health gate, or fails its soak, ends
//! `rolled-back` (the deployer runs the version it ran before) or `failed`,
//! the deployment halts, and the nodes after it are `skipped`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub mod driver;
#[cfg(test)]
mod tests;

/// The largest artifact mesh-control takes.
pub const MAX_ARTIFACT_SIZE: u64 = 256 << 20;

/// The bytes of an artifact per KV key (Consul takes 512 KiB a value).
pub const CHUNK_SIZE: usize = 256 << 10;

/// How many versions of a service KV keeps (older ones not in use go).
pub const KEEP_VERSIONS: usize = 5;

/// The most events a deployment record keeps (the oldest go first).
pub const MAX_EVENTS: usize = 200;

/// The most nodes one deployment takes.
pub const MAX_NODES: usize = 1000;

pub use mesh_runtime::artifact::{
    MAX_FILE_NAME_LEN, MAX_VERSION_LEN, check_file_name, check_version,
};

/// How long a new instance has to become healthy by default.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 60_000;
/// How long an old instance keeps serving by default.
pub const DEFAULT_DRAIN_MS: u64 = 5_000;
/// How long a node soaks by default.
pub const DEFAULT_SOAK_MS: u64 = 10_000;

/// The command meshctl gives when none is named.
pub const DEFAULT_COMMAND: &str = "java -jar {artifact} --server.port={port}";

/// Where a deployment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentState {
    /// Nodes are being taken, one at a time.
    Running,
    /// Every node runs the new version.
    Succeeded,
    /// A node failed (and was rolled back); the later nodes were skipped.
    Halted,
    /// Stopped by an operator; no further node is touched.
    Aborted,
}

/// Where one node of a deployment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Not reached yet.
    Pending,
    /// The artifact is being sent to its deployer.
    Uploading,
    /// Its deployer is replacing the running version.
    Deploying,
    /// The new version runs; it must stay healthy for the soak.
    Soaking,
    /// Runs the new version, healthy through the soak.
    Done,
    /// The deploy failed and the old version does not run.
    Failed,
    /// The old version is being put back.
    RollingBack,
    /// Runs the old version again (or none, when it ran none).
    RolledBack,
    /// Not touched: the deployment halted or was aborted before it.
    Skipped,
}

/// What a deploy asks of each node's deployer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    /// The service.
    pub service: String,
    /// The artifact's version.
    pub version: String,
    /// The file name on the nodes.
    pub file_name: String,
    /// The artifact's size.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// The nodes, in order; empty: every node running the service.
    pub nodes: Vec<String>,
    /// `rolling`.
    pub strategy: String,
    /// The command each deployer runs.
    pub command: String,
    /// Environment of the process.
    pub env: BTreeMap<String, String>,
    /// The health path; empty: `/health`.
    pub health_path: String,
    /// How long a new instance has to become healthy.
    pub health_timeout_ms: u64,
    /// How long an old instance keeps serving once deregistered.
    pub drain_ms: u64,
    /// How long a node must stay healthy before the next.
    pub soak_ms: u64,
    /// Tags of the registration.
    pub tags: Vec<String>,
    /// Who deploys.
    pub author: String,
}

/// An artifact kept in KV (`mesh/artifacts/<service>/<version>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The file name on the nodes.
    pub file_name: String,
    /// The bytes per chunk key.
    pub chunk_size: u64,
    /// How many chunk keys.
    pub chunks: u64,
    /// When it was stored (ms since the epoch).
    pub stored_at: u64,
}

/// One node of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    /// The node.
    pub node: String,
    /// Where it is.
    pub state: NodeState,
    /// What is going on, or what went wrong.
    #[serde(default)]
    pub detail: String,
    /// The version it ran before (empty: none); `None` until it was read.
    #[serde(default)]
    pub from_version: Option<String>,
    /// The instance the deploy started, once known.
    #[serde(default)]
    pub instance_id: String,
    /// When its deploy started (ms); 0: not yet.
    #[serde(default)]
    pub started_at_ms: u64,
    /// When it finished (ms); 0: not yet.
    #[serde(default)]
    pub finished_at_ms: u64,
    /// When its soak started (ms); 0: not yet.
    #[serde(default)]
    pub soak_started_at_ms: u64,
    /// The new instance's restarts when the soak started.
    #[serde(default)]
    pub soak_restarts: u32,
    /// Since when its deployer has not answered (ms); 0: it answers.
    #[serde(default)]
    pub unreachable_since_ms: u64,
}

/// A line of a deployment's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What happened.
    pub text: String,
}

/// A deployment, as stored (`mesh/deployments/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Its number.
    pub id: u64,
    /// What is deployed and how (`nodes` resolved).
    pub spec: DeploySpec,
    /// When (ms since the epoch).
    pub created_at_ms: u64,
    /// When the record last changed.
    pub updated_at_ms: u64,
    /// Where it is.
    pub state: DeploymentState,
    /// Why it halted or was aborted.
    #[serde(default)]
    pub reason: String,
    /// Every node, in order.
    pub nodes: Vec<NodeProgress>,
    /// What happened, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
    /// The replica that last drove it.
    #[serde(default)]
    pub driver: String,
}

// === impl DeploymentState ===

impl DeploymentState {
    /// Whether it has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Running)
    }

    /// The name the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Halted => "halted",
            Self::Aborted => "aborted",
        }
    }
}

// === impl NodeState ===

impl NodeState {
    /// The name the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Uploading => "uploading",
            Self::Deploying => "deploying",
            Self::Soaking => "soaking",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::RollingBack => "rolling-back",
            Self::RolledBack => "rolled-back",
            Self::Skipped => "skipped",
        }
    }

    /// Whether nothing more happens to the node.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::RolledBack | Self::Skipped
        )
    }

    /// Whether the driver is in the middle of it.
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            Self::Uploading | Self::Deploying | Self::Soaking | Self::RollingBack
        )
    }
}

// === impl DeploySpec ===

impl DeploySpec {
    /// Checks every field but the nodes' presence in the catalog, fills
    /// the defaults and normalizes (lowercase SHA-256, trimmed command).
    /// The error names the field.
    pub fn check(mut self) -> Result<Self, (String, String)> {
        fn bad<T>(field: &str, m: String) -> Result<T, (String, String)> {
            Err((field.to_owned(), m))
        }
        crate::model::check_service_name(&self.service).or_else(|m| bad("service", m))?;
        check_version(&self.version).or_else(|m| bad("version", m))?;
        check_file_name(&self.file_name).or_else(|m| bad("file_name", m))?;
        if self.size == 0 {
            return bad("size", "the artifact is empty (size 0)".into());
        }
        if self.size > MAX_ARTIFACT_SIZE {
            return bad(
                "size",
                format!(
                    "{} bytes is more than the largest artifact ({} MiB)",
                    self.size,
                    MAX_ARTIFACT_SIZE >> 20
                ),
            );
        }
        self.sha256 = self.sha256.trim().to_ascii_lowercase();
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("sha256", format!("{:?} is not 64 hex digits", self.sha256));
        }
        match self.strategy.trim() {
            "" | "rolling" => self.strategy = "rolling".into(),
            other => {
                return bad(
                    "strategy",
                    format!("{other:?} is not a strategy (the only one is \"rolling\")"),
                );
            }
        }
        self.command = self.command.trim().to_owned();
        if self.command.is_empty() {
            return bad(
                "command",
                format!("the command to run is required (e.g. `{DEFAULT_COMMAND}`)"),
            );
        }
        if !self.health_path.is_empty() && !self.health_path.starts_with('/') {
            return bad(
                "health_path",
                format!("{:?} must start with '/'", self.health_path),
            );
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return bad(
                    "env",
                    format!("{key:?} is not an environment variable name"),
                );
            }
        }
        if let Some(tag) = self.tags.iter().find(|t| t.trim().is_empty()) {
            return bad("tags", format!("{tag:?} is an empty tag"));
        }
        self.health_timeout_ms = or_default(self.health_timeout_ms, DEFAULT_HEALTH_TIMEOUT_MS);
        self.drain_ms = or_default(self.drain_ms, DEFAULT_DRAIN_MS);
        self.soak_ms = or_default(self.soak_ms, DEFAULT_SOAK_MS);
        for (field, ms, max) in [
            ("health_timeout_ms", self.health_timeout_ms, 3_600_000),
            ("drain_ms", self.drain_ms, 3_600_000),
            ("soak_ms", self.soak_ms, 86_400_000),
        ] {
            if ms > max {
                return bad(field, format!("{ms} is more than {max} ms"));
            }
        }
        if self.nodes.len() > MAX_NODES {
            return bad("nodes", format!("at most {MAX_NODES} nodes"));
        }
        let mut seen = BTreeSet::new();
        for node in &self.nodes {
            crate::model::check_node_name(node).or_else(|m| bad("nodes", m))?;
            if !seen.insert(node.as_str()) {
                return bad("nodes", format!("node {node:?} is named twice"));
            }
        }
        Ok(self)
    }
}

fn or_default(ms: u64, default: u64) -> u64 {
    if ms == 0 { default } else { ms }
}

/// How many chunk keys an artifact of `size` bytes takes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE as u64)
}

/// The versions to delete so that `keep` remain: the oldest by the time
/// they were stored, except those in `in_use`. `stored` is (version,
/// stored at).
pub fn prune(stored: &[(String, u64)], in_use: &BTreeSet<String>, keep: usize) -> Vec<String> {
    let mut all: Vec<&(String, u64)> = stored.iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    all.iter()
        .skip(keep)
        .filter(|(v, _)| !in_use.contains(v))
        .map(|(v, _)| v.clone())
        .collect()
}

// === impl Deployment ===

impl Deployment {
    /// A new running deployment `id` of `spec` (its nodes resolved).
    pub fn new(id: u64, spec: DeploySpec, now_ms: u64) -> Self {
        let nodes = spec
            .nodes
            .iter()
            .map(|node| NodeProgress {
                node: node.clone(),
                state: NodeState::Pending,
                detail: String::new(),
                from_version: None,
                instance_id: String::new(),
                started_at_ms: 0,
                finished_at_ms: 0,
                soak_started_at_ms: 0,
                soak_restarts: 0,
                unreachable_since_ms: 0,
            })
            .collect();
        let text = format!(
            "started by {} to deploy {} {} to {}",
            spec.author,
            spec.service,
            spec.version,
            spec.nodes.join(", ")
        );
        let mut d = Self {
            id,
            spec,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            state: DeploymentState::Running,
            reason: String::new(),
            nodes,
            events: Vec::new(),
            driver: String::new(),
        };
        d.event(now_ms, text);
        d
    }

    /// Appends a line to the history, dropping the oldest past [`MAX_EVENTS`].
    pub fn event(&mut self, at_ms: u64, text: impl Into<String>) {
        self.events.push(Event {
            at_ms,
            text: text.into(),
        });
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
        self.updated_at_ms = at_ms;
    }

    /// The node the deployment is at: the first that has not finished.
    pub fn current(&self) -> Option<usize> {
        self.nodes.iter().position(|n| !n.state.is_final())
    }

    /// The node's progress, to change.
    pub fn node_mut(&mut self, node: &str) -> Option<&mut NodeProgress> {
        self.nodes.iter_mut().find(|n| n.node == node)
    }

    /// Moves node `k` to `state` with `detail`, and notes it.
    pub fn set_node(&mut self, k: usize, state: NodeState, detail: impl Into<String>, now: u64) {
        let Some(n) = self.nodes.get_mut(k) else {
            return;
        };
        let detail = detail.into();
        n.state = state;
        n.detail.clone_from(&detail);
        if state == NodeState::Uploading && n.started_at_ms == 0 {
            n.started_at_ms = now;
        }
        if state.is_final() && n.finished_at_ms == 0 {
            n.finished_at_ms = now;
        }
        let line = if detail.is_empty() {
            format!("{}: {}", n.node, state.as_str())
        } else {
            format!("{}: {} ({detail})", n.node, state.as_str())
        };
        self.event(now, line);
    }

    /// Ends it `halted` with `reason`; the nodes not reached are skipped.
    pub fn halt(&mut self, reason: impl Into<String>, now: u64) {
        let reason = reason.into();
        self.skip_rest("the deployment halted before this node", now);
        self.state = DeploymentState::Halted;
        self.event(now, format!("halted: {reason}"));
        self.reason = reason;
    }

    /// Ends it `aborted` by `author`, unless it has ended: the nodes not
    /// reached are skipped; a node under way keeps its state, and the
    /// driver settles it once its call returns. Returns whether it changed.
    pub fn abort(&mut self, author: &str, now: u64) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.skip_rest("the deployment was aborted before this node", now);
        for n in &mut self.nodes {
            if n.state.is_in_flight() {
                n.detail = format!("aborted while {}", n.state.as_str());
            }
        }
        self.state = DeploymentState::Aborted;
        self.reason = format!("aborted by {author}");
        self.event(now, format!("aborted by {author}"));
        true
    }

    /// Whether it has ended and no node is under way any more: then its
    /// service's marker goes.
    pub fn is_settled(&self) -> bool {
        self.state.is_final() && !self.nodes.iter().any(|n| n.state.is_in_flight())
    }

    /// Ends it `succeeded` when every node is done.
    pub fn finish_if_done(&mut self, now: u64) -> bool {
        if self.state != DeploymentState::Running
            || self.nodes.iter().any(|n| n.state != NodeState::Done)
        {
            return false;
        }
        self.state = DeploymentState::Succeeded;
        self.event(
            now,
            format!(
                "succeeded: {} {} runs on every node",
                self.spec.service, self.spec.version
            ),
        );
        true
    }

    fn skip_rest(&mut self, why: &str, now: u64) {
        for n in &mut self.nodes {
            if n.state == NodeState::Pending {
                n.state = NodeState::Skipped;
                n.detail = why.to_owned();
                n.finished_at_ms = now;
            }
        }
    }
}
