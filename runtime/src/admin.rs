//! The admin listener every long-running binary has: `/live` (the process
//! answers), `/ready` (it can do its job), `/metrics` (Prometheus text).
//! A binary adds its own routes (the proxy's `/routes`) with [`Admin::router`].

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::net::TcpListener;

use crate::{metrics::Registry, shutdown::Shutdown};

/// Readiness flag and metrics registry behind the admin endpoints.
#[derive(Clone, Debug)]
pub struct Admin {
    ready: Arc<AtomicBool>,
    metrics: Registry,
}

impl Admin {
    /// Not ready until [`Admin::set_ready`].
    pub fn new(metrics: Registry) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            metrics,
        }
    }

    /// Marks the process ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// `/live`, `/ready` and `/metrics`, merged with `extra`.
    pub fn router(&self, extra: Router) -> Router {
        Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
            .merge(extra)
    }
}

async fn ready(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(admin): State<Admin>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        admin.metrics.render(),
    )
}

/// Serves `router` on `listener` until `shutdown` is requested.
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: Shutdown) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.requested().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener failed");
    }
}
