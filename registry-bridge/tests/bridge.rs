//! The bridge library against a real Consul dev agent, through its gRPC
//! and admin listeners on port 0.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use consul_client::{Client, ClientConfig, testing::DevAgent};
use mesh_proto::v1::{
    Check, DeregisterRequest, ListInstancesRequest, RegisterRequest, RouteUpdate,
    ServiceRegistration, WatchRequest, discovery_client::DiscoveryClient,
    registry_client::RegistryClient, route_update::Kind,
};
use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::{duration::HumanDuration, metrics::Registry};
use tokio::io::AsyncWriteExt;
use tonic::{Code, Streaming, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(20);

/// A dev agent, a bridge on it, and gRPC clients.
struct Harness {
    consul: DevAgent,
    bridge: Bridge,
    registry: RegistryClient<Channel>,
    discovery: DiscoveryClient<Channel>,
    _data: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Result<Self> {
        mesh_runtime::install_crypto_provider();
        let consul = DevAgent::start().await;
        let data = tempfile::tempdir()?;
        let config = Args {
            node: Some("test-node".into()),
            consul_addr: vec![consul.addr()],
            grpc_listen: Some("127.0.0.1:0".parse()?),
            admin_listen: Some("127.0.0.1:0".parse()?),
            data_dir: Some(data.path().to_owned()),
            wait: Some(HumanDuration(Duration::from_secs(5))),
            ..Args::default()
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        let bridge = Bridge::start(&config, Registry::new()).await?;
        let url = format!("http://{}", bridge.grpc_addr());
        Ok(Self {
            registry: RegistryClient::connect(url.clone()).await?,
            discovery: DiscoveryClient::connect(url).await?,
            consul,
            bridge,
            _data: data,
        })
    }

    async fn watch(&mut self, services: &[&str]) -> Result<Streaming<RouteUpdate>> {
        let req = WatchRequest {
            node: "test".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
        };
        Ok(self.discovery.watch(req).await?.into_inner())
    }

    async fn register(&mut self, service: ServiceRegistration) -> Result<bool> {
        let req = RegisterRequest {
            service: Some(service),
        };
        Ok(self.registry.register(req).await?.into_inner().queued)
    }

    async fn deregister(&mut self, id: &str) -> Result<bool> {
        let req = DeregisterRequest { id: id.into() };
        Ok(self.registry.deregister(req).await?.into_inner().queued)
    }

    async fn admin(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{}{path}", self.bridge.admin_addr());
        let resp = reqwest::get(url).await?;
        Ok((resp.status().as_u16(), resp.text().await?))
    }

    fn consul_client(&self) -> Client {
        Client::new(&ClientConfig::new([self.consul.addr()])).expect("a dev agent address is valid")
    }
}

fn instance(name: &str, id: &str, port: u32) -> ServiceRegistration {
    ServiceRegistration {
        id: id.into(),
        name: name.into(),
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

async fn next(stream: &mut Streaming<RouteUpdate>) -> Result<RouteUpdate> {
    let msg = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .context("no update before the deadline")??;
    msg.context("stream ended")
}

/// Reads updates until one satisfies `pred`; returns it.
async fn until(
    stream: &mut Streaming<RouteUpdate>,
    pred: impl Fn(&RouteUpdate) -> bool,
) -> Result<RouteUpdate> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        let update = next(stream).await?;
        if pred(&update) {
            return Ok(update);
        }
    }
    bail!("no matching update within {DEADLINE:?}")
}

/// The endpoint IDs of `service` in a delta, if the delta upserts it.
fn upserted(update: &RouteUpdate, service: &str) -> Option<Vec<String>> {
    let Some(Kind::Delta(delta)) = &update.kind else {
        return None;
    };
    let s = delta.upserted.iter().find(|s| s.name == service)?;
    Some(s.endpoints.iter().map(|e| e.id.clone()).collect())
}

async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not within {DEADLINE:?}")
}

#[tokio::test]
async fn registration_through_grpc_reaches_watchers_as_deltas_and_deregistration_removes_it()
-> Result<()> {
    let mut h = Harness::start().await?;
    let mut watch = h.watch(&["web"]).await?;
    let snapshot = next(&mut watch).await?;
    assert_eq!(snapshot.version, 1);
    let Some(Kind::Snapshot(s)) = snapshot.kind else {
        bail!("first message is not a snapshot: {snapshot:?}")
    };
    assert_eq!(s.services.len(), 1, "known but empty: {s:?}");
    assert!(s.services[0].name == "web" && s.services[0].endpoints.is_empty());

    let started = Instant::now();
    assert!(
        !h.register(instance("web", "web-1", 8080)).await?,
        "applied, not queued"
    );
    let added = next(&mut watch).await?;
    println!("register -> delta: {:?}", started.elapsed());
    assert_eq!(added.version, 2);
    assert_eq!(upserted(&added, "web"), Some(vec!["web-1".to_owned()]));
    let Some(Kind::Delta(d)) = &added.kind else {
        unreachable!()
    };
    let ep = &d.upserted[0].endpoints[0];
    assert_eq!((ep.address.as_str(), ep.port), ("127.0.0.1", 8080));

    let started = Instant::now();
    assert!(!h.deregister("web-1").await?);
    let removed = next(&mut watch).await?;
    println!("deregister -> delta: {:?}", started.elapsed());
    assert_eq!(removed.version, 3);
    assert_eq!(upserted(&removed, "web"), Some(vec![]));
    Ok(())
}

#[tokio::test]
async fn subscribers_share_one_watch_per_service_which_stops_when_they_leave() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut a = h.watch(&["web", "api"]).await?;
    let mut b = h.watch(&["web"]).await?;
    next(&mut a).await?;
    next(&mut b).await?;
    assert_eq!(h.bridge.watches().active(), 2, "one loop per service");
    let (_, metrics) = h.admin("/metrics").await?;
    assert!(metrics.contains("mesh_bridge_watches 2"), "{metrics}");
    assert!(metrics.contains("mesh_bridge_subscribers 2"), "{metrics}");

    h.register(instance("web", "web-1", 8080)).await?;
    assert_eq!(
        upserted(&next(&mut a).await?, "web"),
        Some(vec!["web-1".into()])
    );
    assert_eq!(
        upserted(&next(&mut b).await?, "web"),
        Some(vec!["web-1".into()])
    );

    drop((a, b));
    let watches = h.bridge.watches().clone();
    eventually("watches stop", || {
        let active = watches.active();
        async move { Ok(active == 0) }
    })
    .await
}

#[tokio::test]
async fn all_services_mode_follows_the_catalog_and_reports_removed_services() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut watch = h.watch(&[]).await?;
    let snapshot = next(&mut watch).await?;
    let Some(Kind::Snapshot(s)) = snapshot.kind else {
        bail!("not a snapshot: {snapshot:?}")
    };
    // Catalog services only, and not Consul's own `consul` (its RPC port is
    // no route): nothing yet.
    let names: Vec<_> = s.services.iter().map(|s| s.name.as_str()).collect();
    assert!(names.is_empty(), "{s:?}");

    h.register(instance("api", "api-1", 9000)).await?;
    until(&mut watch, |u| {
        upserted(u, "api") == Some(vec!["api-1".into()])
    })
    .await?;
    h.deregister("api-1").await?;
    until(
        &mut watch,
        |u| matches!(&u.kind, Some(Kind::Delta(d)) if d.removed.contains(&"api".to_owned())),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn agent_outage_queues_registrations_and_applies_them_when_the_agent_is_back() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut watch = h.watch(&["late"]).await?;
    next(&mut watch).await?;

    h.consul.stop();
    assert!(
        h.register(instance("late", "late-1", 7000)).await?,
        "queued"
    );
    assert!(h.deregister("never-registered").await?, "queued behind");
    let (_, metrics) = h.admin("/metrics").await?;
    assert!(metrics.contains("mesh_bridge_queue_depth 2"), "{metrics}");

    h.consul.restart().await;
    let consul = h.consul_client();
    eventually("the queued registration reaches Consul", || {
        let consul = consul.clone();
        async move { Ok(consul.agent_services().await?.contains_key("late-1")) }
    })
    .await?;
    until(&mut watch, |u| {
        upserted(u, "late") == Some(vec!["late-1".into()])
    })
    .await?;
    eventually("the queue is empty", || async {
        Ok(h.admin("/metrics")
            .await?
            .1
            .contains("mesh_bridge_queue_depth 0"))
    })
    .await
}

#[tokio::test]
async fn bad_registrations_are_invalid_argument_with_the_reason() -> Result<()> {
    let mut h = Harness::start().await?;
    let e = h.register(instance("web", "w", 70000)).await.unwrap_err();
    let status = e.downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("70000"), "{status:?}");

    // Consul's own refusal comes back with Consul's message.
    let mut bad_check = instance("web", "w", 80);
    bad_check.checks.push(Check {
        http: "http://127.0.0.1:1/health".into(),
        interval: "soon".into(),
        ..Default::default()
    });
    let status = h
        .register(bad_check)
        .await
        .unwrap_err()
        .downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("soon"), "{status:?}");
    assert!(h.consul_client().agent_services().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn list_instances_local_and_mesh_wide() -> Result<()> {
    let mut h = Harness::start().await?;
    h.register(instance("web", "web-1", 8080)).await?;
    let mut critical = instance("web", "web-2", 8081);
    critical.checks.push(Check {
        ttl: "30s".into(),
        ..Default::default()
    });
    h.register(critical).await?;

    let local = h
        .registry
        .list_instances(ListInstancesRequest {
            service: String::new(),
            local: true,
        })
        .await?
        .into_inner();
    let ids: Vec<_> = local.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["web-1", "web-2"],
        "every local instance in any health"
    );

    let passing = h
        .registry
        .list_instances(ListInstancesRequest {
            service: "web".into(),
            local: false,
        })
        .await?
        .into_inner();
    let ids: Vec<_> = passing.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec!["web-1"], "a TTL check starts critical");
    Ok(())
}

#[tokio::test]
async fn admin_is_ready_health_serves_and_metrics_pass_promtool() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut watch = h.watch(&["web"]).await?;
    next(&mut watch).await?;
    h.register(instance("web", "web-1", 8080)).await?;
    next(&mut watch).await?;

    assert_eq!(h.admin("/ready").await?.0, 200);
    assert_eq!(h.admin("/live").await?.0, 200);
    let channel = Channel::from_shared(format!("http://{}", h.bridge.grpc_addr()))?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["mesh.v1.Registry", "mesh.v1.Discovery"] {
        let req = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(req).await?.into_inner().status;
        assert_eq!(status, 1, "{service} is SERVING");
    }

    let (code, metrics) = h.admin("/metrics").await?;
    assert_eq!(code, 200);
    for name in [
        "mesh_bridge_watches",
        "mesh_bridge_subscribers",
        "mesh_bridge_consul_requests_total{outcome=\"ok\"}",
        "mesh_bridge_consul_errors_total",
        "mesh_bridge_untrusted_answers_total",
        "mesh_bridge_queue_depth",
        "mesh_bridge_updates_sent_total{kind=\"delta\"} 1",
        "mesh_bridge_blocking_query_duration_seconds_bucket",
        "mesh_bridge_registry_calls_total{outcome=\"applied\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    promtool_check(&metrics).await
}

/// `promtool check metrics` on `text`; fails when promtool is missing.
async fn promtool_check(text: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool not found (Debian: apt-get install prometheus)")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn snapshot_while_consul_is_away_is_stale_and_a_fresh_one_follows_its_return() -> Result<()> {
    let mut h = Harness::start().await?;
    assert!(!h.register(instance("web", "web-1", 7001)).await?);
    let mut first = h.watch(&["web"]).await?;
    let snapshot = until(&mut first, |u| {
        matches!(&u.kind, Some(Kind::Snapshot(s)) if s.services.iter().any(|s| !s.endpoints.is_empty()))
            || upserted(u, "web").is_some_and(|ids| !ids.is_empty())
    })
    .await?;
    assert!(!snapshot.stale, "Consul answers: {snapshot:?}");

    h.consul.stop();
    eventually("the bridge sees Consul gone", || async {
        Ok(h.admin("/metrics")
            .await?
            .1
            .contains("mesh_bridge_consul_reachable 0"))
    })
    .await?;
    // A proxy subscribing now gets the last answer, marked stale.
    let mut second = h.watch(&["web"]).await?;
    let stale = next(&mut second).await?;
    let Some(Kind::Snapshot(s)) = &stale.kind else {
        bail!("expected a snapshot, got {stale:?}");
    };
    assert!(stale.stale, "{stale:?}");
    assert_eq!(s.services[0].endpoints[0].id, "web-1");

    // Consul back: the stale stream gets a whole fresh snapshot, no delta.
    h.consul.restart().await;
    let fresh = next(&mut second).await?;
    assert!(
        matches!(fresh.kind, Some(Kind::Snapshot(_))) && !fresh.stale,
        "{fresh:?}"
    );
    assert_eq!(fresh.version, stale.version + 1);
    Ok(())
}

#[tokio::test]
async fn subscribers_each_get_only_their_services_in_consecutive_versions() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut web = h.watch(&["web"]).await?;
    let mut api = h.watch(&["api"]).await?;
    let mut all = h.watch(&[]).await?;
    for stream in [&mut web, &mut api, &mut all] {
        let snapshot = next(stream).await?;
        assert!(
            matches!(snapshot.kind, Some(Kind::Snapshot(_))),
            "{snapshot:?}"
        );
        assert_eq!(snapshot.version, 1);
    }

    h.register(instance("web", "web-1", 8080)).await?;
    h.register(instance("api", "api-1", 9090)).await?;
    h.register(instance("web", "web-2", 8081)).await?;

    // Each stream reads until it has the last state of what it follows;
    // every message it gets is about its own services, versions +1.
    let wanted = [("web", vec!["web-1", "web-2"]), ("api", vec!["api-1"])];
    for (stream, follows) in [
        (&mut web, &["web"][..]),
        (&mut api, &["api"]),
        (&mut all, &["api", "web"]),
    ] {
        let mut version = 1;
        let mut seen: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let done = |seen: &std::collections::BTreeMap<String, Vec<String>>| {
            wanted
                .iter()
                .filter(|(name, _)| follows.contains(name))
                .all(|(name, ids)| seen.get(*name).is_some_and(|got| got == ids))
        };
        while !done(&seen) {
            let update = next(stream).await?;
            version += 1;
            assert_eq!(update.version, version, "{update:?}");
            let Some(Kind::Delta(d)) = update.kind else {
                bail!("expected a delta: {update:?}")
            };
            for s in d.upserted {
                assert!(
                    follows.contains(&s.name.as_str()),
                    "{} sent to {follows:?}",
                    s.name
                );
                seen.insert(s.name, s.endpoints.into_iter().map(|e| e.id).collect());
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_watch_naming_too_many_services_is_refused_with_the_limit() -> Result<()> {
    let mut h = Harness::start().await?;
    let names: Vec<String> = (0..=mesh_registry_bridge::discovery::MAX_SERVICES)
        .map(|i| format!("svc-{i}"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let status = h
        .watch(&names)
        .await
        .unwrap_err()
        .downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("10000"), "{status:?}");
    assert_eq!(h.bridge.watches().active(), 0, "nothing watched");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_s_config_version_rides_its_stream_and_its_proxy_s_status_is_recorded() {
    use mesh_proto::v1::ReportStatusRequest;
    let mut h = Harness::start().await.unwrap();
    let consul = h.consul_client();
    let key = "mesh/nodes/test-node/routes";
    let stored = |number: u64, rendered: &str| {
        serde_json::json!({"node": "test-node", "number": number, "author": "t",
            "created_at_ms": 1, "routes": {}, "rendered": rendered, "diff": ""})
        .to_string()
    };
    consul
        .kv_put(
            key,
            stored(1, "[routes.web]\nretries = 1\n").as_bytes(),
            None,
        )
        .await
        .unwrap();
    let own = WatchRequest {
        node: "test-node".into(),
        services: vec!["web".into()],
    };
    let mut stream = h.discovery.watch(own).await.unwrap().into_inner();
    let first = next(&mut stream).await.unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    let config = first
        .config
        .expect("the snapshot carries the node's config");
    assert_eq!(
        (config.version, config.text.as_str()),
        (1, "[routes.web]\nretries = 1\n")
    );
    assert_eq!(config.sha256.len(), 64, "{}", config.sha256);

    // A new version alone comes as a delta without services that carries it.
    consul
        .kv_put(
            key,
            stored(2, "[routes.web]\nretries = 2\n").as_bytes(),
            None,
        )
        .await
        .unwrap();
    let update = until(&mut stream, |u| u.config.is_some()).await.unwrap();
    assert_eq!(update.config.unwrap().version, 2);

    // Another node's stream gets none.
    let mut other = h.watch(&["web"]).await.unwrap();
    assert_eq!(next(&mut other).await.unwrap().config, None);

    // The proxy's status lands in mesh/status/<node>; another node's is refused.
    let report = |node: &str| ReportStatusRequest {
        node: node.into(),
        version_in_effect: 1,
        refused_version: 2,
        reason: "routes.web.retries: 11 is more than 10".into(),
    };
    h.registry.report_status(report("test-node")).await.unwrap();
    let pair = consul
        .kv_get(
            "mesh/status/test-node",
            consul_client::QueryOptions::default(),
        )
        .await
        .unwrap()
        .value
        .expect("the status key");
    let status: serde_json::Value = serde_json::from_slice(&pair.value).unwrap();
    assert_eq!(status["version_in_effect"], 1, "{status}");
    assert_eq!(status["refused_version"], 2, "{status}");
    assert_eq!(status["reason"], "routes.web.retries: 11 is more than 10");
    assert!(status["at_ms"].as_u64().unwrap_or(0) > 0, "{status}");
    let e = h
        .registry
        .report_status(report("elsewhere"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"elsewhere\""), "{}", e.message());
}
