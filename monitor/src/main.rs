//! `mesh-monitor`: parses its config (exit 64 on a bad one), starts the
//! monitor, and stops it on SIGTERM/SIGINT.

use std::{process::ExitCode, time::Duration};

use mesh_monitor::{Args, Monitor};
use mesh_runtime::{config, logging, metrics::Registry, shutdown, telemetry::Telemetry};

/// How long the tasks get to finish on shutdown.
const GRACE: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    mesh_runtime::install_crypto_provider();
    let config = config::load::<Args>()
        .validate()
        .unwrap_or_else(|e| config::exit_with(&e));
    let telemetry = match Telemetry::init(
        "mesh-monitor",
        &config.node,
        config.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(e) => config::exit_with(&e.to_string()),
    };
    logging::init_traced(config.log_format, telemetry.as_ref());
    let monitor = match Monitor::start(&config, Registry::new()).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "mesh-monitor cannot start");
            if let Some(telemetry) = telemetry {
                telemetry.shutdown().await;
            }
            return ExitCode::FAILURE;
        }
    };
    shutdown::signal().await;
    if !monitor.shutdown(GRACE).await {
        tracing::warn!(grace = ?GRACE, "shutdown grace period ran out");
    }
    tracing::info!("mesh-monitor stopped");
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    ExitCode::SUCCESS
}
