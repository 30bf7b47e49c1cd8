//! Consul ACLs for a test mesh ([`crate::MeshOptions::acl`]): the agents'
//! ACL config (default deny), and a least-privilege policy and token per
//! component, made through Consul's HTTP API once the ACL system is up.
//!
//! Each policy below grants what the component's own Consul calls need and
//! nothing more; a comment on every rule names the call. They are the tested
//! reference for running Meshwork on an ACL-enabled Consul.
//!
//! mesh-proxy, mesh-deployer and the services talk to no Consul agent: a
//! service registers with its node's proxy, the proxy hands the
//! registration to its bridge (`mesh.v1.Registry`), and the bridge registers
//! it with its token (which the agent keeps with the instance, for its
//! anti-entropy sync and health checks). So a node's bridge token says which
//! services may run on that node.
//!
//! Every secret is made here (random UUIDs) and passed in the environment
//! (`MESH_CONSUL_TOKEN`) or a config file only the agent reads, never on a
//! command line.

use std::{
    collections::BTreeMap,
    fmt,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::{HttpClient, mesh::CONSUL_HTTP, netns::Netns, wait::eventually};

/// The policy of every Consul agent's own token (`acl.tokens.agent`);
/// `{node}` is the agent's node name.
pub const AGENT_POLICY: &str = r#"# The agent registers its node and keeps it in sync (anti-entropy's
# Catalog.Register of the node, coordinate updates).
node "{node}" {
  policy = "write"
}
# Anti-entropy reads the node's services back from the catalog to compare
# them with its own (Catalog.NodeServices, filtered by service:read).
service_prefix "" {
  policy = "read"
}
"#;

/// The ACL part of every agent's config: ACLs on, deny what no rule
/// allows, keep the last known answer while the servers are away, keep
/// tokens set through the API across restarts. `{master}` is the bootstrap
/// token's line on a server (Consul 1.8 names it `master`; later versions
/// `initial_management`), `{agent}` the agent's own token.
const AGENT_ACL_CONFIG: &str = r#"primary_datacenter = "dc1"
acl {
  enabled = true
  default_policy = "deny"
  down_policy = "extend-cache"
  enable_token_persistence = true
  tokens {
    {master}
    agent = "{agent}"
  }
}
"#;

/// mesh-bridge's policy on node `{node}`; [`BRIDGE_SERVICE_RULE`] is added
/// once per service the node may run.
pub const BRIDGE_POLICY: &str = r#"# Discovery: GET /v1/catalog/services (the services a proxy may watch) and
# GET /v1/health/service/<name>?passing (their instances), both filtered by
# service:read; Registry.ListInstances: GET /v1/agent/services.
service_prefix "" {
  policy = "read"
}
# GET /v1/health/service/<name> drops the instances of nodes the token
# cannot read.
node_prefix "" {
  policy = "read"
}
# Discovery: the node's routes, GET /v1/kv/mesh/nodes/<node>/routes
# (blocking).
key "mesh/nodes/{node}/routes" {
  policy = "read"
}
# Registry.ReportStatus: PUT /v1/kv/mesh/status/<node>, the version the
# node's proxy runs.
key "mesh/status/{node}" {
  policy = "write"
}
# Discovery: the intentions the node's proxy enforces, one blocking
# GET /v1/kv/mesh/intentions?recurse (mesh/intentions/<source>/<destination>
# and mesh/intentions-default).
key_prefix "mesh/intentions" {
  policy = "read"
}
# Identity over TLS: the mesh CA's certificate, GET /v1/kv/mesh/ca/bundle,
# to check mesh-control before the node's first certificate.
key "mesh/ca/bundle" {
  policy = "read"
}
"#;

/// The rule added to [`BRIDGE_POLICY`] for each service `{service}` its
/// node may run.
pub const BRIDGE_SERVICE_RULE: &str = r#"# Registry.Register/Deregister: PUT /v1/agent/service/register and
# /deregister/<id> of {service}'s instances (the agent syncs them and their
# checks with this token); Checks.SetCheck: PUT /v1/agent/check/register and
# /update/<id> of mesh-monitor's verdicts on them.
service "{service}" {
  policy = "write"
}
"#;

/// mesh-control's policy for a replica on node `{node}`.
pub const CONTROL_POLICY: &str = r#"# Its store: routes, versions, releases, rollouts, deployments, artifacts,
# sequences and the leader lock (GET/PUT/DELETE /v1/kv/mesh/..., PUT /v1/txn,
# PUT /v1/kv/mesh/leader?acquire=|release=).
key_prefix "mesh/" {
  policy = "write"
}
# The proxies' reports, written by the bridges: read only.
key_prefix "mesh/status/" {
  policy = "read"
}
# mesh-monitor's open alerts, shown on the dashboard: read only.
key_prefix "mesh/monitor/" {
  policy = "read"
}
# The leader lock's session on the replica's agent: PUT /v1/session/create,
# /renew/<id>, /destroy/<id>.
session "{node}" {
  policy = "write"
}
# The replica's own instance and alive check: PUT
# /v1/agent/service/register, /deregister/<id>, /v1/agent/check/pass/<id>.
service "mesh-control" {
  policy = "write"
}
# GET /v1/catalog/services and /v1/health/service/<name> (nodes view,
# deployments, the dashboard).
service_prefix "" {
  policy = "read"
}
# GET /v1/catalog/nodes (nodes view, rollout and deployment targets) and the
# health answers' nodes.
node_prefix "" {
  policy = "read"
}
"#;

/// mesh-monitor's policy.
pub const MONITOR_POLICY: &str = r#"# Its open alerts, kept across restarts: GET (on start), PUT and DELETE
# /v1/kv/mesh/monitor/alerts/...
key_prefix "mesh/monitor/alerts/" {
  policy = "write"
}
# What to probe: GET /v1/catalog/services and /v1/health/service/<name>.
service_prefix "" {
  policy = "read"
}
# Whose proxy metrics to read: GET /v1/catalog/nodes; the health answers'
# nodes.
node_prefix "" {
  policy = "read"
}
"#;

/// The tokens of one mesh, by holder: `s1/consul`, `n1/consul` (agents),
/// `n1/bridge`, `n1/mesh-control`, `mesh-monitor`. `Debug` shows no secret.
#[derive(Clone)]
pub struct Acl {
    management: String,
    tokens: BTreeMap<String, Issued>,
}

/// A token's secret; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// One token to make: its secret and its policy's rules.
#[derive(Clone)]
struct Issued {
    secret: String,
    rules: String,
}

// === impl Acl ===

impl Acl {
    /// Secrets and rules for every component of a mesh with `servers` and
    /// `nodes`; `services` names the services each node (by name) may run.
    /// Nothing is sent to Consul yet.
    pub fn plan(
        servers: &[String],
        nodes: &[String],
        services: &BTreeMap<String, Vec<String>>,
    ) -> Result<Self> {
        if let Some(unknown) = services.keys().find(|n| !nodes.contains(n)) {
            bail!("acl_services names node {unknown:?}, which the mesh does not have");
        }
        let mut tokens = BTreeMap::new();
        for name in servers.iter().chain(nodes) {
            tokens.insert(
                format!("{name}/consul"),
                issue(&node_rules(AGENT_POLICY, name))?,
            );
        }
        for node in nodes {
            let mut rules = node_rules(BRIDGE_POLICY, node);
            for service in services.get(node).into_iter().flatten() {
                rules.push_str(&BRIDGE_SERVICE_RULE.replace("{service}", service));
            }
            tokens.insert(format!("{node}/bridge"), issue(&rules)?);
            tokens.insert(
                format!("{node}/mesh-control"),
                issue(&node_rules(CONTROL_POLICY, node))?,
            );
        }
        tokens.insert("mesh-monitor".into(), issue(MONITOR_POLICY)?);
        Ok(Self {
            management: uuid()?,
            tokens,
        })
    }

    /// The management token (`acl.tokens.master`): the harness's own calls.
    pub fn management(&self) -> &str {
        &self.management
    }

    /// The secret of `holder`'s token (`n1/bridge`, `mesh-monitor`, …).
    pub fn token(&self, holder: &str) -> Option<&str> {
        self.tokens.get(holder).map(|t| t.secret.as_str())
    }

    /// Every secret of the mesh, the management token's included.
    pub fn secrets(&self) -> Vec<&str> {
        std::iter::once(self.management.as_str())
            .chain(self.tokens.values().map(|t| t.secret.as_str()))
            .collect()
    }

    /// Writes agent `name`'s ACL config to `path` (the management token
    /// only on a server); only the owner may read it.
    pub fn write_agent_config(&self, path: &Path, name: &str, server: bool) -> Result<()> {
        let agent = self
            .token(&format!("{name}/consul"))
            .ok_or_else(|| anyhow!("no agent token planned for {name}"))?;
        // Only the servers hold the bootstrap token.
        let master = if server {
            format!("master = \"{}\"", self.management)
        } else {
            String::new()
        };
        let hcl = AGENT_ACL_CONFIG
            .replace("{master}", &master)
            .replace("{agent}", agent);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?;
        file.write_all(hcl.as_bytes())?;
        Ok(())
    }

    /// Waits until the ACL system answers on the server in `server` (a
    /// leader, and the management token resolves), then makes every
    /// policy and token through its HTTP API.
    pub async fn bootstrap(&self, server: &Netns, deadline: Duration) -> Result<()> {
        eventually("Consul's ACL system is up", deadline, || async {
            let resp = consul(server, &self.management)
                .get("/v1/acl/token/self")
                .await?;
            if resp.status != 200 {
                bail!("/v1/acl/token/self: {} {}", resp.status, resp.text());
            }
            Ok(())
        })
        .await?;
        let mut client = consul(server, &self.management);
        for (holder, issued) in &self.tokens {
            let name = format!("mesh-{}", holder.replace('/', "-"));
            let policy = json!({
                "Name": name,
                "Description": format!("Meshwork: {holder}"),
                "Rules": issued.rules,
            });
            let made = put_json(&mut client, "/v1/acl/policy", &policy)
                .await
                .with_context(|| format!("policy of {holder}"))?;
            let id = made["ID"]
                .as_str()
                .ok_or_else(|| anyhow!("policy of {holder}: no ID in {made}"))?;
            let token = json!({
                "Description": format!("Meshwork: {holder}"),
                "SecretID": issued.secret,
                "Policies": [{"ID": id}],
            });
            put_json(&mut client, "/v1/acl/token", &token)
                .await
                .with_context(|| format!("token of {holder}"))?;
        }
        Ok(())
    }

    /// Waits until `node`'s agent resolves its bridge's token (the agent
    /// runs in the new ACL mode and reaches the servers).
    pub async fn wait_agent(&self, node: &str, ns: &Netns, deadline: Duration) -> Result<()> {
        let token = self
            .token(&format!("{node}/bridge"))
            .ok_or_else(|| anyhow!("no bridge token planned for {node}"))?;
        eventually(
            &format!("{node}'s agent resolves ACL tokens"),
            deadline,
            || async {
                let resp = consul(ns, token).get("/v1/acl/token/self").await?;
                if resp.status != 200 {
                    bail!("/v1/acl/token/self: {} {}", resp.status, resp.text());
                }
                Ok(())
            },
        )
        .await
    }
}

// === impl Secret ===

impl Secret {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acl")
            .field("holders", &self.tokens.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `rules` for node `node`.
fn node_rules(rules: &str, node: &str) -> String {
    rules.replace("{node}", node)
}

fn issue(rules: &str) -> Result<Issued> {
    Ok(Issued {
        secret: uuid()?,
        rules: rules.to_owned(),
    })
}

/// A random UUID (the kernel's), the form Consul wants for a SecretID.
fn uuid() -> Result<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("read /proc/sys/kernel/random/uuid")?;
    Ok(raw.trim().to_owned())
}

/// A client of the Consul agent in `ns` sending `token`.
pub fn consul(ns: &Netns, token: &str) -> HttpClient {
    HttpClient::new(ns, SocketAddr::from((Ipv4Addr::LOCALHOST, CONSUL_HTTP)))
        .with_timeout(Duration::from_secs(5))
        .with_consul_token(Some(token))
}

/// PUT `body` to `path`; the JSON answer of a 200.
async fn put_json(client: &mut HttpClient, path: &str, body: &Value) -> Result<Value> {
    let resp = client.put(path, body.to_string()).await?;
    if resp.status != 200 {
        bail!("PUT {path}: {} {}", resp.status, resp.text());
    }
    resp.json()
}
