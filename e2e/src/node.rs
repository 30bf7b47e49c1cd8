//! One node of a mesh: its namespace and address, its Consul client agent,
//! mesh-bridge, mesh-proxy and test services (`meshctl demo serve`), with the
//! ways a test talks to them.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    acl::Secret,
    bins::Binaries,
    http::{HttpClient, RawResponse, Response, raw_exchange},
    mesh::{CONSUL_HTTP, IDENTITY_TOKEN, INBOUND_PORT, MeshOptions, TRUST_DOMAIN},
    netns::Netns,
    process::Process,
    wait::eventually,
};

/// The proxy's outbound port (services call 127.0.0.1:8888).
pub const PROXY_PORT: u16 = 8888;
/// The proxy's admin port.
pub const PROXY_ADMIN_PORT: u16 = 8889;
/// The bridge's gRPC port.
pub const BRIDGE_GRPC_PORT: u16 = 8890;
/// The bridge's admin port.
pub const BRIDGE_ADMIN_PORT: u16 = 8891;
/// The proxy's access log in its data dir (in a mesh with mtls).
const ACCESS_LOG: &str = "access.log";
/// First port handed to test services on a node.
const FIRST_SERVICE_PORT: u16 = 9100;

/// A node of the mesh.
#[derive(Debug)]
pub struct Node {
    /// `n1`, `n2`, ...
    pub name: String,
    /// Its namespace (and address).
    pub ns: Netns,
    /// The Consul client agent.
    pub agent: Process,
    /// mesh-bridge (not started in a Consul-only mesh).
    pub bridge: Process,
    /// mesh-proxy (not started in a Consul-only mesh).
    pub proxy: Process,
    /// Test services started on this node, by instance id.
    pub instances: BTreeMap<String, Instance>,
    /// The token the harness's calls to the node's agent carry (the
    /// management token of a mesh with ACLs).
    pub(crate) consul_token: Option<Secret>,
    dir: PathBuf,
    meshctl: PathBuf,
    next_port: u16,
}

/// A test service instance (`meshctl demo serve`).
#[derive(Debug)]
pub struct Instance {
    /// Service name.
    pub service: String,
    /// Instance id (the `x-instance` of its answers).
    pub id: String,
    /// Where it listens (node address, own port).
    pub addr: SocketAddr,
    /// Its process.
    pub process: Process,
}

impl Node {
    pub(crate) fn new(
        name: String,
        ns: Netns,
        root: &Path,
        agent: Process,
        bins: &Binaries,
        opts: &MeshOptions,
    ) -> Result<Self> {
        let dir = root.join(&name);
        let bridge_data = dir.join("bridge");
        let proxy_data = dir.join("proxy");
        std::fs::create_dir_all(&bridge_data)?;
        std::fs::create_dir_all(&proxy_data)?;
        let mut bridge_args = vec![
            "--node".to_owned(),
            name.clone(),
            "--consul-addr".into(),
            format!("http://127.0.0.1:{CONSUL_HTTP}"),
            "--grpc-listen".into(),
            if opts.reachable_bridges {
                format!("0.0.0.0:{BRIDGE_GRPC_PORT}")
            } else {
                format!("127.0.0.1:{BRIDGE_GRPC_PORT}")
            },
            "--admin-listen".into(),
            format!("127.0.0.1:{BRIDGE_ADMIN_PORT}"),
            "--data-dir".into(),
            bridge_data.display().to_string(),
        ];
        let tls_dir = dir.join("tls");
        if opts.mtls.is_some() {
            bridge_args.extend([
                "--tls-dir".into(),
                tls_dir.display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
            ]);
        }
        bridge_args.extend(opts.bridge_args.iter().cloned());
        let mut proxy_args = vec![
            "--node".to_owned(),
            name.clone(),
            "--listen".into(),
            format!("127.0.0.1:{PROXY_PORT}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{PROXY_ADMIN_PORT}"),
            "--bridge-addr".into(),
            format!("http://127.0.0.1:{BRIDGE_GRPC_PORT}"),
            "--data-dir".into(),
            proxy_data.display().to_string(),
        ];
        if opts.mtls.is_some() {
            // The trust domain is left for the proxy to read from ca.crt.
            proxy_args.extend([
                "--mode".into(),
                "mtls".into(),
                "--tls-dir".into(),
                tls_dir.display().to_string(),
                "--inbound-listen".into(),
                format!("0.0.0.0:{INBOUND_PORT}"),
                "--access-log".into(),
                proxy_data.join(ACCESS_LOG).display().to_string(),
            ]);
        }
        proxy_args.extend(opts.proxy_args.iter().cloned());
        let mut bridge = Process::new(
            format!("{name}/bridge"),
            &ns,
            &bins.bridge,
            bridge_args,
            root.join(format!("{name}-bridge.log")),
        );
        if opts.mtls.is_some() {
            // In the environment, not the arguments: `ps` shows no token.
            bridge.set_env("MESH_IDENTITY_TOKEN", IDENTITY_TOKEN);
        }
        Ok(Self {
            bridge,
            proxy: Process::new(
                format!("{name}/proxy"),
                &ns,
                &bins.proxy,
                proxy_args,
                root.join(format!("{name}-proxy.log")),
            ),
            name,
            ns,
            agent,
            instances: BTreeMap::new(),
            consul_token: None,
            dir,
            meshctl: bins.meshctl.clone(),
            next_port: FIRST_SERVICE_PORT,
        })
    }

    /// The node's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ns.addr()
    }

    /// The proxy's data dir.
    pub fn proxy_data_dir(&self) -> PathBuf {
        self.dir.join("proxy")
    }

    /// The folder the bridge keeps the node's certificates in, and the
    /// proxy reads them from (in a mesh with mtls).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The proxy's access log so far, one JSON object per line (in a mesh
    /// with mtls; empty before the first line).
    pub fn access_log(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.proxy_data_dir().join(ACCESS_LOG);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("access log line {l:?}")))
            .collect()
    }

    /// The identities the proxy presents now (`/routes`' `tls` section):
    /// SPIFFE ID and certificate serial, the node's first.
    pub async fn tls_identities(&self) -> Result<Vec<(String, String)>> {
        let routes = self.routes().await?;
        let identities = routes["tls"]["identities"].as_array().ok_or_else(|| {
            anyhow!(
                "{} /routes has no tls identities: {}",
                self.name,
                routes["tls"]
            )
        })?;
        identities
            .iter()
            .map(|i| match (i["id"].as_str(), i["serial"].as_str()) {
                (Some(id), Some(serial)) => Ok((id.to_owned(), serial.to_owned())),
                _ => bail!(
                    "{} /routes: a tls identity without id or serial: {i}",
                    self.name
                ),
            })
            .collect()
    }

    /// The node's SPIFFE ID in a mesh with mtls.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/node/{}", self.name)
    }

    /// Waits until the bridge has written the trust bundle and the node's
    /// key and certificate (fails at once if the bridge exited).
    pub async fn wait_tls_files(&mut self, deadline: Duration) -> Result<()> {
        let dir = self.tls_dir();
        let start = std::time::Instant::now();
        let files = ["ca.crt", "node.key", "node.crt"];
        loop {
            let missing: Vec<&str> = files
                .into_iter()
                .filter(|f| !dir.join(f).exists())
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if !self.bridge.is_running() {
                bail!(
                    "{} exited before writing its node's certificate; its log:\n{}",
                    self.bridge.name(),
                    self.bridge.log_tail(30)
                );
            }
            if start.elapsed() > deadline {
                bail!(
                    "{}'s bridge wrote no {missing:?} in {} within {deadline:?}; its log:\n{}",
                    self.name,
                    dir.display(),
                    self.bridge.log_tail(30)
                );
            }
            tokio::time::sleep(crate::wait::POLL).await;
        }
    }

    /// Waits until the proxy presents the node's identity (`/routes`).
    pub async fn wait_node_identity(&self, deadline: Duration) -> Result<()> {
        let want = self.spiffe_id();
        let what = format!("{}'s proxy presents {want}", self.name);
        eventually(&what, deadline, || async {
            let identities = self.tls_identities().await?;
            if !identities.iter().any(|(id, _)| *id == want) {
                bail!("identities {identities:?}");
            }
            Ok(())
        })
        .await
    }

    /// The proxy's dump file (`<data-dir>/routes.dump`).
    pub fn dump_path(&self) -> PathBuf {
        self.proxy_data_dir().join("routes.dump")
    }

    /// A keep-alive client for the proxy's outbound port (127.0.0.1:8888 in the node).
    pub fn proxy_client(&self) -> HttpClient {
        self.local_client(PROXY_PORT)
    }

    /// A client for `127.0.0.1:port` inside the node.
    pub fn local_client(&self, port: u16) -> HttpClient {
        HttpClient::new(&self.ns, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// GET `path` through the proxy.
    pub async fn get(&self, path: &str) -> Result<Response> {
        self.proxy_client().get(path).await
    }

    /// PUT `body` to `path` on the proxy (its Consul agent API).
    pub async fn put(&self, path: &str, body: impl Into<bytes::Bytes>) -> Result<Response> {
        self.proxy_client().put(path, body).await
    }

    /// Writes raw bytes to the proxy's outbound port and reads the response head.
    pub async fn raw(&self, request: &[u8]) -> Result<RawResponse> {
        raw_exchange(
            &self.ns,
            SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)),
            request,
            Duration::from_secs(10),
        )
        .await
    }

    /// GET `path` on the proxy's admin port.
    pub async fn proxy_admin(&self, path: &str) -> Result<Response> {
        self.local_client(PROXY_ADMIN_PORT).get(path).await
    }

    /// GET `path` on the bridge's admin port.
    pub async fn bridge_admin(&self, path: &str) -> Result<Response> {
        self.local_client(BRIDGE_ADMIN_PORT).get(path).await
    }

    /// The proxy's `/routes`, as JSON.
    pub async fn routes(&self) -> Result<serde_json::Value> {
        let resp = self.proxy_admin("/routes").await?;
        if !resp.status.is_success() {
            bail!("{} /routes: {} {}", self.name, resp.status, resp.text());
        }
        resp.json()
    }

    /// Waits until this node's proxy has `peer`'s inbound listener (at
    /// `peer`'s address and [`INBOUND_PORT`]) as its peer for `peer`'s
    /// node.
    pub async fn wait_peer(&self, peer: &Node, deadline: Duration) -> Result<()> {
        let want = peer.ip().to_string();
        let what = format!("{}'s proxy has {}'s as a peer", self.name, peer.name);
        eventually(&what, deadline, || async {
            let routes = self.routes().await?;
            let p = &routes["peers"][peer.name.as_str()];
            if p["address"] != want.as_str() || p["port"] != INBOUND_PORT {
                bail!("peers: {}", routes["peers"]);
            }
            Ok(())
        })
        .await
    }

    /// GET `path` on the node's Consul agent (with the harness's token).
    pub async fn consul_get(&self, path: &str) -> Result<Response> {
        self.local_client(CONSUL_HTTP)
            .with_consul_token(self.consul_token.as_ref().map(Secret::expose))
            .get(path)
            .await
    }

    /// Waits until the node's agent knows the cluster's leader.
    pub async fn wait_agent(&mut self, deadline: Duration) -> Result<()> {
        let ns = self.ns.clone();
        let what = format!("{}'s Consul agent knows a leader", self.name);
        eventually(&what, deadline, || {
            let ns = ns.clone();
            async move {
                match crate::mesh::consul_leader(&ns).await? {
                    Some(_) => Ok(()),
                    None => bail!("no leader yet"),
                }
            }
        })
        .await
    }

    /// Waits until the bridge answers `/live` (fails at once if it exited).
    pub async fn wait_bridge_live(&mut self, deadline: Duration) -> Result<()> {
        wait_live(&mut self.bridge, BRIDGE_ADMIN_PORT, deadline).await
    }

    /// Waits until the proxy answers `/live` (fails at once if it exited).
    pub async fn wait_proxy_live(&mut self, deadline: Duration) -> Result<()> {
        wait_live(&mut self.proxy, PROXY_ADMIN_PORT, deadline).await
    }

    /// Starts an instance of `service` (`meshctl demo serve`) on this node
    /// with its own port; it registers itself through this node's proxy.
    /// Waits until it answers and its registration is in the node's agent.
    pub async fn serve(&mut self, service: &str, id: &str) -> Result<SocketAddr> {
        let addr = self.spawn_instance(service, id)?;
        self.wait_instance_up(id, Duration::from_secs(15)).await?;
        self.wait_registered(id, Duration::from_secs(15)).await?;
        Ok(addr)
    }

    /// Starts an instance without waiting for anything.
    pub fn spawn_instance(&mut self, service: &str, id: &str) -> Result<SocketAddr> {
        let meshctl = self.meshctl.clone();
        self.spawn_program(service, id, &meshctl, &["demo", "serve"])
    }

    /// Starts an instance of the gRPC echo service (`grpc-echo`, tag
    /// `grpc`) on this node; it registers itself through this node's
    /// proxy. Waits until its registration is in the node's agent.
    pub async fn serve_grpc_echo(&mut self, service: &str, id: &str) -> Result<SocketAddr> {
        let program = crate::bins::workspace_bin("grpc-echo")?;
        let addr = self.spawn_program(service, id, &program, &[])?;
        self.wait_registered(id, Duration::from_secs(15)).await?;
        Ok(addr)
    }

    /// Starts `program <leading> --name service --listen <addr> --id id`
    /// on this node's address with its own port.
    fn spawn_program(
        &mut self,
        service: &str,
        id: &str,
        program: &Path,
        leading: &[&str],
    ) -> Result<SocketAddr> {
        if self.instances.contains_key(id) {
            bail!("{}: instance {id} exists", self.name);
        }
        let addr = SocketAddr::from((self.ip(), self.next_port));
        self.next_port += 1;
        let mut args: Vec<String> = leading.iter().map(|a| (*a).to_owned()).collect();
        args.extend([
            "--name".into(),
            service.into(),
            "--listen".into(),
            addr.to_string(),
            "--id".into(),
            id.into(),
        ]);
        let mut process = Process::new(
            format!("{}/{id}", self.name),
            &self.ns,
            program,
            args,
            self.dir
                .parent()
                .unwrap_or(&self.dir)
                .join(format!("{}-{id}.log", self.name)),
        );
        process.start()?;
        self.instances.insert(
            id.to_owned(),
            Instance {
                service: service.to_owned(),
                id: id.to_owned(),
                addr,
                process,
            },
        );
        Ok(addr)
    }

    /// The instance `id` of this node.
    pub fn instance(&mut self, id: &str) -> Result<&mut Instance> {
        let name = self.name.clone();
        self.instances
            .get_mut(id)
            .ok_or_else(|| anyhow!("{name} has no instance {id}"))
    }

    /// Waits until instance `id` answers GET / directly (not through the proxy).
    pub async fn wait_instance_up(&mut self, id: &str, deadline: Duration) -> Result<()> {
        let ns = self.ns.clone();
        let inst = self.instance(id)?;
        let addr = inst.addr;
        let what = format!("instance {id} answers at {addr}");
        let result = eventually(&what, deadline, || {
            let ns = ns.clone();
            async move {
                let resp = HttpClient::new(&ns, addr)
                    .with_timeout(Duration::from_secs(2))
                    .get("/")
                    .await?;
                if resp.status != 200 {
                    bail!("{} {}", resp.status, resp.text());
                }
                Ok(())
            }
        })
        .await;
        if result.is_err() && !inst.process.is_running() {
            bail!(
                "instance {id} exited; its log:\n{}",
                inst.process.log_tail(30)
            );
        }
        result
    }

    /// Waits until the node's Consul agent has instance `id` registered.
    pub async fn wait_registered(&mut self, id: &str, deadline: Duration) -> Result<()> {
        let client_ns = self.ns.clone();
        let token = self.consul_token.clone();
        let what = format!("{}'s agent has service {id}", self.name);
        eventually(&what, deadline, || {
            let ns = client_ns.clone();
            let token = token.clone();
            async move {
                let resp =
                    HttpClient::new(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, CONSUL_HTTP)))
                        .with_consul_token(token.as_ref().map(Secret::expose))
                        .get(&format!("/v1/agent/service/{id}"))
                        .await?;
                if resp.status != 200 {
                    bail!("{} {}", resp.status, resp.text());
                }
                Ok(())
            }
        })
        .await
    }

    /// Makes instance `id`'s health check fail (`false`) or pass (`true`)
    /// (`PUT /_demo/health`, sent to the instance directly).
    pub async fn set_instance_health(&mut self, id: &str, healthy: bool) -> Result<()> {
        let ns = self.ns.clone();
        let addr = self.instance(id)?.addr;
        let resp = HttpClient::new(&ns, addr)
            .put("/_demo/health", if healthy { "ok" } else { "fail" })
            .await?;
        if !resp.status.is_success() {
            bail!("PUT /_demo/health on {id}: {} {}", resp.status, resp.text());
        }
        Ok(())
    }

    /// `PUT /v1/agent/service/register` with `body` on the proxy.
    pub async fn register(&self, body: &serde_json::Value) -> Result<Response> {
        self.put("/v1/agent/service/register", body.to_string())
            .await
    }

    /// `PUT /v1/agent/service/deregister/{id}` on the proxy.
    pub async fn deregister(&self, id: &str) -> Result<Response> {
        self.put(&format!("/v1/agent/service/deregister/{id}"), "")
            .await
    }

    /// Waits until `GET /<service>/` through this node's proxy is answered
    /// by exactly the instances `ids` (200s, by `x-instance`, over a few
    /// requests), or by some of them when the proxy's routing table
    /// (`/routes`) holds exactly `ids`: which instance answers is then the
    /// balancer's choice, and over sequential requests P2C over latency
    /// may send every one to the instance that answered fastest so far.
    pub async fn wait_answers(
        &self,
        service: &str,
        ids: &[&str],
        deadline: Duration,
    ) -> Result<()> {
        let mut want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        let what = format!("{} routes /{service}/ to {want:?}", self.name);
        let client = std::sync::Arc::new(tokio::sync::Mutex::new(self.proxy_client()));
        let path = format!("/{service}/");
        eventually(&what, deadline, || {
            let (client, path, want) = (client.clone(), path.clone(), want.clone());
            async move {
                let mut client = client.lock().await;
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..want.len() * 4 {
                    let resp = client.get(&path).await?;
                    if resp.status != 200 {
                        bail!("{} {}", resp.status, resp.text());
                    }
                    seen.insert(resp.header("x-instance").unwrap_or("<none>").to_owned());
                }
                let seen: Vec<String> = seen.into_iter().collect();
                if seen == want {
                    return Ok(());
                }
                if !seen.iter().all(|s| want.contains(s)) {
                    bail!("answered by {seen:?}");
                }
                let routes = self.routes().await?;
                let mut routed: Vec<&str> = routes["services"][service]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["id"].as_str())
                    .collect();
                routed.sort_unstable();
                if routed != want {
                    bail!("answered by {seen:?}; the routing table has {routed:?}");
                }
                Ok(())
            }
        })
        .await
    }

    /// Waits until `GET path` through this node's proxy answers one of `statuses`.
    pub async fn wait_status(
        &self,
        path: &str,
        statuses: &[u16],
        deadline: Duration,
    ) -> Result<Response> {
        let what = format!("{} answers one of {statuses:?} to GET {path}", self.name);
        let ns = self.ns.clone();
        eventually(&what, deadline, || {
            let ns = ns.clone();
            async move {
                let resp =
                    HttpClient::new(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)))
                        .get(path)
                        .await?;
                if !statuses.contains(&resp.status.as_u16()) {
                    bail!("{} {}", resp.status, resp.text());
                }
                Ok(resp)
            }
        })
        .await
    }

    /// Writes `contents` over the proxy's dump file.
    pub fn write_dump(&self, contents: &[u8]) -> Result<()> {
        let path = self.dump_path();
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))
    }

    /// Every process of this node (instances, proxy, bridge, agent).
    pub fn processes(&mut self) -> Vec<&mut Process> {
        let mut all: Vec<&mut Process> = self
            .instances
            .values_mut()
            .map(|i| &mut i.process)
            .collect();
        all.push(&mut self.proxy);
        all.push(&mut self.bridge);
        all.push(&mut self.agent);
        all
    }
}

/// Polls `/live` on `127.0.0.1:port` in the process's namespace; fails at
/// once, with the log's tail, if the process exits.
async fn wait_live(process: &mut Process, port: u16, deadline: Duration) -> Result<()> {
    let ns = process.netns().clone();
    let start = std::time::Instant::now();
    loop {
        if !process.is_running() {
            bail!(
                "{} exited before answering /live; its log:\n{}",
                process.name(),
                process.log_tail(30)
            );
        }
        let attempt = HttpClient::new(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .with_timeout(Duration::from_secs(1))
            .get("/live")
            .await;
        match attempt {
            Ok(resp) if resp.status.is_success() => return Ok(()),
            Ok(resp) if start.elapsed() > deadline => {
                bail!(
                    "{} /live: {} after {deadline:?}",
                    process.name(),
                    resp.status
                )
            }
            Err(e) if start.elapsed() > deadline => {
                return Err(e.context(format!("{} /live after {deadline:?}", process.name())));
            }
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}
