use http::StatusCode;
use mesh_proto::v1 as pb;
use mesh_runtime::metrics::Registry;

use super::*;
use crate::table::{Builder, Source};

fn ep(id: &str, node: &str, port: u32) -> pb::Endpoint {
    pb::Endpoint {
        id: id.into(),
        address: "10.0.0.1".into(),
        port,
        node: node.into(),
        ..Default::default()
    }
}

fn table(metrics: &ProxyMetrics, services: Vec<(&str, Vec<pb::Endpoint>)>) -> RoutingTable {
    let services: Vec<_> = services
        .into_iter()
        .map(|(name, endpoints)| pb::ServiceEndpoints {
            name: name.into(),
            endpoints,
        })
        .collect();
    Builder::new(&RoutingTable::empty(), metrics).snapshot(&services, Source::Live, 1, 0)
}

fn proxies(nodes: &[&str]) -> Vec<pb::Endpoint> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| ep(&registration_id(n), n, 8892 + i as u32))
        .collect()
}

#[test]
fn the_peer_service_is_known_in_any_case() {
    assert!(is_peer_service("mesh-proxy"));
    assert!(is_peer_service("Mesh-Proxy"));
    assert!(!is_peer_service("mesh-proxy2"));
    assert!(!is_peer_service("orders"));
    assert_eq!(registration_id("n7"), "mesh-proxy-n7");
}

#[test]
fn instances_on_other_nodes_with_a_proxy_go_through_it() {
    let registry = Registry::new();
    let metrics = Arc::new(ProxyMetrics::new(&registry));
    let peers = Peers::new("n1", metrics.clone());
    let t = table(
        &metrics,
        vec![
            (SERVICE, proxies(&["n1", "n2", "n3"])),
            (
                "orders",
                vec![ep("o1", "n1", 1), ep("o2", "n2", 2), ep("o4", "n4", 4)],
            ),
        ],
    );
    peers.rebuild(t.get(SERVICE).map(|s| &**s));
    let orders = t.get("orders").unwrap().endpoints();
    // This node's instance: called directly.
    assert!(peers.hop(&orders[0]).unwrap().is_none());
    // Node 2 has a proxy: through it, on the peer endpoint's own upstream.
    let hop = peers.hop(&orders[1]).unwrap().unwrap();
    assert_eq!(hop.node(), "n2");
    let n2 = &t.get(SERVICE).unwrap().endpoints()[1];
    assert!(Arc::ptr_eq(&hop.upstream, &n2.upstream));
    // Node 4 has none: called directly.
    assert!(peers.hop(&orders[2]).unwrap().is_none());
    assert_eq!(
        peers.view().keys().collect::<Vec<_>>(),
        vec!["n2", "n3"],
        "this node's own proxy is no peer"
    );
    assert!(registry.render().contains("mesh_proxy_peers 2"));

    // n2's proxy leaves (its check failed): its instances are called directly.
    let t2 = table(
        &metrics,
        vec![
            (SERVICE, proxies(&["n1", "n3"])),
            ("orders", vec![ep("o2", "n2", 2)]),
        ],
    );
    peers.rebuild(t2.get(SERVICE).map(|s| &**s));
    assert!(
        peers
            .hop(&t2.get("orders").unwrap().endpoints()[0])
            .unwrap()
            .is_none()
    );
    peers.rebuild(None);
    assert!(peers.view().is_empty());
}

#[test]
fn of_two_registrations_for_one_node_the_one_named_for_it_wins() {
    let metrics = Arc::new(ProxyMetrics::new(&Registry::new()));
    let peers = Peers::new("n1", metrics.clone());
    for endpoints in [
        vec![ep("old-proxy", "n2", 1), ep("mesh-proxy-n2", "n2", 2)],
        vec![ep("mesh-proxy-n2", "n2", 2), ep("old-proxy", "n2", 1)],
    ] {
        let t = table(&metrics, vec![(SERVICE, endpoints)]);
        peers.rebuild(t.get(SERVICE).map(|s| &**s));
        assert_eq!(peers.view()["n2"].port, 2);
    }
}

#[test]
fn a_request_through_a_peer_names_its_instance_and_protocol() {
    let metrics = Arc::new(ProxyMetrics::new(&Registry::new()));
    let peers = Peers::new("n1", metrics.clone());
    let t = table(
        &metrics,
        vec![
            (SERVICE, proxies(&["n2"])),
            ("orders", vec![ep("orders 2", "n2", 2)]),
        ],
    );
    peers.rebuild(t.get(SERVICE).map(|s| &**s));
    let endpoint = &t.get("orders").unwrap().endpoints()[0];
    let hop = peers.hop(endpoint).unwrap().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(ENDPOINT_HEADER, HeaderValue::from_static("forged/x"));
    hop.mark(&mut headers, "orders", endpoint, Protocol::Http2);
    assert_eq!(headers[ENDPOINT_HEADER], "orders/orders%202");
    assert_eq!(headers.get_all(ENDPOINT_HEADER).iter().count(), 1);
    assert_eq!(headers[PROTOCOL_HEADER], "h2");
    unmark(&mut headers);
    assert!(headers.is_empty());
}

#[test]
fn what_the_calling_proxy_marks_the_peer_resolves() {
    // One table, two views: node n1 sends, node n2 receives.
    let metrics = Arc::new(ProxyMetrics::new(&Registry::new()));
    let t = table(
        &metrics,
        vec![
            (SERVICE, proxies(&["n1", "n2"])),
            ("orders", vec![ep("o/1 é", "n2", 2), ep("o2", "n1", 3)]),
        ],
    );
    let n1 = Peers::new("n1", metrics);
    n1.rebuild(t.get(SERVICE).map(|s| &**s));
    let orders = t.get("orders").unwrap();
    let mut headers = HeaderMap::new();
    let endpoint = &orders.endpoints()[0];
    n1.hop(endpoint)
        .unwrap()
        .unwrap()
        .mark(&mut headers, orders.name(), endpoint, Protocol::Http1);
    let target = crate::inbound::resolve(&t, "n2", &headers).unwrap();
    assert_eq!(target.id, "o/1 é");
    assert_eq!(target.chosen, Some(Protocol::Http1));
    assert!(Arc::ptr_eq(&target.upstream, &endpoint.upstream));
    // Sent to the wrong node, the same request is refused.
    assert!(crate::inbound::resolve(&t, "n1", &headers).is_err());
}

#[test]
fn only_the_peers_own_answers_are_failed_attempts() {
    let metrics = Arc::new(ProxyMetrics::new(&Registry::new()));
    let peers = Peers::new("n1", metrics.clone());
    let t = table(&metrics, vec![(SERVICE, proxies(&["n2"]))]);
    peers.rebuild(t.get(SERVICE).map(|s| &**s));
    let hop = peers.view();
    assert_eq!(hop["n2"].port, 8892);
    let peer = peers.map.load().get("n2").cloned().unwrap();
    let service: Arc<str> = "orders".into();

    let instance_said_421 = Response::builder()
        .status(StatusCode::MISDIRECTED_REQUEST)
        .body(())
        .unwrap();
    assert!(peer.refused(&instance_said_421, &service).is_none());

    let refused = Response::builder()
        .status(StatusCode::MISDIRECTED_REQUEST)
        .header(REFUSED_HEADER, "unknown_instance")
        .body(())
        .unwrap();
    let e = peer.refused(&refused, &service).unwrap();
    assert!(matches!(&e, ProxyError::Connect { service, .. } if &**service == "orders"));
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert!(
        cause.contains("node n2") && cause.contains("unknown_instance"),
        "{cause}"
    );
}

#[test]
fn upgrades_hop_over_http1_and_the_rest_over_http2() {
    let mut headers = HeaderMap::new();
    assert_eq!(hop_protocol(&headers), Protocol::Http2);
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    assert_eq!(hop_protocol(&headers), Protocol::Http1);
}
