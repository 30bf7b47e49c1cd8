//! The client against scripted instances: raw sockets that answer with
//! exact bytes, so that every framing case is what the test says.

use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

/// A guard that counts nothing.
fn conn(io: TcpStream) -> Conn {
    Conn::new(io, Box::new(()))
}

/// An instance that reads one request head (and `body` more bytes), then
/// writes `answer`; it keeps the socket open until the client closes it
/// and reports what it read.
async fn instance(
    answers: Vec<&'static [u8]>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        for answer in answers {
            // Up to the end of a head (and of a chunked body, if any).
            let start = seen.len();
            loop {
                let mut b = [0u8; 4096];
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    return seen;
                }
                seen.extend_from_slice(&b[..n]);
                let got = &seen[start..];
                let head_done = got.windows(4).any(|w| w == b"\r\n\r\n");
                let chunked = got
                    .windows(26)
                    .any(|w| w.eq_ignore_ascii_case(b"transfer-encoding: chunked"));
                if head_done && (!chunked || got.ends_with(b"0\r\n\r\n")) {
                    break;
                }
            }
            s.write_all(answer).await.unwrap();
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        seen.extend_from_slice(&rest);
        seen
    });
    (addr, task)
}

async fn connect(addr: std::net::SocketAddr) -> Conn {
    conn(TcpStream::connect(addr).await.unwrap())
}

fn get(path: &str) -> Request<UpstreamBody> {
    Request::get(path)
        .header("host", "svc")
        .body(UpstreamBody::Empty)
        .unwrap()
}

async fn ok(r: Result<Response<Body>, SendError>) -> Response<Body> {
    match r {
        Ok(r) => r,
        Err(e) => panic!("send failed: {}", e.error),
    }
}

async fn collect(body: &mut Body) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((data, trailers))
}

#[tokio::test]
async fn content_length_answer_then_the_connection_is_reused() {
    let (addr, seen) = instance(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ])
    .await;
    let mut r = ok(send(connect(addr).await, get("/a?b=c")).await).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-a"], "1");
    let (data, _) = collect(r.body_mut()).await.unwrap();
    assert_eq!(data, b"hello");
    let conn = r.body_mut().take_reusable().expect("reusable");
    assert!(conn.is_usable());
    let r = ok(send(conn, get("/second")).await).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.body().is_end_stream());
    drop(r);
    let seen = String::from_utf8(seen.await.unwrap()).unwrap();
    assert!(
        seen.starts_with("GET /a?b=c HTTP/1.1\r\nhost: svc\r\n\r\nGET /second HTTP/1.1\r\n"),
        "{seen}"
    );
}

#[tokio::test]
async fn chunked_answer_with_trailers() {
    let (addr, _seen) = instance(vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n",
    ])
    .await;
    let mut r = ok(send(connect(addr).await, get("/")).await).await;
    let (data, trailers) = collect(r.body_mut()).await.unwrap();
    assert_eq!(data, b"hello!");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert!(r.body_mut().take_reusable().is_some());
}

/// An instance that reads one request, writes `answer` and closes.
async fn answers_then_closes(answer: &'static [u8]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut b = [0u8; 1024];
        let _ = s.read(&mut b).await.unwrap();
        s.write_all(answer).await.unwrap();
    });
    addr
}

#[tokio::test]
async fn close_delimited_answer_is_read_to_the_close_and_not_reused() {
    let addr = answers_then_closes(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
    let mut r = ok(send(connect(addr).await, get("/")).await).await;
    let (data, _) = collect(r.body_mut()).await.unwrap();
    assert_eq!(data, b"until the end");
    assert!(r.body_mut().take_reusable().is_none());
}

#[tokio::test]
async fn broken_framing_is_refused() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ] {
        let (addr, _seen) = instance(vec![answer]).await;
        let e = send(connect(addr).await, get("/")).await.unwrap_err();
        assert!(e.unsent.is_none(), "the request was sent");
        assert!(
            e.error.to_string().starts_with("broken HTTP/1.1 exchange"),
            "{}",
            e.error
        );
    }
}

#[tokio::test]
async fn an_oversized_or_overcrowded_head_is_refused() {
    // 70 KB of one header, then 200 small ones: past MAX_HEAD, past MAX_HEADERS.
    let big: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let many: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            (0..200)
                .map(|i| format!("x-{i}: v\r\n"))
                .collect::<String>()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    for (answer, reason) in [
        (big, "response head too large"),
        (many, "too many response header fields"),
    ] {
        let addr = answers_then_closes(answer).await;
        let e = send(connect(addr).await, get("/")).await.unwrap_err();
        assert!(e.error.to_string().contains(reason), "{}", e.error);
    }
}

#[tokio::test]
async fn bad_chunk_size_fails_the_body() {
    let (addr, _seen) = instance(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    ])
    .await;
    let mut r = ok(send(connect(addr).await, get("/")).await).await;
    let e = collect(r.body_mut()).await.unwrap_err();
    assert!(e.to_string().contains("invalid chunk size"), "{e}");
    assert!(r.body_mut().take_reusable().is_none());
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_not_an_end() {
    let addr = answers_then_closes(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort").await;
    let mut r = ok(send(connect(addr).await, get("/")).await).await;
    let e = collect(r.body_mut()).await.unwrap_err();
    assert!(e.to_string().contains("closed in the body"), "{e}");
}

#[tokio::test]
async fn interim_answers_are_skipped_and_head_has_no_body() {
    let (addr, _seen) = instance(vec![
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
    ])
    .await;
    let req = Request::head("/")
        .header("host", "svc")
        .body(UpstreamBody::Empty)
        .unwrap();
    let mut r = ok(send(connect(addr).await, req).await).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.body().is_end_stream(), "a HEAD answer has no body");
    assert!(r.body_mut().take_reusable().is_some());
}

#[tokio::test]
async fn connection_close_and_http10_are_not_reused() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    ] {
        let (addr, _seen) = instance(vec![answer]).await;
        let mut r = ok(send(connect(addr).await, get("/")).await).await;
        assert!(r.body_mut().take_reusable().is_none());
    }
}

#[tokio::test]
async fn streamed_request_body_goes_chunked_and_a_known_one_with_its_length() {
    let (addr, seen) = instance(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ])
    .await;
    // A streamed body of unknown length, through a real hyper Incoming.
    let (tx, body) = incoming_from(vec!["ab", "cde"]).await;
    let req = Request::post("/up")
        .header("host", "svc")
        .body(body)
        .unwrap();
    let mut r = ok(send(connect(addr).await, req).await).await;
    drop(tx);
    let conn = r
        .body_mut()
        .take_reusable()
        .expect("reusable after a whole body");
    let req = Request::post("/empty")
        .header("host", "svc")
        .body(UpstreamBody::Empty)
        .unwrap();
    drop(ok(send(conn, req).await).await);
    let seen = String::from_utf8(seen.await.unwrap()).unwrap();
    assert!(
        seen.contains("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
        "{seen}"
    );
    assert!(
        seen.contains("POST /empty HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n"),
        "{seen}"
    );
}

/// An `UpstreamBody::Incoming` streaming `chunks`, as hyper delivers a
/// client's body of unknown length: served by a local hyper server that
/// hands its request body over.
async fn incoming_from(chunks: Vec<&'static str>) -> (tokio::task::JoinHandle<()>, UpstreamBody) {
    let (body_tx, body_rx) = tokio::sync::oneshot::channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body_tx = std::sync::Mutex::new(Some(body_tx));
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let body_tx = std::sync::Arc::new(body_tx);
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let tx = body_tx.lock().unwrap().take();
            async move {
                if let Some(tx) = tx {
                    let _ = tx.send(req.into_body());
                }
                // Never answers: the test only wants the body.
                std::future::pending::<()>().await;
                Ok::<_, std::convert::Infallible>(Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(s), service)
            .await;
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let frames =
        futures::stream::iter(chunks.into_iter().map(|c| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
        }));
    tokio::spawn(async move {
        let req = Request::post("/").body(StreamBody::new(frames)).unwrap();
        let _ = sender.send_request(req).await;
    });
    let body = tokio::time::timeout(Duration::from_secs(5), body_rx)
        .await
        .unwrap()
        .unwrap();
    (server, UpstreamBody::Incoming(body))
}

#[tokio::test]
async fn a_closed_idle_connection_is_not_usable_and_a_dead_one_gives_the_request_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap().0 });
    let c = connect(addr).await;
    let server_side = accept.await.unwrap();
    assert!(c.is_usable());
    drop(server_side);
    // The FIN arrives: the reactor sees it within moments.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while c.is_usable() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the close was never seen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn upgrade_hands_over_the_socket_with_early_bytes() {
    let (addr, _seen) = instance(vec![
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nearly",
    ])
    .await;
    let req = Request::get("/ws")
        .header("host", "svc")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(UpstreamBody::Empty)
        .unwrap();
    let mut r = ok(send(connect(addr).await, req).await).await;
    assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up = r.extensions_mut().remove::<Upgraded>().unwrap();
    let (_io, early) = up.take().unwrap();
    assert_eq!(&early[..], b"early");
}

#[test]
fn decimal_and_hex_parsing_reject_what_is_not_a_number() {
    assert_eq!(parse_decimal(b"42"), Some(42));
    for bad in [&b""[..], b"-1", b"+1", b"1 2", b"99999999999999999999"] {
        assert_eq!(parse_decimal(bad), None, "{bad:?}");
    }
    assert_eq!(parse_hex(b"1aF"), Some(0x1af));
    for bad in [&b""[..], b"g", b"0x1", b"ffffffffffffffff"] {
        assert_eq!(parse_hex(bad), None, "{bad:?}");
    }
}
