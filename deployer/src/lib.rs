//! mesh-deployer: the agent on each node that receives a service's
//! artifacts (jars) into a versioned store ([`store`]), runs them under
//! supervision ([`supervisor`]) and replaces a running version blue-green
//! ([`deploy`]), served over gRPC (`mesh.v1.Deployer`, [`grpc`]).
//!
//! It listens on 127.0.0.1 only, unless started with `--allow-remote` and
//! a way to authenticate every call: the node's mesh credentials
//! (`tls_dir`, mTLS, only mesh-control may change anything, [`tls`]), a
//! token every call must carry, or both ([`config`]).
//!
//! - [`config`]: flags, environment and TOML into a checked [`Config`].
//! - [`store`]: the versioned artifact store and resumable uploads.
//! - [`supervisor`]: the processes of the node: start, stop, restart, logs,
//!   adoption after a restart.
//! - [`deploy`]: blue-green deploys, rollback and stop of a service, through
//!   the local proxy's agent API; settling at start-up a deploy the last
//!   deployer died in.
//! - [`apply`]: config files of a web server the node still runs (nginx):
//!   write, validate, reload, verify, or put the previous file back.
//! - [`grpc`]: `mesh.v1.Deployer` over the store and the deploys, the token
//!   check, metrics.
//! - [`tls`]: mTLS on the gRPC listener and who may call which method.
//! - [`app`]: the running [`Deployer`]: listeners, tasks, shutdown.

pub mod app;
pub mod apply;
pub mod config;
pub mod deploy;
pub mod grpc;
pub mod store;
pub mod supervisor;
pub mod tls;

pub use self::{
    app::{Deployer, StartError},
    config::{Args, Config},
};
