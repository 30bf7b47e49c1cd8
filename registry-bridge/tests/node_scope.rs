//! A bridge serves its own node's config only, against a real Consul dev
//! agent: a Discovery stream naming another node (or none) gets the routes
//! it asked for and never a node config, even when Consul KV holds one for
//! the node it names; the own node's stream gets its config and each new
//! version.

use std::time::Duration;

use anyhow::{Context, Result};
use consul_client::{Client, ClientConfig, testing::DevAgent};
use mesh_proto::v1::{
    RouteUpdate, WatchRequest, discovery_client::DiscoveryClient, route_update::Kind,
};
use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::{duration::HumanDuration, metrics::Registry};
use tonic::{Streaming, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(20);

/// A stored config version of `node`, as mesh-control writes it.
fn stored(node: &str, number: u64) -> Vec<u8> {
    serde_json::json!({"node": node, "number": number, "author": "t", "created_at_ms": 1,
        "routes": {}, "rendered": format!("# {node} v{number}\n"), "diff": ""})
    .to_string()
    .into_bytes()
}

async fn watch(
    discovery: &mut DiscoveryClient<Channel>,
    node: &str,
) -> Result<Streaming<RouteUpdate>> {
    let request = WatchRequest {
        node: node.into(),
        services: vec!["web".into()],
    };
    Ok(discovery.watch(request).await?.into_inner())
}

async fn next(stream: &mut Streaming<RouteUpdate>) -> Result<RouteUpdate> {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .context("no update before the deadline")??
        .context("the stream ended")
}

#[tokio::test]
async fn a_stream_naming_another_node_never_gets_a_node_config() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let data = tempfile::tempdir()?;
    let config = Args {
        node: Some("n1".into()),
        consul_addr: vec![agent.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(data.path().to_owned()),
        wait: Some(HumanDuration(Duration::from_secs(5))),
        ..Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    let bridge = Bridge::start(&config, Registry::new()).await?;
    let consul = Client::new(&ClientConfig::new([agent.addr()]))?;
    for node in ["n1", "n2"] {
        let key = format!("mesh/nodes/{node}/routes");
        consul.kv_put(&key, &stored(node, 1), None).await?;
    }
    let mut discovery = DiscoveryClient::connect(format!("http://{}", bridge.grpc_addr())).await?;

    for other in ["n2", "", "N1 "] {
        let mut stream = watch(&mut discovery, other).await?;
        let first = next(&mut stream).await?;
        assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
        assert_eq!(first.config, None, "a stream naming {other:?} got a config");
    }

    let mut own = watch(&mut discovery, "n1").await?;
    let first = next(&mut own).await?;
    let config = first
        .config
        .context("the own node's snapshot has its config")?;
    assert_eq!((config.version, config.text.as_str()), (1, "# n1 v1\n"));

    // A new version of the other node's config, then of the own node's:
    // the own stream carries its own.
    consul
        .kv_put("mesh/nodes/n2/routes", &stored("n2", 2), None)
        .await?;
    consul
        .kv_put("mesh/nodes/n1/routes", &stored("n1", 2), None)
        .await?;
    loop {
        let update = next(&mut own).await?;
        if let Some(config) = update.config {
            assert_eq!((config.version, config.text.as_str()), (2, "# n1 v2\n"));
            break;
        }
    }
    Ok(())
}
