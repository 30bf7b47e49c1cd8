//! mesh-monitor in a test mesh: started in a node's namespace, probing
//! every instance in Consul quickly (1 s interval, 500 ms timeout), and
//! its verdicts asked over gRPC as mesh-control asks them.

use std::{net::SocketAddr, path::PathBuf};

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

/// How a test's mesh-monitor runs, besides its fast probing.
#[derive(Clone, Debug, Default)]
pub struct MonitorOptions {
    /// The services whose instances it probes; empty: all.
    pub services: Vec<String>,
    /// Whether its verdicts go into Consul as checks (through the nodes'
    /// bridges, which must then be reachable from its node).
    pub consul_checks: bool,
    /// Where it POSTs alerts.
    pub webhook: Option<String>,
    /// Its TOML config file (the `[logs]` table lives only there).
    pub config: Option<PathBuf>,
    /// More flags; one of the defaults given here replaces it.
    pub args: Vec<String>,
}

/// Starts mesh-monitor on node `k` (its Consul agent, every node's bridge
/// at its gRPC port; it does not write checks into Consul) probing the
/// instances of `services` (all when empty), waits until it is ready, and
/// returns its gRPC URL as mesh-control's `--monitor-addr`.
pub async fn start_monitor(mesh: &mut Mesh, k: usize, services: &[&str]) -> Result<String> {
    let opts = MonitorOptions {
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        ..MonitorOptions::default()
    };
    start_monitor_with(mesh, k, &opts).await
}

/// Starts mesh-monitor on node `k` as `opts` say, by default probing
/// every second with a 500 ms timeout (slow past 300 ms); waits until it
/// is ready and returns its gRPC URL.
pub async fn start_monitor_with(
    mesh: &mut Mesh,
    k: usize,
    opts: &MonitorOptions,
) -> Result<String> {
    let monitor = bins::workspace_bin("mesh-monitor")?;
    let log = mesh.dir().join(format!("n{}-monitor.log", k + 1));
    let acl_token = mesh.acl_token("mesh-monitor").map(str::to_owned);
    let node = &mut mesh.nodes[k];
    let addr = SocketAddr::from((node.ip(), MONITOR_GRPC));
    let grpc = addr.to_string();
    let admin = format!("127.0.0.1:{MONITOR_ADMIN}");
    let bridge = BRIDGE_GRPC_PORT.to_string();
    let defaults = [
        ("--node", node.name.as_str()),
        ("--consul-addr", "http://127.0.0.1:8500"),
        ("--grpc-listen", &grpc),
        ("--admin-listen", &admin),
        ("--interval", "1s"),
        ("--timeout", "500ms"),
        ("--slow-threshold", "300ms"),
        ("--bridge-port", &bridge),
        (
            "--consul-checks",
            if opts.consul_checks { "true" } else { "false" },
        ),
    ];
    // A flag in `opts.args` replaces its default (each may be given once).
    let mut args: Vec<String> = defaults
        .iter()
        .filter(|(flag, _)| !opts.args.iter().any(|a| a == flag))
        .flat_map(|(flag, value)| [(*flag).to_owned(), (*value).to_owned()])
        .collect();
    if let Some(url) = &opts.webhook {
        args.extend(["--webhook-url".to_owned(), url.clone()]);
    }
    if let Some(config) = &opts.config {
        args.extend(["--config".to_owned(), config.display().to_string()]);
    }
    args.extend(opts.args.iter().cloned());
    let mut process = Process::new(
        format!("{}/mesh-monitor", node.name),
        &node.ns,
        &monitor,
        args,
        log,
    );
    if !opts.services.is_empty() {
        process.set_env("MESH_SERVICES", opts.services.join(","));
    }
    if let Some(token) = acl_token {
        // A mesh with ACLs: the monitor's own token, in the environment.
        process.set_env("MESH_CONSUL_TOKEN", token);
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
    wait_monitor_ready(&mesh.nodes[k]).await?;
    Ok(format!("http://{addr}"))
}

/// Waits until the mesh-monitor on `node` answers `/ready`.
async fn wait_monitor_ready(node: &Node) -> Result<()> {
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
    .await
}

/// Stops the mesh-monitor on `node` and starts it again with the same
/// flags; waits until it is ready.
pub async fn restart_monitor(node: &mut Node) -> Result<()> {
    let Some(instance) = node.instances.get_mut(KEY) else {
        bail!("{} runs no mesh-monitor", node.name);
    };
    instance.process.restart().await?;
    wait_monitor_ready(node).await
}

/// The mesh-monitor's `/metrics` on `node`.
pub async fn monitor_metrics(node: &Node) -> Result<String> {
    let resp = node.local_client(MONITOR_ADMIN).get("/metrics").await?;
    if resp.status != 200 {
        bail!(
            "{}'s mesh-monitor /metrics: {} {}",
            node.name,
            resp.status,
            resp.text()
        );
    }
    Ok(resp.text())
}

/// The sum of the samples of metric `name` in `text` whose labels contain
/// every one of `labels` (`key="value"`); 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|want| rest.contains(want))
                .then_some(value)
        })
        .filter_map(|v| v.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// The open alerts of the mesh-monitor on `node` (`ListAlerts`).
pub async fn open_alerts(node: &Node) -> Result<Vec<pb::Alert>> {
    let answer = monitor_client(node)
        .await?
        .list_alerts(pb::ListAlertsRequest {})
        .await?;
    Ok(answer.into_inner().alerts)
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

/// The status and output of the check mesh-monitor sets on instance `id`
/// of `service`, by Consul's health API; `None` while there is none.
pub async fn monitor_check(
    mesh: &Mesh,
    service: &str,
    id: &str,
) -> Result<Option<(String, String)>> {
    let resp = mesh
        .consul_get(&format!("/v1/health/checks/{service}"))
        .await?;
    if resp.status != 200 {
        bail!("{} {}", resp.status, resp.text());
    }
    let checks = resp.json()?;
    Ok(checks
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["ServiceID"] == id && c["Name"] == "mesh-monitor")
        .map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (text("Status"), text("Output"))
        }))
}
