//! The running monitor: builds everything from a [`Config`], binds the
//! gRPC and admin listeners, owns the tasks (probe loop, log watcher and
//! its alerts, traffic scraper, alert outbox, servers), and drains them on
//! shutdown.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use consul_client::{Client, ConfigError};
use mesh_proto::v1::monitor_server::MonitorServer;
use mesh_runtime::{
    admin::{self, Admin},
    metrics::Registry,
    pki::{
        SpiffeId,
        grpc::{Authorize, CallPolicy, Plaintext, ServerTls, service_files},
    },
    shutdown::{self, Shutdown, Trigger},
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tonic::transport::Server;
use tracing::Instrument;

use crate::{
    alert::AlertBook,
    bridges::{Bridges, MONITOR_SERVICE, SelfRegistration},
    checks::CheckWriter,
    config::Config,
    grpc::MonitorApi,
    log_alerts::{self, LogAlerts},
    logs::LogWatcher,
    metrics::MonitorMetrics,
    outbox::Outbox,
    prober::{Board, Prober},
    targets::Discovery,
    traffic::{Scraper, TrafficAlerts},
    webhook::Webhook,
};

/// A started monitor.
#[derive(Debug)]
pub struct Monitor {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    book: Arc<AlertBook>,
    trigger: Trigger,
    tasks: JoinSet<()>,
}

/// Why the monitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Consul client could not be built.
    #[error(transparent)]
    Consul(#[from] ConfigError),
    /// The webhook client could not be built.
    #[error("{0}")]
    Webhook(String),
    /// The TLS settings cannot be used.
    #[error("{0}")]
    Tls(String),
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

// === impl Monitor ===

impl Monitor {
    /// Binds the listeners and starts probing; metrics go to `registry`.
    /// Ready (`/ready`) once the stored alerts are read back and the first
    /// round is done.
    pub async fn start(config: &Config, registry: Registry) -> Result<Self, StartError> {
        let metrics = MonitorMetrics::new(&registry);
        let consul = Client::new(&config.consul)?;
        let webhook = config
            .webhook_url
            .clone()
            .map(|url| Webhook::new(url, config.webhook_attempts))
            .transpose()
            .map_err(StartError::Webhook)?;
        let grpc = bind(config.grpc_listen, "gRPC").await?;
        let admin_listener = bind(config.admin_listen, "admin").await?;
        let (grpc_addr, admin_addr) = (local_addr(&grpc)?, local_addr(&admin_listener)?);

        let bridges = Arc::new(
            Bridges::new(config.bridge_port, config.tls.as_ref()).map_err(StartError::Tls)?,
        );
        let (book, changes) = AlertBook::new();
        let book = Arc::new(book);
        let board = Arc::new(Board::default());
        let admin = Admin::new(registry);
        let prober = Prober {
            discovery: Discovery::new(consul.clone(), config),
            consul: consul.clone(),
            probing: config.probing,
            board: board.clone(),
            book: book.clone(),
            checks: config
                .consul_checks
                .then(|| CheckWriter::new(bridges.clone(), metrics.clone())),
            metrics: metrics.clone(),
            admin: admin.clone(),
        };
        let log_alerts = LogAlerts::new(book.clone(), config.logs.as_ref(), metrics.clone());
        let log_watcher = config
            .logs
            .clone()
            .map(|logs| LogWatcher::new(logs).with_metrics(metrics.clone()));
        let scraper = Scraper::new(
            consul.clone(),
            bridges,
            config.traffic,
            TrafficAlerts::new(book.clone(), &config.traffic, metrics.clone()),
        );
        let registration = config
            .tls
            .is_some()
            .then(|| SelfRegistration::new(consul.clone(), &config.node, admin_addr));
        let outbox = Outbox::new(consul, webhook, metrics);
        let (trigger, shutdown) = shutdown::channel();
        let mut tasks = JoinSet::new();
        if let Some(registration) = registration {
            tasks.spawn(
                registration
                    .run(shutdown.clone())
                    .instrument(tracing::info_span!("register")),
            );
        }
        let (log_events, log_rx) = mpsc::channel(log_alerts::EVENT_BUFFER);
        if let Some(watcher) = log_watcher {
            tasks.spawn(
                watcher
                    .run(log_events, shutdown.clone())
                    .instrument(tracing::info_span!("logs")),
            );
        }
        // Without a watcher the channel is closed: the task only resolves
        // log alerts restored from an earlier run.
        tasks.spawn(
            log_alerts
                .run(log_rx, shutdown.clone())
                .instrument(tracing::info_span!("log_alerts")),
        );
        // With traffic off the task only resolves traffic alerts restored
        // from an earlier run.
        tasks.spawn(
            scraper
                .run(shutdown.clone())
                .instrument(tracing::info_span!("traffic")),
        );
        tasks.spawn(
            prober
                .run(shutdown.clone())
                .instrument(tracing::info_span!("probe")),
        );
        let outbox_shutdown = shutdown.clone();
        tasks.spawn(
            async move { outbox.run(changes, outbox_shutdown).await }
                .instrument(tracing::info_span!("outbox")),
        );
        let api = MonitorApi::new(book.clone(), board);
        let tls = match &config.tls {
            Some(settings) => {
                let me = SpiffeId::service(&settings.trust_domain, MONITOR_SERVICE)
                    .map_err(|e| StartError::Tls(format!("trust_domain: {e}")))?;
                let (key, cert) = service_files(MONITOR_SERVICE);
                let tls = Arc::new(ServerTls::new(settings.dir.clone(), me, &key, &cert));
                tasks.spawn(
                    tls.clone()
                        .watch(shutdown.clone())
                        .instrument(tracing::info_span!("grpc_tls")),
                );
                Some(tls)
            }
            None => None,
        };
        tasks.spawn(
            serve_grpc(grpc, api, tls, shutdown.clone()).instrument(tracing::info_span!("grpc")),
        );
        tasks.spawn(
            admin::serve(admin_listener, admin.router(Default::default()), shutdown)
                .instrument(tracing::info_span!("admin")),
        );
        tracing::info!(
            node = %config.node, grpc = %grpc_addr, admin = %admin_addr,
            consul = ?config.consul.addrs, interval = ?config.probing.interval,
            timeout = ?config.probing.timeout, slow = ?config.probing.slow_threshold,
            components = config.components.len(), consul_checks = config.consul_checks,
            webhook = config.webhook_url.is_some(), mtls = config.tls.is_some(),
            log_rules = config.logs.as_ref().map_or(0, |l| l.rules.len()),
            traffic = config.traffic.enabled, traffic_interval = ?config.traffic.interval,
            "mesh-monitor started"
        );
        Ok(Self {
            grpc_addr,
            admin_addr,
            book,
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

    /// The alerts.
    pub fn alerts(&self) -> &AlertBook {
        &self.book
    }

    /// Stops probing and serving, and waits for the tasks up to `grace`;
    /// `false` when they did not finish in time. An alert change not yet
    /// carried out stays in KV for the next run.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.trigger.trigger();
        let drained = async move { while self.tasks.join_next().await.is_some() {} };
        tokio::time::timeout(grace, drained).await.is_ok()
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

/// Serves Monitor and grpc.health.v1 until `shutdown`; with `tls`,
/// plaintext to this host and mutual TLS to mesh-control (see
/// [`MonitorPolicy`]).
async fn serve_grpc(
    listener: TcpListener,
    api: MonitorApi,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<MonitorServer<MonitorApi>>().await;
    let policy = tls
        .as_ref()
        .map(|tls| Arc::new(MonitorPolicy::new(tls.identity())) as Arc<dyn CallPolicy>);
    let router = Server::builder()
        // A span per call, child of the caller's traceparent, when tracing is on.
        .trace_fn(mesh_runtime::telemetry::grpc_server_span)
        .add_service(health)
        .add_service(Authorize::new(MonitorServer::new(api), policy));
    let result =
        mesh_runtime::pki::grpc::serve(router, listener, tls, Plaintext::Loopback, shutdown).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Who may call the monitor over TLS: mesh-control
/// (`svc/mesh-control`), which asks for verdicts and alerts during
/// rollouts and for the dashboard. Tools on the monitor's own host call in
/// plaintext.
#[derive(Debug)]
pub struct MonitorPolicy {
    control: Option<SpiffeId>,
}

/// The service name of mesh-control's identity.
pub const CONTROL_SERVICE: &str = "mesh-control";

impl MonitorPolicy {
    /// The policy in `me`'s trust domain.
    pub fn new(me: &SpiffeId) -> Self {
        Self {
            control: SpiffeId::service(me.trust_domain(), CONTROL_SERVICE).ok(),
        }
    }
}

impl CallPolicy for MonitorPolicy {
    fn check(&self, _service: &str, _method: &str, peer: &SpiffeId) -> Result<(), String> {
        match &self.control {
            Some(control) if peer == control => Ok(()),
            Some(control) => Err(format!("only {control} may")),
            None => Err("no identity may".into()),
        }
    }
}
