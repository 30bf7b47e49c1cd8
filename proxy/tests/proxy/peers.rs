//! HTTP/2 between proxies, in one process: proxy A (node-a) calls the
//! instances of node-b through proxy B's inbound listener, which checks
//! each named instance against its own table.

use std::{net::SocketAddr, path::Path};

use futures::{SinkExt, StreamExt};
use http::StatusCode;
use mesh_proto::v1::{self as pb, discovery_client::DiscoveryClient};
use mesh_proxy::InboundConfig;
use tokio::net::TcpStream;
use tokio_tungstenite::{client_async, tungstenite::Message};

use crate::{
    support::{
        Behaviour, DEADLINE, FakeBridge, TestProxy, TestUpstream, closed_port, endpoint,
        eventually, get, request, service,
    },
    upstreams::{GrpcUpstream, UpgradeReply, UpgradeUpstream, grpc_channel},
};

fn on(node: &str, mut e: pb::Endpoint) -> pb::Endpoint {
    e.node = node.into();
    e
}

/// `mesh-proxy` with node-b's proxy at `inbound`.
fn peer_service(inbound: SocketAddr) -> pb::ServiceEndpoints {
    service(
        "mesh-proxy",
        vec![on("node-b", endpoint("mesh-proxy-node-b", inbound))],
    )
}

async fn proxy_on(node: &'static str, bridge: SocketAddr, dir: &Path, inbound: bool) -> TestProxy {
    TestProxy::start_with(bridge, dir, |c| {
        c.node = node.into();
        if inbound {
            c.inbound = Some(InboundConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                address: Some("127.0.0.1".into()),
            });
        }
    })
    .await
}

fn metric(proxy: &TestProxy, line_start: &str) -> f64 {
    proxy
        .registry
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Proxies A and B on one bridge whose table has `services` and B's peer
/// registration.
struct Pair {
    bridge: FakeBridge,
    a: TestProxy,
    b: TestProxy,
    inbound: SocketAddr,
    _dirs: [tempfile::TempDir; 2],
}

impl Pair {
    async fn start(services: Vec<pb::ServiceEndpoints>) -> Self {
        let bridge = FakeBridge::start(services.clone()).await;
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let b = proxy_on("node-b", bridge.addr, dirs[1].path(), true).await;
        let inbound = b.app().inbound_addr().unwrap();
        let a = proxy_on("node-a", bridge.addr, dirs[0].path(), false).await;
        let mut all = services;
        all.push(peer_service(inbound));
        bridge.snapshot(all);
        a.wait_routes("node-b's proxy as a peer", |r| {
            r["peers"]["node-b"]["port"] == inbound.port()
        })
        .await;
        Self {
            bridge,
            a,
            b,
            inbound,
            _dirs: dirs,
        }
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
        self.bridge.stop().await;
    }
}

#[tokio::test]
async fn a_proxy_with_an_inbound_listener_registers_as_a_peer() {
    let bridge = FakeBridge::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let b = proxy_on("node-b", bridge.addr, dir.path(), true).await;
    let inbound = b.app().inbound_addr().unwrap();
    let registered = eventually("the peer registration", || async {
        bridge
            .registered()
            .into_iter()
            .find(|r| r.name == "mesh-proxy")
    })
    .await;
    assert_eq!(registered.id, "mesh-proxy-node-b");
    assert_eq!(registered.address, "127.0.0.1");
    assert_eq!(registered.port, u32::from(inbound.port()));
    assert_eq!(registered.checks.len(), 1);
    assert_eq!(registered.checks[0].tcp, inbound.to_string());
    // All services: the subscription carries the peers already.
    assert!(bridge.state.watches.lock().unwrap()[0].services.is_empty());
    b.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn requests_to_another_nodes_instance_share_one_h2_connection_to_its_proxy() {
    let up = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let pair = Pair::start(vec![service(
        "orders",
        vec![on("node-b", endpoint("orders-1", up.addr))],
    )])
    .await;
    for i in 0..20 {
        let r = get(pair.a.addr, &format!("/orders/x?i={i}"), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.instance(), "orders-1");
        let json = r.json();
        assert_eq!(json["path"], format!("/x?i={i}"));
        // The hop's headers stop at node-b's proxy; the caller's address
        // is the one the instance sees.
        assert!(json["headers"].get("x-mesh-endpoint").is_none(), "{json}");
        assert!(json["headers"].get("x-mesh-protocol").is_none(), "{json}");
        assert_eq!(json["headers"]["x-forwarded-for"][0], "127.0.0.1");
    }
    let a = &pair.a;
    assert_eq!(
        metric(
            a,
            r#"mesh_proxy_peer_requests_total{peer="node-b",protocol="h2"}"#
        ),
        20.0
    );
    let b = &pair.b;
    assert_eq!(
        metric(
            b,
            r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#
        ),
        20.0
    );
    assert_eq!(
        metric(b, r#"mesh_proxy_inbound_connections_total{protocol="h2"}"#),
        1.0,
        "one connection carried them all"
    );
    pair.a
        .wait_routes("one open HTTP/2 connection to node-b", |r| {
            r["peers"]["node-b"]["h2_connected"] == true
        })
        .await;
    eventually("the connection gauge", || async {
        (metric(
            a,
            r#"mesh_proxy_peer_connections{peer="node-b",protocol="h2"}"#,
        ) == 1.0)
            .then_some(())
    })
    .await;
    pair.stop().await;
}

#[tokio::test]
async fn grpc_streams_and_websockets_cross_the_hop() {
    let grpc = GrpcUpstream::start().await;
    let ws = UpgradeUpstream::start(UpgradeReply::WebSocket).await;
    let mut grpc_endpoint = on("node-b", endpoint("grpc-1", grpc.addr));
    grpc_endpoint.tags = vec!["grpc".into()];
    let pair = Pair::start(vec![
        service("streams", vec![grpc_endpoint]),
        service("chat", vec![on("node-b", endpoint("chat-1", ws.addr))]),
    ])
    .await;

    // Server streaming, then a status in the trailers.
    let channel = grpc_channel(pair.a.addr, "streams").await;
    let mut client = DiscoveryClient::new(channel);
    let request = pb::WatchRequest {
        node: "break".into(),
        services: vec!["a".into(), "b".into(), "c".into()],
    };
    let mut stream = client.watch(request).await.unwrap().into_inner();
    for name in ["a", "b", "c"] {
        let update = stream.message().await.unwrap().expect("an update");
        let Some(pb::route_update::Kind::Snapshot(s)) = update.kind else {
            panic!("{update:?}");
        };
        assert_eq!(s.services[0].name, name);
    }
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert_eq!(status.message(), "stream broke");

    // A WebSocket, tunnelled through both proxies.
    let stream = TcpStream::connect(pair.a.addr).await.unwrap();
    let (mut socket, response) =
        tokio::time::timeout(DEADLINE, client_async("ws://chat/ws", stream))
            .await
            .expect("handshake in time")
            .unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        socket.send(Message::text(format!("hi {i}"))).await.unwrap();
        let reply = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(reply, Message::text(format!("echo: hi {i}")));
    }
    socket.close(None).await.unwrap();
    let seen = ws.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].contains_key("x-mesh-endpoint"), "{:?}", seen[0]);

    let (a, b) = (&pair.a, &pair.b);
    assert_eq!(
        metric(
            a,
            r#"mesh_proxy_peer_requests_total{peer="node-b",protocol="h2"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            a,
            r#"mesh_proxy_peer_requests_total{peer="node-b",protocol="http1"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            b,
            r#"mesh_proxy_inbound_requests_total{protocol="http1",code_class="1xx"}"#
        ),
        1.0
    );
    pair.stop().await;
}

#[tokio::test]
async fn the_inbound_listener_forwards_only_to_its_own_nodes_instances() {
    let b_up = TestUpstream::start("orders-b", Behaviour::Echo).await;
    let a_up = TestUpstream::start("orders-a", Behaviour::Echo).await;
    let pair = Pair::start(vec![service(
        "orders",
        vec![
            on("node-b", endpoint("orders-b", b_up.addr)),
            on("node-a", endpoint("orders-a", a_up.addr)),
        ],
    )])
    .await;
    let inbound = pair.inbound;

    let r = get(inbound, "/x", &[("host", "orders")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "missing_endpoint");
    for (named, status, kind) in [
        ("orders/orders-a", 421, "foreign_instance"),
        ("orders/nope", 421, "unknown_instance"),
        ("billing/b-1", 421, "unknown_instance"),
        ("mesh-proxy/mesh-proxy-node-b", 421, "unknown_instance"),
        ("orders", 400, "bad_endpoint"),
    ] {
        let r = get(inbound, "/x", &[("x-mesh-endpoint", named)]).await;
        assert_eq!(r.status.as_u16(), status, "{named}: {:?}", r.body);
        assert_eq!(r.headers["x-mesh-refused"], kind, "{named}");
        let reason = r.json()["reason"].as_str().unwrap().to_owned();
        if let Some((_, id)) = named.split_once('/') {
            assert!(reason.contains(id), "{named}: {reason}");
        }
    }
    assert_eq!(a_up.requests(), 0, "never relayed to another node");
    // Its own node's instance is served.
    let r = get(inbound, "/x", &[("x-mesh-endpoint", "orders/orders-b")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.instance(), "orders-b");
    assert_eq!(
        metric(
            &pair.b,
            r#"mesh_proxy_inbound_refused_total{reason="foreign_instance"}"#
        ),
        1.0
    );

    // Callers cannot name the peers' service.
    for headers in [
        &[("host", "mesh-proxy")][..],
        &[("host", "mesh-proxy.mesh")][..],
    ] {
        let r = get(pair.a.addr, "/x", headers).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{headers:?}");
        assert_eq!(r.json()["error"], "unknown_service");
    }
    let r = get(pair.a.addr, "/mesh-proxy/x", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = request(
        pair.a.addr,
        "PUT",
        "/v1/agent/service/register",
        &[],
        r#"{"Name":"evil","ID":"mesh-proxy-node-b","Port":1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    pair.stop().await;
}

#[tokio::test]
async fn a_refusal_by_the_peer_is_a_failed_attempt_retried_elsewhere() {
    // Node-a's table has orders-b on node-b; node-b's own table does not
    // (yet): its proxy refuses, and node-a tries its other instance.
    let b_up = TestUpstream::start("orders-b", Behaviour::Echo).await;
    let a_up = TestUpstream::start("orders-a", Behaviour::Echo).await;
    let b_bridge = FakeBridge::start(vec![]).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let b = proxy_on("node-b", b_bridge.addr, dirs[1].path(), true).await;
    b.wait_routes("node-b's table", |r| r["source"] == "live")
        .await;
    let inbound = b.app().inbound_addr().unwrap();
    let orders_b = on("node-b", endpoint("orders-b", b_up.addr));
    let a_bridge = FakeBridge::start(vec![
        service("orders", vec![orders_b.clone()]),
        peer_service(inbound),
    ])
    .await;
    let a = proxy_on("node-a", a_bridge.addr, dirs[0].path(), false).await;
    a.wait_routes("the peer", |r| r["peers"]["node-b"].is_object())
        .await;

    // Its only instance refused: a 502 as for a failed connect, not the 421.
    let r = get(a.addr, "/orders/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert_eq!(r.json()["error"], "connect_failed");
    assert_eq!(b_up.requests(), 0);

    a_bridge.snapshot(vec![
        service(
            "orders",
            vec![orders_b, on("node-a", endpoint("orders-a", a_up.addr))],
        ),
        peer_service(inbound),
    ]);
    a.wait_service("orders", 2).await;
    for _ in 0..10 {
        let r = get(a.addr, "/orders/", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.instance(), "orders-a");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_unreachable_peer_is_a_failed_connect_and_a_gone_one_means_direct_calls() {
    let up = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let orders = service("orders", vec![on("node-b", endpoint("orders-1", up.addr))]);
    let peer = closed_port();
    let bridge = FakeBridge::start(vec![orders.clone(), peer_service(peer.addr)]).await;
    let dir = tempfile::tempdir().unwrap();
    let a = proxy_on("node-a", bridge.addr, dir.path(), false).await;
    a.wait_routes("the peer", |r| r["peers"]["node-b"].is_object())
        .await;

    let r = get(a.addr, "/orders/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "connect_failed");
    assert_eq!(up.requests(), 0);
    assert!(
        metric(
            &a,
            r#"mesh_proxy_upstream_errors_total{service="orders",kind="connect"}"#
        ) >= 1.0
    );
    let routes = a.routes().await;
    assert!(
        routes["services"]["orders"][0]["consecutive_failures"].as_u64() >= Some(1),
        "the instance's failure: {routes}"
    );

    // Node-b's proxy leaves the registry: its instances are called directly.
    bridge.snapshot(vec![orders]);
    a.wait_routes("no peer", |r| {
        r["peers"].as_object().is_some_and(|p| p.is_empty())
    })
    .await;
    let r = get(a.addr, "/orders/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.requests(), 1);
    a.stop().await;
}

#[tokio::test]
async fn a_list_of_services_adds_the_peers_and_with_an_inbound_listener_the_nodes_own() {
    let bridge = FakeBridge::start(vec![]).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let list = |c: &mut mesh_proxy::Config| c.services = vec!["billing".into()];
    let a = TestProxy::start_with(bridge.addr, dirs[0].path(), list).await;
    let watches = |n: usize| {
        let state = bridge.state.clone();
        async move {
            let w = state.watches.lock().unwrap().clone();
            (w.len() >= n).then(|| w[n - 1].services.clone())
        }
    };
    let first = eventually("a's subscription", || watches(1)).await;
    assert_eq!(first, vec!["billing", "mesh-proxy"]);
    a.stop().await;

    let b = TestProxy::start_with(bridge.addr, dirs[1].path(), |c| {
        list(c);
        c.node = "node-b".into();
        c.inbound = Some(InboundConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            address: Some("127.0.0.1".into()),
        });
    })
    .await;
    let r = request(
        b.addr,
        "PUT",
        "/v1/agent/service/register",
        &[],
        r#"{"Name":"orders","ID":"orders-1","Port":9000}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // The bridge's local listing now has orders (and b's own registration):
    // b subscribes again with them.
    let services = eventually("b's subscription with this node's services", || async {
        let w = bridge.state.watches.lock().unwrap().clone();
        w.last()
            .filter(|w| w.services.iter().any(|s| s == "orders"))
            .map(|w| w.services.clone())
    })
    .await;
    assert_eq!(services, vec!["billing", "mesh-proxy", "orders"]);
    b.stop().await;
    bridge.stop().await;
}
