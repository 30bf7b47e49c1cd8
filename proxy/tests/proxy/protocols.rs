//! HTTP/1.1 and h2c in, HTTP/1.1 or h2c out, gRPC end to end (unary,
//! server streaming, status in trailers, the proxy's own errors as gRPC
//! statuses), bodies streamed both ways.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use hyper::body::Frame;
use mesh_proto::v1::{
    self as pb, discovery_client::DiscoveryClient, registry_client::RegistryClient,
};

use crate::{
    support::{Behaviour, FakeBridge, TestProxy, TestUpstream, endpoint, get, service},
    upstreams::{
        GrpcUpstream, StreamEcho, channel_body, empty, grpc_channel, h2_client, next_frame,
    },
};

fn tagged(id: &str, addr: std::net::SocketAddr, tag: &str) -> pb::Endpoint {
    let mut e = endpoint(id, addr);
    e.tags = vec![tag.into()];
    e
}

#[tokio::test]
async fn h2c_clients_reach_http1_instances() {
    let a = TestUpstream::start("web-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service("web", vec![endpoint("web-1", a.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("web", 1).await;

    let mut h2 = h2_client(proxy.addr).await;
    for path in ["http://web/x?q=1", "http://127.0.0.1/web/x?q=1"] {
        let req = Request::get(path).body(empty()).unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(resp.headers()["x-instance"], "web-1");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["version"], "HTTP/1.1", "{json}");
        assert_eq!(json["path"], "/x?q=1", "{json}");
        assert_eq!(
            json["headers"]["host"][0],
            if path.contains("//web") {
                "web"
            } else {
                "127.0.0.1"
            }
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn instances_that_say_h2_are_called_over_one_h2c_connection() {
    // h2c only: an HTTP/1.1 call would fail.
    let by_tag = StreamEcho::start_h2_only().await;
    let by_meta = StreamEcho::start_h2_only().await;
    let mut meta = endpoint("meta-1", by_meta.addr);
    meta.meta.insert("protocol".into(), "h2".into());
    let bridge = FakeBridge::start(vec![
        service("tagged", vec![tagged("tagged-1", by_tag.addr, "h2")]),
        service("meta", vec![meta]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("tagged", 1).await;
    proxy.wait_service("meta", 1).await;

    for (name, upstream) in [("tagged", &by_tag), ("meta", &by_meta)] {
        // 40 concurrent HTTP/1.1 callers, each on its own connection.
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let addr = proxy.addr;
                let path = format!("/{name}/");
                tokio::spawn(async move { get(addr, &path, &[]).await })
            })
            .collect();
        for call in calls {
            let r = call.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{name}: {:?}", r.body);
            assert_eq!(r.headers["x-version"], "HTTP/2.0", "{name}");
        }
        assert_eq!(
            upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
            40
        );
        assert_eq!(
            upstream
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{name}: one multiplexed connection"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_cross_the_proxy_with_their_status() {
    // No tag: gRPC goes over HTTP/2 whatever the instance declares.
    let grpc = GrpcUpstream::start().await;
    let bridge = FakeBridge::start(vec![service(
        "grpcsvc",
        vec![endpoint("grpc-1", grpc.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("grpcsvc", 1).await;
    let channel = grpc_channel(proxy.addr, "grpcsvc").await;

    // Unary, OK and with an error status.
    let mut registry = RegistryClient::new(channel.clone());
    let reg = |name: &str| pb::RegisterRequest {
        service: Some(pb::ServiceRegistration {
            name: name.into(),
            ..Default::default()
        }),
    };
    let ok = registry.register(reg("orders")).await.unwrap();
    assert!(ok.get_ref().queued);
    let err = registry.register(reg("fail")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "refused: fail");

    // Server streaming: every message, in order, as it is sent.
    let mut discovery = DiscoveryClient::new(channel.clone());
    let names: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    let mut stream = discovery
        .watch(pb::WatchRequest {
            node: "n".into(),
            services: names.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut first_at = None;
    let start = Instant::now();
    while let Some(update) = stream.message().await.unwrap() {
        first_at.get_or_insert(start.elapsed());
        let Some(pb::route_update::Kind::Snapshot(s)) = update.kind else {
            panic!("not a snapshot")
        };
        got.push(s.services[0].name.clone());
    }
    assert_eq!(got, names);
    // Streamed, not buffered until the end (5 × 20 ms).
    assert!(
        first_at.unwrap() < start.elapsed() - Duration::from_millis(50),
        "first message at {first_at:?} of {:?}",
        start.elapsed()
    );

    // A status sent in the trailers after messages.
    let mut stream = discovery
        .watch(pb::WatchRequest {
            node: "break".into(),
            services: vec!["a".into(), "b".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert!(stream.message().await.unwrap().is_some());
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert_eq!(status.message(), "stream broke");
    proxy.stop().await;
}

#[tokio::test]
async fn grpc_callers_get_the_proxys_own_errors_as_grpc_statuses() {
    let hang = TestUpstream::start("hang-1", Behaviour::Hang).await;
    let bridge = FakeBridge::start(vec![
        service("empty", vec![]),
        service("hung", vec![endpoint("hang-1", hang.addr)]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.request_timeout = Duration::from_millis(300);
    })
    .await;
    proxy.wait_service("empty", 0).await;
    let register = pb::RegisterRequest::default();
    for (name, code) in [
        ("empty", tonic::Code::Unavailable),
        ("nosuch", tonic::Code::Unimplemented),
        ("hung", tonic::Code::DeadlineExceeded),
    ] {
        let mut client = RegistryClient::new(grpc_channel(proxy.addr, name).await);
        let status = client.register(register.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(status.message().contains(name), "{name}: {status:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn request_and_response_bodies_stream_both_ways_with_trailers() {
    let echo = StreamEcho::start().await;
    let bridge = FakeBridge::start(vec![
        service("plain", vec![endpoint("plain-1", echo.addr)]),
        service("multi", vec![tagged("multi-1", echo.addr, "h2")]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("plain", 1).await;
    proxy.wait_service("multi", 1).await;

    // An h2c client through to an h1 and to an h2c instance: each chunk
    // comes back before the next is sent, so nothing waits for a whole body.
    for (name, upstream_version) in [("plain", "HTTP/1.1"), ("multi", "HTTP/2.0")] {
        let mut h2 = h2_client(proxy.addr).await;
        let (tx, body) = channel_body();
        let req = Request::post(format!("http://{name}/echo"))
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let resp = h2.send_request(req);
        tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("response headers while the request body still streams")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-version"], upstream_version);
        let mut body = resp.into_body();
        let mut echoed = Vec::new();
        for chunk in [&b"one"[..], b"two", b"three"] {
            if chunk != b"one" {
                tx.send(Ok(Frame::data(Bytes::from_static(chunk))))
                    .await
                    .unwrap();
            }
            let mut got = Vec::new();
            while got.len() < chunk.len() {
                let frame = next_frame(&mut body).await.expect("echo of a chunk");
                got.extend_from_slice(&frame.into_data().unwrap());
            }
            echoed.push(got);
        }
        assert_eq!(
            echoed,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        drop(tx);
        // Trailers cross h2c → h2c; an HTTP/1.1 hop carries them only chunked.
        let mut trailers = None;
        while let Some(frame) = next_frame(&mut body).await {
            if let Ok(t) = frame.into_trailers() {
                trailers = Some(t);
            }
        }
        if name == "multi" {
            let trailers = trailers.expect("trailers from an h2 instance");
            assert_eq!(trailers["x-echo-frames"], "3");
        }
    }
    proxy.stop().await;
}
