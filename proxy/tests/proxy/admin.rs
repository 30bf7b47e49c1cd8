//! The admin listener: /live, /ready, /routes, /stats, /metrics (checked by
//! promtool).

use std::{io::Write, process::Command};

use http::StatusCode;

use crate::support::{Behaviour, FakeBridge, TestProxy, TestUpstream, endpoint, get, service};

#[tokio::test]
async fn routes_show_the_live_table_with_endpoints() {
    let a = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![
        service("orders", vec![endpoint("orders-1", a.addr)]),
        service("empty", vec![]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    assert_eq!(get(proxy.admin, "/live", &[]).await.status, StatusCode::OK);
    proxy.wait_service("orders", 1).await;
    assert_eq!(get(proxy.admin, "/ready", &[]).await.status, StatusCode::OK);

    let routes = proxy.routes().await;
    assert_eq!(routes["source"], "live");
    assert!(routes["version"].as_u64().unwrap() >= 1);
    assert!(routes["updated_at_unix_ms"].as_u64().unwrap() > 0);
    assert!(routes["age_seconds"].as_f64().unwrap() < 60.0);
    assert_eq!(routes["services"]["empty"], serde_json::json!([]));
    let ep = &routes["services"]["orders"][0];
    assert_eq!(ep["id"], "orders-1");
    assert_eq!(ep["address"], "127.0.0.1");
    assert_eq!(ep["port"], a.addr.port());
    assert_eq!(ep["node"], "node-1");
    assert_eq!(ep["tags"][0], "t1");
    assert_eq!(ep["in_flight"], 0);
    proxy.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_and_pass_promtool() {
    let a = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge =
        FakeBridge::start(vec![service("orders", vec![endpoint("orders-1", a.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    for _ in 0..3 {
        assert_eq!(
            get(proxy.addr, "/orders/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(proxy.addr, "/nosuch/", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    crate::support::eventually("dump age known", || async {
        let text =
            String::from_utf8(get(proxy.admin, "/metrics", &[]).await.body.to_vec()).unwrap();
        text.contains("mesh_proxy_dump_age_seconds").then_some(())
    })
    .await;

    let r = get(proxy.admin, "/metrics", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for want in [
        r#"mesh_proxy_requests_total{service="orders",code_class="2xx"} 3"#,
        r#"mesh_proxy_requests_total{service="_unrouted",code_class="4xx"} 1"#,
        r#"mesh_proxy_request_duration_seconds_count{service="orders"} 3"#,
        r#"mesh_proxy_upstream_errors_total{service="orders",kind="connect"} 0"#,
        r#"mesh_proxy_endpoints{service="orders"} 1"#,
        "mesh_proxy_discovery_connected 1",
        "mesh_proxy_discovery_updates_total 1",
        "mesh_proxy_dump_age_seconds",
        r#"mesh_proxy_registrations_total{outcome="applied"} 0"#,
        "mesh_proxy_queue_depth 0",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    promtool(&text);
    proxy.stop().await;
}

#[tokio::test]
async fn stats_count_proxied_requests_errors_and_latency_since_start() {
    let a = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let reset = TestUpstream::start("reset-1", Behaviour::Reset).await;
    let bridge = FakeBridge::start(vec![
        service("orders", vec![endpoint("orders-1", a.addr)]),
        service("reset", vec![endpoint("reset-1", reset.addr)]),
        service("empty", vec![]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    // Version 1 from mesh-control: one attempt at `reset`, so one 502.
    bridge.send_config(1, "[routes.reset]\nretries = 0\n");
    proxy
        .wait_routes("config version 1 in effect", |r| {
            r["config"]["version"] == 1
        })
        .await;

    let before = stats(&proxy).await;
    assert_eq!(before["node"], "test-node");
    assert_eq!(before["ready"], true);
    assert_eq!(before["config_version"], 1);
    assert_eq!(before["requests"], 0);
    assert_eq!(before["errors"], 0);
    let bounds = before["latency"]["bounds_seconds"].as_array().unwrap();
    assert_eq!(bounds.len(), mesh_runtime::metrics::LATENCY_BUCKETS.len());
    assert_eq!(
        before["latency"]["counts"].as_array().unwrap().len(),
        bounds.len()
    );

    for _ in 0..3 {
        assert_eq!(
            get(proxy.addr, "/orders/", &[]).await.status,
            StatusCode::OK
        );
    }
    let addr = proxy.addr;
    let status = move |path| async move { get(addr, path, &[]).await.status };
    assert_eq!(status("/reset/").await, StatusCode::BAD_GATEWAY);
    assert_eq!(status("/empty/").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status("/nosuch/").await, StatusCode::NOT_FOUND);

    // Read at once: no upkeep tick is needed for the latencies to show.
    let after = stats(&proxy).await;
    assert_eq!(after["requests"], 6, "{after}");
    assert_eq!(after["errors"], 2, "{after}");
    let latency = &after["latency"];
    assert_eq!(latency["count"], 6, "{after}");
    let in_buckets: u64 = latency["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(in_buckets, 6, "all under 10 s: {after}");
    let sum = latency["sum_seconds"].as_f64().unwrap();
    assert!(sum > 0.0 && sum < 60.0, "{after}");
    proxy.stop().await;
}

async fn stats(proxy: &TestProxy) -> serde_json::Value {
    let r = get(proxy.admin, "/stats", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    r.json()
}

/// Runs `promtool check metrics` when it is installed (Debian's
/// `prometheus` package); says so when it is not.
fn promtool(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed; skipping the exposition format check");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
