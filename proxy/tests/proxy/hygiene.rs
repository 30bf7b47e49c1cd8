//! HTTP hygiene: hop-by-hop headers, X-Forwarded-For, Host, header limits.

use std::time::Duration;

use http::StatusCode;

use crate::support::{Behaviour, FakeBridge, TestProxy, TestUpstream, endpoint, get, raw, service};

async fn setup() -> (TestUpstream, FakeBridge, tempfile::TempDir, TestProxy) {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    (orders, bridge, dir, proxy)
}

#[tokio::test]
async fn hop_by_hop_and_connection_named_headers_are_stripped_both_ways() {
    let (_orders, _bridge, _dir, proxy) = setup().await;
    let r = get(
        proxy.addr,
        "/orders/",
        &[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers, deflate"),
            ("trailer", "x-t"),
            ("upgrade", "h2c-not-really"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-kept", "yes"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = r.json()["headers"].clone();
    for gone in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the instance: {seen}"
        );
    }
    assert_eq!(seen["x-kept"][0], "yes");
    // `TE: trailers` alone crosses (gRPC needs it; HTTP/2 allows no other).
    assert_eq!(seen["te"], serde_json::json!(["trailers"]));
    // The instance's own hop-by-hop headers stop at the proxy too.
    assert!(r.headers.get("x-up-secret").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("keep-alive").is_none(), "{:?}", r.headers);
    assert_eq!(r.headers["x-instance"], "orders-1");
    proxy.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_gets_the_client_address_appended() {
    let (_orders, _bridge, _dir, proxy) = setup().await;
    let r = get(proxy.addr, "/orders/", &[]).await;
    assert_eq!(r.json()["headers"]["x-forwarded-for"][0], "127.0.0.1");
    let r = get(proxy.addr, "/orders/", &[("x-forwarded-for", "10.9.8.7")]).await;
    assert_eq!(
        r.json()["headers"]["x-forwarded-for"][0],
        "10.9.8.7, 127.0.0.1"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn two_host_headers_are_a_bad_request() {
    let (orders, _bridge, _dir, proxy) = setup().await;
    let response = raw(
        proxy.addr,
        b"GET /api HTTP/1.1\r\nHost: orders\r\nHost: billing\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("\"bad_request\""), "{response}");
    assert!(response.contains("Host"), "{response}");
    assert_eq!(orders.requests(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_100_kib_header_gets_431() {
    let (orders, _bridge, _dir, proxy) = setup().await;
    let mut request = b"GET /orders/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 100 * 1024));
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let response = raw(proxy.addr, &request).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response:.200}");
    assert_eq!(orders.requests(), 0);
    // A header block under the limit goes through.
    let big = "b".repeat(30 * 1024);
    let r = get(proxy.addr, "/orders/", &[("x-big", &big)]).await;
    assert_eq!(r.status, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_slow_to_send_headers_is_disconnected() {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("orders-1", orders.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    let started = tokio::time::Instant::now();
    // Half a request head, then silence: the proxy hangs up.
    let response = raw(proxy.addr, b"GET /orders/ HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(orders.requests(), 0);
    proxy.stop().await;
}
