//! mesh-control in a test mesh: replicas on nodes whose bridges other
//! nodes can reach, and the calls tests make to them (REST, meshctl).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    HttpClient, Mesh, MeshOptions, Node, bins, eventually,
    node::{BRIDGE_ADMIN_PORT, Instance, PROXY_ADMIN_PORT, PROXY_PORT},
    process::Process,
};

/// mesh-control's gRPC port (inside each node's namespace).
pub const CONTROL_GRPC: u16 = 8892;
/// mesh-control's HTTP port (REST, dashboard, admin).
pub const CONTROL_HTTP: u16 = 8893;

/// How long a change in Consul may take to show where nothing is measured.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// A Consul cluster of `nodes` nodes, each with a bridge other nodes can
/// reach (`0.0.0.0:8890`), and a mesh-control replica on each of the first
/// `replicas` (`c1` on n1, `c2` on n2, …), all ready.
pub async fn control_mesh_of(nodes: usize, replicas: usize) -> Result<Mesh> {
    let mut mesh = Mesh::start(MeshOptions::consul_only(nodes)).await?;
    let bridge = bins::workspace_bin("mesh-bridge")?;
    let dir = mesh.dir().to_path_buf();
    for node in &mut mesh.nodes {
        let data = node.proxy_data_dir().with_file_name("bridge");
        node.bridge = Process::new(
            format!("{}/bridge", node.name),
            &node.ns,
            &bridge,
            [
                "--node",
                &node.name,
                "--consul-addr",
                "http://127.0.0.1:8500",
                "--grpc-listen",
                "0.0.0.0:8890",
                "--admin-listen",
                &format!("127.0.0.1:{BRIDGE_ADMIN_PORT}"),
                "--data-dir",
                &data.display().to_string(),
            ],
            dir.join(format!("{}-bridge.log", node.name)),
        );
        node.bridge.start()?;
        node.wait_bridge_live(CONVERGE).await?;
    }
    for k in 0..replicas.min(nodes) {
        start_replica(&mut mesh, k, &[]).await?;
    }
    Ok(mesh)
}

/// [`control_mesh_of`] two nodes, two replicas.
pub async fn control_mesh() -> Result<Mesh> {
    control_mesh_of(2, 2).await
}

/// Starts mesh-control replica `c<k+1>` on node `k` with `env` added to
/// its environment (replacing one that runs there, which must be stopped),
/// and waits until it is ready. In a mesh with ACLs it gets its node's
/// mesh-control token.
pub async fn start_replica(mesh: &mut Mesh, k: usize, env: &[(&str, &str)]) -> Result<()> {
    start_replica_on(mesh, k, Ipv4Addr::LOCALHOST, env).await
}

/// [`start_replica`] with its gRPC listener on `grpc_ip` (`0.0.0.0`:
/// every address of its node, as other nodes' bridges reach it for
/// certificates; its catalog entry then names the node's address).
pub async fn start_replica_on(
    mesh: &mut Mesh,
    k: usize,
    grpc_ip: Ipv4Addr,
    env: &[(&str, &str)],
) -> Result<()> {
    let control = bins::workspace_bin("mesh-control")?;
    let dir = mesh.dir().to_path_buf();
    let acl_token = mesh
        .acl_token(&format!("{}/mesh-control", mesh.nodes[k].name))
        .map(str::to_owned);
    let node = &mut mesh.nodes[k];
    let replica = format!("c{}", k + 1);
    let mut process = Process::new(
        format!("{}/mesh-control", node.name),
        &node.ns,
        &control,
        [
            "--replica",
            &replica,
            "--consul-addr",
            "http://127.0.0.1:8500",
            "--grpc-listen",
            &SocketAddr::from((grpc_ip, CONTROL_GRPC)).to_string(),
            "--http-listen",
            &format!("127.0.0.1:{CONTROL_HTTP}"),
        ],
        dir.join(format!("{}-mesh-control.log", node.name)),
    );
    if let Some(token) = acl_token {
        // In the environment, not the arguments: `ps` shows no token.
        process.set_env("MESH_CONSUL_TOKEN", token);
    }
    for (key, value) in env {
        process.set_env(key, value);
    }
    process.start()?;
    // Kept with the node's processes: its log is printed when a test
    // fails, and it is stopped with the mesh.
    node.instances.insert(
        "mesh-control".into(),
        Instance {
            service: "mesh-control".into(),
            id: replica,
            addr: SocketAddr::from((node.ip(), CONTROL_GRPC)),
            process,
        },
    );
    let node = &mesh.nodes[k];
    eventually(
        &format!("{}'s mesh-control is ready", node.name),
        CONVERGE,
        || async {
            let resp = rest(node).get("/ready").await?;
            if resp.status != 200 {
                bail!("{} {}", resp.status, resp.text());
            }
            Ok(())
        },
    )
    .await
}

/// A client of the mesh-control replica on `node`.
pub fn rest(node: &Node) -> HttpClient {
    node.local_client(CONTROL_HTTP)
}

/// `method path` with a JSON body on `node`'s replica: status and JSON answer.
pub async fn call(
    node: &Node,
    method: hyper::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = rest(node)
        .request(
            method,
            path,
            &[("content-type", "application/json")],
            body.into(),
        )
        .await?;
    let json = resp
        .json()
        .with_context(|| format!("{path} answered {} {}", resp.status, resp.text()))?;
    Ok((resp.status.as_u16(), json))
}

/// Runs `meshctl args…` inside `node` (gRPC to its replica): exit code,
/// stdout, stderr.
pub async fn meshctl(node: &Node, args: &[&str]) -> Result<(i32, String, String)> {
    let meshctl = bins::workspace_bin("meshctl")?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", node.ns.name()])
        .arg(&meshctl)
        .args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESH_") {
            cmd.env_remove(key);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("meshctl took over 60 s")??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Waits until every replica names the same leader and exactly one says it
/// is that leader; returns the leader's name.
pub async fn one_leader(mesh: &Mesh) -> Result<String> {
    eventually("the replicas agree on one leader", CONVERGE, || async {
        let mut leaders = Vec::new();
        let mut leading = 0;
        for node in mesh
            .nodes
            .iter()
            .filter(|n| n.instances.contains_key("mesh-control"))
        {
            let (_, status) = call(node, hyper::Method::GET, "/v1/status", None).await?;
            leaders.push(status["leader"].as_str().unwrap_or_default().to_owned());
            leading += usize::from(status["is_leader"] == true);
        }
        if leaders[0].is_empty() || leaders.iter().any(|l| *l != leaders[0]) || leading != 1 {
            bail!("leaders {leaders:?}, {leading} say they lead");
        }
        Ok(leaders[0].clone())
    })
    .await
}

/// Starts `meshctl demo serve` for `service` on node `k`'s address at
/// `port`, without registering; waits until it answers.
pub async fn serve_demo(
    mesh: &mut Mesh,
    k: usize,
    service: &str,
    id: &str,
    port: u16,
) -> Result<()> {
    let meshctl = bins::workspace_bin("meshctl")?;
    let log = mesh.dir().join(format!("n{}-{id}.log", k + 1));
    let node = &mut mesh.nodes[k];
    let addr = SocketAddr::from((node.ip(), port));
    let listen = addr.to_string();
    let mut process = Process::new(
        format!("{}/{id}", node.name),
        &node.ns,
        &meshctl,
        [
            "demo",
            "serve",
            "--name",
            service,
            "--id",
            id,
            "--listen",
            &listen,
            "--no-register",
        ],
        log,
    );
    process.start()?;
    node.instances.insert(
        id.to_owned(),
        Instance {
            service: service.to_owned(),
            id: id.to_owned(),
            addr,
            process,
        },
    );
    node.wait_instance_up(id, CONVERGE).await
}

/// Starts mesh-proxy on node `k` with the mesh's usual flags (all
/// services, the node's bridge); waits until it is live.
pub async fn start_proxy(mesh: &mut Mesh, k: usize) -> Result<()> {
    let proxy = bins::workspace_bin("mesh-proxy")?;
    let log = mesh.dir().join(format!("n{}-proxy.log", k + 1));
    let node = &mut mesh.nodes[k];
    let data = node.proxy_data_dir();
    node.proxy = Process::new(
        format!("{}/proxy", node.name),
        &node.ns,
        &proxy,
        [
            "--node".to_owned(),
            node.name.clone(),
            "--listen".into(),
            format!("127.0.0.1:{PROXY_PORT}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{PROXY_ADMIN_PORT}"),
            "--bridge-addr".into(),
            "http://127.0.0.1:8890".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ],
        log,
    );
    node.proxy.start()?;
    node.wait_proxy_live(CONVERGE).await
}

/// `node`'s entry of `GET /v1/nodes` on `via`'s replica.
pub async fn node_status(via: &Node, node: &str) -> Result<Value> {
    let (status, nodes) = call(via, hyper::Method::GET, "/v1/nodes", None).await?;
    if status != 200 {
        bail!("{status} {nodes}");
    }
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .cloned()
        .ok_or_else(|| anyhow!("no {node} in {nodes}"))
}

/// Waits until Consul's catalog has instance `id` of `service`.
pub async fn wait_in_catalog(mesh: &Mesh, service: &str, id: &str) -> Result<()> {
    eventually(
        &format!("{id} is in Consul's catalog"),
        CONVERGE,
        || async {
            let ids = mesh.catalog_instances(service).await?;
            if !ids.iter().any(|i| i == id) {
                bail!("{service}: {ids:?}");
            }
            Ok(())
        },
    )
    .await
}
