//! Proxy hardening: one test per HTTP attack class, each written as raw
//! bytes on a socket, asserting what the client gets back, what the
//! instances saw (never a smuggled second request) and whether the
//! connection was closed.
//!
//! Covered in `hygiene.rs` and not repeated here: hop-by-hop headers and
//! those `Connection` names stripped both ways
//! (`hop_by_hop_and_connection_named_headers_are_stripped_both_ways`),
//! `X-Forwarded-For` appended with the client's address
//! (`x_forwarded_for_gets_the_client_address_appended`), two `Host`
//! headers (`two_host_headers_are_a_bad_request`), the header size limit
//! (`a_100_kib_header_gets_431`) and the header read timeout
//! (`a_client_slow_to_send_headers_is_disconnected`).

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_proxy::InboundConfig;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::support::{
    Behaviour, DEADLINE, FakeBridge, TestProxy, TestUpstream, endpoint, get, raw, service,
};

/// A request the instances must never see: smuggled in a body.
const SMUGGLED: &str = "GET /orders/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

struct Mesh {
    orders: TestUpstream,
    billing: TestUpstream,
    proxy: TestProxy,
    _bridge: FakeBridge,
    _dir: tempfile::TempDir,
}

/// Services `orders` and `billing`, one echo instance each, behind a proxy.
async fn mesh() -> Mesh {
    let orders = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let billing = TestUpstream::start("billing-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![
        service("orders", vec![endpoint("orders-1", orders.addr)]),
        service("billing", vec![endpoint("billing-1", billing.addr)]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    proxy.wait_service("billing", 1).await;
    Mesh {
        orders,
        billing,
        proxy,
        _bridge: bridge,
        _dir: dir,
    }
}

impl Mesh {
    /// Asserts that no instance saw anything but `orders` and `billing`.
    fn assert_seen(&self, orders: &[&str], billing: &[&str]) {
        assert_eq!(self.orders.seen(), orders, "orders saw");
        assert_eq!(self.billing.seen(), billing, "billing saw");
    }
}

/// Responses in `text` (a whole connection's worth, as `raw` returns it).
fn statuses(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect()
}

/// The JSON body of the one response in `text`.
fn json_of(text: &str) -> serde_json::Value {
    let (_, body) = text.split_once("\r\n\r\n").expect("a response head");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A head `raw` reads whole: it asks for the connection to close.
fn post(path: &str, framing: &str, body: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{framing}\r\n{body}")
        .into_bytes()
}

/// Reads one response (a `content-length` body) from `stream`, as text.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    let text = String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                    buf.drain(..end + 4 + len);
                    assert!(buf.is_empty(), "more after one response: {buf:?}");
                    return text;
                }
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("response in time")
}

/// Asserts that the proxy closes `stream` (nothing more to read).
async fn assert_closed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    match tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await {
        Ok(Ok(_)) | Ok(Err(_)) => {
            assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        }
        Err(_) => panic!("the proxy kept the connection open"),
    }
}

async fn connect(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// CL.TE and TE.CL: with both headers the body is read as chunked (RFC
/// 9112 §6.1), `Content-Length` goes, and the connection closes after the
/// answer, whatever follows the chunked body.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_then_closed() {
    let mesh = mesh().await;
    let body = format!("5\r\nhello\r\n0\r\n\r\n{SMUGGLED}");
    for framing in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 200\r\n",
    ] {
        // No `Connection: close`: the proxy closes on its own.
        let request = format!("POST /orders/up HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n{body}");
        let response = raw(mesh.proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&response), ["200"], "{framing}: {response}");
        assert!(response.to_ascii_lowercase().contains("connection: close"));
        let seen = json_of(&response);
        assert_eq!(seen["body_len"], 5, "{framing}: {seen}");
        assert!(seen["headers"].get("content-length").is_none(), "{seen}");
    }
    mesh.assert_seen(&["POST /up"; 3], &[]);
    mesh.proxy.stop().await;
}

/// Differing or malformed `Content-Length`: 400, never "the first" or
/// "the last"; equal duplicates are one length.
#[tokio::test]
async fn differing_or_malformed_content_lengths_are_a_bad_request() {
    let mesh = mesh().await;
    for framing in [
        "Content-Length: 5\r\nContent-Length: 10\r\n",
        "Content-Length: 10\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 10\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: 5 5\r\n",
    ] {
        let response = raw(mesh.proxy.addr, &post("/orders/up", framing, "hello")).await;
        assert_eq!(statuses(&response), ["400"], "{framing}: {response}");
    }
    mesh.assert_seen(&[], &[]);
    let response = raw(
        mesh.proxy.addr,
        &post(
            "/orders/up",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "hello",
        ),
    )
    .await;
    assert_eq!(statuses(&response), ["200"], "{response}");
    assert_eq!(json_of(&response)["body_len"], 5);
    mesh.proxy.stop().await;
}

/// `Transfer-Encoding` other than one `chunked` is refused with 400 and the
/// connection closed; trailing whitespace is no part of a value (RFC 9112
/// §5.1), so `chunked ` is chunked.
#[tokio::test]
async fn transfer_encoding_variants_are_a_bad_request() {
    let mesh = mesh().await;
    let body = format!("5\r\nhello\r\n0\r\n\r\n{SMUGGLED}");
    for (framing, names_it) in [
        ("Transfer-Encoding: xchunked\r\n", false),
        ("Transfer-Encoding : chunked\r\n", false),
        ("Transfer-Encoding: chunked, chunked\r\n", true),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            true,
        ),
        ("Transfer-Encoding: gzip, chunked\r\n", true),
        (
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            true,
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            true,
        ),
    ] {
        // Without `Connection: close`: a 400 closes the connection.
        let request = format!("POST /orders/up HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n{body}");
        let response = raw(mesh.proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&response), ["400"], "{framing}: {response}");
        if names_it {
            assert!(response.contains("Transfer-Encoding"), "{response}");
        }
    }
    // HTTP/1.0 has no transfer codings.
    let request = format!(
        "POST /orders/up HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
    );
    let response = raw(mesh.proxy.addr, request.as_bytes()).await;
    assert_eq!(statuses(&response), ["400"], "{response}");
    mesh.assert_seen(&[], &[]);

    let request = format!(
        "POST /orders/up HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked \r\nConnection: close\r\n\r\n{body}"
    );
    let response = raw(mesh.proxy.addr, request.as_bytes()).await;
    assert_eq!(statuses(&response), ["200"], "{response}");
    assert_eq!(json_of(&response)["body_len"], 5);
    mesh.assert_seen(&["POST /up"], &[]);
    mesh.proxy.stop().await;
}

/// obs-fold (a field line starting with a space or a tab) and whitespace
/// before the first field: 400 (RFC 9112 §5.2, §2.2).
#[tokio::test]
async fn obs_fold_is_a_bad_request() {
    let mesh = mesh().await;
    for head in [
        "GET /orders/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n b\r\n",
        "GET /orders/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n\tb\r\n",
        "GET /orders/x HTTP/1.1\r\nX-A: a\r\n Host: billing\r\n",
        "GET /orders/x HTTP/1.1\r\n Host: 127.0.0.1\r\n",
    ] {
        let request = format!("{head}Connection: close\r\n\r\n");
        let response = raw(mesh.proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&response), ["400"], "{head:?}: {response}");
    }
    mesh.assert_seen(&[], &[]);
    mesh.proxy.stop().await;
}

/// NUL, CR and LF inside a field name or value, and other bytes no name
/// may hold: 400, nothing forwarded.
#[tokio::test]
async fn nul_cr_and_lf_inside_fields_are_a_bad_request() {
    let mesh = mesh().await;
    for field in [
        &b"X-A\0: b"[..],
        b"X-A: b\0c",
        b"X-A: \0",
        b"X\rA: b",
        b"X-A: b\rc",
        b"X-A: b\rTransfer-Encoding: chunked",
        b"X\nA: b",
        b"X-A: b\nc",
        b"X A: b",
        b"X-A(: b",
        b": b",
    ] {
        let mut request = b"GET /orders/x HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
        request.extend_from_slice(field);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let response = raw(mesh.proxy.addr, &request).await;
        assert_eq!(
            statuses(&response),
            ["400"],
            "{:?}: {response}",
            String::from_utf8_lossy(field)
        );
    }
    mesh.assert_seen(&[], &[]);
    mesh.proxy.stop().await;
}

/// More than 100 header fields: 431, whatever their size (the size limit:
/// `hygiene::a_100_kib_header_gets_431`).
#[tokio::test]
async fn too_many_header_fields_get_431() {
    let mesh = mesh().await;
    let head = |n: usize| {
        let mut request = "GET /orders/x HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_owned();
        for i in 0..n {
            request.push_str(&format!("X-F{i}: {i}\r\n"));
        }
        request.push_str("Connection: close\r\n\r\n");
        request
    };
    let response = raw(mesh.proxy.addr, head(150).as_bytes()).await;
    assert_eq!(statuses(&response), ["431"], "{response:.300}");
    let response = raw(mesh.proxy.addr, head(10_000).as_bytes()).await;
    assert_eq!(statuses(&response), ["431"], "{response:.300}");
    mesh.assert_seen(&[], &[]);
    // Under the limit (two fields of the head are Host and Connection).
    let response = raw(mesh.proxy.addr, head(90).as_bytes()).await;
    assert_eq!(statuses(&response), ["200"], "{response:.300}");
    mesh.assert_seen(&["GET /x"], &[]);
    mesh.proxy.stop().await;
}

/// Hop-by-hop: a client naming the proxy's own headers in `Connection`
/// cannot have them dropped: the names go first, then the proxy adds its
/// own (`X-Forwarded-For`). `Host`, which routing read, is no connection
/// option and stays.
#[tokio::test]
async fn connection_cannot_remove_what_the_proxy_adds() {
    let mesh = mesh().await;
    let r = get(
        mesh.proxy.addr,
        "/x",
        &[
            ("host", "orders"),
            ("connection", "X-Forwarded-For, Host"),
            ("x-forwarded-for", "6.6.6.6"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.instance(), "orders-1");
    let seen = r.json()["headers"].clone();
    assert_eq!(
        seen["x-forwarded-for"],
        serde_json::json!(["127.0.0.1"]),
        "{seen}"
    );
    assert_eq!(seen["host"], serde_json::json!(["orders"]), "{seen}");
    assert!(seen.get("connection").is_none(), "{seen}");
    mesh.assert_seen(&["GET /x"], &[]);
    mesh.proxy.stop().await;
}

/// The mesh's own headers (`x-mesh-*`: the instance named for a peer, its
/// protocol, a peer's refusal) never come from a client: removed before
/// the request goes on.
#[tokio::test]
async fn client_supplied_mesh_headers_are_stripped() {
    let mesh = mesh().await;
    let r = get(
        mesh.proxy.addr,
        "/orders/x",
        &[
            ("x-mesh-endpoint", "billing/billing-1"),
            ("x-mesh-protocol", "h2"),
            ("x-mesh-refused", "overloaded"),
            ("x-mesh-anything", "1"),
            ("x-meshy", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.instance(), "orders-1");
    let seen = r.json()["headers"].clone();
    let names: Vec<&String> = seen.as_object().unwrap().keys().collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-mesh-")),
        "mesh headers reached the instance: {names:?}"
    );
    assert_eq!(seen["x-meshy"][0], "kept");
    mesh.assert_seen(&["GET /x"], &[]);
    mesh.proxy.stop().await;
}

/// An instance that answers every request as if it were a peer proxy
/// refusing it (`x-mesh-refused`).
struct Impostor {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Impostor {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service_fn(|_req| async {
                    let response = Response::builder()
                        .header("x-mesh-refused", "overloaded")
                        .body(Full::new(Bytes::from_static(b"the instance's own answer")))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { addr, task }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Nor does an instance set them: its `x-mesh-refused` neither reaches
/// the client nor, through another node's proxy, passes for that proxy's
/// refusal (a failed attempt the caller would retry and count against
/// the instance).
#[tokio::test]
async fn an_instance_cannot_pass_for_a_refusing_peer() {
    let impostor = Impostor::start().await;
    let at = |node: &str, id: &str| {
        let mut e = endpoint(id, impostor.addr);
        e.node = node.into();
        e
    };
    let services = vec![
        service("local", vec![at("node-a", "local-1")]),
        service("remote", vec![at("node-b", "remote-1")]),
    ];
    let bridge = FakeBridge::start(services.clone()).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let b = TestProxy::start_with(bridge.addr, dirs[1].path(), |c| {
        c.node = "node-b".into();
        c.inbound = Some(InboundConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            address: Some("127.0.0.1".into()),
        });
    })
    .await;
    let inbound = b.app().inbound_addr().unwrap();
    let a = TestProxy::start_with(bridge.addr, dirs[0].path(), |c| c.node = "node-a".into()).await;
    let mut all = services;
    let mut peer = endpoint("mesh-proxy-node-b", inbound);
    peer.node = "node-b".into();
    all.push(service("mesh-proxy", vec![peer]));
    bridge.snapshot(all);
    a.wait_routes("node-b's proxy as a peer", |r| {
        r["peers"]["node-b"]["port"] == inbound.port() && r["services"]["remote"].is_array()
    })
    .await;
    for path in ["/local/x", "/remote/x"] {
        let r = get(a.addr, path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        assert_eq!(&r.body[..], b"the instance's own answer", "{path}");
        assert!(
            r.headers.get("x-mesh-refused").is_none(),
            "{path}: {:?}",
            r.headers
        );
    }
    a.stop().await;
    b.stop().await;
    bridge.stop().await;
}

/// One normalized path for routing, policy and the instance: dot-segments
/// removed (also encoded ones) and slashes merged before routing, the
/// instance sent the normalized path; encoded slashes and backslashes
/// refused with 400.
#[tokio::test]
async fn routing_and_the_instance_share_one_normalized_path() {
    let mesh = mesh().await;
    let via = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    for (target, host, instance, path) in [
        ("/orders/a/../b", "127.0.0.1", "orders", "/b"),
        ("//orders//x", "127.0.0.1", "orders", "/x"),
        ("/orders/./x/", "127.0.0.1", "orders", "/x/"),
        ("/orders/../billing/x", "127.0.0.1", "billing", "/x"),
        (
            "/orders/%2e%2E/billing/y?q=/../",
            "127.0.0.1",
            "billing",
            "/y?q=/../",
        ),
        ("/v1/agent/../../billing/z", "127.0.0.1", "billing", "/z"),
        ("/a/./b/../c", "orders", "orders", "/a/c"),
        ("/../../etc//passwd", "orders", "orders", "/etc/passwd"),
    ] {
        let response = raw(mesh.proxy.addr, via(target, host).as_bytes()).await;
        assert_eq!(statuses(&response), ["200"], "{target}: {response}");
        let seen = json_of(&response);
        assert_eq!(seen["instance"], format!("{instance}-1"), "{target}");
        assert_eq!(seen["path"], path, "{target}");
    }
    let before = (mesh.orders.seen(), mesh.billing.seen());
    for (target, host) in [
        ("/orders/a%2F..%2F..%2Fbilling", "127.0.0.1"),
        ("/orders%2Fx", "127.0.0.1"),
        ("/admin%5c..%5Cx", "orders"),
        ("/x%00.json", "orders"),
    ] {
        let response = raw(mesh.proxy.addr, via(target, host).as_bytes()).await;
        assert_eq!(statuses(&response), ["400"], "{target}: {response}");
        assert!(response.contains("encoded"), "{target}: {response}");
    }
    assert_eq!((mesh.orders.seen(), mesh.billing.seen()), before);
    mesh.proxy.stop().await;
}

/// Upgrade: the connection becomes a tunnel only after a 101. Bytes sent
/// right behind an upgrade request the instance answers otherwise are the
/// proxy's to read, as the next request, never passed to the instance raw.
#[tokio::test]
async fn bytes_after_an_upgrade_answered_without_101_are_not_tunnelled() {
    let mesh = mesh().await;
    let upgrade = "GET /orders/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n\
                   Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    // A request behind it: routed by the proxy, to billing.
    let next = "GET /billing/after HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let response = raw(mesh.proxy.addr, format!("{upgrade}{next}").as_bytes()).await;
    assert_eq!(statuses(&response), ["200", "200"], "{response}");
    assert!(response.contains("x-instance: billing-1"), "{response}");
    mesh.assert_seen(&["GET /ws"], &["GET /after"]);

    // Tunnel bytes behind it (a WebSocket frame): not HTTP, so a 400 and
    // the connection closed; the instance never sees them.
    let mut request = upgrade.as_bytes().to_vec();
    request.extend_from_slice(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    request.extend_from_slice(SMUGGLED.as_bytes());
    let response = raw(mesh.proxy.addr, &request).await;
    assert_eq!(statuses(&response), ["200", "400"], "{response}");
    mesh.assert_seen(&["GET /ws", "GET /ws"], &["GET /after"]);
    mesh.proxy.stop().await;
}

/// A request the proxy answers itself (404, 400) without reading its
/// body: the body is discarded when it is there whole, and the
/// connection closed otherwise; it is never parsed as the next request.
#[tokio::test]
async fn a_refused_requests_unread_body_is_never_read_as_a_request() {
    let mesh = mesh().await;
    let refused = [
        // No such service: 404.
        "POST /nowhere/x HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        // A path refused: 400.
        "POST /orders/a%2Fb HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        // Two Host headers: 400.
        "POST /orders/x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: orders\r\n",
    ];
    let after = "GET /orders/after HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    for head in refused {
        // The body whole, with a request behind it: the body goes, the
        // request after it is answered (or the connection closed).
        let whole = format!(
            "{head}Content-Length: {}\r\n\r\n{SMUGGLED}{after}",
            SMUGGLED.len()
        );
        let response = raw(mesh.proxy.addr, whole.as_bytes()).await;
        let got = statuses(&response);
        assert!(matches!(got[0], "404" | "400"), "{head}: {response}");
        assert!(got[1..] == ["200"] || got.len() == 1, "{head}: {response}");
        // Chunked, the same.
        let chunked = format!(
            "{head}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n{after}",
            SMUGGLED.len()
        );
        let response = raw(mesh.proxy.addr, chunked.as_bytes()).await;
        assert!(
            matches!(statuses(&response)[0], "404" | "400"),
            "{head}: {response}"
        );

        // A body announced longer than what came: the proxy answers and
        // closes rather than wait for it or read the rest as a request.
        let partial = format!("{head}Content-Length: 1000\r\n\r\n{SMUGGLED}");
        let mut stream = connect(mesh.proxy.addr, partial.as_bytes()).await;
        let response = read_response(&mut stream).await;
        assert!(
            matches!(statuses(&response)[..], ["404" | "400"]),
            "{head}: {response}"
        );
        let _ = stream.write_all(SMUGGLED.as_bytes()).await;
        assert_closed(&mut stream).await;
    }
    // Only the requests sent after a body reached an instance.
    let seen = mesh.orders.seen();
    assert!(seen.iter().all(|s| s == "GET /after"), "{seen:?}");
    assert!(mesh.billing.seen().is_empty());
    mesh.proxy.stop().await;
}
