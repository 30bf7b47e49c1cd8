//! The inbound listener: where other nodes' proxies send requests for this
//! node's instances (see [`crate::peer`]). It serves HTTP/2 (h2c, prior
//! knowledge: the peers' multiplexed connections) and HTTP/1.1 (upgrades,
//! such as WebSocket, which exist in HTTP/1.1 only).
//!
//! Each request names its instance in `x-mesh-endpoint:
//! <service>/<instance id>`. The listener is no open relay: it forwards
//! only to an instance its own routing table shows registered on its own
//! node ([`resolve`]); a request without the header gets 400, one naming
//! an unknown instance or one on another node gets 421 (Misdirected
//! Request) naming it. It then strips the hop's headers and forwards the
//! request to the instance over the instance's protocol, once: balancing,
//! retries and outlier detection are the calling proxy's. Answers it makes
//! itself carry `x-mesh-refused: <kind>` so that the calling proxy counts
//! them as a failed attempt on the instance and does not relay them.
//!
//! The accepted stream goes through an [`Acceptor`] before HTTP is spoken
//! on it: plain TCP in direct mode; in mtls mode a TLS handshake (within
//! [`crate::tls::HANDSHAKE_TIMEOUT`]) that presents the node's certificate
//! and requires one from the peer that the mesh CA issued, naming one
//! identity of the trust domain. A connection that speaks cleartext or
//! fails the handshake is closed and counted
//! (`mesh_proxy_inbound_tls_failures_total{reason}`); the peer's identity
//! goes into each of its requests' extensions ([`PeerIdentity`]) and the
//! access log's `peer`.
//!
//! In mtls mode every request is then judged by the intentions
//! ([`crate::intentions`]) before it is forwarded: the caller is the
//! service of the peer's identity (none for a node's), the callee the
//! service of the instance named, with the method and the normalized
//! path. A denied request gets 403 with `x-mesh-refused: intention` and a
//! one-line reason naming both services and what decided; unlike the
//! other refusals, the calling proxy relays it to its caller as it is.
//!
//! On shutdown the listener closes, HTTP/2 connections get a GOAWAY, and
//! requests and tunnels in flight finish within the owner's grace period.

use std::{
    convert::Infallible,
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version,
    header::{CONNECTION, HOST},
};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown, telemetry::HttpSpan};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::Instrument;

use crate::{
    access_log::{Direction, Entry, Logger},
    body::{ProxyBody, UpstreamBody},
    config::Config,
    error::json_error,
    headers::{check_transfer_encoding, strip_request_hop_by_hop, upgrade_of},
    intentions::{Denied, Enforcer},
    limits::{Counters, Permit},
    metrics::InboundMetrics,
    peer::{self, ENDPOINT_HEADER, EndpointRef, PROTOCOL_HEADER, REFUSED_HEADER},
    protocol::Protocol,
    route,
    server::Limits,
    table::{Routes, RoutingTable},
    tls::{MeshTls, PeerIdentity},
    upgrade::Tunnels,
    upstream::{H2_MAX_STREAMS, Upstream},
};

/// HTTP/2 PING interval on a peer's connection, and how long the answer may
/// take: finds a peer that vanished without a FIN.
const H2_KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// How an accepted connection is secured before HTTP is spoken on it.
///
/// The handshake runs in the connection's own task, and the TLS stream is
/// served like the TCP one.
#[derive(Clone, Debug, Default)]
pub enum Acceptor {
    /// Cleartext: h2c with prior knowledge, or HTTP/1.1 (direct mode).
    #[default]
    Plain,
    /// mTLS with the mesh identities (mtls mode): h2 or HTTP/1.1 by ALPN.
    Tls(Arc<MeshTls>),
}

/// The inbound side of the proxy: what every inbound request needs.
#[derive(Debug)]
pub struct Inbound {
    routes: Arc<Routes>,
    node: Box<str>,
    metrics: InboundMetrics,
    connect_timeout: Duration,
    counters: Arc<Counters>,
    max_requests: Option<usize>,
    max_connections: Option<usize>,
    tunnels: Tunnels,
    /// Where each answered request is logged, when `access_log` is set.
    access_log: Option<Arc<Logger>>,
    /// The intentions every request is judged by (mtls mode).
    intentions: Option<Arc<Enforcer>>,
}

/// Why the inbound listener answers a request itself.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not a request the hop carries.
    #[error("{0}")]
    BadRequest(&'static str),
    /// No `x-mesh-endpoint`.
    #[error(
        "no x-mesh-endpoint header: the inbound listener takes requests from other nodes' proxies, naming an instance as <service>/<instance id>"
    )]
    MissingEndpoint,
    /// `x-mesh-endpoint` does not read.
    #[error("bad x-mesh-endpoint header: {0}")]
    BadEndpoint(String),
    /// The instance is not in this node's table.
    #[error("instance {id:?} of service {service:?} is not registered on node {node}")]
    UnknownInstance {
        /// The service named.
        service: String,
        /// The instance named.
        id: String,
        /// This node.
        node: String,
    },
    /// The instance runs on another node.
    #[error(
        "instance {id:?} of service {service:?} runs on node {on}, not on {node}: this proxy forwards only to its own node's instances"
    )]
    ForeignInstance {
        /// The service named.
        service: String,
        /// The instance named.
        id: String,
        /// Its node.
        on: String,
        /// This node.
        node: String,
    },
    /// The intentions deny it.
    #[error("{0}")]
    Intention(Denied),
    /// Over `listener_max_requests`.
    #[error("the inbound listener is at its limit ({max} concurrent requests); try again later")]
    Overloaded {
        /// The limit.
        max: usize,
    },
    /// No connection to the instance.
    #[error("could not connect to instance {id:?} of service {service:?}")]
    Connect {
        /// The service.
        service: String,
        /// The instance.
        id: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The instance failed before answering.
    #[error("instance {id:?} of service {service:?} failed before answering")]
    Upstream {
        /// The service.
        service: String,
        /// The instance.
        id: String,
        /// Why.
        #[source]
        source: crate::h1::BoxError,
    },
}

/// The instance a request is forwarded to.
#[derive(Debug)]
pub struct Target {
    /// Its service's name.
    pub service: Arc<str>,
    /// Its ID.
    pub id: String,
    /// Its connection state, shared with the routing table.
    pub upstream: Arc<Upstream>,
    /// The protocol it declares.
    pub protocol: Protocol,
    /// The protocol the calling proxy chose for it, if it said.
    pub chosen: Option<Protocol>,
}

/// What each connection shares with the listener.
#[derive(Clone)]
struct Shared {
    builder: Arc<auto::Builder<TokioExecutor>>,
    inbound: Arc<Inbound>,
    acceptor: Acceptor,
    closing: watch::Receiver<bool>,
}

// === impl Inbound ===

impl Inbound {
    /// The inbound side of a proxy on `config.node`, forwarding by `routes`.
    pub fn new(config: &Config, routes: Arc<Routes>, metrics: InboundMetrics) -> Self {
        Self {
            routes,
            node: config.node.as_str().into(),
            metrics,
            connect_timeout: config.connect_timeout,
            counters: Arc::default(),
            max_requests: config.listener_max_requests,
            max_connections: config.listener_max_connections,
            tunnels: Tunnels::default(),
            access_log: None,
            intentions: None,
        }
    }

    /// Judges every request by `intentions` before it is forwarded.
    pub fn with_intentions(mut self, intentions: Option<Arc<Enforcer>>) -> Self {
        self.intentions = intentions;
        self
    }

    /// Logs every answered request with `logger` (see [`crate::access_log`]).
    pub fn with_access_log(mut self, logger: Option<Arc<Logger>>) -> Self {
        self.access_log = logger;
        self
    }

    /// The open upgrade tunnels, which the listener drains.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Answers one request from another node's proxy. With tracing on,
    /// the request gets a server span (`proxy.inbound`), child of the
    /// calling proxy's attempt by its `traceparent`, and the instance's
    /// request a client span (`proxy.forward`).
    pub async fn serve(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(span) = HttpSpan::server("proxy.inbound", req.method(), req.headers()) else {
            return self.handle(req, None).await;
        };
        let response = self.handle(req, Some(&span)).await;
        span.set_status_code(response.status().as_u16());
        span.end();
        response
    }

    /// [`Inbound::serve`] within the request's span, if traced.
    async fn handle(
        &self,
        req: Request<Incoming>,
        trace: Option<&HttpSpan>,
    ) -> Response<ProxyBody> {
        let start = tokio::time::Instant::now();
        let protocol = protocol_of(req.version());
        // Kept for the access log only: the request is forwarded whole.
        let head = self.access_log.as_ref().map(|_| {
            let peer = req.extensions().get::<PeerIdentity>().cloned();
            (req.method().clone(), req.uri().clone(), peer)
        });
        let mut target = None;
        let (mut reason, mut named) = ("", None);
        let response = match self.forward(req, &mut target, trace).await {
            Ok(response) => response,
            Err(refusal) => {
                reason = refusal.kind();
                if head.is_some() {
                    named = refusal.service().map(Arc::<str>::from);
                }
                if matches!(refusal, Refusal::Connect { .. } | Refusal::Upstream { .. }) {
                    tracing::warn!(error = %refusal, cause = ?std::error::Error::source(&refusal), "inbound request failed");
                } else {
                    tracing::debug!(error = %refusal, "inbound request refused");
                }
                self.metrics.refused(refusal.kind());
                refusal.to_response()
            }
        };
        self.metrics.record(protocol, response.status());
        let (Some(log), Some((method, uri, peer))) = (&self.access_log, head) else {
            return response;
        };
        let (service, upstream) = target.map_or((named, None), |(s, u)| (Some(s), Some(u)));
        let mut entry = Entry::new(
            Direction::Inbound,
            service.unwrap_or_default(),
            method,
            uri,
            response.status(),
        );
        entry.upstream = upstream;
        entry.reason = reason;
        entry.peer = peer;
        log.wrap(response, entry, start)
    }

    /// Forwards `req` to the instance it names, which `resolved` is set
    /// to; within a client span, child of `trace`, when traced.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        resolved: &mut Option<(Arc<str>, Arc<Upstream>)>,
        trace: Option<&HttpSpan>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        if req.method() == Method::CONNECT {
            return Err(Refusal::BadRequest("CONNECT is not supported"));
        }
        let permit = Permit::listener(&self.counters, self.max_requests).map_err(|_| {
            Refusal::Overloaded {
                max: self.max_requests.unwrap_or(0),
            }
        })?;
        check_transfer_encoding(req.headers()).map_err(Refusal::BadRequest)?;
        let target = resolve(&self.routes.load(), &self.node, req.headers())?;
        if let Some(intentions) = &self.intentions {
            authorize(intentions, &req, &target.service)?;
        }
        // Only now: a request the intentions refuse names its service in
        // the access log (from the refusal), never an instance.
        if self.access_log.is_some() {
            *resolved = Some((target.service.clone(), target.upstream.clone()));
        }
        // The calling proxy's side of an upgrade, completed once the 101
        // has been relayed.
        let upgrade =
            upgrade_of(req.version(), req.headers()).map(|_| hyper::upgrade::on(&mut req));
        let mut req = prepare(req)?;
        if let Some(trace) = trace {
            trace.set_str("mesh.service", &target.service);
        }
        let span = trace.map(|trace| {
            let span = trace.client("proxy.forward", 1);
            span.set_str("mesh.service", &target.service);
            span.set_str("mesh.instance", &target.id);
            span.set_str("mesh.peer.node", &self.node);
            span.inject(req.headers_mut());
            span
        });
        let forwarded = self.send(req, &target, permit, upgrade).await;
        if let Some(span) = span {
            match &forwarded {
                Ok(response) => span.set_status_code(response.status().as_u16()),
                Err(refusal) => span.set_error(refusal),
            }
            span.end();
        }
        forwarded
    }

    /// Sends the prepared `req` to `target`, once.
    async fn send(
        &self,
        req: Request<UpstreamBody>,
        target: &Target,
        permit: Permit,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let protocol = Protocol::choose(req.headers(), target.chosen, target.protocol);
        let in_flight = target.upstream.start();
        let lease = target
            .upstream
            .checkout(protocol, self.connect_timeout)
            .await
            .map_err(|source| Refusal::Connect {
                service: target.service.to_string(),
                id: target.id.clone(),
                source,
            })?;
        // No deadline of its own: the calling proxy's per-try and overall
        // timeouts end the request by resetting its stream, which drops
        // this future and the instance's request with it.
        let response = lease
            .sender
            .send(req, in_flight)
            .await
            .map_err(|e| Refusal::Upstream {
                service: target.service.to_string(),
                id: target.id.clone(),
                source: e.error,
            })?;
        let mut response = crate::proxy::respond(response);
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(self.tunnels.open(&target.service, upgrade, response));
        }
        if let ProxyBody::Upstream(body) = response.body_mut() {
            body.hold(permit);
        }
        Ok(response)
    }
}

/// The instance `headers` name, if this proxy (on `node`, routing by
/// `table`) may forward to it: registered, passing, and on this node.
pub fn resolve(table: &RoutingTable, node: &str, headers: &HeaderMap) -> Result<Target, Refusal> {
    let mut values = headers.get_all(ENDPOINT_HEADER).iter();
    let value = values.next().ok_or(Refusal::MissingEndpoint)?;
    if values.next().is_some() {
        return Err(Refusal::BadEndpoint("more than one header".into()));
    }
    let named = EndpointRef::decode(value).map_err(Refusal::BadEndpoint)?;
    let unknown = || Refusal::UnknownInstance {
        service: named.service.clone(),
        id: named.id.clone(),
        node: node.to_owned(),
    };
    // The peers' own service is never a destination: it would loop.
    if peer::is_peer_service(&named.service) {
        return Err(unknown());
    }
    let service = table.get(&named.service).ok_or_else(unknown)?;
    // IDs are unique per node only: look for the one on this node first.
    let mut elsewhere = None;
    for e in service.endpoints().iter().filter(|e| e.id == named.id) {
        if *e.node == *node {
            return Ok(Target {
                service: service.name().clone(),
                id: named.id,
                upstream: e.upstream.clone(),
                protocol: e.protocol,
                chosen: headers
                    .get(PROTOCOL_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
            });
        }
        elsewhere.get_or_insert_with(|| e.node.clone());
    }
    match elsewhere {
        Some(on) => Err(Refusal::ForeignInstance {
            service: named.service,
            id: named.id,
            on,
            node: node.to_owned(),
        }),
        None => Err(unknown()),
    }
}

/// Judges `req` for the instance of `service` by `intentions`: the caller
/// is the service of the peer's identity.
fn authorize(intentions: &Enforcer, req: &Request<Incoming>, service: &str) -> Result<(), Refusal> {
    let caller = req
        .extensions()
        .get::<PeerIdentity>()
        .and_then(|peer| peer.0.service_name());
    let normalized = route::normalize(req.uri())
        .map_err(|_| Refusal::BadRequest("the request target is not a valid path"))?;
    let path = normalized.as_ref().unwrap_or(req.uri()).path();
    intentions
        .authorize(caller, service, req.method().as_str(), path)
        .map_err(Refusal::Intention)
}

/// The request as the instance gets it: the hop's headers and hop-by-hop
/// headers gone, an origin-form URI with a `Host` header, HTTP/1.1 (see
/// `upstream::Sender::send`). `X-Forwarded-For` stays as the
/// calling proxy set it: the hop between proxies is not the caller's.
fn prepare(req: Request<Incoming>) -> Result<Request<UpstreamBody>, Refusal> {
    let (mut parts, body) = req.into_parts();
    let upgrade = upgrade_of(parts.version, &parts.headers);
    peer::unmark(&mut parts.headers);
    strip_request_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(HOST)
        && let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(HOST, host);
    }
    if let Some(uri) = route::upstream_uri(&parts.uri, 0)
        .map_err(|_| Refusal::BadRequest("the request target is not a valid path"))?
    {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, UpstreamBody::Incoming(body)))
}

fn protocol_of(version: Version) -> Protocol {
    if version == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    }
}

// === impl Acceptor ===

impl Acceptor {
    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

// === impl Refusal ===

impl Refusal {
    /// A stable machine-readable name: the body's `error`, the
    /// `x-mesh-refused` value and the metric's `reason`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::MissingEndpoint => "missing_endpoint",
            Self::BadEndpoint(_) => "bad_endpoint",
            Self::UnknownInstance { .. } => "unknown_instance",
            Self::ForeignInstance { .. } => "foreign_instance",
            Self::Intention(_) => peer::INTENTION_REFUSAL,
            Self::Overloaded { .. } => "overloaded",
            Self::Connect { .. } => "connect_failed",
            Self::Upstream { .. } => "upstream_failed",
        }
    }

    /// The status the sender receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::MissingEndpoint | Self::BadEndpoint(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::UnknownInstance { .. } | Self::ForeignInstance { .. } => {
                StatusCode::MISDIRECTED_REQUEST
            }
            Self::Intention(_) => StatusCode::FORBIDDEN,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The service concerned, when the request named one.
    pub fn service(&self) -> Option<&str> {
        match self {
            Self::UnknownInstance { service, .. }
            | Self::ForeignInstance { service, .. }
            | Self::Connect { service, .. }
            | Self::Upstream { service, .. } => Some(service),
            Self::Intention(denied) => Some(denied.callee()),
            _ => None,
        }
    }

    /// The answer: the status, `{"error", "reason", "service"}` and
    /// `x-mesh-refused: <kind>`. Plain HTTP even for gRPC: the calling
    /// proxy reads it, and answers its own caller as that caller expects.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let mut response = json_error(
            self.status(),
            self.kind(),
            &self.to_string(),
            self.service(),
        );
        response
            .headers_mut()
            .insert(REFUSED_HEADER, HeaderValue::from_static(self.kind()));
        response
    }
}

// === the listener ===

/// Serves `inbound` on `listener` until `shutdown`, then drains: see the
/// module. The owner aborts the task when its grace period ends.
pub async fn serve(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    limits: Limits,
    acceptor: Acceptor,
    mut shutdown: Shutdown,
) {
    let (closing, closing_rx) = watch::channel(false);
    let shared = Shared {
        builder: Arc::new(builder(limits)),
        inbound,
        acceptor,
        closing: closing_rx,
    };
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    if shared.inbound.max_connections.is_some_and(|max| connections.len() >= max) {
                        tracing::warn!(%peer, "inbound listener at listener_max_connections; connection closed");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let span = tracing::debug_span!("inbound", %peer);
                    connections.spawn(connection(shared.clone(), stream).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = shutdown.requested() => break,
                    }
                }
            }
        }
    }
    drop(listener);
    let _ = closing.send(true);
    tracing::info!(
        connections = connections.len(),
        "inbound listener closed; draining"
    );
    while connections.join_next().await.is_some() {}
    shared.inbound.tunnels().drain().await;
}

/// Secures `stream` as the acceptor says, then serves it.
async fn connection(shared: Shared, stream: TcpStream) {
    match &shared.acceptor {
        Acceptor::Plain => serve_connection(shared, stream, None, None).await,
        Acceptor::Tls(tls) => match tls.accept(stream).await {
            Ok(Some(accepted)) => {
                let peer = accepted.peer;
                tracing::debug!(%peer, "inbound mTLS connection");
                serve_connection(shared, accepted.stream, Some(peer), accepted.expires).await;
            }
            // Closed before a byte: a TCP health check.
            Ok(None) => {}
            Err(failure) => {
                tracing::info!(reason = failure.kind(), error = %failure, "inbound connection refused before HTTP");
                shared.inbound.metrics.tls_failure(failure.kind());
            }
        },
    }
}

/// Serves one connection until it closes, until the listener drains, or
/// until `expires` (its peer's certificate expires: the calling proxy
/// opens a new connection with its renewed certificate); `peer` is the
/// identity its TLS handshake verified. The last two end it gracefully.
async fn serve_connection<IO>(
    shared: Shared,
    io: IO,
    peer: Option<PeerIdentity>,
    expires: Option<SystemTime>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Shared {
        builder,
        inbound,
        mut closing,
        ..
    } = shared;
    // Counted at the first request: a health check's bare connect is none.
    let counted = Arc::new(AtomicBool::new(false));
    let service = service_fn(move |mut req: Request<Incoming>| {
        let (inbound, counted) = (inbound.clone(), counted.clone());
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        async move {
            let protocol = protocol_of(req.version());
            if !counted.swap(true, Ordering::Relaxed) {
                inbound.metrics.connection(protocol);
            }
            let mut response = inbound.serve(req).await;
            // An HTTP/1.1 connection serves one exchange, unless it became
            // a tunnel: the calling proxy then never pools it with the
            // instance's own connections.
            if protocol == Protocol::Http1 && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let done = |result: Result<(), Box<dyn std::error::Error + Send + Sync>>| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "inbound connection ended with an error");
        }
    };
    let expiry = async {
        match expires {
            Some(at) => {
                let left = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = conn.as_mut() => return done(result),
        _ = closing.wait_for(|c| *c) => {}
        () = expiry => {
            tracing::debug!("inbound connection ends: its peer's certificate expired");
        }
    }
    conn.as_mut().graceful_shutdown();
    done(conn.await);
}

/// The outbound listener's builder, with HTTP/2 tuned for peers: as many
/// streams as a calling proxy sends on one connection, pings to find a
/// peer that vanished.
fn builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = crate::server::builder(limits);
    builder
        .http2()
        .max_concurrent_streams(u32::try_from(H2_MAX_STREAMS).unwrap_or(u32::MAX))
        .adaptive_window(true)
        .keep_alive_interval(H2_KEEP_ALIVE.0)
        .keep_alive_timeout(H2_KEEP_ALIVE.1);
    builder
}

#[cfg(test)]
mod tests;
