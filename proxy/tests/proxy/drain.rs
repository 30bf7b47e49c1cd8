//! Shutdown and takeover without failing a request: requests in flight
//! finish, kept-alive HTTP/1 connections close after their next response,
//! HTTP/2 ones get a GOAWAY, and a second proxy on the same ports
//! (`SO_REUSEPORT`) takes over while the first drains.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use tokio::net::TcpStream;

use crate::{
    support::{Behaviour, FakeBridge, TestProxy, TestUpstream, endpoint, eventually, service},
    upstreams::{KeepAlive, StreamEcho, empty, h2_client},
};

/// Waits until the proxy's listener refuses connections (it has closed).
async fn wait_listener_closed(addr: std::net::SocketAddr) {
    eventually("the listener closed", || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_request_in_flight_completes_during_shutdown() {
    let echo = StreamEcho::start().await;
    let bridge = FakeBridge::start(vec![service("svc", vec![endpoint("svc-1", echo.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("svc", 1).await;
    let addr = proxy.addr;

    let mut client = KeepAlive::new(addr);
    let call = tokio::spawn(async move { client.get("127.0.0.1", "/svc/slow").await });
    eventually("the request reached the instance", || async {
        (echo.requests.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let stopping = tokio::spawn(proxy.stop());
    wait_listener_closed(addr).await;
    assert!(!call.is_finished(), "the slow request is still in flight");

    let (status, connection) = call.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(connection.as_deref(), Some("close"));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("drained within the grace period")
        .unwrap();
}

#[tokio::test]
async fn kept_alive_connections_close_after_their_next_response_and_h2_gets_goaway() {
    let a = TestUpstream::start("svc-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service("svc", vec![endpoint("svc-1", a.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("svc", 1).await;
    let addr = proxy.addr;

    let mut h1 = KeepAlive::new(addr);
    assert_eq!(h1.get("svc", "/").await.unwrap(), (StatusCode::OK, None));
    let mut h2 = h2_client(addr).await;
    let req = Request::get("http://svc/").body(empty()).unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), StatusCode::OK);

    let started = Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    wait_listener_closed(addr).await;
    // HTTP/2: a GOAWAY at once, well before idle HTTP/1 connections go.
    eventually("the h2 connection got its GOAWAY", || async {
        h2.is_closed().then_some(())
    })
    .await;
    assert!(
        started.elapsed() < mesh_proxy::server::IDLE_CLOSE,
        "GOAWAY after {:?}",
        started.elapsed()
    );
    // HTTP/1.1: the next exchange is answered, and says close.
    assert_eq!(
        h1.get("svc", "/").await.unwrap(),
        (StatusCode::OK, Some("close".into()))
    );
    assert_eq!(h1.connections, 1, "no request needed a new connection");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("drained")
        .unwrap();
}

#[tokio::test]
async fn idle_http1_connections_are_closed_after_a_while() {
    let a = TestUpstream::start("svc-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service("svc", vec![endpoint("svc-1", a.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("svc", 1).await;
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();

    let started = Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await
    .expect("the idle connection is closed")
    .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(started.elapsed() >= mesh_proxy::server::IDLE_CLOSE);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_second_proxy_takes_over_the_ports_and_no_request_fails() {
    let a = TestUpstream::start("web-1", Behaviour::Echo).await;
    let bridge = FakeBridge::start(vec![service("web", vec![endpoint("web-1", a.addr)])]).await;
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = TestProxy::start(bridge.addr, dir1.path()).await;
    first.wait_service("web", 1).await;
    let (addr, admin) = (first.addr, first.admin);

    // Keep-alive callers, as services are, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut client = KeepAlive::new(addr);
                let mut failures = Vec::new();
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match client.get("web", "/").await {
                        Ok((StatusCode::OK, _)) => {}
                        other => failures.push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (failures, client.connections)
            })
        })
        .collect();
    let wait_more = |n: usize| {
        let done = done.clone();
        async move {
            let target = done.load(Ordering::Relaxed) + n;
            eventually("the load goes on", || async {
                (done.load(Ordering::Relaxed) >= target).then_some(())
            })
            .await;
        }
    };
    wait_more(200).await;

    let second = TestProxy::start_with(bridge.addr, dir2.path(), |c| {
        c.listen = addr;
        c.admin_listen = admin;
    })
    .await;
    assert_eq!((second.addr, second.admin), (addr, admin));
    // It listens once its table is loaded (/routes on the shared admin
    // port may be either proxy's: ask its registry).
    eventually("the second proxy loaded its table", || async {
        second
            .registry
            .render()
            .contains("mesh_proxy_discovery_updates_total 1")
            .then_some(())
    })
    .await;
    wait_more(200).await;
    first.stop().await;
    wait_more(500).await;
    stop.store(true, Ordering::Relaxed);

    let mut failures = Vec::new();
    let mut connections = 0;
    for w in workers {
        let (f, c) = w.await.unwrap();
        failures.extend(f);
        connections += c;
    }
    let served_by_second = second
        .registry
        .render()
        .lines()
        .find(|l| l.starts_with(r#"mesh_proxy_requests_total{service="web",code_class="2xx"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!(
        "takeover: {} requests, {} failed, {connections} connections, {served_by_second} served by the second proxy",
        done.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(connections > 4, "the callers moved to new connections");
    // Of the 500 requests after the first proxy stopped, those still in
    // flight on its connections (at most a few per caller) were its own.
    assert!(
        served_by_second >= 400.0,
        "the second proxy serves: {served_by_second}"
    );
    second.stop().await;
}
