//! The bridge's fan-out: 1,000 services × 10 instances in a Consul dev
//! agent's catalog, 500 simulated proxies (tonic clients in this process,
//! one HTTP/2 connection each) subscribed to every service through one
//! mesh-bridge. One instance of one service changes (its port), and the
//! time until all 500 subscribers have received the delta carrying that
//! service is measured, over several changes; with the bridge's CPU time
//! per change and its RSS.
//!
//! The baseline is the architecture the bridge replaces: 500 proxies each
//! long-polling Consul themselves (500 blocking reads of the changed
//! service, parked before the change): the time until all 500 returned,
//! and Consul's CPU time per change. It runs before the bridge starts, so
//! the two never share the CPUs.

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::future::try_join_all;
use mesh_proto::v1::{WatchRequest, discovery_client::DiscoveryClient, route_update::Kind};
use serde::Serialize;
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    bench::{Bench, MeshBridge},
    consul::{self, CatalogEntry, Consul},
    fake_bridge::{synthetic_addr, synthetic_name},
    http::Client,
    procfs,
    report::Figure,
    stats::{median, percentile},
};

/// Catalog writes in flight while registering.
const REGISTER_CONCURRENCY: usize = 32;

/// Consul nodes the instances are spread over (instance i on node i % 10).
const NODES: usize = 10;

/// Time for the long-polls to reach Consul and park before a change.
const PARK: Duration = Duration::from_secs(1);

/// Pause between changes, so that one change's work is over before the next.
const SETTLE: Duration = Duration::from_millis(300);

/// The longest a change may take to reach everyone before the phase fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// How long 500 subscribers may take to receive their snapshots.
const SYNC_DEADLINE: Duration = Duration::from_secs(180);

/// A simulated proxy's pauses before subscribing again (as mesh-proxy's).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

const MB: f64 = 1024.0 * 1024.0;

/// One change as everyone saw it, ms from the write.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// The changed service.
    pub service: String,
    /// When the last receiver had it.
    pub all_ms: f64,
    /// Median receiver.
    pub p50_ms: f64,
}

/// What a simulated proxy received.
#[derive(Debug)]
enum Event {
    Snapshot,
    Delta(Vec<String>),
    /// The subscription failed before its snapshot and is tried again.
    Retried,
    Failed(String),
}

/// Runs the phase and adds its figures to the report.
pub async fn run(bench: &mut Bench) -> Result<()> {
    let dir = bench.dir("fanout")?;
    let mut consul = Consul::start(bench.consul()?, &dir).await?;
    let (services, instances, n) = (
        bench.settings.services,
        bench.settings.instances,
        bench.settings.subscribers,
    );
    let changes = bench.settings.changes.max(1);

    let t = Instant::now();
    register_all(consul.addr(), services, instances).await?;
    let registered_s = t.elapsed().as_secs_f64();
    println!("   {services} services x {instances} instances registered in {registered_s:.1}s");

    // Baseline: every proxy long-polling Consul itself.
    let consul_pid = consul.proc().pid();
    let consul_rss_before = procfs::rss_bytes(consul_pid)?;
    let cpu = procfs::cpu_time(consul_pid)?;
    let mut pollers: Vec<Client> = (0..n).map(|_| Client::new(consul.addr())).collect();
    let mut baseline = Vec::new();
    let mut consul_rss_parked = 0;
    for k in 0..changes {
        let (change, back, rss) = longpoll_change(&consul, pollers, services, k).await?;
        pollers = back;
        consul_rss_parked = consul_rss_parked.max(rss);
        println!(
            "   consul, {n} long-polls: change {} reached all in {:.1} ms",
            k + 1,
            change.all_ms
        );
        baseline.push(change);
        tokio::time::sleep(SETTLE).await;
    }
    let consul_cpu_ms =
        (procfs::cpu_time(consul_pid)? - cpu).total().as_secs_f64() * 1e3 / changes as f64;
    drop(pollers);
    let consul_rss = procfs::rss_bytes(consul_pid)?;

    // The bridge and its subscribers: one first, to tell what each
    // further one costs.
    let mut bridge = MeshBridge::start(bench, "mesh-bridge-fanout", &consul.url()).await?;
    let mut subs = Subscribers::new();
    subs.add(&bridge.url(), 0..1)?;
    subs.wait_snapshots(1).await?;
    let bridge_rss_one = procfs::rss_bytes(bridge.proc.pid())?;
    let overflows = procfs::listen_overflows()?;
    let t = Instant::now();
    subs.add(&bridge.url(), 1..n)?;
    subs.wait_snapshots(n.saturating_sub(1)).await?;
    let synced_s = t.elapsed().as_secs_f64();
    let overflows = procfs::listen_overflows()?.saturating_sub(overflows);
    println!(
        "   {n} subscribers have their snapshot after {synced_s:.1}s ({} subscriptions retried, {overflows} connections dropped by full accept queues)",
        subs.retries
    );
    let bridge_pid = bridge.proc.pid();
    let bridge_rss_synced = procfs::rss_bytes(bridge_pid)?;
    let cpu = procfs::cpu_time(bridge_pid)?;
    let mut measured = Vec::new();
    let mut writer = Client::new(consul.addr());
    // Other services than the baseline's, so no change is a no-op.
    for k in changes..2 * changes {
        let service = change_instance(&mut writer, services, k).await?;
        let started = Instant::now();
        let change = subs.wait_delta(&service, n, started).await?;
        println!(
            "   bridge, {n} subscribers: change {} reached all in {:.1} ms",
            k - changes + 1,
            change.all_ms
        );
        measured.push(change);
        bridge.proc.check()?;
        tokio::time::sleep(SETTLE).await;
    }
    let bridge_cpu_ms =
        (procfs::cpu_time(bridge_pid)? - cpu).total().as_secs_f64() * 1e3 / changes as f64;
    let bridge_rss = procfs::rss_bytes(bridge_pid)?;
    consul.proc().check()?;

    let all = |c: &[Change]| c.iter().map(|c| c.all_ms).collect::<Vec<f64>>();
    let (mesh_all, consul_all) = (all(&measured), all(&baseline));
    let report = &mut bench.report;
    let p50 = median(&mesh_all);
    let f = Figure::new("fanout.update_all_p50_ms", p50, "ms").vs("consul", median(&consul_all));
    report.add(f.bar("< 50 ms", p50 < 50.0));
    let p99 = percentile(&mesh_all, 99.0);
    let f = Figure::new("fanout.update_all_p99_ms", p99, "ms")
        .vs("consul", percentile(&consul_all, 99.0));
    report.add(f.bar("< 250 ms", p99 < 250.0));
    report.add(
        Figure::new("fanout.bridge_cpu_per_change_ms", bridge_cpu_ms, "ms")
            .vs("consul", consul_cpu_ms),
    );
    report.add(
        Figure::new("fanout.bridge_rss_mb", bridge_rss as f64 / MB, "MB")
            .vs("consul", consul_rss as f64 / MB),
    );
    let per = |more: u64, less: u64| {
        more.saturating_sub(less) as f64 / 1024.0 / n.saturating_sub(1).max(1) as f64
    };
    report.add(
        Figure::new(
            "fanout.bridge_kb_per_subscriber",
            per(bridge_rss_synced, bridge_rss_one),
            "KB",
        )
        .vs("consul", per(consul_rss_parked, consul_rss_before)),
    );
    report.note(format!(
        "fan-out: {services} services x {instances} instances in a Consul dev agent's catalog (http_max_conns_per_client raised to 4096), \
         {n} simulated proxies (one HTTP/2 connection each) watching every service through one mesh-bridge; a change is one instance's port; \
         times until all {n} had the delta, p99 over {changes} changes (with {changes} samples, the p99 is the largest); \
         baseline: {n} blocking reads of the changed service on Consul (each proxy watching Consul itself), Consul's CPU per change and RSS; \
         memory per subscriber: the bridge's RSS growth from 1 to {n} subscribers, against Consul's from 0 to {n} parked long-polls"
    ));
    if subs.retries > 0 {
        report.note(format!(
            "fan-out: while {n} subscribers connected at once, {} subscriptions failed before their snapshot and were retried \
             (as mesh-proxy does, after a jittered pause); the kernel dropped {overflows} connections on full accept queues",
            subs.retries
        ));
    }
    report.detail(
        "fanout",
        serde_json::json!({
            "registered_s": registered_s,
            "initial_sync_s": synced_s,
            "initial_sync_retries": subs.retries,
            "initial_sync_listen_overflows": overflows,
            "bridge_rss_one_subscriber_mb": bridge_rss_one as f64 / MB,
            "bridge_rss_synced_mb": bridge_rss_synced as f64 / MB,
            "consul_rss_before_mb": consul_rss_before as f64 / MB,
            "consul_rss_parked_mb": consul_rss_parked as f64 / MB,
            "bridge": measured,
            "consul": baseline,
        }),
    );
    Ok(())
}

/// Writes `services` × `instances` into the catalog, a few at a time.
async fn register_all(consul: SocketAddr, services: usize, instances: usize) -> Result<()> {
    let total = services * instances;
    let workers = (0..REGISTER_CONCURRENCY).map(|w| async move {
        let mut client = Client::new(consul);
        for n in (w..total).step_by(REGISTER_CONCURRENCY) {
            let (s, i) = (n / instances, n % instances);
            register(&mut client, s, i, None).await?;
        }
        anyhow::Ok(())
    });
    try_join_all(workers).await?;
    Ok(())
}

/// Registers instance `i` of synthetic service `s`, on `port` when given.
async fn register(client: &mut Client, s: usize, i: usize, port: Option<u16>) -> Result<String> {
    let service = synthetic_name(s);
    let (address, default_port) = synthetic_addr(s, i);
    let node = format!("bench-node-{}", i % NODES);
    let node_addr = format!("127.0.0.{}", 10 + i % NODES);
    let id = format!("{service}-{i}");
    let entry = CatalogEntry {
        node: &node,
        node_addr: &node_addr,
        service: &service,
        id: &id,
        address: &address,
        port: port.unwrap_or(default_port),
    };
    consul::catalog_register(client, &entry).await?;
    Ok(service)
}

/// Change `k`: instance 0 of a service picked by `k` moves to a new port.
async fn change_instance(client: &mut Client, services: usize, k: usize) -> Result<String> {
    let s = (k * 97 + 13) % services.max(1);
    let port = 40_000 + u16::try_from(k % 20_000).unwrap_or(0);
    register(client, s, 0, Some(port)).await
}

/// Parks one blocking read per poller on the service change `k` touches,
/// makes the change, and times when each returns.
async fn longpoll_change(
    consul: &Consul,
    pollers: Vec<Client>,
    services: usize,
    k: usize,
) -> Result<(Change, Vec<Client>, u64)> {
    let s = (k * 97 + 13) % services.max(1);
    let service = synthetic_name(s);
    let path = format!("/v1/health/service/{service}?passing");
    let mut writer = Client::new(consul.addr());
    let index = consul::blocking(&mut writer, &path, 0, Duration::ZERO).await?;
    let mut parked = JoinSet::new();
    for (i, mut client) in pollers.into_iter().enumerate() {
        let path = path.clone();
        parked.spawn(async move {
            let result = consul::blocking(&mut client, &path, index, DEADLINE).await;
            (i, client, result, Instant::now())
        });
    }
    tokio::time::sleep(PARK).await;
    let rss = procfs::rss_bytes(consul.pid())?;
    if let Some(early) = parked.try_join_next() {
        let (i, _, result, _) = early?;
        bail!("long-poll {i} returned before the change: {result:?}");
    }
    let started = Instant::now();
    change_instance(&mut writer, services, k).await?;
    let mut back = Vec::new();
    let mut times = Vec::new();
    while let Some(joined) = parked.join_next().await {
        let (i, client, result, at) = joined?;
        let new_index = result.with_context(|| format!("long-poll {i}"))?;
        if new_index <= index {
            bail!("long-poll {i} returned without the change (index {new_index})");
        }
        if at < started {
            bail!("long-poll {i} returned before the change");
        }
        times.push(at.duration_since(started).as_secs_f64() * 1e3);
        back.push(client);
    }
    Ok((summary(service, &times), back, rss))
}

fn summary(service: String, times: &[f64]) -> Change {
    Change {
        service,
        all_ms: times.iter().copied().fold(0.0, f64::max),
        p50_ms: median(times),
    }
}

/// The simulated proxies: each a task holding one Watch stream on its own
/// connection, reporting what it receives.
struct Subscribers {
    /// Subscriptions that failed before their snapshot and were retried.
    retries: usize,
    tx: mpsc::UnboundedSender<(usize, Event, Instant)>,
    events: mpsc::UnboundedReceiver<(usize, Event, Instant)>,
    tasks: JoinSet<()>,
}

impl Subscribers {
    fn new() -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        Self {
            retries: 0,
            tx,
            events,
            tasks: JoinSet::new(),
        }
    }

    /// Connects subscribers `ids`, each watching every service.
    fn add(&mut self, url: &str, ids: std::ops::Range<usize>) -> Result<()> {
        for i in ids {
            let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            let tx = self.tx.clone();
            self.tasks.spawn(simulated_proxy(i, endpoint, tx));
        }
        Ok(())
    }

    async fn next(&mut self, deadline: Instant) -> Result<(usize, Event, Instant)> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some((i, Event::Failed(e), _))) => bail!("subscriber {i}: {e}"),
                Ok(Some((_, Event::Retried, _))) => self.retries += 1,
                Ok(Some(event)) => return Ok(event),
                Ok(None) => bail!("every subscriber is gone"),
                Err(_) => bail!("timed out"),
            }
        }
    }

    /// Waits until `n` more subscribers have their snapshot.
    async fn wait_snapshots(&mut self, n: usize) -> Result<()> {
        let deadline = Instant::now() + SYNC_DEADLINE;
        let mut got = HashSet::new();
        while got.len() < n {
            let (i, event, _) = self
                .next(deadline)
                .await
                .with_context(|| format!("{} of {n} snapshots received", got.len()))?;
            if matches!(event, Event::Snapshot) {
                got.insert(i);
            }
        }
        Ok(())
    }

    /// Waits until `n` subscribers have a delta carrying `service`.
    async fn wait_delta(&mut self, service: &str, n: usize, started: Instant) -> Result<Change> {
        let deadline = started + DEADLINE;
        let mut got = HashSet::new();
        let mut times = Vec::new();
        while got.len() < n {
            let (i, event, at) = self.next(deadline).await.with_context(|| {
                format!(
                    "{} of {n} subscribers have the change of {service}",
                    got.len()
                )
            })?;
            if let Event::Delta(names) = event
                && names.iter().any(|s| s == service)
                && got.insert(i)
            {
                times.push(at.duration_since(started).as_secs_f64() * 1e3);
            }
        }
        Ok(summary(service.to_owned(), &times))
    }
}

/// One simulated proxy: subscribes to every service and reports each
/// message. Like mesh-proxy, it subscribes again after a growing,
/// jittered pause when the subscription fails before its snapshot (a
/// burst of subscribers can overflow the bridge's accept queue); a
/// failure after it is reported.
async fn simulated_proxy(
    i: usize,
    endpoint: tonic::transport::Endpoint,
    tx: mpsc::UnboundedSender<(usize, Event, Instant)>,
) {
    let deadline = Instant::now() + SYNC_DEADLINE;
    let mut pause = RETRY_MIN;
    loop {
        let mut synced = false;
        let result = subscribe(i, &endpoint, &tx, &mut synced).await;
        let error = match result {
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
        // Jitter from the subscriber's number: the retries spread out.
        let jitter = pause.mul_f64((i % 97) as f64 / 97.0);
        if synced || Instant::now() + pause + jitter > deadline {
            let _ = tx.send((i, Event::Failed(error), Instant::now()));
            return;
        }
        let _ = tx.send((i, Event::Retried, Instant::now()));
        tokio::time::sleep(pause + jitter).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// One subscription, until it fails; `Ok` when the bench stops listening.
async fn subscribe(
    i: usize,
    endpoint: &tonic::transport::Endpoint,
    tx: &mpsc::UnboundedSender<(usize, Event, Instant)>,
    synced: &mut bool,
) -> Result<()> {
    let channel = endpoint.connect().await?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
    let request = WatchRequest {
        node: format!("sim-{i}"),
        services: Vec::new(),
    };
    // The stream opens once the bridge has its first answers; after that,
    // updates come when Consul changes (the caller waits with deadlines).
    let mut stream = tokio::time::timeout(SYNC_DEADLINE, client.watch(request))
        .await
        .context("the bridge did not open the stream")??
        .into_inner();
    while let Some(update) = stream.message().await? {
        let event = match update.kind {
            Some(Kind::Snapshot(_)) => {
                *synced = true;
                Event::Snapshot
            }
            Some(Kind::Delta(d)) => Event::Delta(
                d.upserted
                    .into_iter()
                    .map(|s| s.name)
                    .chain(d.removed)
                    .collect(),
            ),
            None => continue,
        };
        if tx.send((i, event, Instant::now())).is_err() {
            return Ok(());
        }
    }
    bail!("the bridge ended the stream")
}
