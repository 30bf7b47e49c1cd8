//! mesh-monitor's log alerts against a real Consul dev agent: a pattern
//! rule (3 matches within 2s) on a log file opens exactly one alert within
//! two windows, follows the file through a rotation by rename without
//! losing or repeating a line, is not sent again across a monitor restart,
//! and is resolved once when the errors stop.

#![allow(clippy::unwrap_used)]

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use axum::{Json, Router, extract::State, routing::post};
use consul_client::{Client, ClientConfig, QueryOptions, testing::DevAgent};
use mesh_monitor::{
    Args, Config, Monitor,
    logs::{LogsConfig, config::PatternRuleConfig, tail::StartAt},
};
use mesh_runtime::{duration::HumanDuration, metrics::Registry};
use serde_json::Value;
use tokio::net::TcpListener;

const WINDOW: Duration = Duration::from_secs(2);
/// Long enough for anything that does not depend on the window.
const DEADLINE: Duration = Duration::from_secs(20);
/// Time between two error lines while the errors go on: 3 per window and
/// more, so the rule keeps firing.
const PACE: Duration = Duration::from_millis(150);
const MATCHES: &str = "mesh_monitor_log_matches_total{rule=\"errors\"}";
const LINES: &str = "mesh_monitor_log_lines_total";

/// A webhook receiver keeping every body it was sent.
async fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State(seen): State<Arc<Mutex<Vec<Value>>>>, Json(body): Json<Value>| async move {
                    seen.lock().unwrap().push(body);
                },
            ),
        )
        .with_state(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn monitor_config(consul: &DevAgent, hook: &str, dir: &Path) -> Result<Config> {
    let logs = LogsConfig {
        poll_interval: Some(HumanDuration(Duration::from_millis(100))),
        rescan_interval: Some(HumanDuration(Duration::from_millis(200))),
        rotate_wait: Some(HumanDuration(Duration::from_secs(1))),
        start_at: Some(StartAt::Beginning),
        state_file: Some(dir.join("offsets.json")),
        patterns: vec![PatternRuleConfig {
            name: "errors".into(),
            files: dir.join("app.log").to_str().unwrap().into(),
            pattern: "ERROR".into(),
            regex: false,
            threshold: 3,
            window: HumanDuration(WINDOW),
            severity: None,
        }],
        ..LogsConfig::default()
    };
    Args {
        node: Some("monitor-node".into()),
        consul_addr: vec![consul.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        consul_checks: Some(false),
        webhook_url: Some(hook.into()),
        logs: Some(logs),
        ..Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)
}

/// Polls until the webhook got `n` events, at most `within`.
async fn until_events(seen: &Mutex<Vec<Value>>, n: usize, within: Duration) -> Result<Vec<Value>> {
    let deadline = Instant::now() + within;
    loop {
        let events = seen.lock().unwrap().clone();
        if events.len() >= n {
            return Ok(events);
        }
        if Instant::now() > deadline {
            bail!("the webhook got {events:?} after {within:?}, expected {n} events");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(monitor: &Monitor) -> Result<String> {
    let url = format!("http://{}/metrics", monitor.admin_addr());
    Ok(reqwest::get(url).await?.text().await?)
}

/// The value of the sample `line_start` (`name{labels}`) in `text`.
fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls the monitor's `/metrics` until `name` is `want`.
async fn until_sample(monitor: &Monitor, name: &str, want: f64) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = metrics(monitor).await?;
        if sample(&text, name) == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} is not {want}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often a log rule started firing, by `/metrics`.
fn firings(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("mesh_monitor_log_rule_changes_total{"))
        .filter(|l| l.contains("rule=\"errors\"") && l.contains("state=\"firing\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The log file as a program writes it: lines appended, counted.
struct Writer {
    file: File,
    errors: u64,
    lines: u64,
    /// When the last line was written.
    last: Instant,
}

impl Writer {
    fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file,
            errors: 0,
            lines: 0,
            last: Instant::now(),
        })
    }

    /// One error line and one that does not match, at once.
    fn error(&mut self) -> Result<()> {
        self.errors += 1;
        self.lines += 2;
        let n = self.errors;
        writeln!(
            self.file,
            "INFO request {n} served\nERROR request {n} failed"
        )?;
        self.last = Instant::now();
        Ok(())
    }

    /// Error lines at [`PACE`] (the pace is the test's input, not a wait
    /// for the monitor).
    async fn errors(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            self.error()?;
            tokio::time::sleep(PACE).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_rule_alerts_once_through_rotation_and_restart() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let consul = DevAgent::start().await;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("app.log");
    let mut writer = Writer::open(&log)?;
    let (hook, seen) = webhook().await;
    let config = monitor_config(&consul, &hook, dir.path())?;
    let monitor = Monitor::start(&config, Registry::new()).await?;
    let key = format!("log:errors:{}", log.display());

    // Three errors at once: one open within two windows.
    for _ in 0..3 {
        writer.error()?;
    }
    let events = until_events(&seen, 1, 2 * WINDOW).await?;
    assert_eq!(events[0]["event"], "open");
    let alert = &events[0]["alert"];
    assert_eq!(alert["key"], key.as_str());
    assert_eq!(alert["kind"], "log");
    assert_eq!(alert["rule"], "errors");
    assert_eq!(alert["severity"], "warning");
    let evidence = alert["evidence"].as_str().unwrap();
    assert!(
        evidence.starts_with("3 lines matching \"ERROR\" within 2s"),
        "{evidence}"
    );
    assert_eq!(
        alert["lines"],
        serde_json::json!([
            "ERROR request 1 failed",
            "ERROR request 2 failed",
            "ERROR request 3 failed"
        ])
    );

    // Errors go on; the file is rotated by rename while the program still
    // writes to it, then it writes to a new file of the old name.
    writer.errors(5).await?;
    std::fs::rename(&log, dir.path().join("app.log.1"))?;
    writer.errors(3).await?;
    let rotated = Writer::open(&log)?;
    writer.file = rotated.file;
    writer.errors(5).await?;
    // Every line read once: 16 errors, 32 lines.
    until_sample(&monitor, MATCHES, writer.errors as f64).await?;
    until_sample(&monitor, LINES, writer.lines as f64).await?;
    assert_eq!(seen.lock().unwrap().len(), 1, "still the one alert");

    // A restart while it fires: open again, not sent again; the new run
    // reads on from where the last one stopped.
    ensure!(
        monitor.shutdown(Duration::from_secs(5)).await,
        "monitor drained"
    );
    let before = (writer.errors, writer.lines);
    let monitor = Monitor::start(&config, Registry::new()).await?;
    writer.errors(10).await?;
    until_sample(&monitor, MATCHES, (writer.errors - before.0) as f64).await?;
    until_sample(&monitor, LINES, (writer.lines - before.1) as f64).await?;
    let text = metrics(&monitor).await?;
    assert_eq!(firings(&text), 1.0, "the rule fired again: {text}");
    let open = monitor.alerts().open_alerts();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(
        open[0].started_at_ms,
        events[0]["alert"]["started_at_ms"].as_u64().unwrap(),
        "the same alert"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the open alert was not sent again"
    );

    // The errors stop: one resolve, after a window without a match.
    let events = until_events(&seen, 2, DEADLINE).await?;
    assert!(writer.last.elapsed() >= WINDOW, "not before a quiet window");
    assert_eq!(events[1]["event"], "resolved");
    assert_eq!(events[1]["alert"]["key"], key.as_str());
    let evidence = events[1]["alert"]["evidence"].as_str().unwrap();
    assert!(
        evidence.starts_with("no line matching \"ERROR\" within 2s"),
        "{evidence}"
    );
    let api = Client::new(&ClientConfig::new([consul.addr()]))?;
    let deadline = Instant::now() + DEADLINE;
    while !api
        .kv_list("mesh/monitor/alerts/", QueryOptions::default())
        .await?
        .value
        .is_empty()
    {
        ensure!(Instant::now() < deadline, "the resolved alert left KV");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "exactly one open and one resolve"
    );
    let text = metrics(&monitor).await?;
    assert_eq!(
        sample(&text, MATCHES),
        (writer.errors - before.0) as f64,
        "no line read twice: {text}"
    );
    monitor.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
