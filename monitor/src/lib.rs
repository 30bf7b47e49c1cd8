//! mesh-monitor: probes every instance registered in Consul and every mesh
//! component it is told about (HTTP, TCP, gRPC health), tells apart an
//! instance that is down from one that is hung (alive, accepting
//! connections, never answering) and one that is slow, puts its verdict
//! into Consul as a check on the instance so that routing drops what does
//! not serve, and raises alerts (Consul KV, a webhook, `/metrics`, and
//! `mesh.v1.Monitor`).
//!
//! - [`config`]: flags, environment and TOML into a checked [`Config`].
//! - [`probe`]: one probe and its outcome: up, slow, down, hung, unhealthy.
//! - [`targets`]: what to probe: Consul's instances and the configured
//!   components.
//! - [`verdict`]: from outcomes to a verdict per target, with hysteresis.
//! - [`checks`]: the verdict into Consul, through the instance's node's
//!   mesh-bridge (why: see there).
//! - [`alert`]: the alert model and the book of open alerts (dedup, resolve,
//!   restore).
//! - [`outbox`]: alert changes into Consul KV and to the webhook, in order.
//! - [`webhook`]: the webhook sink.
//! - [`prober`]: the probe loop.
//! - [`logs`]: log files followed through rotation, and rules over their
//!   lines (patterns per window, 5xx rate per service).
//! - [`log_alerts`]: the log rules' events into the alert book.
//! - [`traffic`]: the proxies' `/metrics` through the bridges, baselines
//!   per node, service and signal, and traffic alerts into the alert book.
//! - [`bridges`]: channels to the nodes' bridges (mTLS with `tls_dir`),
//!   and the monitor's own instance in Consul for its identity.
//! - [`grpc`]: `mesh.v1.Monitor`: list and watch alerts, verdicts.
//! - [`metrics`]: the monitor's Prometheus metrics.
//! - [`app`]: the running [`Monitor`]: listeners, tasks, shutdown.

pub mod alert;
pub mod app;
pub mod bridges;
pub mod checks;
pub mod config;
pub mod grpc;
pub mod log_alerts;
pub mod logs;
pub mod metrics;
pub mod outbox;
pub mod probe;
pub mod prober;
pub mod targets;
pub mod traffic;
pub mod verdict;
pub mod webhook;

pub use self::{
    app::{Monitor, StartError},
    config::{Args, Config},
};
