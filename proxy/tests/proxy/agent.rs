//! Consul's agent registration API on the outbound listener.

use http::StatusCode;

use crate::support::{FakeBridge, Reply, TestProxy, closed_port, eventually, get, request};

const REGISTER: &str = "/v1/agent/service/register";

async fn register(proxy: &TestProxy, body: &str) -> crate::support::Resp {
    request(proxy.addr, "PUT", REGISTER, &[], body.to_owned()).await
}

#[tokio::test]
async fn invalid_registrations_are_refused_with_the_reason() {
    let bridge = FakeBridge::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;

    for (body, reason) in [
        (r#"{"Name": "orders", "Port": "#, "invalid JSON"),
        (r#"{"Port": 8080}"#, "missing Name"),
        (r#"{"Name": "or ders", "Port": 8080}"#, "bad character"),
        (r#"{"Name": "v1", "Port": 8080}"#, "reserved"),
        (r#"{"Name": "_mesh", "Port": 8080}"#, "reserved"),
        (r#"{"Name": "orders", "Port": 0}"#, "Port 0"),
        (r#"{"Name": "orders", "Port": 70000}"#, "Port 70000"),
        (r#"{"Name": "orders"}"#, "missing Port"),
        (
            r#"{"Name": "orders", "Port": 1, "Address": "bad address!"}"#,
            "Address",
        ),
        (
            r#"{"Name": "orders", "Port": 1, "Check": {"HTTP": "http://127.0.0.1:1/health"}}"#,
            "Interval",
        ),
        (
            r#"{"Name": "orders", "Port": 1, "Check": {"Script": "x", "Interval": "1s"}}"#,
            "check kind",
        ),
        (
            r#"{"Name": "orders", "Port": 1, "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}}"#,
            "check kind",
        ),
    ] {
        let r = register(&proxy, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {:?}", r.body);
        let json = r.json();
        assert_eq!(json["error"], "invalid_registration");
        let text = json["reason"].as_str().unwrap();
        assert!(text.contains(reason), "{body}: {text:?} lacks {reason:?}");
    }
    let r = request(
        proxy.addr,
        "PUT",
        "/v1/agent/service/deregister/bad%2Fid",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = request(proxy.addr, "POST", REGISTER, &[], "{}").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        bridge.registered().is_empty(),
        "nothing invalid reaches the registry"
    );
    let metrics = proxy.registry.render();
    assert!(
        metrics.contains(r#"mesh_proxy_registrations_total{outcome="invalid"} 13"#),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn registrations_are_forwarded_to_the_bridge_and_listed() {
    let bridge = FakeBridge::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;

    // Any Host: the agent API is the proxy's own.
    let r = request(
        proxy.addr,
        "PUT",
        REGISTER,
        &[("host", "orders")],
        r#"{"ID": "orders-1", "Name": "orders", "Address": "10.0.0.5", "Port": 8080,
            "Tags": ["v2"], "Meta": {"version": "2"}, "EnableTagOverride": false,
            "Check": {"HTTP": "http://10.0.0.5:8080/health", "Interval": "1s",
                      "DeregisterCriticalServiceAfter": "1m"}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body.is_empty(), "Consul answers 200 with an empty body");
    let registered = bridge.registered();
    assert_eq!(registered.len(), 1);
    let s = &registered[0];
    assert_eq!(
        (s.id.as_str(), s.name.as_str(), s.address.as_str(), s.port),
        ("orders-1", "orders", "10.0.0.5", 8080)
    );
    assert_eq!(s.tags, vec!["v2"]);
    assert_eq!(s.meta["version"], "2");
    assert_eq!(s.checks[0].http, "http://10.0.0.5:8080/health");
    assert_eq!(s.checks[0].interval, "1s");
    assert_eq!(s.checks[0].deregister_critical_service_after, "1m");

    let r = get(proxy.addr, "/v1/agent/services", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let json = r.json();
    let entry = &json["orders-1"];
    assert_eq!(entry["ID"], "orders-1");
    assert_eq!(entry["Service"], "orders");
    assert_eq!(entry["Port"], 8080);
    assert_eq!(entry["Address"], "10.0.0.5");
    assert_eq!(entry["Tags"][0], "v2");
    assert_eq!(entry["Meta"]["version"], "2");

    let r = request(
        proxy.addr,
        "PUT",
        "/v1/agent/service/deregister/orders-1",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(*bridge.state.deregistered.lock().unwrap(), vec!["orders-1"]);
    assert!(
        proxy
            .registry
            .render()
            .contains(r#"mesh_proxy_registrations_total{outcome="applied"} 2"#)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_bridges_answers_become_202_and_400() {
    let bridge = FakeBridge::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    let body = r#"{"Name": "orders", "Port": 8080}"#;

    bridge.set_reply(Reply::Queued);
    let r = register(&proxy, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);

    bridge.set_reply(Reply::Invalid("service name taken by a check".into()));
    let r = register(&proxy, body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["reason"], "service name taken by a check");
    proxy.stop().await;
}

#[tokio::test]
async fn bridge_down_registration_is_queued_then_delivered_in_order() {
    let bridge_port = closed_port();
    let bridge_addr = bridge_port.addr;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge_addr, dir.path()).await;

    let r = register(
        &proxy,
        r#"{"ID": "orders-1", "Name": "orders", "Port": 8080}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(r.json()["queued"], true);
    // Behind a queued call, the next one queues too, even in order.
    let r = register(
        &proxy,
        r#"{"ID": "orders-2", "Name": "orders", "Port": 8081}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = request(
        proxy.addr,
        "PUT",
        "/v1/agent/service/deregister/orders-1",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(queued_items(dir.path()), 3);
    let r = get(proxy.addr, "/v1/agent/services", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);

    let bridge = FakeBridge::start_on(bridge_port.release(), vec![]).await;
    eventually("queued registrations delivered", || async {
        (bridge.state.deregistered.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    let ids: Vec<_> = bridge.registered().iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, vec!["orders-1", "orders-2"]);
    eventually("queue empty", || async {
        (queued_items(dir.path()) == 0).then_some(())
    })
    .await;
    // With the queue empty, calls go straight through again.
    let r = register(
        &proxy,
        r#"{"ID": "orders-3", "Name": "orders", "Port": 8082}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let metrics = proxy.registry.render();
    assert!(
        metrics.contains(r#"mesh_proxy_registrations_total{outcome="queued"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains("mesh_proxy_queue_depth 0"), "{metrics}");
    proxy.stop().await;
    bridge.stop().await;
}

/// Items waiting in the proxy's queue folder (its lock file aside).
fn queued_items(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("queue"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
        .count()
}
