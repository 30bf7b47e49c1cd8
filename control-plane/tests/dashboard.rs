//! The dashboard's event stream against a real Consul dev agent: the first
//! `state` event carries the catalog's node and services, and a route
//! change, a new service and a failing check are each pushed to an open
//! stream, within a deadline, without asking again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use consul_client::{
    AgentServiceCheck, AgentServiceRegistration, Client, ClientConfig, QueryOptions,
    testing::{DevAgent, free_port},
};
use mesh_control_plane::{app::ControlPlane, config::Args};
use mesh_runtime::metrics::Registry;
use serde_json::{Value, json};

/// How long a change may take to reach an open stream (health checks are
/// read again every 2 s; the rest wakes a blocking query at once).
const DEADLINE: Duration = Duration::from_secs(30);

/// An open `GET /v1/events`, read event by event.
struct Events {
    response: reqwest::Response,
    buf: String,
}

impl Events {
    async fn open(base: &str) -> Result<Self> {
        let response = reqwest::get(format!("{base}/v1/events")).await?;
        let content_type = response.headers()["content-type"].to_str()?.to_owned();
        if content_type != "text/event-stream" {
            bail!("/v1/events answered {content_type}");
        }
        Ok(Self {
            response,
            buf: String::new(),
        })
    }

    /// The next `state` event's JSON.
    async fn next(&mut self) -> Result<Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue; // a keep-alive comment
                };
                if !event.contains("event: state") {
                    bail!("not a state event: {event}");
                }
                return Ok(serde_json::from_str(data)?);
            }
            let chunk = self
                .response
                .chunk()
                .await?
                .context("the event stream ended")?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads events until one satisfies `want`, before [`DEADLINE`].
    async fn until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Result<Value> {
        let start = Instant::now();
        let mut last = Value::Null;
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.next()).await {
                Ok(state) => {
                    let state = state?;
                    if want(&state) {
                        return Ok(state);
                    }
                    last = state;
                }
                Err(_) => bail!("{what}: not pushed within {DEADLINE:?}; last state: {last}"),
            }
        }
    }
}

fn service(state: &Value, name: &str) -> Option<Value> {
    state["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
}

#[tokio::test]
async fn the_event_stream_pushes_routes_services_and_health_as_they_change() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let consul = Client::new(&ClientConfig::new([agent.addr()]))?;
    let argv = [
        "mesh-control",
        "--replica",
        "c1",
        "--consul-addr",
        &agent.addr(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--bridge-port",
        &free_port().to_string(),
    ];
    let config = <Args as clap::Parser>::try_parse_from(argv)?
        .validate()
        .map_err(anyhow::Error::msg)?;
    let plane = ControlPlane::start(&config, Registry::new()).await?;
    let base = format!("http://{}", plane.http_addr());
    let register = |name: &str, port: u16| AgentServiceRegistration {
        id: Some(format!("{name}-1")),
        name: name.into(),
        address: Some("127.0.0.1".into()),
        port: Some(port),
        tags: vec!["<b>v1</b>".into()],
        check: Some(AgentServiceCheck {
            ttl: Some("10m".into()),
            status: Some("passing".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    consul
        .agent_service_register(&register("orders", 9001))
        .await?;
    let node = consul.catalog_nodes(QueryOptions::default()).await?.value[0]
        .node
        .clone();

    let mut events = Events::open(&base).await?;
    let first = events
        .until("the node and orders", |s| service(s, "orders").is_some())
        .await?;
    assert_eq!(first["nodes"][0]["name"], node.as_str());
    assert_eq!(first["nodes"][0]["agent"], "passing");
    assert_eq!(first["nodes"][0]["routes_version"], 0);
    assert_eq!(first["nodes"][0]["proxy"]["state"], "unknown");
    assert_eq!(first["status"]["replica"], "c1");
    assert_eq!(first["rollouts"], json!([]));
    let orders = service(&first, "orders").context("orders")?;
    assert_eq!(orders["tags"], json!(["<b>v1</b>"]));
    assert_eq!(orders["instances"][0]["health"], "passing");

    // Routes set through the REST API: version 1 with its routes.
    let http = reqwest::Client::new();
    let answer = http
        .put(format!("{base}/v1/nodes/{node}/routes"))
        .json(&json!({"routes": {"orders": {"timeout": "2s"}}, "expected_revision": 0, "author": "alice"}))
        .send()
        .await?;
    assert_eq!(answer.status(), 200, "{}", answer.text().await?);
    let state = events
        .until("version 1", |s| s["routes"][&node]["version"] == 1)
        .await?;
    let history = &state["routes"][&node];
    assert_eq!(history["routes"]["orders"]["timeout"], "2s");
    assert_eq!(history["versions"][0]["author"], "alice");
    assert_eq!(history["versions_total"], 1);
    assert_eq!(state["nodes"][0]["routes_version"], 1);

    // A new service.
    consul
        .agent_service_register(&register("users", 9002))
        .await?;
    events
        .until("users", |s| service(s, "users").is_some())
        .await?;

    // A failing check (no catalog index moves): pushed by the refresh.
    let fail = http
        .put(format!(
            "{}/v1/agent/check/fail/service:orders-1",
            agent.addr()
        ))
        .send()
        .await?;
    assert_eq!(fail.status(), 200, "{}", fail.text().await?);
    events
        .until("orders critical", |s| {
            service(s, "orders").is_some_and(|o| o["instances"][0]["health"] == "critical")
        })
        .await?;

    assert!(
        plane.shutdown(Duration::from_secs(10)).await,
        "drained in time, streams included"
    );
    Ok(())
}
