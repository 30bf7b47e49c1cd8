//! The gRPC echo test service (`proto/echo.proto`, package
//! `meshwork.e2e.echo`), served by the `grpc-echo` binary on a node, and a
//! client that calls it through a node's proxy as a service would: h2c to
//! `127.0.0.1:8888` inside the node, the service named in `:authority`.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{netns::Netns, wait::eventually};
use pb::{EchoRequest, StreamRequest, echo_client::EchoClient};

/// The generated messages, client and server.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("meshwork.e2e.echo");
}

/// A gRPC channel that reaches `service` through the proxy at `proxy`
/// inside `ns` (one h2c connection, opened inside the namespace).
pub async fn channel(ns: &Netns, proxy: SocketAddr, service: &str) -> Result<Channel> {
    let name = ns.name().to_owned();
    let ns = ns.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let ns = ns.clone();
        async move {
            ns.connect(proxy, Duration::from_secs(5))
                .await
                .map(TokioIo::new)
                .map_err(|e| io::Error::other(format!("{e:#}")))
        }
    });
    // The URI names the service: it becomes every call's `:authority`,
    // which the proxy routes by; the connector goes to the proxy.
    Endpoint::from_shared(format!("http://{service}"))?
        .timeout(Duration::from_secs(30))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("gRPC channel to {service} through {proxy} in {name}"))
}

/// Every kind of gRPC call on `channel` to the echo service whose one
/// instance is `instance`, checked as a caller sees it: unary (retried
/// until `converge`, while routes settle), server streaming (`count`
/// messages 50 ms apart, each arriving as it is sent), a status in the
/// trailers after messages, client streaming, and bidirectional (each
/// reply before the next message). Returns when each streamed message
/// arrived, counted from the call.
pub async fn exercise(
    channel: &Channel,
    instance: &str,
    count: u32,
    converge: Duration,
) -> Result<Vec<Duration>> {
    let unary = |text: &str| EchoRequest {
        message: text.into(),
    };
    eventually("the echo service answers", converge, || {
        let mut client = EchoClient::new(channel.clone());
        async move {
            let reply = client.unary(unary("ping")).await?.into_inner();
            ensure!(reply.instance == instance, "answered by {reply:?}");
            Ok(())
        }
    })
    .await?;
    let mut client = EchoClient::new(channel.clone());

    // Server streaming: each message as it is sent.
    let start = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            message: "tick".into(),
            count,
            interval_ms: 50,
            fail_after: 0,
        })
        .await?
        .into_inner();
    let mut arrivals = Vec::new();
    while let Some(reply) = stream.message().await? {
        ensure!(
            reply.seq as usize == arrivals.len(),
            "out of order: {reply:?}"
        );
        ensure!(reply.message == format!("tick {}", reply.seq), "{reply:?}");
        arrivals.push(start.elapsed());
    }
    ensure!(
        arrivals.len() == count as usize,
        "{} messages",
        arrivals.len()
    );
    // Streamed: the first message long before the last (50 ms apart each).
    let spread = Duration::from_millis(25 * u64::from(count.saturating_sub(1)));
    ensure!(
        arrivals[0] + spread < arrivals[arrivals.len() - 1],
        "not streamed: {arrivals:?}"
    );

    // A status in the trailers after messages.
    let mut stream = client
        .server_stream(StreamRequest {
            message: "x".into(),
            count: 10,
            interval_ms: 0,
            fail_after: 3,
        })
        .await?
        .into_inner();
    for _ in 0..3 {
        ensure!(
            stream.message().await?.is_some(),
            "a message before the error"
        );
    }
    match stream.message().await {
        Err(status) => ensure!(
            status.code() == tonic::Code::Aborted && status.message() == "stream broke on purpose",
            "{status:?}"
        ),
        Ok(other) => bail!("expected ABORTED, got {other:?}"),
    }

    // Client streaming.
    let messages: Vec<EchoRequest> = ["a", "b", "c", "d"].into_iter().map(unary).collect();
    let reply = client
        .client_stream(futures::stream::iter(messages))
        .await?
        .into_inner();
    ensure!(reply.message == "a,b,c,d" && reply.seq == 4, "{reply:?}");

    // Bidirectional: each reply before the next message is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    for i in 0..5 {
        tx.send(unary(&format!("m{i}"))).await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .context("bidi reply in time")??
            .context("bidi stream ended early")?;
        ensure!(
            reply.message == format!("m{i}") && reply.seq == i,
            "{reply:?}"
        );
    }
    drop(tx);
    ensure!(replies.message().await?.is_none(), "bidi ends with OK");
    Ok(arrivals)
}
