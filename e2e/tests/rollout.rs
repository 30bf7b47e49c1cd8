//! Staged rollouts on a real 3-server Consul cluster: three nodes, each
//! with a bridge and a proxy under steady load, two mesh-control replicas.
//!
//! - a good version rolls out to every node (canary, then a batch) with
//!   no failed request, and every node shows it in effect, in meshctl and
//!   on the dashboard (headless Chromium; screenshots kept as artifacts);
//! - a version node 1's proxy refuses halts the rollout: node 1 keeps
//!   serving on its old version, nodes 2 and 3 are not touched;
//! - a valid but harmful version (its route sends every call to an
//!   instance answering 500) fails node 1's health gate: node 1 is put
//!   back before the soak ends and the rollout ends `aborted` with why;
//! - pause holds the next step until resume; abort puts the nodes moved
//!   back; bad input is refused by name and nothing is started;
//! - the leader replica dies at each step boundary (after the plan is
//!   stored, after a push, during a gate, before a revert): the other
//!   replica carries on within 10 s, no node skipped, none unknown.

use std::{
    os::unix::process::ExitStatusExt as _,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use hyper::Method;
use mesh_e2e::{
    HttpClient, Mesh,
    browser::{Browser, artifacts_dir},
    control::{
        CONTROL_HTTP, CONVERGE, call, control_mesh_of, meshctl, node_status, one_leader,
        serve_demo, start_proxy, start_replica, wait_in_catalog,
    },
    eventually,
    load::{Load, LoadOptions, LoadReport},
};
use serde_json::{Value, json};

/// The nodes.
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// How long a rollout of three nodes may take where nothing is measured.
const ROLLOUT: Duration = Duration::from_secs(90);

/// The failpoint variable mesh-control reads.
const FAILPOINTS: &str = "MESH_CONTROL_FAILPOINTS";

/// Three nodes with proxies; `web-1` (tag v1) on n2 and `web-2` (tag v2)
/// on n3; every node's routes at a first version sending `web` to v1.
/// Returns the mesh and that version of each node.
async fn rollout_mesh() -> Result<(Mesh, Vec<u64>)> {
    let mut mesh = control_mesh_of(3, 2).await?;
    one_leader(&mesh).await?;
    for (k, id, port, tag) in [(1, "web-1", 9100u16, "v1"), (2, "web-2", 9101, "v2")] {
        serve_demo(&mut mesh, k, "web", id, port).await?;
        let ip = mesh.nodes[k].ip().to_string();
        let path = format!("/v1/nodes/{}/register", NODES[k]);
        let body = json!({"name": "web", "id": id, "address": ip, "port": port, "tags": [tag]});
        let (status, answer) = call(&mesh.nodes[0], Method::PUT, &path, Some(body)).await?;
        ensure!(status == 200, "register {id}: {answer}");
        wait_in_catalog(&mesh, "web", id).await?;
    }
    for k in 0..3 {
        start_proxy(&mut mesh, k).await?;
    }
    let mut first = Vec::new();
    for node in NODES {
        let body = json!({"routes": {"web": {"weights": {"v1": 100}, "timeout": "2s"}},
                          "expected_revision": 0, "author": "e2e"});
        let path = format!("/v1/nodes/{node}/routes");
        let (status, stored) = call(&mesh.nodes[0], Method::PUT, &path, Some(body)).await?;
        ensure!(status == 200, "routes of {node}: {stored}");
        first.push(stored["version"]["number"].as_u64().unwrap_or_default());
    }
    for (node, version) in NODES.iter().zip(&first) {
        wait_in_effect(&mesh, node, *version).await?;
    }
    for k in 0..3 {
        mesh.nodes[k]
            .wait_answers("web", &["web-1"], CONVERGE)
            .await?;
    }
    Ok((mesh, first))
}

/// Steady load through every node's proxy to `web`.
fn loads(mesh: &Mesh) -> Vec<Load> {
    let opts = LoadOptions {
        workers: 2,
        interval: Duration::from_millis(10),
        ..LoadOptions::default()
    };
    mesh.nodes
        .iter()
        .map(|n| {
            Load::start(
                &n.ns,
                "127.0.0.1:8888".parse().expect("an address"),
                "/web/",
                opts.clone(),
            )
        })
        .collect()
}

/// Waits until every load has answers, so a gate has traffic to judge.
async fn warm(loads: &[Load]) -> Result<()> {
    for load in loads {
        load.wait_more(100, CONVERGE).await?;
    }
    Ok(())
}

/// Stops the loads and returns their reports.
async fn stop(loads: Vec<Load>) -> Vec<LoadReport> {
    let mut out = Vec::new();
    for load in loads {
        out.push(load.stop().await);
    }
    out
}

/// Asserts that no request of `reports` failed.
fn no_failures(reports: &[LoadReport], what: &str) {
    for (k, r) in reports.iter().enumerate() {
        assert!(
            r.failures().is_empty(),
            "{what}: requests through {}'s proxy failed: {}",
            NODES[k],
            r.summary()
        );
        assert!(r.total() > 0, "{what}: no requests through {}", NODES[k]);
    }
}

/// Stages `routes` on every node through `via`'s replica; the version.
async fn stage(mesh: &Mesh, via: usize, routes: Value) -> Result<u64> {
    let body = json!({"nodes": NODES, "routes": routes, "author": "e2e"});
    let (status, staged) = call(&mesh.nodes[via], Method::POST, "/v1/versions", Some(body)).await?;
    ensure!(status == 200, "stage: {status} {staged}");
    let version = staged["version"].as_u64().unwrap_or_default();
    ensure!(version > 0, "{staged}");
    for n in staged["nodes"].as_array().into_iter().flatten() {
        ensure!(
            n["diff"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("version {version} (proxy)"))),
            "a staged version shows its diff: {n}"
        );
    }
    Ok(version)
}

/// Starts the rollout of `version` through `via`'s replica.
async fn start(mesh: &Mesh, via: usize, version: u64, options: Value) -> Result<Value> {
    let mut body = json!({"version": version, "author": "e2e"});
    if let (Some(b), Some(o)) = (body.as_object_mut(), options.as_object()) {
        b.extend(o.clone());
    }
    let (status, rollout) =
        call(&mesh.nodes[via], Method::POST, "/v1/rollouts", Some(body)).await?;
    ensure!(status == 200, "start {version}: {status} {rollout}");
    ensure!(rollout["state"] == "running", "{rollout}");
    Ok(rollout)
}

/// Stages `routes` on every node and starts rolling them out, both
/// through `via`'s replica; the version.
async fn roll(mesh: &Mesh, via: usize, routes: Value, options: Value) -> Result<u64> {
    let version = stage(mesh, via, routes).await?;
    start(mesh, via, version, options).await?;
    Ok(version)
}

/// The rollout of `version` as `via`'s replica shows it.
async fn rollout(mesh: &Mesh, via: usize, version: u64) -> Result<Value> {
    let (status, r) = call(
        &mesh.nodes[via],
        Method::GET,
        &format!("/v1/rollouts/{version}"),
        None,
    )
    .await?;
    ensure!(status == 200, "{status} {r}");
    Ok(r)
}

/// Waits until the rollout of `version` has ended; returns it.
async fn ended(mesh: &Mesh, via: usize, version: u64, deadline: Duration) -> Result<Value> {
    eventually(
        &format!("the rollout of version {version} ends"),
        deadline,
        || async {
            let r = rollout(mesh, via, version).await?;
            if r["state"] != "succeeded" && r["state"] != "aborted" {
                bail!("{}: {}", r["state"], states(&r));
            }
            Ok(r)
        },
    )
    .await
}

/// `node: state` of each node of a rollout.
fn states(r: &Value) -> String {
    r["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            format!(
                "{}: {} ({})",
                n["node"].as_str().unwrap_or("?"),
                n["state"],
                n["detail"]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The state of `node` in rollout `r`.
fn state_of<'a>(r: &'a Value, node: &str) -> &'a str {
    r["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node"] == node)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("missing")
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

/// Makes `web-2` answer `status`.
async fn web2_answers(mesh: &Mesh, status: u16) -> Result<()> {
    let n3 = &mesh.nodes[2];
    let addr = n3.instances["web-2"].addr;
    let resp = HttpClient::new(&n3.ns, addr)
        .put("/_demo/answer", status.to_string())
        .await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_refused_and_harmful_versions_roll_out_halt_and_revert() {
    let (mesh, first) = rollout_mesh().await.unwrap();
    let base = first.iter().copied().max().unwrap_or_default();
    let load = loads(&mesh);
    warm(&load).await.unwrap();

    // A good version: canary n1, then n2 and n3 together.
    let good = stage(
        &mesh,
        0,
        json!({"web": {"weights": {"v1": 100}, "timeout": "3s", "retries": 2}}),
    )
    .await
    .unwrap();
    assert!(
        good > base,
        "one sequence across the mesh: {good} after {base}"
    );
    let started = start(
        &mesh,
        0,
        good,
        json!({"canary": 1, "batch": 2, "soak_ms": 1500, "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    assert_eq!(started["steps"], 2, "{started}");
    let (code, out, err) = meshctl(&mesh.nodes[0], &["rollout", "status", "--watch"])
        .await
        .unwrap();
    assert_eq!(code, 0, "meshctl rollout status --watch: {out}{err}");
    assert!(
        out.contains(&format!(
            "rollout of version {good}: succeeded (3 of 3 nodes done"
        )),
        "{out}"
    );
    assert!(
        out.contains("n1 acknowledged version") && out.contains("step 2 of 2 done"),
        "{out}"
    );
    let r = rollout(&mesh, 1, good).await.unwrap();
    assert_eq!(r["state"], "succeeded", "{r}");
    for (k, node) in NODES.iter().enumerate() {
        assert_eq!(state_of(&r, node), "done", "{}", states(&r));
        assert_eq!(r["nodes"][k]["step"], if k == 0 { 1 } else { 2 }, "{r}");
        wait_in_effect(&mesh, node, good).await.unwrap();
    }
    let (code, out, _) = meshctl(&mesh.nodes[1], &["nodes"]).await.unwrap();
    assert_eq!(code, 0);
    for node in NODES {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{node} ")))
            .unwrap_or_default();
        assert!(
            line.contains("applied"),
            "{node} applied the version: {out}"
        );
    }
    // The dashboard shows every node on the new version, and the rollout.
    let artifacts = artifacts_dir("rollout").unwrap();
    let mut browser = Browser::start(&mesh.nodes[0], mesh.dir()).await.unwrap();
    let base = format!("http://127.0.0.1:{CONTROL_HTTP}");
    browser.open(&format!("{base}/")).await.unwrap();
    browser
        .see("the nodes page", &["Nodes (", "n3"])
        .await
        .unwrap();
    for node in NODES {
        for column in ["Config version", "In effect"] {
            let what = format!("{node}'s {column} on the dashboard");
            browser
                .see_cell(&what, 0, "Node", node, column, &good.to_string())
                .await
                .unwrap();
        }
    }
    browser
        .screenshot(&artifacts.join("nodes.png"))
        .await
        .unwrap();
    browser
        .open(&format!("{base}/ui/#/rollouts"))
        .await
        .unwrap();
    browser
        .see(
            "the rollouts page",
            &[&format!("Rollout of version {good}"), "succeeded"],
        )
        .await
        .unwrap();
    for node in NODES {
        browser
            .see_cell("a node of the rollout", 0, "Node", node, "State", "done")
            .await
            .unwrap();
    }
    browser
        .screenshot(&artifacts.join("rollouts.png"))
        .await
        .unwrap();
    browser.close().await.unwrap();

    // A version n1's proxy refuses: a foreign writer changed n1's record
    // after staging (11 retries is over the proxy's limit).
    let refused = stage(
        &mesh,
        0,
        json!({"web": {"weights": {"v1": 100}, "timeout": "4s"}}),
    )
    .await
    .unwrap();
    let key = format!("/v1/kv/mesh/versions/n1/{refused}");
    let mut record: Value = mesh.nodes[0]
        .consul_get(&format!("{key}?raw"))
        .await
        .unwrap()
        .json()
        .unwrap();
    record["rendered"] = json!("services = [\"web\"]\n\n[routes.web]\nretries = 11\n");
    let put = mesh.nodes[0]
        .local_client(mesh_e2e::mesh::CONSUL_HTTP)
        .put(&key, record.to_string())
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    start(
        &mesh,
        0,
        refused,
        json!({"soak_ms": 1000, "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    let r = ended(&mesh, 1, refused, ROLLOUT).await.unwrap();
    assert_eq!(r["state"], "aborted", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("node n1 refused version {refused}"))
            && reason.contains("retries: 11"),
        "{r}"
    );
    assert_eq!(state_of(&r, "n1"), "reverted", "{}", states(&r));
    assert_eq!(
        (state_of(&r, "n2"), state_of(&r, "n3")),
        ("pending", "pending"),
        "{}",
        states(&r)
    );
    for node in NODES {
        wait_in_effect(&mesh, node, good).await.unwrap();
    }
    let reports = stop(load).await;
    no_failures(&reports, "good and refused rollouts");

    // A harmful version: every call to web goes to web-2, which answers 500.
    web2_answers(&mesh, 500).await.unwrap();
    let load = loads(&mesh);
    warm(&load).await.unwrap();
    let harmful = stage(
        &mesh,
        1,
        json!({"web": {"weights": {"v2": 100}, "timeout": "2s"}}),
    )
    .await
    .unwrap();
    let soak = Duration::from_secs(20);
    let at = Instant::now();
    start(
        &mesh,
        1,
        harmful,
        json!({"soak_ms": soak.as_millis() as u64, "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    let r = ended(&mesh, 0, harmful, ROLLOUT).await.unwrap();
    let took = at.elapsed();
    assert_eq!(r["state"], "aborted", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|w| w.contains("node n1 is unhealthy") && w.contains("error rate")),
        "{r}"
    );
    assert!(
        took < soak,
        "n1 was put back before its gate's soak ended: {took:?}"
    );
    eprintln!(
        "e2e: harmful version {harmful} reverted and the rollout aborted {took:?} after it started"
    );
    assert_eq!(state_of(&r, "n1"), "reverted", "{}", states(&r));
    assert_eq!(
        (state_of(&r, "n2"), state_of(&r, "n3")),
        ("pending", "pending"),
        "{}",
        states(&r)
    );
    wait_in_effect(&mesh, "n1", good).await.unwrap();
    mesh.nodes[0]
        .wait_answers("web", &["web-1"], CONVERGE)
        .await
        .unwrap();
    let settled = Instant::now();
    let reports = stop(load).await;
    assert!(
        !reports[0].failures().is_empty(),
        "the harmful version did fail calls on n1"
    );
    assert!(
        reports[0].after(settled).all(|s| s.ok()),
        "n1 serves again once put back: {}",
        reports[0].summary()
    );
    no_failures(&reports[1..], "nodes the harmful rollout did not reach");
    web2_answers(&mesh, 200).await.unwrap();

    // Pause holds the next step; resume goes on.
    let paused = roll(
        &mesh,
        0,
        json!({"web": {"weights": {"v1": 100}, "timeout": "5s"}}),
        json!({"soak_ms": 5000, "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    eventually("the canary is pushed", CONVERGE, || async {
        let r = rollout(&mesh, 1, paused).await?;
        if state_of(&r, "n1") != "gating" {
            bail!("{}", states(&r));
        }
        Ok(())
    })
    .await
    .unwrap();
    let (code, out, err) = meshctl(&mesh.nodes[0], &["rollout", "pause"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": paused"), "{out}");
    // Another rollout cannot start while this one is under way.
    let other = stage(
        &mesh,
        0,
        json!({"web": {"weights": {"v1": 100}, "timeout": "6s"}}),
    )
    .await
    .unwrap();
    let (status, answer) = call(
        &mesh.nodes[1],
        Method::POST,
        "/v1/rollouts",
        Some(json!({"version": other, "author": "e2e"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("the rollout of version {paused} is under way"))),
        "{answer}"
    );
    eventually(
        "the paused rollout finishes its step and holds",
        CONVERGE,
        || async {
            let r = rollout(&mesh, 1, paused).await?;
            if r["state"] != "paused" || state_of(&r, "n1") != "done" {
                bail!("{}: {}", r["state"], states(&r));
            }
            Ok(())
        },
    )
    .await
    .unwrap();
    let (code, out, err) = meshctl(&mesh.nodes[1], &["rollout", "resume"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let r = ended(&mesh, 0, paused, ROLLOUT).await.unwrap();
    assert_eq!(r["state"], "succeeded", "{r}");
    let texts: Vec<&str> = r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["text"].as_str())
        .collect();
    let resumed = texts
        .iter()
        .position(|t| t.starts_with("resumed by"))
        .unwrap();
    let n2_pushed = texts
        .iter()
        .position(|t| *t == format!("pushed version {paused} to n2"))
        .unwrap();
    assert!(
        resumed < n2_pushed,
        "no step started while paused: {texts:#?}"
    );

    // Abort puts every node moved back.
    let aborted = roll(
        &mesh,
        0,
        json!({"web": {"weights": {"v1": 100}, "timeout": "7s"}}),
        json!({"canary": 2, "soak_ms": 60000, "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    for node in ["n1", "n2"] {
        wait_in_effect(&mesh, node, aborted).await.unwrap();
    }
    let (code, out, err) = meshctl(&mesh.nodes[0], &["rollout", "abort"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let r = ended(&mesh, 1, aborted, ROLLOUT).await.unwrap();
    assert_eq!(r["state"], "aborted", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|w| w.starts_with("aborted by")),
        "{r}"
    );
    assert_eq!(
        (state_of(&r, "n1"), state_of(&r, "n2"), state_of(&r, "n3")),
        ("reverted", "reverted", "pending")
    );
    for node in NODES {
        wait_in_effect(&mesh, node, paused).await.unwrap();
    }

    // Bad input: named, nothing stored or started.
    let n1 = &mesh.nodes[0];
    let resume_ended = format!("/v1/rollouts/{good}/resume");
    let cases = [
        (
            Method::POST,
            "/v1/versions",
            json!({"nodes": ["n1", "n9"], "routes": {"web": {}}, "author": "e2e"}),
            404,
            "\"n9\"",
        ),
        (
            Method::POST,
            "/v1/versions",
            json!({"nodes": [], "routes": {}, "author": "e2e"}),
            400,
            "nodes",
        ),
        (
            Method::POST,
            "/v1/versions",
            json!({"nodes": ["n1"], "routes": {"web": {"timeout": "-1s"}}, "author": "e2e"}),
            400,
            "routes.web.timeout",
        ),
        (
            Method::POST,
            "/v1/versions",
            json!({"nodes": ["n1"], "routes": {"nope": {}}, "author": "e2e"}),
            400,
            "nope",
        ),
        (
            Method::POST,
            "/v1/rollouts",
            json!({"version": 999_999, "author": "e2e"}),
            404,
            "was not staged",
        ),
        (
            Method::POST,
            "/v1/rollouts",
            json!({"version": good, "author": "e2e"}),
            409,
            "rolled out already",
        ),
        (
            Method::POST,
            "/v1/rollouts",
            json!({"version": other, "author": "e2e", "batch": 0}),
            400,
            "batch",
        ),
        (
            Method::PUT,
            "/v1/rollouts/0/pause",
            json!({"author": "e2e"}),
            409,
            "no rollout is under way",
        ),
        (
            Method::PUT,
            resume_ended.as_str(),
            json!({"author": "e2e"}),
            409,
            "succeeded",
        ),
    ];
    for (method, path, body, want, names) in cases {
        let (status, answer) = call(n1, method, path, Some(body.clone())).await.unwrap();
        assert_eq!(status, want, "{path} {body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains(names)),
            "{path} {body}: {answer}"
        );
    }
    let (status, all) = call(n1, Method::GET, "/v1/rollouts", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        all.as_array()
            .is_some_and(|a| a.iter().all(|r| r["version"] != other)),
        "nothing started: {all}"
    );
    // A version staged but never rolled out shows as staged; the one in
    // effect as current.
    let (code, out, err) = meshctl(n1, &["versions", "n1"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let line = |v: u64| {
        out.lines()
            .find(|l| l.starts_with(&format!("{v} ")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line(other).contains("staged"), "{out}");
    assert!(line(paused).contains("current"), "{out}");
    let dir = mesh.dir().to_path_buf();
    let bad_file = dir.join("bad-routes.toml");
    std::fs::write(&bad_file, "[routes.web\ntimeout = \"2s\"\n").unwrap();
    let (code, _, err) = meshctl(
        n1,
        &[
            "routes",
            "stage",
            "--node",
            "n1",
            "-f",
            &bad_file.display().to_string(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("bad-routes.toml"), "{err}");
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_at_each_step_boundary_and_the_other_replica_carries_on() {
    let (mut mesh, _) = rollout_mesh().await.unwrap();
    let mut load = Some(loads(&mesh));
    warm(load.as_ref().unwrap()).await.unwrap();
    let points = [
        "rollout.after-plan",
        "rollout.after-push",
        "rollout.during-gate",
        "rollout.before-revert",
    ];
    let mut timeout = 3;
    let mut on = roll(
        &mesh,
        0,
        json!({"web": {"weights": {"v1": 100}, "timeout": "2s"}}),
        json!({"canary": 0, "batch": 3, "soak_ms": 500}),
    )
    .await
    .unwrap();
    assert_eq!(
        ended(&mesh, 0, on, ROLLOUT).await.unwrap()["state"],
        "succeeded"
    );
    for point in points {
        let harmful = point == "rollout.before-revert";
        if harmful {
            no_failures(
                &stop(load.take().unwrap()).await,
                "rollouts whose leader died",
            );
            web2_answers(&mesh, 500).await.unwrap();
            load = Some(loads(&mesh));
            warm(load.as_ref().unwrap()).await.unwrap();
        }
        // c1 leads, primed to die at the point; c2 stands by.
        for k in 0..2 {
            mesh.nodes[k]
                .instances
                .get_mut("mesh-control")
                .unwrap()
                .process
                .stop()
                .await
                .unwrap();
        }
        start_replica(&mut mesh, 0, &[(FAILPOINTS, point)])
            .await
            .unwrap();
        eventually("c1 leads", CONVERGE, || async {
            let (_, s) = call(&mesh.nodes[0], Method::GET, "/v1/status", None).await?;
            if s["is_leader"] != true {
                bail!("{s}");
            }
            Ok(())
        })
        .await
        .unwrap();
        start_replica(&mut mesh, 1, &[]).await.unwrap();
        timeout += 1;
        let routes = if harmful {
            json!({"web": {"weights": {"v2": 100}, "timeout": "2s"}})
        } else {
            json!({"web": {"weights": {"v1": 100}, "timeout": format!("{timeout}s")}})
        };
        let version = roll(
            &mesh,
            1,
            routes,
            json!({"canary": 1, "batch": 1, "soak_ms": 1000, "ack_timeout_ms": 15000}),
        )
        .await
        .unwrap();
        let c1 = &mut mesh.nodes[0]
            .instances
            .get_mut("mesh-control")
            .unwrap()
            .process;
        let exit = c1.wait_exit(Duration::from_secs(60)).await.unwrap();
        assert_eq!(exit.signal(), Some(9), "c1 was killed at {point}: {exit:?}");
        let died = Instant::now();
        let at_death = rollout(&mesh, 1, version).await.unwrap();
        eventually(
            &format!("c2 carries the rollout on after {point}"),
            Duration::from_secs(10),
            || async {
                let r = rollout(&mesh, 1, version).await?;
                if r["driver"] != "c2"
                    || r["updated_at"] == at_death["updated_at"]
                        && r["events"] == at_death["events"]
                {
                    bail!("driver {}: {}", r["driver"], states(&r));
                }
                Ok(())
            },
        )
        .await
        .unwrap();
        eprintln!(
            "e2e: leader died at {point}; c2 took the rollout on after {:?}",
            died.elapsed()
        );
        let r = ended(&mesh, 1, version, ROLLOUT).await.unwrap();
        if harmful {
            assert_eq!(r["state"], "aborted", "{r}");
            assert_eq!(state_of(&r, "n1"), "reverted", "{}", states(&r));
            assert_eq!(
                (state_of(&r, "n2"), state_of(&r, "n3")),
                ("pending", "pending")
            );
            for node in NODES {
                wait_in_effect(&mesh, node, on).await.unwrap();
            }
        } else {
            assert_eq!(r["state"], "succeeded", "after {point}: {r}");
            for node in NODES {
                assert_eq!(state_of(&r, node), "done", "after {point}: {}", states(&r));
                wait_in_effect(&mesh, node, version).await.unwrap();
            }
            on = version;
        }
    }
    let reports = stop(load.take().unwrap()).await;
    no_failures(&reports[1..], "nodes the harmful rollout did not reach");
    web2_answers(&mesh, 200).await.unwrap();
    mesh.finish();
}
