//! The e2e harness: the real Meshwork binaries on a real 3-server Consul
//! cluster, every host (Consul servers, nodes) in its own network namespace
//! on a private network, so each node has its own address and its own
//! `127.0.0.1:8888`. The scenarios live in `tests/`.
//!
//! **Requirements.** The tests need root (they create network namespaces,
//! veth pairs and a bridge with `ip`; the root namespace's network is never
//! touched) and the workspace's binaries built next to the test executable
//! (`cargo build --workspace --bins`, or `MESH_BIN_DIR`). Consul comes from
//! `MESH_CONSUL_BIN`, `PATH`, `~/.local/share/meshwork/bin/consul` (run
//! `deploy/scripts/install-consul.sh`), or `/tmp/mw-consul-test/bin/consul`;
//! a missing Consul fails the tests with that advice, never skips them.
//!
//! **Cleanup.** A [`Mesh`] owns every process, namespace and file it makes;
//! dropping it (also when a test panics) stops and removes them all, and a
//! test that did not reach [`Mesh::finish`] prints the tail of every log.
//! Namespaces and files left by a killed run (their pid is gone) are removed
//! when the next run starts. Each test's files (logs, data dirs) live in
//! `/dev/shm/mwe-<pid>-<n>` (the temp dir where there is no `/dev/shm`);
//! `MESH_E2E_KEEP=1` keeps them until the next run.
//!
//! **Use.** `Mesh::start(MeshOptions::nodes(2))` brings up the cluster and
//! the nodes; `mesh.nodes[0].serve("svc", "svc-1")` starts a test service
//! that registers itself through node 1's proxy (`serve_grpc_echo` for
//! a gRPC one, [`echo::channel`] to call it); `node.get("/svc/")`,
//! `node.register(..)`, `node.routes()`, `node.proxy.kill()`,
//! `mesh.kill_leader()`, [`Load::start`] and [`eventually`] do the rest.
//! `MeshOptions::nodes(2).with_acl(&[("n1", &["svc"])])` runs the cluster
//! with ACLs (default deny) and gives every component its own
//! least-privilege token ([`acl`]); the harness's own calls to Consul then
//! carry the management token. `MeshOptions::nodes(2).with_mtls(None)`
//! turns on mesh identities ([`mesh::Mtls`]): mesh-control on `n1` is the
//! CA, each bridge keeps its node's certificates, and the proxies reach
//! other nodes through their inbound listeners over mutual TLS.
//!
//! Modules:
//! - [`acl`]: Consul ACLs (default deny) and a least-privilege policy and token per component.
//! - [`ansible`]: hosts for playbooks: sshd and a Consul dev agent per namespace, `ansible-playbook` from a controller namespace.
//! - [`bins`]: where Consul, promtool and the workspace's binaries are.
//! - [`compose`]: the compose dev mesh of `deploy/compose`: base images, the Meshwork image, a project of the test's own.
//! - [`browser`]: headless Chromium in a node's namespace over DevTools; screenshots per test.
//! - [`deployer`]: mesh-deployer on a node (token, kill, restart), gRPC clients of it and of mesh-control.
//! - [`java`]: real jars of a tiny Java HTTP service (javac, jar), one per variant.
//! - [`forge`]: certificates and TLS clients of someone who reached a node (the mesh CA's or another's, any SANs, expired).
//! - [`echo`]: the gRPC echo test service (`grpc-echo` binary) and a client through a proxy.
//! - [`netns`]: namespaces, the private network, sockets opened inside a namespace, stale cleanup.
//! - [`prometheus`]: Debian's Prometheus with the shipped config in a node's namespace; its HTTP API.
//! - [`process`]: a process in a namespace, logged to a file; stop, kill, pause, restart.
//! - [`http`]: an HTTP/1.1 keep-alive client (hyper) and raw exchanges over namespaced sockets.
//! - [`mesh`]: a whole mesh per test (Consul cluster + nodes); owns and removes everything.
//! - [`monitor`]: mesh-monitor in a node's namespace (options, restart), its alerts, verdicts and metrics.
//! - [`nginx`]: a node that serves with nginx (node metadata, Debian's nginx in a prefix folder).
//! - [`node`]: one node: Consul agent, mesh-bridge, mesh-proxy, test services.
//! - [`load`]: a load generator through a proxy, recording every outcome.
//! - [`otlp`]: an OTLP/gRPC trace receiver in a node's namespace, keeping every span it is sent.
//! - [`fault`]: a TCP fault proxy in a namespace: added latency, hang, reset.
//! - [`wait`]: `eventually`, assertions polled until a deadline.
//! - [`webhook`]: a webhook receiver in a node's namespace, keeping what it was sent.

pub mod acl;
pub mod ansible;
pub mod bins;
pub mod browser;
pub mod compose;
pub mod control;
pub mod deployer;
pub mod echo;
pub mod fault;
pub mod forge;
pub mod http;
pub mod java;
pub mod load;
pub mod mesh;
pub mod monitor;
pub mod netns;
pub mod nginx;
pub mod node;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod wait;
pub mod webhook;
pub mod ws;

pub use crate::{
    http::{HttpClient, Response},
    load::{Load, LoadOptions, LoadReport},
    mesh::{Mesh, MeshOptions},
    node::Node,
    wait::eventually,
};
