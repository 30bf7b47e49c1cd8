//! The client against hyper's HTTP/2 server, and against an instance that
//! stops answering.

use std::{convert::Infallible, net::SocketAddr, sync::Mutex};

use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;

/// What the instance saw of each request: method, `Content-Length`, body.
type Seen = Arc<Mutex<Vec<(Method, Option<HeaderValue>, Bytes)>>>;

/// An HTTP/2 instance (hyper) that answers `hello` with a trailer, and
/// records what it read.
async fn instance() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let record = record.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let length = parts.headers.get(CONTENT_LENGTH).cloned();
                    record.lock().unwrap().push((parts.method, length, body));
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let body = Full::new(Bytes::from_static(b"hello"))
                        .map_err(|e: Infallible| match e {})
                        .with_trailers(async { Some(Ok(trailers)) });
                    Ok::<_, Infallible>(Response::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, seen)
}

async fn connect(addr: SocketAddr) -> Conn {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (conn, run) = handshake(stream).await.unwrap();
    tokio::spawn(run);
    conn
}

#[tokio::test]
async fn a_request_gets_its_answer_body_and_trailers() {
    let (addr, seen) = instance().await;
    let conn = connect(addr).await;
    for _ in 0..3 {
        let req = Request::get("/").body(UpstreamBody::Empty).unwrap();
        let Ok(response) = conn.send(req).await else {
            panic!("no answer")
        };
        assert_eq!(response.status(), http::StatusCode::OK);
        let body = response.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(body.to_bytes(), "hello");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "three streams on one connection");
    assert_eq!(seen[0], (Method::GET, None, Bytes::new()), "GET: no length");
}

#[tokio::test]
async fn an_empty_post_says_its_length_is_zero() {
    let (addr, seen) = instance().await;
    let conn = connect(addr).await;
    let req = Request::post("/").body(UpstreamBody::Empty).unwrap();
    let Ok(response) = conn.send(req).await else {
        panic!("no answer")
    };
    response.into_body().collect().await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[0],
        (Method::POST, Some(HeaderValue::from(0)), Bytes::new())
    );
}

#[tokio::test]
async fn a_closed_connection_gives_the_request_back_unsent() {
    let (addr, _) = instance().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (conn, run) = handshake(stream).await.unwrap();
    // The connection's task never runs: its end closes the connection.
    drop(run);
    let req = Request::get("/again").body(UpstreamBody::Empty).unwrap();
    let Err(e) = conn.send(req).await else {
        panic!("sent on a dropped connection")
    };
    let unsent = e.unsent.expect("the request back");
    assert_eq!(unsent.uri(), "/again");
}

/// An instance that completes the HTTP/2 handshake, then reads without
/// ever answering, PINGs included.
async fn mute_instance() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // SETTINGS (empty), then SETTINGS with ACK: frame headers only.
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
        let mut sink = vec![0u8; 4096];
        while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    addr
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_stops_answering_pings_is_closed() {
    let addr = mute_instance().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (conn, run) = handshake(stream).await.unwrap();
    let started = tokio::time::Instant::now();
    // Virtual time: a connection that never pings would end at no
    // deadline; this one must end well before a minute.
    let ended = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the connection ended");
    let e = ended.expect_err("the connection ends with an error");
    assert!(e.to_string().contains("PING unanswered"), "{e}");
    assert!(conn.is_closed());
    assert_eq!(started.elapsed(), KEEP_ALIVE.0 + KEEP_ALIVE.1);
}
