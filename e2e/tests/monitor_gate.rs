//! Rollout gates with mesh-monitor's verdict: two nodes with bridges and
//! proxies, mesh-monitor probing every instance, one mesh-control replica
//! that asks the monitor (`MESH_MONITOR_ADDR`).
//!
//! - a rollout whose canary node turns unhealthy in the monitor's eyes (an
//!   instance on it hangs: stopped with SIGSTOP, so it accepts connections
//!   and never answers) is halted by the monitor's verdict long before its
//!   soak ends: it ends `aborted` with the monitor's reasons, the canary is
//!   back on its previous version, the next node was never touched. No
//!   request goes to the hung instance through a proxy, so the proxy
//!   health gate has nothing to judge: the reason names mesh-monitor;
//! - with the monitor gone, a rollout still goes through on its other
//!   gates, and its events say once per node that the monitor was silent.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use hyper::Method;
use mesh_e2e::{
    Mesh,
    control::{
        CONVERGE, call, control_mesh_of, node_status, one_leader, serve_demo, start_proxy,
        start_replica, wait_in_catalog,
    },
    eventually,
    monitor::{node_verdict, start_monitor, stop_monitor},
};
use serde_json::{Value, json};

/// The nodes.
const NODES: [&str; 2] = ["n1", "n2"];

/// The soak of the halted rollout: far longer than the monitor needs to
/// see the hang, so an abort before it ends is the monitor's doing.
const SOAK: Duration = Duration::from_secs(90);

/// How long the monitor's verdict may take to halt the rollout once the
/// instance hangs (probes every 1 s, 500 ms timeout, two misses).
const HALT: Duration = Duration::from_secs(30);

/// Two nodes; `web-1` (tag v1) on n2, `orders-1` on n1 (the canary's
/// instance, never called); mesh-monitor on n1 and the replica asking it;
/// both nodes' routes at a first version sending `web` to v1. Returns the
/// mesh and those versions.
async fn monitored_mesh() -> Result<(Mesh, Vec<u64>)> {
    let mut mesh = control_mesh_of(2, 0).await?;
    for (k, service, id, port) in [
        (1, "web", "web-1", 9100u16),
        (0, "orders", "orders-1", 9102),
    ] {
        serve_demo(&mut mesh, k, service, id, port).await?;
    }
    for k in 0..2 {
        start_proxy(&mut mesh, k).await?;
    }
    // The test services only: mesh-control registers itself too, and its
    // gRPC port does not answer the monitor's HTTP probe.
    let monitor = start_monitor(&mut mesh, 0, &["web", "orders"]).await?;
    start_replica(&mut mesh, 0, &[("MESH_MONITOR_ADDR", &monitor)]).await?;
    one_leader(&mesh).await?;
    for (k, service, id, port) in [
        (1, "web", "web-1", 9100u16),
        (0, "orders", "orders-1", 9102),
    ] {
        let ip = mesh.nodes[k].ip().to_string();
        let path = format!("/v1/nodes/{}/register", NODES[k]);
        let body = json!({"name": service, "id": id, "address": ip, "port": port, "tags": ["v1"]});
        let (status, answer) = call(&mesh.nodes[0], Method::PUT, &path, Some(body)).await?;
        ensure!(status == 200, "register {id}: {answer}");
        wait_in_catalog(&mesh, service, id).await?;
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
    eventually("the monitor finds n1 healthy", CONVERGE, || async {
        let v = node_verdict(&mesh.nodes[0], "n1").await?;
        if !v.healthy || v.targets == 0 || !v.reasons.is_empty() {
            bail!("{v:?}");
        }
        Ok(())
    })
    .await?;
    Ok((mesh, first))
}

/// Stages `routes` on every node and starts rolling them out with
/// `options`; the version.
async fn roll(mesh: &Mesh, routes: Value, options: Value) -> Result<u64> {
    let body = json!({"nodes": NODES, "routes": routes, "author": "e2e"});
    let (status, staged) = call(&mesh.nodes[0], Method::POST, "/v1/versions", Some(body)).await?;
    ensure!(status == 200, "stage: {status} {staged}");
    let version = staged["version"].as_u64().unwrap_or_default();
    let mut body = json!({"version": version, "author": "e2e"});
    if let (Some(b), Some(o)) = (body.as_object_mut(), options.as_object()) {
        b.extend(o.clone());
    }
    let (status, rollout) = call(&mesh.nodes[0], Method::POST, "/v1/rollouts", Some(body)).await?;
    ensure!(status == 200, "start {version}: {status} {rollout}");
    Ok(version)
}

/// The rollout of `version`.
async fn rollout(mesh: &Mesh, version: u64) -> Result<Value> {
    let path = format!("/v1/rollouts/{version}");
    let (status, r) = call(&mesh.nodes[0], Method::GET, &path, None).await?;
    ensure!(status == 200, "{status} {r}");
    Ok(r)
}

/// Waits until the rollout of `version` has ended; returns it.
async fn ended(mesh: &Mesh, version: u64, deadline: Duration) -> Result<Value> {
    eventually(
        &format!("the rollout of version {version} ends"),
        deadline,
        || async {
            let r = rollout(mesh, version).await?;
            if r["state"] != "succeeded" && r["state"] != "aborted" {
                bail!("{}: {}", r["state"], states(&r));
            }
            Ok(r)
        },
    )
    .await
}

/// `node: state (detail)` of each node of a rollout.
fn states(r: &Value) -> String {
    nodes(r)
        .map(|n| format!("{}: {} ({})", n["node"], n["state"], n["detail"]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nodes(r: &Value) -> impl Iterator<Item = &Value> {
    r["nodes"].as_array().into_iter().flatten()
}

/// The state of `node` in rollout `r`.
fn state_of<'a>(r: &'a Value, node: &str) -> &'a str {
    nodes(r)
        .find(|n| n["node"] == node)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("missing")
}

/// The events of rollout `r` that contain `needle`.
fn events_with<'a>(r: &'a Value, needle: &str) -> Vec<&'a str> {
    r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["text"].as_str())
        .filter(|t| t.contains(needle))
        .collect()
}

/// Waits until mesh-control shows `version` stored and in effect on `node`.
async fn wait_in_effect(mesh: &Mesh, node: &str, version: u64) -> Result<()> {
    eventually(
        &format!("{node} runs version {version}"),
        CONVERGE,
        || async {
            let n = node_status(&mesh.nodes[0], node).await?;
            if n["routes_version"] != version || n["proxy"]["version_in_effect"] != version {
                bail!("{n}");
            }
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_the_monitor_finds_unhealthy_halts_the_rollout() {
    let (mut mesh, first) = monitored_mesh().await.unwrap();

    let version = roll(
        &mesh,
        json!({"web": {"weights": {"v1": 100}, "timeout": "3s"}}),
        json!({"canary": 1, "batch": 1, "soak_ms": SOAK.as_millis() as u64,
               "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    // n1 runs the version and soaks; then its instance hangs.
    eventually("n1 acknowledges and soaks", CONVERGE, || async {
        let r = rollout(&mesh, version).await?;
        let n1 = nodes(&r).find(|n| n["node"] == "n1").cloned();
        match n1 {
            Some(n) if n["detail"].as_str().is_some_and(|d| d.contains("soaking")) => Ok(()),
            _ => bail!("{}: {}", r["state"], states(&r)),
        }
    })
    .await
    .unwrap();
    let hung_at = Instant::now();
    let orders = mesh.nodes[0].instances.get_mut("orders-1").unwrap();
    orders.process.pause().unwrap();

    let r = ended(&mesh, version, HALT).await.unwrap();
    let took = hung_at.elapsed();
    assert_eq!(r["state"], "aborted", "{r}");
    assert!(took < SOAK, "halted before the soak ended ({took:?})");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("mesh-monitor: node n1 is unhealthy: ")
            && reason.contains("hung")
            && reason.contains("orders-1"),
        "the monitor's reasons: {r}"
    );
    assert_eq!(state_of(&r, "n1"), "reverted", "{}", states(&r));
    assert_eq!(state_of(&r, "n2"), "pending", "{}", states(&r));
    assert!(
        !events_with(&r, "n1 reverted").is_empty(),
        "the revert is in the history: {r}"
    );
    for (node, v) in NODES.iter().zip(&first) {
        wait_in_effect(&mesh, node, *v).await.unwrap();
    }
    let orders = mesh.nodes[0].instances.get_mut("orders-1").unwrap();
    orders.process.resume().unwrap();

    // Without a monitor the other gates decide, and the events say so once.
    stop_monitor(&mut mesh.nodes[0]).await.unwrap();
    let version = roll(
        &mesh,
        json!({"web": {"weights": {"v1": 100}, "timeout": "4s"}}),
        json!({"canary": 1, "batch": 1, "soak_ms": 3000, "ack_timeout_ms": 15000}),
    )
    .await
    .unwrap();
    let r = ended(&mesh, version, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r["state"], "succeeded", "{r}");
    for node in NODES {
        assert_eq!(state_of(&r, node), "done", "{}", states(&r));
        let silent = events_with(&r, &format!("mesh-monitor did not answer about {node} ("));
        assert_eq!(silent.len(), 1, "once for {node}: {r}");
        wait_in_effect(&mesh, node, version).await.unwrap();
    }
    mesh.finish();
}
