//! The running deployer: opens the store from a [`Config`], takes over
//! the processes an earlier deployer started ([`Supervisor::adopt`]),
//! settles the deploys it died in ([`Deployments::reconcile`]), binds the
//! gRPC and admin listeners, owns their tasks, and drains them on
//! shutdown. The processes it runs outlive it.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use mesh_proto::v1::deployer_server::DeployerServer;
use mesh_runtime::{
    admin::{self, Admin},
    metrics::Registry,
    pki::grpc::{Plaintext, ServerTls},
    shutdown::{self, Shutdown, Trigger},
};
use tokio::{net::TcpListener, task::JoinSet};
use tonic::transport::Server;
use tracing::Instrument;

use crate::{
    apply::ConfigApplier,
    config::Config,
    deploy::{Deployments, Reconciled},
    grpc::{BearerAuth, DeployerApi, DeployerMetrics, DeployerService},
    store::{Limits, Store, StoreError},
    supervisor::{AdoptReport, Supervisor, SupervisorConfig, SupervisorError},
    tls::{self, Authorization, TlsError},
};

/// Where the process records live, under the data folder.
const PROCESSES_DIR: &str = "processes";

/// Keepalive pings on gRPC connections, so that an uploader that vanished
/// without a FIN releases its upload (and the version it holds).
const GRPC_KEEPALIVE: Duration = Duration::from_secs(30);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A started deployer.
#[derive(Debug)]
pub struct Deployer {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    store: Store,
    deployments: Deployments,
    trigger: Trigger,
    tasks: JoinSet<()>,
}

/// Why the deployer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The artifact store could not be opened.
    #[error("artifact store: {0}")]
    Store(#[from] StoreError),
    /// The supervisor could not start or read its records.
    #[error("supervisor: {0}")]
    Supervisor(#[from] SupervisorError),
    /// The credentials in `tls_dir` could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
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

// === impl Deployer ===

impl Deployer {
    /// Opens the store, binds the gRPC and admin listeners and starts
    /// serving; metrics go to `registry`.
    pub async fn start(config: &Config, registry: Registry) -> Result<Self, StartError> {
        let limits = Limits {
            max_size: config.max_artifact_size,
            keep: config.keep_versions,
        };
        let data_dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, limits))
            .await
            .map_err(|e| {
                StartError::Store(StoreError::Io {
                    path: config.data_dir.clone(),
                    source: io::Error::other(e),
                })
            })??;
        let mut supervision = SupervisorConfig::new(config.data_dir.join(PROCESSES_DIR));
        supervision.base_env = config.inherited_env.clone();
        let supervisor = Supervisor::new(supervision)?;
        log_adoption(&supervisor.adopt().await?);
        let deployments = Deployments::new(
            store.clone(),
            supervisor,
            config.proxy_addr,
            config.proxy_admin,
            &config.data_dir,
        );
        let tls = match &config.tls {
            Some(settings) => Some(Arc::new(tls::load(settings, &config.node)?)),
            None => None,
        };
        let reconciled = deployments.reconcile().await;
        log_reconciled(&reconciled);
        let grpc = bind(config.grpc_listen, "gRPC").await?;
        let admin_listener = bind(config.admin_listen, "admin").await?;
        let (grpc_addr, admin_addr) = (local_addr(&grpc)?, local_addr(&admin_listener)?);

        let (trigger, shutdown) = shutdown::channel();
        let in_use = deployments.clone();
        let api = DeployerApi::new(store.clone(), DeployerMetrics::new(&registry))
            .with_in_use(Arc::new(move |service: &str| in_use.in_use(service)))
            .with_deployments(deployments.clone())
            .with_applier(ConfigApplier::new(config.config_roots.clone()));
        let authz = Authorization::new(tls.as_deref())?;
        let service = api.into_service(BearerAuth::new(config.token.as_ref()), &authz);
        let admin = Admin::new(registry);
        let mut tasks = JoinSet::new();
        if !reconciled.pending.is_empty() {
            tasks.spawn(
                deployments
                    .clone()
                    .deregister_later(reconciled.pending, shutdown.clone())
                    .instrument(tracing::info_span!("deregister_later")),
            );
        }
        if let Some(tls) = &tls {
            tasks.spawn(
                tls.clone()
                    .watch(shutdown.clone())
                    .instrument(tracing::info_span!("tls_dir")),
            );
        }
        tasks.spawn(
            serve_grpc(grpc, service, tls, shutdown.clone())
                .instrument(tracing::info_span!("grpc")),
        );
        tasks.spawn(
            admin::serve(admin_listener, admin.router(Default::default()), shutdown)
                .instrument(tracing::info_span!("admin")),
        );
        // Ready once the store is open and the listeners are bound.
        admin.set_ready(true);
        tracing::info!(
            node = %config.node, grpc = %grpc_addr, admin = %admin_addr,
            data_dir = %config.data_dir.display(), token = config.token.is_some(),
            mtls = config.tls.is_some(),
            proxy = %config.proxy_addr, proxy_admin = %config.proxy_admin,
            "mesh-deployer started"
        );
        Ok(Self {
            grpc_addr,
            admin_addr,
            store,
            deployments,
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

    /// The artifact store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The deploys (and the processes they run).
    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// Stops accepting, lets calls in flight finish, and waits for the
    /// tasks up to `grace`; `false` when they did not finish in time (an
    /// upload cut then keeps its bytes for a resume).
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.trigger.trigger();
        let drained = async move { while self.tasks.join_next().await.is_some() {} };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}

/// Logs what [`Supervisor::adopt`] found.
fn log_adoption(report: &AdoptReport) {
    tracing::info!(
        adopted = ?report.adopted, restarted = ?report.restarted,
        invalid = report.invalid.len(), "took over the processes of the last run"
    );
    for (path, reason) in &report.invalid {
        tracing::warn!(path = %path.display(), %reason, "process record left untouched");
    }
}

/// Logs what [`Deployments::reconcile`] did, when it did anything.
fn log_reconciled(r: &Reconciled) {
    if r != &Reconciled::default() {
        tracing::info!(
            finished = ?r.finished, rolled_back = ?r.rolled_back, stopped = ?r.stopped,
            deregistration_pending = ?r.pending,
            "settled the deploys the last run was in"
        );
    }
}

/// Pending connections the listeners queue.
const LISTEN_BACKLOG: u32 = 128;

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

/// Serves Deployer and grpc.health.v1 until `shutdown`, over TLS when
/// `tls` is given.
async fn serve_grpc(
    listener: TcpListener,
    deployer: DeployerService,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<DeployerServer<DeployerApi>>().await;
    let router = Server::builder()
        // A span per call, child of the caller's traceparent, when tracing is on.
        .trace_fn(mesh_runtime::telemetry::grpc_server_span)
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(deployer);
    let result =
        mesh_runtime::pki::grpc::serve(router, listener, tls, Plaintext::Refused, shutdown).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
