//! `mesh.v1.Checks` through a started bridge against a real Consul dev
//! agent: a check set on an instance of the agent shows in Consul's health
//! (and routing) at once, stays when the instance is registered again, and
//! comes back after the instance was deregistered and registered anew.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use consul_client::{
    AgentServiceRegistration, Client, ClientConfig, QueryOptions, testing::DevAgent,
};
use mesh_proto::v1::{SetCheckRequest, checks_client::ChecksClient};
use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::metrics::Registry;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(10);

fn set(status: &str, output: &str) -> SetCheckRequest {
    SetCheckRequest {
        service_id: "web-1".into(),
        status: status.into(),
        output: output.into(),
        ..Default::default()
    }
}

async fn register(consul: &Client) -> Result<()> {
    consul
        .agent_service_register(&AgentServiceRegistration {
            id: Some("web-1".into()),
            name: "web".into(),
            port: Some(8080),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// The monitor check's status and output on `web-1`, as health reads show it.
async fn check(consul: &Client) -> Result<Option<(String, String)>> {
    let entries = consul
        .health_service("web", false, QueryOptions::default())
        .await?;
    Ok(entries
        .value
        .iter()
        .flat_map(|e| &e.checks)
        .find(|c| c.check_id == "mesh-monitor:web-1")
        .map(|c| (c.status.clone(), c.output.clone())))
}

async fn until(consul: &Client, want: Option<(&str, &str)>) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = check(consul).await?;
        let matches = match (&got, want) {
            (Some((s, o)), Some((ws, wo))) => s == ws && o == wo,
            (None, None) => true,
            _ => false,
        };
        if matches {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the check is {got:?}, expected {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_check_set_through_the_bridge_reaches_consul_and_routing() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let data = tempfile::tempdir()?;
    let config = Args {
        node: Some("test-node".into()),
        consul_addr: vec![agent.addr()],
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(data.path().to_owned()),
        ..Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    let bridge = Bridge::start(&config, Registry::new()).await?;
    let mut checks = ChecksClient::connect(format!("http://{}", bridge.grpc_addr())).await?;
    let consul = Client::new(&ClientConfig::new([agent.addr()]))?;

    let e = checks.set_check(set("critical", "hung")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("web-1"), "{e:?}");
    let e = checks.set_check(set("broken", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    register(&consul).await?;
    checks.set_check(set("critical", "hung")).await?;
    until(&consul, Some(("critical", "hung"))).await?;
    let routable = consul
        .health_service("web", true, QueryOptions::default())
        .await?;
    assert!(
        routable.value.is_empty(),
        "a critical instance is not routable"
    );
    checks.set_check(set("warning", "slow")).await?;
    until(&consul, Some(("warning", "slow"))).await?;
    checks.set_check(set("passing", "up")).await?;
    until(&consul, Some(("passing", "up"))).await?;
    let routable = consul
        .health_service("web", true, QueryOptions::default())
        .await?;
    assert_eq!(routable.value.len(), 1);

    // Registering the instance again keeps the check; deregistering it
    // drops it, and the next call after a new registration puts it back.
    register(&consul).await?;
    until(&consul, Some(("passing", "up"))).await?;
    consul.agent_service_deregister("web-1").await?;
    register(&consul).await?;
    until(&consul, None).await?;
    checks.set_check(set("critical", "down")).await?;
    until(&consul, Some(("critical", "down"))).await?;
    bridge.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
