//! mesh-proxy: the data plane on each node. Local services call other
//! services by name through its outbound listener (127.0.0.1:8888) and
//! register themselves with Consul's agent API on the same port; it routes
//! from a table the bridge streams to it, and from its dump file when the
//! bridge is away.
//!
//! - [`config`]: flags, environment and file into a validated [`Config`].
//! - [`server`]: the outbound listener (hyper, HTTP/1.1 + h2c), drain on shutdown.
//! - [`inbound`]: the inbound listener other nodes' proxies send to (h2c, HTTP/1.1 upgrades).
//! - [`peer`]: other nodes' proxies (service `mesh-proxy`) and the HTTP/2 hop through them.
//! - [`tls`]: mtls mode: the identities from `tls_dir`, rotated; the hop's TLS.
//! - [`intentions`]: mtls mode: which service may call which, judged on the inbound listener, saved.
//! - [`proxy`]: the request path: route → prepare → balance → retry/timeout → connect.
//! - [`route`]: which service a request names (Host, or first path segment).
//! - [`policy`]: route policies (`[default_route]`, `[routes.<service>]`), validated and swappable.
//! - [`balance`]: P2C over peak-EWMA latency, round robin, least-request, weights, consistent hash.
//! - [`outlier`]: passive outlier detection: consecutive failures eject with back-off.
//! - [`retry`]: which requests may be retried, replay copies of bodies, the retry budget.
//! - [`limits`]: per-service and listener limits, refused at once with a 503.
//! - [`upstream`]: per-instance in-flight count, HTTP/1.1 pool and HTTP/2 connection.
//! - [`protocol`]: which HTTP version a request takes upstream (gRPC, h2, upgrades).
//! - [`upgrade`]: HTTP/1.1 upgrades (WebSocket), tunnelled once the instance answers 101.
//! - [`listen`]: listeners shared with a new proxy process (`SO_REUSEPORT`) for restarts.
//! - [`headers`]: hop-by-hop stripping and `X-Forwarded-For`.
//! - [`body`]: the request and response body types of the request path.
//! - [`error`]: the request path's typed errors and their JSON answers.
//! - [`table`]: the immutable routing table and its lock-free swap.
//! - [`discovery`]: `Discovery.Watch` to the bridge, applied to the table.
//! - [`dump`]: the routing table on disk, written atomically, loaded at start.
//! - [`node_config`]: the node's config version from mesh-control: checked, layered over the file's policies, saved, reported.
//! - [`agent`]: Consul's agent registration API, validated.
//! - [`registrar`]: registrations to the bridge, or to a durable queue.
//! - [`admin`]: `/routes` and `/stats` on the admin listener.
//! - [`stats`]: `/stats`: readiness, config version, requests, errors and latency since start.
//! - [`metrics`]: the proxy's metric handles.
//! - [`access_log`]: one JSON line per request, written off the request path, reopened on rotation.

pub mod access_log;
pub mod admin;
pub mod agent;
pub mod balance;
pub mod body;
pub mod config;
pub mod discovery;
pub mod dump;
pub mod error;
pub mod h1;
pub mod h2_client;
pub mod headers;
pub mod inbound;
pub mod intentions;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod node_config;
pub mod outlier;
pub mod peer;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod registrar;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod table;
pub mod tls;
pub mod upgrade;
pub mod upstream;

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_runtime::{
    admin::Admin,
    metrics::{Counter, Registry},
    queue::DurableQueue,
    shutdown::{self, Shutdown, Trigger},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

pub use crate::config::{
    AccessLogFormat, Args, Config, InboundConfig, LoadBalancing, MeshMode, TlsConfig,
};
use crate::{
    access_log::AccessLog,
    agent::Agent,
    discovery::Discovery,
    dump::{DumpClock, DumpFile},
    inbound::Inbound,
    metrics::ProxyMetrics,
    node_config::{Layers, Reporter},
    proxy::Proxy,
    registrar::Registrar,
    table::{Builder, Routes, RoutingTable, Source},
    tls::MeshTls,
};

/// How long background tasks get to stop once asked.
const TASK_STOP: Duration = Duration::from_secs(2);

/// How long a process taking over from another one waits for its routing
/// table before it listens anyway (and answers "no routes yet" like a
/// fresh start would).
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

/// A running proxy: its listeners and the tasks it owns.
#[derive(Debug)]
pub struct App {
    outbound: SocketAddr,
    admin: SocketAddr,
    inbound: Option<SocketAddr>,
    trigger: Trigger,
    server: JoinHandle<()>,
    /// The inbound listener's task, drained like the outbound one.
    inbound_server: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    proxy: Arc<Proxy>,
    layers: Arc<Layers>,
    reloads: Reloads,
    /// The access log's writer, stopped last: after the drain.
    access_log: Option<AccessLog>,
}

/// `mesh_proxy_config_reloads_total` by `outcome`.
#[derive(Debug)]
struct Reloads {
    applied: Counter,
    refused: Counter,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The data folder (or the queue in it) is unusable.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The access log cannot be opened.
    #[error(transparent)]
    AccessLog(#[from] access_log::OpenError),
    /// mtls mode's credentials cannot be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The bridge address is not a valid URL.
    #[error("bridge_addr {addr:?}: {source}")]
    BridgeAddr {
        /// The address.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

// === impl App ===

impl App {
    /// Binds the listeners, loads the dump, and starts serving, watching
    /// the bridge and draining the registration queue. Metrics go to
    /// `registry`.
    pub async fn start(config: Config, registry: Registry) -> Result<Self, StartError> {
        let mesh_tls = match &config.tls {
            Some(tls) => Some(Arc::new(
                MeshTls::load_when_present(tls, &config.node).await?,
            )),
            None => None,
        };
        let queue = open_data_dir(&config.data_dir)?;
        let access_log = config
            .access_log
            .as_deref()
            .map(|path| AccessLog::open(path, &config.node, &registry))
            .transpose()?;
        let logger = access_log.as_ref().map(AccessLog::logger);
        let outbound = bind(config.listen)?;
        let admin_listener = bind(config.admin_listen)?;
        let (outbound_addr, admin_addr) = (outbound.addr(), admin_listener.addr());
        let takeover = outbound.is_takeover() || admin_listener.is_takeover();
        let inbound = config
            .inbound
            .as_ref()
            .map(|i| bind(i.listen))
            .transpose()?;
        let inbound_addr = inbound.as_ref().map(listen::Bound::addr);

        let metrics = Arc::new(ProxyMetrics::new(&registry));
        let reloads = Reloads::new(&registry);
        let admin = Admin::new(registry.clone());
        let routes = Arc::new(Routes::new(admin.clone()));
        let dump_path = config.data_dir.join(dump::FILE_NAME);
        let clock = Arc::new(DumpClock::default());
        load_dump(&dump_path, &routes, &metrics, &clock);
        // Intentions are judged on the peer's certificate: mtls mode only.
        let intentions_path = config.data_dir.join(intentions::FILE_NAME);
        let enforcer = mesh_tls.as_ref().map(|_| {
            let enforcer = Arc::new(intentions::Enforcer::new(&registry));
            enforcer.load(&intentions_path);
            enforcer
        });

        let channel = bridge_channel(&config)?;
        let registrar = Arc::new(Registrar::new(
            channel.clone(),
            queue,
            config.registration_timeout,
            metrics.clone(),
        ));
        let proxy = Arc::new(
            Proxy::new(
                &config,
                routes.clone(),
                Agent::new(registrar.clone()),
                metrics.clone(),
            )
            .with_access_log(logger.clone())
            .with_tls(mesh_tls.clone()),
        );
        let layers = {
            let proxy = proxy.clone();
            let set_policies = Box::new(move |p| proxy.set_policies(p));
            Arc::new(Layers::new(set_policies, &config, metrics.clone()))
        };
        layers.load_saved();
        let reporter = Reporter::new(
            channel.clone(),
            config.node.clone(),
            config.registration_timeout,
        );
        // One subscription, to the services `peer::watch` says.
        let subscribe = {
            let (node, routes, metrics) = (config.node.clone(), routes.clone(), metrics.clone());
            let layers = layers.clone();
            let enforcer = enforcer.clone();
            let open_timeout = config.connect_timeout + config.registration_timeout;
            move |services: Vec<String>, stop: Shutdown| {
                let discovery = Discovery::new(
                    channel.clone(),
                    node.clone(),
                    services,
                    open_timeout,
                    routes.clone(),
                    metrics.clone(),
                )
                .with_node_config(layers.clone())
                .with_intentions(enforcer.clone());
                discovery.run(stop)
            }
        };
        let limits = server::Limits::of(&config);

        let (trigger, stop) = shutdown::channel();
        let stats = stats::StatsSource::new(
            config.node.clone(),
            admin.clone(),
            registry.clone(),
            layers.status(),
        );
        let router = admin.router(admin::router(
            routes.clone(),
            proxy.peers().clone(),
            layers.status(),
            enforcer.clone(),
            stats,
        ));
        // Listen now, or, taking over from another process, once the
        // routing table is loaded: see `listen`.
        let (server, admin_task) = if takeover {
            tracing::info!(outbound = %outbound_addr, admin = %admin_addr, "another process serves these ports; listening once the routing table is loaded");
            let loaded = table_loaded(routes.clone());
            let (outbound, admin) = listen_later(
                loaded,
                outbound,
                admin_listener,
                proxy.clone(),
                limits,
                router,
                &stop,
            );
            (spawn("outbound", outbound), spawn("admin", admin))
        } else {
            let (outbound, admin_listener) = (listen_on(outbound)?, listen_on(admin_listener)?);
            (
                spawn(
                    "outbound",
                    server::serve(outbound, proxy.clone(), limits, stop.clone()),
                ),
                spawn(
                    "admin",
                    mesh_runtime::admin::serve(admin_listener, router, stop.clone()),
                ),
            )
        };
        // The dump writer subscribes before discovery starts, so that no
        // table the bridge sends goes unwritten.
        let dump_writer =
            dump::run_writer(dump_path, routes.subscribe(), clock.clone(), stop.clone());
        let discovery = {
            let subscription_stop = stop.clone();
            // With an inbound listener, a list of services also follows the
            // services registered on this node.
            let local = inbound.is_some().then(|| registrar.clone());
            peer::watch::run(
                config.services.clone(),
                local,
                move |services| subscribe(services, subscription_stop.clone()),
                stop.clone(),
            )
        };
        let mut tasks = vec![
            admin_task,
            spawn("dump", dump_writer),
            spawn("discovery", discovery),
            spawn(
                "peers",
                proxy
                    .peers()
                    .clone()
                    .follow(routes.subscribe(), stop.clone()),
            ),
            spawn("queue", registrar.clone().drain(stop.clone())),
            spawn("config-status", reporter.run(layers.status(), stop.clone())),
        ];
        let inbound_server = match (inbound, &config.inbound) {
            (Some(bound), Some(inbound_config)) => {
                let registration =
                    peer::registration::own(&config.node, inbound_config, bound.addr());
                tasks.push(spawn(
                    "peer-registration",
                    peer::registration::register(
                        registrar.clone(),
                        registration,
                        table_loaded(routes.clone()),
                        stop.clone(),
                    ),
                ));
                let inbound = Arc::new(
                    Inbound::new(&config, routes.clone(), metrics.inbound())
                        .with_access_log(logger)
                        .with_intentions(enforcer.clone()),
                );
                let acceptor = match &mesh_tls {
                    Some(tls) => inbound::Acceptor::Tls(tls.clone()),
                    None => inbound::Acceptor::Plain,
                };
                Some(spawn(
                    "inbound",
                    serve_inbound(
                        bound,
                        inbound,
                        acceptor,
                        limits,
                        routes.clone(),
                        stop.clone(),
                    ),
                ))
            }
            _ => None,
        };
        if let Some(enforcer) = enforcer {
            tasks.push(spawn(
                "intentions",
                enforcer.run_writer(intentions_path, stop.clone()),
            ));
        }
        if let Some(tls) = mesh_tls {
            tasks.push(spawn("tls", tls.watch(metrics.tls_reloads(), stop.clone())));
        }
        tasks.push(spawn(
            "gauges",
            gauges(clock, registrar, metrics, registry, routes.clone(), stop),
        ));
        tracing::info!(outbound = %outbound_addr, admin = %admin_addr, inbound = ?inbound_addr, bridge = %config.bridge_addr, lb = %config.lb, mode = %config.mode, workers = config.workers, "mesh-proxy started");
        Ok(Self {
            outbound: outbound_addr,
            admin: admin_addr,
            inbound: inbound_addr,
            trigger,
            server,
            inbound_server,
            tasks,
            proxy,
            layers,
            reloads,
            access_log,
        })
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The inbound listener's address, when it is on.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound
    }

    /// Reloads the route policies (SIGHUP): the config file named by
    /// `args` is read again with `args` over it, as at start, validated
    /// whole, and its `[default_route]` and `[routes.*]` take the place of
    /// the current ones at once (requests in flight keep theirs), under
    /// the node config from mesh-control (see [`node_config`]). A file
    /// that does not load or validate changes nothing. Either way one line
    /// is logged. Other keys take effect at the next start.
    pub fn reload(&self, args: &Args) -> Result<(), String> {
        if args.config.is_none() {
            tracing::info!("no --config file: nothing to reload");
            return Ok(());
        }
        let result = reload_config(args).and_then(|config| {
            let routes = config.routes.len();
            self.layers.set_local(config).map(|()| routes)
        });
        match result {
            Ok(routes) => {
                self.reloads.applied.increment(1);
                tracing::info!(routes, "route policies reloaded");
                Ok(())
            }
            Err(e) => {
                self.reloads.refused.increment(1);
                tracing::error!(error = %e, "config reload refused; keeping the last good route policies");
                Err(e)
            }
        }
    }

    /// Reopens the access log file (SIGHUP, after logrotate moved it);
    /// nothing when the log is off.
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }

    /// Upgrade tunnels (WebSocket) open now.
    pub fn open_tunnels(&self) -> usize {
        self.proxy.tunnels().len()
    }

    /// Stops accepting, lets requests in flight finish within `grace`, then
    /// closes what is left and stops every task.
    pub async fn shutdown(self, grace: Duration) {
        self.trigger.trigger();
        let end = tokio::time::Instant::now() + grace;
        for mut server in std::iter::once(self.server).chain(self.inbound_server) {
            if tokio::time::timeout_at(end, &mut server).await.is_err() {
                tracing::warn!(
                    ?grace,
                    "grace period over; closing the remaining connections"
                );
                server.abort();
                let _ = server.await;
            }
        }
        for mut task in self.tasks {
            if tokio::time::timeout(TASK_STOP, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        // Last: every request's line is queued once its connection is gone.
        if let Some(log) = self.access_log {
            log.close().await;
        }
        tracing::info!("mesh-proxy stopped");
    }
}

/// The config `args` name, checked whole.
fn reload_config(args: &Args) -> Result<Config, String> {
    let args = mesh_runtime::config::merge(args.clone()).map_err(|e| e.to_string())?;
    args.validate()
}

// === impl Reloads ===

impl Reloads {
    const NAME: &'static str = "mesh_proxy_config_reloads_total";

    fn new(registry: &Registry) -> Self {
        registry.describe_counter(
            Self::NAME,
            "Config reloads (SIGHUP) by outcome: applied, or refused and the last good kept.",
        );
        Self {
            applied: registry.counter(Self::NAME, &[("outcome", "applied")]),
            refused: registry.counter(Self::NAME, &[("outcome", "refused")]),
        }
    }
}

/// Spawns a task with a span naming it.
fn spawn<F>(name: &'static str, task: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(task.instrument(tracing::info_span!("task", name)))
}

fn bind(addr: SocketAddr) -> Result<listen::Bound, StartError> {
    listen::Bound::bind(addr).map_err(|source| StartError::Bind { addr, source })
}

fn listen_on(bound: listen::Bound) -> Result<TcpListener, StartError> {
    let addr = bound.addr();
    bound
        .listen()
        .map_err(|source| StartError::Bind { addr, source })
}

/// The outbound and admin tasks of a takeover: both listen once `loaded`
/// resolves (the admin listener too, so that the new process's `/routes`
/// answering means it is ready), or end at once on shutdown.
fn listen_later(
    loaded: impl std::future::Future<Output = ()> + Send + 'static,
    outbound: listen::Bound,
    admin: listen::Bound,
    proxy: Arc<Proxy>,
    limits: server::Limits,
    router: axum::Router,
    stop: &Shutdown,
) -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
    let (mut stop_outbound, mut stop_admin) = (stop.clone(), stop.clone());
    let outbound_task = async move {
        tokio::select! {
            _ = loaded => {}
            _ = stop_outbound.requested() => return,
        }
        let _ = ready_tx.send(true);
        let addr = outbound.addr();
        match listen_on(outbound) {
            Ok(listener) => {
                tracing::info!(outbound = %addr, "routing table loaded; taking over");
                server::serve(listener, proxy, limits, stop_outbound).await;
            }
            Err(e) => tracing::error!(error = %e, "this process serves no request"),
        }
    };
    let admin_task = async move {
        tokio::select! {
            // An error: the outbound task ended without listening.
            loaded = ready.wait_for(|r| *r) => if loaded.is_err() { return },
            _ = stop_admin.requested() => return,
        }
        match listen_on(admin) {
            Ok(listener) => mesh_runtime::admin::serve(listener, router, stop_admin).await,
            Err(e) => tracing::error!(error = %e, "no admin listener"),
        }
    };
    (outbound_task, admin_task)
}

/// The inbound listener's task: listens at once, or, taking over from
/// another process, once the routing table is loaded (as the outbound
/// listener does), then serves until shutdown.
async fn serve_inbound(
    bound: listen::Bound,
    inbound: Arc<Inbound>,
    acceptor: inbound::Acceptor,
    limits: server::Limits,
    routes: Arc<Routes>,
    mut stop: Shutdown,
) {
    let addr = bound.addr();
    if bound.is_takeover() {
        tokio::select! {
            () = table_loaded(routes) => {}
            _ = stop.requested() => return,
        }
    }
    match bound.listen() {
        Ok(listener) => {
            tracing::info!(inbound = %addr, tls = acceptor.is_tls(), "inbound listener for other nodes' proxies");
            inbound::serve(listener, inbound, limits, acceptor, stop).await;
        }
        Err(e) => tracing::error!(inbound = %addr, error = %e, "no inbound listener"),
    }
}

/// Resolves once a routing table is loaded (dump or bridge), or after
/// [`TAKEOVER_WAIT`].
async fn table_loaded(routes: Arc<Routes>) {
    let mut changes = routes.subscribe();
    let loaded = changes.wait_for(|t| t.source != Source::None);
    if tokio::time::timeout(TAKEOVER_WAIT, loaded).await.is_err() {
        tracing::warn!(wait = ?TAKEOVER_WAIT, "no routing table yet; listening anyway");
    }
}

/// Creates the data folder and opens the registration queue in it.
fn open_data_dir(dir: &Path) -> Result<DurableQueue<registrar::RegistryOp>, StartError> {
    let opened = std::fs::create_dir_all(dir).and_then(|()| DurableQueue::open(dir.join("queue")));
    opened.map_err(|source| StartError::DataDir {
        path: dir.to_owned(),
        source,
    })
}

/// Serves from the dump until the bridge answers; a dump that does not
/// check out is refused with one line, and the proxy starts empty.
fn load_dump(path: &Path, routes: &Routes, metrics: &ProxyMetrics, clock: &DumpClock) {
    match DumpFile::load(path) {
        Ok(None) => {
            tracing::info!(file = %path.display(), "no routing dump yet; waiting for the bridge")
        }
        Ok(Some(dump)) => {
            let table = Builder::new(&RoutingTable::empty(), metrics).snapshot(
                &dump.to_proto(),
                Source::Dump,
                dump.version,
                dump.written_at_unix_ms,
            );
            tracing::info!(file = %path.display(), version = dump.version, services = table.len(), endpoints = table.endpoint_count(), "serving from the routing dump until the bridge answers");
            clock.set(dump.written_at_unix_ms);
            routes.publish(table);
        }
        Err(e) => {
            tracing::error!(file = %path.display(), reason = %e, "routing dump refused; starting with an empty table");
        }
    }
}

/// One lazily connected channel to the bridge, shared by discovery and
/// registration; HTTP/2 pings find a bridge that vanished without a word.
fn bridge_channel(config: &Config) -> Result<Channel, StartError> {
    let endpoint = Endpoint::from_shared(config.bridge_addr.clone()).map_err(|source| {
        StartError::BridgeAddr {
            addr: config.bridge_addr.clone(),
            source,
        }
    })?;
    Ok(endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Keeps the gauges that age on their own up to date, once a second,
/// and closes the idle upstream connections their instances closed.
///
/// It also runs the registry's upkeep, which folds histogram samples into
/// buckets: without it an unscraped proxy under load would grow by 8 bytes
/// a request.
async fn gauges(
    clock: Arc<DumpClock>,
    registrar: Arc<Registrar>,
    metrics: Arc<ProxyMetrics>,
    registry: Registry,
    routes: Arc<Routes>,
    mut stop: Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.requested() => return,
        }
        if let Some(at) = clock.get() {
            let age_ms = table::now_unix_ms().saturating_sub(at);
            metrics.dump_age.set(age_ms as f64 / 1000.0);
        }
        registrar.update_depth();
        // Ejections end on their own, without an event to count them down.
        let table = routes.load();
        outlier::update_gauges(&table, tokio::time::Instant::now());
        for endpoint in table.services().flat_map(|s| s.endpoints().iter()) {
            endpoint.upstream.sweep_idle();
        }
        registry.run_upkeep();
    }
}
