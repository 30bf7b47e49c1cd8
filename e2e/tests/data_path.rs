//! The data path on a healthy cluster: a registration reaches other nodes'
//! proxies, instances that leave or fail stop getting requests, load is
//! shared, and a dying instance costs no request (issue 2, scenarios a–d).

use std::time::{Duration, Instant};

use anyhow::bail;
use mesh_e2e::{Load, LoadOptions, Mesh, MeshOptions, load::median_max, wait::eventually_every};
use serde_json::json;

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_registered_on_one_node_answers_by_name_on_another() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await.unwrap();
    let backend = mesh.nodes[0].serve("backend", "backend-1").await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    n2.wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();

    // By first path segment (stripped) and by Host.
    let resp = n2.get("/backend/some/path?q=1").await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json().unwrap()["path"],
        "/some/path?q=1",
        "{}",
        resp.text()
    );
    let resp = n2
        .proxy_client()
        .request(
            hyper::Method::GET,
            "/x",
            &[("host", "backend")],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "Host: backend: {}", resp.text());
    assert_eq!(resp.header("x-instance"), Some("backend-1"));

    // Propagation: register call on n1 -> first 200 through n2, 10 services.
    let mut times = Vec::new();
    let mut poll = n2.proxy_client();
    for k in 0..10 {
        let name = format!("prop-{k}");
        let body = json!({"Name": name, "ID": format!("{name}-1"),
                          "Address": backend.ip().to_string(), "Port": backend.port()});
        let path = format!("/{name}/");
        let start = Instant::now();
        let resp = n1.register(&body).await.unwrap();
        assert!(
            resp.status.is_success(),
            "register {name}: {} {}",
            resp.status,
            resp.text()
        );
        if resp.status != 200 {
            println!(
                "note: register {name} answered {} (queued) with Consul up",
                resp.status
            );
        }
        loop {
            let resp = poll.get(&path).await.unwrap();
            if resp.status == 200 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} not answered through n2 after 10 s: {} {}",
                resp.status,
                resp.text()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        times.push(start.elapsed());
    }
    let (median, max) = median_max(&times);
    println!(
        "propagation register(n1) -> first 200 through n2, 10 services: median {median:?}, max {max:?} (all: {times:?})"
    );
    assert!(
        max < Duration::from_secs(3),
        "propagation max {max:?} >= 3 s"
    );
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_instance_gets_no_requests_within_2s_and_callers_see_no_failure() {
    leaving_instance_gets_no_requests_within_2s(Leave::Deregister)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_whose_check_goes_critical_gets_no_requests_within_2s_and_callers_see_no_failure()
{
    leaving_instance_gets_no_requests_within_2s(Leave::CheckCritical)
        .await
        .unwrap();
}

#[derive(Debug, Clone, Copy)]
enum Leave {
    Deregister,
    CheckCritical,
}

async fn leaving_instance_gets_no_requests_within_2s(how: Leave) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await?;
    mesh.nodes[0].serve("svc", "svc-1").await?;
    mesh.nodes[1].serve("svc", "svc-2").await?;
    mesh.nodes[1]
        .wait_answers("svc", &["svc-1", "svc-2"], CONVERGE)
        .await?;

    let load = Load::start(
        &mesh.nodes[1].ns,
        "127.0.0.1:8888".parse()?,
        "/svc/",
        LoadOptions::default(),
    );
    load.wait_more(200, Duration::from_secs(10)).await?;
    let at = Instant::now();
    match how {
        Leave::Deregister => {
            let resp = mesh.nodes[0].deregister("svc-1").await?;
            assert_eq!(resp.status, 200, "deregister: {}", resp.text());
        }
        Leave::CheckCritical => mesh.nodes[0].set_instance_health("svc-1", false).await?,
    }
    let answered = at.elapsed();
    // When Consul's servers stop listing svc-1 as passing. For a check, the
    // bound starts there: the check's interval (1 s) and Consul's own sync
    // delays are not the mesh's.
    let in_catalog = eventually_every(
        "Consul's catalog no longer lists svc-1 as passing",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            if mesh
                .passing_instances("svc")
                .await?
                .iter()
                .any(|id| id == "svc-1")
            {
                bail!("still passing");
            }
            Ok(Instant::now())
        },
    )
    .await?;
    let from = match how {
        Leave::Deregister => at,
        Leave::CheckCritical => in_catalog,
    };
    // Keep going well past the 2 s bound, so that a late request to svc-1 shows.
    tokio::time::sleep_until((from + Duration::from_secs(3)).into()).await;
    load.wait_more(200, Duration::from_secs(10)).await?;
    let report = load.stop().await;

    let last = report
        .last_from("svc-1")
        .ok_or_else(|| anyhow::anyhow!("svc-1 never answered"))?;
    let after = last.saturating_duration_since(from);
    println!(
        "{how:?}: API answered in {answered:?}; catalog changed {:?} after the change; \
         last request reached svc-1 {:?} after the change, {:?} after the catalog; load: {}",
        in_catalog - at,
        last.saturating_duration_since(at),
        last.saturating_duration_since(in_catalog),
        report.summary()
    );
    assert!(
        after < Duration::from_secs(2),
        "svc-1 still got requests {after:?} after {how:?} (counted from {})",
        match how {
            Leave::Deregister => "the deregistration call",
            Leave::CheckCritical => "Consul's catalog marking it critical",
        }
    );
    assert!(
        report.failures().is_empty(),
        "callers saw failures: {}",
        report.summary()
    );
    assert!(
        report
            .after(from + Duration::from_secs(2))
            .any(|s| s.instance.as_deref() == Some("svc-2")),
        "svc-2 kept answering"
    );
    mesh.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_load_within_10_percent_round_robin() {
    // Round robin by name: the default (P2C over latency) favours the
    // instance on the caller's own node, by design.
    let opts = MeshOptions {
        proxy_args: vec!["--lb".into(), "round-robin".into()],
        ..MeshOptions::nodes(2)
    };
    let mut mesh = Mesh::start(opts).await.unwrap();
    mesh.nodes[0].serve("rr", "rr-1").await.unwrap();
    mesh.nodes[0].serve("rr", "rr-2").await.unwrap();
    mesh.nodes[1].serve("rr", "rr-3").await.unwrap();
    mesh.nodes[1]
        .wait_answers("rr", &["rr-1", "rr-2", "rr-3"], CONVERGE)
        .await
        .unwrap();

    let opts = LoadOptions {
        max_requests: 3000,
        interval: Duration::from_millis(1),
        ..LoadOptions::default()
    };
    let load = Load::start(
        &mesh.nodes[1].ns,
        "127.0.0.1:8888".parse().unwrap(),
        "/rr/",
        opts,
    );
    load.wait_more(3000, Duration::from_secs(60)).await.unwrap();
    let report = load.stop().await;
    assert!(report.failures().is_empty(), "{}", report.summary());
    let counts = report.by_instance();
    let mean = report.total() as f64 / 3.0;
    let shares: Vec<String> = counts
        .iter()
        .map(|(id, n)| format!("{id} {n} ({:+.1} %)", (*n as f64 / mean - 1.0) * 100.0))
        .collect();
    println!(
        "round robin over 3 instances, {} requests: {}",
        report.total(),
        shares.join(", ")
    );
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (id, n) in &counts {
        let dev = (*n as f64 / mean - 1.0).abs();
        assert!(
            dev <= 0.10,
            "{id} got {n} of {} ({:.1} % off the mean)",
            report.total(),
            dev * 100.0
        );
    }
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_sigkilled_under_steady_load_fails_no_get() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await.unwrap();
    mesh.nodes[0].serve("victim", "victim-1").await.unwrap();
    mesh.nodes[0].serve("victim", "victim-2").await.unwrap();
    mesh.nodes[1]
        .wait_answers("victim", &["victim-1", "victim-2"], CONVERGE)
        .await
        .unwrap();

    let load = Load::start(
        &mesh.nodes[1].ns,
        "127.0.0.1:8888".parse().unwrap(),
        "/victim/",
        LoadOptions::default(),
    );
    load.wait_more(500, Duration::from_secs(10)).await.unwrap();
    let killed = Instant::now();
    mesh.nodes[0]
        .instance("victim-1")
        .unwrap()
        .process
        .kill()
        .await
        .unwrap();
    // Past Consul's check interval (1 s) and the time it takes to route around.
    tokio::time::sleep_until((killed + Duration::from_secs(4)).into()).await;
    let report = load.stop().await;
    let after_kill = report.after(killed).count();
    println!(
        "victim-1 SIGKILLed under load: {after_kill} requests after the kill; load: {}",
        report.summary()
    );
    assert!(
        after_kill > 1000,
        "too little load after the kill: {after_kill}"
    );
    assert!(
        report.failures().is_empty(),
        "failed GETs: {}",
        report.summary()
    );
    mesh.finish();
}
