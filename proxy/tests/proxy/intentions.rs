//! Intentions in mtls mode, in one process: proxy A (node-a, services web
//! and api) calls orders on node-b through proxy B, whose inbound listener
//! judges each request by the intentions the (fake) bridge sends.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use http::StatusCode;
use mesh_proxy::{InboundConfig, MeshMode, TlsConfig};
use mesh_runtime::pki::Ca;
use serde_json::{Value, json};

use crate::mtls::{Nodes, TlsDir, metric, on, td};
use crate::support::{
    Behaviour, FakeBridge, Resp, TestProxy, TestUpstream, endpoint, get, service,
};

/// web may call orders, but not under /admin/; api may not call it at all.
fn web_not_admin(default: &str) -> Value {
    json!({"default": default, "list": [
        {"source": "web", "destination": "orders", "action": "allow",
         "http": [{"path_prefix": "/", "action": "allow"},
                  {"path_prefix": "/admin/", "action": "deny"}]},
        {"source": "api", "destination": "orders", "action": "deny"}
    ]})
}

/// A and B in mtls mode, one mesh CA; orders-1 runs on node-b.
struct Pair {
    bridge: Option<FakeBridge>,
    a: TestProxy,
    b: Option<TestProxy>,
    tls_b: TlsDir,
    _tls_a: TlsDir,
    up: TestUpstream,
    b_in: SocketAddr,
    /// B's access log.
    b_log: PathBuf,
    dirs: [tempfile::TempDir; 2],
}

impl Pair {
    /// Starts the pair; the bridge sends `intentions` from the first
    /// snapshot on, or none.
    async fn start(intentions: Option<(u64, Value)>) -> Self {
        let ca = Ca::self_signed(td(), std::time::Duration::from_secs(24 * 3600)).unwrap();
        let up = TestUpstream::start("orders-1", Behaviour::Echo).await;
        let orders = service("orders", vec![on("node-b", endpoint("orders-1", up.addr))]);
        let bridge = FakeBridge::start(vec![orders.clone()]).await;
        if let Some((revision, json)) = intentions {
            bridge.set_intentions(revision, json);
        }
        let Nodes {
            a,
            b,
            tls_a,
            tls_b,
            b_log,
            dirs,
        } = Nodes::start(&ca, &bridge, &["web", "api"], vec![orders]).await;
        let b_in = b.app().inbound_addr().unwrap();
        Self {
            bridge: Some(bridge),
            a,
            b: Some(b),
            tls_b,
            _tls_a: tls_a,
            up,
            b_in,
            b_log,
            dirs,
        }
    }

    fn b(&self) -> &TestProxy {
        self.b.as_ref().unwrap()
    }

    fn bridge(&self) -> &FakeBridge {
        self.bridge.as_ref().unwrap()
    }

    /// `GET /orders<path>` on A, speaking as `source`.
    async fn call(&self, source: &str, path: &str) -> Resp {
        get(
            self.a.addr,
            &format!("/orders{path}"),
            &[("x-mesh-source", source)],
        )
        .await
    }

    /// Waits until B enforces the intentions of `revision`.
    async fn wait_revision(&self, revision: u64) {
        self.b()
            .wait_routes(&format!("B enforcing intentions {revision}"), |r| {
                r["intentions"]["revision"] == revision
            })
            .await;
    }

    /// B's count of `decision`s from `source` to orders.
    fn decisions(&self, decision: &str, source: &str) -> f64 {
        metric(
            self.b(),
            &format!(
                r#"mesh_proxy_intention_decisions_total{{decision="{decision}",source="{source}",destination="orders"}}"#
            ),
        )
    }

    /// Stops them all; B's access log, read before its folder goes.
    async fn stop(mut self) -> String {
        self.a.stop().await;
        if let Some(b) = self.b.take() {
            b.stop().await;
        }
        if let Some(bridge) = self.bridge.take() {
            bridge.stop().await;
        }
        std::fs::read_to_string(&self.b_log).unwrap_or_default()
    }
}

/// Restarts B on its inbound port from its data folder, with no bridge.
async fn restart_b_alone(pair: &mut Pair) {
    pair.b.take().unwrap().stop().await;
    pair.bridge.take().unwrap().stop().await;
    let b = start_b(pair.b_in, pair.dirs[1].path(), &pair.tls_b).await;
    pair.b = Some(b);
}

async fn start_b(inbound: SocketAddr, data: &Path, tls: &TlsDir) -> TestProxy {
    let dir = tls.path().to_owned();
    // No bridge: B's routes are not needed, only its inbound listener.
    let gone = crate::support::closed_port().keep();
    TestProxy::start_with(gone, data, move |c| {
        c.node = "node-b".into();
        c.mode = MeshMode::Mtls;
        c.tls = Some(TlsConfig {
            dir,
            trust_domain: None,
        });
        c.inbound = Some(InboundConfig {
            listen: inbound,
            address: Some("127.0.0.1".into()),
        });
    })
    .await
}

/// The refusal as the caller sees it: 403, `x-mesh-refused: intention`,
/// and the reason; the instance never saw the request.
fn assert_refused(r: &Resp, reason: &str) {
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert_eq!(
        r.headers.get("x-mesh-refused").map(|v| v.to_str().unwrap()),
        Some("intention"),
        "{:?}",
        r.headers
    );
    let body = r.json();
    assert_eq!(body["error"], "intention", "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    assert_eq!(body["service"], "orders", "{body}");
    assert!(
        !r.body.contains(&b'\n'),
        "one line: {:?}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test]
async fn an_allowed_call_reaches_the_instance_and_is_counted() {
    let pair = Pair::start(Some((7, web_not_admin("deny")))).await;
    pair.wait_revision(7).await;
    let r = pair.call("web", "/x").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.instance(), "orders-1");
    assert_eq!(pair.decisions("allow", "web"), 1.0);
    let routes = pair.b().routes().await;
    assert_eq!(routes["intentions"]["default"], "deny", "{routes}");
    assert_eq!(routes["intentions"]["count"], 2, "{routes}");
    assert_eq!(
        metric(pair.b(), "mesh_proxy_intentions_revision"),
        7.0,
        "the revision in force"
    );
    pair.stop().await;
}

#[tokio::test]
async fn a_service_rule_refuses_with_403_and_the_instance_is_never_reached() {
    let pair = Pair::start(Some((7, web_not_admin("deny")))).await;
    pair.wait_revision(7).await;
    let r = pair.call("api", "/x").await;
    assert_refused(
        &r,
        "intentions: api -> orders refused: deny by intention api -> orders",
    );
    assert_eq!(pair.up.requests(), 0, "the instance was never reached");
    // Relayed once, not retried, and not held against the instance.
    assert_eq!(pair.decisions("deny", "api"), 1.0);
    let a_routes = pair.a.routes().await;
    let orders = &a_routes["services"]["orders"][0];
    assert_eq!(orders["consecutive_failures"], 0, "{a_routes}");
    assert!(orders["ejected_until"].is_null(), "{a_routes}");
    assert_eq!(
        metric(
            pair.b(),
            r#"mesh_proxy_inbound_refused_total{reason="intention"}"#
        ),
        1.0
    );
    // The same caller is still served where it may go.
    assert_eq!(pair.call("web", "/x").await.status, StatusCode::OK);
    let instance = pair.up.addr.to_string();
    let log = pair.stop().await;
    // B's access log names the service of both, and the instance only of
    // the call it forwarded.
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let (refused, served) = (&lines[0], &lines[1]);
    assert_eq!(
        (&refused["service"], &refused["status"], &refused["reason"]),
        (&json!("orders"), &json!(403), &json!("intention")),
        "{refused}"
    );
    assert_eq!(refused["upstream"], "", "nothing was sent: {refused}");
    assert_eq!(served["status"], 200, "{served}");
    assert_eq!(served["upstream"], instance, "{served}");
}

#[tokio::test]
async fn a_path_rule_refuses_with_403_naming_the_rule() {
    let pair = Pair::start(Some((7, web_not_admin("deny")))).await;
    pair.wait_revision(7).await;
    let r = pair.call("web", "/admin/users").await;
    assert_refused(
        &r,
        "intentions: web -> orders refused: deny by intention web -> orders, http[1]",
    );
    // The path is judged normalized: dot-segments do not slip past.
    let r = pair.call("web", "/x/../admin/users").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert_eq!(pair.up.requests(), 0);
    pair.stop().await;
}

#[tokio::test]
async fn a_change_from_the_bridge_is_in_force_for_the_next_request() {
    let pair = Pair::start(Some((7, web_not_admin("deny")))).await;
    pair.wait_revision(7).await;
    assert_eq!(pair.call("web", "/x").await.status, StatusCode::OK);
    let deny_web = json!({"default": "deny", "list": [
        {"source": "web", "destination": "orders", "action": "deny"}
    ]});
    pair.bridge().set_intentions(8, deny_web);
    pair.wait_revision(8).await;
    let r = pair.call("web", "/x").await;
    assert_refused(
        &r,
        "intentions: web -> orders refused: deny by intention web -> orders",
    );
    // And back: an empty list with allow by default.
    pair.bridge().set_intentions(9, json!({"default": "allow"}));
    pair.wait_revision(9).await;
    assert_eq!(pair.call("api", "/x").await.status, StatusCode::OK);
    pair.stop().await;
}

#[tokio::test]
async fn a_restarted_proxy_without_its_bridge_enforces_the_saved_intentions() {
    let mut pair = Pair::start(Some((7, web_not_admin("deny")))).await;
    pair.wait_revision(7).await;
    let saved = pair.dirs[1].path().join("intentions.dump");
    crate::support::eventually("B saved its intentions", || async {
        saved.exists().then_some(())
    })
    .await;
    restart_b_alone(&mut pair).await;
    let routes = pair.b().routes().await;
    assert_eq!(routes["source"], "dump", "{routes}");
    assert_eq!(routes["intentions"]["revision"], 7, "{routes}");
    assert_eq!(pair.call("web", "/x").await.status, StatusCode::OK);
    assert_refused(
        &pair.call("api", "/x").await,
        "intentions: api -> orders refused: deny by intention api -> orders",
    );
    assert_eq!(
        pair.up.requests(),
        1,
        "only web's call reached the instance"
    );
    pair.stop().await;
}

#[tokio::test]
async fn without_intentions_every_inbound_request_is_denied() {
    let pair = Pair::start(None).await;
    let r = pair.call("web", "/x").await;
    assert_refused(
        &r,
        "intentions: web -> orders refused: no intentions received from the bridge yet, and none saved (deny until they are)",
    );
    assert_eq!(pair.up.requests(), 0);
    let routes = pair.b().routes().await;
    assert!(routes["intentions"]["revision"].is_null(), "{routes}");
    assert_eq!(pair.decisions("deny", "web"), 1.0);
    // A set that does not read changes nothing: still denied.
    pair.bridge()
        .set_intentions(3, json!({"default": "sometimes"}));
    let r = pair.call("web", "/x").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    pair.stop().await;
}

#[tokio::test]
async fn direct_mode_enforces_no_intentions() {
    let up = TestUpstream::start("orders-1", Behaviour::Echo).await;
    let bridge =
        FakeBridge::start(vec![service("orders", vec![endpoint("orders-1", up.addr)])]).await;
    bridge.set_intentions(1, json!({"default": "deny"}));
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("orders", 1).await;
    assert_eq!(
        get(proxy.addr, "/orders/x", &[]).await.status,
        StatusCode::OK
    );
    let routes = proxy.routes().await;
    assert!(routes.get("intentions").is_none(), "{routes}");
    proxy.stop().await;
    bridge.stop().await;
}
