//! mesh-deployer on a test node: started in the node's namespace on the
//! node's address (`--allow-remote` with a token, as mesh-control reaches
//! it; or with mutual TLS alone, the node's certificates, in a mesh with
//! identities), killed and started again on the same data folder, and the
//! calls tests make to it (gRPC with the token, the processes it runs).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use mesh_proto::v1::{control_client::ControlClient, deployer_client::DeployerClient};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    Mesh, Node, bins,
    control::{CONTROL_GRPC, CONVERGE},
    mesh::TRUST_DOMAIN,
    netns::Netns,
    node::{Instance, PROXY_ADMIN_PORT, PROXY_PORT},
    process::Process,
    wait::eventually,
};

/// The deployer's gRPC port (on the node's address).
pub const DEPLOYER_GRPC: u16 = 8894;
/// The deployer's admin port (on the node's loopback).
pub const DEPLOYER_ADMIN: u16 = 8895;
/// The token every deployer of a test mesh requires (and mesh-control's
/// `--deployer-token`).
pub const TOKEN: &str = "e2e-deployer-token-0123456789";
/// The key of the deployer among the node's [`Instance`]s.
pub const KEY: &str = "mesh-deployer";

/// Starts mesh-deployer on node `k` (`<node-ip>:8894` with the token,
/// admin on `127.0.0.1:8895`, its data folder in the test's folder, the
/// node's proxy), with `extra` flags; waits until it is ready.
pub async fn start_deployer(mesh: &mut Mesh, k: usize, extra: &[&str]) -> Result<()> {
    spawn(mesh, k, Auth::Token, extra).await
}

/// Starts mesh-deployer on node `k` as [`start_deployer`] does, but with
/// callers authenticated by mutual TLS alone, no token: `--tls-dir` is the
/// folder the node's bridge keeps its certificates in, `--trust-domain`
/// the mesh's (a mesh with [`crate::mesh::Mtls`]); `extra` flags added.
/// Waits until it is ready.
pub async fn start_deployer_mtls(mesh: &mut Mesh, k: usize, extra: &[&str]) -> Result<()> {
    spawn(mesh, k, Auth::Mtls, extra).await
}

/// How a test's deployer authenticates its callers.
#[derive(Clone, Copy)]
enum Auth {
    /// [`TOKEN`], given in the environment.
    Token,
    /// Mutual TLS with the node's bridge's certificates.
    Mtls,
}

async fn spawn(mesh: &mut Mesh, k: usize, auth: Auth, extra: &[&str]) -> Result<()> {
    let program = bins::workspace_bin("mesh-deployer")?;
    let dir = mesh.dir().to_path_buf();
    let node = &mut mesh.nodes[k];
    let data = node.proxy_data_dir().with_file_name("deployer");
    std::fs::create_dir_all(&data)?;
    let grpc = SocketAddr::from((node.ip(), DEPLOYER_GRPC));
    let mut args: Vec<String> = vec![
        "--node".into(),
        node.name.clone(),
        "--grpc-listen".into(),
        grpc.to_string(),
        "--allow-remote".into(),
        "--admin-listen".into(),
        format!("127.0.0.1:{DEPLOYER_ADMIN}"),
        "--data-dir".into(),
        data.display().to_string(),
        "--proxy-addr".into(),
        format!("127.0.0.1:{PROXY_PORT}"),
        "--proxy-admin".into(),
        format!("127.0.0.1:{PROXY_ADMIN_PORT}"),
    ];
    if let Auth::Mtls = auth {
        args.extend([
            "--tls-dir".into(),
            node.tls_dir().display().to_string(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
        ]);
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut process = Process::new(
        format!("{}/deployer", node.name),
        &node.ns,
        &program,
        args,
        dir.join(format!("{}-deployer.log", node.name)),
    );
    if let Auth::Token = auth {
        // In the environment, not the arguments: `ps` shows no token.
        process.set_env("MESH_DEPLOYER_TOKEN", TOKEN);
    }
    process.start()?;
    // Kept with the node's processes: its log is printed when a test
    // fails, and it is stopped with the mesh.
    node.instances.insert(
        KEY.into(),
        Instance {
            service: KEY.into(),
            id: KEY.into(),
            addr: grpc,
            process,
        },
    );
    wait_ready(node).await
}

/// SIGKILLs node `k`'s deployer (the processes it runs keep running).
pub async fn kill_deployer(mesh: &mut Mesh, k: usize) -> Result<()> {
    deployer(&mut mesh.nodes[k])?.kill().await
}

/// Starts node `k`'s deployer again, with the same flags and data folder;
/// waits until it is ready.
pub async fn restart_deployer(mesh: &mut Mesh, k: usize) -> Result<()> {
    let node = &mut mesh.nodes[k];
    deployer(node)?.start()?;
    wait_ready(node).await
}

/// The deployer process of `node`.
pub fn deployer(node: &mut Node) -> Result<&mut Process> {
    let name = node.name.clone();
    node.instances
        .get_mut(KEY)
        .map(|i| &mut i.process)
        .ok_or_else(|| anyhow!("{name} runs no deployer"))
}

/// Waits until `node`'s deployer answers `/ready` (fails at once, with
/// its log's tail, if it exited).
async fn wait_ready(node: &mut Node) -> Result<()> {
    let what = format!("{}'s deployer is ready", node.name);
    let result = eventually(&what, CONVERGE, || {
        let mut client = node
            .local_client(DEPLOYER_ADMIN)
            .with_timeout(Duration::from_secs(1));
        async move {
            let resp = client.get("/ready").await?;
            if !resp.status.is_success() {
                bail!("{} {}", resp.status, resp.text());
            }
            Ok(())
        }
    })
    .await;
    let process = deployer(node)?;
    if result.is_err() && !process.is_running() {
        bail!(
            "{} exited before it was ready; its log:\n{}",
            process.name(),
            process.log_tail(30)
        );
    }
    result
}

/// A client of `node`'s deployer, reached at the node's address as
/// mesh-control reaches it; every request needs [`authorized`].
pub async fn deployer_client(node: &Node) -> Result<DeployerClient<Channel>> {
    let addr = SocketAddr::from((node.ip(), DEPLOYER_GRPC));
    Ok(DeployerClient::new(grpc_channel(&node.ns, addr).await?))
}

/// A client of the mesh-control replica on `node`.
pub async fn control_client(node: &Node) -> Result<ControlClient<Channel>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, CONTROL_GRPC));
    Ok(ControlClient::new(grpc_channel(&node.ns, addr).await?))
}

/// `message` with the deployers' bearer token.
pub fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {TOKEN}")
        .parse()
        .expect("the token is a valid header value");
    request.metadata_mut().insert("authorization", value);
    request
}

/// An h2c channel to `addr`, its connections opened inside `ns`.
pub async fn grpc_channel(ns: &Netns, addr: SocketAddr) -> Result<Channel> {
    let name = ns.name().to_owned();
    let ns = ns.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let ns = ns.clone();
        async move {
            ns.connect(addr, Duration::from_secs(5))
                .await
                .map(TokioIo::new)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(Duration::from_secs(60))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("gRPC channel to {addr} in {name}"))
}

/// The processes in `node`'s namespace whose command line contains
/// `needle` (e.g. a service's stored-artifact folder): pid and command line.
pub fn processes_with(node: &Node, needle: &str) -> Vec<(i32, String)> {
    node.ns
        .pids()
        .into_iter()
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline
                .contains(needle)
                .then(|| (pid.as_raw(), cmdline.trim_end().to_owned()))
        })
        .collect()
}
