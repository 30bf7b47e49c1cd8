//! mesh-monitor in a test mesh: started in a node's namespace, probing
//! every instance in Consul quickly (1 s interval, 500 ms timeout), and
//! its verdicts asked over gRPC as mesh-control asks them.

use std::net::SocketAddr;

use anyhow::{Result, bail};
use mesh_proto::v1::{self as pb, monitor_client::MonitorClient};
use tonic::transport::Channel;

use crate::{
    Mesh, Node, bins,
    control::CONVERGE,
    deployer::grpc_channel,
    eventually,
    node::{BRIDGE_GRPC_PORT, Instance},
    process::Process,
};

/// mesh-monitor's gRPC port (mesh.v1.Monitor), at the node's address.
pub const MONITOR_GRPC: u16 = 8896;
/// mesh-monitor's admin port (`/ready`, `/metrics`), on loopback.
pub const MONITOR_ADMIN: u16 = 8897;

/// The key of the monitor among its node's instances.
const KEY: &str = "mesh-monitor";

/// Starts mesh-monitor on node `k` (its Consul agent, every node's bridge
/// at its gRPC port; it does not write checks into Consul) probing the
/// instances of `services` (all when empty), waits until it is ready, and
/// returns its gRPC URL as mesh-control's `--monitor-addr`.
pub async fn start_monitor(mesh: &mut Mesh, k: usize, services: &[&str]) -> Result<String> {
    let monitor = bins::workspace_bin("mesh-monitor")?;
    let log = mesh.dir().join(format!("n{}-monitor.log", k + 1));
    let node = &mut mesh.nodes[k];
    let addr = SocketAddr::from((node.ip(), MONITOR_GRPC));
    let mut process = Process::new(
        format!("{}/mesh-monitor", node.name),
        &node.ns,
        &monitor,
        [
            "--node".to_owned(),
            node.name.clone(),
            "--consul-addr".into(),
            "http://127.0.0.1:8500".into(),
            "--grpc-listen".into(),
            addr.to_string(),
            "--admin-listen".into(),
            format!("127.0.0.1:{MONITOR_ADMIN}"),
            "--interval".into(),
            "1s".into(),
            "--timeout".into(),
            "500ms".into(),
            "--slow-threshold".into(),
            "300ms".into(),
            "--bridge-port".into(),
            BRIDGE_GRPC_PORT.to_string(),
            "--consul-checks".into(),
            "false".into(),
        ],
        log,
    );
    if !services.is_empty() {
        process.set_env("MESH_SERVICES", services.join(","));
    }
    process.start()?;
    // Kept with the node's processes: its log is printed when a test
    // fails, and it is stopped with the mesh.
    node.instances.insert(
        KEY.into(),
        Instance {
            service: KEY.into(),
            id: KEY.into(),
            addr,
            process,
        },
    );
    let node = &mesh.nodes[k];
    eventually(
        &format!("{}'s mesh-monitor is ready", node.name),
        CONVERGE,
        || async {
            let resp = node.local_client(MONITOR_ADMIN).get("/ready").await?;
            if resp.status != 200 {
                bail!("{} {}", resp.status, resp.text());
            }
            Ok(())
        },
    )
    .await?;
    Ok(format!("http://{addr}"))
}

/// Stops the mesh-monitor on `node` (started by [`start_monitor`]).
pub async fn stop_monitor(node: &mut Node) -> Result<()> {
    let Some(instance) = node.instances.get_mut(KEY) else {
        bail!("{} runs no mesh-monitor", node.name);
    };
    instance.process.stop().await?;
    Ok(())
}

/// A client of the mesh-monitor on `node`, reached at its address.
pub async fn monitor_client(node: &Node) -> Result<MonitorClient<Channel>> {
    let addr = SocketAddr::from((node.ip(), MONITOR_GRPC));
    Ok(MonitorClient::new(grpc_channel(&node.ns, addr).await?))
}

/// The verdict of the monitor on `via` on node `of`.
pub async fn node_verdict(via: &Node, of: &str) -> Result<pb::VerdictResponse> {
    let answer = monitor_client(via)
        .await?
        .verdict(pb::VerdictRequest {
            node: of.to_owned(),
            instance_id: String::new(),
        })
        .await?;
    Ok(answer.into_inner())
}
