//! A whole mesh for one test: a 3-server Consul cluster and N nodes, each
//! host in its own namespace on a private network. Owns every process,
//! namespace and file it creates; dropping it (also while a test panics)
//! removes them all, and prints the tail of every log unless the test called
//! [`Mesh::finish`].

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    acl::{Acl, Secret},
    bins::{self, Binaries},
    http::{HttpClient, Response},
    netns::{Netns, Network},
    node::Node,
    process::Process,
    wait::eventually,
};

/// Consul agents' HTTP port (inside each namespace, on 127.0.0.1).
pub const CONSUL_HTTP: u16 = 8500;

/// The agent configuration every Consul process of a test gets: fast Raft
/// timing (elections in seconds), a failed join retried after 1 s (not the
/// default 30 s: agents start together and may try before the others listen),
/// no update checks, check output synced at once, no DNS listener.
const CONSUL_HCL: &str = r#"performance {
  raft_multiplier = 1
}
retry_interval = "1s"
disable_update_check = true
check_update_interval = "0s"
ports {
  dns = -1
}
"#;

/// How a mesh is built.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Number of nodes (each: a Consul client agent, mesh-bridge, mesh-proxy).
    pub nodes: usize,
    /// Start mesh-bridge and mesh-proxy on every node (false: Consul only).
    pub mesh: bool,
    /// Extra arguments for every mesh-proxy.
    pub proxy_args: Vec<String>,
    /// Extra arguments for every mesh-bridge.
    pub bridge_args: Vec<String>,
    /// mesh-bridge's gRPC listener on every address of its node
    /// (`0.0.0.0:8890`), as a mesh-monitor on another node reaches it;
    /// false: on loopback only.
    pub reachable_bridges: bool,
    /// Consul with ACLs on (default deny) and every component with a
    /// least-privilege token of its own ([`crate::acl`]); the harness's
    /// own calls use the management token.
    pub acl: bool,
    /// With `acl`: the services each node (by name, `n1`) may run, which
    /// its bridge's token may register.
    pub acl_services: BTreeMap<String, Vec<String>>,
    /// Mesh identities and mutual TLS between the proxies ([`Mtls`]);
    /// `None`: the proxies call other nodes' instances directly.
    pub mtls: Option<Mtls>,
}

/// A mesh whose proxies reach other nodes' instances through those nodes'
/// proxies over mutual TLS: a mesh-control replica (`c1`) on `n1` is the
/// CA (`identity_token` [`IDENTITY_TOKEN`], trust domain [`TRUST_DOMAIN`]),
/// listening for gRPC on every address of its node so the bridges find it
/// in Consul's catalog; every bridge keeps its node's certificates in
/// [`Node::tls_dir`]; every proxy runs `mode = mtls` with that folder, an
/// inbound listener on `0.0.0.0:`[`INBOUND_PORT`] and an access log
/// ([`Node::access_log`]). [`Mesh::start`] returns once every proxy
/// presents its node's certificate. (`proxy_args` must not set the inbound
/// listener, the mode or the access log then.)
#[derive(Clone, Debug, Default)]
pub struct Mtls {
    /// mesh-control's `cert_ttl` (1m at least); `None`: its default (24h).
    pub cert_ttl: Option<Duration>,
}

/// The bearer token the bridges present to mesh-control in a mesh with
/// [`Mtls`].
pub const IDENTITY_TOKEN: &str = "e2e-identity-token-0123456789";

/// The trust domain of a mesh with [`Mtls`] (not the default, so that a
/// component left on its default would show).
pub const TRUST_DOMAIN: &str = "e2e.meshwork.test";

/// The proxies' inbound listener's port in a mesh with [`Mtls`].
pub const INBOUND_PORT: u16 = 8443;

/// One Consul server.
#[derive(Debug)]
pub struct Server {
    /// `s1`, `s2`, `s3`.
    pub name: String,
    /// Its namespace (and address).
    pub ns: Netns,
    /// The `consul agent -server` process.
    pub agent: Process,
}

/// The mesh of one test.
#[derive(Debug)]
pub struct Mesh {
    /// The three Consul servers.
    pub servers: Vec<Server>,
    /// The nodes, `n1`, `n2`, ...
    pub nodes: Vec<Node>,
    /// The ACL tokens, when the mesh runs with ACLs.
    pub acl: Option<Acl>,
    dir: PathBuf,
    finished: bool,
    started: Instant,
    // Dropped last, after every process is gone (see `Drop`).
    network: Option<Network>,
}

// === impl MeshOptions ===

impl MeshOptions {
    /// `nodes` nodes with the full mesh on each.
    pub fn nodes(nodes: usize) -> Self {
        Self {
            nodes,
            mesh: true,
            proxy_args: Vec::new(),
            bridge_args: Vec::new(),
            reachable_bridges: false,
            acl: false,
            acl_services: BTreeMap::new(),
            mtls: None,
        }
    }

    /// The same options with mesh identities and mutual TLS between the
    /// proxies ([`Mtls`]), certificates valid for `cert_ttl` (`None`:
    /// mesh-control's default).
    pub fn with_mtls(self, cert_ttl: Option<Duration>) -> Self {
        Self {
            mtls: Some(Mtls { cert_ttl }),
            ..self
        }
    }

    /// The same options with ACLs on; `services` are the services each
    /// node (by name) may run.
    pub fn with_acl(self, services: &[(&str, &[&str])]) -> Self {
        let acl_services = services
            .iter()
            .map(|(node, names)| {
                let names = names.iter().map(|s| (*s).to_owned()).collect();
                ((*node).to_owned(), names)
            })
            .collect();
        Self {
            acl: true,
            acl_services,
            ..self
        }
    }

    /// `nodes` nodes with a Consul agent only.
    pub fn consul_only(nodes: usize) -> Self {
        Self {
            mesh: false,
            ..Self::nodes(nodes)
        }
    }
}

// === impl Server ===

impl Server {
    /// `ip:8300`, the form `/v1/status/leader` answers with.
    pub fn raft_addr(&self) -> String {
        format!("{}:8300", self.ns.addr())
    }
}

// === impl Mesh ===

impl Mesh {
    /// Builds the network, starts the Consul cluster (waits for a leader and
    /// every client agent to know it) and, with `opts.mesh`, a bridge and a
    /// proxy on every node (waits until both answer `/live`).
    pub async fn start(opts: MeshOptions) -> Result<Self> {
        let started = Instant::now();
        let bins = if opts.mesh {
            Binaries::locate()?
        } else {
            Binaries {
                consul: bins::consul()?,
                bridge: PathBuf::from("mesh-bridge"),
                proxy: PathBuf::from("mesh-proxy"),
                meshctl: PathBuf::from("meshctl"),
            }
        };
        let mut network = Network::create()?;
        let dir = crate::netns::scratch_dir().join(network.id());
        let mut mesh = Self {
            servers: Vec::new(),
            nodes: Vec::new(),
            acl: None,
            dir: dir.clone(),
            finished: false,
            started,
            network: None,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let config = dir.join("consul.hcl");
        std::fs::write(&config, CONSUL_HCL)?;
        // Hosts first: a failure while adding one still deletes the others.
        let hosts = add_hosts(&mut network, opts.nodes);
        mesh.network = Some(network);
        let (server_ns, node_ns) = hosts?;
        let joins: Vec<String> = server_ns
            .iter()
            .flat_map(|ns| ["-retry-join".to_owned(), ns.addr().to_string()])
            .collect();
        mesh.acl = plan_acl(&opts)?;
        let acl = mesh.acl.clone();
        let agent_configs = |name: &str, server: bool| -> Result<Vec<PathBuf>> {
            let mut configs = vec![config.clone()];
            if let Some(acl) = &acl {
                let path = dir.join(format!("{name}-acl.hcl"));
                acl.write_agent_config(&path, name, server)?;
                configs.push(path);
            }
            Ok(configs)
        };
        for (k, ns) in server_ns.into_iter().enumerate() {
            let name = format!("s{}", k + 1);
            let configs = agent_configs(&name, true)?;
            let agent = consul_agent(&bins.consul, &dir, &name, &ns, &configs, &joins, true)?;
            mesh.servers.push(Server { name, ns, agent });
        }
        for (k, ns) in node_ns.into_iter().enumerate() {
            let name = format!("n{}", k + 1);
            let configs = agent_configs(&name, false)?;
            let agent = consul_agent(&bins.consul, &dir, &name, &ns, &configs, &joins, false)?;
            let mut node = Node::new(name, ns, &dir, agent, &bins, &opts)?;
            if let Some(acl) = &acl {
                node.consul_token = Some(Secret::new(acl.management()));
                if let Some(token) = acl.token(&format!("{}/bridge", node.name)) {
                    // In the environment, not the arguments: `ps` shows no token.
                    node.bridge.set_env("MESH_CONSUL_TOKEN", token);
                }
            }
            mesh.nodes.push(node);
        }
        for server in &mut mesh.servers {
            server.agent.start()?;
        }
        if let Some(acl) = &acl {
            // The nodes' agents start once their tokens exist: an agent
            // whose token Consul does not know yet fails its first syncs.
            mesh.wait_leader(Duration::from_secs(60)).await?;
            acl.bootstrap(&mesh.servers[0].ns, Duration::from_secs(60))
                .await?;
        }
        for node in &mut mesh.nodes {
            node.agent.start()?;
        }
        let leader = mesh.wait_leader(Duration::from_secs(60)).await?;
        for node in &mut mesh.nodes {
            node.wait_agent(Duration::from_secs(30)).await?;
        }
        if let Some(acl) = &acl {
            for node in &mesh.nodes {
                acl.wait_agent(&node.name, &node.ns, Duration::from_secs(30))
                    .await?;
            }
        }
        mesh.settle_agents(Duration::from_secs(60)).await?;
        eprintln!(
            "e2e: {} Consul cluster up in {:?} (leader s{})",
            mesh.id(),
            started.elapsed(),
            leader + 1
        );
        if opts.mesh {
            match &opts.mtls {
                None => {
                    for node in &mut mesh.nodes {
                        node.bridge.start()?;
                        node.proxy.start()?;
                    }
                }
                Some(mtls) => mesh.start_identities(mtls).await?,
            }
            for node in &mut mesh.nodes {
                node.wait_bridge_live(Duration::from_secs(20)).await?;
                node.wait_proxy_live(Duration::from_secs(20)).await?;
            }
            if opts.mtls.is_some() {
                for node in &mesh.nodes {
                    node.wait_node_identity(Duration::from_secs(20)).await?;
                }
            }
            eprintln!("e2e: {} mesh up in {:?}", mesh.id(), started.elapsed());
        }
        Ok(mesh)
    }

    /// With [`Mtls`]: the CA replica on n1 first (the bridges find it in
    /// the catalog, and retry with a growing backoff while they cannot),
    /// then the bridges, and each proxy once its bridge has written the
    /// node's certificate (a proxy in mtls mode does not start without).
    async fn start_identities(&mut self, mtls: &Mtls) -> Result<()> {
        let ttl = mtls.cert_ttl.map(|t| format!("{}s", t.as_secs()));
        // grpc_tls: the bridges on other nodes get their certificates over
        // TLS, checking mesh-control's identity.
        let mut env = vec![
            ("MESH_IDENTITY_TOKEN", IDENTITY_TOKEN),
            ("MESH_TRUST_DOMAIN", TRUST_DOMAIN),
            ("MESH_GRPC_TLS", "true"),
        ];
        if let Some(ttl) = &ttl {
            env.push(("MESH_CERT_TTL", ttl));
        }
        crate::control::start_replica_on(self, 0, Ipv4Addr::UNSPECIFIED, &env).await?;
        for node in &mut self.nodes {
            node.bridge.start()?;
        }
        for node in &mut self.nodes {
            node.wait_tls_files(Duration::from_secs(30)).await?;
            node.proxy.start()?;
        }
        Ok(())
    }

    /// This mesh's id (`mwe-<pid>-<n>`): prefix of its namespaces and temp dir.
    pub fn id(&self) -> &str {
        self.network.as_ref().map_or("mwe-?", Network::id)
    }

    /// The management token of a mesh with ACLs (the harness's own calls).
    pub fn operator_token(&self) -> Option<&str> {
        self.acl.as_ref().map(Acl::management)
    }

    /// The secret of `holder`'s ACL token (`n1/bridge`, `n1/mesh-control`,
    /// `mesh-monitor`, `n1/consul`), in a mesh with ACLs.
    pub fn acl_token(&self, holder: &str) -> Option<&str> {
        self.acl.as_ref().and_then(|a| a.token(holder))
    }

    /// The test's temp dir (logs, data dirs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i` (0-based: `node(0)` is `n1`).
    pub fn node(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// The index of the server that is leader, as the running servers report
    /// it (the first that knows one).
    pub async fn leader(&mut self) -> Result<usize> {
        let mut last = anyhow!("no server runs");
        for server in &mut self.servers {
            if !server.agent.is_running() {
                continue;
            }
            match consul_leader(&server.ns).await {
                Ok(Some(addr)) => {
                    return self
                        .servers
                        .iter()
                        .position(|s| s.raft_addr() == addr)
                        .ok_or_else(|| anyhow!("leader {addr} is none of the servers"));
                }
                Ok(None) => last = anyhow!("{} knows no leader", server.name),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Waits until every running server reports the same running leader.
    pub async fn wait_leader(&mut self, deadline: Duration) -> Result<usize> {
        let servers: Vec<(String, Netns, bool)> = self
            .servers
            .iter_mut()
            .map(|s| (s.raft_addr(), s.ns.clone(), s.agent.is_running()))
            .collect();
        eventually("the Consul servers agree on a leader", deadline, || {
            let servers = servers.clone();
            async move {
                let mut seen = None;
                for (_, ns, _) in servers.iter().filter(|s| s.2) {
                    let leader = consul_leader(ns)
                        .await?
                        .ok_or_else(|| anyhow!("{} knows no leader", ns.name()))?;
                    match &seen {
                        None => seen = Some(leader),
                        Some(l) if *l == leader => {}
                        Some(l) => bail!("servers disagree: {l} vs {leader}"),
                    }
                }
                let leader = seen.ok_or_else(|| anyhow!("no server runs"))?;
                servers
                    .iter()
                    .position(|(addr, _, running)| *addr == leader && *running)
                    .ok_or_else(|| anyhow!("leader {leader} is not a running server"))
            }
        })
        .await
    }

    /// Waits until every node's Consul agent pushes changes to the servers at
    /// once: it knows three live servers, and flips of a TTL probe check have
    /// reached the catalog within 200 ms each, without a slow one, for 1 s.
    ///
    /// Why: a client agent may hold back its partial syncs for a random
    /// 0–3 s after each server it learns of and after a `consul:new-leader`
    /// event (anti-entropy's "server up" full sync, agent/ae/ae.go
    /// `waitFullSyncDelay`). In a young cluster that delays registrations and
    /// check changes by seconds: Consul's doing, which would blur the
    /// figures the tests measure. (Consul can still hold back the first
    /// check change of a fresh registration; tests that time check changes
    /// take the catalog's change as their start.)
    pub async fn settle_agents(&self, deadline: Duration) -> Result<()> {
        let servers: Vec<Netns> = self.servers.iter().map(|s| s.ns.clone()).collect();
        let token = self.operator_token().map(str::to_owned);
        let mut tasks = tokio::task::JoinSet::new();
        for node in &self.nodes {
            let (name, ns, servers) = (node.name.clone(), node.ns.clone(), servers.clone());
            let token = token.clone();
            tasks.spawn(async move {
                settle_agent(&name, &ns, &servers, token.as_deref(), deadline)
                    .await
                    .with_context(|| format!("{name}'s Consul agent does not settle"))
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.context("settle task panicked")??;
        }
        Ok(())
    }

    /// SIGKILLs the current leader; returns its index.
    pub async fn kill_leader(&mut self) -> Result<usize> {
        let leader = self.leader().await?;
        self.servers[leader].agent.kill().await?;
        Ok(leader)
    }

    /// GET `path` on the Consul HTTP API of the first server that answers.
    pub async fn consul_get(&self, path: &str) -> Result<Response> {
        let mut last = anyhow!("no Consul server");
        for server in &self.servers {
            let attempt = HttpClient::new(
                &server.ns,
                SocketAddr::from((Ipv4Addr::LOCALHOST, CONSUL_HTTP)),
            )
            .with_timeout(Duration::from_secs(2))
            .with_consul_token(self.operator_token())
            .get(path)
            .await;
            match attempt {
                Ok(resp) => return Ok(resp),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The names in Consul's catalog (`/v1/catalog/services`), `consul` included.
    pub async fn catalog_services(&self) -> Result<Vec<String>> {
        let resp = self.consul_get("/v1/catalog/services").await?;
        if !resp.status.is_success() {
            bail!("catalog: {} {}", resp.status, resp.text());
        }
        let json = resp.json()?;
        let map = json
            .as_object()
            .ok_or_else(|| anyhow!("catalog is not an object: {json}"))?;
        Ok(map.keys().cloned().collect())
    }

    /// The IDs of `service`'s passing instances, as the servers see them
    /// (`/v1/health/service/{service}?passing`).
    pub async fn passing_instances(&self, service: &str) -> Result<Vec<String>> {
        let resp = self
            .consul_get(&format!("/v1/health/service/{service}?passing"))
            .await?;
        if !resp.status.is_success() {
            bail!("health of {service}: {} {}", resp.status, resp.text());
        }
        Ok(resp
            .json()?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["Service"]["ID"].as_str().map(str::to_owned))
            .collect())
    }

    /// The IDs of `service`'s instances in Consul's catalog (any health).
    pub async fn catalog_instances(&self, service: &str) -> Result<Vec<String>> {
        let resp = self
            .consul_get(&format!("/v1/catalog/service/{service}"))
            .await?;
        if !resp.status.is_success() {
            bail!("catalog of {service}: {} {}", resp.status, resp.text());
        }
        Ok(resp
            .json()?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["ServiceID"].as_str().map(str::to_owned))
            .collect())
    }

    /// Every process of the mesh.
    pub fn processes(&mut self) -> Vec<&mut Process> {
        let mut all: Vec<&mut Process> = Vec::new();
        for node in &mut self.nodes {
            all.extend(node.processes());
        }
        all.extend(self.servers.iter_mut().map(|s| &mut s.agent));
        all
    }

    /// Prints the last `lines` lines of every process's log to stderr.
    pub fn print_logs(&mut self, lines: usize) {
        let id = self.id().to_owned();
        for p in self.processes() {
            eprintln!(
                "----- {id} {} ({}) last {lines} lines -----\n{}",
                p.name(),
                p.log_path().display(),
                p.log_tail(lines)
            );
        }
    }

    /// Ends a passing test: stops everything and removes it, without
    /// printing logs.
    pub fn finish(mut self) {
        self.finished = true;
        eprintln!("e2e: {} done after {:?}", self.id(), self.started.elapsed());
    }

    /// SIGTERM to every process, a short grace, SIGKILL to the rest.
    fn teardown_processes(&mut self) {
        let mut all = self.processes();
        for p in &mut all {
            p.terminate_nowait();
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && all.iter_mut().any(|p| p.is_running()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &mut all {
            p.kill_blocking();
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if !self.finished {
            eprintln!(
                "e2e: {} failed after {:?}; logs in {}",
                self.id(),
                self.started.elapsed(),
                self.dir.display()
            );
            self.print_logs(40);
        }
        self.teardown_processes();
        drop(self.network.take());
        if std::env::var_os("MESH_E2E_KEEP").is_some() {
            eprintln!("e2e: MESH_E2E_KEEP set, keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Adds `s1..s3` (addresses .1–.3) and `n1..` (addresses .11–) to `network`.
fn add_hosts(network: &mut Network, nodes: usize) -> Result<(Vec<Netns>, Vec<Netns>)> {
    if nodes > 200 {
        bail!("at most 200 nodes");
    }
    let servers = (1..=3u8)
        .map(|k| network.add_host(&format!("s{k}"), k))
        .collect::<Result<Vec<_>>>()?;
    let nodes = (1..=nodes as u8)
        .map(|k| network.add_host(&format!("n{k}"), 10 + k))
        .collect::<Result<Vec<_>>>()?;
    Ok((servers, nodes))
}

/// The ACL tokens of a mesh built as `opts` say (none without `opts.acl`).
fn plan_acl(opts: &MeshOptions) -> Result<Option<Acl>> {
    if !opts.acl {
        return Ok(None);
    }
    let servers: Vec<String> = (1..=3).map(|k| format!("s{k}")).collect();
    let nodes: Vec<String> = (1..=opts.nodes).map(|k| format!("n{k}")).collect();
    let mut services = opts.acl_services.clone();
    if opts.mtls.is_some() {
        // A proxy with an inbound listener registers itself, through its
        // bridge, as the node's `mesh-proxy` instance (its peers find it so).
        for node in &nodes {
            services
                .entry(node.clone())
                .or_default()
                .push("mesh-proxy".into());
        }
    }
    Acl::plan(&servers, &nodes, &services).map(Some)
}

/// A Consul agent (server or client) in `ns`, with its data dir and log in
/// `dir`, reading the config files `configs`.
fn consul_agent(
    consul: &Path,
    dir: &Path,
    name: &str,
    ns: &Netns,
    configs: &[PathBuf],
    joins: &[String],
    server: bool,
) -> Result<Process> {
    let data = dir.join(name).join("consul");
    std::fs::create_dir_all(&data)?;
    let mut args: Vec<String> = vec!["agent".into()];
    if server {
        args.extend(["-server".into(), "-bootstrap-expect".into(), "3".into()]);
    }
    args.extend([
        "-node".into(),
        name.into(),
        "-bind".into(),
        ns.addr().to_string(),
        "-client".into(),
        "127.0.0.1".into(),
        "-data-dir".into(),
        data.display().to_string(),
    ]);
    for config in configs {
        args.extend(["-config-file".into(), config.display().to_string()]);
    }
    args.extend(joins.iter().cloned());
    Ok(Process::new(
        format!("{name}/consul"),
        ns,
        consul,
        args,
        dir.join(format!("{name}-consul.log")),
    ))
}

/// The leader as one agent sees it (`None`: it knows none).
pub async fn consul_leader(ns: &Netns) -> Result<Option<String>> {
    let resp = HttpClient::new(ns, SocketAddr::from((Ipv4Addr::LOCALHOST, CONSUL_HTTP)))
        .with_timeout(Duration::from_secs(2))
        .get("/v1/status/leader")
        .await?;
    if !resp.status.is_success() {
        bail!("/v1/status/leader in {}: {}", ns.name(), resp.status);
    }
    let leader: String = serde_json::from_slice(&resp.body)
        .with_context(|| format!("/v1/status/leader answered {}", resp.text()))?;
    Ok(Some(leader).filter(|l| !l.is_empty()))
}

/// See [`Mesh::settle_agents`].
async fn settle_agent(
    node: &str,
    ns: &Netns,
    servers: &[Netns],
    token: Option<&str>,
    deadline: Duration,
) -> Result<()> {
    const QUIET: Duration = Duration::from_secs(1);
    let start = Instant::now();
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, CONSUL_HTTP));
    eventually("the agent sees 3 live servers", deadline, || {
        let ns = ns.clone();
        async move {
            let members = HttpClient::new(&ns, local)
                .with_consul_token(token)
                .get("/v1/agent/members")
                .await?
                .json()?;
            let servers = members
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["Tags"]["role"] == "consul" && m["Status"] == 1)
                .count();
            if servers != 3 {
                bail!("{servers} live servers");
            }
            Ok(())
        }
    })
    .await?;
    let mut agent = HttpClient::new(ns, local).with_consul_token(token);
    let probe = r#"{"Name":"e2e-settle","ID":"e2e-settle","TTL":"10m"}"#;
    let resp = agent.put("/v1/agent/check/register", probe).await?;
    if !resp.status.is_success() {
        bail!("register the probe check: {} {}", resp.status, resp.text());
    }
    let mut quiet_since = Instant::now();
    let mut pass = true;
    while quiet_since.elapsed() < QUIET {
        if start.elapsed() > deadline {
            bail!("probe check changes keep taking over 200 ms to reach the catalog");
        }
        let (verb, want) = if pass {
            ("pass", "passing")
        } else {
            ("fail", "critical")
        };
        pass = !pass;
        agent
            .put(&format!("/v1/agent/check/{verb}/e2e-settle"), "")
            .await?;
        let flipped = Instant::now();
        let mut synced = false;
        while flipped.elapsed() < Duration::from_millis(200) {
            if probe_status(servers, node, token).await?.as_deref() == Some(want) {
                synced = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !synced {
            quiet_since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
        .put("/v1/agent/check/deregister/e2e-settle", "")
        .await?;
    Ok(())
}

/// The probe check's status in the catalog, read from the first server that answers.
async fn probe_status(
    servers: &[Netns],
    node: &str,
    token: Option<&str>,
) -> Result<Option<String>> {
    let mut last = anyhow!("no server");
    for ns in servers {
        let attempt = HttpClient::new(ns, SocketAddr::from((Ipv4Addr::LOCALHOST, CONSUL_HTTP)))
            .with_timeout(Duration::from_secs(2))
            .with_consul_token(token)
            .get(&format!("/v1/health/node/{node}"))
            .await;
        match attempt {
            Ok(resp) => {
                return Ok(resp
                    .json()?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["CheckID"] == "e2e-settle")
                    .and_then(|c| c["Status"].as_str().map(str::to_owned)));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
