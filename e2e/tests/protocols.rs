//! Protocols across nodes (issue 3, point 8): a gRPC service and a
//! WebSocket endpoint on node 1, called from node 2 through node 2's
//! proxy, which reaches the instance on node 1 over h2c (gRPC) and as a
//! tunnel after the 101 (WebSocket).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use futures::{SinkExt as _, StreamExt as _};
use mesh_e2e::{Mesh, MeshOptions, echo};
use tokio_tungstenite::{client_async, tungstenite::Message};

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

fn proxy() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8888))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_grpc_and_websocket_echo_cross_two_nodes() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await.unwrap();
    mesh.nodes[0]
        .serve_grpc_echo("echo", "echo-1")
        .await
        .unwrap();
    mesh.nodes[0].serve("wsdemo", "wsdemo-1").await.unwrap();
    let n2 = &mesh.nodes[1];
    n2.wait_answers("wsdemo", &["wsdemo-1"], CONVERGE)
        .await
        .unwrap();

    grpc_calls(n2).await.unwrap();
    websocket_echo(n2).await.unwrap();
    mesh.finish();
}

async fn grpc_calls(n2: &mesh_e2e::Node) -> Result<()> {
    let channel = echo::channel(&n2.ns, proxy(), "echo").await?;
    let start = Instant::now();
    let arrivals = echo::exercise(&channel, "echo-1", 20, CONVERGE).await?;
    println!(
        "gRPC server streaming n2 -> n1, 20 messages 50 ms apart: first after {:?}, last after {:?}; all calls done after {:?}",
        arrivals[0],
        arrivals[19],
        start.elapsed()
    );
    Ok(())
}

async fn websocket_echo(n2: &mesh_e2e::Node) -> Result<()> {
    for url in [
        "ws://127.0.0.1:8888/wsdemo/_demo/ws",
        "ws://wsdemo.mesh/_demo/ws",
    ] {
        let stream = n2.ns.connect(proxy(), Duration::from_secs(5)).await?;
        let (mut socket, response) =
            tokio::time::timeout(Duration::from_secs(10), client_async(url, stream))
                .await
                .context("WebSocket handshake in time")?
                .with_context(|| format!("WebSocket handshake for {url}"))?;
        ensure!(response.status() == 101, "{url}: {}", response.status());
        let start = Instant::now();
        for i in 0..10 {
            socket.send(Message::text(format!("hello {i}"))).await?;
            let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
                .await
                .context("echo in time")?
                .context("socket closed")??;
            ensure!(
                reply == Message::text(format!("wsdemo-1: hello {i}")),
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
        println!(
            "WebSocket n2 -> n1 via {url}: 10 text round trips in {round_trips:?}, 128 KiB binary echoed"
        );
    }
    Ok(())
}
