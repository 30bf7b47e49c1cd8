//! Debian's Prometheus server scraping a live mesh with what the project
//! ships in `deploy/prometheus/` (the configuration and rules copied
//! unchanged, targets from the test's Consul catalog through
//! `consul-targets.sh`) and queried as the shipped Grafana dashboard
//! (`deploy/grafana/meshwork.json`) queries it.
//!
//! The mesh: two nodes in mtls mode (so every proxy registers as service
//! `mesh-proxy` and every bridge holds certificates), mesh-control (the
//! CA) on n1, a deployer on each node, mesh-monitor on n1 probing the
//! service `orders` (on n2) and a component that refuses connections (a
//! critical alert). Prometheus and the target writer run in n1's namespace;
//! the per-node admin listeners (127.0.0.1 in each node, the harness's
//! default) are reached at the node's address through a forwarder, as a
//! deployment binds them there (`--admin-listen <node-ip>:8889`).
//!
//! A user would see: every component's target up, with the `node` and
//! `component` labels; n1's proxy's request counter for `orders` equal to
//! the requests sent; the bridges', monitor's, control's and deployers'
//! series; every shipped rule loaded and healthy, the critical-alerts rule
//! pending or firing; every metric name the rules and the dashboard use
//! among the scraped ones, and every dashboard query valid PromQL.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{
    Mesh, MeshOptions, Node, bins,
    control::call,
    deployer::start_deployer,
    fault::FaultProxy,
    monitor::{MonitorOptions, metric_sum, start_monitor_with},
    prometheus::{Prometheus, dashboard_path, mesh_metric_names, shipped_dir},
    wait::eventually_every,
};
use serde_json::Value;

/// How long a routing change may take to show.
const CONVERGE: Duration = Duration::from_secs(20);

/// How long until Prometheus has scraped (every 15 s) and evaluated the
/// rules (every 15 s) what a test waits for.
const SCRAPED: Duration = Duration::from_secs(90);

/// How often the test asks Prometheus again.
const POLL: Duration = Duration::from_secs(1);

/// Requests sent through n1's proxy to `orders`.
const REQUESTS: usize = 25;

/// The admin ports a deployment opens on each node's address: proxy,
/// bridge, deployer.
const NODE_ADMIN_PORTS: [u16; 3] = [8889, 8891, 8895];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh_with_the_shipped_config_rules_and_dashboard() {
    let mut mesh = Mesh::start(MeshOptions {
        reachable_bridges: true,
        ..MeshOptions::nodes(2).with_mtls(None)
    })
    .await
    .unwrap();
    for k in 0..2 {
        start_deployer(&mut mesh, k, &[]).await.unwrap();
    }
    mesh.nodes[1].serve("orders", "orders-1").await.unwrap();
    let monitor = MonitorOptions {
        services: vec!["orders".into()],
        consul_checks: true,
        args: vec![
            "--components".into(),
            "unreachable=tcp://127.0.0.1:1".into(),
        ],
        ..MonitorOptions::default()
    };
    start_monitor_with(&mut mesh, 0, &monitor).await.unwrap();
    let _forwarders = expose_admin_ports(&mesh.nodes).await.unwrap();

    let n1 = &mesh.nodes[0];
    allow_calls_to(n1, "orders").await.unwrap();
    n1.wait_answers("orders", &["orders-1"], CONVERGE)
        .await
        .unwrap();
    let before = served_ok(n1, "orders").await.unwrap();
    for k in 0..REQUESTS {
        let resp = n1.get("/orders/").await.unwrap();
        assert_eq!(resp.status, 200, "request {k}: {}", resp.text());
    }
    let expected = before + REQUESTS as f64;
    assert_eq!(served_ok(n1, "orders").await.unwrap(), expected);

    let prometheus = Prometheus::start(n1, &mesh.dir().join("prometheus"))
        .await
        .unwrap();
    let checked = check(&prometheus, &mesh, expected).await;
    if let Err(e) = checked {
        panic!("{e:#}\n--- Prometheus:\n{}", prometheus.log_tail(30));
    }
    drop(prometheus);
    mesh.finish();
}

/// The shipped files pass Debian's promtool: the configuration, the
/// rules, and the rules' unit tests (`deploy/prometheus/tests/`).
#[test]
fn shipped_files_pass_promtool_checks_and_rule_tests() {
    let promtool = bins::promtool().unwrap();
    let dir = shipped_dir();
    let tests: Vec<String> = std::fs::read_dir(dir.join("tests"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(!tests.is_empty(), "no rule tests in {}", dir.display());
    let mut runs = vec![
        vec!["check".to_owned(), "config".into(), "prometheus.yml".into()],
        vec!["check".to_owned(), "rules".into(), "alerts.yml".into()],
    ];
    runs.push([vec!["test".to_owned(), "rules".into()], tests].concat());
    for args in runs {
        let out = std::process::Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {}: {said}", args.join(" "));
        assert!(
            said.contains("SUCCESS"),
            "promtool {}: {said}",
            args.join(" ")
        );
    }
}

/// Every assertion on what Prometheus shows.
async fn check(prometheus: &Prometheus, mesh: &Mesh, expected: f64) -> Result<()> {
    targets_are_up(prometheus, mesh).await?;
    proxy_counts_the_requests(prometheus, expected).await?;
    components_series_are_there(prometheus).await?;
    let rules = rules_are_loaded(prometheus).await?;
    critical_alerts_rule_fires(prometheus).await?;
    names_exist(prometheus, &rules).await?;
    dashboard_queries_are_valid(prometheus).await
}

/// Every component's target is discovered, labelled and up.
async fn targets_are_up(prometheus: &Prometheus, mesh: &Mesh) -> Result<()> {
    let mut want: BTreeSet<(String, String)> = BTreeSet::new();
    for node in &mesh.nodes {
        for job in ["mesh-proxy", "mesh-bridge", "mesh-deployer"] {
            want.insert((job.to_owned(), node.name.clone()));
        }
    }
    want.insert(("mesh-control".into(), "n1".into()));
    want.insert(("mesh-monitor".into(), String::new()));
    eventually_every("every target is scraped and up", SCRAPED, POLL, || async {
        let up = prometheus.query(r#"up{job=~"mesh-.*"}"#).await?;
        let mut seen = BTreeSet::new();
        let mut down = Vec::new();
        for series in &up {
            let m = &series["metric"];
            let (job, node) = (label(m, "job"), label(m, "node"));
            ensure!(
                label(m, "component") == job,
                "component label {m}: not its job's"
            );
            if value(series)? != 1.0 {
                down.push(m.to_string());
            }
            seen.insert((job, node));
        }
        ensure!(seen == want, "targets {seen:?}, want {want:?}");
        ensure!(down.is_empty(), "down: {down:?}");
        Ok(())
    })
    .await
}

/// n1's proxy's request counter for `orders`: one series, labelled as the
/// rules and the dashboard expect, with the requests sent.
async fn proxy_counts_the_requests(prometheus: &Prometheus, expected: f64) -> Result<()> {
    let query = r#"mesh_proxy_requests_total{node="n1", service="orders", code_class="2xx"}"#;
    let series = eventually_every("n1's orders counter is scraped", SCRAPED, POLL, || async {
        let result = prometheus.query(query).await?;
        let [series] = result.as_slice() else {
            bail!("{} series: {result:?}", result.len());
        };
        let got = value(series)?;
        ensure!(got == expected, "value {got}, want {expected}");
        Ok(series.clone())
    })
    .await?;
    let m = &series["metric"];
    ensure!(
        label(m, "component") == "mesh-proxy" && label(m, "job") == "mesh-proxy",
        "labels {m}"
    );
    ensure!(
        m.get("exported_service").is_none(),
        "a target label renamed the proxy's service label: {m}"
    );
    // The dashboard's and the rules' shapes: by service, and the histogram.
    let rate = prometheus
        .query(r#"sum by (service) (mesh_proxy_request_duration_seconds_count{service="orders"})"#)
        .await?;
    ensure!(
        rate.len() == 1 && value(&rate[0])? >= expected,
        "request durations of orders: {rate:?}"
    );
    Ok(())
}

/// The bridges', monitor's, mesh-control's and deployers' own series.
async fn components_series_are_there(prometheus: &Prometheus) -> Result<()> {
    let checks: [(&str, usize, &str); 6] = [
        (
            r#"mesh_bridge_subscribers{component="mesh-bridge"} >= 1"#,
            2,
            "a proxy subscribed to each bridge",
        ),
        (
            r#"mesh_bridge_certificate_expiry_seconds{component="mesh-bridge"} > 600"#,
            2,
            "each bridge's certificates valid",
        ),
        (
            r#"mesh_control_is_leader{component="mesh-control", replica="c1"} == 1"#,
            1,
            "c1 leads",
        ),
        (
            r#"mesh_monitor_targets{component="mesh-monitor"} >= 2"#,
            1,
            "the monitor probes orders-1 and the component",
        ),
        (
            r#"mesh_proxy_endpoints{service="orders", node="n1"} == 1"#,
            1,
            "n1 routes to orders-1",
        ),
        (
            r#"count by (node) ({component="mesh-deployer", __name__=~"mesh_deployer_.*"})"#,
            2,
            "each deployer's series",
        ),
    ];
    for (query, count, what) in checks {
        eventually_every(what, SCRAPED, POLL, || async {
            let result = prometheus.query(query).await?;
            ensure!(result.len() == count, "{query}: {result:?}");
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Every rule of the shipped alerts.yml is loaded, evaluated, healthy;
/// returns its name and query by rule.
async fn rules_are_loaded(prometheus: &Prometheus) -> Result<BTreeMap<String, String>> {
    let shipped = std::fs::read_to_string(shipped_dir().join("alerts.yml"))?;
    let want: BTreeSet<String> = shipped
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect();
    ensure!(!want.is_empty(), "no alert in the shipped alerts.yml");
    eventually_every(
        "every shipped rule is evaluated and healthy",
        SCRAPED,
        POLL,
        || async {
            let data = prometheus.api("/api/v1/rules").await?;
            let mut rules = BTreeMap::new();
            let mut unhealthy = Vec::new();
            for rule in data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            {
                let name = rule["name"].as_str().unwrap_or_default().to_owned();
                if rule["health"] != "ok" {
                    unhealthy.push(format!("{name}: {} {}", rule["health"], rule["lastError"]));
                }
                rules.insert(name, rule["query"].as_str().unwrap_or_default().to_owned());
            }
            let names: BTreeSet<String> = rules.keys().cloned().collect();
            ensure!(names == want, "rules loaded {names:?}, shipped {want:?}");
            ensure!(unhealthy.is_empty(), "unhealthy rules: {unhealthy:?}");
            Ok(rules)
        },
    )
    .await
}

/// The monitor's critical alert (a component refusing connections) makes
/// the shipped MeshMonitorCriticalAlertsOpen pending, then firing.
async fn critical_alerts_rule_fires(prometheus: &Prometheus) -> Result<()> {
    eventually_every(
        "MeshMonitorCriticalAlertsOpen is pending or firing",
        SCRAPED,
        POLL,
        || async {
            let data = prometheus.api("/api/v1/alerts").await?;
            let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
            let found = alerts.iter().find(|a| {
                a["labels"]["alertname"] == "MeshMonitorCriticalAlertsOpen"
                    && a["labels"]["severity"] == "critical"
                    && a["labels"]["component"] == "mesh-monitor"
            });
            match found {
                Some(a) if a["state"] == "pending" || a["state"] == "firing" => Ok(()),
                _ => bail!("alerts: {alerts:?}"),
            }
        },
    )
    .await
}

/// Every `mesh_*` metric the rules and the dashboard use is among the
/// scraped series' names.
async fn names_exist(prometheus: &Prometheus, rules: &BTreeMap<String, String>) -> Result<()> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rule, query) in rules {
        for name in mesh_metric_names(query) {
            used.entry(name).or_default().insert(format!("rule {rule}"));
        }
    }
    for (place, query) in dashboard_queries()? {
        for name in mesh_metric_names(&query) {
            used.entry(name).or_default().insert(place.clone());
        }
    }
    ensure!(used.len() > 20, "too few metric names found: {used:?}");
    eventually_every("every metric used is scraped", SCRAPED, POLL, || async {
        let scraped = prometheus.metric_names().await?;
        let missing: Vec<String> = used
            .iter()
            .filter(|(name, _)| !scraped.contains(*name))
            .map(|(name, by)| {
                format!(
                    "{name} (used by {})",
                    by.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        ensure!(
            missing.is_empty(),
            "metrics that no component exposes: {missing:#?}"
        );
        Ok(())
    })
    .await
}

/// Every dashboard query runs (Grafana's variables set to match all);
/// the node and service variables list the mesh's.
async fn dashboard_queries_are_valid(prometheus: &Prometheus) -> Result<()> {
    for (place, query) in dashboard_queries()? {
        if let Some(args) = query.strip_prefix("label_values(") {
            let (selector, label) = args
                .trim_end_matches(')')
                .rsplit_once(',')
                .with_context(|| format!("{place}: {query}"))?;
            let values = prometheus
                .label_values(label.trim(), &with_variables(selector))
                .await
                .with_context(|| format!("{place}: {query}"))?;
            let want = if label.trim() == "node" {
                "n1"
            } else {
                "orders"
            };
            ensure!(values.contains(want), "{place}: {query} lists {values:?}");
            continue;
        }
        prometheus
            .query(&with_variables(&query))
            .await
            .with_context(|| place.clone())?;
    }
    // A rate needs two scrapes of the proxy (15 s apart).
    let requests = with_variables(&panel_expr("Requests/s")?);
    eventually_every(
        "the Requests/s panel shows orders",
        SCRAPED,
        POLL,
        || async {
            let result = prometheus.query(&requests).await?;
            ensure!(
                result.iter().any(|s| s["metric"]["service"] == "orders"),
                "{requests}: {result:?}"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// Every query of the shipped dashboard: panels' `expr`s and the
/// template variables' queries, with where each is.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = dashboard_path();
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dashboard: Value = serde_json::from_str(&text).context("the dashboard's JSON")?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((format!("panel {}", panel["title"]), expr.to_owned()));
            }
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let query = var["query"]["query"].as_str().or(var["query"].as_str());
            let query = query.with_context(|| format!("variable {}: no query", var["name"]))?;
            queries.push((format!("variable {}", var["name"]), query.to_owned()));
        }
    }
    let has_datasource = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v["type"] == "datasource" && v["name"] == "datasource");
    ensure!(has_datasource, "the dashboard has no `datasource` variable");
    Ok(queries)
}

/// The first query of the panel titled `title`.
fn panel_expr(title: &str) -> Result<String> {
    dashboard_queries()?
        .into_iter()
        .find(|(place, _)| *place == format!("panel \"{title}\""))
        .map(|(_, q)| q)
        .with_context(|| format!("no panel {title:?} in the dashboard"))
}

/// `query` as Grafana sends it with every variable on "All".
fn with_variables(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$node", ".*")
        .replace("$service", ".*")
}

/// Stores the intention `* → service`, allow (mtls mode denies by
/// default), through the mesh-control replica on `control`.
async fn allow_calls_to(control: &Node, service: &str) -> Result<()> {
    let body = serde_json::json!({ "action": "allow", "description": "e2e prometheus" });
    let path = format!("/v1/intentions/*/{service}");
    let (status, answer) = call(control, hyper::Method::PUT, &path, Some(body)).await?;
    ensure!(
        (200..300).contains(&status),
        "PUT {path}: {status} {answer}"
    );
    Ok(())
}

/// Forwards `<node-ip>:port` to `127.0.0.1:port` in every node for the
/// per-node admin ports.
async fn expose_admin_ports(nodes: &[Node]) -> Result<Vec<FaultProxy>> {
    let mut forwarders = Vec::new();
    for node in nodes {
        for port in NODE_ADMIN_PORTS {
            let listen = SocketAddr::from((node.ip(), port));
            let target = SocketAddr::from(([127, 0, 0, 1], port));
            forwarders.push(FaultProxy::start(&node.ns, listen, target).await?);
        }
    }
    Ok(forwarders)
}

/// `mesh_proxy_requests_total` of `service`, 2xx, on `node`'s proxy now.
async fn served_ok(node: &Node, service: &str) -> Result<f64> {
    let text = node.proxy_admin("/metrics").await?.text();
    let service = format!("service=\"{service}\"");
    Ok(metric_sum(
        &text,
        "mesh_proxy_requests_total",
        &[&service, "code_class=\"2xx\""],
    ))
}

fn label(metric: &Value, name: &str) -> String {
    metric[name].as_str().unwrap_or_default().to_owned()
}

fn value(series: &Value) -> Result<f64> {
    let v = series["value"][1]
        .as_str()
        .with_context(|| format!("no value in {series}"))?;
    v.parse().with_context(|| format!("value {v:?}"))
}
