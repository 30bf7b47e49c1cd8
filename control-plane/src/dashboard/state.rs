//! The state the dashboard shows, as one JSON document: what mesh-control
//! reads from Consul (the API's own shapes, so the page and the REST API
//! never disagree), put together for the pages by [`assemble`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    control::{
        AlertView, DeploymentView, IntentionsView, MonitorAlerts, NodeDeploymentsView, NodeInfo,
        NodeRoutes, RolloutView, ServiceInfo, Status, VersionSummary,
    },
    model::RouteSpec,
};

/// The newest versions of a node the state carries; older ones stay in the
/// REST API (`/v1/nodes/{node}/versions`).
pub const MAX_VERSIONS: usize = 50;

/// The newest rollouts the state carries; older ones stay in the REST API.
pub const MAX_ROLLOUTS: usize = 20;

/// The newest deployments the state carries; older ones stay in the REST
/// API (`/v1/deployments`).
pub const MAX_DEPLOYMENTS: usize = 20;

/// Consul's check of a node's agent (Serf membership).
pub const AGENT_CHECK: &str = "serfHealth";

/// What the dashboard shows, pushed whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Which replica answers and which one leads.
    pub status: Status,
    /// Consul's nodes, by name.
    pub nodes: Vec<NodeView>,
    /// Consul's services, by name, with their instances and checks.
    pub services: Vec<ServiceInfo>,
    /// Each node's current routes and newest versions, by node name (only
    /// nodes that have routes).
    pub routes: BTreeMap<String, NodeHistory>,
    /// At most [`MAX_ROLLOUTS`] rollouts as the API shows them, the one
    /// started last first (so one under way, if any, is the first).
    pub rollouts: Vec<RolloutView>,
    /// How many rollouts there are in all.
    pub rollouts_total: u64,
    /// At most [`MAX_DEPLOYMENTS`] deployments as the API shows them, the
    /// one started last (the highest id) first.
    pub deployments: Vec<DeploymentView>,
    /// How many deployments there are in all.
    pub deployments_total: u64,
    /// What each node's deployer runs and keeps, by node name, as
    /// `GET /v1/deployers` shows it (a node whose deployer did not answer
    /// says why); empty until a first deployment.
    pub deployers: Vec<NodeDeploymentsView>,
    /// mesh-monitor's open alerts, the critical ones first, each severity
    /// oldest first; whether a monitor is configured, and why it did not
    /// answer if it did not (its alerts are then none: a monitor that is
    /// not asked tells nothing).
    pub monitor: MonitorAlerts,
    /// Every intention and the default, as `GET /v1/intentions` shows
    /// them.
    pub intentions: IntentionsView,
    /// Why the newest read failed; empty when it did not. The rest is then
    /// the last state read in full.
    pub error: String,
    /// When the data last changed (RFC 3339).
    pub updated_at: String,
}

/// A node with what the dashboard adds to the API's view of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// The node as `GET /v1/nodes` shows it.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its Consul agent's health (`passing`, `warning`, `critical`), from
    /// Consul's `serfHealth` check; `unknown` when no instance on the node
    /// carries it (a node without services).
    pub agent: String,
    /// How many service instances run on it.
    pub instances: u32,
}

/// A node's current routes and its newest versions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeHistory {
    /// The routes' revision.
    pub revision: u64,
    /// The current version.
    pub version: u64,
    /// Routes by service name.
    pub routes: BTreeMap<String, RouteSpec>,
    /// At most [`MAX_VERSIONS`] versions, newest first.
    pub versions: Vec<VersionSummary>,
    /// How many versions the node has in all.
    pub versions_total: u64,
}

/// One read of everything the dashboard shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// Which replica answers and which one leads.
    pub status: Status,
    /// `GET /v1/nodes`.
    pub nodes: Vec<NodeInfo>,
    /// `GET /v1/services`.
    pub services: Vec<ServiceInfo>,
    /// Each node's routes and versions (newest first), for nodes with routes.
    pub routes: BTreeMap<String, (NodeRoutes, Vec<VersionSummary>)>,
    /// `GET /v1/rollouts`: every rollout, in any order.
    pub rollouts: Vec<RolloutView>,
    /// `GET /v1/deployments`: every deployment, in any order.
    pub deployments: Vec<DeploymentView>,
    /// `GET /v1/deployers`: what each node's deployer runs and keeps.
    pub deployers: Vec<NodeDeploymentsView>,
    /// `GET /v1/alerts`: mesh-monitor's open alerts, in any order.
    pub alerts: MonitorAlerts,
    /// `GET /v1/intentions`: every intention and the default.
    pub intentions: IntentionsView,
}

/// Puts a reading together for the pages: nodes and services by name,
/// each node's agent health and instance count, the newest versions, the
/// newest rollouts and deployments, the deployers by node, the worst
/// alerts first.
pub fn assemble(reading: Reading, updated_at: String) -> Snapshot {
    let Reading {
        status,
        mut nodes,
        mut services,
        routes,
        rollouts,
        mut deployments,
        mut deployers,
        mut alerts,
        intentions,
    } = reading;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let nodes = nodes
        .into_iter()
        .map(|info| NodeView {
            agent: agent_health(&services, &info.name),
            instances: instance_count(&services, &info.name),
            info,
        })
        .collect();
    let routes = routes
        .into_iter()
        .map(|(node, (current, mut versions))| {
            let versions_total = versions.len() as u64;
            versions.sort_by_key(|v| std::cmp::Reverse(v.number));
            versions.truncate(MAX_VERSIONS);
            let history = NodeHistory {
                revision: current.revision,
                version: current.version,
                routes: current.routes,
                versions,
                versions_total,
            };
            (node, history)
        })
        .collect();
    let rollouts_total = rollouts.len() as u64;
    let deployments_total = deployments.len() as u64;
    // Ids are handed out in the order deployments start.
    deployments.sort_by_key(|d| std::cmp::Reverse(d.id));
    deployments.truncate(MAX_DEPLOYMENTS);
    deployers.sort_by(|a, b| a.node.cmp(&b.node));
    alerts.alerts.sort_by(AlertView::worst_first);
    Snapshot {
        status,
        nodes,
        services,
        routes,
        rollouts: newest_rollouts(rollouts),
        rollouts_total,
        deployments,
        deployments_total,
        deployers,
        monitor: alerts,
        intentions,
        error: String::new(),
        updated_at,
    }
}

/// The [`MAX_ROLLOUTS`] rollouts started last, the last one first. Only
/// one rollout runs at a time and a new one starts only once the last has
/// ended, so the one under way is always kept, and first, even when its
/// version is older than that of a rollout that ended before it (versions
/// are numbered when staged, not when rolled out).
fn newest_rollouts(mut rollouts: Vec<RolloutView>) -> Vec<RolloutView> {
    // RFC 3339 times of one fixed width sort as text.
    rollouts.sort_by(|a, b| {
        (b.created_at.as_str(), b.version).cmp(&(a.created_at.as_str(), a.version))
    });
    rollouts.truncate(MAX_ROLLOUTS);
    rollouts
}

/// The worst status of `node`'s agent check among the instances that
/// carry it; `unknown` when none does.
fn agent_health(services: &[ServiceInfo], node: &str) -> String {
    let seen: BTreeSet<&str> = services
        .iter()
        .flat_map(|s| &s.instances)
        .filter(|i| i.node == node)
        .flat_map(|i| &i.checks)
        .filter(|c| c.id == AGENT_CHECK)
        .map(|c| c.status.as_str())
        .collect();
    ["critical", "warning", "passing"]
        .into_iter()
        .find(|s| seen.contains(s))
        .or_else(|| seen.first().copied())
        .unwrap_or("unknown")
        .to_owned()
}

fn instance_count(services: &[ServiceInfo], node: &str) -> u32 {
    services
        .iter()
        .flat_map(|s| &s.instances)
        .filter(|i| i.node == node)
        .count() as u32
}

// === impl Snapshot ===

impl Snapshot {
    /// Whether `other` shows the same as this one (the time aside).
    pub fn same_as(&self, other: &Snapshot) -> bool {
        self.status == other.status
            && self.nodes == other.nodes
            && self.services == other.services
            && self.routes == other.routes
            && self.rollouts == other.rollouts
            && self.rollouts_total == other.rollouts_total
            && self.deployments == other.deployments
            && self.deployments_total == other.deployments_total
            && self.deployers == other.deployers
            && self.monitor == other.monitor
            && self.intentions == other.intentions
            && self.error == other.error
    }

    /// The last good data with the reason the newest read failed.
    pub fn with_error(&self, error: String, updated_at: String) -> Snapshot {
        Snapshot {
            error,
            updated_at,
            ..self.clone()
        }
    }

    /// The state as one line of JSON (an SSE `data:` field).
    pub fn to_json(&self) -> String {
        // A derived Serialize of strings, numbers and maps with string keys
        // cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({ "error": format!("the state does not serialize: {e}") }).to_string()
        })
    }
}
