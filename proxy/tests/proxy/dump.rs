//! The routing dump: written from live tables, served at start when the
//! bridge is away, refused when corrupt, never replaced by an empty table.

use http::StatusCode;

use crate::support::{
    Behaviour, FakeBridge, TestProxy, TestUpstream, closed_port, endpoint, eventually, get, service,
};

#[tokio::test]
async fn dump_is_written_and_served_at_restart_while_the_bridge_is_down() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    let dump_path = proxy.dump_path();
    let text = eventually("dump written", || async {
        std::fs::read_to_string(&dump_path)
            .ok()
            .filter(|t| t.contains("orders-1"))
    })
    .await;
    let (header, body) = text.split_once('\n').unwrap();
    assert!(header.starts_with("meshwork-dump v1 sha256="), "{header}");
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["services"]["orders"][0]["port"], orders.addr.port());
    assert!(json["written_at_unix_ms"].as_u64().unwrap() > 0);
    proxy.stop().await;
    bridge.stop().await;

    // Restart with no bridge at all: routes come from the dump at once.
    let started = std::time::Instant::now();
    let no_bridge = closed_port();
    let proxy = TestProxy::start(no_bridge.addr, dir.path()).await;
    let routes = proxy.routes().await;
    assert_eq!(routes["source"], "dump", "{routes}");
    assert_eq!(routes["services"]["orders"][0]["id"], "orders-1");
    assert!(routes["age_seconds"].as_f64().unwrap() >= 0.0);
    let r = get(proxy.addr, "/orders/x", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.instance(), "orders-1");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(get(proxy.admin, "/ready", &[]).await.status, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn corrupt_dump_is_refused_and_live_routes_take_over() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("routes.dump");
    std::fs::write(&dump, b"meshwork-dump v1 sha256=0000000000000000000000000000000000000000000000000000000000000000\n{\"version\":1,\"written_at_unix_ms\":1,\"serv").unwrap();

    // No bridge yet: the proxy starts, empty and not ready.
    let bridge_port = closed_port();
    let proxy = TestProxy::start(bridge_port.addr, dir.path()).await;
    let routes = proxy.routes().await;
    assert_eq!(routes["source"], "none", "{routes}");
    assert_eq!(
        get(proxy.admin, "/ready", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(proxy.addr, "/orders/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The bridge answers: live routes, a good dump replaces the bad one.
    let bridge = FakeBridge::start_on(
        bridge_port.release(),
        vec![service("orders", vec![endpoint("orders-1", orders.addr)])],
    )
    .await;
    proxy.wait_service("orders", 1).await;
    assert_eq!(
        get(proxy.addr, "/orders/", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(get(proxy.admin, "/ready", &[]).await.status, StatusCode::OK);
    eventually("good dump written", || async {
        let bytes = std::fs::read(&dump).ok()?;
        mesh_proxy::dump::DumpFile::decode(&bytes).ok()
    })
    .await;
    proxy.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn routing_data_without_endpoints_never_replaces_a_good_dump() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let users = TestUpstream::start("users-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;

    // An empty snapshot is not applied: updates apply in order, so once
    // the delta behind it shows, orders must still be there.
    bridge.snapshot(vec![]);
    bridge.delta(
        vec![service("users", vec![endpoint("users-1", users.addr)])],
        vec![],
    );
    proxy.wait_service("users", 1).await;
    assert_eq!(
        proxy.routes().await["services"]["orders"][0]["id"],
        "orders-1"
    );
    let dump_path = proxy.dump_path();
    let good = eventually("dump with both services", || async {
        std::fs::read(&dump_path)
            .ok()
            .filter(|b| String::from_utf8_lossy(b).contains("users-1"))
    })
    .await;

    // Deltas that leave no endpoint apply to the table, not to the dump.
    bridge.delta(
        vec![service("orders", vec![]), service("users", vec![])],
        vec![],
    );
    proxy
        .wait_routes("no endpoints left", |r| {
            r["services"]["orders"] == serde_json::json!([])
                && r["services"]["users"] == serde_json::json!([])
        })
        .await;
    assert_eq!(
        get(proxy.addr, "/orders/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Stopping flushes the writer: whatever it saw, the good dump stays.
    proxy.stop().await;
    bridge.stop().await;
    assert_eq!(std::fs::read(&dump_path).unwrap(), good);

    let no_bridge = closed_port();
    let proxy = TestProxy::start(no_bridge.addr, dir.path()).await;
    let routes = proxy.routes().await;
    assert_eq!(routes["source"], "dump");
    assert_eq!(routes["services"]["users"][0]["id"], "users-1");
    proxy.stop().await;
}

#[tokio::test]
async fn stale_bridge_snapshot_keeps_the_dump_until_consul_answers_again() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let orders2 = TestUpstream::start("orders-2", Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    let dump_path = proxy.dump_path();
    eventually("dump written", || async {
        std::fs::read_to_string(&dump_path)
            .ok()
            .filter(|t| t.contains("orders-1"))
    })
    .await;
    proxy.stop().await;

    // The bridge has lost Consul: its snapshot is its last answer, as old
    // as the outage. The restarted proxy keeps saying it routes from the dump.
    bridge.set_stale(true);
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    eventually("the stale snapshot received", || async {
        let metrics = get(proxy.admin, "/metrics", &[]).await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        text.lines()
            .any(|l| l.starts_with("mesh_proxy_discovery_updates_total ") && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
    let routes = proxy.routes().await;
    assert_eq!(routes["source"], "dump", "{routes}");
    assert_eq!(
        get(proxy.addr, "/orders/", &[]).await.instance(),
        "orders-1"
    );

    // Consul answers again: the fresh snapshot replaces the dump.
    bridge.set_stale(false);
    bridge.snapshot(vec![service(
        "orders",
        vec![endpoint("orders-2", orders2.addr)],
    )]);
    proxy
        .wait_routes("live routes from the fresh snapshot", |r| {
            r["source"] == "live" && r["services"]["orders"][0]["id"] == "orders-2"
        })
        .await;
    proxy.stop().await;
    bridge.stop().await;
}
