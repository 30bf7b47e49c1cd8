//! Rollouts to a node that still runs nginx, on a real 3-server Consul
//! cluster: n1 runs mesh-control, a proxy and the services; n2's Consul
//! agent carries the node metadata `mesh-frontend:nginx`, and n2 runs
//! Debian's nginx and a mesh-deployer that mesh-control drives.
//!
//! - a version that adds a service rolls out (n2, the nginx node, as the
//!   canary, then n1's proxy): mesh-control renders n2's nginx.conf, the
//!   deployer writes it, runs `nginx -t`, reloads, and nginx serves the
//!   new service by name, showing the version at `/_mesh/config`;
//! - a version whose nginx.conf fails `nginx -t` is refused: the rollout
//!   aborts with nginx -t's own words (in the API and in `meshctl rollout
//!   status`), n2 is put back on the version before in Consul, n1 is not
//!   touched, and nginx keeps serving the old config without one failed
//!   request.
//!
//! How the bad config comes about: the routes mesh-control accepts always
//! render a file `nginx -t` accepts with the shipped template (the render
//! tests check that), so the test gives mesh-control an operator's
//! template with a plausible mistake: the shipped one plus
//! `add_header x-mesh-split {{ s.weights }};`, unquoted. With one weight
//! (`v1=100%`) that is one value and nginx takes it; a route splitting
//! traffic over two versions (`v1=50% v2=50%`) gives `add_header` a third
//! argument where only `always` may stand, which `nginx -t` refuses
//! (`invalid parameter "v2=50%"`).

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use hyper::Method;
use mesh_e2e::{
    Mesh,
    control::{
        CONVERGE, call, control_mesh_of, meshctl, one_leader, serve_demo, start_proxy,
        start_replica, wait_in_catalog,
    },
    deployer::{TOKEN, start_deployer},
    eventually,
    load::{Load, LoadOptions},
    nginx::{self, NGINX_PORT, SHIPPED_TEMPLATE},
};
use serde_json::{Value, json};

/// The nodes, in rollout order: the nginx node is the canary.
const NODES: [&str; 2] = ["n2", "n1"];

/// How long a rollout of the two nodes may take.
const ROLLOUT: Duration = Duration::from_secs(90);

/// The line the operator's template adds to every location.
const SPLIT_HEADER: &str =
    "{% if s.weights %}\n            add_header x-mesh-split {{ s.weights }};\n{% endif %}\n";

/// The shipped template with [`SPLIT_HEADER`] after each `proxy_pass`.
fn operator_template() -> String {
    let anchor = "            proxy_pass http://{{ s.name }}/;\n";
    assert!(
        SHIPPED_TEMPLATE.contains(anchor),
        "the shipped template has no {anchor:?}"
    );
    SHIPPED_TEMPLATE.replace(anchor, &format!("{anchor}{SPLIT_HEADER}"))
}

/// The mesh: n1 with mesh-control (static upstreams, the operator's
/// template, nginx paths under n2's prefix), a proxy and `web-1`; n2 an
/// nginx node with a deployer. Both nodes at a first version routing
/// `web`; nginx on n2 started on that version's nginx.conf as
/// mesh-control renders it.
async fn nginx_mesh() -> Result<Mesh> {
    let mut mesh = control_mesh_of(2, 0).await?;
    nginx::make_nginx_node(&mut mesh, 1).await?;
    let prefix = nginx::prefix(&mesh, 1)?;
    let config_root = prefix.display().to_string();
    start_deployer(&mut mesh, 1, &["--config-root", &config_root]).await?;

    let template = mesh.dir().join("operator-nginx.conf.tmpl");
    std::fs::write(&template, operator_template())?;
    let mut env = nginx::control_env(&prefix)?;
    env.extend([
        ("MESH_NGINX_UPSTREAMS".to_owned(), "static".to_owned()),
        ("MESH_NGINX_TEMPLATE".into(), template.display().to_string()),
        ("MESH_DEPLOYER_TOKEN".into(), TOKEN.into()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    start_replica(&mut mesh, 0, &env).await?;
    one_leader(&mesh).await?;

    for (id, service, port) in [("web-1", "web", 9100u16), ("api-1", "api", 9101)] {
        serve_demo(&mut mesh, 0, service, id, port).await?;
        let ip = mesh.nodes[0].ip().to_string();
        let body = json!({"name": service, "id": id, "address": ip, "port": port});
        let (status, answer) = call(
            &mesh.nodes[0],
            Method::PUT,
            "/v1/nodes/n1/register",
            Some(body),
        )
        .await?;
        ensure!(status == 200, "register {id}: {answer}");
        wait_in_catalog(&mesh, service, id).await?;
    }
    start_proxy(&mut mesh, 0).await?;
    for node in NODES {
        let body = json!({"routes": {"web": {"timeout": "2s"}},
                          "expected_revision": 0, "author": "e2e"});
        let path = format!("/v1/nodes/{node}/routes");
        let (status, stored) = call(&mesh.nodes[0], Method::PUT, &path, Some(body)).await?;
        ensure!(status == 200, "routes of {node}: {stored}");
    }
    // nginx starts on the first version, as an operator moving a node
    // under mesh-control would: from `meshctl render --format nginx`.
    let (code, conf, err) = meshctl(
        &mesh.nodes[0],
        &["render", "--node", "n2", "--format", "nginx"],
    )
    .await?;
    ensure!(code == 0, "meshctl render: {err}");
    nginx::start_nginx(&mut mesh, 1, &conf).await?;
    mesh.nodes[0]
        .wait_answers("web", &["web-1"], CONVERGE)
        .await?;
    Ok(mesh)
}

/// Stages `routes` on both nodes and starts rolling them out (canary 1,
/// batch 1, 1 s soak); the version.
async fn roll(mesh: &Mesh, routes: Value) -> Result<u64> {
    let body = json!({"nodes": NODES, "routes": routes, "author": "e2e"});
    let (status, staged) = call(&mesh.nodes[0], Method::POST, "/v1/versions", Some(body)).await?;
    ensure!(status == 200, "stage: {status} {staged}");
    let version = staged["version"].as_u64().unwrap_or_default();
    let body = json!({"version": version, "author": "e2e", "canary": 1, "batch": 1,
                      "soak_ms": 1000, "ack_timeout_ms": 20000});
    let (status, rollout) = call(&mesh.nodes[0], Method::POST, "/v1/rollouts", Some(body)).await?;
    ensure!(status == 200, "start {version}: {status} {rollout}");
    Ok(version)
}

/// Waits until the rollout of `version` has ended; returns it.
async fn ended(mesh: &Mesh, version: u64) -> Result<Value> {
    eventually(
        &format!("the rollout of version {version} ends"),
        ROLLOUT,
        || async {
            let path = format!("/v1/rollouts/{version}");
            let (status, r) = call(&mesh.nodes[0], Method::GET, &path, None).await?;
            ensure!(status == 200, "{status} {r}");
            if r["state"] != "succeeded" && r["state"] != "aborted" {
                bail!("{}: {}", r["state"], r["nodes"]);
            }
            Ok(r)
        },
    )
    .await
}

/// `node`'s entry in rollout `r`.
fn node_of<'a>(r: &'a Value, node: &str) -> &'a Value {
    r["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node"] == node))
        .unwrap_or(&Value::Null)
}

/// The version `node` is on in Consul, as mesh-control shows it.
async fn current(mesh: &Mesh, node: &str) -> Result<u64> {
    let path = format!("/v1/nodes/{node}/routes");
    let (status, routes) = call(&mesh.nodes[0], Method::GET, &path, None).await?;
    ensure!(status == 200, "{status} {routes}");
    Ok(routes["version"].as_u64().unwrap_or_default())
}

/// Asserts that nginx on n2 answers `GET /<service>/` from `instance`.
async fn serves(mesh: &Mesh, service: &str, instance: &str) -> Result<()> {
    let resp = nginx::get(&mesh.nodes[1], &format!("/{service}/")).await?;
    ensure!(
        resp.status == 200 && resp.header("x-instance") == Some(instance),
        "nginx on n2, /{service}/: {} {:?} {}",
        resp.status,
        resp.header("x-instance"),
        resp.text()
    );
    Ok(())
}

/// What nginx on n2 says its config is.
async fn config_line(mesh: &Mesh) -> Result<String> {
    let resp = nginx::get(&mesh.nodes[1], "/_mesh/config").await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    Ok(resp.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_nodes_get_their_config_through_the_deployer_and_a_bad_one_is_refused() {
    let mesh = nginx_mesh().await.unwrap();
    let n2 = &mesh.nodes[1];
    let conf_path = nginx::prefix(&mesh, 1).unwrap().join("nginx.conf");

    // Before: nginx serves web only, on the first version.
    serves(&mesh, "web", "web-1").await.unwrap();
    let first = current(&mesh, "n2").await.unwrap();
    assert_eq!(
        config_line(&mesh).await.unwrap(),
        format!("node n2 version {first}\n")
    );
    let resp = nginx::get(n2, "/api/").await.unwrap();
    assert_eq!(resp.status, 404, "no api route yet: {}", resp.text());

    // A good version adds api: applied on n2 by its deployer.
    let routes = json!({"web": {"timeout": "2s"}, "api": {"weights": {"v1": 100}}});
    let good = roll(&mesh, routes).await.unwrap();
    let r = ended(&mesh, good).await.unwrap();
    assert_eq!(r["state"], "succeeded", "{r}");
    for node in NODES {
        assert_eq!(node_of(&r, node)["state"], "done", "{r}");
        assert_ne!(node_of(&r, node)["acked_at"], "", "{r}");
    }
    let events = r["events"].to_string();
    assert!(
        events.contains(&format!(
            "n2 acknowledged version {good}: its deployer applied the nginx.conf"
        )),
        "{events}"
    );
    serves(&mesh, "api", "api-1").await.unwrap();
    serves(&mesh, "web", "web-1").await.unwrap();
    assert_eq!(
        config_line(&mesh).await.unwrap(),
        format!("node n2 version {good}\n")
    );
    let resp = nginx::get(n2, "/api/").await.unwrap();
    assert_eq!(
        resp.header("x-mesh-split"),
        Some("v1=100%"),
        "the operator's header"
    );
    let applied = std::fs::read_to_string(&conf_path).unwrap();
    assert!(
        applied.contains(&format!("config version {good}.")),
        "{applied}"
    );

    // A version whose nginx.conf nginx -t refuses: the rollout aborts
    // with nginx's words, and nginx keeps serving under steady load.
    let load = Load::start(
        &n2.ns,
        ([127, 0, 0, 1], NGINX_PORT).into(),
        "/web/",
        LoadOptions {
            workers: 2,
            interval: Duration::from_millis(10),
            ..LoadOptions::default()
        },
    );
    load.wait_more(50, CONVERGE).await.unwrap();
    let routes = json!({"web": {"timeout": "2s"}, "api": {"weights": {"v1": 50, "v2": 50}}});
    let bad = roll(&mesh, routes).await.unwrap();
    let r = ended(&mesh, bad).await.unwrap();
    let report = load.stop().await;
    assert_eq!(r["state"], "aborted", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!(
            "node n2 refused the nginx.conf of version {bad}: validate failed"
        )),
        "{reason}"
    );
    assert!(
        reason.contains("invalid parameter \"v2=50%\""),
        "nginx -t's own words: {reason}"
    );
    assert!(
        reason.contains("the previous file was restored"),
        "{reason}"
    );
    assert_eq!(node_of(&r, "n2")["state"], "reverted", "{r}");
    assert_eq!(node_of(&r, "n1")["state"], "pending", "n1 untouched: {r}");
    assert_eq!(current(&mesh, "n2").await.unwrap(), good);
    assert_eq!(current(&mesh, "n1").await.unwrap(), good);
    assert!(
        report.failures().is_empty() && report.total() > 0,
        "requests through nginx failed: {}",
        report.summary()
    );
    serves(&mesh, "api", "api-1").await.unwrap();
    assert_eq!(
        config_line(&mesh).await.unwrap(),
        format!("node n2 version {good}\n")
    );
    let kept = std::fs::read_to_string(&conf_path).unwrap();
    assert_eq!(kept, applied, "the good version's file is back in place");

    // What an operator sees.
    let (code, out, err) = meshctl(
        &mesh.nodes[0],
        &["rollout", "status", "--version", &bad.to_string()],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    eprintln!("meshctl rollout status --version {bad}:\n{out}");
    assert!(out.contains("aborted"), "{out}");
    assert!(out.contains("invalid parameter"), "{out}");
    mesh.finish();
}
