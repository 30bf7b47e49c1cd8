//! mesh-control replicas against a real Consul dev agent: one leader, a
//! clean hand-over, a killed leader replaced within 10 s while a live one
//! keeps the lock, check-and-set writes that never overwrite each other,
//! bad input refused by name with nothing stored, the REST mirror, the
//! metrics, and `meshctl` talking to a replica.

mod support;

use std::{
    fs::File,
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use consul_client::{
    AgentServiceRegistration, Client, ClientConfig, QueryOptions,
    testing::{DevAgent, free_port, free_ports},
};
use mesh_control_plane::{
    app::ControlPlane,
    leader::{CHECK_TTL, SERVICE_NAME},
};
use mesh_proto::v1::{self as pb, control_client::ControlClient};
use mesh_runtime::metrics::Registry;
use serde_json::{Value, json};
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

/// How soon another replica must lead once the leader is killed (the
/// control-plane issue's promise).
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(10);

/// Polls `attempt` until it succeeds or the deadline passes.
async fn eventually<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    eventually_within(what, DEADLINE, attempt).await
}

/// Polls `attempt` until it succeeds or `deadline` passes.
async fn eventually_within<T, F, Fut>(what: &str, deadline: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > deadline => {
                return Err(e.context(format!("{what}: not true after {deadline:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A replica on free ports, and clients for it.
struct Replica {
    plane: Option<ControlPlane>,
    grpc: ControlClient<Channel>,
    http: String,
    registry: Registry,
}

impl Replica {
    async fn start(agent: &DevAgent, name: &str, extra: &[&str]) -> Self {
        let registry = Registry::new();
        let plane = support::replica(agent, name, extra, registry.clone())
            .await
            .expect("a replica starts on free ports");
        let grpc = ControlClient::connect(format!("http://{}", plane.grpc_addr()))
            .await
            .expect("the replica's gRPC listener is bound");
        Self {
            http: format!("http://{}", plane.http_addr()),
            plane: Some(plane),
            grpc,
            registry,
        }
    }

    fn grpc_url(&self) -> String {
        let plane = self.plane.as_ref().expect("the replica runs");
        format!("http://{}", plane.grpc_addr())
    }

    async fn status(&self) -> Result<pb::ControlStatus> {
        Ok(self
            .grpc
            .clone()
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner())
    }

    async fn stop(&mut self) {
        if let Some(plane) = self.plane.take() {
            assert!(
                plane.shutdown(Duration::from_secs(10)).await,
                "drained in time"
            );
        }
    }
}

fn consul(agent: &DevAgent) -> Client {
    Client::new(&ClientConfig::new([agent.addr()])).expect("a dev agent address is valid")
}

/// The dev agent's node name, with services `orders` and `users` on it.
async fn node_with_services(agent: &DevAgent) -> Result<String> {
    let c = consul(agent);
    for (name, port, version) in [
        ("orders", 9001, "v1"),
        ("orders", 9002, "v2"),
        ("users", 9003, "v1"),
    ] {
        c.agent_service_register(&AgentServiceRegistration {
            id: Some(format!("{name}-{port}")),
            name: name.into(),
            address: Some("127.0.0.1".into()),
            port: Some(port),
            meta: [("version".to_owned(), version.to_owned())].into(),
            ..Default::default()
        })
        .await?;
    }
    let nodes = c.catalog_nodes(QueryOptions::default()).await?.value;
    Ok(nodes.first().context("the agent's node")?.node.clone())
}

fn route(service: &str, timeout: &str) -> pb::Route {
    pb::Route {
        service: service.into(),
        timeout: timeout.into(),
        ..Default::default()
    }
}

fn set(node: &str, routes: Vec<pb::Route>, expected: u64, author: &str) -> pb::SetRoutesRequest {
    pb::SetRoutesRequest {
        node: node.into(),
        routes,
        expected_revision: expected,
        author: author.into(),
    }
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_hand_over_on_shutdown() -> Result<()> {
    let agent = DevAgent::start().await;
    let a = Replica::start(&agent, "c1", &[]).await;
    let b = Replica::start(&agent, "c2", &[]).await;
    let leader = eventually("both replicas know one leader", || async {
        let (sa, sb) = (a.status().await?, b.status().await?);
        if sa.leader.is_empty() || sa.leader != sb.leader {
            bail!("c1 sees {:?}, c2 sees {:?}", sa.leader, sb.leader);
        }
        if sa.is_leader == sb.is_leader {
            bail!("is_leader: c1 {} c2 {}", sa.is_leader, sb.is_leader);
        }
        Ok(sa)
    })
    .await?;
    let (mut leading, mut other, other_name) = if leader.leader == "c1" {
        (a, b, "c2")
    } else {
        (b, a, "c1")
    };
    assert_eq!(leader.leader_grpc, leading.grpc_url());
    assert!(!leader.leader_since.is_empty());
    // /ready names the leader; /metrics says who leads.
    let ready = reqwest::get(format!("{}/ready", other.http)).await?;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.headers()["x-mesh-leader"].to_str()?,
        leader.leader.as_str()
    );
    let text = ready.text().await?;
    assert_eq!(text, format!("ready\nleader: {}\n", leader.leader));
    let metrics = reqwest::get(format!("{}/metrics", leading.http))
        .await?
        .text()
        .await?;
    assert!(metrics.contains("mesh_control_is_leader 1"), "{metrics}");
    assert!(
        reqwest::get(format!("{}/live", other.http))
            .await?
            .status()
            .is_success()
    );

    // The leader stops: it releases the lock and the other takes it.
    leading.stop().await;
    eventually("the other replica leads", || async {
        let s = other.status().await?;
        if !(s.is_leader && s.leader == other_name) {
            bail!("{s:?}");
        }
        Ok(())
    })
    .await?;
    assert!(other.registry.render().contains("mesh_control_is_leader 1"));
    other.stop().await;
    let lock = consul(&agent)
        .kv_get("mesh/leader", QueryOptions::default())
        .await?
        .value;
    assert!(
        lock.is_none_or(|l| l.session.is_none()),
        "released on shutdown"
    );
    let left: Vec<String> = consul(&agent)
        .agent_services()
        .await?
        .into_values()
        .filter(|s| s.service == SERVICE_NAME)
        .map(|s| s.id)
        .collect();
    assert!(left.is_empty(), "still registered after shutdown: {left:?}");
    Ok(())
}

/// A mesh-control process (the binary, as operators run it), killed on
/// drop.
struct ControlProcess {
    name: String,
    child: Child,
    http: String,
    log: PathBuf,
}

impl ControlProcess {
    fn spawn(agent: &DevAgent, name: &str, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let [http, grpc, bridge] = free_ports();
        let http = format!("127.0.0.1:{http}");
        let child = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
            .args(["--replica", name, "--consul-addr", &agent.addr()])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http-listen", &http])
            .args(["--bridge-port", &bridge.to_string()])
            .env_remove("MESH_CONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("mesh-control starts")?;
        Ok(Self {
            name: name.into(),
            child,
            http: format!("http://{http}"),
            log,
        })
    }

    /// `/ready`'s leader line: `leader: c1 (this replica)`.
    async fn leader_line(&self) -> Result<String> {
        let resp = reqwest::get(format!("{}/ready", self.http)).await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{}: /ready {status}: {text}", self.name);
        }
        Ok(text.lines().nth(1).unwrap_or_default().to_owned())
    }

    fn leads(line: &str, name: &str) -> bool {
        line == format!("leader: {name} (this replica)")
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("{signal} to {}", self.name))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The IDs of the passing `mesh-control` instances, sorted.
async fn passing_replicas(c: &Client) -> Result<Vec<String>> {
    let entries = c
        .health_service(SERVICE_NAME, true, QueryOptions::default())
        .await?
        .value;
    let mut ids: Vec<String> = entries.into_iter().map(|e| e.service.id).collect();
    ids.sort();
    Ok(ids)
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_10s_and_a_live_busy_one_keeps_the_lock() -> Result<()> {
    use nix::sys::signal::Signal;

    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let c = consul(&agent);
    node_with_services(&agent).await?;
    let dir = tempfile::tempdir()?;
    let mut replicas = [
        ControlProcess::spawn(&agent, "c1", dir.path())?,
        ControlProcess::spawn(&agent, "c2", dir.path())?,
    ];
    let leader = eventually("the two processes agree on one leader", || async {
        let lines = [
            replicas[0].leader_line().await?,
            replicas[1].leader_line().await?,
        ];
        match (0..2).find(|&i| ControlProcess::leads(&lines[i], &replicas[i].name)) {
            Some(i) if lines[1 - i] == format!("leader: {}", replicas[i].name) => Ok(i),
            _ => bail!("{lines:?}"),
        }
    })
    .await
    .with_context(|| {
        format!(
            "c1's log:\n{}\nc2's log:\n{}",
            replicas[0].log_tail(),
            replicas[1].log_tail()
        )
    })?;
    let other = 1 - leader;
    eventually("both replicas are passing instances", || async {
        let ids = passing_replicas(&c).await?;
        if ids != ["mesh-control-c1", "mesh-control-c2"] {
            bail!("{ids:?}");
        }
        Ok(())
    })
    .await?;

    // Alive but busy: the leader stopped for a second misses a pass and
    // keeps the lock, unchanged, across three check TTLs and more.
    let held = c
        .kv_get("mesh/leader", QueryOptions::default())
        .await?
        .value
        .context("the lock")?;
    let session = held.session.clone().context("the lock's session")?;
    replicas[leader].signal(Signal::SIGSTOP)?;
    // How long the process is frozen, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;
    replicas[leader].signal(Signal::SIGCONT)?;
    let watch = Instant::now();
    let mut index = held.modify_index;
    while watch.elapsed() < CHECK_TTL * 3 + Duration::from_secs(1) {
        let read = c
            .kv_get(
                "mesh/leader",
                QueryOptions::blocking(index, Duration::from_secs(1)),
            )
            .await?;
        let now = read.value.context("the lock")?;
        assert_eq!(
            (now.session.as_deref(), now.lock_index),
            (Some(session.as_str()), held.lock_index),
            "the live leader lost the lock after {:?}:\n{}",
            watch.elapsed(),
            replicas[leader].log_tail()
        );
        index = read.index;
    }
    assert!(
        ControlProcess::leads(
            &replicas[leader].leader_line().await?,
            &replicas[leader].name
        ),
        "the live leader still says it leads"
    );

    // Killed: the other replica leads within the deadline.
    replicas[leader].child.kill()?;
    let killed = Instant::now();
    let survivor = &replicas[other];
    eventually_within("the other replica leads", TAKEOVER_DEADLINE, || async {
        let line = survivor.leader_line().await?;
        if !ControlProcess::leads(&line, &survivor.name) {
            bail!("{}: {line}", survivor.name);
        }
        Ok(())
    })
    .await
    .with_context(|| format!("{}'s log:\n{}", survivor.name, survivor.log_tail()))?;
    println!(
        "takeover after SIGKILL of the leader: {:?}",
        killed.elapsed()
    );
    // The dead replica's critical check is its instance's alone: the
    // node's other services stay passing.
    assert_eq!(
        passing_replicas(&c).await?,
        [format!("mesh-control-{}", survivor.name)]
    );
    let orders = c
        .health_service("orders", true, QueryOptions::default())
        .await?
        .value;
    assert_eq!(orders.len(), 2, "{orders:?}");

    // SIGTERM: the survivor releases the lock and deregisters itself.
    survivor.signal(Signal::SIGTERM)?;
    let survivor = &mut replicas[other];
    let status = eventually("the survivor exits on SIGTERM", || {
        let exited = survivor.child.try_wait();
        async move { exited?.context("still running") }
    })
    .await?;
    assert!(status.success(), "{status}");
    let lock = c
        .kv_get("mesh/leader", QueryOptions::default())
        .await?
        .value;
    assert!(lock.is_none_or(|l| l.session.is_none()), "released on exit");
    let services = c.agent_services().await?;
    assert!(
        !services.contains_key(&format!("mesh-control-{}", survivor.name)),
        "{services:?}"
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_changes_on_one_revision_one_wins_the_other_conflicts_and_nothing_is_lost()
-> Result<()> {
    let agent = DevAgent::start().await;
    let node = node_with_services(&agent).await?;
    let a = Replica::start(&agent, "c1", &[]).await;
    let b = Replica::start(&agent, "c2", &[]).await;
    let mut expected = 0;
    let mut next_version = 1;
    for round in 0..5 {
        let (mut ga, mut gb) = (a.grpc.clone(), b.grpc.clone());
        let ra = set(
            &node,
            vec![route("orders", &format!("{}s", round + 1))],
            expected,
            "alice",
        );
        let rb = set(
            &node,
            vec![route("users", &format!("{}s", round + 1))],
            expected,
            "bob",
        );
        let (oa, ob) = tokio::join!(ga.set_routes(ra), gb.set_routes(rb));
        let (won, lost, loser, loser_client, loser_routes) = match (oa, ob) {
            (Ok(w), Err(l)) => (
                w.into_inner(),
                l,
                "bob",
                b.grpc.clone(),
                route("users", "9s"),
            ),
            (Err(l), Ok(w)) => (
                w.into_inner(),
                l,
                "alice",
                a.grpc.clone(),
                route("orders", "9s"),
            ),
            (oa, ob) => bail!("round {round}: not one winner: {oa:?} / {ob:?}"),
        };
        assert_eq!(lost.code(), tonic::Code::Aborted, "{lost:?}");
        let message = lost.message();
        assert!(
            message.contains(&format!("mesh/nodes/{node}/routes"))
                && message.contains(&format!("based on revision {expected}")),
            "{message}"
        );
        let version = won.version.context("version")?;
        assert_eq!(version.number, next_version);
        // The loser reads again and retries on the new revision: it lands.
        let current = loser_client
            .clone()
            .get_routes(pb::GetRoutesRequest { node: node.clone() })
            .await?
            .into_inner();
        assert_eq!(current.revision, won.revision);
        let retried = loser_client
            .clone()
            .set_routes(set(&node, vec![loser_routes], current.revision, loser))
            .await?
            .into_inner();
        assert_eq!(retried.version.context("version")?.number, next_version + 1);
        expected = retried.revision;
        next_version += 2;
    }
    // Every version is there, in order, each with its author and a diff.
    let versions = a
        .grpc
        .clone()
        .list_versions(pb::ListVersionsRequest { node: node.clone() })
        .await?
        .into_inner()
        .versions;
    let numbers: Vec<u64> = versions.iter().map(|v| v.number).collect();
    assert_eq!(numbers, (1..=10).rev().collect::<Vec<u64>>());
    let authors: std::collections::BTreeSet<&str> =
        versions.iter().map(|v| v.author.as_str()).collect();
    assert_eq!(authors, ["alice", "bob"].into());
    let v2 = b
        .grpc
        .clone()
        .get_version(pb::GetVersionRequest {
            node: node.clone(),
            number: 2,
        })
        .await?
        .into_inner();
    assert!(
        v2.diff.contains("--- ") && v2.diff.contains("+++ "),
        "{}",
        v2.diff
    );
    assert!(v2.rendered.contains("config version 2."), "{}", v2.rendered);
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_nothing_is_stored() -> Result<()> {
    let agent = DevAgent::start().await;
    let node = node_with_services(&agent).await?;
    let replica = Replica::start(&agent, "c1", &[]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/nodes/{node}/routes", replica.http);
    let cases: Vec<(&str, String, Value, u16, &str)> = vec![
        (
            "unknown node",
            format!("{}/v1/nodes/ghost/routes", replica.http),
            json!({"routes": {"orders": {}}, "expected_revision": 0, "author": "t"}),
            404,
            "node \"ghost\" is not in Consul's catalog",
        ),
        (
            "unknown service",
            url.clone(),
            json!({"routes": {"payments": {}}, "expected_revision": 0, "author": "t"}),
            400,
            "routes.payments: service \"payments\" is not in Consul's catalog",
        ),
        (
            "negative timeout",
            url.clone(),
            json!({"routes": {"orders": {"timeout": "-2s"}}, "expected_revision": 0, "author": "t"}),
            400,
            "routes.orders.timeout: \"-2s\" is negative",
        ),
        (
            "weights that do not add up",
            url.clone(),
            json!({"routes": {"orders": {"weights": {"v1": 50, "v2": 40}}}, "expected_revision": 0, "author": "t"}),
            400,
            "routes.orders.weights: the weights add up to 90, not 100",
        ),
        (
            "unknown lb",
            url.clone(),
            json!({"routes": {"orders": {"lb": "fastest"}}, "expected_revision": 0, "author": "t"}),
            400,
            "routes.orders.lb: unknown load-balancing algorithm \"fastest\"",
        ),
        (
            "too many retries",
            url.clone(),
            json!({"routes": {"orders": {"retries": 50}}, "expected_revision": 0, "author": "t"}),
            400,
            "routes.orders.retries: 50 is more than the most allowed, 10",
        ),
        (
            "unknown key",
            url.clone(),
            json!({"routes": {"orders": {"timout": "1s"}}, "expected_revision": 0, "author": "t"}),
            400,
            "timout",
        ),
        (
            "no author",
            url.clone(),
            json!({"routes": {"orders": {}}, "expected_revision": 0, "author": ""}),
            400,
            "author: ",
        ),
    ];
    for (what, url, body, status, words) in cases {
        let resp = http.put(&url).json(&body).send().await?;
        let code = resp.status().as_u16();
        let answer: Value = resp.json().await?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            code == status && error.contains(words),
            "{what}: {code} {answer} (expected {status} with {words:?})"
        );
    }
    let resp = http
        .put(&url)
        .body("{\"routes\": ")
        .header("content-type", "application/json")
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await?;
    assert_eq!(answer["kind"], "invalid", "{answer}");
    assert_eq!(answer["fields"][0]["field"], "body", "{answer}");

    // The same through gRPC.
    let e = replica
        .grpc
        .clone()
        .set_routes(set(&node, vec![route("orders", "0s")], 0, "t"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("routes.orders.timeout: \"0s\" is zero"),
        "{}",
        e.message()
    );
    let e = replica
        .grpc
        .clone()
        .set_routes(set(
            &node,
            vec![route("orders", "1s"), route("orders", "2s")],
            0,
            "t",
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("given twice"), "{}", e.message());

    // Nothing was stored: no routes, no version, no key but the lock.
    let routes: Value = http.get(&url).send().await?.json().await?;
    assert_eq!(routes["revision"], 0, "{routes}");
    let versions: Value = http
        .get(format!("{}/v1/nodes/{node}/versions", replica.http))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(versions, json!([]));
    let keys: Vec<String> = consul(&agent)
        .kv_list("mesh/", QueryOptions::default())
        .await?
        .value
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert!(keys.iter().all(|k| k == "mesh/leader"), "{keys:?}");
    let metrics = replica.registry.render();
    assert!(
        metrics.contains(r#"mesh_control_calls_total{method="SetRoutes",outcome="invalid"} 10"#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn the_rest_mirror_answers_like_grpc_and_renders_both_formats() -> Result<()> {
    let agent = DevAgent::start().await;
    let node = node_with_services(&agent).await?;
    let replica = Replica::start(&agent, "c1", &["--nginx-upstreams", "static"]).await;
    let http = reqwest::Client::new();
    let base = &replica.http;
    let put = http
        .put(format!("{base}/v1/nodes/{node}/routes"))
        .json(&json!({
            "routes": {"orders": {"timeout": "2s", "retries": 1, "lb": "least-request",
                                  "weights": {"v1": 80, "v2": 20}}},
            "expected_revision": 0, "author": "rest"}))
        .send()
        .await?;
    assert_eq!(put.status(), 200);
    let stored: Value = put.json().await?;
    assert_eq!(stored["version"]["number"], 1, "{stored}");
    let revision = stored["revision"].as_u64().context("revision")?;

    // The same revision again is a 409 naming the key and revision.
    let again = http
        .put(format!("{base}/v1/nodes/{node}/routes"))
        .json(&json!({"routes": {}, "expected_revision": 0, "author": "late"}))
        .send()
        .await?;
    assert_eq!(again.status(), 409);
    let conflict: Value = again.json().await?;
    assert_eq!(conflict["key"], format!("mesh/nodes/{node}/routes"));
    assert_eq!(conflict["expected_revision"], 0);
    assert_eq!(conflict["revision"], revision);

    let grpc = replica
        .grpc
        .clone()
        .get_routes(pb::GetRoutesRequest { node: node.clone() })
        .await?
        .into_inner();
    let rest: Value = http
        .get(format!("{base}/v1/nodes/{node}/routes"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(rest["revision"], grpc.revision);
    assert_eq!(rest["routes"]["orders"]["lb"], "least-request");
    assert_eq!(grpc.routes[0].lb, "least-request");

    let proxy: Value = http
        .get(format!("{base}/v1/nodes/{node}/render?format=proxy"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(proxy["text"], stored["version"]["rendered"]);
    let nginx: Value = http
        .get(format!("{base}/v1/nodes/{node}/render?format=nginx"))
        .send()
        .await?
        .json()
        .await?;
    let text = nginx["text"].as_str().context("text")?;
    assert!(text.contains("server 127.0.0.1:9001 weight=8000"), "{text}");
    assert!(text.contains("server 127.0.0.1:9002 weight=2000"), "{text}");
    let upsync: Value = http
        .get(format!(
            "{base}/v1/nodes/{node}/render?format=nginx&upstreams=upsync"
        ))
        .send()
        .await?
        .json()
        .await?;
    assert!(
        upsync["text"]
            .as_str()
            .unwrap_or_default()
            .contains("upsync 127.0.0.1:8500/v1/health/service/orders "),
        "{upsync}"
    );
    let bad = http
        .get(format!("{base}/v1/nodes/{node}/render?format=yaml"))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);

    let nodes: Value = http
        .get(format!("{base}/v1/nodes"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(nodes[0]["name"], node.as_str());
    assert_eq!(nodes[0]["routes_version"], 1);
    assert_eq!(nodes[0]["proxy"]["state"], "unknown");
    let services: Value = http
        .get(format!("{base}/v1/services"))
        .send()
        .await?
        .json()
        .await?;
    let orders = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "orders"))
        .context("orders")?;
    assert_eq!(
        orders["instances"].as_array().map(Vec::len),
        Some(2),
        "{orders}"
    );
    assert_eq!(orders["instances"][0]["health"], "passing", "{orders}");

    // A node whose bridge does not answer: a 503 naming its address.
    let reg = http
        .put(format!("{base}/v1/nodes/{node}/register"))
        .json(&json!({"name": "web", "port": 8080}))
        .send()
        .await?;
    assert_eq!(reg.status(), 503);
    let answer: Value = reg.json().await?;
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("node {node}'s bridge at http://127.0.0.1:"))
            && error.contains("unreachable"),
        "{answer}"
    );
    let reg = http
        .put(format!("{base}/v1/nodes/ghost/register"))
        .json(&json!({"name": "web", "port": 8080}))
        .send()
        .await?;
    assert_eq!(reg.status(), 404);
    let reg = http
        .put(format!("{base}/v1/nodes/{node}/register"))
        .json(&json!({"name": "web", "port": 0}))
        .send()
        .await?;
    assert_eq!(reg.status(), 400);
    // The components that register themselves: no workload takes their
    // name (and with it their identity), before any bridge is asked.
    for name in ["mesh-monitor", "Mesh-Control"] {
        let reg = http
            .put(format!("{base}/v1/nodes/{node}/register"))
            .json(&json!({"name": name, "port": 8080}))
            .send()
            .await?;
        assert_eq!(reg.status(), 400, "{name}");
        let answer: Value = reg.json().await?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("service.name")
                && error.contains("reserved for the mesh's own component"),
            "{answer}"
        );
    }
    Ok(())
}

/// Runs meshctl (without blocking the runtime the replica serves on).
async fn meshctl(grpc: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env("MESH_CONTROL_ADDR", grpc)
        .env_remove("MESH_OUTPUT")
        .env_remove("MESH_AUTHOR")
        .output()
        .await
        .expect("meshctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn meshctl_sets_shows_and_renders_routes_and_says_what_went_wrong() -> Result<()> {
    let agent = DevAgent::start().await;
    let node = node_with_services(&agent).await?;
    let replica = Replica::start(&agent, "c1", &[]).await;
    let grpc = replica.grpc_url();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, "[routes.orders]\ntimeout = \"2s\"\nretries = 1\n")?;
    let file = file.to_str().context("path")?;

    let (code, out, err) = meshctl(
        &grpc,
        &["routes", "set", &node, "-f", file, "--author", "ops"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "node {node}: stored config version 1 by ops (revision "
        )),
        "{out}"
    );
    assert!(out.contains("+timeout = \"2s\""), "{out}");

    let (code, out, _) = meshctl(&grpc, &["routes", "get", &node]).await;
    assert_eq!(code, 0);
    assert!(out.contains("orders   2s"), "{out}");
    let (code, out, _) = meshctl(&grpc, &["routes", "get", &node, "--output", "json"]).await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out)?;
    let revision = json["revision"].as_u64().context("revision")?;

    // A stale revision: exit 75 and the conflict named on one line.
    let (code, _, err) = meshctl(
        &grpc,
        &[
            "routes",
            "set",
            &node,
            "-f",
            file,
            "--expect-revision",
            &(revision - 1).to_string(),
        ],
    )
    .await;
    assert_eq!(code, 75, "{err}");
    assert!(
        err.starts_with("error: conflict on mesh/nodes/") && err.lines().count() == 1,
        "{err}"
    );

    // The rendered proxy config is what mesh-proxy accepts.
    let (code, out, err) = meshctl(&grpc, &["render", "--node", &node, "--format", "proxy"]).await;
    assert_eq!(code, 0, "{err}");
    let rendered = dir.path().join("proxy.toml");
    std::fs::write(&rendered, &out)?;
    assert_proxy_accepts(&rendered)?;
    let (code, out, _) = meshctl(
        &grpc,
        &["render", "--node", &node, "--format", "nginx", "--diff"],
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, ""),
        "one version: nothing to diff"
    );

    // Bad input: a malformed file never reaches mesh-control; an unknown
    // service is named by it.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[routes.orders]\ntimeout = 2s\n",
    )?;
    let bad = dir.path().join("bad.toml");
    let (code, _, err) = meshctl(
        "http://127.0.0.1:1",
        &["routes", "set", &node, "-f", bad.to_str().context("path")?],
    )
    .await;
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("line 2") && err.contains("bad.toml"), "{err}");
    std::fs::write(dir.path().join("ghost.toml"), "[routes.ghost]\n")?;
    let ghost = dir.path().join("ghost.toml");
    let (code, _, err) = meshctl(
        &grpc,
        &[
            "routes",
            "set",
            &node,
            "-f",
            ghost.to_str().context("path")?,
        ],
    )
    .await;
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("routes.ghost: service \"ghost\" is not in Consul's catalog"),
        "{err}"
    );

    let (code, out, _) = meshctl(&grpc, &["nodes"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("NODE ") && out.contains(&node) && out.contains("unknown"),
        "{out}"
    );
    let (code, out, _) = meshctl(&grpc, &["services", "--output", "json"]).await;
    assert_eq!(code, 0);
    assert!(
        serde_json::from_str::<Value>(&out)?
            .as_array()
            .is_some_and(|s| s.len() >= 3),
        "{out}"
    );
    let (code, out, _) = meshctl(&grpc, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("replica  c1"), "{out}");

    // mesh-control away: one line naming the address, exit 69.
    let down = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = meshctl(&down, &["nodes"]).await;
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains(&format!("cannot reach mesh-control at {down}")) && err.lines().count() == 1,
        "{err}"
    );
    Ok(())
}

/// mesh-proxy's own validation of a config file: the library's, as the
/// binary runs it before it binds a port.
fn assert_proxy_accepts(path: &Path) -> Result<()> {
    let args = <mesh_proxy::config::Args as clap::Parser>::try_parse_from([
        "mesh-proxy",
        "--config",
        path.to_str().context("path")?,
    ])?;
    let merged = mesh_runtime::config::merge(args)?;
    merged
        .validate()
        .map_err(|e| anyhow::anyhow!("mesh-proxy refuses the rendered file: {e}"))?;
    Ok(())
}

#[test]
fn a_bad_config_stops_mesh_control_with_one_line_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("control.toml");
    std::fs::write(
        &file,
        "grpc_listen = \"127.0.0.1:0\"\nleader_tl = \"10s\"\n",
    )
    .unwrap();
    for (args, words) in [
        (vec!["--leader-ttl", "1s"], "leader_ttl"),
        (vec!["--config", file.to_str().unwrap()], "leader_tl"),
        (vec!["--nginx-upstreams", "maybe"], "upsync or static"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains(words) && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}
