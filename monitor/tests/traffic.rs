//! Traffic alerts end to end: a real Consul dev agent lists the node, the
//! node's real mesh-bridge reads a fake proxy's `/metrics`, and the
//! monitor opens a `traffic:5xx_rate:<node>/web` alert when half the
//! requests fail and resolves it when they succeed again.

#![allow(clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use axum::{Router, extract::State, routing::get};
use consul_client::{Client, ClientConfig, QueryOptions, testing::DevAgent};
use mesh_monitor::{Args, Monitor, alert::Alert};
use mesh_registry_bridge::Bridge;
use mesh_runtime::{duration::HumanDuration, metrics::Registry};
use tokio::net::TcpListener;

const DEADLINE: Duration = Duration::from_secs(30);

/// A proxy whose counters grow by 100 requests of `web` at every read,
/// half of them 5xx while `failing`.
#[derive(Default)]
struct FakeProxy {
    ok: AtomicU64,
    failed: AtomicU64,
    failing: AtomicBool,
}

async fn metrics(State(p): State<Arc<FakeProxy>>) -> String {
    let failed = if p.failing.load(Ordering::SeqCst) {
        50
    } else {
        0
    };
    let ok = p.ok.fetch_add(100 - failed, Ordering::SeqCst) + 100 - failed;
    let failed = p.failed.fetch_add(failed, Ordering::SeqCst) + failed;
    format!(
        "# TYPE mesh_proxy_requests_total counter\n\
         mesh_proxy_requests_total{{service=\"web\",code_class=\"2xx\"}} {ok}\n\
         mesh_proxy_requests_total{{service=\"web\",code_class=\"5xx\"}} {failed}\n"
    )
}

async fn until_alerts(
    monitor: &Monitor,
    what: &str,
    pred: impl Fn(&[Alert]) -> bool,
) -> Result<Vec<Alert>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let open = monitor.alerts().open_alerts();
        if pred(&open) {
            return Ok(open);
        }
        if Instant::now() > deadline {
            bail!("{what}: the open alerts are {open:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_requests_failing_opens_a_traffic_alert_that_resolves() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let consul = DevAgent::start().await;
    let proxy = Arc::new(FakeProxy::default());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_admin = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let data = tempfile::tempdir()?;
    let bridge_config = mesh_registry_bridge::Args {
        node: Some("test-node".into()),
        consul_addr: vec![consul.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(data.path().to_owned()),
        proxy_admin: Some(proxy_admin),
        ..Default::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    let bridge = Bridge::start(&bridge_config, Registry::new()).await?;
    let api = Client::new(&ClientConfig::new([consul.addr()]))?;
    let node = api.catalog_nodes(QueryOptions::default()).await?.value[0]
        .node
        .clone();
    let config = Args {
        node: Some("monitor-node".into()),
        consul_addr: vec![consul.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        services: vec!["none".into()],
        bridge_port: Some(bridge.grpc_addr().port()),
        traffic_interval: Some(HumanDuration(Duration::from_secs(1))),
        traffic_warmup_rounds: Some(2),
        ..Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    let monitor = Monitor::start(&config, Registry::new()).await?;

    // Healthy reads first: nothing opens (checked once the failing
    // starts: the only alert is the one it raises).
    let start = Instant::now();
    while proxy.ok.load(Ordering::SeqCst) < 300 {
        if start.elapsed() > DEADLINE {
            bail!("the monitor never read the proxy's metrics through the bridge");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(monitor.alerts().open_alerts().is_empty());
    proxy.failing.store(true, Ordering::SeqCst);
    let key = format!("traffic:5xx_rate:{node}/web");
    let open = until_alerts(&monitor, "no traffic alert", |open| !open.is_empty()).await?;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].key, key);
    assert_eq!(open[0].kind.as_str(), "traffic");
    assert!(
        open[0].evidence.starts_with("5xx 50.0%"),
        "{}",
        open[0].evidence
    );

    proxy.failing.store(false, Ordering::SeqCst);
    until_alerts(&monitor, "the traffic alert stays open", |open| {
        open.is_empty()
    })
    .await?;
    let text = reqwest::get(format!("http://{}/metrics", monitor.admin_addr()))
        .await?
        .text()
        .await?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("mesh_monitor_traffic_scrapes_total{result=\"ok\"}")),
        "{text}"
    );
    monitor.shutdown(Duration::from_secs(5)).await;
    bridge.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
