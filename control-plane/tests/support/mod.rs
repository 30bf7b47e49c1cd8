//! What the control plane's integration tests share: a replica started
//! in process against a Consul test agent.

use anyhow::Result;
use consul_client::testing::{DevAgent, free_port};
use mesh_control_plane::{app::ControlPlane, config::Args};
use mesh_runtime::metrics::Registry;

/// Starts replica `name` against `agent`: gRPC and HTTP on free loopback
/// ports, a bridge port nobody listens on, and the `extra` flags. Fails
/// when the flags do not parse or validate, or the replica cannot start.
/// Its metrics go to `registry`.
pub(crate) async fn replica(
    agent: &DevAgent,
    name: &str,
    extra: &[&str],
    registry: Registry,
) -> Result<ControlPlane> {
    mesh_runtime::install_crypto_provider();
    let mut argv = vec![
        "mesh-control".to_owned(),
        "--replica".into(),
        name.into(),
        "--consul-addr".into(),
        agent.addr(),
        "--grpc-listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--bridge-port".into(),
        free_port().to_string(),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let config = <Args as clap::Parser>::try_parse_from(argv)?
        .validate()
        .map_err(anyhow::Error::msg)?;
    Ok(ControlPlane::start(&config, registry).await?)
}
