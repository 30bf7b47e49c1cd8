//! The mesh's intentions on the Discovery streams of the bridge's own
//! node, against a real Consul dev agent: in the snapshot, a change within
//! a second, a malformed entry changing nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use consul_client::{Client, ClientConfig, testing::DevAgent};
use mesh_proto::v1::{
    RouteUpdate, WatchRequest, discovery_client::DiscoveryClient, route_update::Kind,
};
use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::{
    duration::HumanDuration,
    intentions::{Action, Intentions},
    metrics::Registry,
};
use serde_json::json;
use tonic::{Streaming, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(20);

/// A dev agent and a bridge on it for node `test-node`.
struct Harness {
    consul: DevAgent,
    _bridge: Bridge,
    discovery: DiscoveryClient<Channel>,
    _data: tempfile::TempDir,
}

impl Harness {
    async fn start(default_intention: Option<Action>) -> Result<Self> {
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
            default_intention,
            ..Args::default()
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        let bridge = Bridge::start(&config, Registry::new()).await?;
        let url = format!("http://{}", bridge.grpc_addr());
        Ok(Self {
            discovery: DiscoveryClient::connect(url).await?,
            consul,
            _bridge: bridge,
            _data: data,
        })
    }

    async fn watch(&mut self, node: &str) -> Result<Streaming<RouteUpdate>> {
        let req = WatchRequest {
            node: node.into(),
            services: vec!["web".into()],
        };
        Ok(self.discovery.watch(req).await?.into_inner())
    }

    fn consul(&self) -> Client {
        Client::new(&ClientConfig::new([self.consul.addr()])).expect("a dev agent address is valid")
    }
}

async fn next(stream: &mut Streaming<RouteUpdate>) -> Result<RouteUpdate> {
    let msg = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .context("no update before the deadline")??;
    msg.context("stream ended")
}

/// The intentions of the next message that carries some, and its revision.
async fn next_intentions(stream: &mut Streaming<RouteUpdate>) -> Result<(Intentions, u64)> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Some(carried) = next(stream).await?.intentions {
            let set = serde_json::from_str(&carried.json)
                .with_context(|| format!("intentions that do not read: {}", carried.json))?;
            return Ok((set, carried.revision));
        }
    }
    bail!("no intentions within {DEADLINE:?}")
}

fn intention(source: &str, destination: &str, action: &str) -> Vec<u8> {
    json!({"source": source, "destination": destination, "action": action})
        .to_string()
        .into_bytes()
}

fn pairs(set: &Intentions) -> Vec<String> {
    set.list()
        .iter()
        .map(|i| format!("{} -> {} {}", i.source, i.destination, i.action))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intentions_ride_the_node_s_stream_and_a_change_arrives_within_a_second() {
    let mut h = Harness::start(None).await.unwrap();
    let consul = h.consul();
    consul
        .kv_put(
            "mesh/intentions/web/orders",
            &intention("web", "orders", "allow"),
            None,
        )
        .await
        .unwrap();
    let mut stream = h.watch("test-node").await.unwrap();
    let first = next(&mut stream).await.unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    let carried = first
        .intentions
        .expect("the snapshot carries the intentions");
    let set: Intentions = serde_json::from_str(&carried.json).unwrap();
    assert_eq!(pairs(&set), ["web -> orders allow"]);
    // mesh/intentions-default is not set: the bridge's default, deny.
    assert_eq!(set.default_action(), Action::Deny);
    assert!(carried.revision > 0, "{carried:?}");

    // A change is on the stream within a second, with a later revision.
    let put = Instant::now();
    consul
        .kv_put(
            "mesh/intentions/*/orders",
            &intention("*", "orders", "deny"),
            None,
        )
        .await
        .unwrap();
    let (set, revision) = next_intentions(&mut stream).await.unwrap();
    assert!(
        put.elapsed() < Duration::from_secs(1),
        "{:?}",
        put.elapsed()
    );
    assert_eq!(pairs(&set), ["* -> orders deny", "web -> orders allow"]);
    assert!(
        revision > carried.revision,
        "{revision} after {}",
        carried.revision
    );

    // The stored default wins; a deletion is a change too.
    consul
        .kv_put("mesh/intentions-default", b"allow", None)
        .await
        .unwrap();
    let (set, _) = next_intentions(&mut stream).await.unwrap();
    assert_eq!(set.default_action(), Action::Allow);
    consul
        .kv_delete("mesh/intentions/web/orders", None)
        .await
        .unwrap();
    let (set, _) = next_intentions(&mut stream).await.unwrap();
    assert_eq!(pairs(&set), ["* -> orders deny"]);

    // Another node's stream gets none: a bridge serves its own node.
    let mut other = h.watch("elsewhere").await.unwrap();
    assert_eq!(next(&mut other).await.unwrap().intentions, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_keeps_the_last_good_set_until_it_is_fixed() {
    let mut h = Harness::start(Some(Action::Allow)).await.unwrap();
    let consul = h.consul();
    consul
        .kv_put(
            "mesh/intentions/api/orders",
            &intention("api", "orders", "deny"),
            None,
        )
        .await
        .unwrap();
    let mut stream = h.watch("test-node").await.unwrap();
    let first = next(&mut stream).await.unwrap();
    let carried = first
        .intentions
        .expect("the snapshot carries the intentions");
    let set: Intentions = serde_json::from_str(&carried.json).unwrap();
    // No stored default: the bridge's configured one.
    assert_eq!(set.default_action(), Action::Allow);
    assert_eq!(pairs(&set), ["api -> orders deny"]);

    // Dropping the bad entry alone could open what it meant to close: the
    // whole read is refused, and the proxies keep enforcing the last set.
    consul
        .kv_put("mesh/intentions/web/orders", b"{\"source\": \"web\"", None)
        .await
        .unwrap();
    consul
        .kv_delete("mesh/intentions/api/orders", None)
        .await
        .unwrap();
    let quiet =
        tokio::time::timeout(Duration::from_millis(1500), next_intentions(&mut stream)).await;
    assert!(
        quiet.is_err(),
        "no set while an entry is malformed: {quiet:?}"
    );

    // Fixed: the set as it now is.
    consul
        .kv_put(
            "mesh/intentions/web/orders",
            &intention("web", "orders", "deny"),
            None,
        )
        .await
        .unwrap();
    let (set, _) = next_intentions(&mut stream).await.unwrap();
    assert_eq!(pairs(&set), ["web -> orders deny"]);
}
