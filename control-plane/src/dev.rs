//! `meshctl dev up`: a whole mesh on one machine for a first look. Starts a
//! Consul agent in dev mode (installing Consul when it is missing), or joins
//! the one at `--consul-addr`; then mesh-bridge, mesh-proxy, mesh-deployer
//! (registering through that proxy, its store and processes under the data
//! folder), mesh-control and mesh-monitor (probing the instances and the
//! components) on their standard ports; with `--demo` two demo services
//! that register themselves through the proxy. Prints every address and
//! stops all it started, newest first, on Ctrl-C — the services deployed
//! through mesh-deployer too.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh_proto::v1::{StatusRequest, StopRequest, deployer_client::DeployerClient};

use crate::procs::Group;

/// The installer script, shipped inside the binary so `meshctl` works from
/// anywhere.
const INSTALL_CONSUL: &str = include_str!("../../deploy/scripts/install-consul.sh");

/// Names of the demo services `--demo` starts.
pub const DEMO_SERVICES: [&str; 2] = ["hello", "echo"];

/// What `meshctl dev up` was told.
#[derive(Clone, Debug)]
pub struct DevConfig {
    /// Start the demo services.
    pub demo: bool,
    /// Use this Consul agent instead of starting one.
    pub consul_addr: Option<String>,
    /// Where logs, the proxy's dump and the queues go.
    pub data_dir: PathBuf,
    /// Where mesh-bridge, mesh-proxy, mesh-deployer, mesh-control and
    /// mesh-monitor are; defaults to meshctl's own folder.
    pub bin_dir: Option<PathBuf>,
}

/// The standard addresses (the port table of the README).
const CONSUL_HTTP: &str = "127.0.0.1:8500";
const PROXY: &str = "127.0.0.1:8888";
const PROXY_ADMIN: &str = "127.0.0.1:8889";
const BRIDGE_GRPC: &str = "127.0.0.1:8890";
const BRIDGE_ADMIN: &str = "127.0.0.1:8891";
const CONTROL_GRPC: &str = "127.0.0.1:8892";
const CONTROL_HTTP: &str = "127.0.0.1:8893";
const DEPLOYER_GRPC: &str = "127.0.0.1:8894";
const DEPLOYER_ADMIN: &str = "127.0.0.1:8895";
const MONITOR_GRPC: &str = "127.0.0.1:8896";
const MONITOR_ADMIN: &str = "127.0.0.1:8897";

/// The binaries `dev up` runs, next to meshctl.
const BINARIES: [&str; 5] = [
    "mesh-bridge",
    "mesh-proxy",
    "mesh-deployer",
    "mesh-control",
    "mesh-monitor",
];

/// Brings the mesh up, waits for Ctrl-C, stops it.
pub async fn up(config: DevConfig) -> anyhow::Result<()> {
    let bins = bin_dir(&config)?;
    let logs = config.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut group = Group::default();
    let result = start(&config, &bins, &logs, &mut group).await;
    match result {
        Ok(lines) => {
            println!("{lines}");
            println!("Press Ctrl-C to stop everything meshctl started.");
            wait_for_stop(&mut group).await;
        }
        Err(e) => {
            group.stop_all(Duration::from_secs(5)).await;
            return Err(e.context(format!("logs are in {}", logs.display())));
        }
    }
    println!("stopping…");
    stop_deployed().await;
    group.stop_all(Duration::from_secs(10)).await;
    println!("stopped.");
    Ok(())
}

async fn wait_for_stop(group: &mut Group) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = mesh_runtime::shutdown::signal() => return,
            _ = tick.tick() => {
                if let Some((name, status)) = group.exited() {
                    eprintln!("{name} exited ({status}); stopping the rest");
                    return;
                }
            }
        }
    }
}

/// Starts every process in order, each one ready before the next; returns
/// the address table to print.
async fn start(
    config: &DevConfig,
    bins: &Path,
    logs: &Path,
    group: &mut Group,
) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let consul_addr = match &config.consul_addr {
        Some(addr) => addr.clone(),
        None => {
            ensure_free(
                CONSUL_HTTP,
                "Consul (or pass --consul-addr to use a running agent)",
            )?;
            let consul = find_or_install_consul(&config.data_dir).await?;
            let args = [
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
                "-hcl",
                "disable_update_check = true\nlimits { http_max_conns_per_client = 4096 }",
            ]
            .map(String::from);
            group.spawn("consul", &consul, &args, logs)?;
            format!("http://{CONSUL_HTTP}")
        }
    };
    wait_until("Consul has a leader", Duration::from_secs(30), || {
        leader_known(&http, &consul_addr)
    })
    .await?;
    ensure_free(BRIDGE_GRPC, "mesh-bridge")?;
    ensure_free(PROXY, "mesh-proxy")?;
    ensure_free(CONTROL_GRPC, "mesh-control")?;
    ensure_free(CONTROL_HTTP, "mesh-control")?;
    ensure_free(DEPLOYER_GRPC, "mesh-deployer")?;
    ensure_free(DEPLOYER_ADMIN, "mesh-deployer")?;
    ensure_free(MONITOR_GRPC, "mesh-monitor")?;
    ensure_free(MONITOR_ADMIN, "mesh-monitor")?;
    let data = |name: &str| config.data_dir.join(name).display().to_string();
    let bridge_args = vec![
        "--consul-addr".into(),
        consul_addr.clone(),
        "--data-dir".into(),
        data("bridge"),
    ];
    group.spawn("mesh-bridge", &bins.join("mesh-bridge"), &bridge_args, logs)?;
    wait_until("mesh-bridge is ready", Duration::from_secs(20), || {
        is_ok(&http, format!("http://{BRIDGE_ADMIN}/ready"))
    })
    .await?;
    let proxy_args = vec!["--data-dir".into(), data("proxy")];
    group.spawn("mesh-proxy", &bins.join("mesh-proxy"), &proxy_args, logs)?;
    wait_until("mesh-proxy is ready", Duration::from_secs(20), || {
        is_ok(&http, format!("http://{PROXY_ADMIN}/ready"))
    })
    .await?;
    start_deployer(bins, logs, &data("deployer"), group, &http).await?;
    let control_args = vec![
        "--consul-addr".into(),
        consul_addr.clone(),
        "--grpc-listen".into(),
        CONTROL_GRPC.into(),
        "--http-listen".into(),
        CONTROL_HTTP.into(),
        "--replica".into(),
        "dev".into(),
        "--monitor-addr".into(),
        format!("http://{MONITOR_GRPC}"),
    ];
    group.spawn(
        "mesh-control",
        &bins.join("mesh-control"),
        &control_args,
        logs,
    )?;
    wait_until("mesh-control is ready", Duration::from_secs(20), || {
        is_ok(&http, format!("http://{CONTROL_HTTP}/ready"))
    })
    .await?;
    start_monitor(bins, logs, &consul_addr, group, &http).await?;
    let mut table = vec![
        format!("Consul HTTP API       {consul_addr}  (UI: {consul_addr}/ui/)"),
        format!("mesh-proxy outbound   http://{PROXY}  (call services: http://{PROXY}/<service>/)"),
        format!(
            "mesh-proxy admin      http://{PROXY_ADMIN}  (/routes /stats /metrics /ready /live)"
        ),
        format!("mesh-bridge gRPC      http://{BRIDGE_GRPC}"),
        format!("mesh-bridge admin     http://{BRIDGE_ADMIN}  (/metrics /ready /live)"),
        format!(
            "mesh-control gRPC     http://{CONTROL_GRPC}  (meshctl nodes, routes, render, ...)"
        ),
        format!(
            "mesh-control HTTP     http://{CONTROL_HTTP}  (REST /v1/nodes ..., /metrics /ready /live)"
        ),
        format!("dashboard             http://{CONTROL_HTTP}/"),
        format!(
            "mesh-deployer gRPC    http://{DEPLOYER_GRPC}  (mesh.v1.Deployer: uploads, deploys)"
        ),
        format!("mesh-deployer admin   http://{DEPLOYER_ADMIN}  (/metrics /ready /live)"),
        format!("mesh-monitor gRPC     http://{MONITOR_GRPC}  (mesh.v1.Monitor: alerts, verdicts)"),
        format!("mesh-monitor admin    http://{MONITOR_ADMIN}  (/metrics /ready /live)"),
    ];
    if config.demo {
        table.extend(start_demo(bins, logs, group, &http).await?);
    }
    table.push(format!("logs                  {}", logs.display()));
    Ok(table.join("\n"))
}

/// Starts mesh-deployer with its data in `data`, registering through the
/// dev proxy, and waits until it is ready. The services it runs outlive
/// it, as on a node, so Ctrl-C stops them through it first
/// ([`stop_deployed`]).
async fn start_deployer(
    bins: &Path,
    logs: &Path,
    data: &str,
    group: &mut Group,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let args = [
        "--grpc-listen",
        DEPLOYER_GRPC,
        "--admin-listen",
        DEPLOYER_ADMIN,
        "--data-dir",
        data,
        "--proxy-addr",
        PROXY,
        "--proxy-admin",
        PROXY_ADMIN,
    ]
    .map(String::from);
    group.spawn("mesh-deployer", &bins.join("mesh-deployer"), &args, logs)?;
    wait_until("mesh-deployer is ready", Duration::from_secs(20), || {
        is_ok(http, format!("http://{DEPLOYER_ADMIN}/ready"))
    })
    .await
}

/// Starts mesh-monitor: it probes every instance in Consul and the mesh's
/// own components, and puts its verdicts into Consul through the bridge.
async fn start_monitor(
    bins: &Path,
    logs: &Path,
    consul_addr: &str,
    group: &mut Group,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let components = [
        format!("mesh-proxy=http://{PROXY_ADMIN}/ready"),
        format!("mesh-bridge=grpc://{BRIDGE_GRPC}"),
        format!("mesh-control=http://{CONTROL_HTTP}/ready"),
        format!("mesh-deployer=http://{DEPLOYER_ADMIN}/ready"),
    ];
    let args = vec![
        "--consul-addr".into(),
        consul_addr.to_owned(),
        "--grpc-listen".into(),
        MONITOR_GRPC.into(),
        "--admin-listen".into(),
        MONITOR_ADMIN.into(),
        "--components".into(),
        components.join(","),
    ];
    group.spawn("mesh-monitor", &bins.join("mesh-monitor"), &args, logs)?;
    wait_until("mesh-monitor is ready", Duration::from_secs(20), || {
        is_ok(http, format!("http://{MONITOR_ADMIN}/ready"))
    })
    .await
}

/// Stops the services mesh-deployer runs (they would outlive it), while
/// the proxy still takes their deregistrations; says what may be left.
async fn stop_deployed() {
    let stop = async {
        let url = format!("http://{DEPLOYER_GRPC}");
        let mut client = DeployerClient::connect(url).await?;
        let status = client.status(StatusRequest::default()).await?.into_inner();
        let services: BTreeSet<String> = status.instances.into_iter().map(|i| i.service).collect();
        for service in services {
            let request = StopRequest {
                service: service.clone(),
                stop_grace_ms: 5000,
            };
            client
                .stop(request)
                .await
                .with_context(|| format!("stopping {service}"))?;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(30), stop).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("the services mesh-deployer runs may still run: {e:#}"),
        Err(_) => {
            eprintln!("the services mesh-deployer runs may still run: stopping them timed out")
        }
    }
}

/// Starts the demo services and waits until each answers through the proxy.
async fn start_demo(
    bins: &Path,
    logs: &Path,
    group: &mut Group,
    http: &reqwest::Client,
) -> anyhow::Result<Vec<String>> {
    let meshctl = bins.join("meshctl");
    let mut lines = Vec::new();
    for name in DEMO_SERVICES {
        let listen = free_local_addr()?;
        let args = [
            "demo",
            "serve",
            "--name",
            name,
            "--listen",
            &listen.to_string(),
        ]
        .map(String::from);
        group.spawn(&format!("demo-{name}"), &meshctl, &args, logs)?;
        wait_until(
            &format!("demo service {name} answers through the proxy"),
            Duration::from_secs(30),
            || is_ok(http, format!("http://{PROXY}/{name}/")),
        )
        .await?;
        lines.push(format!(
            "demo service {name:<8} http://{listen}  (through the mesh: curl http://{PROXY}/{name}/)"
        ));
    }
    Ok(lines)
}

fn bin_dir(config: &DevConfig) -> anyhow::Result<PathBuf> {
    let dir = match &config.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("meshctl has no folder")?
            .to_path_buf(),
    };
    for bin in BINARIES {
        if !dir.join(bin).is_file() {
            bail!(
                "{bin} not found in {}: build the workspace first (cargo build --bins) or pass --bin-dir",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Consul on PATH, in the install folder, or installed now by the script.
async fn find_or_install_consul(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let script = data_dir.join("install-consul.sh");
    std::fs::write(&script, INSTALL_CONSUL)?;
    println!("looking for Consul (installing it if missing)…");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("cannot run bash for the Consul installer")?;
    if !out.status.success() {
        bail!("Consul could not be installed (see the installer's message above)");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text.lines().last().unwrap_or("").trim();
    if path.is_empty() {
        bail!("the Consul installer printed no path");
    }
    Ok(PathBuf::from(path))
}

fn ensure_free(addr: &str, what: &str) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("{addr} is already in use; it is needed for {what}"))
}

fn free_local_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn leader_known(http: &reqwest::Client, consul: &str) -> bool {
    match http.get(format!("{consul}/v1/status/leader")).send().await {
        Ok(r) => r.text().await.is_ok_and(|t| t.trim().len() > 2),
        Err(_) => false,
    }
}

async fn is_ok(http: &reqwest::Client, url: String) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {deadline:?} waiting until {what}")
}
