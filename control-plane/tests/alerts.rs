//! mesh-monitor's alerts as mesh-control relays them, against a real Consul
//! dev agent and a stand-in `mesh.v1.Monitor` served in the test:
//! `GET /v1/alerts`, the dashboard's event stream, `meshctl alerts` and
//! `meshctl alerts --watch`, and a monitor that goes away.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use consul_client::testing::{DevAgent, free_port};
use futures::Stream;
use mesh_control_plane::{
    app::ControlPlane,
    config::Args,
    ctl::{AlertsCtl, Output},
};
use mesh_proto::v1::{
    self as pb,
    alert_event::Type,
    monitor_server::{Monitor, MonitorServer},
};
use mesh_runtime::metrics::Registry;
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// How long a change may take to reach an open stream (the monitor is
/// asked again at least every 2 s).
const DEADLINE: Duration = Duration::from_secs(30);

/// A monitor that lists the alerts the test gives it, and whose watch
/// sends them, `SYNCED`, the resolution of the first, and ends.
#[derive(Clone, Default)]
struct FakeMonitor {
    alerts: Arc<Mutex<Vec<pb::Alert>>>,
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::AlertEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Monitor for FakeMonitor {
    type WatchAlertsStream = Events;

    async fn watch_alerts(
        &self,
        _request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Events>, Status> {
        let open = self.alerts.lock().expect("not poisoned").clone();
        let event = |t: Type, alert: Option<pb::Alert>| {
            Ok(pb::AlertEvent {
                r#type: t.into(),
                alert,
            })
        };
        let mut events: Vec<_> = open
            .iter()
            .map(|a| event(Type::Open, Some(a.clone())))
            .collect();
        events.push(event(Type::Synced, None));
        if let Some(first) = open.first() {
            let resolved = pb::Alert {
                resolved_at_ms: first.started_at_ms + 60_000,
                ..first.clone()
            };
            events.push(event(Type::Resolved, Some(resolved)));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn list_alerts(
        &self,
        _request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let alerts = self.alerts.lock().expect("not poisoned").clone();
        Ok(Response::new(pb::ListAlertsResponse { alerts }))
    }

    async fn verdict(
        &self,
        _request: Request<pb::VerdictRequest>,
    ) -> Result<Response<pb::VerdictResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// The fake monitor served on a port of its own until `stop` is sent.
struct Served {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn serve(monitor: FakeMonitor) -> Result<Served> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(MonitorServer::new(monitor))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            })
            .await
            .expect("the fake monitor serves");
    });
    Ok(Served { url, stop, task })
}

fn alert(kind: &str, node: &str, id: &str, severity: pb::Severity, started_s: u64) -> pb::Alert {
    pb::Alert {
        key: format!("{kind}/{node}/{id}"),
        kind: kind.into(),
        severity: severity.into(),
        target: format!("{node}/{id}"),
        service: "orders".into(),
        instance_id: id.into(),
        node: node.into(),
        probe: "http://127.0.0.1:9001/health".into(),
        evidence: "no response within 2s".into(),
        started_at_ms: 1_767_225_600_000 + started_s * 1000,
        resolved_at_ms: 0,
    }
}

/// Reads the dashboard's `state` events until one satisfies `want`.
async fn state_until(
    response: &mut reqwest::Response,
    buf: &mut String,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    let mut last = Value::Null;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                let state: Value = serde_json::from_str(data)?;
                if want(&state) {
                    return Ok(state);
                }
                last = state;
            }
        }
        let left = DEADLINE.saturating_sub(start.elapsed());
        let chunk = match tokio::time::timeout(left, response.chunk()).await {
            Ok(chunk) => chunk?.context("the event stream ended")?,
            Err(_) => bail!("{what}: not pushed within {DEADLINE:?}; last state: {last}"),
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn alerts_reach_the_rest_api_the_dashboard_and_meshctl() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let monitor = FakeMonitor::default();
    monitor.alerts.lock().expect("not poisoned").extend([
        alert("slow", "n1", "web-1", pb::Severity::Warning, 0),
        alert("hung", "n1", "orders-1", pb::Severity::Critical, 5),
    ]);
    let served = serve(monitor.clone()).await?;
    let argv = [
        "mesh-control",
        "--replica",
        "c1",
        "--consul-addr",
        &agent.addr(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--bridge-port",
        &free_port().to_string(),
        "--monitor-addr",
        &served.url,
    ];
    let config = <Args as clap::Parser>::try_parse_from(argv)?
        .validate()
        .map_err(anyhow::Error::msg)?;
    let plane = ControlPlane::start(&config, Registry::new()).await?;
    let base = format!("http://{}", plane.http_addr());

    // The REST API: what the monitor listed, in its order, times in RFC 3339.
    let listed: Value = reqwest::get(format!("{base}/v1/alerts"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(listed["configured"], true, "{listed}");
    assert_eq!(listed["error"], "", "{listed}");
    assert_eq!(listed["alerts"][0]["key"], "slow/n1/web-1", "{listed}");
    assert_eq!(listed["alerts"][1]["severity"], "critical", "{listed}");
    assert_eq!(
        listed["alerts"][1]["started_at"], "2026-01-01T00:00:05.000Z",
        "{listed}"
    );
    assert_eq!(listed["alerts"][1]["state"], "open", "{listed}");

    // The dashboard: the critical one first; a new alert is pushed.
    let mut events = reqwest::get(format!("{base}/v1/events")).await?;
    let mut buf = String::new();
    let state = state_until(&mut events, &mut buf, "two alerts", |s| {
        s["monitor"]["alerts"].as_array().map(Vec::len) == Some(2)
    })
    .await?;
    assert_eq!(state["monitor"]["alerts"][0]["key"], "hung/n1/orders-1");
    assert_eq!(state["monitor"]["configured"], true);
    monitor.alerts.lock().expect("not poisoned").push(alert(
        "down",
        "n2",
        "api-1",
        pb::Severity::Critical,
        9,
    ));
    let state = state_until(&mut events, &mut buf, "the third alert", |s| {
        s["monitor"]["alerts"].as_array().map(Vec::len) == Some(3)
    })
    .await?;
    assert_eq!(state["monitor"]["alerts"][1]["key"], "down/n2/api-1");

    // meshctl alerts: a table, the worst first.
    let mut ctl = AlertsCtl::connect(&served.url, Output::Table).await?;
    let table = ctl.list().await?;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("SEVERITY  KIND  TARGET") && lines[0].ends_with("SUMMARY"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("critical  hung  n1/orders-1"),
        "{table}"
    );
    assert!(lines[3].starts_with("warning   slow  n1/web-1"), "{table}");
    assert!(lines[3].ends_with("no response within 2s"), "{table}");

    // meshctl alerts --watch: the table, then each change; a watch the
    // monitor ends is an error naming it.
    let mut printed = String::new();
    let end = ctl
        .watch(|text| printed.push_str(text))
        .await
        .expect_err("the fake monitor ends its watch");
    assert_eq!(end.exit_code, 69);
    assert!(end.message.contains(&served.url), "{}", end.message);
    let (table, changes) = printed
        .split_once("\n\n")
        .context("a table, then changes")?;
    assert_eq!(table.lines().count(), 4, "{printed}");
    assert_eq!(
        changes,
        "2026-01-01T00:01:00.000Z  RESOLVED  warning   slow n1/web-1: no response within 2s\n"
    );
    let mut json = AlertsCtl::connect(&served.url, Output::Json).await?;
    let listed: Value = serde_json::from_str(&json.list().await?)?;
    assert_eq!(listed[0]["key"], "hung/n1/orders-1");

    // The monitor goes away: the API and the page say so, and answer.
    let _ = served.stop.send(());
    served.task.await?;
    let gone: Value = reqwest::get(format!("{base}/v1/alerts"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(gone["configured"], true, "{gone}");
    assert_eq!(gone["alerts"], serde_json::json!([]), "{gone}");
    let error = gone["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!("mesh-monitor at {} is unreachable", served.url)),
        "{gone}"
    );
    let state = state_until(&mut events, &mut buf, "the monitor gone", |s| {
        s["monitor"]["error"] != ""
    })
    .await?;
    assert_eq!(state["error"], "", "Consul answers: the rest is current");
    assert_eq!(state["monitor"]["alerts"], serde_json::json!([]));

    drop(events);
    assert!(plane.shutdown(Duration::from_secs(10)).await);
    Ok(())
}
