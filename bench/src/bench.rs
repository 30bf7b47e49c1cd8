//! A benchmark run: the tools it drives, the two CPUs it splits the data
//! plane over (the proxy's and the load generator's), the upstream every
//! phase sends to, mesh-proxy and mesh-bridge as the phases start them,
//! the phases in order, and the report.
//!
//! A phase that fails is reported and the others still run; the JSON goes
//! to the `--out` file only when every phase succeeded.

use std::{
    env,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use consul_client::testing::free_port;
use nix::{sched::sched_getaffinity, unistd::Pid};

use crate::{
    dataplane, fanout,
    http::Client,
    memory,
    process::Proc,
    propagation,
    report::Report,
    settings::{Phase, Settings},
};

/// A run in progress.
#[derive(Debug)]
pub struct Bench {
    /// What to measure.
    pub settings: Settings,
    /// Where the programs are.
    pub tools: Tools,
    /// Which CPU does what.
    pub cpus: Cpus,
    /// What was found so far.
    pub report: Report,
    upstream: Option<(Proc, SocketAddr)>,
}

/// The programs a run drives.
#[derive(Clone, Debug)]
pub struct Tools {
    /// nginx.
    pub nginx: PathBuf,
    /// wrk.
    pub wrk: PathBuf,
    /// Consul, needed by the propagation and fan-out phases.
    pub consul: Option<PathBuf>,
    /// The release mesh-proxy.
    pub proxy: PathBuf,
    /// The release mesh-bridge.
    pub bridge: PathBuf,
    /// The bench's upstream server.
    pub upstream: PathBuf,
}

/// The CPUs of the data plane: the proxy under test (mesh-proxy or nginx)
/// on one, the load generator on the other; the upstream joins one or the
/// other as the layout says.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    /// The proxy's CPU.
    pub proxy: usize,
    /// wrk's CPU (and the upstream's, outside the data plane's shared layout).
    pub load: usize,
}

/// A running mesh-bridge.
#[derive(Debug)]
pub struct MeshBridge {
    /// The process.
    pub proc: Proc,
    /// Its gRPC listener.
    pub grpc: SocketAddr,
}

/// A running mesh-proxy.
#[derive(Debug)]
pub struct MeshProxy {
    /// The process.
    pub proc: Proc,
    /// Its outbound listener.
    pub listen: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// Its data folder (routing dump, queue).
    pub data_dir: PathBuf,
}

// === impl Bench ===

impl Bench {
    /// Finds the tools and the CPUs; fails with advice when one is missing.
    pub fn new(settings: Settings) -> Result<Self> {
        std::fs::create_dir_all(&settings.work)
            .with_context(|| format!("create {}", settings.work.display()))?;
        let tools = Tools::find(&settings)?;
        let cpus = Cpus::pick()?;
        let report = Report {
            machine: machine(&tools, cpus),
            settings: settings_summary(&settings),
            ..Report::default()
        };
        Ok(Self {
            settings,
            tools,
            cpus,
            report,
            upstream: None,
        })
    }

    /// Runs every phase asked for and writes the report; fails when a
    /// phase did.
    pub async fn run(mut self) -> Result<Report> {
        let started = Instant::now();
        let mut failed = Vec::new();
        for phase in [
            Phase::Dataplane,
            Phase::Memory,
            Phase::Propagation,
            Phase::Fanout,
        ] {
            if !self.settings.runs(phase) {
                continue;
            }
            println!("== {phase}");
            let t = Instant::now();
            let result = match phase {
                Phase::Dataplane => dataplane::run(&mut self).await,
                Phase::Memory => memory::run(&mut self).await,
                Phase::Propagation => propagation::run(&mut self).await,
                Phase::Fanout => fanout::run(&mut self).await,
            };
            match result {
                Ok(()) => println!("== {phase} done in {:.0}s", t.elapsed().as_secs_f64()),
                Err(e) => {
                    eprintln!("== {phase} FAILED: {e:#}");
                    self.report.note(format!("phase {phase} failed: {e:#}"));
                    failed.push(phase.to_string());
                }
            }
        }
        self.upstream = None;
        self.report.elapsed_s = started.elapsed().as_secs_f64();
        let (met, bars) = self.report.bars();
        println!(
            "== bars met: {met} of {bars}; measured in {:.0}s",
            self.report.elapsed_s
        );
        let out = if failed.is_empty() {
            self.settings.out.clone()
        } else {
            self.settings.out.with_file_name("failed.json")
        };
        self.report.write(&out)?;
        println!("== summary written to {}", out.display());
        if !failed.is_empty() {
            bail!("phases failed: {}", failed.join(", "));
        }
        Ok(self.report)
    }

    /// A folder for one phase's files, created empty.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.settings.work.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The upstream's address, started on first use on the load CPU.
    pub async fn upstream(&mut self) -> Result<SocketAddr> {
        if let Some((_, addr)) = &self.upstream {
            return Ok(*addr);
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir = self.dir("upstream")?;
        let mut proc = Proc::spawn(
            "bench-upstream",
            &self.tools.upstream,
            ["--listen".to_owned(), addr.to_string()],
            Some(self.cpus.load),
            &dir,
            &[],
        )?;
        let mut client = Client::new(addr);
        wait_ok(
            "the upstream to answer",
            Duration::from_secs(10),
            &mut client,
            ("bench", "/"),
            || proc.check(),
        )
        .await?;
        self.upstream = Some((proc, addr));
        Ok(addr)
    }

    /// The upstream's process, once started.
    pub fn upstream_proc(&self) -> Option<&Proc> {
        self.upstream.as_ref().map(|(p, _)| p)
    }

    /// The consul binary, or why there is none.
    pub fn consul(&self) -> Result<&Path> {
        self.tools.consul.as_deref().ok_or_else(|| {
            anyhow!("consul not found: run deploy/scripts/install-consul.sh or pass --consul")
        })
    }
}

/// Polls `GET path` (with `Host: host`) until it answers 2xx, checking
/// `alive` (the process that should answer) before each try.
pub async fn wait_ok(
    what: &str,
    within: Duration,
    client: &mut Client,
    (host, path): (&str, &str),
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        alive()?;
        let last = match client.get(host, path).await {
            Ok(r) if r.status.is_success() => return Ok(()),
            Ok(r) => format!("status {}", r.status),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("waited {within:?} for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === impl Tools ===

impl Tools {
    fn find(settings: &Settings) -> Result<Self> {
        let bin_dir = match &settings.bin_dir {
            Some(d) => d.clone(),
            None => env::current_exe()?
                .parent()
                .context("the bench binary has a folder")?
                .to_owned(),
        };
        let built = |name: &str| -> Result<PathBuf> {
            let p = bin_dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} not found: cargo build --release -p mesh-proxy -p mesh-registry-bridge -p mesh-bench",
                    p.display()
                )
            }
        };
        let installed = |name: &str, extra: &[&str]| -> Result<PathBuf> {
            on_path(name, extra).ok_or_else(|| {
                anyhow!("{name} not found: apt-get install --no-install-recommends nginx wrk (bench/run.sh does)")
            })
        };
        let home_consul =
            env::var_os("HOME").map(|h| Path::new(&h).join(".local/share/meshwork/bin/consul"));
        let consul = settings
            .consul
            .clone()
            .or_else(|| on_path("consul", &[]).or_else(|| home_consul.filter(|p| p.is_file())));
        Ok(Self {
            nginx: installed("nginx", &["/usr/sbin/nginx"])?,
            wrk: installed("wrk", &[])?,
            consul,
            proxy: built("mesh-proxy")?,
            bridge: built("mesh-bridge")?,
            upstream: built("bench-upstream")?,
        })
    }
}

fn on_path(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

// === impl Cpus ===

impl Cpus {
    /// The first two CPUs this process may run on.
    fn pick() -> Result<Self> {
        let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        match allowed[..] {
            [load, proxy, ..] => Ok(Self { proxy, load }),
            _ => bail!(
                "the data-plane benchmark needs 2 CPUs (one for the proxy, one for the load); this process may use {allowed:?}"
            ),
        }
    }
}

/// The settings as the report shows them.
fn settings_summary(s: &Settings) -> std::collections::BTreeMap<String, serde_json::Value> {
    let phases: Vec<String> = s.phases.iter().map(ToString::to_string).collect();
    let layouts: Vec<String> = s.layouts.iter().map(ToString::to_string).collect();
    serde_json::json!({
        "phases": phases,
        "layouts": layouts,
        "duration_s": s.duration_secs,
        "rounds": s.rounds,
        "propagation_n": s.propagation_n,
        "services": s.services,
        "instances": s.instances,
        "subscribers": s.subscribers,
        "changes": s.changes,
    })
    .as_object()
    .map(|o| o.clone().into_iter().collect())
    .unwrap_or_default()
}

/// What the report says of the machine and the tools.
fn machine(tools: &Tools, cpus: Cpus) -> std::collections::BTreeMap<String, String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let version = |bin: &Path, arg: &str| -> String {
        Command::new(bin)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_default()
    };
    let mut m = std::collections::BTreeMap::new();
    m.insert("cpu_model".into(), model);
    m.insert(
        "cpus_online".into(),
        read("/sys/devices/system/cpu/online").trim().to_owned(),
    );
    m.insert(
        "kernel".into(),
        read("/proc/sys/kernel/osrelease").trim().to_owned(),
    );
    m.insert(
        "loadavg_at_start".into(),
        read("/proc/loadavg").trim().to_owned(),
    );
    m.insert("proxy_cpu".into(), cpus.proxy.to_string());
    m.insert("load_cpu".into(), cpus.load.to_string());
    m.insert("nginx".into(), version(&tools.nginx, "-v"));
    m.insert("wrk".into(), version(&tools.wrk, "-v"));
    if let Some(consul) = &tools.consul {
        m.insert("consul".into(), version(consul, "version"));
    }
    m
}

// === impl MeshProxy ===

impl MeshProxy {
    /// Starts the release mesh-proxy on free ports, fed by the bridge at
    /// `bridge_url`, pinned to `cpu` when given; waits until it is ready
    /// (a routing table loaded).
    pub async fn start(
        bench: &Bench,
        name: &str,
        bridge_url: &str,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let dir = bench.dir(name)?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let data_dir = dir.join("data");
        let mut args = vec![
            "--node".to_owned(),
            "bench".into(),
            "--listen".into(),
            listen.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--bridge-addr".into(),
            bridge_url.to_owned(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--log-format".into(),
            "text".into(),
        ];
        if cpu.is_some() {
            // One worker for the one CPU, as nginx runs one: what the
            // default picks from the affinity, said outright.
            args.extend(["--workers".to_owned(), "1".into()]);
        }
        let mut proc = Proc::spawn(name, &bench.tools.proxy, args, cpu, &dir, &[])?;
        let mut client = Client::new(admin);
        wait_ok(
            &format!("{name} to be ready"),
            Duration::from_secs(30),
            &mut client,
            ("localhost", "/ready"),
            || proc.check(),
        )
        .await?;
        Ok(Self {
            proc,
            listen,
            admin,
            data_dir,
        })
    }

    /// Waits up to `within` for the routing dump to be on disk: the table
    /// is loaded and the work that follows a new table is done. `false`
    /// when none came.
    pub async fn wait_dump(&mut self, within: Duration) -> Result<bool> {
        let dump = self.data_dir.join("routes.dump");
        let deadline = tokio::time::Instant::now() + within;
        while !dump.is_file() {
            self.proc.check()?;
            if tokio::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(true)
    }
}

// === impl MeshBridge ===

impl MeshBridge {
    /// Starts the release mesh-bridge on free ports, watching the Consul
    /// agent at `consul_url`; waits until it is ready.
    pub async fn start(bench: &Bench, name: &str, consul_url: &str) -> Result<Self> {
        let dir = bench.dir(name)?;
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let args = [
            "--node".to_owned(),
            "bench".into(),
            "--consul-addr".into(),
            consul_url.to_owned(),
            "--grpc-listen".into(),
            grpc.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--log-format".into(),
            "text".into(),
        ];
        let mut proc = Proc::spawn(name, &bench.tools.bridge, args, None, &dir, &[])?;
        let mut client = Client::new(admin);
        wait_ok(
            &format!("{name} to be ready"),
            Duration::from_secs(30),
            &mut client,
            ("localhost", "/ready"),
            || proc.check(),
        )
        .await?;
        Ok(Self { proc, grpc })
    }

    /// The URL proxies and subscribers connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}
