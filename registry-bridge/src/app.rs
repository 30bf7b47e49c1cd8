//! The running bridge: builds everything from a [`Config`], binds the
//! listeners, owns the tasks, and drains them on shutdown.

use std::{io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use consul_client::{Client, ConfigError};
use mesh_proto::v1::{checks_server::ChecksServer, registry_server::RegistryServer};
use mesh_runtime::{
    admin::{self, Admin},
    metrics::Registry,
    pki::{
        SpiffeId,
        grpc::{Authorize, CallPolicy, NODE_CERT, NODE_KEY, Plaintext, ServerTls},
    },
    shutdown::{self, Shutdown, Trigger},
};
use tokio::{net::TcpListener, task::JoinSet};
use tonic::server::NamedService;
use tonic::transport::Server;
use tracing::Instrument;

use crate::{
    config::Config,
    discovery::DiscoveryApi,
    identity::Keeper,
    metrics::BridgeMetrics,
    registry::RegistryApi,
    watch::{Reads, Watches},
};

/// Keepalive pings on gRPC connections, so a proxy that vanished without a
/// FIN releases its watches.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(30);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A started bridge.
#[derive(Debug)]
pub struct Bridge {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    watches: Watches,
    trigger: Trigger,
    tasks: JoinSet<()>,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Consul client could not be built.
    #[error(transparent)]
    Consul(#[from] ConfigError),
    /// The registration queue could not be opened.
    #[error("registration queue {path}: {source}")]
    Queue {
        /// The queue folder.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The TLS folder could not be set up.
    #[error("tls_dir {path}: {source}")]
    Identity {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
}

// === impl Bridge ===

impl Bridge {
    /// Opens the queue, binds the gRPC and admin listeners and starts
    /// serving; metrics go to `registry`.
    pub async fn start(config: &Config, registry: Registry) -> Result<Self, StartError> {
        let metrics = BridgeMetrics::new(&registry);
        let consul = Client::new(&config.consul)?;
        let registry_api = open_registry(config, consul.clone(), &metrics)?;
        let grpc = bind(config.grpc_listen, "gRPC").await?;
        let admin_listener = bind(config.admin_listen, "admin").await?;
        let (grpc_addr, admin_addr) = (local_addr(&grpc)?, local_addr(&admin_listener)?);

        let (trigger, shutdown) = shutdown::channel();
        let reads = Reads {
            wait: config.wait,
            stale: config.stale_reads,
        };
        let keeper = match &config.identity {
            Some(identity) => Some(
                Keeper::new(
                    identity,
                    &config.node,
                    consul.clone(),
                    config.wait,
                    &registry,
                )
                .map_err(|source| StartError::Identity {
                    path: identity.tls_dir.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let watches = Watches::new(consul, reads, metrics.clone(), shutdown.clone());
        let discovery = DiscoveryApi::new(watches.clone(), metrics, shutdown.clone())
            .with_node_config(&config.node)
            .with_default_intention(config.default_intention);
        let admin = Admin::new(registry);
        let mut tasks = JoinSet::new();
        let hub = discovery.clone();
        tasks.spawn(async move { hub.run().await }.instrument(tracing::info_span!("discovery")));
        let drain_shutdown = shutdown.clone();
        let drainer = registry_api.clone();
        tasks.spawn(
            async move { drainer.drain(drain_shutdown).await }
                .instrument(tracing::info_span!("queue")),
        );
        if let Some(keeper) = keeper {
            tasks.spawn(
                keeper
                    .run(shutdown.clone())
                    .instrument(tracing::info_span!("identity")),
            );
        }
        // With a tls_dir, other hosts (the monitor) call over mTLS with the
        // node's certificate once the keeper has it.
        let tls = match &config.identity {
            Some(identity) => {
                let node = SpiffeId::node(&identity.trust_domain, &config.node).map_err(|e| {
                    StartError::Identity {
                        path: identity.tls_dir.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
                    }
                })?;
                let tls = Arc::new(ServerTls::new(
                    identity.tls_dir.clone(),
                    node,
                    NODE_KEY,
                    NODE_CERT,
                ));
                tasks.spawn(
                    tls.clone()
                        .watch(shutdown.clone())
                        .instrument(tracing::info_span!("grpc_tls")),
                );
                Some(tls)
            }
            None => None,
        };
        tasks.spawn(serve_grpc(
            grpc,
            registry_api,
            discovery,
            tls,
            shutdown.clone(),
        ));
        let router = admin.router(Default::default());
        tasks.spawn(admin::serve(admin_listener, router, shutdown));
        // Ready once the queue is open and the listeners are bound: from here
        // on, a registration is either applied or kept.
        admin.set_ready(true);
        tracing::info!(
            node = %config.node, grpc = %grpc_addr, admin = %admin_addr,
            consul = ?config.consul.addrs, wait = ?config.wait,
            "mesh-bridge started"
        );
        Ok(Self {
            grpc_addr,
            admin_addr,
            watches,
            trigger,
            tasks,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The shared Consul watches.
    pub fn watches(&self) -> &Watches {
        &self.watches
    }

    /// Stops accepting, ends every stream and watch, and waits for the
    /// tasks up to `grace`; `false` when they did not finish in time.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.trigger.trigger();
        let watches = self.watches.clone();
        let drained = async move {
            while self.tasks.join_next().await.is_some() {}
            watches.stopped().await;
        };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}

/// The Registry service on the local agent (the first Consul address),
/// with its queue in `<data-dir>/queue`.
fn open_registry(
    config: &Config,
    consul: Client,
    metrics: &BridgeMetrics,
) -> Result<RegistryApi, StartError> {
    let agent = Client::new(&config.consul.first_only())?;
    let path = config.data_dir.join("queue");
    RegistryApi::open(path.clone(), agent, consul, metrics.clone())
        .map(|api| {
            api.reporting_for(&config.node)
                .reading_proxy_at(config.proxy_admin)
        })
        .map_err(|source| StartError::Queue { path, source })
}

/// Pending connections the listeners queue: every proxy of a node (and
/// of a takeover) may reconnect at once after a bridge restart; tokio's
/// default of 128 overflowed with a few hundred subscribers.
const LISTEN_BACKLOG: u32 = 1024;

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        what: "local address",
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// Serves Registry, Checks, Discovery and grpc.health.v1 until `shutdown`;
/// with `tls`, over mTLS for other hosts and plaintext for this one, each
/// call checked against [`BridgePolicy`].
async fn serve_grpc(
    listener: TcpListener,
    registry: RegistryApi,
    discovery: DiscoveryApi,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<RegistryServer<RegistryApi>>().await;
    reporter.set_serving::<DiscoveryApi>().await;
    let checks = ChecksServer::new(registry.checks());
    reporter
        .set_serving::<ChecksServer<crate::registry::ChecksApi>>()
        .await;
    let policy = tls
        .as_ref()
        .map(|tls| Arc::new(BridgePolicy::new(tls.identity())) as Arc<dyn CallPolicy>);
    let router = Server::builder()
        // A span per call, child of the caller's traceparent, when tracing is on.
        .trace_fn(mesh_runtime::telemetry::grpc_server_span)
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(Authorize::new(
            RegistryServer::new(registry),
            policy.clone(),
        ))
        .add_service(Authorize::new(checks, policy.clone()))
        .add_service(Authorize::new(discovery, policy));
    let result =
        mesh_runtime::pki::grpc::serve(router, listener, tls, Plaintext::Loopback, shutdown).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Who may call the bridge over TLS: the monitor (`svc/mesh-monitor`)
/// writes checks and reads the proxy's figures (`mesh.v1.Checks`);
/// mesh-control (`svc/mesh-control`) registers and deregisters on the
/// node and reads the proxy's counters for rollouts (`mesh.v1.Registry`);
/// the node's own identity may call everything. Routes, the node's config
/// and its intentions (`Discovery`) are the node's own: another node's
/// proxy, showing its node's certificate, is refused.
#[derive(Debug)]
pub struct BridgePolicy {
    node: SpiffeId,
    monitor: Option<SpiffeId>,
    control: Option<SpiffeId>,
}

/// The service name of mesh-monitor's identity.
pub const MONITOR_SERVICE: &str = "mesh-monitor";
/// The service name of mesh-control's identity.
pub const CONTROL_SERVICE: &str = "mesh-control";

impl BridgePolicy {
    /// The policy of the bridge of the node `node` names.
    pub fn new(node: &SpiffeId) -> Self {
        Self {
            node: node.clone(),
            monitor: SpiffeId::service(node.trust_domain(), MONITOR_SERVICE).ok(),
            control: SpiffeId::service(node.trust_domain(), CONTROL_SERVICE).ok(),
        }
    }
}

impl CallPolicy for BridgePolicy {
    fn check(&self, service: &str, _method: &str, peer: &SpiffeId) -> Result<(), String> {
        if *peer == self.node {
            return Ok(());
        }
        let checks = service == <ChecksServer<crate::registry::ChecksApi> as NamedService>::NAME;
        let registry = service == <RegistryServer<RegistryApi> as NamedService>::NAME;
        let (allowed, who) = if checks {
            (&self.monitor, MONITOR_SERVICE)
        } else if registry {
            (&self.control, CONTROL_SERVICE)
        } else {
            return Err(format!("only {} may", self.node));
        };
        match allowed {
            Some(id) if peer == id => Ok(()),
            Some(id) => Err(format!("only {id} and {} may", self.node)),
            None => Err(format!("only svc/{who} and {} may", self.node)),
        }
    }
}
