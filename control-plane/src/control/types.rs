//! The model as the API shows it: the REST mirror's JSON bodies, and what
//! the gRPC service converts to and from `mesh.v1` messages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    model::{RouteSpec, Version, rfc3339},
    render::{Format, Upstreams},
    store::ProxyReport,
};

/// Which replica answers and which one leads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The replica that answered.
    pub replica: String,
    /// Whether it holds the leader lock.
    pub is_leader: bool,
    /// The replica holding the leader lock; empty while none does.
    pub leader: String,
    /// The leader's gRPC address.
    pub leader_grpc: String,
    /// The leader's HTTP address.
    pub leader_http: String,
    /// When the leader took the lock (RFC 3339); empty while none does.
    pub leader_since: String,
}

/// A node of Consul's catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Its datacenter.
    pub datacenter: String,
    /// The newest config version stored for it; 0: none.
    pub routes_version: u64,
    /// What its proxy last reported.
    pub proxy: ProxyStatus,
}

/// What a node's proxy last reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// `unknown` until the proxy reports; then `applied` (the node's
    /// newest version is in effect), `refused` (the proxy refused the
    /// newest version and keeps an older one) or `pending`.
    pub state: String,
    /// The config version in effect; 0: none or unknown.
    pub version_in_effect: u64,
    /// When the proxy last reported (RFC 3339); empty: never.
    pub last_seen: String,
    /// The newest version the proxy refused; 0: none.
    #[serde(default)]
    pub refused_version: u64,
    /// Why it refused it.
    #[serde(default)]
    pub reason: String,
}

/// A service of Consul's catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Tags of its instances.
    pub tags: Vec<String>,
    /// Its instances, in any health.
    pub instances: Vec<InstanceInfo>,
}

/// An instance of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance ID.
    pub id: String,
    /// Its node.
    pub node: String,
    /// Its address (its node's when it registered none).
    pub address: String,
    /// Its port.
    pub port: u32,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// `passing`, `warning` or `critical`: the worst of its checks.
    pub health: String,
    /// Its checks (the node's included).
    pub checks: Vec<CheckInfo>,
}

/// One health check's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInfo {
    /// Check ID.
    pub id: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// Its last output.
    pub output: String,
}

/// A node's current routes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRoutes {
    /// The node.
    pub node: String,
    /// Pass it as `expected_revision` to change the routes; 0: none yet.
    pub revision: u64,
    /// The config version these routes are; 0: none yet.
    pub version: u64,
    /// Routes by service name.
    pub routes: BTreeMap<String, RouteSpec>,
}

/// A change of a node's routes (`PUT /v1/nodes/{node}/routes`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRoutes {
    /// The whole new route set, by service name.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteSpec>,
    /// The revision the change is based on (0: the node has no routes yet).
    pub expected_revision: u64,
    /// Who makes the change.
    pub author: String,
}

/// A stored change: the new version and the routes' new revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRoutesResult {
    /// The new version.
    pub version: VersionView,
    /// The routes' new revision.
    pub revision: u64,
}

/// A version without its config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// Version number.
    pub number: u64,
    /// Who made it.
    pub author: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// How many routes it has.
    pub routes: u32,
    /// Whether it is the node's current version; the others are older
    /// ones, or newer ones staged for a rollout (or put back by one).
    #[serde(default)]
    pub current: bool,
}

/// A config version in full.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionView {
    /// The node.
    pub node: String,
    /// Version number.
    pub number: u64,
    /// Who made it.
    pub author: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// Its routes.
    pub routes: BTreeMap<String, RouteSpec>,
    /// The node's mesh-proxy config.
    pub rendered: String,
    /// Unified diff of `rendered` against the previous version's.
    pub diff: String,
}

/// What to render (`GET /v1/nodes/{node}/render?format=…`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderQuery {
    /// `proxy` or `nginx`.
    pub format: Format,
    /// The version; absent or 0: the newest.
    #[serde(default)]
    pub version: u64,
    /// For nginx: `upsync` or `static`; absent: mesh-control's setting.
    #[serde(default)]
    pub upstreams: Option<Upstreams>,
}

/// A rendered config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    /// The node.
    pub node: String,
    /// The version rendered (0: the node has no routes yet).
    pub version: u64,
    /// `proxy` or `nginx`.
    pub format: Format,
    /// The config.
    pub text: String,
    /// Unified diff against the previous version rendered the same way.
    pub diff: String,
}

/// An instance to register on a node (mirrors `mesh.v1.ServiceRegistration`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Instance ID; defaults to the name.
    #[serde(default)]
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address; empty: the node's.
    #[serde(default)]
    pub address: String,
    /// Port.
    pub port: u32,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Health checks.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// A health check of a registration: one of `http`, `tcp`, `ttl`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// URL Consul GETs.
    #[serde(default)]
    pub http: String,
    /// host:port Consul connects to.
    #[serde(default)]
    pub tcp: String,
    /// A TTL the service refreshes.
    #[serde(default)]
    pub ttl: String,
    /// How often Consul runs it.
    #[serde(default)]
    pub interval: String,
    /// How long one run may take.
    #[serde(default)]
    pub timeout: String,
    /// Deregister after being critical this long.
    #[serde(default)]
    pub deregister_critical_service_after: String,
}

/// What a registration through a bridge did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResult {
    /// The node's agent was away: it waits in the bridge's durable queue.
    pub queued: bool,
}

// === impl ProxyStatus ===

impl ProxyStatus {
    /// Nothing reported yet.
    pub fn unknown() -> Self {
        Self {
            state: "unknown".into(),
            version_in_effect: 0,
            last_seen: String::new(),
            refused_version: 0,
            reason: String::new(),
        }
    }

    /// The status of a node whose newest config version is `current`
    /// (0: none), from its proxy's last `report`.
    pub fn of(current: u64, report: Option<&ProxyReport>) -> Self {
        let Some(report) = report else {
            return Self::unknown();
        };
        let state = if report.version_in_effect == current {
            "applied"
        } else if current != 0 && report.refused_version == current {
            "refused"
        } else {
            "pending"
        };
        Self {
            state: state.into(),
            version_in_effect: report.version_in_effect,
            last_seen: rfc3339(report.at_ms),
            refused_version: report.refused_version,
            reason: report.reason.clone(),
        }
    }
}

impl Default for ProxyStatus {
    fn default() -> Self {
        Self::unknown()
    }
}

// === impl VersionView ===

impl From<&Version> for VersionView {
    fn from(v: &Version) -> Self {
        Self {
            node: v.node.clone(),
            number: v.number,
            author: v.author.clone(),
            created_at: rfc3339(v.created_at_ms),
            routes: v
                .routes
                .iter()
                .map(|(k, r)| (k.clone(), r.to_spec()))
                .collect(),
            rendered: v.rendered.clone(),
            diff: v.diff.clone(),
        }
    }
}

impl From<&Version> for VersionSummary {
    fn from(v: &Version) -> Self {
        Self {
            number: v.number,
            author: v.author.clone(),
            created_at: rfc3339(v.created_at_ms),
            routes: v.routes.len() as u32,
            current: false,
        }
    }
}
