//! mesh-monitor in a live mesh (a real 3-server Consul cluster, two nodes
//! with bridges and proxies, steady load through a proxy), as an operator
//! sees it: alerts over gRPC (`ListAlerts`), its webhook, Consul's checks,
//! the proxies' routing.
//!
//! - an instance stopped with SIGSTOP under load (it accepts connections
//!   and never answers) is flagged hung within 3 probe intervals, its
//!   check turns critical in Consul and the proxies stop routing to it;
//!   no request fails from then on. The monitor restarted meanwhile
//!   restores the open alert and does not send it again. SIGCONT: the
//!   instance is back in rotation and the alert is resolved, once;
//! - in another mesh, a 60 s clean run of normal traffic (a service
//!   writing its log, requests answered 200) raises no alert at all;
//!   then error lines appended to the service's log raise an alert
//!   within 2 windows, and the log rotated mid-test loses and repeats
//!   no line; then the route starts answering 500: a traffic anomaly
//!   alert within 30 s, and the access-log error-rate alert; both
//!   resolve when it answers 200 again.
//!
//! The rollout halted by the monitor's verdict is `monitor_gate.rs`.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{
    Load, LoadOptions, Mesh, MeshOptions, Node, eventually,
    http::HttpClient,
    monitor::{
        MonitorOptions, metric_sum, monitor_check, monitor_metrics, open_alerts, restart_monitor,
        start_monitor_with,
    },
    webhook::WebhookSink,
};
use mesh_proto::v1 as pb;

/// How long a change that is not timed may take to show.
const CONVERGE: Duration = Duration::from_secs(20);

/// The monitor's probe interval in the hang test (its default in the
/// harness: 1 s, 500 ms timeout, 2 misses make a verdict).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The webhook receiver's port on the monitor's node.
const SINK_PORT: u16 = 9700;

/// The window of the log rules.
const WINDOW: Duration = Duration::from_secs(5);

/// The clean run.
const CLEAN_RUN: Duration = Duration::from_secs(60);

/// How soon a failing route must raise a traffic alert.
const ANOMALY_WITHIN: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch, as alerts carry their times.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The open alert `key` of the monitor on `node`, if it is open.
async fn alert(node: &Node, key: &str) -> Result<Option<pb::Alert>> {
    Ok(open_alerts(node).await?.into_iter().find(|a| a.key == key))
}

/// Waits until the monitor on `node` has the alert `key` open; returns it.
async fn until_open(node: &Node, key: &str, deadline: Duration) -> Result<pb::Alert> {
    eventually(&format!("alert {key} is open"), deadline, || async {
        match alert(node, key).await? {
            Some(a) => Ok(a),
            None => bail!("open: {:?}", keys(&open_alerts(node).await?)),
        }
    })
    .await
}

/// Waits until the monitor on `node` has no alert `key` open.
async fn until_resolved(node: &Node, key: &str, deadline: Duration) -> Result<()> {
    eventually(&format!("alert {key} is resolved"), deadline, || async {
        match alert(node, key).await? {
            Some(a) => bail!("still open: {}", a.evidence),
            None => Ok(()),
        }
    })
    .await
}

fn keys(alerts: &[pb::Alert]) -> Vec<&str> {
    alerts.iter().map(|a| a.key.as_str()).collect()
}

/// The instance IDs `node`'s proxy routes `service` to.
async fn routed(node: &Node, service: &str) -> Result<Vec<String>> {
    let routes = node.routes().await?;
    Ok(routes["services"][service]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect())
}

/// Stops `node`'s proxy and starts it again with `env` added (the route
/// policies and access log its test needs); waits until it is live.
async fn restart_proxy_with(node: &mut Node, env: &[(&str, &Path)]) -> Result<()> {
    for (key, value) in env {
        node.proxy.set_env(*key, *value);
    }
    node.proxy.restart().await?;
    node.wait_proxy_live(CONVERGE).await
}

/// `PUT /_demo/answer` with `status` on instance `id` of `node`: every
/// request but its health check gets that status.
async fn answer_with(node: &Node, id: &str, status: u16) -> Result<()> {
    let Some(instance) = node.instances.get(id) else {
        bail!("{} has no instance {id}", node.name);
    };
    let resp = HttpClient::new(&node.ns, instance.addr)
        .put("/_demo/answer", status.to_string())
        .await?;
    ensure!(
        resp.status.is_success(),
        "PUT /_demo/answer {status} on {id}: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

fn proxy_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8888))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_instance_is_flagged_leaves_routing_and_returns_across_a_monitor_restart() {
    let opts = MeshOptions {
        reachable_bridges: true,
        ..MeshOptions::nodes(2)
    };
    let mut mesh = Mesh::start(opts).await.unwrap();
    // Callers on n2 bound each try (as a production route should), so a
    // request the hung instance swallows before the monitor acts is tried
    // again on the other.
    let routes = mesh.dir().join("n2-routes.toml");
    std::fs::write(
        &routes,
        "[routes.web]\nper_try_timeout = \"300ms\"\ntimeout = \"5s\"\n",
    )
    .unwrap();
    restart_proxy_with(&mut mesh.nodes[1], &[("MESH_CONFIG", &routes)])
        .await
        .unwrap();
    mesh.nodes[0].serve("web", "web-1").await.unwrap();
    mesh.nodes[0].serve("web", "web-2").await.unwrap();
    mesh.nodes[1]
        .wait_answers("web", &["web-1", "web-2"], CONVERGE)
        .await
        .unwrap();
    let sink = WebhookSink::start(
        &mesh.nodes[0].ns,
        SocketAddr::from((mesh.nodes[0].ip(), SINK_PORT)),
    )
    .await
    .unwrap();
    let monitor = MonitorOptions {
        services: vec!["web".into()],
        consul_checks: true,
        webhook: Some(sink.url().to_owned()),
        ..MonitorOptions::default()
    };
    start_monitor_with(&mut mesh, 0, &monitor).await.unwrap();
    for id in ["web-1", "web-2"] {
        eventually(
            &format!("the monitor's check on {id} passes"),
            CONVERGE,
            || async {
                match monitor_check(&mesh, "web", id)
                    .await?
                    .map(|(status, _)| status)
                {
                    Some(s) if s == "passing" => Ok(()),
                    other => bail!("{other:?}"),
                }
            },
        )
        .await
        .unwrap();
    }

    let load = Load::start(
        &mesh.nodes[1].ns,
        proxy_addr(),
        "/web/",
        LoadOptions {
            workers: 4,
            interval: Duration::from_millis(10),
            max_duration: Duration::from_secs(150),
            ..LoadOptions::default()
        },
    );
    load.wait_more(500, CONVERGE).await.unwrap();
    let (stopped_ms, stopped) = (now_ms(), Instant::now());
    mesh.nodes[0]
        .instance("web-2")
        .unwrap()
        .process
        .pause()
        .unwrap();

    // Flagged hung within 3 probe intervals, by the alert's own start.
    let key = "hung/n1/web-2";
    let hung = until_open(&mesh.nodes[0], key, CONVERGE).await.unwrap();
    let flagged = Duration::from_millis(hung.started_at_ms.saturating_sub(stopped_ms));
    assert!(
        flagged <= 3 * PROBE_INTERVAL,
        "flagged hung {flagged:?} after SIGSTOP, more than 3 probe intervals: {hung:?}"
    );
    assert_eq!(hung.severity, pb::Severity::Critical as i32, "{hung:?}");
    let detected = stopped + flagged;
    // Out of routing without anyone acting: critical in Consul, gone from
    // the calling proxy's table.
    eventually("web-2's check is critical in Consul", CONVERGE, || async {
        match monitor_check(&mesh, "web", "web-2")
            .await?
            .map(|(status, _)| status)
        {
            Some(s) if s == "critical" => Ok(()),
            other => bail!("{other:?}"),
        }
    })
    .await
    .unwrap();
    eventually("n2's proxy no longer routes to web-2", CONVERGE, || async {
        let ids = routed(&mesh.nodes[1], "web").await?;
        ensure!(ids == ["web-1"], "routes web to {ids:?}");
        Ok(())
    })
    .await
    .unwrap();
    eventually("the webhook hears the alert open", CONVERGE, || async {
        let events = sink.events_for(key);
        ensure!(events == ["open"], "{events:?}");
        Ok(())
    })
    .await
    .unwrap();

    // A restart restores the alert (same start) and sends nothing again:
    // the restarted monitor has probed web-2 several times, still hung.
    restart_monitor(&mut mesh.nodes[0]).await.unwrap();
    let restored = until_open(&mesh.nodes[0], key, CONVERGE).await.unwrap();
    assert_eq!(restored.started_at_ms, hung.started_at_ms, "{restored:?}");
    eventually(
        "the restarted monitor probes web-2 hung again",
        CONVERGE,
        || async {
            let text = monitor_metrics(&mesh.nodes[0]).await?;
            let probes = metric_sum(&text, "mesh_monitor_probes_total", &["outcome=\"hung\""]);
            ensure!(probes >= 3.0, "{probes} hung probes since the restart");
            Ok(())
        },
    )
    .await
    .unwrap();
    assert_eq!(sink.events_for(key), ["open"], "{:?}", sink.bodies());
    load.wait_more(300, CONVERGE).await.unwrap();

    // SIGCONT: back in rotation, the alert resolved, once.
    let resumed = Instant::now();
    mesh.nodes[0]
        .instance("web-2")
        .unwrap()
        .process
        .resume()
        .unwrap();
    until_resolved(&mesh.nodes[0], key, CONVERGE).await.unwrap();
    eventually("n2's proxy routes to web-2 again", CONVERGE, || async {
        let mut ids = routed(&mesh.nodes[1], "web").await?;
        ids.sort();
        ensure!(ids == ["web-1", "web-2"], "routes web to {ids:?}");
        Ok(())
    })
    .await
    .unwrap();
    eventually("web-2 answers the load again", CONVERGE, || async {
        let back = load.report().last_from("web-2");
        ensure!(back.is_some_and(|t| t > resumed), "not since SIGCONT");
        Ok(())
    })
    .await
    .unwrap();
    eventually("the webhook hears the alert resolved", CONVERGE, || async {
        let events = sink.events_for(key);
        ensure!(events == ["open", "resolved"], "{events:?}");
        Ok(())
    })
    .await
    .unwrap();
    let report = load.stop().await;
    let failed_after: Vec<_> = report.after(detected).filter(|s| !s.ok()).collect();
    println!(
        "hung instance: flagged {flagged:?} after SIGSTOP; {} failed after detection, {} in all; load: {}",
        failed_after.len(),
        report.failures().len(),
        report.summary()
    );
    assert!(
        failed_after.is_empty(),
        "requests failed after the monitor flagged web-2: {}",
        report.summary()
    );
    mesh.finish();
}

/// A service's log as the service writes it: lines appended, each error
/// counted.
struct ServiceLog {
    path: PathBuf,
    file: File,
    errors: u64,
    lines: u64,
}

impl ServiceLog {
    fn create(path: PathBuf) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok(Self {
            path,
            file,
            errors: 0,
            lines: 0,
        })
    }

    fn info(&mut self) -> Result<()> {
        self.lines += 1;
        writeln!(self.file, "INFO request {} served", self.lines)?;
        Ok(())
    }

    fn errors(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.lines += 1;
            self.errors += 1;
            writeln!(
                self.file,
                "ERROR request {} failed: upstream reset",
                self.lines
            )?;
        }
        Ok(())
    }

    /// Rotation by rename, as logrotate does it: the file moves to
    /// `<name>.1`, the service keeps writing to the moved file for a while
    /// (`late` more errors), then reopens its path, a new file.
    fn rotate(&mut self, late: u64) -> Result<()> {
        let mut moved = self.path.clone().into_os_string();
        moved.push(".1");
        std::fs::rename(&self.path, &moved)?;
        self.errors(late)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_raises_nothing_then_log_errors_and_failing_requests_alert() {
    let opts = MeshOptions {
        reachable_bridges: true,
        ..MeshOptions::nodes(2)
    };
    let mut mesh = Mesh::start(opts).await.unwrap();
    let dir = mesh.dir().to_path_buf();
    let access_log = dir.join("n2-access.log");
    restart_proxy_with(&mut mesh.nodes[1], &[("MESH_ACCESS_LOG", &access_log)])
        .await
        .unwrap();
    mesh.nodes[0].serve("shop", "shop-1").await.unwrap();
    mesh.nodes[1]
        .wait_answers("shop", &["shop-1"], CONVERGE)
        .await
        .unwrap();
    let logs = dir.join("shop-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut service_log = ServiceLog::create(logs.join("app.log")).unwrap();
    // Files that exist when the monitor starts are read from their end:
    // the access log already holds the 503s of the requests that found
    // shop not yet routed, before this test's traffic.
    let config = dir.join("monitor.toml");
    std::fs::write(
        &config,
        format!(
            r#"[logs]
poll_interval = "100ms"
rescan_interval = "200ms"
rotate_wait = "3s"
start_at = "end"
state_file = "{state}"

[[logs.patterns]]
name = "shop-errors"
files = "{logs}/*.log"
pattern = "ERROR"
threshold = 3
window = "{window}s"

[[logs.error_rates]]
name = "shop-5xx"
files = "{access}"
window = "{window}s"
threshold = 0.2
min_requests = 20
direction = "outbound"
"#,
            state = dir.join("monitor-logs.json").display(),
            logs = logs.display(),
            access = access_log.display(),
            window = WINDOW.as_secs(),
        ),
    )
    .unwrap();
    let sink = WebhookSink::start(
        &mesh.nodes[1].ns,
        SocketAddr::from((mesh.nodes[1].ip(), SINK_PORT)),
    )
    .await
    .unwrap();
    // Probes are not what this test is about: a slow threshold the shared
    // machine's hiccups do not reach, and a p99 floor likewise; 5xx,
    // timeouts and request-rate drops keep their defaults.
    let monitor = MonitorOptions {
        services: vec!["shop".into()],
        consul_checks: true,
        webhook: Some(sink.url().to_owned()),
        config: Some(config),
        args: [
            "--interval",
            "3s",
            "--timeout",
            "2s",
            "--slow-threshold",
            "1s",
            "--traffic-interval",
            "2s",
            "--traffic-warmup-rounds",
            "5",
            "--traffic-p99-floor",
            "1s",
        ]
        .map(str::to_owned)
        .into(),
    };
    start_monitor_with(&mut mesh, 1, &monitor).await.unwrap();
    let n2 = &mesh.nodes[1];

    // A clean run: requests answered 200, the service logging them.
    let load = Load::start(
        &n2.ns,
        proxy_addr(),
        "/shop/",
        LoadOptions {
            workers: 2,
            interval: Duration::from_millis(10),
            max_duration: Duration::from_secs(240),
            max_requests: 100_000,
            ..LoadOptions::default()
        },
    );
    let clean = Instant::now();
    while clean.elapsed() < CLEAN_RUN {
        for _ in 0..5 {
            service_log.info().unwrap();
        }
        let open = open_alerts(n2).await.unwrap();
        assert!(
            open.is_empty(),
            "alerts during a clean run, {:?} in: {open:?}",
            clean.elapsed()
        );
        assert!(sink.bodies().is_empty(), "{:?}", sink.bodies());
        // The pace of the service's log and of the check: input, not a
        // wait for the monitor.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = monitor_metrics(n2).await.unwrap();
    let scrapes = metric_sum(
        &text,
        "mesh_monitor_traffic_scrapes_total",
        &["result=\"ok\""],
    );
    let opened = metric_sum(&text, "mesh_monitor_alerts_opened_total", &[]);
    let read = metric_sum(&text, "mesh_monitor_log_lines_total", &[]);
    println!(
        "clean run: {} requests, {scrapes} proxy metric reads, {read} log lines read, {opened} alerts",
        load.count()
    );
    // The monitor did watch: every node's proxy read each round, the log
    // and the access log tailed.
    assert!(
        scrapes >= 40.0,
        "{scrapes} proxy metric reads in {CLEAN_RUN:?}"
    );
    assert!(read >= service_log.lines as f64, "{read} log lines read");
    assert_eq!(opened, 0.0, "{text}");
    assert!(
        load.report().failures().is_empty(),
        "{}",
        load.report().summary()
    );

    // Error lines: an alert within two windows.
    let wrote = Instant::now();
    service_log.errors(3).unwrap();
    let log_key = format!("log:shop-errors:{}", service_log.path.display());
    let opened = until_open(n2, &log_key, 2 * WINDOW).await;
    let took = wrote.elapsed();
    let opened = opened.unwrap();
    println!("log alert after {took:?}: {}", opened.evidence);
    // Rotated mid-test, by rename, while errors go on: every error line
    // counted once.
    service_log.errors(2).unwrap();
    service_log.rotate(2).unwrap();
    service_log.errors(3).unwrap();
    service_log.info().unwrap();
    let errors = service_log.errors as f64;
    let counted = || async {
        let text = monitor_metrics(n2).await?;
        Ok::<_, anyhow::Error>(metric_sum(
            &text,
            "mesh_monitor_log_matches_total",
            &["rule=\"shop-errors\""],
        ))
    };
    eventually("every error line is counted", CONVERGE, || async {
        let n = counted().await?;
        ensure!(n == errors, "{n} of {errors} error lines counted");
        Ok(())
    })
    .await
    .unwrap();
    // No more errors: resolved after its window, one open and one resolve.
    until_resolved(n2, &log_key, 3 * WINDOW).await.unwrap();
    eventually(
        "the webhook hears open, then resolved",
        CONVERGE,
        || async {
            let events = sink.events_for(&log_key);
            ensure!(events == ["open", "resolved"], "{events:?}");
            Ok(())
        },
    )
    .await
    .unwrap();

    // The route fails: a traffic anomaly within 30 s, and the access log's
    // error rate.
    let failing = Instant::now();
    answer_with(&mesh.nodes[0], "shop-1", 500).await.unwrap();
    let traffic_key = "traffic:5xx_rate:n2/shop";
    let anomaly = until_open(n2, traffic_key, ANOMALY_WITHIN).await.unwrap();
    println!(
        "traffic alert after {:?}: {}",
        failing.elapsed(),
        anomaly.evidence
    );
    assert_eq!(
        anomaly.severity,
        pb::Severity::Critical as i32,
        "{anomaly:?}"
    );
    until_open(n2, "log:shop-5xx:shop", ANOMALY_WITHIN)
        .await
        .unwrap();
    answer_with(&mesh.nodes[0], "shop-1", 200).await.unwrap();
    for key in [traffic_key, "log:shop-5xx:shop"] {
        until_resolved(n2, key, ANOMALY_WITHIN).await.unwrap();
        eventually(
            &format!("the webhook hears {key} open, then resolved"),
            CONVERGE,
            || async {
                let events = sink.events_for(key);
                ensure!(events == ["open", "resolved"], "{events:?}");
                Ok(())
            },
        )
        .await
        .unwrap();
    }
    // Still every error line counted once, long after the rotation.
    assert_eq!(counted().await.unwrap(), errors);
    let report = load.stop().await;
    println!("load: {}", report.summary());
    mesh.finish();
}
