//! The README's `docker compose up`: the dev mesh of `deploy/compose`
//! (3 Consul servers, 2 nodes with Consul client, mesh-bridge, mesh-proxy,
//! mesh-deployer and a demo service each, mesh-control, mesh-monitor,
//! Prometheus) comes up from the images of `deploy/docker`; node 1's proxy
//! routes a call by name to the demo service on node 2 (and node 2's to
//! node 1's), the dashboard answers and sees both nodes, Prometheus scrapes
//! every component, and `down -v` leaves nothing behind.
//!
//! The engine pulls nothing: the public base images are built from Debian's
//! packages where missing, and the Meshwork image from the binaries this
//! workspace built (see `mesh_e2e::compose`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use mesh_e2e::{
    compose::{self, API_TOKEN, Project},
    wait::eventually_every,
};

/// How often the checks poll: each is a `docker exec` or an HTTP call.
const POLL: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_dev_mesh_routes_by_name_between_nodes() {
    let started = Instant::now();
    compose::docker_ready().await.unwrap();
    let tool = compose::compose_tool().await.unwrap();
    compose::base_images().await.unwrap();
    println!("base images ready after {:?}", started.elapsed());
    compose::build_image().await.unwrap();
    println!("{} built after {:?}", compose::IMAGE, started.elapsed());

    let mut project = Project::new(tool).await.unwrap();
    project.up().await.unwrap();
    let up = Instant::now();

    // Node 1's proxy, called by a process of node 1, reaches `echo`, which
    // only node 2 runs; and the other way round for `hello`.
    let echo = eventually_every(
        "node 1's proxy routes /echo/ to node 2",
        Duration::from_secs(120),
        POLL,
        || async {
            let answer = compose::get_through_proxy(&project, "node1-proxy", "/echo/a/b").await?;
            ensure!(
                answer.status == 200,
                "status {}: {}",
                answer.status,
                answer.body
            );
            answer.json()
        },
    )
    .await
    .unwrap();
    println!("node 1 reaches echo on node 2 {:?} after up", up.elapsed());
    assert_eq!(echo["service"], "echo", "{echo}");
    assert_eq!(echo["instance"], "echo-node2", "{echo}");
    assert_eq!(echo["node"], "node2", "answered by another node: {echo}");
    assert_eq!(echo["path"], "/a/b", "{echo}");
    let hello = eventually_every(
        "node 2's proxy routes /hello/ to node 1",
        Duration::from_secs(60),
        POLL,
        || async {
            let answer = compose::get_through_proxy(&project, "node2-demo", "/hello/").await?;
            ensure!(
                answer.status == 200,
                "status {}: {}",
                answer.status,
                answer.body
            );
            ensure!(
                answer.header("x-instance") == Some("hello-node1"),
                "x-instance {:?}",
                answer.header("x-instance")
            );
            answer.json()
        },
    )
    .await
    .unwrap();
    assert_eq!(hello["node"], "node1", "{hello}");

    // The images run as the unprivileged user.
    let uid = project.exec("node1-proxy", &["id", "-u"]).await.unwrap();
    assert_eq!(uid.trim(), "65532", "mesh-proxy runs as uid {uid}");

    check_dashboard(&project).await.unwrap();
    check_prometheus(&project).await.unwrap();

    project.down().await.unwrap();
    let left = project.compose(&["ps", "-q"]).await.unwrap();
    assert!(left.trim().is_empty(), "containers left after down: {left}");
    println!("compose test done after {:?}", started.elapsed());
}

/// mesh-control's dashboard answers on its published port, and its API
/// (with the token) lists both nodes.
async fn check_dashboard(project: &Project) -> anyhow::Result<()> {
    let addr = project.port("mesh-control", 8893).await?;
    eventually_every(
        "the dashboard answers",
        Duration::from_secs(60),
        POLL,
        || async {
            let page = compose::get(addr, "/ui/", &[]).await?;
            ensure!(page.status == 200, "{page:?}");
            ensure!(page.body.contains("<title>Meshwork"), "{}", page.body);
            Ok(())
        },
    )
    .await?;
    let unsigned = compose::get(addr, "/v1/nodes", &[]).await?;
    ensure!(
        unsigned.status == 401,
        "the API without the token: {unsigned:?}"
    );
    let bearer = format!("Bearer {API_TOKEN}");
    eventually_every(
        "mesh-control lists both nodes",
        Duration::from_secs(60),
        POLL,
        || async {
            let nodes = compose::get(addr, "/v1/nodes", &[("authorization", &bearer)])
                .await?
                .json()?;
            let names: Vec<&str> = nodes
                .as_array()
                .context("not a list")?
                .iter()
                .filter_map(|n| n["name"].as_str())
                .collect();
            ensure!(
                names.contains(&"node1") && names.contains(&"node2"),
                "nodes {names:?}"
            );
            Ok(())
        },
    )
    .await
}

/// Prometheus, on its published port, scrapes every component of both
/// nodes, mesh-control, mesh-monitor and every Consul agent, all up, and
/// evaluates the project's alert rules.
async fn check_prometheus(project: &Project) -> anyhow::Result<()> {
    let addr = project.port("prometheus", 9090).await?;
    let jobs = [
        "mesh-proxy",
        "mesh-bridge",
        "mesh-deployer",
        "mesh-control",
        "mesh-monitor",
        "consul",
    ];
    eventually_every(
        "Prometheus has every target up",
        Duration::from_secs(90),
        POLL,
        || async {
            let targets = compose::get(addr, "/api/v1/targets?state=active", &[])
                .await?
                .json()?;
            let active = targets["data"]["activeTargets"]
                .as_array()
                .context("no activeTargets")?;
            let down: Vec<String> = active
                .iter()
                .filter(|t| t["health"] != "up")
                .map(|t| {
                    let labels = &t["labels"];
                    format!("{} {} {}", labels["job"], labels["instance"], t["health"])
                })
                .collect();
            if !down.is_empty() {
                bail!("not up: {down:?}");
            }
            for job in jobs {
                ensure!(
                    active.iter().any(|t| t["labels"]["job"] == job),
                    "no target of job {job}"
                );
            }
            // 2 nodes × (proxy, bridge, deployer), control, monitor, 5 Consul agents.
            ensure!(active.len() == 13, "{} targets, 13 expected", active.len());
            Ok(())
        },
    )
    .await?;
    // The project's alert rules (deploy/prometheus/alerts.yml) are loaded.
    let rules = compose::get(addr, "/api/v1/rules", &[]).await?.json()?;
    let groups = rules["data"]["groups"]
        .as_array()
        .context("no rule groups")?;
    ensure!(!groups.is_empty(), "no alert rules loaded: {rules}");
    Ok(())
}
