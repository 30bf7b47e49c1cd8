//! mesh-control calling a node's mesh-deployer over mTLS, against a real
//! Consul dev agent and a real deployer started with `tls_dir`: with
//! `deployer_mtls`, mesh-control issues itself `svc/mesh-control` from the
//! mesh CA and the deployer answers it; without, the deployer gives it no
//! answer.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use consul_client::{Client, ClientConfig, QueryOptions, testing::DevAgent};
use mesh_control_plane::app::ControlPlane;
use mesh_runtime::{
    metrics::Registry,
    pki::{Ca, LocalKey, SpiffeId, TrustDomain},
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);
const IDENTITY_TOKEN: &str = "identity-token-0123456789";

fn td() -> TrustDomain {
    TrustDomain::new("meshwork.test").expect("a valid trust domain")
}

/// A deployer for `node` on a free port, with `tls_dir` from `ca`.
async fn deployer(ca: &Ca, node: &str, dir: &std::path::Path) -> Result<mesh_deployer::Deployer> {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    let id = SpiffeId::node(&td(), node)?;
    let key = LocalKey::generate()?;
    let cert = ca.sign(&key.csr_pem(&id)?, &id, Duration::from_secs(3600))?;
    std::fs::write(tls.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(tls.join("node.key"), key.to_pem())?;
    std::fs::write(tls.join("node.crt"), cert)?;
    let config = mesh_deployer::Args {
        node: Some(node.into()),
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(dir.join("data")),
        tls_dir: Some(tls),
        trust_domain: Some("meshwork.test".into()),
        ..mesh_deployer::Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    Ok(mesh_deployer::Deployer::start(&config, Registry::new()).await?)
}

/// A replica reaching deployers on `deployer_port`, issuing with the
/// operator CA in `dir`; `extra` flags added.
async fn replica(
    agent: &DevAgent,
    dir: &std::path::Path,
    deployer_port: u16,
    extra: &[&str],
) -> Result<ControlPlane> {
    let (port, ca_cert, ca_key) = (
        deployer_port.to_string(),
        dir.join("ca.crt").display().to_string(),
        dir.join("ca.key").display().to_string(),
    );
    let mut flags = vec![
        "--deployer-port",
        &port,
        "--trust-domain",
        "meshwork.test",
        "--ca-cert-file",
        &ca_cert,
        "--ca-key-file",
        &ca_key,
        "--identity-token",
        IDENTITY_TOKEN,
    ];
    flags.extend_from_slice(extra);
    support::replica(agent, "c1", &flags, Registry::new()).await
}

/// `/v1/deployers`' entry for `node`, once it names its deployer.
async fn deployer_view(plane: &ControlPlane, node: &str) -> Result<Value> {
    let start = Instant::now();
    loop {
        let url = format!("http://{}/v1/deployers", plane.http_addr());
        let answer: Result<Value> = async { Ok(reqwest::get(&url).await?.json().await?) }.await;
        let entry = answer.ok().and_then(|nodes| {
            nodes
                .as_array()?
                .iter()
                .find(|n| n["node"] == node && n["deployer"] != "")
                .cloned()
        });
        match entry {
            Some(entry) => return Ok(entry),
            None if start.elapsed() > DEADLINE => anyhow::bail!("no answer for {node}"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn mesh_control_calls_a_tls_deployer_with_its_own_identity() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let consul = Client::new(&ClientConfig::new([agent.addr()]))?;
    let node = consul
        .catalog_nodes(QueryOptions::default())
        .await?
        .value
        .first()
        .context("the agent's node")?
        .node
        .clone();
    let dir = tempfile::tempdir()?;
    let ca = Ca::self_signed(td(), Duration::from_secs(24 * 3600))?;
    let stored = ca.to_stored();
    std::fs::write(dir.path().join("ca.crt"), &stored.cert_pem)?;
    std::fs::write(dir.path().join("ca.key"), &stored.key_pem)?;
    let deployer = deployer(&ca, &node, dir.path()).await?;
    let port = deployer.grpc_addr().port();

    let mtls = replica(&agent, dir.path(), port, &["--deployer-mtls"]).await?;
    let view = deployer_view(&mtls, &node).await?;
    assert_eq!(view["error"].as_str().unwrap_or_default(), "", "{view}");
    assert!(view["instances"].is_array(), "{view}");

    let plain = replica(&agent, dir.path(), port, &[]).await?;
    let view = deployer_view(&plain, &node).await?;
    assert_ne!(view["error"].as_str().unwrap_or_default(), "", "{view}");
    Ok(())
}
