//! Meshwork's control plane and its command line.
//!
//! `mesh-control` keeps the desired state of the mesh (each node's routes
//! and their immutable config versions) in Consul KV under `mesh/`, writes
//! it with check-and-set so replicas never overwrite each other, elects a
//! leader with a Consul session, renders each node's config for mesh-proxy
//! or nginx, and serves all of it as `mesh.v1.Control` over gRPC and as a
//! JSON REST mirror. `meshctl` is the operator's command line for it, and
//! brings up a whole mesh on one machine for a first look.
//!
//! - [`model`]: routes as written and as validated, config versions, the checks.
//! - [`store`]: the KV layout and the check-and-set transactions.
//! - [`leader`]: the leader lock (a Consul session, renewed, released on shutdown).
//! - [`render`]: a node's config for mesh-proxy (TOML) and nginx (from a template).
//! - [`template`]: the small template language of the nginx template.
//! - [`diff`]: unified diffs between versions.
//! - [`deploy`]: rolling deployments of jars to the nodes' mesh-deployers, and their driver.
//! - [`control`]: the calls, whatever the transport; [`grpc`] and [`rest`] serve them.
//! - [`dashboard`]: the web dashboard on the HTTP listener, live over Server-Sent Events.
//! - [`identity`]: the mesh CA and `mesh.v1.Identity`: certificates for the nodes' CSRs.
//! - [`error`]: what a call fails with, mapped to gRPC and HTTP in one place.
//! - [`metrics`]: mesh-control's Prometheus metrics.
//! - [`config`]: mesh-control's flags, environment and TOML into a checked config.
//! - [`app`]: the running replica: listeners, tasks, shutdown.
//! - [`ctl`]: `meshctl`'s commands that talk to mesh-control.
//! - [`dev`]: `meshctl dev up [--demo]`: Consul, mesh-bridge, mesh-proxy,
//!   mesh-control (and demo services) on one machine; Ctrl-C stops them.
//! - [`demo`]: `meshctl demo serve`: a small HTTP service that registers
//!   itself through the local proxy, as any service on a node would.
//! - [`procs`]: child processes that are stopped in order, and killed when
//!   dropped.

pub mod app;
pub mod config;
pub mod control;
pub mod ctl;
pub mod dashboard;
pub mod demo;
pub mod deploy;
pub mod dev;
pub mod diff;
pub mod error;
pub mod grpc;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod procs;
pub mod render;
pub mod rest;
pub mod rollout;
pub mod store;
pub mod template;
