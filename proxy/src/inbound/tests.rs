use http_body_util::BodyExt;
use mesh_proto::v1 as pb;
use mesh_runtime::metrics::Registry;

use super::*;
use crate::{
    metrics::ProxyMetrics,
    table::{Builder, Source},
};

fn ep(id: &str, node: &str, port: u32, tags: &[&str]) -> pb::Endpoint {
    pb::Endpoint {
        id: id.into(),
        address: "10.0.0.2".into(),
        port,
        node: node.into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    }
}

/// Node n2's table: orders on n2 (twice, one h2) and on n1, the proxies.
fn table() -> RoutingTable {
    let metrics = ProxyMetrics::new(&Registry::new());
    let services = vec![
        pb::ServiceEndpoints {
            name: "orders".into(),
            endpoints: vec![
                ep("orders-1", "n1", 1, &[]),
                ep("orders-2", "n2", 2, &[]),
                ep("orders-3", "n2", 3, &["h2"]),
                // IDs are unique per node only.
                ep("dup", "n1", 4, &[]),
                ep("dup", "n2", 5, &[]),
            ],
        },
        pb::ServiceEndpoints {
            name: peer::SERVICE.into(),
            endpoints: vec![ep("mesh-proxy-n2", "n2", 8892, &[])],
        },
    ];
    Builder::new(&RoutingTable::empty(), &metrics).snapshot(&services, Source::Live, 1, 0)
}

fn naming(value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ENDPOINT_HEADER, HeaderValue::from_str(value).unwrap());
    h
}

#[test]
fn an_instance_on_this_node_is_resolved_with_its_protocol() {
    let t = table();
    let target = resolve(&t, "n2", &naming("orders/orders-2")).unwrap();
    assert_eq!(
        (&*target.service, target.id.as_str()),
        ("orders", "orders-2")
    );
    assert_eq!(target.upstream.port(), 2);
    assert_eq!((target.protocol, target.chosen), (Protocol::Http1, None));

    let mut h = naming("ORDERS/orders-3");
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static("http1"));
    let target = resolve(&t, "n2", &h).unwrap();
    assert_eq!(target.upstream.port(), 3);
    assert_eq!(
        (target.protocol, target.chosen),
        (Protocol::Http2, Some(Protocol::Http1))
    );

    let target = resolve(&t, "n2", &naming("orders/dup")).unwrap();
    assert_eq!(target.upstream.port(), 5, "the one on this node");
}

#[test]
fn no_header_is_400_and_a_bad_one_says_why() {
    let t = table();
    let e = resolve(&t, "n2", &HeaderMap::new()).unwrap_err();
    assert!(matches!(e, Refusal::MissingEndpoint));
    assert_eq!(e.status(), StatusCode::BAD_REQUEST);

    let e = resolve(&t, "n2", &naming("orders")).unwrap_err();
    assert!(matches!(&e, Refusal::BadEndpoint(m) if m.contains("<service>/<instance id>")));
    assert_eq!(e.status(), StatusCode::BAD_REQUEST);

    let mut two = naming("orders/orders-2");
    two.append(ENDPOINT_HEADER, HeaderValue::from_static("orders/orders-3"));
    let e = resolve(&t, "n2", &two).unwrap_err();
    assert!(matches!(&e, Refusal::BadEndpoint(m) if m.contains("more than one")));
}

#[test]
fn unknown_and_foreign_instances_are_refused_naming_them() {
    let t = table();
    for value in ["orders/nope", "billing/b-1", "mesh-proxy/mesh-proxy-n2"] {
        let e = resolve(&t, "n2", &naming(value)).unwrap_err();
        assert!(
            matches!(e, Refusal::UnknownInstance { .. }),
            "{value}: {e:?}"
        );
        assert_eq!(e.status(), StatusCode::MISDIRECTED_REQUEST);
        let (service, id) = value.split_once('/').unwrap();
        let text = e.to_string();
        assert!(
            text.contains(&format!("{id:?}")) && text.contains(&format!("{service:?}")),
            "{text}"
        );
        assert!(text.contains("node n2"), "{text}");
    }
    let e = resolve(&t, "n2", &naming("orders/orders-1")).unwrap_err();
    assert!(matches!(&e, Refusal::ForeignInstance { on, .. } if on == "n1"));
    assert_eq!(e.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(e.to_string().contains("runs on node n1, not on n2"), "{e}");
}

#[tokio::test]
async fn a_refusal_is_json_marked_for_the_calling_proxy() {
    let e = resolve(&table(), "n2", &naming("orders/orders-1")).unwrap_err();
    let response = e.to_response();
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(response.headers()[REFUSED_HEADER], "foreign_instance");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "foreign_instance");
    assert_eq!(json["service"], "orders");
    assert!(
        json["reason"].as_str().unwrap().contains("orders-1"),
        "{json}"
    );
}
