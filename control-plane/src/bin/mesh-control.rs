//! `mesh-control`: parses its config (exit 64 on a bad one), starts the
//! replica, and drains it on SIGTERM/SIGINT, releasing the leader lock.

use std::{process::ExitCode, time::Duration};

use mesh_control_plane::{app::ControlPlane, config::Args};
use mesh_runtime::{config, logging, metrics::Registry, shutdown, telemetry::Telemetry};

/// How long in-flight calls get to finish on shutdown.
const GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    mesh_runtime::install_crypto_provider();
    let config = config::load::<Args>()
        .validate()
        .unwrap_or_else(|e| config::exit_with(&e));
    let telemetry = match Telemetry::init(
        "mesh-control",
        &config.replica,
        config.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(e) => config::exit_with(&e.to_string()),
    };
    logging::init_traced(config.log_format, telemetry.as_ref());
    let replica = match ControlPlane::start(&config, Registry::new()).await {
        Ok(replica) => replica,
        Err(e) => {
            tracing::error!(error = %e, "mesh-control cannot start");
            if let Some(telemetry) = telemetry {
                telemetry.shutdown().await;
            }
            return ExitCode::FAILURE;
        }
    };
    shutdown::signal().await;
    if !replica.shutdown(GRACE).await {
        tracing::warn!(grace = ?GRACE, "shutdown grace period ran out");
    }
    tracing::info!("mesh-control stopped");
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    ExitCode::SUCCESS
}
