//! The node's config version from mesh-control, as the bridge streams it:
//! a good one changes the route policies at once and is reported, a bad
//! one is refused with the reason and the last good one keeps working.

use std::{net::SocketAddr, time::Duration};

use http::StatusCode;

use crate::support::{
    Behaviour, FakeBridge, TestProxy, TestUpstream, endpoint, eventually, get, service,
};

#[tokio::test]
async fn a_config_from_the_bridge_sets_the_policy_and_a_bad_one_is_refused_and_reported() {
    let slow = TestUpstream::start("slow-1", Behaviour::Hang).await;
    let bridge =
        FakeBridge::start(vec![service("slow", vec![endpoint("slow-1", slow.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(bridge.addr, dir.path()).await;
    proxy.wait_service("slow", 1).await;

    // Version 1: a short deadline for slow, no retries.
    bridge.send_config(1, "[routes.slow]\ntimeout = \"200ms\"\nretries = 0\n");
    let routes = proxy
        .wait_routes("config version 1 in effect", |r| {
            r["config"]["version"] == 1
        })
        .await;
    assert_eq!(routes["config"]["source"], "bridge");
    assert_eq!(routes["config"]["routes"]["slow"], "control");
    let resp = answered(proxy.addr).await;
    assert_eq!(
        resp.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    eventually("the bridge heard version 1", || async {
        bridge
            .reports()
            .iter()
            .any(|r| r.node == "test-node" && r.version_in_effect == 1)
            .then_some(())
    })
    .await;

    // Version 2 is refused by name; version 1 stays in effect.
    bridge.send_config(2, "[routes.slow]\ntimeout = \"0s\"\n");
    let routes = proxy
        .wait_routes("version 2 refused", |r| {
            r["config"]["refused"]["version"] == 2
        })
        .await;
    assert_eq!(routes["config"]["version"], 1);
    let reason = routes["config"]["refused"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(reason, "routes.slow.timeout: must be more than 0");
    eventually("the bridge heard the refusal", || async {
        bridge
            .reports()
            .iter()
            .any(|r| r.version_in_effect == 1 && r.refused_version == 2 && r.reason == reason)
            .then_some(())
    })
    .await;
    let resp = answered(proxy.addr).await;
    assert_eq!(
        resp.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    let metrics =
        String::from_utf8_lossy(&get(proxy.admin, "/metrics", &[]).await.body).into_owned();
    assert!(
        metrics.contains("mesh_proxy_node_config_version 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_proxy_node_configs_total{outcome=\"refused\"} 1"),
        "{metrics}"
    );
    proxy.stop().await;
}

/// `GET /slow/`, which must be answered well before the proxy's default
/// 15 s deadline: only the config's 200 ms one gets it answered in time.
async fn answered(proxy: SocketAddr) -> crate::support::Resp {
    tokio::time::timeout(Duration::from_secs(5), get(proxy, "/slow/", &[]))
        .await
        .expect("answered by the route's own deadline, not the default 15 s")
}
