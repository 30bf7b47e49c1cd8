//! HTTP/2 between proxies (the proxy issue's last point): every proxy runs
//! an inbound listener and registers itself as `mesh-proxy`; a call through
//! node 1's proxy to an instance on node 2 travels over one multiplexed
//! HTTP/2 connection to node 2's proxy, which forwards it only if the named
//! instance is registered on node 2. gRPC streams and WebSockets cross the
//! same hop; a node whose proxy is gone is called directly.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use mesh_e2e::{HttpClient, Mesh, MeshOptions, Node, echo, eventually, ws};

/// The inbound listener's port on every node.
const INBOUND: u16 = mesh_e2e::mesh::INBOUND_PORT;

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

/// Requests counted on the peer connection.
const REQUESTS: usize = 100;

fn opts() -> MeshOptions {
    MeshOptions {
        proxy_args: vec!["--inbound-listen".into(), format!("0.0.0.0:{INBOUND}")],
        ..MeshOptions::nodes(2)
    }
}

fn proxy() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8888))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_another_node_ride_one_http2_connection_between_the_proxies() {
    let mut mesh = Mesh::start(opts()).await.unwrap();
    mesh.nodes[1].serve("backend", "backend-1").await.unwrap();
    mesh.nodes[1].serve("wsdemo", "wsdemo-1").await.unwrap();
    mesh.nodes[1]
        .serve_grpc_echo("echo", "echo-1")
        .await
        .unwrap();
    mesh.nodes[0].serve("local", "local-1").await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    n1.wait_peer(n2, CONVERGE).await.unwrap();
    n2.wait_peer(n1, CONVERGE).await.unwrap();
    n1.wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();
    // n2 must know n1's instance too: the forged calls below expect n2 to
    // name it as another node's, not as one it never heard of.
    n2.wait_answers("local", &["local-1"], CONVERGE)
        .await
        .unwrap();

    plain_requests(n1, n2).await.unwrap();
    grpc_calls(n1, n2).await.unwrap();
    websocket_echo(n1, n2).await.unwrap();
    // Everything above shared the one HTTP/2 connection.
    assert_eq!(
        metric(n2, r#"mesh_proxy_inbound_connections_total{protocol="h2"}"#)
            .await
            .unwrap(),
        1.0,
        "n2's inbound listener saw one HTTP/2 connection"
    );
    forged_requests_are_refused(n1, n2).await.unwrap();
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_proxy_died_is_called_directly_until_the_proxy_is_back() {
    let mut mesh = Mesh::start(opts()).await.unwrap();
    mesh.nodes[1].serve("backend", "backend-1").await.unwrap();
    mesh.nodes[0]
        .wait_peer(&mesh.nodes[1], CONVERGE)
        .await
        .unwrap();
    mesh.nodes[0]
        .wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();
    let through_n2 = r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#;
    assert!(metric(&mesh.nodes[1], through_n2).await.unwrap() >= 1.0);

    mesh.nodes[1].proxy.kill().await.unwrap();
    let killed = Instant::now();
    // Its TCP check fails, the registry drops it, and node 1 calls
    // backend-1 directly.
    let n1 = &mesh.nodes[0];
    eventually("n1 knows no peer", CONVERGE, || async {
        let routes = n1.routes().await?;
        ensure!(
            routes["peers"].as_object().is_some_and(|p| p.is_empty()),
            "peers: {}",
            routes["peers"]
        );
        Ok(())
    })
    .await
    .unwrap();
    n1.wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();
    println!(
        "n2's proxy SIGKILLed: n1 calls backend-1 directly {:?} later",
        killed.elapsed()
    );

    mesh.nodes[1].proxy.start().unwrap();
    mesh.nodes[1]
        .wait_proxy_live(Duration::from_secs(20))
        .await
        .unwrap();
    mesh.nodes[0]
        .wait_peer(&mesh.nodes[1], CONVERGE)
        .await
        .unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    eventually(
        "calls reach backend-1 through n2's new proxy",
        CONVERGE,
        || async {
            let resp = n1.get("/backend/").await?;
            ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
            let through = metric(n2, through_n2).await?;
            ensure!(through >= 1.0, "{through} through n2's inbound listener");
            Ok(())
        },
    )
    .await
    .unwrap();
    mesh.finish();
}

/// One sample of `node`'s proxy's `/metrics` (0 when the series is absent).
async fn metric(node: &Node, line_start: &str) -> Result<f64> {
    let resp = node.proxy_admin("/metrics").await?;
    ensure!(resp.status == 200, "/metrics: {}", resp.status);
    Ok(resp
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0))
}

async fn plain_requests(n1: &Node, n2: &Node) -> Result<()> {
    let arrived = r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#;
    let sent = r#"mesh_proxy_peer_requests_total{peer="n2",protocol="h2"}"#;
    let (arrived_before, sent_before) = (metric(n2, arrived).await?, metric(n1, sent).await?);
    let mut client = n1.proxy_client();
    for i in 0..REQUESTS {
        let resp = client.get(&format!("/backend/hop?i={i}")).await?;
        ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
        ensure!(resp.header("x-instance") == Some("backend-1"));
        let json = resp.json()?;
        ensure!(json["path"] == format!("/hop?i={i}"), "{json}");
        // The caller's address, as on a direct call: the hop is the mesh's.
        ensure!(json["forwarded_for"] == "127.0.0.1", "{json}");
    }
    let arrived = metric(n2, arrived).await? - arrived_before;
    let sent = metric(n1, sent).await? - sent_before;
    ensure!(
        arrived >= REQUESTS as f64,
        "n2's inbound listener saw {arrived} HTTP/2 requests, want {REQUESTS}"
    );
    ensure!(
        sent >= REQUESTS as f64,
        "n1 sent {sent} requests through n2's proxy, want {REQUESTS}"
    );
    // One connection carried them: n1 keeps one HTTP/2 connection to n2.
    eventually(
        "n1 holds one HTTP/2 connection to n2's proxy",
        CONVERGE,
        || async {
            let open = metric(
                n1,
                r#"mesh_proxy_peer_connections{peer="n2",protocol="h2"}"#,
            )
            .await?;
            ensure!(open == 1.0, "{open} open");
            Ok(())
        },
    )
    .await?;
    println!(
        "{REQUESTS} calls n1 -> n2 over HTTP/2 between the proxies: {sent} sent, {arrived} arrived"
    );
    Ok(())
}

async fn grpc_calls(n1: &Node, n2: &Node) -> Result<()> {
    let arrived = r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#;
    let before = metric(n2, arrived).await?;
    let channel = echo::channel(&n1.ns, proxy(), "echo").await?;
    echo::exercise(&channel, "echo-1", 10, CONVERGE).await?;
    let through = metric(n2, arrived).await? - before;
    ensure!(
        through >= 5.0,
        "{through} gRPC calls arrived at n2's inbound listener"
    );
    Ok(())
}

async fn websocket_echo(n1: &Node, n2: &Node) -> Result<()> {
    let upgrades = r#"mesh_proxy_inbound_requests_total{protocol="http1",code_class="1xx"}"#;
    let before = metric(n2, upgrades).await?;
    for url in ws::echo_urls("wsdemo") {
        ws::echo(&n1.ns, proxy(), &url, "wsdemo-1", 5).await?;
    }
    let through = metric(n2, upgrades).await? - before;
    ensure!(
        through >= 2.0,
        "{through} upgrades arrived at n2's inbound listener over HTTP/1.1"
    );
    Ok(())
}

/// Straight to n2's inbound listener from n1's namespace, as anything on
/// n1 could: only n2's own instances are served.
async fn forged_requests_are_refused(n1: &Node, n2: &Node) -> Result<()> {
    let inbound = SocketAddr::from((n2.ip(), INBOUND));
    let mut client = HttpClient::new(&n1.ns, inbound);
    let resp = client.get("/").await?;
    ensure!(
        resp.status == 400,
        "no header: {} {}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.json()?["error"] == "missing_endpoint",
        "{}",
        resp.text()
    );

    for (named, kind, says) in [
        (
            "local/local-1",
            "foreign_instance",
            "runs on node n1, not on n2",
        ),
        (
            "backend/nope",
            "unknown_instance",
            "not registered on node n2",
        ),
        ("unknown/x", "unknown_instance", "not registered on node n2"),
    ] {
        let mut client = HttpClient::new(&n1.ns, inbound);
        let resp = client
            .request(
                hyper::Method::GET,
                "/",
                &[("x-mesh-endpoint", named)],
                Default::default(),
            )
            .await?;
        ensure!(
            resp.status == 421,
            "{named}: {} {}",
            resp.status,
            resp.text()
        );
        let json = resp.json()?;
        let reason = json["reason"].as_str().unwrap_or_default();
        let id = named.split_once('/').map_or(named, |(_, id)| id);
        ensure!(
            json["error"] == kind && reason.contains(id) && reason.contains(says),
            "{named}: {json}"
        );
    }
    // Its own node's instance it serves, named properly.
    let mut client = HttpClient::new(&n1.ns, inbound);
    let resp = client
        .request(
            hyper::Method::GET,
            "/",
            &[("x-mesh-endpoint", "backend/backend-1")],
            Default::default(),
        )
        .await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    ensure!(resp.header("x-instance") == Some("backend-1"));

    // Nobody calls the proxies' own service by name.
    let resp = n1
        .proxy_client()
        .request(
            hyper::Method::GET,
            "/",
            &[("host", "mesh-proxy")],
            Default::default(),
        )
        .await?;
    ensure!(
        resp.status == 404,
        "Host: mesh-proxy: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}
