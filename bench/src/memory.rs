//! mesh-proxy's memory: VmRSS idle (one service routed, no traffic yet)
//! and holding 1,000 services × 10 endpoints from the fake bridge, each
//! measured once the routing dump is written (the table is loaded and
//! the work that follows it done). The baseline is nginx holding the same
//! routes (one upstream block per service, `keepalive 128` each, routed by
//! Host), master and worker PSS summed. Both are pinned to one CPU, as in
//! the data plane: mesh-proxy then runs one tokio worker thread.

use std::time::Duration;

use anyhow::Result;
use consul_client::testing::free_port;
use serde::Serialize;

use crate::{
    bench::{Bench, MeshProxy},
    fake_bridge::{self, FakeBridge},
    nginx::{Nginx, Routing},
    procfs,
    report::Figure,
};

/// How long the routing dump may take to appear after the proxy is ready.
const DUMP_WAIT: Duration = Duration::from_secs(5);

/// Time given after loading for lazy work (timers, first metrics upkeep)
/// before memory is read.
const SETTLE: Duration = Duration::from_secs(2);

const MB: f64 = 1024.0 * 1024.0;

/// One measurement of both.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Memory {
    /// Endpoints held.
    pub endpoints: usize,
    /// mesh-proxy VmRSS, bytes.
    pub mesh_rss: u64,
    /// mesh-proxy PSS, bytes.
    pub mesh_pss: u64,
    /// nginx master + worker PSS, bytes.
    pub nginx_pss: u64,
    /// nginx worker VmRSS alone, bytes.
    pub nginx_worker_rss: u64,
    /// Whether mesh-proxy had written its routing dump.
    pub dumped: bool,
}

/// Runs the phase and adds its figures to the report.
pub async fn run(bench: &mut Bench) -> Result<()> {
    let upstream = bench.upstream().await?;
    let idle = measure(
        bench,
        "idle",
        vec![fake_bridge::service("bench", &[upstream])],
    )
    .await?;
    let (services, per) = (bench.settings.services, bench.settings.instances);
    let many = measure(bench, "many", fake_bridge::synthetic(services, per)).await?;

    let report = &mut bench.report;
    let mb = |b: u64| b as f64 / MB;
    let f =
        Figure::new("memory.idle_rss_mb", mb(idle.mesh_rss), "MB").vs("nginx", mb(idle.nginx_pss));
    report.add(f.bar("< 15 MB", mb(idle.mesh_rss) < 15.0));
    let f = Figure::new(
        format!("memory.endpoints_{}_rss_mb", many.endpoints),
        mb(many.mesh_rss),
        "MB",
    )
    .vs("nginx", mb(many.nginx_pss));
    report.add(f.bar("< 60 MB", mb(many.mesh_rss) < 60.0));
    let per_endpoint = |m: u64, i: u64| m.saturating_sub(i) as f64 / many.endpoints.max(1) as f64;
    report.add(
        Figure::new(
            "memory.bytes_per_endpoint",
            per_endpoint(many.mesh_rss, idle.mesh_rss),
            "B",
        )
        .vs("nginx", per_endpoint(many.nginx_pss, idle.nginx_pss)),
    );
    report.note(
        "memory: mesh-proxy VmRSS against nginx master + worker PSS (their RSS would count shared pages twice); \
         nginx holds the same services as upstream blocks (keepalive 128), routed by Host; both pinned to one CPU",
    );
    for m in [idle, many].iter().filter(|m| !m.dumped) {
        report.note(format!(
            "memory: mesh-proxy holding {} endpoints had written no routing dump {}s after loading its table \
             (the dump writer subscribes to table changes after discovery starts: a first table published before misses it)",
            m.endpoints,
            DUMP_WAIT.as_secs()
        ));
    }
    report.detail("memory", [idle, many]);
    Ok(())
}

/// Starts mesh-proxy fed `snapshot` and nginx with the same routes, and
/// reads their memory once both are loaded.
async fn measure(
    bench: &Bench,
    label: &str,
    snapshot: Vec<mesh_proto::v1::ServiceEndpoints>,
) -> Result<Memory> {
    let endpoints = snapshot.iter().map(|s| s.endpoints.len()).sum();
    let routing = Routing::ByHost(
        snapshot
            .iter()
            .map(|s| {
                let servers = s
                    .endpoints
                    .iter()
                    .map(|e| (e.address.clone(), u16::try_from(e.port).unwrap_or(0)))
                    .collect();
                (s.name.clone(), servers)
            })
            .collect(),
    );
    let bridge = FakeBridge::start(snapshot).await?;
    let cpu = Some(bench.cpus.proxy);
    let mut mesh =
        MeshProxy::start(bench, &format!("mesh-proxy-{label}"), &bridge.url(), cpu).await?;
    let dumped = mesh.wait_dump(DUMP_WAIT).await?;
    let dir = bench.dir(&format!("memory-{label}"))?;
    let nginx = Nginx::start(
        &bench.tools.nginx,
        "nginx",
        &dir,
        free_port(),
        cpu,
        &routing,
    )
    .await?;
    tokio::time::sleep(SETTLE).await;
    mesh.proc.check()?;
    let worker = procfs::children(nginx.proc().pid()).first().copied();
    let memory = Memory {
        endpoints,
        mesh_rss: procfs::rss_bytes(mesh.proc.pid())?,
        mesh_pss: procfs::pss_bytes(mesh.proc.pid())?,
        nginx_pss: nginx.pss_bytes()?,
        nginx_worker_rss: worker.map(procfs::rss_bytes).transpose()?.unwrap_or(0),
        dumped,
    };
    println!(
        "   {label}: {endpoints} endpoints: mesh-proxy VmRSS {:.1} MB, nginx PSS {:.1} MB",
        memory.mesh_rss as f64 / MB,
        memory.nginx_pss as f64 / MB
    );
    Ok(memory)
}
