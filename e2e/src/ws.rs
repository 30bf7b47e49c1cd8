//! A WebSocket client of the demo service's echo (`/_demo/ws` of
//! `meshctl demo serve`), called through a node's proxy as a service would.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::{client_async, tungstenite::Message};

use crate::netns::Netns;

/// The URLs that reach `service`'s echo through the proxy: by path and by
/// Host.
pub fn echo_urls(service: &str) -> [String; 2] {
    [
        format!("ws://127.0.0.1:8888/{service}/_demo/ws"),
        format!("ws://{service}.mesh/_demo/ws"),
    ]
}

/// Opens `url` through the proxy at `proxy` inside `ns` and checks the
/// echo as a caller sees it: the 101, `texts` text messages each answered
/// by `instance` before the next is sent, then a 128 KiB binary message
/// echoed whole. Returns the time the text round trips took.
pub async fn echo(
    ns: &Netns,
    proxy: SocketAddr,
    url: &str,
    instance: &str,
    texts: usize,
) -> Result<Duration> {
    let stream = ns.connect(proxy, Duration::from_secs(5)).await?;
    let (mut socket, response) =
        tokio::time::timeout(Duration::from_secs(10), client_async(url, stream))
            .await
            .context("WebSocket handshake in time")?
            .with_context(|| format!("WebSocket handshake for {url}"))?;
    ensure!(response.status() == 101, "{url}: {}", response.status());
    let start = Instant::now();
    for i in 0..texts {
        socket.send(Message::text(format!("hello {i}"))).await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .context("echo in time")?
            .context("socket closed")??;
        ensure!(
            reply == Message::text(format!("{instance}: hello {i}")),
            "{url}: {reply:?}"
        );
    }
    let round_trips = start.elapsed();
    let big = vec![42u8; 128 * 1024];
    socket.send(Message::binary(big.clone())).await?;
    let reply = socket.next().await.context("socket closed")??;
    ensure!(
        reply.into_data().as_ref() == &big[..],
        "{url}: binary echo differs"
    );
    socket.close(None).await?;
    Ok(round_trips)
}
