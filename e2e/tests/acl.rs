//! The whole mesh on a Consul cluster with ACLs on (default deny), each
//! component with the least-privilege token of `e2e/src/acl.rs`:
//!
//! - services register through their node's proxy (the bridge's token
//!   carries the registration) and are routed by name between the nodes;
//!   a service the node's bridge may not register is refused, not queued;
//! - two mesh-control replicas elect one leader (session and lock with
//!   their tokens), store each node's first routes and roll a new version
//!   out to both nodes, which the proxies report in effect through their
//!   bridges;
//! - mesh-control deploys a jar to both nodes' mesh-deployers, which
//!   register it through their proxies: it answers by name on both;
//! - mesh-monitor reads its targets, keeps the alert of a hung instance
//!   in Consul KV across a restart, and deletes it once resolved; its
//!   verdicts reach Consul as the instance's check through the bridge;
//! - what a token may not do is refused by Consul (403): a bridge writing
//!   routes or another node's status, the monitor writing the leader lock,
//!   mesh-control forging a proxy's report, an agent registering a
//!   service, and anything without a token;
//! - no process logs a token's secret, nor keeps one in its files.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use hyper::Method;
use mesh_e2e::{
    Mesh, MeshOptions,
    acl::consul,
    control::{CONVERGE, call, meshctl, node_status, one_leader, start_replica, wait_in_catalog},
    deployer::{self, start_deployer},
    eventually,
    http::HttpClient,
    java::{self, Variant},
    monitor::{MonitorOptions, node_verdict, open_alerts, restart_monitor, start_monitor_with},
};
use serde_json::json;

/// The nodes.
const NODES: [&str; 2] = ["n1", "n2"];

/// How long a rollout of two nodes may take.
const ROLLOUT: Duration = Duration::from_secs(60);

/// The key of the alert on a hung `web-1`.
const HUNG_WEB: &str = "hung/n2/web-1";

/// The service mesh-deployer deploys.
const DEPLOYED: &str = "hello";

/// Two nodes with reachable bridges; `api` may run on n1, `web` on n2,
/// the deployed service on both.
fn opts() -> MeshOptions {
    MeshOptions {
        reachable_bridges: true,
        ..MeshOptions::nodes(2)
    }
    .with_acl(&[("n1", &["api", DEPLOYED]), ("n2", &["web", DEPLOYED])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_runs_on_acl_consul_and_each_token_is_refused_beyond_its_need() {
    let mut mesh = Mesh::start(opts()).await.unwrap();
    services_register_and_route(&mut mesh).await.unwrap();
    unlisted_service_is_refused(&mesh).await.unwrap();
    control_leads_stores_and_rolls_out(&mut mesh).await.unwrap();
    jar_deploys_and_registers(&mut mesh).await.unwrap();
    monitor_keeps_its_alerts(&mut mesh).await.unwrap();
    tokens_are_refused_beyond_their_policy(&mesh).await.unwrap();
    no_log_shows_a_secret(&mut mesh);
    mesh.finish();
}

/// `api-1` on n1 and `web-1` on n2 register through their proxies and
/// are routed by name from the other node.
async fn services_register_and_route(mesh: &mut Mesh) -> Result<()> {
    mesh.nodes[0].serve("api", "api-1").await?;
    mesh.nodes[1].serve("web", "web-1").await?;
    wait_in_catalog(mesh, "api", "api-1").await?;
    wait_in_catalog(mesh, "web", "web-1").await?;
    mesh.nodes[0]
        .wait_answers("web", &["web-1"], CONVERGE)
        .await?;
    mesh.nodes[1]
        .wait_answers("api", &["api-1"], CONVERGE)
        .await?;
    Ok(())
}

/// n1's bridge may register `api` only: a `web` instance registered
/// through n1's proxy is refused with Consul's reason, and never reaches
/// the catalog (the proxy does not queue it for later).
async fn unlisted_service_is_refused(mesh: &Mesh) -> Result<()> {
    let n1 = &mesh.nodes[0];
    let body = json!({"Name": "web", "ID": "web-intruder", "Address": n1.ip().to_string(),
                      "Port": 9199});
    let resp = n1.register(&body).await?;
    ensure!(
        resp.status == 403
            && resp.text().contains("registration_denied")
            && resp.text().contains("Permission denied"),
        "a registration the bridge's token may not make: {} {}",
        resp.status,
        resp.text()
    );
    let metrics = n1.proxy_admin("/metrics").await?.text();
    ensure!(
        !metrics
            .lines()
            .any(|l| l.starts_with("mesh_proxy_queue_depth") && !l.ends_with(" 0")),
        "nothing waits in the proxy's queue: {metrics}"
    );
    let ids = mesh.catalog_instances("web").await?;
    ensure!(ids == ["web-1"], "web in the catalog: {ids:?}");
    Ok(())
}

/// Two replicas, one leader; each node's first routes stored, then a
/// version staged on both nodes and rolled out, in effect on both proxies.
async fn control_leads_stores_and_rolls_out(mesh: &mut Mesh) -> Result<()> {
    for k in 0..NODES.len() {
        start_replica(mesh, k, &[("MESH_DEPLOYER_TOKEN", deployer::TOKEN)]).await?;
    }
    let leader = one_leader(mesh).await?;
    eprintln!("acl: mesh-control leader {leader}");
    let via = &mesh.nodes[0];
    let mut first = 0;
    for (node, callee) in [("n1", "web"), ("n2", "api")] {
        let body = json!({"routes": {callee: {"timeout": "2s"}}, "expected_revision": 0,
                          "author": "e2e"});
        let path = format!("/v1/nodes/{node}/routes");
        let (status, stored) = call(via, Method::PUT, &path, Some(body)).await?;
        ensure!(status == 200, "routes of {node}: {status} {stored}");
        let version = stored["version"]["number"].as_u64().unwrap_or_default();
        ensure!(version > 0, "{stored}");
        wait_in_effect(mesh, node, version).await?;
        first = first.max(version);
    }
    mesh.nodes[0]
        .wait_answers("web", &["web-1"], CONVERGE)
        .await?;
    mesh.nodes[1]
        .wait_answers("api", &["api-1"], CONVERGE)
        .await?;

    let routes = json!({"web": {"timeout": "3s", "retries": 1},
                        "api": {"timeout": "3s", "retries": 1}});
    let body = json!({"nodes": NODES, "routes": routes, "author": "e2e"});
    let (status, staged) = call(via, Method::POST, "/v1/versions", Some(body)).await?;
    ensure!(status == 200, "stage: {status} {staged}");
    let version = staged["version"].as_u64().unwrap_or_default();
    ensure!(version > first, "{staged}");
    let body = json!({"version": version, "author": "e2e", "canary": 1, "batch": 1,
                      "soak_ms": 500, "ack_timeout_ms": 15000});
    let (status, started) = call(via, Method::POST, "/v1/rollouts", Some(body)).await?;
    ensure!(status == 200, "start: {status} {started}");
    let path = format!("/v1/rollouts/{version}");
    let ended = eventually(
        &format!("the rollout of {version} ends"),
        ROLLOUT,
        || async {
            let (_, r) = call(&mesh.nodes[1], Method::GET, &path, None).await?;
            if r["state"] != "succeeded" && r["state"] != "aborted" {
                bail!("{}", r["state"]);
            }
            Ok(r)
        },
    )
    .await?;
    ensure!(ended["state"] == "succeeded", "{ended}");
    for node in NODES {
        wait_in_effect(mesh, node, version).await?;
    }
    mesh.nodes[0]
        .wait_answers("web", &["web-1"], CONVERGE)
        .await?;
    mesh.nodes[1]
        .wait_answers("api", &["api-1"], CONVERGE)
        .await?;
    Ok(())
}

/// A jar deployed by mesh-control to both nodes' deployers (which
/// register it through their proxies, so with the bridges' tokens) is
/// answered by name through both proxies.
async fn jar_deploys_and_registers(mesh: &mut Mesh) -> Result<()> {
    for k in 0..NODES.len() {
        start_deployer(mesh, k, &[]).await?;
    }
    let jars = java::build(&mesh.dir().join("jars"), &[Variant::healthy("v1")]).await?;
    let artifact = jars[0].path.display().to_string();
    let leader = one_leader(mesh).await?;
    let via = if leader == "c2" { 1 } else { 0 };
    let args = [
        "deploy",
        "--service",
        DEPLOYED,
        "--artifact",
        &artifact,
        "--version",
        "v1",
        "--nodes",
        "n1,n2",
        "--drain",
        "1s",
        "--soak",
        "1s",
        "--health-timeout",
        "30s",
        "--watch",
    ];
    let (code, out, err) = meshctl(&mesh.nodes[via], &args).await?;
    ensure!(
        code == 0,
        "meshctl deploy --watch exited {code}: {out}{err}"
    );
    for node in &mesh.nodes {
        let resp = node
            .wait_status(&format!("/{DEPLOYED}/"), &[200], CONVERGE)
            .await?;
        ensure!(
            resp.text() == "hello from v1",
            "{}: {}",
            node.name,
            resp.text()
        );
    }
    let ids = mesh.catalog_instances(DEPLOYED).await?;
    ensure!(
        ids.len() == 2,
        "one instance per node in the catalog: {ids:?}"
    );
    Ok(())
}

/// Waits until mesh-control shows `version` stored and in effect on `node`.
async fn wait_in_effect(mesh: &Mesh, node: &str, version: u64) -> Result<()> {
    eventually(
        &format!("{node} runs version {version}"),
        CONVERGE,
        || async {
            let n = node_status(&mesh.nodes[1], node).await?;
            if n["routes_version"] != version || n["proxy"]["version_in_effect"] != version {
                bail!("{n}");
            }
            Ok(())
        },
    )
    .await
}

/// mesh-monitor on n1 probes both services (it reads them from Consul
/// with its token); `web-1` stopped with SIGSTOP raises an alert it keeps
/// in KV, and its verdict turns web-1's check critical in Consul (through
/// n2's bridge and its token); the alert is restored after a restart and
/// deleted once `web-1` answers again, its check passing.
async fn monitor_keeps_its_alerts(mesh: &mut Mesh) -> Result<()> {
    let opts = MonitorOptions {
        services: vec!["web".into(), "api".into()],
        consul_checks: true,
        ..MonitorOptions::default()
    };
    start_monitor_with(mesh, 0, &opts).await?;
    eventually(
        "the monitor judges n2 on its instance",
        CONVERGE,
        || async {
            let v = node_verdict(&mesh.nodes[0], "n2").await?;
            ensure!(v.healthy && v.targets >= 1, "{v:?}");
            Ok(())
        },
    )
    .await?;
    until_check(mesh, "passing").await?;
    mesh.nodes[1].instance("web-1")?.process.pause()?;
    until_alert(mesh, true).await?;
    until_check(mesh, "critical").await?;
    let stored = alerts_in_kv(mesh).await?;
    ensure!(
        stored.iter().any(|k| k.ends_with(HUNG_WEB)),
        "the alert is kept in KV: {stored:?}"
    );
    restart_monitor(&mut mesh.nodes[0]).await?;
    let open = open_alerts(&mesh.nodes[0]).await?;
    ensure!(
        open.iter().any(|a| a.key == HUNG_WEB),
        "restored after a restart: {open:?}"
    );
    mesh.nodes[1].instance("web-1")?.process.resume()?;
    until_alert(mesh, false).await?;
    until_check(mesh, "passing").await?;
    eventually("the resolved alert leaves KV", CONVERGE, || async {
        let stored = alerts_in_kv(mesh).await?;
        ensure!(!stored.iter().any(|k| k.ends_with(HUNG_WEB)), "{stored:?}");
        Ok(())
    })
    .await
}

/// Waits until the hung alert on `web-1` is open (`open`) or resolved.
async fn until_alert(mesh: &Mesh, open: bool) -> Result<()> {
    let what = format!("{HUNG_WEB} open: {open}");
    eventually(&what, CONVERGE, || async {
        let alerts = open_alerts(&mesh.nodes[0]).await?;
        let keys: Vec<&str> = alerts.iter().map(|a| a.key.as_str()).collect();
        ensure!(keys.contains(&HUNG_WEB) == open, "open: {keys:?}");
        Ok(())
    })
    .await
}

/// Waits until the check mesh-monitor sets on `web-1` has `status` in
/// Consul's health API.
async fn until_check(mesh: &Mesh, status: &str) -> Result<()> {
    let what = format!("web-1's mesh-monitor check is {status}");
    eventually(&what, CONVERGE, || async {
        let resp = mesh.consul_get("/v1/health/checks/web").await?;
        ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
        let checks = resp.json()?;
        let seen = checks
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["ServiceID"] == "web-1" && c["Name"] == "mesh-monitor")
            .map(|c| c["Status"].clone());
        ensure!(seen.as_ref().is_some_and(|s| s == status), "{seen:?}");
        Ok(())
    })
    .await
}

/// The keys under `mesh/monitor/alerts/`, read with the management token.
async fn alerts_in_kv(mesh: &Mesh) -> Result<Vec<String>> {
    let resp = mesh.consul_get("/v1/kv/mesh/monitor/alerts/?keys").await?;
    match resp.status.as_u16() {
        404 => Ok(Vec::new()),
        200 => Ok(serde_json::from_slice(&resp.body)?),
        other => bail!("alert keys: {other} {}", resp.text()),
    }
}

/// Each token is refused (403) what its component does not need, while
/// its own call right beside it succeeds; a request without a token sees
/// nothing.
async fn tokens_are_refused_beyond_their_policy(mesh: &Mesh) -> Result<()> {
    let n1 = &mesh.nodes[0];
    let token = |holder: &str| {
        mesh.acl_token(holder)
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no token for {holder}"))
    };
    let bridge = token("n1/bridge")?;
    let mut as_bridge = consul(&n1.ns, &bridge);
    expect(
        &mut as_bridge,
        Method::GET,
        "/v1/kv/mesh/nodes/n1/routes",
        200,
    )
    .await?;
    expect(
        &mut as_bridge,
        Method::PUT,
        "/v1/kv/mesh/nodes/n1/routes",
        403,
    )
    .await?;
    expect(&mut as_bridge, Method::PUT, "/v1/kv/mesh/status/n2", 403).await?;
    expect(&mut as_bridge, Method::PUT, "/v1/kv/mesh/leader", 403).await?;

    let monitor = token("mesh-monitor")?;
    let mut as_monitor = consul(&n1.ns, &monitor);
    expect(&mut as_monitor, Method::PUT, "/v1/kv/mesh/leader", 403).await?;
    expect(
        &mut as_monitor,
        Method::PUT,
        "/v1/kv/mesh/nodes/n2/routes",
        403,
    )
    .await?;

    let control = token("n1/mesh-control")?;
    let mut as_control = consul(&n1.ns, &control);
    expect(&mut as_control, Method::GET, "/v1/kv/mesh/status/n1", 200).await?;
    expect(&mut as_control, Method::PUT, "/v1/kv/mesh/status/n1", 403).await?;

    let agent = token("n1/consul")?;
    let register = json!({"Name": "web", "ID": "web-agent", "Port": 9198}).to_string();
    let resp = consul(&n1.ns, &agent)
        .put("/v1/agent/service/register", register)
        .await?;
    ensure!(
        resp.status == 403,
        "the agent's token registers a service: {} {}",
        resp.status,
        resp.text()
    );

    let mut anonymous = n1.local_client(mesh_e2e::mesh::CONSUL_HTTP);
    expect(&mut anonymous, Method::GET, "/v1/kv/mesh/leader", 403).await?;
    let resp = anonymous.get("/v1/catalog/services").await?;
    ensure!(
        resp.status == 200 && resp.json()? == json!({}),
        "without a token the catalog shows nothing: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

/// `method path` (a small JSON body for a PUT) answers `want`.
async fn expect(client: &mut HttpClient, method: Method, path: &str, want: u16) -> Result<()> {
    let body = if method == Method::PUT {
        "{\"forged\":true}"
    } else {
        ""
    };
    let resp = client
        .request(method.clone(), path, &[], body.into())
        .await?;
    ensure!(
        resp.status.as_u16() == want,
        "{method} {path}: {} {} (want {want})",
        resp.status,
        resp.text()
    );
    Ok(())
}

/// No file the mesh's processes wrote (logs of agents, bridges, proxies,
/// replicas, monitor, deployers, services; queues, dumps, data folders)
/// holds a token's secret, but the agents' own ACL config and data.
fn no_log_shows_a_secret(mesh: &mut Mesh) {
    let secrets: Vec<String> = mesh
        .acl
        .as_ref()
        .map(|a| a.secrets().into_iter().map(str::to_owned).collect())
        .unwrap_or_default();
    assert!(secrets.len() > 5, "the mesh has its tokens");
    let mut files = Vec::new();
    collect_files(mesh.dir(), &mut files);
    let agents: Vec<String> = mesh
        .servers
        .iter()
        .map(|s| s.name.clone())
        .chain(mesh.nodes.iter().map(|n| n.name.clone()))
        .collect();
    let consuls_own = |path: &Path| {
        let rel = path.strip_prefix(mesh.dir()).unwrap_or(path);
        agents.iter().any(|a| {
            rel == Path::new(&format!("{a}-acl.hcl")) || rel.starts_with(format!("{a}/consul"))
        })
    };
    let mut logs = 0;
    for path in files.iter().filter(|p| !consuls_own(p)) {
        let bytes = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        logs += usize::from(path.extension().is_some_and(|e| e == "log"));
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{} holds a token's secret",
                path.display()
            );
        }
    }
    assert!(logs >= 10, "the logs were read: {files:?}");
}

/// Every file under `dir`, recursively.
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}
