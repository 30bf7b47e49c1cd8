//! The data plane: wrk against the upstream directly, through nginx and
//! through mesh-proxy, at 1, 16 and 64 keep-alive connections, in one or
//! both CPU layouts ([`Layout`]).
//!
//! nginx and mesh-proxy run side by side on the proxy CPU (only the one
//! under load does anything); wrk has the load CPU; the upstream is moved
//! to the CPU the layout gives it. Each round measures every layout,
//! connection count and target back to back (targets in alternating
//! order, so none always runs first); a figure is the median over rounds,
//! and the latency a hop adds is the median of per-round differences.
//! Every request is `GET /` with `Host: bench`: mesh-proxy routes it by
//! Host, nginx and the upstream ignore it.
//!
//! Per run: requests/s, p50 and p99 latency (wrk), the proxy's CPU time
//! (all its processes and threads, from `/proc`) per request, and how busy
//! each CPU was, to tell a proxy-bound run from a load-bound or noisy one.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use consul_client::testing::free_port;
use serde::Serialize;

use crate::{
    bench::{Bench, MeshProxy},
    fake_bridge::{self, FakeBridge},
    http::Client,
    nginx::{Nginx, Routing},
    process::Proc,
    procfs::{self, CpuTimes, TICKS_PER_SEC},
    report::{Figure, Report},
    settings::Layout,
    stats::median,
    wrk::{self, Load, WrkRun},
};

/// Connection counts measured.
pub const CONNS: [usize; 3] = [1, 16, 64];

/// Load before the measured rounds, so pools are warm.
const WARMUP: Duration = Duration::from_secs(2);

/// A run in which wrk (and the upstream, when it shares wrk's CPU) used
/// more of the load CPU than this was likely bound by the load generator
/// rather than by the proxy.
const LOAD_SATURATED: f64 = 0.9;

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The upstream, no proxy.
    Direct,
    /// nginx.
    Nginx,
    /// mesh-proxy.
    Mesh,
    /// mesh-proxy speaking h2c to the upstream (instances tagged `h2`).
    #[serde(rename = "mesh_h2")]
    MeshH2,
}

/// One wrk run against one target.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Round number.
    pub round: usize,
    /// wrk's numbers.
    pub wrk: WrkRun,
    /// Proxy CPU time per request, µs (none for direct).
    pub proxy_cpu_us: Option<f64>,
    /// Of that, the kernel's (system time), µs.
    pub proxy_kernel_cpu_us: Option<f64>,
    /// The proxy's context switches per request (all its threads).
    pub proxy_switches_per_request: Option<f64>,
    /// Upstream CPU time per request, µs.
    pub upstream_cpu_us: f64,
    /// Share of the proxy CPU that was busy.
    pub proxy_cpu_busy: f64,
    /// Share of the proxy CPU used by other processes than the bench's
    /// (noise).
    pub proxy_cpu_foreign: f64,
    /// Share of the load CPU that was busy.
    pub load_cpu_busy: f64,
    /// Share of the load CPU used by wrk and (in the split layout) the
    /// upstream: near 1, the run was bound by the load generator.
    pub load_cpu_ours: f64,
}

// === impl Sample ===

impl Sample {
    /// The proxy's CPU per request, µs; NaN for a direct call.
    fn cpu(&self) -> f64 {
        self.proxy_cpu_us.unwrap_or(f64::NAN)
    }

    /// The kernel's part of [`Self::cpu`], µs; NaN for a direct call.
    fn kernel(&self) -> f64 {
        self.proxy_kernel_cpu_us.unwrap_or(f64::NAN)
    }
}

/// Samples by layout, connection count and target.
type Samples = BTreeMap<(Layout, usize, Target), Vec<Sample>>;

struct Targets<'a> {
    bench: &'a Bench,
    direct: std::net::SocketAddr,
    upstream: &'a Proc,
    nginx: &'a Nginx,
    mesh: &'a MeshProxy,
    mesh_h2: &'a MeshProxy,
    script: std::path::PathBuf,
}

/// Runs the phase and adds its figures to the report.
pub async fn run(bench: &mut Bench) -> Result<()> {
    let upstream_addr = bench.upstream().await?;
    let dir = bench.dir("dataplane")?;
    let bridge = FakeBridge::start(vec![fake_bridge::service("bench", &[upstream_addr])]).await?;
    let proxy_cpu = Some(bench.cpus.proxy);
    let mut mesh = MeshProxy::start(bench, "mesh-proxy", &bridge.url(), proxy_cpu).await?;
    check_routes(&mesh).await?;
    let h2_bridge = FakeBridge::start(vec![fake_bridge::h2(fake_bridge::service(
        "bench",
        &[upstream_addr],
    ))])
    .await?;
    let mut mesh_h2 = MeshProxy::start(bench, "mesh-proxy-h2", &h2_bridge.url(), proxy_cpu).await?;
    check_routes(&mesh_h2).await?;
    let nginx = Nginx::start(
        &bench.tools.nginx,
        "nginx",
        &dir,
        free_port(),
        proxy_cpu,
        &Routing::Single(upstream_addr),
    )
    .await?;
    let script = dir.join("report.lua");
    std::fs::write(&script, wrk::SCRIPT)?;

    let samples = {
        let upstream = bench.upstream_proc().context("the upstream runs")?;
        let targets = Targets {
            bench,
            direct: upstream_addr,
            upstream,
            nginx: &nginx,
            mesh: &mesh,
            mesh_h2: &mesh_h2,
            script,
        };
        let measured = targets.measure_all().await;
        // The upstream goes back where the other phases expect it.
        pin(upstream, bench.cpus.load)?;
        measured?
    };
    mesh.proc.check()?;
    mesh_h2.proc.check()?;
    let layouts = bench.settings.layouts.clone();
    for layout in layouts {
        figures(&mut bench.report, &samples, layout);
    }
    notes(bench, &samples);
    let rounds: BTreeMap<String, &Vec<Sample>> = samples
        .iter()
        .map(|((layout, conns, target), s)| {
            (format!("{layout}.c{conns}.{}", target_name(*target)), s)
        })
        .collect();
    bench.report.detail("dataplane", rounds);
    Ok(())
}

/// A request through the proxy answers 200 before anything is measured.
async fn check_routes(mesh: &MeshProxy) -> Result<()> {
    let reply = Client::new(mesh.listen).get("bench", "/").await?;
    if !reply.status.is_success() {
        bail!(
            "mesh-proxy answers {} for Host: bench: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(())
}

/// Moves every thread of `proc` to `cpu`.
fn pin(proc: &Proc, cpu: usize) -> Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &proc.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("run taskset")?;
    if !status.success() {
        bail!("taskset could not move {} to CPU {cpu}", proc.name());
    }
    Ok(())
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Direct => "direct",
        Target::Nginx => "nginx",
        Target::Mesh => "mesh",
        Target::MeshH2 => "mesh_h2",
    }
}

// === impl Targets ===

impl Targets<'_> {
    fn upstream_cpu(&self, layout: Layout) -> usize {
        match layout {
            Layout::Split => self.bench.cpus.load,
            Layout::Shared => self.bench.cpus.proxy,
        }
    }

    async fn measure_all(&self) -> Result<Samples> {
        for target in [Target::Nginx, Target::Mesh, Target::MeshH2] {
            self.load(target, 64, WARMUP).run().await?;
        }
        let mut samples = Samples::new();
        let rounds = self.bench.settings.rounds.max(1);
        for round in 0..rounds {
            for &layout in &self.bench.settings.layouts {
                pin(self.upstream, self.upstream_cpu(layout))?;
                for conns in CONNS {
                    let mut order = [Target::Direct, Target::Nginx, Target::Mesh, Target::MeshH2];
                    if (round + conns) % 2 == 1 {
                        order.reverse();
                    }
                    for target in order {
                        let sample = self.measure(round, layout, target, conns).await?;
                        print_sample(round, rounds, layout, conns, target, &sample);
                        samples
                            .entry((layout, conns, target))
                            .or_default()
                            .push(sample);
                    }
                }
            }
        }
        Ok(samples)
    }

    fn load(&self, target: Target, conns: usize, duration: Duration) -> Load<'_> {
        let addr = match target {
            Target::Direct => self.direct,
            Target::Nginx => self.nginx.addr(),
            Target::Mesh => self.mesh.listen,
            Target::MeshH2 => self.mesh_h2.listen,
        };
        Load {
            wrk: &self.bench.tools.wrk,
            script: &self.script,
            cpu: Some(self.bench.cpus.load),
            addr,
            host: "bench",
            conns,
            duration,
        }
    }

    fn proxy(&self, target: Target) -> Option<&Proc> {
        match target {
            Target::Direct => None,
            Target::Nginx => Some(self.nginx.proc()),
            Target::Mesh => Some(&self.mesh.proc),
            Target::MeshH2 => Some(&self.mesh_h2.proc),
        }
    }

    async fn measure(
        &self,
        round: usize,
        layout: Layout,
        target: Target,
        conns: usize,
    ) -> Result<Sample> {
        let cpus = self.bench.cpus;
        let proxy = self.proxy(target);
        let proxy_before = proxy.map(Proc::cpu_time).transpose()?;
        let switches_before = proxy.map(Proc::context_switches).transpose()?;
        let upstream_before = self.upstream.cpu_time()?;
        let (pcpu_before, lcpu_before) = (CpuTimes::read(cpus.proxy)?, CpuTimes::read(cpus.load)?);
        let wrk_before = procfs::reaped_children_cpu_time()?;

        let wrk = self
            .load(target, conns, self.bench.settings.duration())
            .run()
            .await
            .with_context(|| {
                format!("{} at {conns} connections ({layout})", target_name(target))
            })?;

        let (pcpu, lcpu) = (CpuTimes::read(cpus.proxy)?, CpuTimes::read(cpus.load)?);
        let wrk_used = procfs::reaped_children_cpu_time()? - wrk_before;
        let upstream_used = self.upstream.cpu_time()? - upstream_before;
        let proxy_switches = match (proxy, switches_before) {
            (Some(p), Some(before)) => Some(
                p.context_switches()?.saturating_sub(before) as f64 / wrk.requests.max(1) as f64,
            ),
            _ => None,
        };
        let proxy_used = match (proxy, proxy_before) {
            (Some(p), Some(before)) => Some(p.cpu_time()? - before),
            _ => None,
        };
        let per_request = |d: Duration| d.as_secs_f64() * 1e6 / wrk.requests.max(1) as f64;
        let upstream_used = upstream_used.total();
        // Of the proxy CPU's busy time, what neither the proxy nor (in the
        // shared layout) the upstream used.
        let window =
            pcpu.total.saturating_sub(pcpu_before.total).max(1) as f64 / TICKS_PER_SEC as f64;
        let mut ours = proxy_used.unwrap_or_default().total().as_secs_f64();
        if layout == Layout::Shared {
            ours += upstream_used.as_secs_f64();
        }
        let busy = pcpu.busy_time_since(&pcpu_before).as_secs_f64();
        let mut load_ours = wrk_used.as_secs_f64();
        if layout == Layout::Split {
            load_ours += upstream_used.as_secs_f64();
        }
        Ok(Sample {
            round,
            wrk,
            proxy_cpu_us: proxy_used.map(|c| per_request(c.total())),
            proxy_kernel_cpu_us: proxy_used.map(|c| per_request(c.system)),
            proxy_switches_per_request: proxy_switches,
            upstream_cpu_us: per_request(upstream_used),
            proxy_cpu_busy: pcpu.busy_since(&pcpu_before),
            proxy_cpu_foreign: ((busy - ours) / window).clamp(0.0, 1.0),
            load_cpu_busy: lcpu.busy_since(&lcpu_before),
            load_cpu_ours: (load_ours / window).clamp(0.0, 1.0),
        })
    }
}

fn print_sample(
    round: usize,
    rounds: usize,
    layout: Layout,
    conns: usize,
    target: Target,
    s: &Sample,
) {
    println!(
        "   round {}/{rounds} {layout:<6} c{conns:<2} {:<6} {:>6.0} req/s  p50 {:>5} us  p99 {:>5} us  cpu/req {:>7} (kernel {:>7})  proxy cpu: busy {:>3.0}%, others {:>3.0}%; load cpu: busy {:>3.0}%, wrk+upstream {:>3.0}%",
        round + 1,
        target_name(target),
        s.wrk.rps(),
        s.wrk.p50_us,
        s.wrk.p99_us,
        s.proxy_cpu_us.map_or("-".into(), |c| format!("{c:.1} us")),
        s.proxy_kernel_cpu_us
            .map_or("-".into(), |c| format!("{c:.1} us")),
        s.proxy_cpu_busy * 100.0,
        s.proxy_cpu_foreign * 100.0,
        s.load_cpu_busy * 100.0,
        s.load_cpu_ours * 100.0,
    );
}

// === figures ===

/// Median over rounds of `f` for one target.
fn med(samples: &Samples, key: (Layout, usize, Target), f: impl Fn(&Sample) -> f64) -> f64 {
    let values: Vec<f64> = samples
        .get(&key)
        .map(|s| s.iter().map(&f).collect())
        .unwrap_or_default();
    median(&values)
}

/// Median over rounds of `f(a) - f(b)`, paired by round.
fn paired_difference(
    samples: &Samples,
    (a, b): ((Layout, usize, Target), (Layout, usize, Target)),
    f: impl Fn(&Sample) -> f64,
) -> f64 {
    let (Some(a), Some(b)) = (samples.get(&a), samples.get(&b)) else {
        return f64::NAN;
    };
    let values: Vec<f64> = a.iter().zip(b).map(|(a, b)| f(a) - f(b)).collect();
    median(&values)
}

/// A figure of mesh-proxy (median over rounds) against the same figure
/// of each baseline (median over rounds).
fn figure(
    samples: &Samples,
    name: String,
    unit: &str,
    (layout, conns): (Layout, usize),
    baselines: &[Target],
    f: impl Fn(&Sample) -> f64 + Copy,
) -> Figure {
    let mesh = (layout, conns, Target::Mesh);
    let mut figure = Figure::new(name, med(samples, mesh, f), unit);
    for &b in baselines {
        figure = figure.vs(target_name(b), med(samples, (layout, conns, b), f));
    }
    figure
}

fn figures(report: &mut Report, samples: &Samples, layout: Layout) {
    let both = [Target::Nginx, Target::Direct];
    let rps = |s: &Sample| s.wrk.rps();
    let p50 = |s: &Sample| s.wrk.p50_us as f64;
    let p99 = |s: &Sample| s.wrk.p99_us as f64;
    let (cpu, kernel) = (Sample::cpu, Sample::kernel);
    for conns in [16, 64] {
        let c = format!("dataplane.{layout}.c{conns}");
        let at = (layout, conns);
        let f = figure(
            samples,
            format!("{c}.requests_per_s"),
            "req/s",
            at,
            &both,
            rps,
        );
        let met = f.ratio("nginx").is_some_and(|r| r >= 1.2);
        report.add(f.bar(">= 1.2x nginx", met));
        report.add(figure(samples, format!("{c}.p50_us"), "us", at, &both, p50));
        let f = figure(samples, format!("{c}.p99_us"), "us", at, &both, p99);
        let met = f.ratio("nginx").is_some_and(|r| r <= 1.0);
        report.add(f.bar("<= 1.0x nginx", met));
        let nginx = [Target::Nginx];
        let f = figure(
            samples,
            format!("{c}.cpu_per_request_us"),
            "us",
            at,
            &nginx,
            cpu,
        );
        let met = f.ratio("nginx").is_some_and(|r| r <= 0.8);
        report.add(f.bar("<= 0.8x nginx", met));
        // How much of it is the kernel's: the part a proxy's own code
        // cannot shed (the same four socket calls per request either way).
        let name = format!("{c}.kernel_cpu_per_request_us");
        report.add(figure(samples, name, "us", at, &nginx, kernel));
        let switches = |s: &Sample| s.proxy_switches_per_request.unwrap_or(f64::NAN);
        let name = format!("{c}.context_switches_per_request");
        report.add(figure(samples, name, "", at, &nginx, switches));
        // The same with the upstream declared h2 (h2c): no bar, a
        // different protocol on the proxy's upstream side than nginx's.
        let h2 = |name: &str, unit: &str, f: &dyn Fn(&Sample) -> f64| {
            let of = |t: Target| med(samples, (layout, conns, t), f);
            Figure::new(format!("{c}.h2_upstream.{name}"), of(Target::MeshH2), unit)
                .vs("nginx", of(Target::Nginx))
                .vs("mesh", of(Target::Mesh))
        };
        report.add(h2("requests_per_s", "req/s", &rps));
        report.add(h2("p99_us", "us", &p99));
        report.add(h2("cpu_per_request_us", "us", &cpu));
        report.add(h2("kernel_cpu_per_request_us", "us", &kernel));
    }
    // At one connection: what a hop adds to the median over calling direct.
    let key = |t: Target| (layout, 1, t);
    let added = |t: Target| paired_difference(samples, (key(t), key(Target::Direct)), p50);
    let (mesh_added, nginx_added) = (added(Target::Mesh), added(Target::Nginx));
    let name = format!("dataplane.{layout}.c1.added_p50_us");
    let f = Figure::new(name, mesh_added, "us").vs("nginx", nginx_added);
    report.add(f.bar("<= 40 us", mesh_added <= 40.0));
    let c1 = (layout, 1);
    let name = format!("dataplane.{layout}.c1.cpu_per_request_us");
    report.add(figure(samples, name, "us", c1, &[Target::Nginx], cpu));
}

fn notes(bench: &mut Bench, samples: &Samples) {
    let cpus = bench.cpus;
    let report = &mut bench.report;
    report.note(format!(
        "data plane: mesh-proxy (workers 1) and nginx (1 worker) pinned to CPU {}, wrk (1 thread) to CPU {}; the upstream (1 thread) \
         on CPU {} in the split layout, on CPU {} in the shared one; access logs off in both (mesh-proxy without access_log, nginx access_log off); \
         GET / with Host: bench, routed by Host; figures are medians over rounds",
        cpus.proxy, cpus.load, cpus.load, cpus.proxy
    ));
    let proxied = |layout: Layout| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|((l, c, t), _)| *l == layout && *c > 1 && *t != Target::Direct)
            .flat_map(|(_, s)| s)
            .collect()
    };
    let all: Vec<f64> = samples
        .iter()
        .filter(|((_, c, t), _)| *c > 1 && *t != Target::Direct)
        .flat_map(|(_, s)| s.iter().map(|s| s.proxy_cpu_foreign))
        .collect();
    report.note(format!(
        "noise: other processes used a median {:.0}% (max {:.0}%) of the proxy CPU during the proxied 16/64-connection runs",
        median(&all) * 100.0,
        all.iter().copied().fold(0.0, f64::max) * 100.0
    ));
    // What the CPU bar leaves to user space: 0.8x nginx's whole CPU per
    // request, less the kernel's share of mesh-proxy's.
    for layout in bench.settings.layouts.clone() {
        for conns in [16, 64] {
            let of = |t: Target, f: fn(&Sample) -> f64| med(samples, (layout, conns, t), f);
            let (nginx, nginx_kernel) = (
                of(Target::Nginx, Sample::cpu),
                of(Target::Nginx, Sample::kernel),
            );
            let (mesh, mesh_kernel) = (
                of(Target::Mesh, Sample::cpu),
                of(Target::Mesh, Sample::kernel),
            );
            if nginx.is_nan() || mesh.is_nan() {
                continue;
            }
            report.note(format!(
                "{layout} c{conns}: CPU per request, user + kernel: mesh-proxy {:.1} + {mesh_kernel:.1} us, nginx {:.1} + {nginx_kernel:.1} us; \
                 the bar (<= 0.8x nginx = {:.1} us) leaves mesh-proxy {:.1} us of user-space CPU beside its kernel share",
                mesh - mesh_kernel,
                nginx - nginx_kernel,
                0.8 * nginx,
                0.8 * nginx - mesh_kernel,
            ));
        }
    }
    for layout in bench.settings.layouts.clone() {
        let runs = proxied(layout);
        let saturated = runs
            .iter()
            .filter(|s| s.load_cpu_ours > LOAD_SATURATED)
            .count();
        if saturated > 0 {
            bench.report.note(format!(
                "{layout} layout: in {saturated} of {} proxied 16/64-connection runs wrk (+ upstream) used over {:.0}% of the load CPU: \
                 their requests/s and latency may be bound by the load generator, not by the proxy",
                runs.len(),
                LOAD_SATURATED * 100.0
            ));
        }
    }
}
