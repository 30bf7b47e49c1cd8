//! mesh-deployer: the agent on each node that receives a service's
//! artifacts (jars) into a versioned store ([`store`]), served over gRPC
//! (`mesh.v1.Deployer`, [`grpc`]).
//!
//! Until mTLS between nodes exists, it listens on 127.0.0.1 only, unless
//! started with `--allow-remote` and a token that every call must carry
//! ([`config`]).
//!
//! - [`config`]: flags, environment and TOML into a checked [`Config`].
//! - [`store`]: the versioned artifact store and resumable uploads.
//! - [`grpc`]: `mesh.v1.Deployer` over the store, the token check, metrics.
//! - [`app`]: the running [`Deployer`]: listeners, tasks, shutdown.

pub mod app;
pub mod config;
pub mod grpc;
pub mod store;
pub mod supervisor;

pub use self::{
    app::{Deployer, StartError},
    config::{Args, Config},
};
