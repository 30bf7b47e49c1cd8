//! Routing, balancing, retries, timeouts and the JSON errors.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::LoadBalancing;
use tokio::net::TcpStream;

use crate::support::{
    Behaviour, FakeBridge, TestProxy, TestUpstream, closed_port, endpoint, get, request, service,
};

#[tokio::test]
async fn routes_by_host_and_by_first_path_segment() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;

    for host in [
        "orders",
        "orders:8888",
        "orders.mesh",
        "Orders.Service.Consul",
    ] {
        let r = get(proxy.addr, "/api/x?q=1", &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::OK, "{host}: {:?}", r.body);
        assert_eq!(r.json()["path"], "/api/x?q=1", "{host}");
        assert_eq!(r.instance(), "orders-1");
    }
    for (path, upstream_path) in [
        ("/orders/api/x?q=1", "/api/x?q=1"),
        ("/orders", "/"),
        ("/orders/", "/"),
        ("/orders?q=1", "/?q=1"),
    ] {
        for host in ["127.0.0.1:8888", "localhost"] {
            let r = get(proxy.addr, path, &[("host", host)]).await;
            assert_eq!(r.status, StatusCode::OK, "{path}");
            assert_eq!(r.json()["path"], upstream_path, "{path} via {host}");
        }
    }
    // Forwarded requests are HTTP/1.1 whatever the client spoke.
    let r = get(proxy.addr, "/orders/", &[]).await;
    assert_eq!(r.json()["version"], "HTTP/1.1");
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_requests_route_by_authority() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for uri in [
        "http://orders.mesh/h2?x=1",
        "http://127.0.0.1/orders/h2?x=1",
    ] {
        let req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["path"], "/h2?x=1");
        assert_eq!(json["version"], "HTTP/1.1");
        assert!(json["headers"]["host"][0].as_str().is_some(), "{json}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn errors_are_json_with_kind_reason_and_service() {
    let hang = TestUpstream::start("slow-1", Behaviour::Hang).await;
    let dead = closed_port();
    let bridge = FakeBridge::start(vec![
        service("empty", vec![]),
        service("dead", vec![endpoint("dead-1", dead.addr)]),
        service("slow", vec![endpoint("slow-1", hang.addr)]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.request_timeout = Duration::from_millis(300);
    })
    .await;
    proxy.wait_service("slow", 1).await;

    for (path, status, kind, service) in [
        ("/nosuch/x", 404, "unknown_service", Some("nosuch")),
        ("/empty/x", 503, "no_healthy_instance", Some("empty")),
        ("/dead/x", 502, "connect_failed", Some("dead")),
        ("/slow/x", 504, "timeout", Some("slow")),
        ("/v1/kv/x", 404, "not_found", None),
        ("/_mesh/x", 404, "not_found", None),
    ] {
        let r = get(proxy.addr, path, &[]).await;
        assert_eq!(r.status.as_u16(), status, "{path}: {:?}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
        let json = r.json();
        assert_eq!(json["error"], kind, "{path}: {json}");
        assert!(
            json["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "{json}"
        );
        if let Some(service) = service {
            assert_eq!(json["service"], service, "{json}");
        }
        // No instance address leaks to the caller.
        assert!(!json.to_string().contains("127.0.0.1"), "{json}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let ups = [
        TestUpstream::start("a", Behaviour::Echo).await,
        TestUpstream::start("b", Behaviour::Echo).await,
        TestUpstream::start("c", Behaviour::Echo).await,
    ];
    let eps = ups
        .iter()
        .zip(["a", "b", "c"])
        .map(|(u, id)| endpoint(id, u.addr))
        .collect();
    let bridge = FakeBridge::start(vec![service("orders", eps)]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.lb = LoadBalancing::RoundRobin;
    })
    .await;
    proxy.wait_service("orders", 3).await;

    let mut counts = HashMap::new();
    for _ in 0..300 {
        let r = get(proxy.addr, "/orders/", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        *counts.entry(r.instance()).or_insert(0) += 1;
    }
    for id in ["a", "b", "c"] {
        assert_eq!(counts[id], 100, "{counts:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn least_request_answers_from_every_instance() {
    let a = TestUpstream::start("a", Behaviour::Echo).await;
    let b = TestUpstream::start("b", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("a", a.addr), endpoint("b", b.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.lb = LoadBalancing::LeastRequest
    })
    .await;
    proxy.wait_service("orders", 2).await;
    for _ in 0..50 {
        assert_eq!(
            get(proxy.addr, "/orders/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "{} / {}",
        a.requests(),
        b.requests()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn failed_connect_is_retried_on_another_instance() {
    let good = TestUpstream::start("good", Behaviour::Echo).await;
    let dead = closed_port();
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("dead", dead.addr), endpoint("good", good.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.lb = LoadBalancing::RoundRobin;
    })
    .await;
    proxy.wait_service("orders", 2).await;

    for i in 0..20 {
        // Whatever the method: a request that never left is safe to resend.
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let r = request(proxy.addr, method, "/orders/x", &[], "payload").await;
        assert_eq!(r.status, StatusCode::OK, "{method}: {:?}", r.body);
        assert_eq!(r.instance(), "good");
    }
    assert_eq!(good.requests(), 20);
    // Five failed connects in a row, and the dead instance is ejected.
    let metrics = proxy.registry.render();
    assert!(
        metrics.contains(r#"mesh_proxy_upstream_errors_total{service="orders",kind="connect"} 5"#),
        "{metrics}"
    );
    let routes = proxy.routes().await;
    assert!(
        routes["services"]["orders"][0]["ejected_until"].is_u64(),
        "{routes}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn get_is_retried_when_an_instance_resets_the_connection() {
    let reset = TestUpstream::start("reset", Behaviour::Reset).await;
    let good = TestUpstream::start("good", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("reset", reset.addr), endpoint("good", good.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Round robin without ejection: the resetting instance keeps its turn.
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.lb = LoadBalancing::RoundRobin;
        c.default_route.outlier_consecutive_failures = Some(0);
    })
    .await;
    proxy.wait_service("orders", 2).await;

    for _ in 0..10 {
        let r = get(proxy.addr, "/orders/x", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.instance(), "good");
    }
    assert!(reset.requests() >= 4, "the resetting instance was tried");
    // A POST with a body was sent and may have been acted upon: no retry.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            request(proxy.addr, "POST", "/orders/x", &[], "payload")
                .await
                .status,
        );
    }
    assert!(statuses.contains(&StatusCode::BAD_GATEWAY), "{statuses:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;

    for _ in 0..20 {
        assert_eq!(
            get(proxy.addr, "/orders/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(orders.requests(), 20);
    assert_eq!(
        orders.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The pooled connection survives a table swap that keeps the instance.
    let other = TestUpstream::start("orders-2", Behaviour::Echo).await;
    bridge.snapshot(vec![service(
        "orders",
        vec![
            endpoint("orders-1", orders.addr),
            endpoint("orders-2", other.addr),
        ],
    )]);
    proxy.wait_service("orders", 2).await;
    for _ in 0..10 {
        assert_eq!(
            get(proxy.addr, "/orders/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        orders.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    proxy.stop().await;
}

#[tokio::test]
async fn deltas_update_routes_and_the_proxy_resubscribes_after_a_bridge_restart() {
    let a = TestUpstream::start("a", Behaviour::Echo).await;
    let b = TestUpstream::start("b", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service("orders", vec![endpoint("a", a.addr)])]).await;
    let bridge_addr = bridge.addr;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.services = vec!["orders".into(), "users".into()];
    })
    .await;
    proxy.wait_service("orders", 1).await;
    let watch = bridge.state.watches.lock().unwrap()[0].clone();
    assert_eq!(watch.node, "test-node");
    // The peers' service joins a list (see `peer::watch`).
    assert_eq!(watch.services, vec!["orders", "users", "mesh-proxy"]);

    bridge.delta(vec![service("users", vec![endpoint("b", b.addr)])], vec![]);
    proxy.wait_service("users", 1).await;
    assert_eq!(get(proxy.addr, "/users/", &[]).await.instance(), "b");
    bridge.delta(vec![], vec!["users"]);
    proxy
        .wait_routes("users removed", |r| r["services"].get("users").is_none())
        .await;
    assert_eq!(
        get(proxy.addr, "/users/", &[]).await.status,
        StatusCode::NOT_FOUND
    );

    // The bridge goes away: routing goes on from the current table.
    bridge.stop().await;
    crate::support::eventually("discovery disconnected", || async {
        proxy
            .registry
            .render()
            .contains("mesh_proxy_discovery_connected 0")
            .then_some(())
    })
    .await;
    assert_eq!(get(proxy.addr, "/orders/", &[]).await.instance(), "a");

    // It comes back with news: the proxy resubscribes and converges.
    let bridge = FakeBridge::start_on(
        bridge_addr,
        vec![service("orders", vec![endpoint("b", b.addr)])],
    )
    .await;
    proxy
        .wait_routes("new snapshot", |r| r["services"]["orders"][0]["id"] == "b")
        .await;
    assert_eq!(get(proxy.addr, "/orders/", &[]).await.instance(), "b");
    assert!(
        proxy
            .registry
            .render()
            .contains("mesh_proxy_discovery_connected 1")
    );
    proxy.stop().await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keep_alive_clients_share_a_bounded_pool() {
    let a = TestUpstream::start("a", Behaviour::Echo).await;
    let b = TestUpstream::start("b", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("a", a.addr), endpoint("b", b.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 2).await;

    const CLIENTS: usize = 32;
    const REQUESTS: usize = 25;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let addr = proxy.addr;
        tasks.spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            for _ in 0..REQUESTS {
                sender.ready().await.unwrap();
                let req = Request::get("/orders/x")
                    .header("host", "orders")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = sender.send_request(req).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(a.requests() + b.requests(), CLIENTS * REQUESTS);
    let conns = |u: &TestUpstream| u.connections.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("upstream connections: {} / {}", conns(&a), conns(&b));
    assert!(
        conns(&a) <= CLIENTS && conns(&b) <= CLIENTS,
        "{} / {}",
        conns(&a),
        conns(&b)
    );
    let routes = proxy.routes().await;
    assert_eq!(routes["services"]["orders"][0]["in_flight"], 0, "{routes}");
    assert_eq!(routes["services"]["orders"][1]["in_flight"], 0, "{routes}");
    proxy.stop().await;
}
