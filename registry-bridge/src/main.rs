//! `mesh-bridge`: parses its config (exit 64 on a bad one), starts the
//! bridge, and drains it on SIGTERM/SIGINT.

use std::{process::ExitCode, time::Duration};

use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::{config, logging, metrics::Registry, shutdown, telemetry::Telemetry};

/// How long in-flight calls and streams get to finish on shutdown.
const GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    mesh_runtime::install_crypto_provider();
    let config = config::load::<Args>()
        .validate()
        .unwrap_or_else(|e| config::exit_with(&e));
    let telemetry =
        match Telemetry::init("mesh-bridge", &config.node, config.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(e) => config::exit_with(&e.to_string()),
        };
    logging::init_traced(config.log_format, telemetry.as_ref());
    let bridge = match Bridge::start(&config, Registry::new()).await {
        Ok(bridge) => bridge,
        Err(e) => {
            tracing::error!(error = %e, "mesh-bridge cannot start");
            if let Some(telemetry) = telemetry {
                telemetry.shutdown().await;
            }
            return ExitCode::FAILURE;
        }
    };
    shutdown::signal().await;
    if !bridge.shutdown(GRACE).await {
        tracing::warn!(grace = ?GRACE, "shutdown grace period ran out");
    }
    tracing::info!("mesh-bridge stopped");
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    ExitCode::SUCCESS
}
