//! The running mesh-control: builds everything from a [`Config`], binds the
//! gRPC and HTTP listeners, owns the tasks (leader lock, readiness, the
//! rollout and deployment drivers, the dashboard's state, both servers), and drains them on shutdown,
//! releasing the leader lock so another replica takes it at once.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use consul_client::{Client, ConfigError};
use mesh_runtime::{
    admin::{self, Admin},
    metrics::Registry,
    pki::{
        SpiffeId,
        grpc::{Authorize, CallPolicy, Plaintext, ServerTls},
    },
    shutdown::{self, Shutdown, Trigger},
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tracing::Instrument;

use crate::{
    config::Config,
    control::{CONTROL_SERVICE, Control, ControlParts, DeployerSettings, OwnIdentity},
    dashboard::{ConsulSource, Dashboard, Publisher},
    deploy,
    grpc::ControlApi,
    identity::{Identity, grpc::IdentityApi},
    leader::{Elector, LeaderInfo, LeaderState},
    metrics::ControlMetrics,
    rest,
    rollout::driver::Driver,
};

/// A started mesh-control replica.
#[derive(Debug)]
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    leader: watch::Receiver<LeaderState>,
    trigger: Trigger,
    tasks: JoinSet<()>,
}

/// Why mesh-control could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Consul client could not be built.
    #[error(transparent)]
    Consul(#[from] ConfigError),
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
    /// The gRPC listener's TLS cannot be set up.
    #[error("grpc_tls: {0}")]
    Tls(String),
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Binds the listeners and starts serving; metrics go to `registry`.
    pub async fn start(config: &Config, registry: Registry) -> Result<Self, StartError> {
        let consul = Client::new(&config.consul)?;
        let grpc = bind(config.grpc_listen, "gRPC").await?;
        let http = bind(config.http_listen, "HTTP").await?;
        let (grpc_addr, http_addr) = (
            local_addr(&grpc, config.grpc_listen)?,
            local_addr(&http, config.http_listen)?,
        );
        let metrics = ControlMetrics::new(&registry);
        let me = LeaderInfo {
            replica: config.replica.clone(),
            // Bridges dial what is published: https with grpc_tls.
            grpc: if config.grpc_tls {
                format!("https://{grpc_addr}")
            } else {
                format!("http://{grpc_addr}")
            },
            http: format!("http://{http_addr}"),
            since_ms: 0,
        };
        let (elector, leader) =
            Elector::new(consul.clone(), me, config.leader_ttl, metrics.clone());
        let identity = Identity::new(consul.clone(), config.identity.clone(), metrics.clone());
        let own = identity
            .enabled()
            .then(|| OwnIdentity::new(identity.clone()));
        let control = Control::new(ControlParts {
            consul: consul.clone(),
            nginx: config.nginx.clone(),
            bridge_port: config.bridge_port,
            deployers: DeployerSettings {
                port: config.deployer_port,
                token: config.deployer_token.clone(),
                tls: config.deployer_mtls.then(|| own.clone()).flatten(),
            },
            monitor: config.monitor_addr.clone(),
            own: own.clone(),
            replica: config.replica.clone(),
            leader: leader.clone(),
            metrics,
        })
        .with_default_intention(config.default_intention);
        let admin = Admin::new(registry);
        let (trigger, shutdown) = shutdown::channel();
        let mut tasks = JoinSet::new();
        tasks.spawn(
            elector
                .run(shutdown.clone())
                .instrument(tracing::info_span!("leader")),
        );
        tasks.spawn(readiness(admin.clone(), leader.clone(), shutdown.clone()));
        if identity.enabled() {
            tasks.spawn(
                identity
                    .clone()
                    .prepare(shutdown.clone())
                    .instrument(tracing::info_span!("identity")),
            );
        }
        let api = rest::ApiAuth::new(config.api_token.as_ref());
        let tls = match (config.grpc_tls, &own) {
            (true, Some(own)) => {
                let me = SpiffeId::service(&config.identity.trust_domain, CONTROL_SERVICE)
                    .map_err(|e| StartError::Tls(e.to_string()))?;
                let tls = Arc::new(ServerTls::held(me));
                tasks.spawn(
                    own.clone()
                        .serve_with(tls.clone(), shutdown.clone())
                        .instrument(tracing::info_span!("grpc_tls")),
                );
                Some(tls)
            }
            _ => None,
        };
        tasks.spawn(serve_grpc(
            grpc,
            ControlApi::new(control.clone()),
            api.clone(),
            IdentityApi::new(identity),
            tls,
            shutdown.clone(),
        ));
        tasks.spawn(
            Driver::new(control.clone(), leader.clone(), config.replica.clone())
                .run(shutdown.clone()),
        );
        tasks.spawn(
            deploy::driver::Driver::new(control.clone(), leader.clone(), config.replica.clone())
                .run(shutdown.clone())
                .instrument(tracing::info_span!("deployments")),
        );
        let (publisher, subscriptions) = Publisher::new();
        tasks.spawn(
            publisher
                .run(
                    ConsulSource::new(control.clone(), consul, leader.clone()),
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("dashboard")),
        );
        let dashboard = Dashboard::new(subscriptions, shutdown.clone());
        let router = admin
            .router(api.protect(rest::router(control).merge(dashboard.router())))
            .layer(middleware::from_fn_with_state(
                leader.clone(),
                ready_names_leader,
            ));
        tasks.spawn(admin::serve(http, router, shutdown));
        tracing::info!(
            replica = %config.replica, grpc = %grpc_addr, http = %http_addr,
            consul = ?config.consul.addrs, api_token = config.api_token.is_some(),
            "mesh-control started"
        );
        Ok(Self {
            grpc_addr,
            http_addr,
            leader,
            trigger,
            tasks,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Who leads, as this replica knows it.
    pub fn leader(&self) -> watch::Receiver<LeaderState> {
        self.leader.clone()
    }

    /// Stops accepting, releases the leader lock, and waits for the tasks
    /// up to `grace`; `false` when they did not finish in time.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.trigger.trigger();
        let drained = async move { while self.tasks.join_next().await.is_some() {} };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        what: "local address",
        addr,
        source,
    })
}

/// Ready while Consul answers the leader lock's calls: a replica that
/// cannot reach Consul can neither read nor write the model.
async fn readiness(admin: Admin, mut leader: watch::Receiver<LeaderState>, mut shutdown: Shutdown) {
    loop {
        admin.set_ready(leader.borrow_and_update().consul_ok);
        tokio::select! {
            _ = shutdown.requested() => break,
            changed = leader.changed() => if changed.is_err() { break },
        }
    }
    admin.set_ready(false);
}

/// `/ready` also says who leads (body line and `x-mesh-leader` header).
async fn ready_names_leader(
    State(leader): State<watch::Receiver<LeaderState>>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() != "/ready" {
        return next.run(request).await;
    }
    let status = next.run(request).await.status();
    let state = leader.borrow().clone();
    let name = state.leader.map(|l| l.replica).unwrap_or_default();
    let who = match (name.is_empty(), state.is_leader) {
        (true, _) => "leader: none".to_owned(),
        (false, true) => format!("leader: {name} (this replica)"),
        (false, false) => format!("leader: {name}"),
    };
    let head = if status.is_success() {
        "ready"
    } else {
        "not ready"
    };
    let mut response = (status, format!("{head}\n{who}\n")).into_response();
    if let Ok(value) = name.parse() {
        response.headers_mut().insert("x-mesh-leader", value);
    }
    response
}

/// Serves `mesh.v1.Control` (behind `auth`), `mesh.v1.Identity` (its own
/// Serves Control, Identity and grpc.health.v1 until `shutdown`; with
/// `tls`, over TLS to other hosts (plaintext to this one).
async fn serve_grpc(
    listener: TcpListener,
    api: ControlApi,
    auth: rest::ApiAuth,
    identity: IdentityApi,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<mesh_proto::v1::control_server::ControlServer<ControlApi>>()
        .await;
    reporter
        .set_serving::<mesh_proto::v1::identity_server::IdentityServer<IdentityApi>>()
        .await;
    // Every caller authenticates with a token (or, to Identity, its node's
    // certificate): TLS here authenticates mesh-control to them.
    let policy = tls
        .as_ref()
        .map(|_| Arc::new(TokenCallers) as Arc<dyn CallPolicy>);
    let router = Server::builder()
        // A span per call, child of the caller's traceparent, when tracing is on.
        .trace_fn(mesh_runtime::telemetry::grpc_server_span)
        .add_service(health)
        .add_service(InterceptedService::new(
            Authorize::new(api.into_server(), policy.clone()),
            auth,
        ))
        .add_service(identity.into_service(policy));
    let result =
        mesh_runtime::pki::grpc::serve(router, listener, tls, Plaintext::Loopback, shutdown).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// mesh-control's gRPC callers over TLS: any, with or without a
/// certificate; the services check their tokens (and Identity a node's
/// certificate) themselves.
#[derive(Debug)]
struct TokenCallers;

impl CallPolicy for TokenCallers {
    fn check(&self, _: &str, _: &str, _: &SpiffeId) -> Result<(), String> {
        Ok(())
    }

    fn anonymous(&self, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
}
