//! Propagation: a Consul dev agent, the release mesh-bridge and mesh-proxy
//! (watching every service). Each of N times, a new service is registered
//! with the agent's API, pointing at the upstream, and the proxy is polled
//! (`Host: <service>`, every millisecond) until it answers 200; then the
//! service is deregistered and polled until it no longer answers 200.
//!
//! The baseline is Consul's own visibility of the same change: a blocking
//! read of `/v1/catalog/services`, parked before the change is made,
//! returns when Consul has applied it. The difference is what the bridge
//! and the proxy add.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{
    bench::{Bench, MeshBridge, MeshProxy},
    consul::{self, Consul},
    http::Client,
    report::Figure,
    stats::{median, percentile},
};

/// Poll period of the proxy while waiting for a change.
const POLL: Duration = Duration::from_millis(1);

/// The longest a change may take to show before the phase fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// Time for a blocking read to reach Consul and park before the change.
const PARK: Duration = Duration::from_millis(20);

/// One change, timed from the API call that made it, ms.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    /// First answer of the proxy reflecting it.
    pub proxy_ms: f64,
    /// Consul's blocking read returning it.
    pub consul_ms: f64,
}

/// Runs the phase and adds its figures to the report.
pub async fn run(bench: &mut Bench) -> Result<()> {
    let upstream = bench.upstream().await?;
    let dir = bench.dir("propagation")?;
    let mut consul = Consul::start(bench.consul()?, &dir).await?;
    let mut bridge = MeshBridge::start(bench, "mesh-bridge-propagation", &consul.url()).await?;
    let mut mesh = MeshProxy::start(bench, "mesh-proxy-propagation", &bridge.url(), None).await?;

    let mut api = Client::new(consul.addr());
    let mut poll = Client::new(mesh.listen);
    let mut watch = Client::new(consul.addr());
    let mut index = consul::blocking(&mut watch, "/v1/catalog/services", 0, Duration::ZERO).await?;
    let mut watch = Some(watch);
    let (mut registers, mut deregisters) = (Vec::new(), Vec::new());
    for i in 0..bench.settings.propagation_n {
        let name = format!("prop-{i:03}");
        let id = format!("{name}-1");
        let register = consul::agent_register(&mut api, &name, &id, upstream);
        let (timing, next) = change(&mut watch, index, register, &mut poll, &name, true).await?;
        registers.push(timing);
        let deregister = consul::agent_deregister(&mut api, &id);
        let (timing, next) = change(&mut watch, next, deregister, &mut poll, &name, false).await?;
        deregisters.push(timing);
        index = next;
        consul.proc().check()?;
        bridge.proc.check()?;
        mesh.proc.check()?;
    }

    for (what, timings) in [("register", &registers), ("deregister", &deregisters)] {
        let proxy: Vec<f64> = timings.iter().map(|t| t.proxy_ms).collect();
        let consul: Vec<f64> = timings.iter().map(|t| t.consul_ms).collect();
        let (p50, p99) = (median(&proxy), percentile(&proxy, 99.0));
        let f = Figure::new(format!("propagation.{what}_p50_ms"), p50, "ms")
            .vs("consul", median(&consul));
        bench.report.add(f.bar("< 50 ms", p50 < 50.0));
        let f = Figure::new(format!("propagation.{what}_p99_ms"), p99, "ms")
            .vs("consul", percentile(&consul, 99.0));
        bench.report.add(f.bar("< 250 ms", p99 < 250.0));
    }
    bench.report.note(format!(
        "propagation: Consul dev agent + mesh-bridge + mesh-proxy, N={} new services registered (then deregistered) \
         with the agent API; time to the proxy's first 200 (then first non-200), polled every {}ms; \
         baseline: a blocking read of Consul's catalog parked before the change",
        bench.settings.propagation_n,
        POLL.as_millis()
    ));
    bench.report.detail(
        "propagation",
        serde_json::json!({"register": registers, "deregister": deregisters}),
    );
    Ok(())
}

/// Parks a blocking catalog read at `index`, makes the change, and times
/// both the proxy (polled for `name` until it answers 200 when `routed`,
/// anything else when not) and Consul's read. Returns the catalog's new
/// index.
async fn change(
    watch: &mut Option<Client>,
    mut index: u64,
    make: impl std::future::Future<Output = Result<()>>,
    poll: &mut Client,
    name: &str,
    routed: bool,
) -> Result<(Timing, u64)> {
    // Park the read at the current index; should something else change the
    // catalog meanwhile, park again at the new one.
    let read = loop {
        let mut read = park(watch.take().context("the watch client is back")?, index);
        match tokio::time::timeout(PARK, &mut read).await {
            Err(_) => break read,
            Ok(joined) => {
                let (client, result, _) = joined?;
                *watch = Some(client);
                index = result?;
            }
        }
    };
    let started = Instant::now();
    make.await?;
    // Consul's read times itself in its task; the proxy is polled here.
    loop {
        if poll.get(name, "/").await?.status.is_success() == routed {
            break;
        }
        if started.elapsed() > DEADLINE {
            let state = if routed { "registered" } else { "deregistered" };
            bail!("the proxy did not see {name} {state} within {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    let proxy_at = Instant::now();
    let (client, result, consul_at) = read.await?;
    *watch = Some(client);
    let new_index = result.context("Consul's blocking read")?;
    let ms = |at: Instant| at.duration_since(started).as_secs_f64() * 1e3;
    let timing = Timing {
        proxy_ms: ms(proxy_at),
        consul_ms: ms(consul_at),
    };
    Ok((timing, new_index))
}

type Parked = tokio::task::JoinHandle<(Client, Result<u64>, Instant)>;

/// A blocking read of the catalog at `index` in its own task, which hands
/// the client back with the new index and the moment it returned.
fn park(mut client: Client, index: u64) -> Parked {
    tokio::spawn(async move {
        let result = consul::blocking(&mut client, "/v1/catalog/services", index, DEADLINE).await;
        (client, result, Instant::now())
    })
}
