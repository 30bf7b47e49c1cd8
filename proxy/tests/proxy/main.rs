//! The proxy on real sockets (port 0): a fake bridge (tonic, in process),
//! test upstreams, and the proxy's outbound and admin listeners.

// Helpers are `pub` for the test modules; this crate exports nothing.
#![allow(unreachable_pub, clippy::unwrap_used)]

mod access_log;
mod admin;
mod agent;
mod drain;
mod dump;
mod hardening;
mod hygiene;
mod intentions;
mod mtls;
mod node_config;
mod peers;
mod protocols;
mod reload;
mod resilience;
mod routing;
mod support;
mod upgrade;
mod upstreams;
