//! HTTP/1.1 upgrades: a WebSocket tunnelled once the instance answers 101,
//! and an upgrade the instance refuses, relayed as a plain answer.

use futures::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::{client_async, tungstenite::Message};

use crate::{
    support::{DEADLINE, FakeBridge, TestProxy, endpoint, service},
    upstreams::{UpgradeReply, UpgradeUpstream},
};

#[tokio::test]
async fn websocket_echo_is_tunnelled_after_the_101() {
    let ws = UpgradeUpstream::start(UpgradeReply::WebSocket).await;
    let bridge = FakeBridge::start(vec![service("chat", vec![endpoint("chat-1", ws.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("chat", 1).await;

    for url in ["ws://chat/ws", "ws://127.0.0.1/chat/ws"] {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut socket, response) = tokio::time::timeout(DEADLINE, client_async(url, stream))
            .await
            .expect("handshake in time")
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(response.status(), 101);
        for i in 0..3 {
            socket
                .send(Message::text(format!("hello {i}")))
                .await
                .unwrap();
            let reply = tokio::time::timeout(DEADLINE, socket.next())
                .await
                .expect("echo in time")
                .unwrap()
                .unwrap();
            assert_eq!(reply, Message::text(format!("echo: hello {i}")));
        }
        let big = vec![7u8; 256 * 1024];
        socket.send(Message::binary(big.clone())).await.unwrap();
        let reply = socket.next().await.unwrap().unwrap();
        assert_eq!(reply.into_data().as_ref(), &big[..]);
        socket.close(None).await.unwrap();
    }
    // The instance saw a real upgrade request: its hop-by-hop upgrade
    // headers kept, the WebSocket ones untouched.
    let seen = ws.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for h in &seen {
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(h.contains_key("sec-websocket-key"));
        assert_eq!(h["sec-websocket-version"], "13");
    }
    crate::support::eventually("tunnels closed", || async {
        (proxy.app().open_tunnels() == 0).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_refused_upgrade_is_relayed_and_the_connection_stays_http() {
    for status in [200u16, 403] {
        let up = UpgradeUpstream::start(UpgradeReply::Refuse(status)).await;
        let bridge =
            FakeBridge::start(vec![service("chat", vec![endpoint("chat-1", up.addr)])]).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = TestProxy::start(bridge.addr, dir.path()).await;
        proxy.wait_service("chat", 1).await;

        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(
                b"GET /chat/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n\
                  Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .await
            .unwrap();
        let head = read_response(&mut stream).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status}: {head}"
        );
        assert!(head.ends_with("no upgrade here"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("upgrade: websocket"), "{head}");

        // No tunnel: the same connection carries a plain request next.
        stream
            .write_all(b"GET /chat/plain HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.ends_with("plain"), "{head}");
        assert_eq!(up.seen.lock().unwrap().len(), 1);
        assert_eq!(proxy.app().open_tunnels(), 0);
        proxy.stop().await;
    }
}

/// Reads one response with a `content-length` body, as text.
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
                    return String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
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
