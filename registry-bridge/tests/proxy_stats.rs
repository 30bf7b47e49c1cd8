//! `Registry.ProxyStats` and `Checks.ProxyMetrics` through a started bridge (gRPC on port 0) against
//! a fake proxy admin listener on loopback; no Consul is needed (the one
//! configured does not answer).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::{Json, Router, routing::get};
use mesh_proto::v1::{
    ProxyMetricsRequest, ProxyStatsRequest, checks_client::ChecksClient,
    registry_client::RegistryClient,
};
use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::metrics::Registry;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tonic::Code;

/// A bridge reading the proxy admin listener at `proxy_admin`; dropping
/// it stops its tasks.
struct Harness {
    _bridge: Bridge,
    registry: RegistryClient<tonic::transport::Channel>,
    checks: ChecksClient<tonic::transport::Channel>,
    _data: tempfile::TempDir,
    /// Holds the closed port given as Consul's address.
    _consul: TcpSocket,
}

/// A fake proxy admin listener, stopped when dropped.
struct FakeAdmin {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Harness {
    async fn start(proxy_admin: SocketAddr) -> Result<Self> {
        mesh_runtime::install_crypto_provider();
        let data = tempfile::tempdir()?;
        let (consul, consul_addr) = closed_port();
        let config = Args {
            node: Some("test-node".into()),
            consul_addr: vec![format!("http://{consul_addr}")],
            grpc_listen: Some("127.0.0.1:0".parse()?),
            admin_listen: Some("127.0.0.1:0".parse()?),
            data_dir: Some(data.path().to_owned()),
            proxy_admin: Some(proxy_admin),
            ..Args::default()
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        let bridge = Bridge::start(&config, Registry::new()).await?;
        let registry = RegistryClient::connect(format!("http://{}", bridge.grpc_addr()))
            .await
            .context("connect to the bridge")?;
        let checks = ChecksClient::connect(format!("http://{}", bridge.grpc_addr()))
            .await
            .context("connect to the bridge's Checks")?;
        Ok(Self {
            _bridge: bridge,
            registry,
            checks,
            _data: data,
            _consul: consul,
        })
    }
}

impl FakeAdmin {
    async fn start(router: Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, task }
    }
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port nothing listens on, for as long as the socket is held:
/// bound without listening, it refuses connections, and no other test of
/// this binary can take the port meanwhile (a port merely found free and
/// let go could be a running test's fake proxy a moment later).
fn closed_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

#[tokio::test]
async fn proxy_stats_answers_with_the_proxys_stats() -> Result<()> {
    let stats = serde_json::json!({
        "node": "test-node",
        "ready": true,
        "config_version": 7,
        "requests": 120,
        "errors": 3,
        "latency": {
            "bounds_seconds": [0.001, 0.01, 0.1],
            "counts": [100, 15, 4],
            "count": 120,
            "sum_seconds": 0.75
        }
    });
    let admin =
        FakeAdmin::start(Router::new().route("/stats", get(move || async move { Json(stats) })))
            .await;
    let mut h = Harness::start(admin.addr).await?;
    let r = h
        .registry
        .proxy_stats(ProxyStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(r.node, "test-node");
    assert!(r.ready);
    assert_eq!(r.config_version, 7);
    assert_eq!((r.requests, r.errors), (120, 3));
    assert_eq!(r.latency_bounds_seconds, vec![0.001, 0.01, 0.1]);
    assert_eq!(r.latency_counts, vec![100, 15, 4]);
    assert_eq!(r.latency_count, 120);
    assert_eq!(r.latency_sum_seconds, 0.75);
    Ok(())
}

#[tokio::test]
async fn proxy_stats_is_unavailable_naming_the_address_when_the_proxy_is_down() -> Result<()> {
    let (_held, down) = closed_port();
    let mut h = Harness::start(down).await?;
    let e = h
        .registry
        .proxy_stats(ProxyStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&down.to_string()), "{}", e.message());
    assert!(e.message().contains("cannot connect"), "{}", e.message());
    Ok(())
}

#[tokio::test]
async fn proxy_stats_is_unavailable_when_the_proxy_answers_nonsense() -> Result<()> {
    let admin =
        FakeAdmin::start(Router::new().route("/stats", get(|| async { "{\"node\": 1}" }))).await;
    let mut h = Harness::start(admin.addr).await?;
    let e = h
        .registry
        .proxy_stats(ProxyStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&admin.addr.to_string()),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains("not the stats JSON"),
        "{}",
        e.message()
    );

    // A proxy without /stats (an older one) answers 404.
    let old = FakeAdmin::start(Router::new().route("/routes", get(|| async { "{}" }))).await;
    let mut h = Harness::start(old.addr).await?;
    let e = h
        .registry
        .proxy_stats(ProxyStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("404"), "{}", e.message());
    Ok(())
}

#[tokio::test]
async fn proxy_metrics_answers_with_the_proxys_metrics_text() -> Result<()> {
    let text = "# HELP mesh_proxy_requests_total Requests proxied.\n\
                # TYPE mesh_proxy_requests_total counter\n\
                mesh_proxy_requests_total{service=\"web\",code_class=\"5xx\"} 3\n";
    let admin =
        FakeAdmin::start(Router::new().route("/metrics", get(move || async move { text }))).await;
    let mut h = Harness::start(admin.addr).await?;
    let r = h
        .checks
        .proxy_metrics(ProxyMetricsRequest {})
        .await?
        .into_inner();
    assert_eq!(r.text, text);

    let (_held, down) = closed_port();
    let mut h = Harness::start(down).await?;
    let e = h
        .checks
        .proxy_metrics(ProxyMetricsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&down.to_string()), "{}", e.message());
    Ok(())
}
