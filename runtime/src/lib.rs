//! What every Meshwork binary shares, so each `main` stays thin.
//!
//! - [`config`]: one typed config from a TOML file, flags and `MESH_*`
//!   environment variables; a bad key or value is one line and exit 64.
//! - [`logging`]: the `tracing` subscriber (text or JSON), installed by binaries only.
//! - [`admin`]: `/live`, `/ready` and `/metrics` on an admin listener.
//! - [`metrics`]: a Prometheus registry passed down to whoever records.
//! - [`fs`]: atomic file writes (temp file, fsync, rename, fsync folder).
//! - [`intentions`]: which service may call which: the decision every component makes alike.
//! - [`queue`]: a durable on-disk FIFO for work that must not be lost.
//! - [`backoff`]: jittered exponential backoff for every retry loop.
//! - [`duration`]: human durations (`250ms`, `2s`, `1m`) for config values.
//! - [`shutdown`]: SIGTERM/SIGINT as a future, and a drain signal for tasks.
//! - [`telemetry`]: OpenTelemetry traces, exported over OTLP when an endpoint is set.
//! - [`pki`]: mesh identity: SPIFFE IDs, the mesh CA, CSRs, mTLS configs.

pub mod admin;
pub mod artifact;
pub mod backoff;
pub mod config;
pub mod duration;
pub mod fs;
pub mod intentions;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod queue;
pub mod shutdown;
pub mod telemetry;

/// Installs rustls' ring crypto provider for the process. Call it first
/// thing in every `main` (and once in tests): TLS clients built without a
/// provider panic. Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
