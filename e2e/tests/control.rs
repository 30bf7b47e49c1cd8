//! mesh-control on a real 3-server Consul cluster: two replicas on two
//! nodes, one leader; two replicas changing one node's routes at once:
//! one wins, the other gets a conflict naming the revision, the loser's
//! retry lands and no version is lost; bad input is refused by name with
//! nothing stored; registrations through mesh-control reach the node's
//! bridge and Consul's catalog; the proxy config `meshctl render` prints is
//! one mesh-proxy runs with (issue 4, first slice); a node's config version
//! reaches its proxy through the bridge, takes effect, and mesh-control
//! shows it applied; a bad one written straight into Consul KV is refused,
//! the last good one stays in effect and mesh-control shows the reason; a
//! restarted proxy applies its saved config before the bridge answers.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, bail};
use mesh_e2e::{
    bins,
    control::{
        CONVERGE, call, control_mesh, meshctl, node_status, one_leader, rest, serve_demo,
        start_proxy, wait_in_catalog,
    },
    eventually,
    node::{PROXY_ADMIN_PORT, PROXY_PORT},
    process::Process,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_concurrent_route_changes_never_overwrite_each_other() {
    let mesh = control_mesh().await.unwrap();
    let leader = one_leader(&mesh).await.unwrap();
    assert!(["c1", "c2"].contains(&leader.as_str()), "{leader}");
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let ready = rest(n2).get("/ready").await.unwrap();
    assert!(
        ready.text().contains(&format!("leader: {leader}")),
        "{}",
        ready.text()
    );

    // Services to route to, registered through mesh-control.
    for (via, node, name, id, port) in [
        (n2, "n1", "web", "web-1", 9100),
        (n1, "n2", "api", "api-1", 9200),
    ] {
        let address = if node == "n1" { n1.ip() } else { n2.ip() };
        let (status, answer) = call(
            via,
            hyper::Method::PUT,
            &format!("/v1/nodes/{node}/register"),
            Some(json!({"name": name, "id": id, "address": address.to_string(), "port": port})),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "register {id} on {node}: {answer}");
        wait_in_catalog(&mesh, name, id).await.unwrap();
    }

    // Both replicas read revision 0 and change n1's routes at once.
    let path = "/v1/nodes/n1/routes";
    for node in [n1, n2] {
        let (_, routes) = call(node, hyper::Method::GET, path, None).await.unwrap();
        assert_eq!(routes["revision"], 0, "{routes}");
    }
    let change = |author: &str, service: &str| json!({"routes": {service: {"timeout": "2s", "retries": 1}}, "expected_revision": 0, "author": author});
    let (a, b) = tokio::join!(
        call(n1, hyper::Method::PUT, path, Some(change("alice", "web"))),
        call(n2, hyper::Method::PUT, path, Some(change("bob", "api"))),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (won, lost, loser_node, loser, loser_service) = match (a.0, b.0) {
        (200, 409) => (a.1, b.1, n2, "bob", "api"),
        (409, 200) => (b.1, a.1, n1, "alice", "web"),
        _ => panic!("not one winner and one conflict: {a:?} {b:?}"),
    };
    assert_eq!(won["version"]["number"], 1, "{won}");
    assert_eq!(lost["kind"], "conflict", "{lost}");
    assert_eq!(lost["key"], "mesh/nodes/n1/routes", "{lost}");
    assert_eq!(lost["expected_revision"], 0, "{lost}");
    assert_eq!(lost["revision"], won["revision"], "{lost}");
    let error = lost["error"].as_str().unwrap_or_default();
    assert!(error.contains("based on revision 0"), "{error}");

    // The loser reads again and retries: its change lands as version 2.
    let (_, current) = call(loser_node, hyper::Method::GET, path, None)
        .await
        .unwrap();
    let retry = json!({"routes": {"web": {"timeout": "2s"}, loser_service: {"timeout": "3s"}},
                       "expected_revision": current["revision"], "author": loser});
    let (status, stored) = call(loser_node, hyper::Method::PUT, path, Some(retry))
        .await
        .unwrap();
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["version"]["number"], 2, "{stored}");
    let (_, versions) = call(n1, hyper::Method::GET, "/v1/nodes/n1/versions", None)
        .await
        .unwrap();
    let listed: Vec<(u64, String)> = versions
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["number"].as_u64().unwrap_or(0),
                v["author"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let winner = if loser == "bob" { "alice" } else { "bob" };
    assert_eq!(
        listed,
        [(2, loser.to_owned()), (1, winner.to_owned())],
        "{versions}"
    );
    let revision = stored["revision"].as_u64().unwrap();

    // Bad input: refused naming the field, nothing stored.
    for (what, node_path, body, status, words) in [
        (
            "unknown node",
            "/v1/nodes/n9/routes",
            json!({"routes": {"web": {}}, "expected_revision": revision, "author": "t"}),
            404,
            "node \"n9\" is not in Consul's catalog",
        ),
        (
            "unknown service",
            path,
            json!({"routes": {"payments": {}}, "expected_revision": revision, "author": "t"}),
            400,
            "routes.payments: service \"payments\" is not in Consul's catalog",
        ),
        (
            "negative timeout",
            path,
            json!({"routes": {"web": {"timeout": "-1s"}}, "expected_revision": revision, "author": "t"}),
            400,
            "routes.web.timeout: \"-1s\" is negative",
        ),
        (
            "weights",
            path,
            json!({"routes": {"web": {"weights": {"v1": 60, "v2": 60}}}, "expected_revision": revision, "author": "t"}),
            400,
            "routes.web.weights: the weights add up to 120, not 100",
        ),
        (
            "unknown lb",
            path,
            json!({"routes": {"web": {"lb": "fastest"}}, "expected_revision": revision, "author": "t"}),
            400,
            "routes.web.lb: unknown load-balancing algorithm",
        ),
        (
            "retries",
            path,
            json!({"routes": {"web": {"retries": 11}}, "expected_revision": revision, "author": "t"}),
            400,
            "routes.web.retries: 11 is more than the most allowed, 10",
        ),
    ] {
        let (code, answer) = call(n2, hyper::Method::PUT, node_path, Some(body))
            .await
            .unwrap();
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            code == status && error.contains(words),
            "{what}: {code} {answer}"
        );
    }
    let dir = mesh.dir().join("routes");
    std::fs::create_dir_all(&dir).unwrap();
    let malformed = write(&dir, "malformed.toml", "[routes.web]\ntimeout = 2s\n");
    let (code, _, err) = meshctl(n1, &["routes", "set", "n1", "-f", &malformed])
        .await
        .unwrap();
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("malformed.toml: line 2 (timeout = 2s)"),
        "{err}"
    );
    // Through gRPC, a change on a stale revision: exit 75, the conflict named.
    let good = write(&dir, "good.toml", "[routes.web]\ntimeout = \"5s\"\n");
    let stale = (revision - 1).to_string();
    let (code, _, err) = meshctl(
        n2,
        &[
            "routes",
            "set",
            "n1",
            "-f",
            &good,
            "--expect-revision",
            &stale,
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 75, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: conflict on mesh/nodes/n1/routes: the change was based on revision {stale}"
        )),
        "{err}"
    );
    let (_, after) = call(n1, hyper::Method::GET, path, None).await.unwrap();
    assert_eq!(after["revision"], revision, "nothing stored: {after}");
    assert_eq!(after["version"], 2, "{after}");
    let (_, versions) = call(n2, hyper::Method::GET, "/v1/nodes/n1/versions", None)
        .await
        .unwrap();
    assert_eq!(versions.as_array().map(Vec::len), Some(2), "{versions}");
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_through_mesh_control_lands_in_the_catalog_and_the_rendered_config_runs_mesh_proxy()
 {
    let mut mesh = control_mesh().await.unwrap();
    one_leader(&mesh).await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    // meshctl on n1 (gRPC to c1) registers on n2 through n2's bridge.
    let n2_ip = n2.ip().to_string();
    let (code, out, err) = meshctl(
        n1,
        &[
            "register",
            "n2",
            "--name",
            "api",
            "--id",
            "api-1",
            "--address",
            &n2_ip,
            "--port",
            "9200",
            "--tag",
            "v1",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "n2: registered api-1\n");
    wait_in_catalog(&mesh, "api", "api-1").await.unwrap();
    let agent = n2.consul_get("/v1/agent/service/api-1").await.unwrap();
    assert_eq!(
        agent.status,
        200,
        "api-1 is on n2's own agent: {}",
        agent.text()
    );

    // Unknown node, and a node whose bridge is away: one line naming it.
    let (code, _, err) = meshctl(n1, &["register", "n9", "--name", "api", "--port", "9200"])
        .await
        .unwrap();
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("node \"n9\" is not in Consul's catalog"),
        "{err}"
    );
    mesh.nodes[1].bridge.stop().await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let (code, _, err) = meshctl(
        n1,
        &[
            "register", "n2", "--name", "api", "--id", "api-2", "--port", "9201",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains(&format!(
            "node n2's bridge at http://{}:8890 is unreachable",
            n2.ip()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Routes for n1, rendered by meshctl, run mesh-proxy on n1.
    let dir = mesh.dir().join("render");
    std::fs::create_dir_all(&dir).unwrap();
    let file = write(
        &dir,
        "routes.toml",
        "[routes.api]\ntimeout = \"2s\"\nper_try_timeout = \"500ms\"\nretries = 3\nlb = \"round-robin\"\nweights = { v1 = 100 }\n",
    );
    let (code, out, err) = meshctl(n1, &["routes", "set", "n1", "-f", &file, "--author", "e2e"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let (code, rendered, err) = meshctl(n1, &["render", "--node", "n1", "--format", "proxy"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        rendered.contains("services = [\"api\"]") && rendered.contains("[routes.api]"),
        "{rendered}"
    );
    let config = write(&dir, "proxy.toml", &rendered);
    let proxy_data = mesh.nodes[0].proxy_data_dir();
    let proxy = bins::workspace_bin("mesh-proxy").unwrap();
    let log = mesh.dir().join("n1-proxy.log");
    let n1 = &mut mesh.nodes[0];
    n1.proxy = Process::new(
        "n1/proxy",
        &n1.ns,
        &proxy,
        [
            "--config".to_owned(),
            config,
            "--node".into(),
            "n1".into(),
            "--listen".into(),
            format!("127.0.0.1:{PROXY_PORT}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{PROXY_ADMIN_PORT}"),
            "--bridge-addr".into(),
            "http://127.0.0.1:8890".into(),
            "--data-dir".into(),
            proxy_data.display().to_string(),
        ],
        log,
    );
    n1.proxy.start().unwrap();
    n1.wait_proxy_live(CONVERGE).await.unwrap();
    let n1 = &mesh.nodes[0];
    eventually(
        "n1's proxy routes api from its rendered config",
        CONVERGE,
        || async {
            let routes = n1.routes().await?;
            let api = routes["services"]["api"]
                .as_array()
                .ok_or_else(|| anyhow!("no api in {routes}"))?;
            if !api.iter().any(|e| e["id"] == "api-1") {
                bail!("api: {api:?}");
            }
            Ok(())
        },
    )
    .await
    .unwrap();

    // nginx for the same routes: upstream, location and upsync directives.
    let (code, nginx, err) = meshctl(n1, &["render", "--node", "n1", "--format", "nginx"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(nginx.contains("upstream api {"), "{nginx}");
    assert!(
        nginx.contains("location /api/ {\n            proxy_pass http://api/;"),
        "{nginx}"
    );
    assert!(
        nginx.contains("upsync 127.0.0.1:8500/v1/health/service/api upsync_timeout=6m"),
        "{nginx}"
    );
    let (code, nginx, _) = meshctl(
        n1,
        &[
            "render",
            "--node",
            "n1",
            "--format",
            "nginx",
            "--upstreams",
            "static",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(
        nginx.contains(&format!("server {n2_ip}:9200 weight=10000 ")),
        "{nginx}"
    );
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_config_takes_effect_on_its_proxy_and_a_bad_one_is_refused_with_the_reason() {
    let mut mesh = control_mesh().await.unwrap();
    one_leader(&mesh).await.unwrap();
    // web on n2: web-1 tagged v1, web-2 tagged v2, registered through mesh-control.
    let n2_ip = mesh.nodes[1].ip();
    for (id, port, tag) in [("web-1", 9100u16, "v1"), ("web-2", 9101, "v2")] {
        serve_demo(&mut mesh, 1, "web", id, port).await.unwrap();
        let (status, answer) = call(
            &mesh.nodes[0],
            hyper::Method::PUT,
            "/v1/nodes/n2/register",
            Some(json!({"name": "web", "id": id, "address": n2_ip.to_string(), "port": port, "tags": [tag]})),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "register {id}: {answer}");
        wait_in_catalog(&mesh, "web", id).await.unwrap();
    }
    start_proxy(&mut mesh, 0).await.unwrap();
    let n1 = &mesh.nodes[0];
    n1.wait_answers("web", &["web-1", "web-2"], CONVERGE)
        .await
        .unwrap();
    let n2_status = node_status(&mesh.nodes[1], "n2").await.unwrap();
    assert_eq!(
        n2_status["proxy"]["state"], "unknown",
        "no proxy on n2: {n2_status}"
    );

    // Routes for n1 through mesh-control: only v2 gets traffic.
    let stored_at = Instant::now();
    let (status, stored) = call(
        n1,
        hyper::Method::PUT,
        "/v1/nodes/n1/routes",
        Some(
            json!({"routes": {"web": {"weights": {"v2": 100}, "timeout": "2s", "retries": 1}},
                    "expected_revision": 0, "author": "e2e"}),
        ),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["version"]["number"], 1, "{stored}");
    eventually(
        "n1's proxy has config version 1 in effect",
        CONVERGE,
        || async {
            let config = n1.routes().await?["config"].clone();
            if config["version"] != 1 || config["routes"]["web"] != "control" {
                bail!("{config}");
            }
            Ok(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "e2e: config version 1 in effect on n1's proxy {:?} after mesh-control stored it",
        stored_at.elapsed()
    );
    n1.wait_answers("web", &["web-2"], CONVERGE).await.unwrap();
    // The other replica shows the acknowledgement.
    eventually(
        "mesh-control shows n1 applied at version 1",
        CONVERGE,
        || async {
            let n = node_status(&mesh.nodes[1], "n1").await?;
            let proxy = &n["proxy"];
            if n["routes_version"] != 1
                || proxy["state"] != "applied"
                || proxy["version_in_effect"] != 1
            {
                bail!("{n}");
            }
            if proxy["last_seen"].as_str().is_none_or(str::is_empty) {
                bail!("no last_seen: {n}");
            }
            Ok(())
        },
    )
    .await
    .unwrap();

    // A foreign writer stores version 2 straight into Consul KV,
    // bypassing mesh-control's validation: 11 retries is over the limit.
    let key = "/v1/kv/mesh/nodes/n1/routes";
    let current = n1.consul_get(&format!("{key}?raw")).await.unwrap();
    let mut version: Value = current.json().unwrap();
    version["number"] = json!(2);
    version["rendered"] = json!("services = [\"web\"]\n\n[routes.web]\nretries = 11\n");
    let put = n1
        .local_client(mesh_e2e::mesh::CONSUL_HTTP)
        .put(key, version.to_string())
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let reason = "routes.web.retries: 11 is more than 10";
    eventually(
        "mesh-control shows n1 refused version 2 with the reason",
        CONVERGE,
        || async {
            let n = node_status(&mesh.nodes[1], "n1").await?;
            let proxy = &n["proxy"];
            let said = proxy["reason"].as_str().unwrap_or_default();
            if proxy["state"] != "refused"
                || proxy["refused_version"] != 2
                || !said.contains(reason)
            {
                bail!("{n}");
            }
            assert_eq!(proxy["version_in_effect"], 1, "the last good one: {n}");
            Ok(())
        },
    )
    .await
    .unwrap();
    let config = n1.routes().await.unwrap()["config"].clone();
    assert_eq!(config["version"], 1, "{config}");
    assert_eq!(config["refused"]["version"], 2, "{config}");
    n1.wait_answers("web", &["web-2"], CONVERGE).await.unwrap();
    let (code, out, err) = meshctl(n1, &["nodes"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_default();
    assert!(
        line.contains("refused") && line.contains(&format!("v2: {reason}")),
        "{out}"
    );

    // Restarted while its bridge is away, the proxy applies its saved
    // config (and routes from its dump) before any bridge answers.
    mesh.nodes[0].bridge.stop().await.unwrap();
    mesh.nodes[0].proxy.stop().await.unwrap();
    mesh.nodes[0].proxy.start().unwrap();
    mesh.nodes[0].wait_proxy_live(CONVERGE).await.unwrap();
    let n1 = &mesh.nodes[0];
    let config = n1.routes().await.unwrap()["config"].clone();
    assert_eq!(
        (&config["version"], &config["source"]),
        (&json!(1), &json!("saved")),
        "{config}"
    );
    n1.wait_answers("web", &["web-2"], CONVERGE).await.unwrap();
    mesh.finish();
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).expect("the test's temp dir is writable");
    path.display().to_string()
}
