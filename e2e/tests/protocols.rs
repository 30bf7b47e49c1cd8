//! Protocols across nodes (issue 3, point 8): a gRPC service and a
//! WebSocket endpoint on node 1, called from node 2 through node 2's
//! proxy, which reaches the instance on node 1 over h2c (gRPC) and as a
//! tunnel after the 101 (WebSocket).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use mesh_e2e::{Mesh, MeshOptions, echo, ws};

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
    for url in ws::echo_urls("wsdemo") {
        let round_trips = ws::echo(&n2.ns, proxy(), &url, "wsdemo-1", 10).await?;
        println!(
            "WebSocket n2 -> n1 via {url}: 10 text round trips in {round_trips:?}, 128 KiB binary echoed"
        );
    }
    Ok(())
}
