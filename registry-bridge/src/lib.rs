//! mesh-bridge, the upsync of Meshwork: it watches Consul with blocking
//! queries and streams each node's proxy the healthy endpoints of the
//! services it calls (`mesh.v1.Discovery`), and carries the proxy's
//! registrations to the node's Consul agent, keeping them in a durable
//! queue while the agent is unreachable (`mesh.v1.Registry`). For
//! mesh-control it reads the node's proxy's health and traffic totals from
//! the proxy's admin `/stats` (`Registry.ProxyStats`, `--proxy-admin`).
//! For mesh-monitor it sets checks on the instances of its node's agent
//! (`mesh.v1.Checks`), so that a verdict reaches the agent that owns the
//! instance. For the node's proxy it keeps the mesh certificates of the
//! node and of every service on it (`tls_dir`), signed by mesh-control from
//! CSRs of keys generated here.
//!
//! - [`config`]: flags, environment and TOML into a checked [`Config`].
//! - [`watch`]: one shared blocking-query loop per watched service, and
//!   one on the catalog; untrusted answers never shrink a set.
//! - [`discovery`]: the Watch streams (snapshot, then deltas), all fed from
//!   one shared change log.
//! - [`registry`]: Register/Deregister/ListInstances and the durable queue,
//!   ReportStatus, ProxyStats from the node's proxy's `/stats`, and the
//!   Checks service.
//! - [`identity`]: the node's mesh certificates (node and services), kept
//!   in the TLS folder the proxy reads, renewed at two thirds of their life.
//! - [`metrics`]: the bridge's Prometheus metrics.
//! - [`app`]: the running [`Bridge`]: listeners, tasks, shutdown.

pub mod app;
pub mod config;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod registry;
pub mod watch;

pub use app::{Bridge, StartError};
pub use config::{Args, Config};
