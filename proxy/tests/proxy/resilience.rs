//! Route policies on real sockets: latency-aware balancing, weights and
//! consistent hashing, outlier ejection, retries (per-try timeout, bodies,
//! budget), and the limits that answer 503 at once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_proto::v1 as pb;
use mesh_proxy::{Config, policy::RouteSpec};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::support::{
    Behaviour, FakeBridge, Resp, TestProxy, TestUpstream, endpoint, eventually, get, request,
    service,
};

/// An instance answering `status` after `delay`, with `x-instance` and
/// `{"instance", "body_len"}`.
struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(id: &str, status: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (id, counter) = (id.to_owned(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (id, counter) = (id.clone(), counter.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (id, counter) = (id.clone(), counter.clone());
                        async move {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let body = req.into_body().collect().await?.to_bytes();
                            tokio::time::sleep(delay).await;
                            let json = serde_json::json!({"instance": id, "body_len": body.len()});
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("x-instance", id)
                                    .body(Full::new(Bytes::from(json.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spec(toml_text: &str) -> RouteSpec {
    toml::from_str(toml_text).unwrap()
}

/// A proxy whose route `orders` has the policy `toml_text`.
async fn proxy_with(bridge: &FakeBridge, dir: &tempfile::TempDir, toml_text: &str) -> TestProxy {
    let route = spec(toml_text);
    TestProxy::start_with(bridge.addr, dir.path(), move |c: &mut Config| {
        c.routes.insert("orders".into(), route);
    })
    .await
}

fn count_by_instance(counts: &mut HashMap<String, usize>, r: &Resp) {
    *counts.entry(r.instance()).or_insert(0) += 1;
}

fn metric(proxy: &TestProxy, line_start: &str) -> Option<f64> {
    proxy
        .registry
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[tokio::test]
async fn p2c_ewma_sends_little_to_a_slow_instance() {
    let fast1 = Server::start("fast-1", 200, Duration::ZERO).await;
    let fast2 = Server::start("fast-2", 200, Duration::ZERO).await;
    let slow = Server::start("slow", 200, Duration::from_millis(100)).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![
            endpoint("fast-1", fast1.addr),
            endpoint("fast-2", fast2.addr),
            endpoint("slow", slow.addr),
        ],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The default balancing.
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 3).await;

    let mut counts = HashMap::new();
    for _ in 0..300 {
        let r = get(proxy.addr, "/orders/", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        count_by_instance(&mut counts, &r);
    }
    let slow_share = counts.get("slow").copied().unwrap_or(0);
    println!("p2c-ewma over 300 requests: {counts:?}");
    assert!(slow_share <= 6, "the slow instance got {slow_share} of 300");
    assert!(fast1.hits() > 50 && fast2.hits() > 50, "{counts:?}");
    let routes = proxy.routes().await;
    let slow_ewma = routes["services"]["orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "slow")
        .unwrap()["latency_ewma_ms"]
        .as_f64()
        .unwrap();
    assert!(slow_ewma > 50.0, "{routes}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_503_is_retried_elsewhere_and_the_failing_instance_is_ejected() {
    let bad = Server::start("bad", 503, Duration::ZERO).await;
    let good1 = Server::start("good-1", 200, Duration::ZERO).await;
    let good2 = Server::start("good-2", 200, Duration::ZERO).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![
            endpoint("bad", bad.addr),
            endpoint("good-1", good1.addr),
            endpoint("good-2", good2.addr),
        ],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(
        &bridge,
        &dir,
        "lb = \"round-robin\"\noutlier_consecutive_failures = 3\noutlier_base_ejection = \"30s\"",
    )
    .await;
    proxy.wait_service("orders", 3).await;

    for _ in 0..30 {
        let r = get(proxy.addr, "/orders/", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_ne!(r.instance(), "bad");
    }
    // Three failures in a row, then out.
    assert_eq!(bad.hits(), 3);
    let routes = proxy.routes().await;
    let eps = routes["services"]["orders"].as_array().unwrap();
    let bad_view = eps.iter().find(|e| e["id"] == "bad").unwrap();
    let until = bad_view["ejected_until"].as_u64().expect("bad is ejected");
    let now = mesh_proxy::table::now_unix_ms();
    assert!(
        (now + 20_000..=now + 31_000).contains(&until),
        "{until} vs now {now}"
    );
    assert!(
        eps.iter()
            .filter(|e| e["id"] != "bad")
            .all(|e| e["ejected_until"].is_null()),
        "{routes}"
    );
    assert_eq!(
        metric(&proxy, r#"mesh_proxy_ejections_total{service="orders"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&proxy, r#"mesh_proxy_endpoints_ejected{service="orders"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &proxy,
            r#"mesh_proxy_retries_total{service="orders",outcome="sent"}"#
        ),
        Some(3.0)
    );
    // The ejection survives a table swap that keeps the instance.
    let extra = Server::start("extra", 200, Duration::ZERO).await;
    bridge.snapshot(vec![service(
        "orders",
        vec![
            endpoint("bad", bad.addr),
            endpoint("good-1", good1.addr),
            endpoint("good-2", good2.addr),
            endpoint("extra", extra.addr),
        ],
    )]);
    proxy.wait_service("orders", 4).await;
    let routes = proxy.routes().await;
    let bad_view = routes["services"]["orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "bad")
        .unwrap()
        .clone();
    // The same ejection (its end computed again, to the millisecond).
    let again = bad_view["ejected_until"].as_u64().expect("still ejected");
    assert!(again.abs_diff(until) <= 5, "{again} vs {until}");
    for _ in 0..20 {
        assert_eq!(
            get(proxy.addr, "/orders/", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(bad.hits(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn ejection_never_takes_more_than_the_max_share() {
    let bad1 = Server::start("bad-1", 503, Duration::ZERO).await;
    let bad2 = Server::start("bad-2", 503, Duration::ZERO).await;
    let good = Server::start("good", 200, Duration::ZERO).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![
            endpoint("bad-1", bad1.addr),
            endpoint("bad-2", bad2.addr),
            endpoint("good", good.addr),
        ],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    // 50 % of 3 is one instance.
    let proxy = proxy_with(
        &bridge,
        &dir,
        "lb = \"round-robin\"\noutlier_consecutive_failures = 2",
    )
    .await;
    proxy.wait_service("orders", 3).await;
    for _ in 0..40 {
        let r = get(proxy.addr, "/orders/", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let routes = proxy.routes().await;
    let ejected = routes["services"]["orders"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["ejected_until"].is_null())
        .count();
    assert_eq!(ejected, 1, "{routes}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_hung_instance_costs_a_per_try_timeout_then_is_ejected() {
    let hung = TestUpstream::start("hung", Behaviour::Hang).await;
    let good1 = Server::start("good-1", 200, Duration::ZERO).await;
    let good2 = Server::start("good-2", 200, Duration::ZERO).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![
            endpoint("hung", hung.addr),
            endpoint("good-1", good1.addr),
            endpoint("good-2", good2.addr),
        ],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(
        &bridge,
        &dir,
        "lb = \"round-robin\"\nper_try_timeout = \"100ms\"\ntimeout = \"5s\"\n\
         outlier_consecutive_failures = 3",
    )
    .await;
    proxy.wait_service("orders", 3).await;

    let start = std::time::Instant::now();
    let mut slow = 0;
    for _ in 0..30 {
        let began = std::time::Instant::now();
        let r = get(proxy.addr, "/orders/", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        if began.elapsed() >= Duration::from_millis(100) {
            slow += 1;
        }
    }
    println!(
        "hung instance: {slow} of 30 requests paid a per-try timeout, {:?} in all",
        start.elapsed()
    );
    assert_eq!(slow, 3, "one per failure until the ejection");
    let routes = proxy.routes().await;
    let hung_view = routes["services"]["orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "hung")
        .unwrap()
        .clone();
    assert!(hung_view["ejected_until"].is_u64(), "{routes}");
    assert!(
        metric(
            &proxy,
            r#"mesh_proxy_upstream_errors_total{service="orders",kind="timeout"}"#
        )
        .is_some_and(|n| n >= 3.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn sent_post_is_retried_only_where_the_route_allows_and_its_body_is_replayed() {
    let reset = TestUpstream::start("reset", Behaviour::Reset).await;
    let good = Server::start("good", 200, Duration::ZERO).await;
    let eps = || vec![endpoint("reset", reset.addr), endpoint("good", good.addr)];
    let bridge = FakeBridge::start(vec![service("orders", eps()), service("billing", eps())]).await;
    let dir = tempfile::tempdir().unwrap();
    let (orders, billing) = (
        spec("lb = \"round-robin\"\noutlier_consecutive_failures = 0"),
        spec("lb = \"round-robin\"\noutlier_consecutive_failures = 0\nretry_non_idempotent = true"),
    );
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), move |c| {
        c.routes.insert("orders".into(), orders);
        c.routes.insert("billing".into(), billing);
    })
    .await;
    proxy.wait_service("orders", 2).await;
    proxy.wait_service("billing", 2).await;

    let body = vec![b'x'; 10_000];
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = request(proxy.addr, "POST", "/orders/x", &[], body.clone()).await;
        statuses.push(r.status);
    }
    assert!(
        statuses.contains(&StatusCode::BAD_GATEWAY),
        "a sent POST is not retried: {statuses:?}"
    );
    for method in ["POST", "PUT"] {
        for _ in 0..6 {
            let route = if method == "POST" {
                "/billing/x"
            } else {
                "/orders/x"
            };
            let r = request(proxy.addr, method, route, &[], body.clone()).await;
            assert_eq!(r.status, StatusCode::OK, "{method} {route}: {:?}", r.body);
            assert_eq!(r.json()["body_len"], 10_000, "the replayed body is whole");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_past_64_kib_is_not_replayed() {
    let reset = TestUpstream::start("reset", Behaviour::Reset).await;
    let good = Server::start("good", 200, Duration::ZERO).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("reset", reset.addr), endpoint("good", good.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(
        &bridge,
        &dir,
        "lb = \"round-robin\"\noutlier_consecutive_failures = 0",
    )
    .await;
    proxy.wait_service("orders", 2).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let body = vec![b'x'; 100_000];
        statuses.push(
            request(proxy.addr, "PUT", "/orders/x", &[], body)
                .await
                .status,
        );
    }
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
    assert!(
        statuses.contains(&StatusCode::BAD_GATEWAY),
        "a 100 kB PUT is not replayed: {statuses:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent_and_are_counted() {
    let a = Server::start("a", 503, Duration::ZERO).await;
    let b = Server::start("b", 503, Duration::ZERO).await;
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![endpoint("a", a.addr), endpoint("b", b.addr)],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    // 10 % of requests, no per-second floor: 20 requests earn 2 retries.
    let proxy = proxy_with(
        &bridge,
        &dir,
        "retry_budget_percent = 10\nretry_budget_min_per_second = 0\n\
         outlier_consecutive_failures = 0",
    )
    .await;
    proxy.wait_service("orders", 2).await;
    for _ in 0..20 {
        let r = get(proxy.addr, "/orders/", &[]).await;
        // The instance's own answer, when no retry may go.
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let sent = metric(
        &proxy,
        r#"mesh_proxy_retries_total{service="orders",outcome="sent"}"#,
    );
    let exhausted = metric(
        &proxy,
        r#"mesh_proxy_retries_total{service="orders",outcome="budget_exhausted"}"#,
    );
    println!("retries: sent {sent:?}, budget_exhausted {exhausted:?}");
    assert_eq!(sent, Some(2.0));
    assert_eq!(exhausted, Some(18.0));
    assert_eq!(a.hits() + b.hits(), 22);
    proxy.stop().await;
}

/// Starts `n` requests that hang (the instance never answers) and waits
/// until the proxy counts them.
async fn hang_requests(proxy: &TestProxy, n: usize) -> Vec<JoinHandle<Resp>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move { get(addr, "/orders/", &[]).await })
        })
        .collect();
    eventually("requests in flight", || async {
        let r = proxy.routes().await;
        let in_flight: u64 = r["services"]["orders"]
            .as_array()?
            .iter()
            .filter_map(|e| e["in_flight"].as_u64())
            .sum();
        (in_flight as usize == n).then_some(())
    })
    .await;
    tasks
}

#[tokio::test]
async fn over_a_service_limit_requests_get_a_fast_503_that_names_it() {
    let hung = TestUpstream::start("hung", Behaviour::Hang).await;
    let bridge =
        FakeBridge::start(vec![service("orders", vec![endpoint("hung", hung.addr)])]).await;
    for (policy, limit) in [
        ("max_requests = 2", "max_requests"),
        ("max_connections = 2", "max_connections"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxy_with(&bridge, &dir, &format!("{policy}\ntimeout = \"10s\"")).await;
        proxy.wait_service("orders", 1).await;
        let held = hang_requests(&proxy, 2).await;
        let began = std::time::Instant::now();
        let r = get(proxy.addr, "/orders/", &[]).await;
        assert!(began.elapsed() < Duration::from_secs(1), "not fast");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{policy}");
        let json = r.json();
        assert_eq!(json["error"], "overloaded", "{json}");
        assert_eq!(json["service"], "orders");
        assert!(json["reason"].as_str().unwrap().contains(limit), "{json}");
        assert_eq!(
            metric(
                &proxy,
                &format!(r#"mesh_proxy_overloaded_total{{service="orders",limit="{limit}"}}"#)
            ),
            Some(1.0)
        );
        for t in held {
            t.abort();
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn the_listener_sheds_load_past_its_limit() {
    let hung = TestUpstream::start("hung", Behaviour::Hang).await;
    let bridge =
        FakeBridge::start(vec![service("orders", vec![endpoint("hung", hung.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.listener_max_requests = Some(3);
        c.request_timeout = Duration::from_secs(10);
    })
    .await;
    proxy.wait_service("orders", 1).await;
    let held = hang_requests(&proxy, 3).await;
    let r = get(proxy.addr, "/orders/", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let json = r.json();
    assert_eq!(json["error"], "overloaded");
    assert!(
        json["reason"]
            .as_str()
            .unwrap()
            .contains("listener_max_requests"),
        "{json}"
    );
    assert_eq!(
        metric(
            &proxy,
            r#"mesh_proxy_overloaded_total{service="_listener",limit="listener_max_requests"}"#
        ),
        Some(1.0)
    );
    for t in held {
        t.abort();
    }
    // Capacity comes back with the requests that end.
    eventually("capacity back", || async {
        let r = get(proxy.admin, "/routes", &[]).await;
        let in_flight = r.json()["services"]["orders"][0]["in_flight"].as_u64();
        (in_flight == Some(0)).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn consistent_hash_keeps_a_user_on_one_instance() {
    let servers = [
        Server::start("a", 200, Duration::ZERO).await,
        Server::start("b", 200, Duration::ZERO).await,
        Server::start("c", 200, Duration::ZERO).await,
    ];
    let eps = servers
        .iter()
        .zip(["a", "b", "c"])
        .map(|(s, id)| endpoint(id, s.addr))
        .collect();
    let bridge = FakeBridge::start(vec![service("orders", eps)]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(
        &bridge,
        &dir,
        "lb = \"consistent-hash\"\nhash_cookie = \"session\"",
    )
    .await;
    proxy.wait_service("orders", 3).await;
    let mut owners = HashMap::new();
    for user in 0..30 {
        let cookie = format!("theme=dark; session=user-{user}");
        let first = get(proxy.addr, "/orders/", &[("cookie", &cookie)])
            .await
            .instance();
        for _ in 0..4 {
            let r = get(proxy.addr, "/orders/", &[("cookie", &cookie)]).await;
            assert_eq!(r.instance(), first, "user {user} moved");
        }
        *owners.entry(first).or_insert(0) += 1;
    }
    assert_eq!(
        owners.len(),
        3,
        "users spread over the instances: {owners:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn weights_send_a_canary_its_share() {
    let v1 = Server::start("v1", 200, Duration::ZERO).await;
    let v2 = Server::start("v2", 200, Duration::ZERO).await;
    let versioned = |id: &str, addr, version: &str| pb::Endpoint {
        meta: [("version".to_owned(), version.to_owned())].into(),
        ..endpoint(id, addr)
    };
    let bridge = FakeBridge::start(vec![service(
        "orders",
        vec![
            versioned("v1", v1.addr, "v1"),
            versioned("v2", v2.addr, "v2"),
        ],
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(&bridge, &dir, "weights = { v2 = 10, v1 = 90 }").await;
    proxy.wait_service("orders", 2).await;
    let mut counts = HashMap::new();
    for _ in 0..1000 {
        count_by_instance(&mut counts, &get(proxy.addr, "/orders/", &[]).await);
    }
    let canary = counts.get("v2").copied().unwrap_or(0);
    println!("weights v2=10 v1=90 over 1000 requests: {counts:?}");
    assert!((60..=140).contains(&canary), "{counts:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn past_its_connection_limit_the_listener_answers_503_and_closes() {
    let bridge = FakeBridge::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(bridge.addr, dir.path(), |c| {
        c.listener_max_connections = Some(2);
    })
    .await;
    // Two clients hold their connections open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
        held.push((sender, tokio::spawn(conn)));
    }
    // The listener counts them once it has accepted them.
    let text = eventually("a third connection is shed", || async {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_millis(200), s.read_to_end(&mut out))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.starts_with("HTTP/1.1 503").then_some(text)
    })
    .await;
    assert!(text.contains("connection: close"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["error"], "overloaded");
    assert!(
        json["reason"]
            .as_str()
            .unwrap()
            .contains("listener_max_connections"),
        "{json}"
    );
    assert!(
        metric(
            &proxy,
            r#"mesh_proxy_overloaded_total{service="_listener",limit="listener_max_connections"}"#
        )
        .is_some_and(|n| n >= 1.0)
    );
    // A held connection still works.
    let (sender, _) = &mut held[0];
    let req = Request::get("/v1/agent/services")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        sender.send_request(req).await.unwrap().status(),
        StatusCode::OK
    );
    drop(held);
    proxy.stop().await;
}
