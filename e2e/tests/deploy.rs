//! Rolling deployments of real jars (built with the machine's JDK) on a
//! real 3-server Consul cluster: three nodes, each with a bridge, a proxy
//! and a mesh-deployer; a mesh-control replica on n1 that reaches the
//! deployers with their token; steady load through every node's proxy to
//! the service by name.
//!
//! - v1 deploys to the three nodes (`meshctl deploy --watch` exits 0), then
//!   v2 under load: no failed request, every node runs one instance of v2,
//!   and every node keeps v1;
//! - a bad v3 (its `/health` answers 500) fails node 1's health gate: node
//!   1 keeps serving v2 (the same instance), the deployment halts, nodes 2
//!   and 3 are skipped and untouched, no request fails;
//! - uploads with a wrong checksum, cut short, or over the size limit are
//!   refused with a clear error (by a node's deployer and by mesh-control)
//!   and nothing is stored;
//! - node 1's deployer is SIGKILLed while its deploy waits for the new
//!   instance's health, and started again: the deployment carries on and
//!   succeeds, and every node runs exactly one process of the service.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{
    Mesh,
    browser::{Browser, artifacts_dir},
    control::{CONTROL_HTTP, CONVERGE, control_mesh_of, start_proxy, start_replica},
    deployer::{
        TOKEN, authorized, control_client, deployer_client, kill_deployer, processes_with,
        restart_deployer, start_deployer,
    },
    eventually,
    java::{self, Jar, Variant},
    load::{Load, LoadOptions, LoadReport},
};
use mesh_proto::v1::{
    DeployChunk, DeployStart, ListArtifactsRequest, StatusRequest, UploadChunk, UploadStart,
};
use serde_json::Value;
use tonic::Code;

/// The nodes.
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// The service deployed.
const SERVICE: &str = "hello";

/// The largest artifact the test's deployers take.
const MAX_ARTIFACT: u64 = 1 << 20;

/// How long a deployment of three nodes may take.
const DEPLOYMENT: Duration = Duration::from_secs(150);

/// How long the slow version's `/health` answers 503 after it starts.
const SLOW_START: Duration = Duration::from_secs(6);

/// The timings of every deploy: short, but with a drain long enough for
/// the other nodes' proxies to drop an old instance before it stops.
const TIMINGS: [&str; 4] = ["--drain", "2s", "--soak", "2s"];

/// A healthy version's time to start.
const HEALTH_TIMEOUT: [&str; 2] = ["--health-timeout", "30s"];

/// The jars, by version.
struct Jars {
    v1: Jar,
    v2: Jar,
    v3_bad: Jar,
    v4_slow: Jar,
}

/// Three nodes, each with a proxy and a deployer; a mesh-control replica
/// on n1 with the deployers' token; the jars.
async fn deploy_mesh() -> Result<(Mesh, Jars)> {
    let mut mesh = control_mesh_of(3, 0).await?;
    start_replica(&mut mesh, 0, &[("MESH_DEPLOYER_TOKEN", TOKEN)]).await?;
    for k in 0..3 {
        start_proxy(&mut mesh, k).await?;
        start_deployer(
            &mut mesh,
            k,
            &["--max-artifact-size", &MAX_ARTIFACT.to_string()],
        )
        .await?;
    }
    let built = java::build(
        &mesh.dir().join("jars"),
        &[
            Variant::healthy("v1"),
            Variant::healthy("v2"),
            Variant::unhealthy("v3-bad"),
            Variant::slow("v4-slow", SLOW_START),
        ],
    )
    .await?;
    let [v1, v2, v3_bad, v4_slow]: [Jar; 4] =
        built.try_into().map_err(|_| anyhow::anyhow!("four jars"))?;
    Ok((
        mesh,
        Jars {
            v1,
            v2,
            v3_bad,
            v4_slow,
        },
    ))
}

/// Runs `meshctl args…` inside `node`, bounded by `timeout` (a watched
/// deployment outlasts the harness's 60 s): exit code, stdout, stderr.
async fn meshctl_for(
    node: &mesh_e2e::Node,
    args: &[&str],
    timeout: Duration,
) -> Result<(i32, String, String)> {
    let meshctl = mesh_e2e::bins::workspace_bin("meshctl")?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", node.ns.name()])
        .arg(&meshctl)
        .args(args)
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESH_") {
            cmd.env_remove(key);
        }
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("meshctl {args:?} took over {timeout:?}"))??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `meshctl args… --output json` on n1; fails unless it exits 0.
async fn meshctl_json(mesh: &Mesh, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (code, out, err) = meshctl_for(&mesh.nodes[0], &all, Duration::from_secs(60)).await?;
    ensure!(code == 0, "meshctl {all:?} exited {code}: {out}{err}");
    serde_json::from_str(&out).with_context(|| format!("meshctl {all:?} printed {out}"))
}

/// `meshctl deploy` of `jar` to every node with [`TIMINGS`] and `extra`
/// flags; the exit code and output.
async fn deploy(mesh: &Mesh, jar: &Jar, extra: &[&str]) -> Result<(i32, String)> {
    let artifact = jar.path.display().to_string();
    let mut args = vec![
        "deploy",
        "--service",
        SERVICE,
        "--artifact",
        &artifact,
        "--version",
        &jar.variant.version,
        "--nodes",
        "n1,n2,n3",
    ];
    args.extend(TIMINGS);
    args.extend(extra);
    let (code, out, err) = meshctl_for(&mesh.nodes[0], &args, DEPLOYMENT).await?;
    Ok((code, format!("{out}{err}")))
}

/// The newest deployment of the service.
async fn latest(mesh: &Mesh) -> Result<Value> {
    meshctl_json(mesh, &["deploy", "status", "--service", SERVICE]).await
}

/// Waits until the newest deployment of the service has ended; returns it.
async fn ended(mesh: &Mesh) -> Result<Value> {
    eventually("the deployment ends", DEPLOYMENT, || async {
        let d = latest(mesh).await?;
        if d["state"] == "running" {
            bail!("running: {}", states(&d));
        }
        Ok(d)
    })
    .await
}

/// `node: state (detail)` of each node of a deployment.
fn states(d: &Value) -> String {
    nodes_of(d)
        .map(|n| format!("{}: {} ({})", n["node"], n["state"], n["detail"]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nodes_of(d: &Value) -> impl Iterator<Item = &Value> {
    d["nodes"].as_array().into_iter().flatten()
}

/// Node `node` of deployment `d`.
fn node_of<'a>(d: &'a Value, node: &str) -> &'a Value {
    nodes_of(d)
        .find(|n| n["node"] == node)
        .unwrap_or(&Value::Null)
}

/// What each node's deployer runs and keeps of the service, in node order
/// (`meshctl deploy nodes`).
async fn node_deployments(mesh: &Mesh) -> Result<Vec<Value>> {
    let all = meshctl_json(mesh, &["deploy", "nodes", "--service", SERVICE]).await?;
    let list = all.as_array().cloned().unwrap_or_default();
    NODES
        .iter()
        .map(|node| {
            let n = list
                .iter()
                .find(|n| n["node"] == *node)
                .cloned()
                .with_context(|| format!("no {node} in {all}"))?;
            ensure!(n["error"] == "", "{node}'s deployer: {n}");
            Ok(n)
        })
        .collect()
}

/// The service's instances in a node's entry.
fn instances(n: &Value) -> Vec<&Value> {
    n["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["service"] == SERVICE)
        .collect()
}

/// The service's versions a node keeps, with their SHA-256.
fn artifacts(n: &Value) -> Vec<(String, String)> {
    n["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["service"] == SERVICE)
        .map(|a| {
            (
                a["version"].as_str().unwrap_or_default().to_owned(),
                a["sha256"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Checks that every node runs exactly one instance of the service, of
/// `jar`'s version, and keeps that version with `jar`'s SHA-256; returns
/// the instance ids in node order.
async fn all_run(mesh: &Mesh, jar: &Jar) -> Result<Vec<String>> {
    let version = &jar.variant.version;
    let mut ids = Vec::new();
    for n in node_deployments(mesh).await? {
        let running = instances(&n);
        ensure!(
            running.len() == 1
                && running[0]["version"] == version.as_str()
                && running[0]["state"] == "running",
            "{}: one running instance of {version}: {n}",
            n["node"]
        );
        ensure!(
            artifacts(&n).contains(&(version.clone(), jar.sha256.clone())),
            "{} keeps {version} ({}): {n}",
            n["node"],
            jar.sha256
        );
        ids.push(
            running[0]["instance_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    Ok(ids)
}

/// The java processes of the service on node `k` (their command line names
/// the node's deployer folder, where the artifacts are stored).
fn java_processes(mesh: &Mesh, k: usize) -> Vec<(i32, String)> {
    let node = &mesh.nodes[k];
    let data = node.proxy_data_dir().with_file_name("deployer");
    processes_with(node, &data.display().to_string())
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(" -jar ") && cmdline.contains(SERVICE))
        .collect()
}

/// Checks that every node runs exactly one java process of the service
/// (no orphan, no duplicate), and that it is the one its deployer
/// supervises.
async fn one_process_each(mesh: &Mesh) -> Result<()> {
    for (k, node) in NODES.iter().enumerate() {
        let java = java_processes(mesh, k);
        ensure!(java.len() == 1, "{node}: one java process: {java:?}");
        let status = deployer_client(&mesh.nodes[k])
            .await?
            .status(authorized(StatusRequest {
                service: SERVICE.into(),
            }))
            .await?
            .into_inner();
        ensure!(
            status.instances.len() == 1
                && i32::try_from(status.instances[0].pid).ok() == Some(java[0].0),
            "{node}: the deployer supervises the one process running ({java:?}): {status:?}"
        );
    }
    Ok(())
}

/// Waits until every node's proxy answers `GET /hello/` from `version`.
async fn answers_from(mesh: &Mesh, version: &str) -> Result<()> {
    let want = format!("hello from {version}");
    for node in &mesh.nodes {
        let what = format!("{} answers /{SERVICE}/ from {version}", node.name);
        eventually(&what, CONVERGE, || async {
            let resp = node.get(&format!("/{SERVICE}/")).await?;
            ensure!(
                resp.status == 200 && resp.text() == want,
                "{} {}",
                resp.status,
                resp.text()
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Steady load through every node's proxy to the service, warmed up.
async fn loads(mesh: &Mesh) -> Result<Vec<Load>> {
    let opts = LoadOptions {
        workers: 2,
        interval: Duration::from_millis(10),
        ..LoadOptions::default()
    };
    let loads: Vec<Load> = mesh
        .nodes
        .iter()
        .map(|n| {
            Load::start(
                &n.ns,
                "127.0.0.1:8888".parse().expect("an address"),
                &format!("/{SERVICE}/"),
                opts.clone(),
            )
        })
        .collect();
    for load in &loads {
        load.wait_more(100, CONVERGE).await?;
    }
    Ok(loads)
}

/// Stops the loads; asserts that no request failed.
async fn no_failures(loads: Vec<Load>, what: &str) -> Vec<LoadReport> {
    let mut reports = Vec::new();
    for load in loads {
        reports.push(load.stop().await);
    }
    for (k, r) in reports.iter().enumerate() {
        assert!(
            r.failures().is_empty(),
            "{what}: requests through {}'s proxy failed: {}",
            NODES[k],
            r.summary()
        );
        assert!(r.total() > 0, "{what}: no requests through {}", NODES[k]);
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jars_roll_out_halt_on_a_bad_version_refuse_bad_uploads_and_survive_a_deployer_kill() {
    let (mut mesh, jars) = deploy_mesh().await.unwrap();

    // v1 to the three nodes, watched to the end.
    let watched = [HEALTH_TIMEOUT[0], HEALTH_TIMEOUT[1], "--watch"];
    let (code, out) = deploy(&mesh, &jars.v1, &watched).await.unwrap();
    assert_eq!(code, 0, "meshctl deploy v1 --watch: {out}");
    let d = latest(&mesh).await.unwrap();
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(d["version"], "v1", "{d}");
    assert_eq!(d["sha256"], jars.v1.sha256.as_str(), "{d}");
    for node in NODES {
        assert_eq!(node_of(&d, node)["state"], "done", "{}", states(&d));
    }
    all_run(&mesh, &jars.v1).await.unwrap();
    answers_from(&mesh, "v1").await.unwrap();

    // v2 under steady load: no request fails, every node runs v2 and
    // keeps v1.
    let load = loads(&mesh).await.unwrap();
    let (code, out) = deploy(&mesh, &jars.v2, &watched).await.unwrap();
    assert_eq!(code, 0, "meshctl deploy v2 --watch: {out}");
    answers_from(&mesh, "v2").await.unwrap();
    let reports = no_failures(load, "deploying v2").await;
    let d = latest(&mesh).await.unwrap();
    assert_eq!(
        (&d["state"], &d["version"]),
        (&"succeeded".into(), &"v2".into()),
        "{d}"
    );
    for node in NODES {
        let n = node_of(&d, node);
        assert_eq!(n["state"], "done", "{}", states(&d));
        assert_eq!(n["from_version"], "v1", "{}", states(&d));
    }
    let v2_ids = all_run(&mesh, &jars.v2).await.unwrap();
    for n in node_deployments(&mesh).await.unwrap() {
        assert!(
            artifacts(&n).contains(&("v1".into(), jars.v1.sha256.clone())),
            "{} keeps v1 to roll back to: {n}",
            n["node"]
        );
    }
    // Every node's callers reach the instances of all three nodes, on the
    // nodes' addresses.
    let addresses: Vec<String> = mesh.nodes.iter().map(|n| n.ip().to_string()).collect();
    for (k, r) in reports.iter().enumerate() {
        let answered = r.by_instance();
        assert!(
            answered.keys().any(|i| i.starts_with("v1@")),
            "{}'s load saw v1 first: {answered:?}",
            NODES[k]
        );
        for address in &addresses {
            assert!(
                answered
                    .keys()
                    .any(|i| i.starts_with(&format!("v2@{address}:"))),
                "{}'s load reached v2 at {address}: {answered:?}",
                NODES[k]
            );
        }
    }
    one_process_each(&mesh).await.unwrap();
    let listed = meshctl_json(&mesh, &["deploy", "list"]).await.unwrap();
    let listed = listed.as_array().cloned().unwrap_or_default();
    assert!(
        listed.len() >= 2 && listed[0]["version"] == "v2" && listed[1]["version"] == "v1",
        "deploy list, newest first: {listed:?}"
    );

    // A bad v3: node 1's health gate fails, node 1 keeps serving v2, the
    // deployment halts, nodes 2 and 3 are not touched.
    let load = loads(&mesh).await.unwrap();
    let (code, out) = deploy(&mesh, &jars.v3_bad, &["--health-timeout", "5s", "--watch"])
        .await
        .unwrap();
    assert_eq!(code, 1, "meshctl deploy v3-bad --watch exits 1: {out}");
    no_failures(load, "deploying the bad v3").await;
    let d = latest(&mesh).await.unwrap();
    assert_eq!(
        (&d["state"], &d["version"]),
        (&"halted".into(), &"v3-bad".into()),
        "{d}"
    );
    let n1 = node_of(&d, "n1");
    assert_eq!(
        n1["state"],
        "rolled-back",
        "n1 runs v2 again: {}",
        states(&d)
    );
    let detail = n1["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("health") && detail.contains("500"),
        "n1's detail says its health gate failed, and how: {}",
        states(&d)
    );
    assert!(
        d["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "a halted deployment says why: {d}"
    );
    for node in ["n2", "n3"] {
        assert_eq!(node_of(&d, node)["state"], "skipped", "{}", states(&d));
    }
    assert_eq!(
        all_run(&mesh, &jars.v2).await.unwrap(),
        v2_ids,
        "every node runs the same v2 instance as before"
    );
    for n in &node_deployments(&mesh).await.unwrap()[1..] {
        assert!(
            !artifacts(n).iter().any(|(v, _)| v == "v3-bad"),
            "{} was not touched: {n}",
            n["node"]
        );
    }
    one_process_each(&mesh).await.unwrap();
    answers_from(&mesh, "v2").await.unwrap();

    dashboard(&mesh).await.unwrap();

    bad_uploads(&mesh, &jars.v2).await.unwrap();

    // Node 1's deployer dies while its deploy waits for the new
    // instance's health, and is started again: the deployment carries on
    // and succeeds, with one process of the service on every node.
    let load = loads(&mesh).await.unwrap();
    let (code, out) = deploy(&mesh, &jars.v4_slow, &HEALTH_TIMEOUT).await.unwrap();
    assert_eq!(code, 0, "meshctl deploy v4-slow: {out}");
    let slow_dir = format!("/{}/", jars.v4_slow.variant.version);
    let mesh_ref = &mesh;
    eventually(
        "n1 deploys v4 and its instance has started",
        DEPLOYMENT,
        || async {
            let d = latest(mesh_ref).await?;
            ensure!(node_of(&d, "n1")["state"] == "deploying", "{}", states(&d));
            let java = java_processes(mesh_ref, 0);
            ensure!(
                java.iter().any(|(_, c)| c.contains(&slow_dir)),
                "no v4 process yet: {java:?}"
            );
            Ok(())
        },
    )
    .await
    .unwrap();
    let seen = Instant::now();
    kill_deployer(&mut mesh, 0).await.unwrap();
    assert!(
        seen.elapsed() < SLOW_START,
        "killed while v4's health gate waited (its /health answers 503 for {SLOW_START:?})"
    );
    restart_deployer(&mut mesh, 0).await.unwrap();
    let d = ended(&mesh).await.unwrap();
    assert_eq!(
        (&d["state"], &d["version"]),
        (&"succeeded".into(), &"v4-slow".into()),
        "{d}"
    );
    for node in NODES {
        assert_eq!(node_of(&d, node)["state"], "done", "{}", states(&d));
    }
    answers_from(&mesh, "v4-slow").await.unwrap();
    no_failures(load, "deploying v4 across a deployer kill").await;
    all_run(&mesh, &jars.v4_slow).await.unwrap();
    one_process_each(&mesh).await.unwrap();
    mesh.finish();
}

/// The dashboard's deployments page (headless Chromium on n1; screenshot
/// kept as an artifact) after the bad v3 halted: every node on v2, keeping
/// v1; the halted deployment with node 1 put back and the others skipped.
async fn dashboard(mesh: &Mesh) -> Result<()> {
    let artifacts = artifacts_dir("deploy")?;
    let mut browser = Browser::start(&mesh.nodes[0], mesh.dir()).await?;
    browser
        .open(&format!("http://127.0.0.1:{CONTROL_HTTP}/ui/#/deployments"))
        .await?;
    browser
        .see(
            "the deployments page",
            &[
                "Deployments (3)",
                "Running now",
                "Deployment 3: hello v3-bad",
                "halted",
                "Deployment 2: hello v2",
                "succeeded",
            ],
        )
        .await?;
    for node in NODES {
        // Table 0: what each node runs; table 1: the newest deployment's nodes.
        browser
            .see_cell("the version a node runs", 0, "Node", node, "Version", "v2")
            .await?;
        let want = if node == "n1" {
            "rolled-back"
        } else {
            "skipped"
        };
        browser
            .see_cell(
                "a node of the halted deployment",
                1,
                "Node",
                node,
                "State",
                want,
            )
            .await?;
    }
    let kept = browser.table(0).await?;
    ensure!(
        kept.iter().all(|r| r
            .get("Versions kept")
            .is_some_and(|v| v.contains("v1") && v.contains("v2"))),
        "every node keeps v1 and v2: {kept:?}"
    );
    browser
        .screenshot(&artifacts.join("deployments.png"))
        .await?;
    browser.close().await
}

/// Uploads a node's deployer and mesh-control refuse, each with a clear
/// error and nothing stored: a wrong checksum, a stream cut short, an
/// artifact over the size limit.
async fn bad_uploads(mesh: &Mesh, good: &Jar) -> Result<()> {
    let data = &good.bytes;
    let wrong_sha = java::sha256_hex(b"other bytes");
    let service = "upload-check";

    // To n2's deployer directly.
    let mut deployer = deployer_client(&mesh.nodes[1]).await?;
    let start = |size: u64, sha256: &str| UploadStart {
        service: service.into(),
        version: "1.0.0".into(),
        file_name: "app.jar".into(),
        size,
        sha256: sha256.into(),
        offset: 0,
    };
    let upload = |start: UploadStart, bytes: &[u8]| {
        let mut chunks = vec![UploadChunk {
            start: Some(start),
            data: Vec::new(),
        }];
        chunks.extend(bytes.chunks(1024).map(|c| UploadChunk {
            start: None,
            data: c.to_vec(),
        }));
        authorized(futures::stream::iter(chunks))
    };
    let size = data.len() as u64;
    let cases = [
        (
            "a wrong checksum",
            upload(start(size, &wrong_sha), data),
            Code::FailedPrecondition,
            vec![good.sha256.clone(), wrong_sha.clone()],
        ),
        (
            "a stream cut short",
            upload(start(size, &good.sha256), &data[..data.len() / 2]),
            Code::FailedPrecondition,
            vec![],
        ),
        (
            "an artifact over the size limit",
            upload(start(MAX_ARTIFACT + 1, &good.sha256), &[]),
            Code::ResourceExhausted,
            vec![MAX_ARTIFACT.to_string()],
        ),
    ];
    for (what, request, code, mentions) in cases {
        let e = match deployer.upload(request).await {
            Ok(stored) => bail!("the deployer stored {what}: {stored:?}"),
            Err(e) => e,
        };
        ensure!(e.code() == code, "{what}: {code:?} expected, got {e:?}");
        for m in mentions {
            ensure!(
                e.message().contains(&m),
                "{what}: the error names {m}: {e:?}"
            );
        }
        let stored = deployer
            .list_artifacts(authorized(ListArtifactsRequest {
                service: service.into(),
            }))
            .await?
            .into_inner();
        ensure!(
            stored.artifacts.is_empty(),
            "{what}: nothing stored, yet {stored:?}"
        );
    }

    // To mesh-control's Deploy.
    let mut control = control_client(&mesh.nodes[0]).await?;
    let deploy_start = |size: u64, sha256: &str| DeployStart {
        service: service.into(),
        version: "1.0.0".into(),
        file_name: "app.jar".into(),
        size,
        sha256: sha256.into(),
        nodes: NODES.iter().map(|n| (*n).to_owned()).collect(),
        strategy: "rolling".into(),
        command: "java -jar {artifact} --server.port={port}".into(),
        author: "e2e".into(),
        ..DeployStart::default()
    };
    let deploy = |start: DeployStart, bytes: &[u8]| {
        let mut chunks = vec![DeployChunk {
            start: Some(start),
            data: Vec::new(),
        }];
        chunks.extend(bytes.chunks(1024).map(|c| DeployChunk {
            start: None,
            data: c.to_vec(),
        }));
        futures::stream::iter(chunks)
    };
    let cases = [
        (
            "a wrong checksum",
            deploy(deploy_start(size, &wrong_sha), data),
            Code::FailedPrecondition,
            vec![good.sha256.clone(), wrong_sha.clone()],
        ),
        (
            "a stream cut short",
            deploy(deploy_start(size, &good.sha256), &data[..data.len() / 2]),
            Code::FailedPrecondition,
            vec![],
        ),
        (
            "an artifact over the size limit",
            deploy(deploy_start(512 << 20, &good.sha256), &[]),
            Code::InvalidArgument,
            vec!["size".into(), "largest artifact".into()],
        ),
    ];
    for (what, request, code, mentions) in cases {
        let e = match control.deploy(request).await {
            Ok(d) => bail!("mesh-control started a deployment of {what}: {d:?}"),
            Err(e) => e,
        };
        ensure!(e.code() == code, "{what}: {code:?} expected, got {e:?}");
        for m in mentions {
            ensure!(
                e.message().contains(&m),
                "{what}: the error names {m}: {e:?}"
            );
        }
    }
    let kept = mesh
        .consul_get(&format!("/v1/kv/mesh/artifacts/{service}?recurse&keys"))
        .await?;
    ensure!(
        kept.status == 404,
        "mesh-control kept nothing of {service} in Consul KV: {} {}",
        kept.status,
        kept.text()
    );
    let listed = meshctl_json(mesh, &["deploy", "list"]).await?;
    ensure!(
        !listed
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["service"] == service),
        "no deployment of {service}: {listed}"
    );
    for n in meshctl_json(mesh, &["deploy", "nodes", "--service", service])
        .await?
        .as_array()
        .into_iter()
        .flatten()
    {
        ensure!(
            !n["artifacts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["service"] == service),
            "{} stored nothing of {service}: {n}",
            n["node"]
        );
    }
    Ok(())
}
