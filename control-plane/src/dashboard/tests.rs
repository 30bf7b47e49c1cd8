use std::{net::SocketAddr, time::Duration};

use mesh_runtime::shutdown::{self, Trigger};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

use super::{
    state::{MAX_DEPLOYMENTS, MAX_ROLLOUTS, MAX_VERSIONS, Reading, assemble},
    *,
};
use crate::{
    control::{
        AlertView, CheckInfo, DeployedInstance, DeploymentNodeView, DeploymentView, InstanceInfo,
        IntentionsView, MonitorAlerts, NodeDeploymentsView, NodeInfo, NodeRoutes, RolloutEventView,
        RolloutNodeView, RolloutView, ServiceInfo, Status, StoredArtifact, VersionSummary,
    },
    error::ControlError,
    model::RouteSpec,
};

/// Markup an operator or a service may put in a tag, a meta value or a
/// route: it must reach the page as text.
const MARKUP: &str = "<img src=x onerror=alert(1)>\"</script>";

fn node(name: &str, routes_version: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        address: format!("10.0.0.{}", name.len()),
        datacenter: "dc1".into(),
        routes_version,
        ..NodeInfo::default()
    }
}

fn instance(id: &str, node: &str, agent: &str) -> InstanceInfo {
    InstanceInfo {
        id: id.into(),
        node: node.into(),
        address: "10.0.0.9".into(),
        port: 9100,
        tags: vec![MARKUP.into()],
        health: "passing".into(),
        checks: vec![
            CheckInfo {
                id: "serfHealth".into(),
                status: agent.into(),
                output: "Agent alive and reachable".into(),
            },
            CheckInfo {
                id: format!("service:{id}"),
                status: "passing".into(),
                output: String::new(),
            },
        ],
        ..InstanceInfo::default()
    }
}

fn versions(n: u64) -> Vec<VersionSummary> {
    (1..=n)
        .map(|number| VersionSummary {
            number,
            author: "alice".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            routes: 1,
            current: number == n,
        })
        .collect()
}

fn reading(node_names: &[&str]) -> Reading {
    let routes = NodeRoutes {
        node: "n1".into(),
        revision: 57,
        version: 2,
        routes: [(
            "web".to_owned(),
            RouteSpec {
                timeout: Some("2s".into()),
                ..RouteSpec::default()
            },
        )]
        .into(),
    };
    Reading {
        status: Status {
            replica: "c1".into(),
            is_leader: true,
            leader: "c1".into(),
            ..Status::default()
        },
        nodes: node_names
            .iter()
            .rev()
            .map(|n| node(n, u64::from(*n == "n1") * 2))
            .collect(),
        services: vec![
            ServiceInfo {
                name: "web".into(),
                tags: vec![MARKUP.into()],
                instances: vec![instance("web-1", "n1", "passing")],
            },
            ServiceInfo {
                name: "api".into(),
                tags: Vec::new(),
                instances: vec![
                    instance("api-1", "n1", "passing"),
                    instance("api-2", "n2", "critical"),
                ],
            },
        ],
        routes: [("n1".to_owned(), (routes, versions(2)))].into(),
        rollouts: Vec::new(),
        deployments: Vec::new(),
        deployers: Vec::new(),
        alerts: MonitorAlerts::unconfigured(),
        intentions: IntentionsView::default(),
    }
}

/// Deployment `id` of `orders` `v<id>` over n1 and n2, in `state`, with
/// `done` nodes done.
fn deployment(id: u64, state: &str, done: usize) -> DeploymentView {
    let node = |k: usize, name: &str| DeploymentNodeView {
        node: name.into(),
        state: if k < done { "done" } else { "pending" }.into(),
        detail: if k < done {
            "healthy through the soak"
        } else {
            ""
        }
        .into(),
        from_version: format!("v{}", id - 1),
        instance_id: if k < done {
            format!("orders-v{id}-4100")
        } else {
            String::new()
        },
        started_at: String::new(),
        finished_at: String::new(),
    };
    DeploymentView {
        id,
        service: "orders".into(),
        version: format!("v{id}"),
        sha256: "ab".repeat(32),
        size: 1536,
        file_name: "orders.jar".into(),
        strategy: "rolling".into(),
        author: "alice".into(),
        created_at: format!("2026-01-01T00:00:{:02}.000Z", id % 60),
        updated_at: format!("2026-01-01T00:00:{:02}.000Z", id % 60),
        state: state.into(),
        reason: String::new(),
        nodes: vec![node(0, "n1"), node(1, "n2")],
        events: vec![RolloutEventView {
            at: "2026-01-01T00:00:00.000Z".into(),
            text: "started".into(),
        }],
        driver: "c1".into(),
        command: "java -jar {artifact} --server.port={port}".into(),
        health_path: "/health".into(),
        health_timeout_ms: 60_000,
        drain_ms: 5_000,
        soak_ms: 10_000,
    }
}

/// What `node`'s deployer runs (`orders` at `version`) and keeps.
fn deployer(node: &str, version: &str) -> NodeDeploymentsView {
    NodeDeploymentsView {
        node: node.into(),
        deployer: format!("http://10.0.0.1:8894/{node}"),
        error: String::new(),
        instances: vec![DeployedInstance {
            service: "orders".into(),
            version: version.into(),
            instance_id: format!("orders-{version}-4100"),
            port: 4100,
            pid: 321,
            state: "running".into(),
            restarts: 0,
        }],
        artifacts: vec![StoredArtifact {
            service: "orders".into(),
            version: version.into(),
            file_name: "orders.jar".into(),
            size: 1536,
            sha256: "ab".repeat(32),
            stored_at: "2026-01-01T00:00:00.000Z".into(),
        }],
    }
}

/// A rollout of `version` over n1 (canary) and n2, started at second
/// `started` of the day, in `state`, with `done` nodes done.
fn rollout(version: u64, started: u32, state: &str, done: u32) -> RolloutView {
    let node = |name: &str, step: u32| RolloutNodeView {
        node: name.into(),
        step,
        from: version - 1,
        state: if step <= done { "done" } else { "pending" }.into(),
        detail: if step <= done { "healthy" } else { "" }.into(),
        pushed_at: String::new(),
        acked_at: String::new(),
    };
    let at = format!(
        "2026-01-01T{:02}:{:02}:{:02}.000Z",
        started / 3600,
        started / 60 % 60,
        started % 60
    );
    RolloutView {
        version,
        author: "alice".into(),
        created_at: at.clone(),
        updated_at: at.clone(),
        state: state.into(),
        reason: String::new(),
        step: done + 1,
        steps: 2,
        done,
        canary: 1,
        batch: 1,
        soak_ms: 30_000,
        ack_timeout_ms: 30_000,
        nodes: vec![node("n1", 1), node("n2", 2)],
        events: vec![RolloutEventView {
            at,
            text: format!("rollout of version {version} started by alice"),
        }],
        driver: "c1".into(),
    }
}

#[test]
fn assemble_sorts_by_name_and_derives_each_nodes_agent_health_and_instances() {
    let snapshot = assemble(reading(&["n1", "n2", "n3"]), "now".into());
    let names: Vec<&str> = snapshot
        .nodes
        .iter()
        .map(|n| n.info.name.as_str())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    let agents: Vec<&str> = snapshot.nodes.iter().map(|n| n.agent.as_str()).collect();
    // n3 runs no instance, so nothing carries its agent's check.
    assert_eq!(agents, ["passing", "critical", "unknown"]);
    let instances: Vec<u32> = snapshot.nodes.iter().map(|n| n.instances).collect();
    assert_eq!(instances, [2, 1, 0]);
    let services: Vec<&str> = snapshot.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(services, ["api", "web"]);
    assert_eq!(snapshot.nodes[0].info.proxy.state, "unknown");
    assert!(snapshot.rollouts.is_empty());
    assert_eq!(snapshot.updated_at, "now");
}

#[test]
fn assemble_keeps_each_nodes_routes_and_its_newest_versions_first() {
    let mut r = reading(&["n1"]);
    let total = MAX_VERSIONS as u64 + 7;
    r.routes.get_mut("n1").expect("n1 has routes").1 = versions(total);
    let snapshot = assemble(r, "now".into());
    let history = &snapshot.routes["n1"];
    assert_eq!((history.version, history.revision), (2, 57));
    assert_eq!(history.routes["web"].timeout.as_deref(), Some("2s"));
    assert_eq!(history.versions_total, total);
    assert_eq!(history.versions.len(), MAX_VERSIONS);
    assert_eq!(history.versions[0].number, total);
    assert_eq!(
        history.versions[MAX_VERSIONS - 1].number,
        total - MAX_VERSIONS as u64 + 1
    );
}

#[test]
fn the_state_is_one_json_line_that_carries_markup_and_newlines_as_they_are() {
    let mut snapshot = assemble(reading(&["n1"]), "now".into());
    snapshot.error = "line one\nline two".into();
    let json = snapshot.to_json();
    assert!(!json.contains('\n'), "{json}");
    let back: serde_json::Value = serde_json::from_str(&json).expect("the state is JSON");
    assert_eq!(back["services"][1]["tags"][0], MARKUP);
    assert_eq!(back["error"], "line one\nline two");
    assert_eq!(back["nodes"][0]["name"], "n1");
    assert_eq!(back["nodes"][0]["agent"], "passing");
    assert_eq!(back["nodes"][0]["proxy"]["state"], "unknown");
    assert_eq!(back["routes"]["n1"]["versions"][0]["number"], 2);
}

#[test]
fn assemble_keeps_the_newest_rollouts_the_one_under_way_first() {
    let mut r = reading(&["n1", "n2"]);
    // Ended rollouts of versions 10.., started one after the other, in
    // the store's order (version, newest first)...
    let ended = MAX_ROLLOUTS as u64 + 5;
    r.rollouts = (0..ended)
        .rev()
        .map(|k| rollout(10 + k, 60 * k as u32, "succeeded", 2))
        .collect();
    // ...and, started last, one of a version staged before them all.
    r.rollouts.push(rollout(5, 86_000, "running", 1));
    let snapshot = assemble(r, "now".into());
    assert_eq!(snapshot.rollouts_total, ended + 1);
    assert_eq!(snapshot.rollouts.len(), MAX_ROLLOUTS);
    let shown: Vec<u64> = snapshot.rollouts.iter().map(|r| r.version).collect();
    let newest_ended = 10 + ended - 1;
    assert_eq!(shown[0], 5, "the rollout under way comes first: {shown:?}");
    assert_eq!(shown[1], newest_ended, "{shown:?}");
    assert_eq!(
        shown[MAX_ROLLOUTS - 1],
        newest_ended - MAX_ROLLOUTS as u64 + 2,
        "the oldest go: {shown:?}"
    );
}

#[test]
fn the_state_carries_each_rollout_as_the_api_shows_it() {
    let mut r = reading(&["n1", "n2"]);
    let mut running = rollout(7, 3600, "paused", 1);
    running.reason = MARKUP.into();
    running.nodes[1].detail = "line one\nline two".into();
    r.rollouts = vec![running.clone()];
    let snapshot = assemble(r, "now".into());
    let back: serde_json::Value =
        serde_json::from_str(&snapshot.to_json()).expect("the state is JSON");
    let api = serde_json::to_value(&running).expect("a rollout is JSON");
    assert_eq!(back["rollouts"][0], api);
    assert_eq!(back["rollouts_total"], 1);
    assert_eq!(back["rollouts"][0]["state"], "paused");
    assert_eq!(back["rollouts"][0]["reason"], MARKUP);
    assert_eq!(back["rollouts"][0]["nodes"][0]["state"], "done");
    assert_eq!(
        back["rollouts"][0]["nodes"][1]["detail"],
        "line one\nline two"
    );
    assert_eq!(
        back["rollouts"][0]["events"][0]["at"],
        "2026-01-01T01:00:00.000Z"
    );
}

#[test]
fn a_rollouts_progress_is_a_change() {
    let mut r = reading(&["n1", "n2"]);
    r.rollouts = vec![rollout(7, 0, "running", 0)];
    let a = assemble(r.clone(), "t1".into());
    assert!(a.same_as(&assemble(r.clone(), "t2".into())));
    r.rollouts[0].nodes[0].state = "gating".into();
    let b = assemble(r.clone(), "t2".into());
    assert!(!a.same_as(&b), "a node moved on");
    r.rollouts[0].state = "aborting".into();
    assert!(
        !b.same_as(&assemble(r, "t3".into())),
        "the rollout moved on"
    );
}

#[test]
fn assemble_keeps_the_newest_deployments_first_and_the_deployers_by_node() {
    let mut r = reading(&["n1", "n2"]);
    let total = MAX_DEPLOYMENTS as u64 + 3;
    // In no particular order, as the store lists them.
    r.deployments = (1..=total)
        .map(|id| (id * 7) % total + 1)
        .map(|id| deployment(id, "succeeded", 2))
        .collect();
    r.deployers = vec![deployer("n2", "v2"), deployer("n1", "v1")];
    let snapshot = assemble(r, "now".into());
    assert_eq!(snapshot.deployments_total, total);
    let shown: Vec<u64> = snapshot.deployments.iter().map(|d| d.id).collect();
    let want: Vec<u64> = (total - MAX_DEPLOYMENTS as u64 + 1..=total).rev().collect();
    assert_eq!(shown, want, "the newest, the one started last first");
    let nodes: Vec<&str> = snapshot.deployers.iter().map(|d| d.node.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2"]);
}

#[test]
fn the_state_carries_each_deployment_and_deployer_as_the_api_shows_them() {
    let mut r = reading(&["n1", "n2"]);
    let mut halted = deployment(3, "halted", 0);
    halted.reason = MARKUP.into();
    halted.nodes[0].state = "rolled-back".into();
    halted.nodes[0].detail =
        "orders-v3-4100 failed its health gate: /health answered 500\nstderr: database unreachable"
            .into();
    halted.nodes[1].state = "skipped".into();
    let mut unreachable = deployer("n2", "v2");
    unreachable.error = "Status: connection refused".into();
    unreachable.instances.clear();
    unreachable.artifacts.clear();
    r.deployments = vec![halted.clone()];
    r.deployers = vec![deployer("n1", "v2"), unreachable.clone()];
    let snapshot = assemble(r, "now".into());
    let back: serde_json::Value =
        serde_json::from_str(&snapshot.to_json()).expect("the state is JSON");
    let api = serde_json::to_value(&halted).expect("a deployment is JSON");
    assert_eq!(back["deployments"][0], api);
    assert_eq!(back["deployments_total"], 1);
    assert_eq!(back["deployments"][0]["reason"], MARKUP);
    assert_eq!(back["deployments"][0]["nodes"][0]["state"], "rolled-back");
    assert_eq!(back["deployments"][0]["nodes"][1]["state"], "skipped");
    assert_eq!(
        back["deployers"][0],
        serde_json::to_value(deployer("n1", "v2")).expect("a deployer is JSON")
    );
    assert_eq!(back["deployers"][0]["instances"][0]["version"], "v2");
    assert_eq!(back["deployers"][1]["error"], "Status: connection refused");
}

#[test]
fn a_deployments_progress_and_a_nodes_new_version_are_changes() {
    let mut r = reading(&["n1", "n2"]);
    r.deployments = vec![deployment(4, "running", 0)];
    r.deployers = vec![deployer("n1", "v3"), deployer("n2", "v3")];
    let a = assemble(r.clone(), "t1".into());
    assert!(a.same_as(&assemble(r.clone(), "t2".into())));
    r.deployments[0].nodes[0].state = "deploying".into();
    let b = assemble(r.clone(), "t2".into());
    assert!(!a.same_as(&b), "a node moved on");
    r.deployers[0] = deployer("n1", "v4");
    let c = assemble(r.clone(), "t3".into());
    assert!(!b.same_as(&c), "a node runs the new version");
    r.deployments[0].state = "halted".into();
    assert!(
        !c.same_as(&assemble(r, "t4".into())),
        "the deployment ended"
    );
}

fn alert(kind: &str, target: &str, severity: &str, started_at: &str) -> AlertView {
    let (node, instance_id) = target.split_once('/').unwrap_or_default();
    AlertView {
        key: format!("{kind}/{target}"),
        kind: kind.into(),
        severity: severity.into(),
        target: target.into(),
        service: "orders".into(),
        instance_id: instance_id.into(),
        node: node.into(),
        probe: "http://10.0.0.1:9001/health".into(),
        evidence: MARKUP.into(),
        started_at: started_at.into(),
        resolved_at: String::new(),
        state: "open".into(),
    }
}

fn listed(alerts: Vec<AlertView>) -> MonitorAlerts {
    MonitorAlerts {
        configured: true,
        error: String::new(),
        alerts,
    }
}

#[test]
fn assemble_puts_critical_alerts_first_then_the_oldest() {
    let mut r = reading(&["n1", "n2"]);
    r.alerts = listed(vec![
        alert("slow", "n1/web-1", "warning", "2026-01-01T00:00:01.000Z"),
        alert("down", "n2/api-2", "critical", "2026-01-01T00:00:05.000Z"),
        alert("hung", "n1/api-1", "critical", "2026-01-01T00:00:02.000Z"),
        alert("slow", "n2/api-2", "warning", "2026-01-01T00:00:00.000Z"),
    ]);
    let snapshot = assemble(r, "now".into());
    let keys: Vec<&str> = snapshot
        .monitor
        .alerts
        .iter()
        .map(|a| a.key.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "hung/n1/api-1",
            "down/n2/api-2",
            "slow/n2/api-2",
            "slow/n1/web-1"
        ]
    );
    assert!(snapshot.monitor.configured);
}

#[test]
fn the_state_carries_each_alert_as_the_api_shows_it_and_whether_the_monitor_answered() {
    let mut r = reading(&["n1"]);
    let hung = alert("hung", "n1/api-1", "critical", "2026-01-01T00:00:02.000Z");
    r.alerts = listed(vec![hung.clone()]);
    let back: serde_json::Value =
        serde_json::from_str(&assemble(r.clone(), "now".into()).to_json()).expect("JSON");
    let api = serde_json::to_value(&hung).expect("an alert is JSON");
    assert_eq!(back["monitor"]["alerts"][0], api);
    assert_eq!(back["monitor"]["alerts"][0]["evidence"], MARKUP);
    assert_eq!(back["monitor"]["configured"], true);
    assert_eq!(back["monitor"]["error"], "");

    r.alerts = MonitorAlerts::failed("mesh-monitor at http://127.0.0.1:8896 is unreachable");
    let back: serde_json::Value =
        serde_json::from_str(&assemble(r, "now".into()).to_json()).expect("JSON");
    assert_eq!(
        back["monitor"],
        serde_json::json!({
            "configured": true,
            "error": "mesh-monitor at http://127.0.0.1:8896 is unreachable",
            "alerts": [],
        })
    );
    assert_eq!(
        back["error"], "",
        "Consul was read: the state is not in error"
    );

    let none = assemble(reading(&["n1"]), "now".into());
    assert!(!none.monitor.configured && none.monitor.alerts.is_empty());
}

#[test]
fn an_alert_that_opens_or_resolves_and_a_monitor_that_stops_answering_are_changes() {
    let mut r = reading(&["n1"]);
    r.alerts = listed(Vec::new());
    let quiet = assemble(r.clone(), "t1".into());
    assert!(quiet.same_as(&assemble(r.clone(), "t2".into())));
    r.alerts = listed(vec![alert("down", "n1/api-1", "critical", "t")]);
    let open = assemble(r.clone(), "t2".into());
    assert!(!quiet.same_as(&open), "an alert opened");
    r.alerts = listed(Vec::new());
    assert!(
        !open.same_as(&assemble(r.clone(), "t3".into())),
        "it resolved"
    );
    r.alerts = MonitorAlerts::failed("unreachable");
    assert!(
        !quiet.same_as(&assemble(r, "t3".into())),
        "the monitor stopped answering"
    );
}

#[test]
fn a_changed_time_alone_is_not_a_change() {
    let a = assemble(reading(&["n1"]), "t1".into());
    let b = assemble(reading(&["n1"]), "t2".into());
    assert!(a.same_as(&b));
    let c = assemble(reading(&["n1", "n2"]), "t2".into());
    assert!(!a.same_as(&c));
    assert!(!a.same_as(&a.with_error("Consul is down".into(), "t3".into())));
}

#[test]
fn the_page_runs_under_its_policy_and_never_parses_html_from_data() {
    // The policy allows no inline script, style or event handler: the page
    // only works if it has none.
    for (i, _) in INDEX_HTML.match_indices("<script") {
        let tag = &INDEX_HTML[i..i + INDEX_HTML[i..].find('>').expect("a closed tag")];
        assert!(tag.contains(" src="), "inline script in index.html: {tag}");
    }
    for forbidden in [
        " style=",
        " onclick=",
        " onload=",
        " onerror=",
        "javascript:",
    ] {
        assert!(
            !INDEX_HTML.contains(forbidden),
            "index.html has {forbidden:?}"
        );
    }
    // The script shows data as text: no HTML parsing, no code from strings.
    for forbidden in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setTimeout(\"",
        "createContextualFragment",
        "DOMParser",
    ] {
        assert!(!APP_JS.contains(forbidden), "app.js uses {forbidden}");
    }
    for forbidden in ["http://", "https://", "@import", "url("] {
        assert!(!APP_CSS.contains(forbidden), "app.css loads {forbidden}");
    }
}

// --- the publisher and the HTTP routes, over a source the test drives ---

/// A [`Source`] that answers each read with the next reading the test
/// sends, and says when the publisher waits for a change.
struct Scripted {
    readings: mpsc::UnboundedReceiver<Result<Reading, ControlError>>,
    ticks: mpsc::UnboundedReceiver<()>,
    waiting: mpsc::UnboundedSender<()>,
}

/// The test's side of a [`Scripted`] source.
struct Script {
    readings: mpsc::UnboundedSender<Result<Reading, ControlError>>,
    ticks: mpsc::UnboundedSender<()>,
    waiting: mpsc::UnboundedReceiver<()>,
}

impl Source for Scripted {
    async fn read(&mut self) -> Result<Reading, ControlError> {
        match self.readings.recv().await {
            Some(reading) => reading,
            None => std::future::pending().await,
        }
    }

    async fn changed(&mut self) {
        let _ = self.waiting.send(());
        if self.ticks.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

impl Script {
    /// The publisher read `reading` and is waiting for the next change.
    async fn read(&mut self, reading: Result<Reading, ControlError>) {
        self.readings.send(reading).expect("the publisher runs");
        self.waiting.recv().await.expect("the publisher runs");
    }

    /// A change: the publisher reads again.
    fn change(&self, reading: Result<Reading, ControlError>) {
        self.readings.send(reading).expect("the publisher runs");
        self.tick();
    }

    /// A change the publisher is told of, with nothing to read yet.
    fn tick(&self) {
        self.ticks.send(()).expect("the publisher runs");
    }
}

fn scripted() -> (Scripted, Script) {
    let (readings_tx, readings) = mpsc::unbounded_channel();
    let (ticks_tx, ticks) = mpsc::unbounded_channel();
    let (waiting, waiting_rx) = mpsc::unbounded_channel();
    (
        Scripted {
            readings,
            ticks,
            waiting,
        },
        Script {
            readings: readings_tx,
            ticks: ticks_tx,
            waiting: waiting_rx,
        },
    )
}

struct Running {
    subscriptions: Subscriptions,
    script: Script,
    trigger: Trigger,
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

fn start() -> Running {
    let (publisher, subscriptions) = Publisher::new();
    let (source, script) = scripted();
    let (trigger, shutdown) = shutdown::channel();
    let task = tokio::spawn(publisher.run(source, shutdown.clone()));
    Running {
        subscriptions,
        script,
        trigger,
        shutdown,
        task,
    }
}

async fn next(rx: &mut watch::Receiver<Option<Arc<Snapshot>>>) -> Arc<Snapshot> {
    loop {
        rx.changed().await.expect("the publisher runs");
        if let Some(s) = rx.borrow_and_update().clone() {
            return s;
        }
    }
}

fn names(snapshot: &Snapshot) -> Vec<&str> {
    snapshot
        .nodes
        .iter()
        .map(|n| n.info.name.as_str())
        .collect()
}

#[tokio::test]
async fn the_publisher_sends_changes_only_and_keeps_the_last_good_state_on_error() {
    let mut run = start();
    let mut rx = run.subscriptions.subscribe();
    run.script.read(Ok(reading(&["n1"]))).await;
    assert_eq!(names(&*next(&mut rx).await), ["n1"]);

    // The same state again: nothing is sent.
    run.script.change(Ok(reading(&["n1"])));
    run.script.waiting.recv().await.expect("the publisher runs");
    assert!(!rx.has_changed().expect("the publisher runs"));

    run.script.change(Ok(reading(&["n1", "n2"])));
    let second = next(&mut rx).await;
    assert_eq!(names(&second), ["n1", "n2"]);
    assert!(second.error.is_empty());

    run.script.change(Err(ControlError::Unavailable(
        "Consul at http://127.0.0.1:8500 is unreachable".into(),
    )));
    let failed = next(&mut rx).await;
    assert_eq!(names(&failed), ["n1", "n2"], "the last good state stays");
    assert!(failed.error.contains("unreachable"), "{}", failed.error);

    run.trigger.trigger();
    run.task.await.expect("the publisher stops on shutdown");
    assert!(rx.borrow().is_none(), "no stale state once stopped");
}

#[tokio::test]
async fn the_publisher_sends_each_step_of_a_rollout() {
    let mut run = start();
    let mut rx = run.subscriptions.subscribe();
    let with = |rollout: RolloutView| Reading {
        rollouts: vec![rollout],
        ..reading(&["n1", "n2"])
    };
    run.script.read(Ok(reading(&["n1", "n2"]))).await;
    assert!(next(&mut rx).await.rollouts.is_empty());
    run.script.change(Ok(with(rollout(7, 0, "running", 0))));
    let started = next(&mut rx).await;
    assert_eq!(
        (started.rollouts[0].version, started.rollouts[0].done),
        (7, 0)
    );
    run.script.change(Ok(with(rollout(7, 0, "running", 1))));
    let canary = next(&mut rx).await;
    assert_eq!(canary.rollouts[0].done, 1);
    assert_eq!(canary.rollouts[0].nodes[0].state, "done");
    run.script.change(Ok(with(rollout(7, 0, "succeeded", 2))));
    assert_eq!(next(&mut rx).await.rollouts[0].state, "succeeded");
    run.trigger.trigger();
    run.task.await.expect("the publisher stops on shutdown");
}

#[tokio::test]
async fn a_page_that_opens_while_nobody_watched_wakes_the_publisher() {
    let mut run = start();
    let first = run.subscriptions.subscribe();
    run.script.read(Ok(reading(&["n1"]))).await;
    // The page goes away: at the next change the publisher stops reading
    // and drops what it read, which goes stale from then on.
    drop(first);
    run.script.tick();
    tokio::time::timeout(Duration::from_secs(10), async {
        while run.subscriptions.current().is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the publisher parks within 10 s");
    // A new page wakes it: it reads, and the page gets the fresh state.
    let mut rx = run.subscriptions.subscribe();
    run.script.read(Ok(reading(&["n1", "n2", "n3"]))).await;
    assert_eq!(names(&*next(&mut rx).await), ["n1", "n2", "n3"]);
    run.trigger.trigger();
    run.task.await.expect("the publisher stops on shutdown");
}

/// Serves the dashboard's routes on a port of its own.
async fn serve(subscriptions: Subscriptions, shutdown: Shutdown) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("a bound address");
    let router = Dashboard::new(subscriptions, shutdown.clone()).router();
    let mut stop = shutdown;
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.requested().await })
            .await
    });
    addr
}

/// An HTTP/1.0 request (answered without chunked framing): the open stream.
async fn request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("the server listens");
    let head = format!("GET {path} HTTP/1.0\r\nHost: dashboard\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("a request");
    stream
}

/// The whole answer to `GET path`: head (lower case) and body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = request(addr, path).await;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("an answer within 10 s")
        .expect("a text answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    (head.to_lowercase(), body.to_owned())
}

/// The status code of an answer's head.
fn status(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or_default()
}

/// Reads from `stream` until `buf` holds one more SSE event; returns it.
async fn next_event(stream: &mut TcpStream, buf: &mut String) -> String {
    let read = async {
        loop {
            if let Some(end) = buf.find("\n\n") {
                let event = buf[..end].to_owned();
                buf.drain(..end + 2);
                if event.starts_with(':') {
                    continue; // a keep-alive comment
                }
                return event;
            }
            let mut chunk = [0u8; 8192];
            let n = stream
                .read(&mut chunk)
                .await
                .expect("the stream stays open");
            assert!(n > 0, "the event stream ended; so far: {buf}");
            buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an event within 10 s")
}

fn event_state(event: &str) -> serde_json::Value {
    assert!(event.contains("event: state\n"), "{event}");
    let data: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 1, "one data line: {event}");
    serde_json::from_str(data[0]).expect("the data is JSON")
}

#[tokio::test]
async fn the_page_its_assets_and_the_event_stream_are_served_with_types_and_policy() {
    let mut run = start();
    let addr = serve(run.subscriptions.clone(), run.shutdown.clone()).await;

    let (head, _) = get(addr, "/").await;
    assert_eq!(status(&head), "303", "{head}");
    assert!(head.contains("location: /ui/"), "{head}");
    for (path, content_type, text) in [
        ("/ui/", "text/html; charset=utf-8", INDEX_HTML),
        ("/ui/app.js", "text/javascript; charset=utf-8", APP_JS),
        ("/ui/app.css", "text/css; charset=utf-8", APP_CSS),
    ] {
        let (head, body) = get(addr, path).await;
        assert_eq!(status(&head), "200", "{path}: {head}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{path}: {head}"
        );
        assert!(
            head.contains(&format!(
                "content-security-policy: {}",
                CONTENT_SECURITY_POLICY.to_lowercase()
            )),
            "{path}: {head}"
        );
        assert!(
            head.contains("x-content-type-options: nosniff"),
            "{path}: {head}"
        );
        assert_eq!(body, text, "{path}");
    }

    // The stream gives the state once read, then each change.
    let mut stream = request(addr, "/v1/events").await;
    let mut buf = String::new();
    run.script.read(Ok(reading(&["n1"]))).await;
    let first = next_event(&mut stream, &mut buf).await;
    let (head, first) = first.split_once("\r\n\r\n").expect("a head, then events");
    let head = head.to_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(first.contains("retry: 1000"), "{first}");
    let state = event_state(first);
    assert_eq!(state["nodes"][0]["name"], "n1");
    assert_eq!(state["services"][1]["tags"][0], MARKUP);

    run.script.change(Ok(reading(&["n1", "n2"])));
    let state = event_state(&next_event(&mut stream, &mut buf).await);
    assert_eq!(state["nodes"][1]["name"], "n2");

    // On shutdown the stream ends, so the server can drain.
    run.trigger.trigger();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the stream ends on shutdown")
        .expect("a clean end");
    run.task.await.expect("the publisher stops on shutdown");
}

#[test]
fn the_script_shows_every_key_a_route_has() {
    let spec = RouteSpec {
        timeout: Some("2s".into()),
        per_try_timeout: Some("500ms".into()),
        retries: Some(2),
        lb: Some("consistent-hash".into()),
        weights: [("v1".to_owned(), 90), ("v2".to_owned(), 10)].into(),
        hash_header: Some("x-user".into()),
        hash_cookie: Some("session".into()),
    };
    let json = serde_json::to_value(&spec).expect("a route is JSON");
    let keys = json.as_object().expect("a route is a JSON object");
    assert_eq!(keys.len(), 7, "{json}");
    for key in keys.keys() {
        assert!(
            APP_JS.contains(&format!("r.{key}")),
            "app.js does not show {key}"
        );
    }
}

#[test]
fn the_script_shows_every_field_a_rollout_has() {
    // The page names a rollout `ro`, one of its nodes `rn`, an event `ev`.
    let view = rollout(7, 0, "running", 0);
    for (var, json) in [
        ("ro", serde_json::to_value(&view)),
        ("rn", serde_json::to_value(&view.nodes[0])),
        ("ev", serde_json::to_value(&view.events[0])),
    ] {
        let json = json.expect("a rollout is JSON");
        let keys = json.as_object().expect("a JSON object");
        for key in keys.keys() {
            assert!(
                APP_JS.contains(&format!("{var}.{key}")),
                "app.js does not show {var}.{key}"
            );
        }
    }
}

#[test]
fn the_script_shows_every_field_a_deployment_and_a_deployer_have() {
    // The page names a deployment `d`, one of its nodes `dn`, a node's
    // deployer `nd`, an instance it runs `di`, an artifact it keeps `da`;
    // events show as a rollout's do (`ev`).
    let view = deployment(7, "running", 1);
    let node = deployer("n1", "v7");
    for (var, json) in [
        ("d", serde_json::to_value(&view)),
        ("dn", serde_json::to_value(&view.nodes[0])),
        ("nd", serde_json::to_value(&node)),
        ("di", serde_json::to_value(&node.instances[0])),
        ("da", serde_json::to_value(&node.artifacts[0])),
    ] {
        let json = json.expect("a deployment is JSON");
        let keys = json.as_object().expect("a JSON object");
        for key in keys.keys() {
            assert!(
                APP_JS.contains(&format!("{var}.{key}")),
                "app.js does not show {var}.{key}"
            );
        }
    }
    assert!(INDEX_HTML.contains(r##"href="#/deployments""##));
}

#[test]
fn the_script_shows_every_field_an_alert_has() {
    // The page names an alert `al`, the monitor's answer `s.monitor`.
    let view = alert("hung", "n1/api-1", "critical", "t");
    let json = serde_json::to_value(&view).expect("an alert is JSON");
    for key in json.as_object().expect("a JSON object").keys() {
        assert!(
            APP_JS.contains(&format!("al.{key}")),
            "app.js does not show al.{key}"
        );
    }
    let json = serde_json::to_value(MonitorAlerts::unconfigured()).expect("JSON");
    for key in json.as_object().expect("a JSON object").keys() {
        assert!(
            APP_JS.contains(&format!("monitor.{key}")),
            "app.js does not show monitor.{key}"
        );
    }
    assert!(INDEX_HTML.contains(r##"href="#/alerts""##));
    assert!(INDEX_HTML.contains(r#"id="alert-count""#));
}

/// Intentions as the API shows them: `* -> web` denied, and `api -> web`
/// narrowed by one rule of each kind.
fn intentions() -> IntentionsView {
    use mesh_runtime::intentions::{Action, HttpRule, Intention, Method, Selector};
    let web = Selector::parse("web").expect("a service name");
    let rule = |exact: Option<&str>, prefix: Option<&str>, action| HttpRule {
        path_exact: exact.map(str::to_owned),
        path_prefix: prefix.map(str::to_owned),
        methods: vec![Method("GET".into())],
        action,
    };
    IntentionsView {
        default: crate::control::DefaultAction {
            action: Action::Deny,
            from: crate::control::DefaultFrom::Kv,
            revision: 12,
        },
        index: 40,
        intentions: vec![
            crate::control::IntentionView {
                intention: Intention {
                    source: Selector::Any,
                    destination: web.clone(),
                    action: Action::Deny,
                    http: Vec::new(),
                    description: String::new(),
                },
                revision: 30,
            },
            crate::control::IntentionView {
                intention: Intention {
                    source: Selector::parse("api").expect("a service name"),
                    destination: web,
                    action: Action::Allow,
                    http: vec![
                        rule(None, Some("/v1/"), Action::Allow),
                        rule(Some("/v1/admin"), None, Action::Deny),
                    ],
                    description: MARKUP.into(),
                },
                revision: 31,
            },
        ],
    }
}

#[test]
fn the_state_carries_the_intentions_as_the_api_shows_them_and_a_change_is_a_change() {
    let mut r = reading(&["n1"]);
    let none = assemble(r.clone(), "t1".into());
    r.intentions = intentions();
    let some = assemble(r.clone(), "t2".into());
    assert!(!none.same_as(&some), "intentions were stored");
    let back: serde_json::Value = serde_json::from_str(&some.to_json()).expect("JSON");
    let api = serde_json::to_value(intentions()).expect("intentions are JSON");
    assert_eq!(back["intentions"], api);
    assert_eq!(back["intentions"]["intentions"][1]["description"], MARKUP);
    r.intentions.default.action = mesh_runtime::intentions::Action::Allow;
    assert!(
        !some.same_as(&assemble(r, "t3".into())),
        "the default changed"
    );
}

#[test]
fn the_script_shows_every_field_an_intention_has() {
    // The page names an intention `i`, a rule `rule`, the default `d`.
    let view = intentions();
    let json = serde_json::to_value(&view.intentions[1]).expect("an intention is JSON");
    for key in json.as_object().expect("a JSON object").keys() {
        assert!(
            APP_JS.contains(&format!("i.{key}")),
            "app.js does not show i.{key}"
        );
    }
    for rule in &view.intentions[1].intention.http {
        let json = serde_json::to_value(rule).expect("a rule is JSON");
        for key in json.as_object().expect("a JSON object").keys() {
            assert!(
                APP_JS.contains(&format!("rule.{key}")),
                "app.js does not show rule.{key}"
            );
        }
    }
    let json = serde_json::to_value(&view.default).expect("the default is JSON");
    for key in json.as_object().expect("a JSON object").keys() {
        assert!(
            APP_JS.contains(&format!("d.{key}")),
            "app.js does not show d.{key}"
        );
    }
    assert!(INDEX_HTML.contains(r##"href="#/intentions""##));
}
