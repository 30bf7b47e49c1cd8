//! The transport against a tiny fake HTTP server on port 0: headers sent,
//! metadata read, failover, errors. Real Consul is in `tests/`.

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::model::AgentServiceRegistration;

/// A fake agent answering every request with one canned response and
/// recording each request's head (lowercased).
struct Fake {
    addr: String,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn fake(status: &str, headers: &str, body: &str) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let head = read_head(&mut sock).await;
            record.lock().unwrap().push(head.to_lowercase());
            sock.write_all(response.as_bytes()).await.unwrap();
        }
    });
    Fake { addr, seen }
}

async fn read_head(sock: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if sock.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

/// An address where nothing listens: connecting is refused.
async fn refused() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    addr
}

fn client(addrs: &[&str], token: Option<&str>) -> Client {
    let mut config = ClientConfig::new(addrs.iter().copied());
    config.token = token.map(str::to_owned);
    Client::new(&config).unwrap()
}

const ENTRY: &str = r#"[{"Node":{"Node":"n1","Address":"10.0.0.1"},
  "Service":{"ID":"w1","Service":"web","Address":"","Port":8080,"Tags":null}}]"#;

#[tokio::test]
async fn blocking_health_query_sends_token_and_params_and_reads_metadata() {
    let agent = fake(
        "200 OK",
        "X-Consul-Index: 42\r\nX-Consul-KnownLeader: false\r\nX-Consul-LastContact: 9\r\n",
        ENTRY,
    )
    .await;
    let c = client(&[&agent.addr], Some("s3cret"));
    let opts = QueryOptions::blocking(5, Duration::from_secs(1)).stale();
    let r = c.health_service("web", true, opts).await.unwrap();
    assert_eq!((r.index, r.known_leader, r.last_contact_ms), (42, false, 9));
    assert_eq!(r.value[0].service.id, "w1");
    assert_eq!(r.value[0].address(), "10.0.0.1");
    let head = agent.seen.lock().unwrap()[0].clone();
    assert!(
        head.starts_with("get /v1/health/service/web?index=5&wait=1000ms&stale&passing "),
        "{head}"
    );
    assert!(head.contains("x-consul-token: s3cret"), "{head}");
}

#[tokio::test]
async fn no_token_header_without_a_token_and_names_are_escaped() {
    let agent = fake("200 OK", "", "[]").await;
    let c = client(&[&agent.addr], None);
    let r = c
        .health_service("we b/x", false, QueryOptions::default())
        .await
        .unwrap();
    assert!(r.value.is_empty());
    let head = agent.seen.lock().unwrap()[0].clone();
    assert!(
        head.starts_with("get /v1/health/service/we%20b%2fx "),
        "{head}"
    );
    assert!(!head.contains("x-consul-token"), "{head}");
}

#[tokio::test]
async fn connect_error_fails_over_and_the_working_address_is_remembered() {
    let dead = refused().await;
    let agent = fake("200 OK", "", "\"10.0.0.1:8300\"").await;
    let c = client(&[&dead, &agent.addr], None);
    assert_eq!(c.status_leader().await.unwrap(), "10.0.0.1:8300");
    assert_eq!(c.current_addr().as_str().trim_end_matches('/'), agent.addr);
    c.status_leader().await.unwrap();
    assert_eq!(agent.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn every_address_refusing_is_unreachable() {
    let c = client(&[&refused().await, &refused().await], None);
    let e = c.agent_services().await.unwrap_err();
    assert!(e.is_unreachable() && e.is_retryable(), "{e}");
}

#[tokio::test]
async fn a_4xx_is_the_callers_fault_with_consuls_message() {
    let agent = fake(
        "400 Bad Request",
        "",
        "Invalid check: TTL must be > 0 for TTL checks",
    )
    .await;
    let c = client(&[&agent.addr], None);
    let reg = AgentServiceRegistration {
        name: "web".into(),
        ..Default::default()
    };
    let e = c.agent_service_register(&reg).await.unwrap_err();
    assert!(e.is_caller_fault() && !e.is_retryable(), "{e}");
    assert_eq!(e.message(), "Invalid check: TTL must be > 0 for TTL checks");
    let head = agent.seen.lock().unwrap()[0].clone();
    assert!(
        head.starts_with("put /v1/agent/service/register "),
        "{head}"
    );
}

#[tokio::test]
async fn an_undecodable_answer_is_a_decode_error() {
    let agent = fake("200 OK", "", "{not json").await;
    let e = client(&[&agent.addr], None)
        .catalog_services(QueryOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decode(_)), "{e}");
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_times_out_as_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let c = client(&[&addr], None);
    let e = c.status_leader().await.unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    drop(listener);
}

#[tokio::test]
async fn kv_get_of_a_missing_key_is_none_with_the_index() {
    let agent = fake("404 Not Found", "X-Consul-Index: 7\r\n", "").await;
    let r = client(&[&agent.addr], None)
        .kv_get("mesh/nodes/n1", QueryOptions::default())
        .await
        .unwrap();
    assert_eq!((r.value, r.index), (None, 7));
    let head = agent.seen.lock().unwrap()[0].clone();
    assert!(head.starts_with("get /v1/kv/mesh/nodes/n1 "), "{head}");
}

#[tokio::test]
async fn catalog_node_services_lists_a_nodes_instances_and_none_for_an_unknown_node() {
    let body = r#"{"Node":{"Node":"n1","Address":"10.0.0.1"},"Services":{
        "web-2":{"ID":"web-2","Service":"web","Tags":null,"Meta":null,"Port":81},
        "api-1":{"ID":"api-1","Service":"api","Tags":[],"Meta":{},"Port":80}}}"#;
    let agent = fake("200 OK", "X-Consul-Index: 9\r\n", body).await;
    let r = client(&[&agent.addr], None)
        .catalog_node_services("n1", QueryOptions::default())
        .await
        .unwrap();
    let ids: Vec<_> = r
        .value
        .iter()
        .map(|s| (s.id.as_str(), s.service.as_str()))
        .collect();
    assert_eq!(ids, [("api-1", "api"), ("web-2", "web")]);
    assert_eq!(r.index, 9);
    let head = agent.seen.lock().unwrap()[0].clone();
    assert!(head.starts_with("get /v1/catalog/node/n1 "), "{head}");

    let unknown = fake("200 OK", "X-Consul-Index: 9\r\n", "null").await;
    let r = client(&[&unknown.addr], None)
        .catalog_node_services("nope", QueryOptions::default())
        .await
        .unwrap();
    assert!(r.value.is_empty());
}
