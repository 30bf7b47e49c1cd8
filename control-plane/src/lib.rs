//! `meshctl`, the operator's command line. For now it brings up a whole
//! mesh on one machine for a first look, and runs the demo service.
//!
//! - [`dev`]: `meshctl dev up [--demo]`: a Consul agent (installed when
//!   missing), mesh-bridge and mesh-proxy, and with `--demo` two demo
//!   services; prints every address; Ctrl-C stops what it started.
//! - [`demo`]: `meshctl demo serve`: a small HTTP service that registers
//!   itself through the local proxy, as any service on a node would.
//! - [`procs`]: child processes that are stopped in order, and killed when
//!   dropped.

pub mod demo;
pub mod dev;
pub mod procs;
