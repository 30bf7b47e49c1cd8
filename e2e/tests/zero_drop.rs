//! Zero-drop changes (issue 3, point 8): ten route-policy changes applied
//! with SIGHUP under load fail no request, and a restart of the proxy
//! under load (a second process on the same ports with `SO_REUSEPORT`,
//! ready, then SIGTERM to the first) fails no request either.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{Load, LoadOptions, Mesh, MeshOptions, Node, eventually, load::median_max};
use nix::sys::signal::Signal;

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

fn proxy() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8888))
}

/// A config file the proxies are started with, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str) -> Self {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Self(dir.join(format!("meshwork-e2e-{name}-{}.toml", std::process::id())))
    }

    /// Replaces the file atomically (as config management tools do).
    fn write(&self, text: &str) -> Result<()> {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.0)?;
        Ok(())
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Ten valid route policies for `svc`, each different from the last.
const POLICIES: [&str; 10] = [
    "[routes.svc]\nlb = \"round-robin\"\nretries = 1",
    "[routes.svc]\nlb = \"least-request\"\ntimeout = \"10s\"",
    "[routes.svc]\nlb = \"p2c-ewma\"\nper_try_timeout = \"3s\"",
    "[default_route]\nretries = 3\n[routes.svc]\nlb = \"round-robin\"",
    "[routes.svc]\nmax_requests = 500\nmax_pending = 500",
    "[routes.svc]\noutlier_consecutive_failures = 3\nretry_budget_percent = 50.0",
    "[routes.svc]\nprotocol = \"http1\"\nlb = \"least-request\"",
    "[routes.svc]\ntimeout = \"8s\"\nretries = 2\nretry_non_idempotent = true",
    "[routes.svc]\nlb = \"round-robin\"\nmax_connections = 256",
    "[routes.svc]\nlb = \"p2c-ewma\"",
];

/// `mesh_proxy_config_reloads_total{outcome}` of a node's proxy.
async fn reloads(node: &Node, outcome: &str) -> Result<u64> {
    let text = node.proxy_admin("/metrics").await?.text();
    let prefix = format!("mesh_proxy_config_reloads_total{{outcome=\"{outcome}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_route_policy_changes_under_load_fail_no_request() {
    let config = ConfigFile::new("reload");
    config.write(POLICIES[9]).unwrap();
    let opts = MeshOptions {
        proxy_args: vec!["--config".into(), config.0.display().to_string()],
        ..MeshOptions::nodes(2)
    };
    let mut mesh = Mesh::start(opts).await.unwrap();
    policy_changes(&mut mesh, &config).await.unwrap();
    mesh.finish();
}

async fn policy_changes(mesh: &mut Mesh, config: &ConfigFile) -> Result<()> {
    mesh.nodes[0].serve("svc", "svc-1").await?;
    mesh.nodes[1].serve("svc", "svc-2").await?;
    mesh.nodes[1]
        .wait_answers("svc", &["svc-1", "svc-2"], CONVERGE)
        .await?;
    let load = Load::start(&mesh.nodes[1].ns, proxy(), "/svc/", LoadOptions::default());
    load.wait_more(300, Duration::from_secs(10)).await?;

    let pid = mesh.nodes[1].proxy.pid().context("the proxy runs")?;
    let hangup = || nix::sys::signal::kill(pid, Signal::SIGHUP).context("SIGHUP");
    let n2: &Node = &mesh.nodes[1];
    let mut took = Vec::new();
    for (k, policy) in POLICIES.iter().enumerate() {
        if k == 5 {
            // A bad file in the middle: refused, the last good kept.
            config.write("[routes.svc]\nlb = \"fastest\"")?;
            hangup()?;
            eventually(
                "the bad file is refused",
                Duration::from_secs(10),
                || async move {
                    ensure!(reloads(n2, "refused").await? == 1, "not yet");
                    Ok(())
                },
            )
            .await?;
        }
        config.write(policy)?;
        let sent = Instant::now();
        hangup()?;
        let want = k as u64 + 1;
        eventually(
            &format!("change {want} applied"),
            Duration::from_secs(10),
            || async move {
                ensure!(reloads(n2, "applied").await? >= want, "not yet");
                Ok(())
            },
        )
        .await?;
        took.push(sent.elapsed());
        load.wait_more(100, Duration::from_secs(10)).await?;
    }
    load.wait_more(300, Duration::from_secs(10)).await?;
    let report = load.stop().await;
    let (median, max) = median_max(&took);
    let log = n2.proxy.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("config reload refused"))
        .collect();
    println!(
        "10 route-policy changes (SIGHUP) + 1 bad file under load: applied in median {median:?}, max {max:?}; load: {}",
        report.summary()
    );
    ensure!(
        report.failures().is_empty(),
        "failed requests: {}",
        report.summary()
    );
    ensure!(refusals.len() == 1, "one refusal line: {refusals:?}");
    ensure!(refusals[0].contains("fastest"), "{}", refusals[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_restart_under_load_fails_no_request() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await.unwrap();
    restart(&mut mesh).await.unwrap();
    mesh.finish();
}

async fn restart(mesh: &mut Mesh) -> Result<()> {
    mesh.nodes[0].serve("svc", "svc-1").await?;
    mesh.nodes[0].serve("svc", "svc-2").await?;
    mesh.nodes[1]
        .wait_answers("svc", &["svc-1", "svc-2"], CONVERGE)
        .await?;
    let opts = LoadOptions {
        workers: 8,
        interval: Duration::from_millis(2),
        ..LoadOptions::default()
    };
    let load = Load::start(&mesh.nodes[1].ns, proxy(), "/svc/", opts);
    let fresh = FreshConnections::start(&mesh.nodes[1].ns);
    load.wait_more(500, Duration::from_secs(10)).await?;

    // The new binary: same flags, same ports, same data dir.
    let log = mesh.dir().join("n2-proxy-new.log");
    let old_pid = mesh.nodes[1]
        .proxy
        .pid()
        .context("the proxy runs")?
        .as_raw();
    let mut new = mesh.nodes[1].proxy.sibling("n2/proxy-new", log);
    new.start()?;
    let new_pid = new.pid().context("the new proxy runs")?.as_raw();
    let started = Instant::now();
    let n2: &Node = &mesh.nodes[1];
    // Ready: it listens only once its routing table is loaded, so its
    // answering the shared admin port at all means ready.
    eventually("the new proxy answers /routes", CONVERGE, || async move {
        let routes = n2.routes().await?;
        if routes["pid"] != new_pid {
            bail!("answered by pid {}", routes["pid"]);
        }
        Ok(())
    })
    .await?;
    let ready = started.elapsed();
    load.wait_more(500, Duration::from_secs(10)).await?;

    // SIGTERM to the old one; the new one takes every new connection.
    let n2 = &mut mesh.nodes[1];
    let mut old = std::mem::replace(&mut n2.proxy, new);
    let term = Instant::now();
    let status = old.stop().await?;
    let drained = term.elapsed();
    ensure!(
        status.is_some_and(|s| s.success()),
        "the old proxy exits 0 on SIGTERM: {status:?}\n{}",
        old.log_tail(20)
    );
    load.wait_more(2000, Duration::from_secs(20)).await?;
    let report = load.stop().await;
    let (fresh_total, fresh_failures) = fresh.stop().await;
    let after = report.after(term).count();
    let routes = n2.routes().await?;
    println!(
        "proxy restart under load: new process ready after {ready:?}, old one (pid {old_pid}) drained and exited {drained:?} after SIGTERM; \
         {after} requests after SIGTERM; load: {}; a caller with a new connection per request: {fresh_total} requests, {} failed {:?}",
        report.summary(),
        fresh_failures.len(),
        fresh_failures.iter().take(3).collect::<Vec<_>>()
    );
    ensure!(routes["pid"] == new_pid, "the new proxy serves: {routes}");
    ensure!(
        report.failures().is_empty(),
        "failed requests: {}",
        report.summary()
    );
    ensure!(
        fresh_failures.is_empty(),
        "failed fresh-connection requests: {fresh_failures:?}"
    );
    Ok(())
}

/// A caller that opens a new connection for every request (as `curl`
/// does), until stopped: the connections the kernel queues while the old
/// proxy closes its listener.
struct FreshConnections {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl FreshConnections {
    fn start(ns: &mesh_e2e::netns::Netns) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, flag) = (ns.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut total, mut failures) = (0, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && total < 50_000 {
                total += 1;
                match mesh_e2e::HttpClient::new(&ns, proxy()).get("/svc/").await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => failures.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (total, failures)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}
