//! mesh-proxy: loads its config (exit 64 with one line when it is bad),
//! starts the proxy, reloads its route policies and reopens its access log
//! on SIGHUP, and drains it on SIGTERM or SIGINT. With `otlp_endpoint` set
//! it exports traces, and sends the last ones on the way out.

use std::process::ExitCode;

use mesh_proxy::{App, Args};
use mesh_runtime::{config, logging, metrics::Registry, shutdown, telemetry::Telemetry};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    mesh_runtime::install_crypto_provider();
    // Kept as given: a reload reads the file again under the same flags.
    let args: Args = config::parse_args();
    let merged = config::merge(args.clone()).unwrap_or_else(|e| config::exit_with(&e.to_string()));
    let config = merged.validate().unwrap_or_else(|e| config::exit_with(&e));
    match mesh_proxy::runtime::build(config.workers) {
        Ok(runtime) => runtime.block_on(run(args, config)),
        // Not the config's fault (exit 64 would keep systemd from trying
        // again): the system refused the threads.
        Err(e) => {
            eprintln!("error: cannot start {} worker threads: {e}", config.workers);
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, config: mesh_proxy::config::Config) -> ExitCode {
    let telemetry =
        match Telemetry::init("mesh-proxy", &config.node, config.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(e) => config::exit_with(&e.to_string()),
        };
    logging::init_traced(config.log_format, telemetry.as_ref());
    let grace = config.drain_grace;
    let app = match App::start(config, Registry::new()).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "mesh-proxy cannot start");
            if let Some(telemetry) = telemetry {
                telemetry.shutdown().await;
            }
            return ExitCode::FAILURE;
        }
    };
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; config reloads are off");
            None
        }
    };
    let stop = shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                // `App::reload` logs the outcome; a bad file keeps the last good.
                let _ = app.reload(&args);
                app.reopen_access_log();
            }
        }
    }
    app.shutdown(grace).await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    ExitCode::SUCCESS
}
