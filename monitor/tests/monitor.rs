//! mesh-monitor against a real Consul dev agent and a real mesh-bridge:
//! an instance that hangs turns critical in Consul (and leaves routing)
//! within three probe intervals and passing again when it answers; the
//! webhook hears exactly one open and one resolve, also across a monitor
//! restart in between.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use axum::{Json, Router, extract::State, routing::post};
use consul_client::{
    AgentServiceRegistration, Client, ClientConfig, QueryOptions, testing::DevAgent,
};
use mesh_monitor::{Args, Config, Monitor};
use mesh_proto::v1::{
    AlertEvent, ListAlertsRequest, VerdictRequest, WatchAlertsRequest, alert_event::Type,
    monitor_client::MonitorClient,
};
use mesh_registry_bridge::Bridge;
use mesh_runtime::{duration::HumanDuration, metrics::Registry};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::{Streaming, transport::Channel};

const INTERVAL: Duration = Duration::from_secs(1);
/// Long enough for anything that does not depend on the probe interval.
const DEADLINE: Duration = Duration::from_secs(20);

/// An HTTP instance that answers 200 at once, or hangs: accepts every
/// connection and never answers.
struct Instance {
    addr: SocketAddr,
    hang: Arc<AtomicBool>,
}

impl Instance {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hang = Arc::new(AtomicBool::new(false));
        let flag = hang.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let hang = flag.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = sock.read(&mut buf).await;
                    if hang {
                        // Hold the connection until the prober gives up.
                        while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                        return;
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        Self { addr, hang }
    }

    fn set_hung(&self, hung: bool) {
        self.hang.store(hung, Ordering::SeqCst);
    }
}

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

fn monitor_config(consul: &DevAgent, bridge: SocketAddr, hook: &str) -> Result<Config> {
    Args {
        node: Some("monitor-node".into()),
        consul_addr: vec![consul.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        interval: Some(HumanDuration(INTERVAL)),
        timeout: Some(HumanDuration(Duration::from_millis(300))),
        slow_threshold: Some(HumanDuration(Duration::from_millis(200))),
        services: vec!["web".into()],
        bridge_port: Some(bridge.port()),
        // The bridge itself, as a component: probed over gRPC health.
        components: vec![format!("bridge=grpc://{bridge}")],
        webhook_url: Some(hook.into()),
        // The bridge reads the default proxy admin port, where anything
        // may listen on a test machine: no traffic alerts here (see
        // tests/traffic.rs).
        traffic: Some(false),
        ..Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)
}

/// The status and output of the monitor's check on `web-1`, if any.
async fn monitor_check(consul: &Client) -> Result<Option<(String, String)>> {
    let entries = consul
        .health_service("web", false, QueryOptions::default())
        .await?;
    Ok(entries
        .value
        .iter()
        .flat_map(|e| &e.checks)
        .find(|c| c.check_id == "mesh-monitor:web-1")
        .map(|c| (c.status.clone(), c.output.clone())))
}

/// Polls until the monitor's check on `web-1` has `status`, at most `within`.
async fn until_check(consul: &Client, status: &str, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let check = monitor_check(consul).await?;
        if let Some((s, output)) = &check
            && s == status
        {
            return Ok(output.clone());
        }
        if Instant::now() > deadline {
            bail!("the check is {check:?}, not {status}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until_events(seen: &Mutex<Vec<Value>>, n: usize) -> Result<Vec<Value>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let events = seen.lock().unwrap().clone();
        if events.len() >= n {
            return Ok(events);
        }
        if Instant::now() > deadline {
            bail!("the webhook got {events:?}, expected {n} events");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(monitor: &Monitor) -> Result<String> {
    let url = format!("http://{}/metrics", monitor.admin_addr());
    Ok(reqwest::get(url).await?.text().await?)
}

/// Polls the monitor's `/metrics` until `pred` holds.
async fn until_metrics(monitor: &Monitor, pred: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = metrics(monitor).await?;
        if pred(&text) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("/metrics never matched:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample `line_start` (`name{labels}`) in `text`.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

async fn client(monitor: &Monitor) -> Result<MonitorClient<Channel>> {
    Ok(MonitorClient::connect(format!("http://{}", monitor.grpc_addr())).await?)
}

async fn next(stream: &mut Streaming<AlertEvent>) -> Result<AlertEvent> {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .context("no alert event before the deadline")??
        .context("stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_instance_turns_critical_alerts_once_and_recovers() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let consul = DevAgent::start().await;
    let data = tempfile::tempdir()?;
    let bridge_config = mesh_registry_bridge::Args {
        node: Some("test-node".into()),
        consul_addr: vec![consul.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(data.path().to_owned()),
        ..Default::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    let bridge = Bridge::start(&bridge_config, Registry::new()).await?;
    let api = Client::new(&ClientConfig::new([consul.addr()]))?;
    let instance = Instance::start().await;
    api.agent_service_register(&AgentServiceRegistration {
        id: Some("web-1".into()),
        name: "web".into(),
        address: Some("127.0.0.1".into()),
        port: Some(instance.addr.port()),
        ..Default::default()
    })
    .await?;
    let (hook, seen) = webhook().await;
    let config = monitor_config(&consul, bridge.grpc_addr(), &hook)?;
    let monitor = Monitor::start(&config, Registry::new()).await?;

    // Answering: passing, and routable. (Consul syncs the output of a
    // check whose status did not change only every few minutes: not
    // asserted here.)
    until_check(&api, "passing", DEADLINE).await?;
    let entries = api
        .health_service("web", true, QueryOptions::default())
        .await?;
    let node = entries.value[0].node.node.clone();
    let key = format!("hung/{node}/web-1");

    // Hung: critical within three intervals, out of routing.
    instance.set_hung(true);
    let output = until_check(&api, "critical", 3 * INTERVAL).await?;
    assert!(
        output.contains("hung: accepted the connection but sent no response within 300ms"),
        "{output}"
    );
    let routable = api
        .health_service("web", true, QueryOptions::default())
        .await?;
    assert!(routable.value.is_empty(), "a hung instance is not routable");
    let events = until_events(&seen, 1).await?;
    assert_eq!(events[0]["event"], "open");
    assert_eq!(events[0]["alert"]["key"], key.as_str());
    assert_eq!(events[0]["alert"]["severity"], "critical");
    let started = events[0]["alert"]["started_at_ms"].as_u64().unwrap();
    let verdict = client(&monitor)
        .await?
        .verdict(VerdictRequest {
            instance_id: "web-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!verdict.healthy, "{verdict:?}");
    let reason = format!("hung {node}/web-1: ");
    assert!(verdict.reasons[0].starts_with(&reason), "{verdict:?}");
    let text = until_metrics(&monitor, |t| {
        sample(t, "mesh_monitor_alerts_open{severity=\"critical\"}") == Some(1.0)
    })
    .await?;
    assert!(
        sample(
            &text,
            "mesh_monitor_probes_total{probe=\"http\",outcome=\"hung\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{text}"
    );

    // A restart while it still hangs: the alert is open again, not sent again.
    ensure!(
        monitor.shutdown(Duration::from_secs(5)).await,
        "monitor drained"
    );
    let monitor = Monitor::start(&config, Registry::new()).await?;
    until_metrics(&monitor, |t| {
        sample(
            t,
            "mesh_monitor_probes_total{probe=\"http\",outcome=\"hung\"}",
        )
        .is_some_and(|n| n >= 3.0)
    })
    .await?;
    let open = client(&monitor)
        .await?
        .list_alerts(ListAlertsRequest {})
        .await?
        .into_inner()
        .alerts;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!((&open[0].key, open[0].started_at_ms), (&key, started));
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the open alert was not sent again"
    );
    assert_eq!(monitor_check(&api).await?.unwrap().0, "critical");

    // Answering again: passing within three intervals, one resolve.
    let mut watch = client(&monitor)
        .await?
        .watch_alerts(WatchAlertsRequest {})
        .await?
        .into_inner();
    let first = next(&mut watch).await?;
    assert_eq!(first.r#type, Type::Open as i32);
    assert_eq!(next(&mut watch).await?.r#type, Type::Synced as i32);
    instance.set_hung(false);
    until_check(&api, "passing", 3 * INTERVAL).await?;
    let resolved = next(&mut watch).await?;
    assert_eq!(resolved.r#type, Type::Resolved as i32);
    assert!(resolved.alert.unwrap().resolved_at_ms >= started);
    let events = until_events(&seen, 2).await?;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["event"], "resolved");
    assert_eq!(events[1]["alert"]["key"], key.as_str());
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
    let mut grpc = client(&monitor).await?;
    let verdict = grpc
        .verdict(VerdictRequest {
            node: node.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(verdict.healthy && verdict.reasons.is_empty(), "{verdict:?}");
    assert_eq!(verdict.targets, 1);
    let unknown = VerdictRequest {
        instance_id: "nope".into(),
        ..Default::default()
    };
    let e = grpc.verdict(unknown).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let text = metrics(&monitor).await?;
    assert!(
        sample(
            &text,
            "mesh_monitor_probes_total{probe=\"grpc\",outcome=\"up\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "the bridge is probed over gRPC health: {text}"
    );
    monitor.shutdown(Duration::from_secs(5)).await;
    bridge.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
