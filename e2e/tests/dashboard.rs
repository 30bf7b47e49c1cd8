//! The dashboard (issue 4, point 6) in Debian's headless Chromium against a
//! live mesh: a 3-server Consul cluster, two nodes with services, and
//! mesh-control on n1. Chromium runs in n1's namespace and is driven over
//! the DevTools protocol. The test reads each page as a person sees it (the
//! rendered text, table by table), changes the mesh while a page is open
//! and sees the change without a reload, and checks that markup in the
//! mesh's data shows as text. A screenshot of every page is kept under
//! `target/<profile>/artifacts/dashboard/` (the paths are printed).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow, ensure};
use mesh_e2e::{
    Mesh, MeshOptions, Node, bins,
    browser::{Browser, artifacts_dir},
    eventually,
    mesh::CONSUL_HTTP,
    node::Instance,
    process::Process,
};
use serde_json::{Value, json};

/// mesh-control's ports (inside n1's namespace).
const CONTROL_GRPC: u16 = 8892;
const CONTROL_HTTP: u16 = 8893;

/// How long a change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

/// A tag a service registers with: it must show as these characters, not
/// become an element.
const MARKUP: &str = "<img src=x onerror=alert(1)><b>bold</b>";

/// Two nodes and a Consul cluster, mesh-control (`c1`) on n1.
async fn dashboard_mesh() -> Result<Mesh> {
    let mut mesh = Mesh::start(MeshOptions::consul_only(2)).await?;
    let control = bins::workspace_bin("mesh-control")?;
    let log = mesh.dir().join("n1-mesh-control.log");
    let node = &mut mesh.nodes[0];
    let mut process = Process::new(
        format!("{}/mesh-control", node.name),
        &node.ns,
        &control,
        [
            "--replica",
            "c1",
            "--consul-addr",
            "http://127.0.0.1:8500",
            "--grpc-listen",
            &format!("127.0.0.1:{CONTROL_GRPC}"),
            "--http-listen",
            &format!("127.0.0.1:{CONTROL_HTTP}"),
        ],
        log,
    );
    process.start()?;
    // Kept with the node's processes: its log is printed when the test
    // fails, and it is stopped with the mesh.
    node.instances.insert(
        "mesh-control".into(),
        Instance {
            service: "mesh-control".into(),
            id: "c1".into(),
            addr: SocketAddr::from((node.ip(), CONTROL_GRPC)),
            process,
        },
    );
    let n1 = &mesh.nodes[0];
    eventually("mesh-control is ready", CONVERGE, || async {
        let resp = n1.local_client(CONTROL_HTTP).get("/ready").await?;
        ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
        Ok(())
    })
    .await?;
    Ok(mesh)
}

/// Registers a service instance with `node`'s Consul agent, its TTL check
/// passing.
async fn register(node: &Node, name: &str, id: &str, port: u16, tags: &[&str]) -> Result<()> {
    let body = json!({
        "Name": name, "ID": id, "Address": node.ip().to_string(), "Port": port,
        "Tags": tags, "Meta": {"version": "v1"},
        "Check": {"TTL": "10m", "Status": "passing"},
    });
    let resp = node
        .local_client(CONSUL_HTTP)
        .put("/v1/agent/service/register", body.to_string())
        .await?;
    ensure!(
        resp.status == 200,
        "register {id}: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

/// Sets `node`'s routes through mesh-control's REST API; returns the new
/// revision.
async fn set_routes(
    n1: &Node,
    node: &str,
    routes: Value,
    revision: u64,
    author: &str,
) -> Result<u64> {
    let body = json!({"routes": routes, "expected_revision": revision, "author": author});
    let resp = n1
        .local_client(CONTROL_HTTP)
        .request(
            hyper::Method::PUT,
            &format!("/v1/nodes/{node}/routes"),
            &[("content-type", "application/json")],
            body.to_string().into(),
        )
        .await?;
    let answer = resp.json().with_context(|| resp.text())?;
    ensure!(resp.status == 200, "set routes: {} {answer}", resp.status);
    answer["revision"]
        .as_u64()
        .ok_or_else(|| anyhow!("no revision in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_nodes_services_routes_versions_and_rollouts_live() {
    let mesh = dashboard_mesh().await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    register(n1, "web", "web-1", 9100, &["v1", MARKUP])
        .await
        .unwrap();
    register(n2, "api", "api-1", 9200, &["v2"]).await.unwrap();
    let revision = eventually("web and api are routable", CONVERGE, || async {
        set_routes(n1, "n1", json!({"web": {"timeout": "2s"}}), 0, "alice").await
    })
    .await
    .unwrap();
    let catalog_nodes = mesh
        .consul_get("/v1/catalog/nodes")
        .await
        .unwrap()
        .json()
        .unwrap();
    let node_count = catalog_nodes.as_array().map_or(0, Vec::len);

    // Served with its types and a strict policy.
    let page = n1.local_client(CONTROL_HTTP).get("/ui/").await.unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );

    let artifacts = artifacts_dir("dashboard").unwrap();
    let mut browser = Browser::start(n1, mesh.dir()).await.unwrap();
    let base = format!("http://127.0.0.1:{CONTROL_HTTP}");

    // Nodes: every node of the catalog, with its agent, proxy and version.
    browser.open(&format!("{base}/")).await.unwrap();
    browser
        .see(
            "the nodes page",
            &[&format!("Nodes ({node_count})"), "live"],
        )
        .await
        .unwrap();
    let nodes = browser.table(0).await.unwrap();
    let row = |name: &str| {
        nodes
            .iter()
            .find(|r| r.get("Node").map(String::as_str) == Some(name))
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name} in {nodes:?}"))
    };
    let (r1, r2) = (row("n1"), row("n2"));
    assert_eq!(r1["Address"], n1.ip().to_string());
    assert_eq!(r1["Agent"], "passing", "{r1:?}");
    assert_eq!(r1["Proxy"], "unknown", "{r1:?}");
    assert_eq!(r1["Config version"], "1", "{r1:?}");
    assert_eq!(r1["Last seen"], "never", "{r1:?}");
    // web-1, and mesh-control itself: each replica registers with its
    // agent for the leader lock's check.
    assert_eq!(r1["Instances"], "2", "{r1:?}");
    assert_eq!(r2["Config version"], "none", "{r2:?}");
    assert_eq!(r2["Agent"], "passing", "{r2:?}");
    browser
        .screenshot(&artifacts.join("nodes.png"))
        .await
        .unwrap();

    // Services: instances, tags as text, checks and health.
    browser
        .open(&format!("{base}/ui/#/services"))
        .await
        .unwrap();
    let text = browser
        .see(
            "the services page",
            &[
                "web",
                "api",
                "1 instance, 1 passing",
                "web-1",
                "api-1",
                MARKUP,
            ],
        )
        .await
        .unwrap();
    assert!(text.contains("service:web-1: passing"), "{text}");
    assert!(text.contains("serfHealth: passing"), "{text}");
    let injected = browser
        .eval("document.querySelectorAll('main img, main b, main script').length")
        .await
        .unwrap();
    assert_eq!(injected, json!(0), "markup from a tag became elements");
    browser
        .screenshot(&artifacts.join("services.png"))
        .await
        .unwrap();

    // A health check fails while the page is open: it shows without a reload.
    browser.mark_document().await.unwrap();
    let fail = n2
        .local_client(CONSUL_HTTP)
        .put("/v1/agent/check/fail/service:api-1?note=down", "")
        .await
        .unwrap();
    assert_eq!(fail.status, 200, "{}", fail.text());
    browser
        .see(
            "api-1 critical",
            &["service:api-1: critical", "1 instance, 0 passing"],
        )
        .await
        .unwrap();
    browser.assert_not_reloaded().await.unwrap();
    browser
        .screenshot(&artifacts.join("services-live.png"))
        .await
        .unwrap();

    // A node: its routes, versions, and the newest version's diff.
    browser
        .open(&format!("{base}/ui/#/nodes/n1"))
        .await
        .unwrap();
    browser
        .see(
            "n1's page",
            &[
                "Node n1",
                "version 1, revision",
                "Diff of version 1",
                "+++ n1 version 1 (proxy)",
                "+[routes.web]",
                "+timeout = \"2s\"",
            ],
        )
        .await
        .unwrap();
    let routes = browser.table(0).await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["Service"], "web");
    assert_eq!(routes[0]["Timeout"], "2s");
    let versions = browser.table(1).await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0]["Version"], "version 1");
    assert_eq!(versions[0]["Author"], "alice");
    browser
        .screenshot(&artifacts.join("node-n1.png"))
        .await
        .unwrap();

    // New routes while the page is open: the new version, its routes and
    // its diff show without a reload.
    browser.mark_document().await.unwrap();
    set_routes(
        n1,
        "n1",
        json!({"web": {"timeout": "2s"}, "api": {"timeout": "3s", "retries": 2}}),
        revision,
        "bob",
    )
    .await
    .unwrap();
    browser
        .see(
            "version 2 on n1's page",
            &[
                "version 2, revision",
                "Diff of version 2 against version 1",
                "+++ n1 version 2 (proxy)",
                "+[routes.api]",
                "+retries = 2",
            ],
        )
        .await
        .unwrap();
    browser.assert_not_reloaded().await.unwrap();
    let routes = browser.table(0).await.unwrap();
    let services: Vec<&str> = routes.iter().map(|r| r["Service"].as_str()).collect();
    assert_eq!(services, ["api", "web"], "{routes:?}");
    assert_eq!(routes[0]["Retries"], "2");
    let versions = browser.table(1).await.unwrap();
    let listed: Vec<(&str, &str)> = versions
        .iter()
        .map(|v| (v["Version"].as_str(), v["Author"].as_str()))
        .collect();
    assert_eq!(listed, [("version 2", "bob"), ("version 1", "alice")]);
    browser
        .screenshot(&artifacts.join("node-n1-live.png"))
        .await
        .unwrap();

    // An older version's diff, by its link.
    browser
        .open(&format!("{base}/ui/#/nodes/n1/versions/1"))
        .await
        .unwrap();
    let text = browser
        .see(
            "version 1's diff",
            &["Diff of version 1", "--- /dev/null", "+timeout = \"2s\""],
        )
        .await
        .unwrap();
    assert!(!text.contains("+[routes.api]"), "{text}");
    browser
        .screenshot(&artifacts.join("node-n1-version-1.png"))
        .await
        .unwrap();

    // The nodes page now says version 2 for n1.
    browser.open(&format!("{base}/ui/#/nodes")).await.unwrap();
    browser
        .see_cell(
            "n1 at config version 2",
            0,
            "Node",
            "n1",
            "Config version",
            "2",
        )
        .await
        .unwrap();

    // Rollouts: none yet.
    browser
        .open(&format!("{base}/ui/#/rollouts"))
        .await
        .unwrap();
    browser
        .see("the rollouts page", &["Rollouts", "No rollouts yet."])
        .await
        .unwrap();
    browser
        .screenshot(&artifacts.join("rollouts.png"))
        .await
        .unwrap();

    let footer = browser
        .eval("document.getElementById('footer').innerText")
        .await
        .unwrap();
    assert!(
        footer.as_str().unwrap_or_default().contains("Replica c1"),
        "{footer}"
    );
    browser.close().await.unwrap();
    mesh.finish();
}
