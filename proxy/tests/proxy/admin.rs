//! The admin listener: /live, /ready, /routes, /metrics (checked by promtool).

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
