//! Classification against real sockets on loopback: one refusing, one
//! accepting and never answering, one answering slowly, one fast.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

const LIMITS: Limits = Limits {
    timeout: Duration::from_millis(400),
    slow: Duration::from_millis(150),
};

fn http(addr: SocketAddr) -> ProbeSpec {
    ProbeSpec {
        kind: ProbeKind::Http,
        addr: addr.to_string(),
        path: "/health".into(),
    }
}

fn with_kind(addr: SocketAddr, kind: ProbeKind) -> ProbeSpec {
    ProbeSpec { kind, ..http(addr) }
}

/// An address where nothing listens, for as long as the socket is held:
/// bound without listening, it refuses connections, and no other test can
/// take the port meanwhile.
fn closed_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// Accepts connections and answers each after `delay` with `status`;
/// `None` never answers (the connections stay open).
async fn server(delay: Option<Duration>, status: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let Some(delay) = delay else {
                held.push(sock);
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let body = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_closed_port_is_down() {
    let (_held, addr) = closed_port();
    for kind in [ProbeKind::Http, ProbeKind::Tcp, ProbeKind::Grpc] {
        let r = probe(&with_kind(addr, kind), LIMITS).await;
        assert_eq!(r.outcome, Outcome::Down, "{kind}: {r:?}");
        assert!(r.evidence.contains("refused"), "{r:?}");
        assert!(r.latency < LIMITS.timeout, "refusal is quick: {r:?}");
    }
}

#[tokio::test]
async fn a_listener_that_never_answers_is_hung_not_slow() {
    let addr = server(None, "200 OK").await;
    let r = probe(&http(addr), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Hung, "{r:?}");
    assert!(
        r.evidence
            .contains("accepted the connection but sent no response within 400ms"),
        "{r:?}"
    );
    assert!(r.latency >= LIMITS.timeout, "{r:?}");
    let r = probe(&with_kind(addr, ProbeKind::Grpc), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Hung, "{r:?}");
    // A TCP probe only sees the kernel accept: it cannot tell.
    let r = probe(&with_kind(addr, ProbeKind::Tcp), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Up, "{r:?}");
}

#[tokio::test]
async fn an_answer_after_the_threshold_is_slow() {
    let addr = server(Some(Duration::from_millis(250)), "200 OK").await;
    let r = probe(&http(addr), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Slow, "{r:?}");
    assert!(r.evidence.contains("slower than 150ms"), "{r:?}");
    assert!(r.latency >= Duration::from_millis(250) && r.latency < LIMITS.timeout);
}

#[tokio::test]
async fn a_fast_2xx_is_up_and_an_error_status_unhealthy() {
    let addr = server(Some(Duration::ZERO), "200 OK").await;
    let r = probe(&http(addr), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Up, "{r:?}");
    assert!(r.evidence.starts_with("answered 200 in"), "{r:?}");
    let addr = server(Some(Duration::ZERO), "503 Service Unavailable").await;
    let r = probe(&http(addr), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Unhealthy, "{r:?}");
    assert_eq!(r.evidence, "answered 503 Service Unavailable");
}

#[tokio::test]
async fn a_connection_closed_without_an_answer_is_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            drop(sock);
        }
    });
    let r = probe(&http(addr), LIMITS).await;
    assert_eq!(r.outcome, Outcome::Down, "{r:?}");
}

#[tokio::test]
async fn grpc_health_serving_is_up_and_not_serving_unhealthy() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let spec = with_kind(addr, ProbeKind::Grpc);
    let r = probe(&spec, LIMITS).await;
    assert_eq!(r.outcome, Outcome::Up, "{r:?}");
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let r = probe(&spec, LIMITS).await;
    assert_eq!(r.outcome, Outcome::Unhealthy, "{r:?}");
    assert_eq!(r.evidence, "answered NOT_SERVING");
}
