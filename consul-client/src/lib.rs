//! A thin typed client for the parts of Consul's HTTP API that Meshwork
//! uses: blocking health and catalog queries, the agent's service and check API,
//! the leader status, KV with check-and-set, and sessions.
//!
//! Why our own: the design card named `consulrs`, which was tried against a
//! real Consul 1.8.7 and is not fit to build on. It had one release (2021),
//! has no `/v1/health/service/{name}?passing`, its client-certificate TLS is
//! broken, and it pulls in OpenSSL plus a second HTTP stack (see
//! `DEPENDENCIES.md`). This crate is a few hundred lines on the workspace's
//! own reqwest + rustls, and every call is one we understand.
//!
//! - [`config`]: the client's [`ClientConfig`] (agent addresses, ACL token, TLS files)
//!   and the rustls setup built from it.
//! - [`client`]: the [`Client`], which sends every call to the current agent
//!   address, fails over to the next one on a connect error, and exposes
//!   the typed calls (agent, health, catalog, status, KV and KV
//!   transactions, sessions).
//! - [`query`]: the [`QueryOptions`] for blocking queries and [`QueryResult`],
//!   the value with Consul's `X-Consul-*` metadata.
//! - [`model`]: the JSON shapes Consul sends and accepts.
//! - [`error`]: the [`Error`] of a call: unreachable (retry), Consul's refusal (status),
//!   or an answer that does not decode.
//! - `testing` (feature `test-support`): a real Consul dev agent on free
//!   ports for integration tests, killed on drop.

pub mod client;
pub mod config;
pub mod error;
pub mod model;
pub mod query;
#[cfg(feature = "test-support")]
pub mod testing;

pub use client::Client;
pub use config::{ClientConfig, ConfigError, TlsFiles};
pub use error::Error;
pub use model::{
    AgentCheckRegistration, AgentService, AgentServiceCheck, AgentServiceRegistration, HealthCheck,
    KvPair, KvTxnOp, KvTxnOutcome, Node, ServiceEntry, SessionRequest,
};
pub use query::{QueryOptions, QueryResult};
