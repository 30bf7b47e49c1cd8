//! The registry failing under the mesh: Consul's leader dies, all of Consul
//! goes away, the bridge dies, the dump file is corrupt. Routing goes on and
//! converges when the parts return (issue 2, scenarios e–h).

use std::time::{Duration, Instant};

use anyhow::bail;
use mesh_e2e::{Load, LoadOptions, Mesh, MeshOptions, eventually, node::Node};
use serde_json::json;

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

fn proxy_addr() -> std::net::SocketAddr {
    "127.0.0.1:8888".parse().expect("a literal address")
}

/// A registration of `name` pointing at an existing instance's address,
/// without a check (passing at once).
fn alias(name: &str, node: &Node, instance: &str) -> serde_json::Value {
    let addr = node.instances[instance].addr;
    json!({"Name": name, "ID": format!("{name}-1"), "Address": addr.ip().to_string(), "Port": addr.port()})
}

/// The `source` of a node's `/routes` (`live` or `dump`).
async fn routes_source(node: &Node) -> anyhow::Result<String> {
    let routes = node.routes().await?;
    match routes["source"].as_str() {
        Some(source) => Ok(source.to_owned()),
        None => bail!("/routes has no string `source`: {routes}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_leader_sigkilled_under_load_fails_no_request_and_later_registration_reaches_every_node()
 {
    let mut mesh = Mesh::start(MeshOptions::nodes(3)).await.unwrap();
    mesh.nodes[0].serve("steady", "steady-1").await.unwrap();
    mesh.nodes[2].serve("steady", "steady-2").await.unwrap();
    mesh.nodes[1]
        .wait_answers("steady", &["steady-1", "steady-2"], CONVERGE)
        .await
        .unwrap();

    let load = Load::start(
        &mesh.nodes[1].ns,
        proxy_addr(),
        "/steady/",
        LoadOptions::default(),
    );
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();
    let old = mesh.kill_leader().await.unwrap();
    let killed = Instant::now();
    let new = mesh.wait_leader(Duration::from_secs(60)).await.unwrap();
    let election = killed.elapsed();
    assert_ne!(old, new);

    // A registration after the election reaches every node.
    let body = alias("late", &mesh.nodes[0], "steady-1");
    let registered = Instant::now();
    let resp = mesh.nodes[0].register(&body).await.unwrap();
    assert_eq!(resp.status, 200, "register after election: {}", resp.text());
    let mut reached = Vec::new();
    for node in &mesh.nodes {
        node.wait_answers("late", &["steady-1"], CONVERGE)
            .await
            .unwrap();
        reached.push(format!("{} {:?}", node.name, registered.elapsed()));
    }
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();
    let report = load.stop().await;
    println!(
        "leader s{} SIGKILLed: new leader s{} after {election:?}; registration after election reached {}; load: {}",
        old + 1,
        new + 1,
        reached.join(", "),
        report.summary()
    );
    assert!(
        report.failures().is_empty(),
        "failed requests: {}",
        report.summary()
    );
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_routing_goes_on_restarted_proxy_serves_dump_and_registration_is_applied_later()
{
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await.unwrap();
    mesh.nodes[0].serve("keep", "keep-1").await.unwrap();
    let n2 = 1;
    mesh.nodes[n2]
        .wait_answers("keep", &["keep-1"], CONVERGE)
        .await
        .unwrap();
    eventually("n2 wrote its dump", CONVERGE, || async {
        match std::fs::metadata(mesh.nodes[n2].dump_path()) {
            Ok(m) if m.len() > 0 => Ok(()),
            other => bail!("{other:?}"),
        }
    })
    .await
    .unwrap();

    // All Consul servers and n2's agent stop; routing goes on.
    let load = Load::start(
        &mesh.nodes[n2].ns,
        proxy_addr(),
        "/keep/",
        LoadOptions::default(),
    );
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();
    let down = Instant::now();
    for server in &mut mesh.servers {
        server.agent.stop().await.unwrap();
    }
    mesh.nodes[n2].agent.stop().await.unwrap();
    println!(
        "consul servers and n2's agent stopped in {:?}",
        down.elapsed()
    );
    tokio::time::sleep_until((down + Duration::from_secs(3)).into()).await;
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();
    let report = load.stop().await;
    println!("while Consul is down: {}", report.summary());
    assert!(
        report.failures().is_empty(),
        "routing broke with Consul down: {}",
        report.summary()
    );

    // The proxy restarted in that state serves from its dump within 2 s.
    mesh.nodes[n2].proxy.stop().await.unwrap();
    mesh.nodes[n2].proxy.start().unwrap();
    let started = Instant::now();
    let mut client = mesh.nodes[n2]
        .proxy_client()
        .with_timeout(Duration::from_millis(500));
    let served = loop {
        if let Ok(resp) = client.get("/keep/").await
            && resp.status == 200
        {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "restarted proxy does not serve /keep/ from its dump"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Read once the proxy got the (running) bridge's snapshot, so the answer
    // does not depend on which came first.
    eventually(
        "the restarted proxy hears from its bridge",
        Duration::from_secs(10),
        || async {
            let metrics = mesh.nodes[n2].proxy_admin("/metrics").await?.text();
            let received = metrics
                .lines()
                .filter_map(|l| l.strip_prefix("mesh_proxy_discovery_updates_total "))
                .any(|v| v.trim() != "0");
            if !received {
                bail!("no discovery update yet");
            }
            Ok(())
        },
    )
    .await
    .unwrap();
    let source = routes_source(&mesh.nodes[n2]).await.unwrap();
    println!(
        "proxy restarted with Consul down: first 200 after {served:?}, /routes source {source:?}"
    );
    assert!(
        served < Duration::from_secs(2),
        "first 200 after {served:?}"
    );
    // Checked at the end, so that one miss does not hide the rest of the scenario.
    let source_ok = source == "dump";

    // A registration meanwhile is accepted (202) and in the catalog once Consul returns.
    let body = alias("during", &mesh.nodes[0], "keep-1");
    let resp = mesh.nodes[n2].register(&body).await.unwrap();
    assert_eq!(
        resp.status,
        202,
        "registration with Consul down: {}",
        resp.text()
    );
    let back = Instant::now();
    for server in &mut mesh.servers {
        server.agent.start().unwrap();
    }
    mesh.nodes[n2].agent.start().unwrap();
    let leader = mesh.wait_leader(Duration::from_secs(60)).await.unwrap();
    let elected = back.elapsed();
    let servers: Vec<_> = mesh.servers.iter().map(|s| s.ns.clone()).collect();
    let catalog = eventually(
        "`during` is in Consul's catalog",
        Duration::from_secs(60),
        || {
            let ns = servers[leader].clone();
            async move {
                let resp = mesh_e2e::HttpClient::new(&ns, "127.0.0.1:8500".parse()?)
                    .get("/v1/catalog/service/during")
                    .await?;
                if !resp.text().contains("during-1") {
                    bail!("catalog: {} {}", resp.status, resp.text());
                }
                Ok(back.elapsed())
            }
        },
    )
    .await
    .unwrap();
    // Every watch of n1's bridge failed for the whole outage; it must recover
    // on its own (backoff, no restart).
    mesh.nodes[0]
        .wait_answers("during", &["keep-1"], Duration::from_secs(60))
        .await
        .unwrap();
    let routed = back.elapsed();
    println!(
        "Consul back: leader after {elected:?}, queued registration in the catalog after {catalog:?}, \
         routed by n1 after {routed:?}"
    );
    assert!(
        source_ok,
        "the proxy restarted with Consul down reports /routes source {source:?}, not \"dump\""
    );
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_killed_and_restarted_proxy_keeps_serving_and_converges() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await.unwrap();
    mesh.nodes[0].serve("app", "app-1").await.unwrap();
    let old = alias("old", &mesh.nodes[0], "app-1");
    assert_eq!(mesh.nodes[0].register(&old).await.unwrap().status, 200);
    mesh.nodes[1]
        .wait_answers("app", &["app-1"], CONVERGE)
        .await
        .unwrap();
    mesh.nodes[1]
        .wait_answers("old", &["app-1"], CONVERGE)
        .await
        .unwrap();

    let load = Load::start(
        &mesh.nodes[1].ns,
        proxy_addr(),
        "/app/",
        LoadOptions::default(),
    );
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();
    mesh.nodes[1].bridge.kill().await.unwrap();
    let killed = Instant::now();

    // Changes while n2's bridge is down (made through n1).
    let new = alias("new", &mesh.nodes[0], "app-1");
    assert_eq!(mesh.nodes[0].register(&new).await.unwrap().status, 200);
    assert_eq!(mesh.nodes[0].deregister("old-1").await.unwrap().status, 200);
    tokio::time::sleep_until((killed + Duration::from_secs(2)).into()).await;
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();

    mesh.nodes[1].bridge.start().unwrap();
    let restarted = Instant::now();
    mesh.nodes[1]
        .wait_answers("new", &["app-1"], CONVERGE)
        .await
        .unwrap();
    mesh.nodes[1]
        .wait_status("/old/", &[404, 503], CONVERGE)
        .await
        .unwrap();
    let converged = restarted.elapsed();

    // And changes after the restart still arrive.
    let after = alias("after", &mesh.nodes[0], "app-1");
    let registered = Instant::now();
    assert_eq!(mesh.nodes[0].register(&after).await.unwrap().status, 200);
    mesh.nodes[1]
        .wait_answers("after", &["app-1"], CONVERGE)
        .await
        .unwrap();
    let propagated = registered.elapsed();
    load.wait_more(200, Duration::from_secs(10)).await.unwrap();
    let report = load.stop().await;
    println!(
        "bridge SIGKILLed and restarted: converged {converged:?} after restart, next registration in {propagated:?}; load: {}",
        report.summary()
    );
    assert!(
        report.failures().is_empty(),
        "failed requests: {}",
        report.summary()
    );
    assert_eq!(routes_source(&mesh.nodes[1]).await.unwrap(), "live");
    mesh.finish();
}

/// Log lines of the proxy that refuse a dump.
fn dump_refusals(node: &Node) -> Vec<String> {
    node.proxy
        .log()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("dump")
                && [
                    "corrupt",
                    "checksum",
                    "truncated",
                    "invalid",
                    "refus",
                    "ignor",
                    "malformed",
                    "bad",
                ]
                .iter()
                .any(|w| l.contains(w))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_dump_is_refused_with_a_log_line_and_live_data_served_once_bridge_answers() {
    let mut mesh = Mesh::start(MeshOptions::nodes(1)).await.unwrap();
    mesh.nodes[0].serve("solo", "solo-1").await.unwrap();
    let node = &mut mesh.nodes[0];
    node.wait_answers("solo", &["solo-1"], CONVERGE)
        .await
        .unwrap();
    let dump = node.dump_path();
    let good = eventually("the proxy wrote its dump", CONVERGE, || async {
        let bytes = std::fs::read(&dump)?;
        if bytes.len() < 16 {
            bail!("{} bytes", bytes.len());
        }
        Ok(bytes)
    })
    .await
    .unwrap();

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    let corruptions: [(&str, Vec<u8>); 3] = [
        ("one byte flipped", flipped),
        ("truncated to half", good[..good.len() / 2].to_vec()),
        ("garbage", b"\x00\x01not a dump at all\xff".to_vec()),
    ];
    for (k, (what, bytes)) in corruptions.into_iter().enumerate() {
        // The first time with the bridge down too: nothing but the dump to go on.
        let bridge_down = k == 0;
        node.proxy.stop().await.unwrap();
        if bridge_down {
            node.bridge.stop().await.unwrap();
        }
        let before = dump_refusals(node).len();
        node.write_dump(&bytes).unwrap();
        node.proxy.start().unwrap();
        node.wait_proxy_live(Duration::from_secs(10)).await.unwrap();
        let line = eventually(
            "the proxy logs why it refused the dump",
            Duration::from_secs(10),
            || {
                let lines = dump_refusals(node);
                async move {
                    match lines.get(before) {
                        Some(line) => Ok(line.clone()),
                        None => bail!("no log line about the dump yet"),
                    }
                }
            },
        )
        .await
        .unwrap();
        if bridge_down {
            let resp = node.get("/solo/").await.unwrap();
            println!(
                "corrupt dump, bridge down: GET /solo/ -> {} {}",
                resp.status,
                resp.text().trim()
            );
            assert_ne!(
                resp.status, 200,
                "served /solo/ with a corrupt dump and no bridge"
            );
            assert!(node.proxy.is_running(), "proxy crashed on a corrupt dump");
            node.bridge.start().unwrap();
        }
        let started = Instant::now();
        node.wait_answers("solo", &["solo-1"], CONVERGE)
            .await
            .unwrap();
        let live = started.elapsed();
        assert_eq!(routes_source(node).await.unwrap(), "live");
        println!(
            "dump {what}: proxy up, logged {line:?}; live data served {live:?} after {}",
            if bridge_down {
                "the bridge started"
            } else {
                "the proxy started"
            }
        );
    }
    mesh.finish();
}
