//! mesh-proxy: loads its config (exit 64 with one line when it is bad),
//! starts the proxy, and drains it on SIGTERM or SIGINT.

use std::{process::ExitCode, time::Duration};

use mesh_proxy::{App, Args};
use mesh_runtime::{config, logging, metrics::Registry, shutdown};

/// Time requests in flight get to finish after a stop signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    mesh_runtime::install_crypto_provider();
    let args: Args = config::load();
    let config = args.validate().unwrap_or_else(|e| config::exit_with(&e));
    logging::init(config.log_format);
    let app = match App::start(config, Registry::new()).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "mesh-proxy cannot start");
            return ExitCode::FAILURE;
        }
    };
    shutdown::signal().await;
    app.shutdown(DRAIN_GRACE).await;
    ExitCode::SUCCESS
}
