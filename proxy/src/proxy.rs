//! The request path, one chain read top-down:
//! screen (framing, the path normalized) → route (which service) → policy
//! (the route's, its limits) → prepare (hygiene, URI, replay copy) →
//! balance (which instance) → retry/timeout
//! (per try, overall, budget) → connect (a pooled connection) → respond;
//! every attempt's outcome feeds the balancer and outlier detection.
//!
//! A request the proxy answers itself is answered without reading its
//! body: hyper then discards a body it already holds whole and otherwise
//! closes the connection after the answer, so an unread body is never
//! parsed as the next request. One refused as malformed at screening
//! closes its connection whatever it carried.
//!
//! Nothing here locks the routing table (an `ArcSwap` load) or allocates
//! beyond what hyper needs for a Host-routed request on a warm connection:
//! the URI and headers are reused, bodies are enums, metric handles live in
//! the table. A path-routed request allocates its shortened URI, and a
//! path to normalize (dot-segments, `//`) its normalized one; a
//! retryable request (idempotent, or allowed by its route) keeps a copy of
//! its headers, and of its body up to 64 KiB, in case the instance fails
//! after they were sent. The route's policy is one `ArcSwap` load and a
//! lookup by name.
//!
//! Traces (see `mesh_runtime::telemetry`): without `otlp_endpoint` a
//! request pays one atomic load for them and no header is read; with it,
//! a server span per request and a client span per attempt, whose
//! context goes to the instance (or the peer proxy) as `traceparent`.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;

use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, HOST},
};
use http_body::Body;
use hyper::body::Incoming;
use mesh_runtime::telemetry::HttpSpan;
use tokio::time::Instant;

use crate::{
    access_log::{Direction, Entry, Logger},
    agent::Agent,
    balance::{self, Tried, ewma::FAILURE_RTT},
    body::{ProxyBody, UpstreamBody},
    config::Config,
    error::ProxyError,
    headers::{
        append_forwarded_for, check_transfer_encoding, strip_request_hop_by_hop,
        strip_response_hop_by_hop, upgrade_of,
    },
    limits::{Counters, Limit, Permit},
    metrics::ProxyMetrics,
    outlier,
    peer::{self, Peers},
    policy::{Policies, RoutePolicy},
    protocol::{self, Protocol},
    retry::{self, Captured, REPLAY_LIMIT, RetryBody},
    route::{self, Route},
    table::{Endpoint, Routes, Service, Source},
    tls::{Identity, MeshTls, SOURCE_HEADER},
    upgrade::Tunnels,
    upstream::PooledBody,
};

/// The outbound proxy: everything a request needs, shared by connections.
#[derive(Debug)]
pub struct Proxy {
    routes: Arc<Routes>,
    agent: Agent,
    metrics: Arc<ProxyMetrics>,
    policies: ArcSwap<Policies>,
    listener: Arc<Counters>,
    listener_max_requests: Option<usize>,
    listener_max_connections: Option<usize>,
    /// What a shed connection is sent (made once).
    shed_response: Bytes,
    connect_timeout: Duration,
    tunnels: Tunnels,
    /// Other nodes' proxies, which carry requests to their nodes' instances.
    peers: Arc<Peers>,
    /// The identities of mtls mode; `None`: direct mode.
    tls: Option<Arc<MeshTls>>,
    /// Where each answered request is logged, when `access_log` is set.
    access_log: Option<Arc<Logger>>,
}

/// What the attempts of a request did, for its access log line, and the
/// request's span their client spans are children of.
#[derive(Debug, Default)]
struct Attempted<'a> {
    /// The endpoint of the last attempt.
    last: Option<usize>,
    /// Attempts after the first.
    retries: u32,
    /// The request's server span; `None`: tracing is off.
    trace: Option<&'a HttpSpan>,
}

/// What a request copies to be replayed after a failure once sent.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The body's copy; `None`: the request has no body.
    body: Option<Arc<OnceLock<Captured>>>,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy routing with `routes`, serving the agent API with `agent`.
    pub fn new(
        config: &Config,
        routes: Arc<Routes>,
        agent: Agent,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        // `Config::validate` checked them: only a config built by hand
        // can get here with bad ones.
        let policies = Policies::from_config(config).unwrap_or_else(|e| {
            tracing::error!(error = %e, "route policies refused; using the built-in defaults");
            Policies::builtin()
        });
        Self {
            routes,
            agent,
            peers: Arc::new(Peers::new(&config.node, metrics.clone())),
            metrics,
            policies: ArcSwap::from_pointee(policies),
            listener: Arc::default(),
            listener_max_requests: config.listener_max_requests,
            listener_max_connections: config.listener_max_connections,
            shed_response: ProxyError::Overloaded {
                service: None,
                limit: Limit::ListenerConnections,
                max: config.listener_max_connections.unwrap_or(0),
            }
            .to_raw_response()
            .into(),
            connect_timeout: config.connect_timeout,
            tunnels: Tunnels::default(),
            tls: None,
            access_log: None,
        }
    }

    /// mtls mode with `tls` (see [`crate::tls`]): requests to another
    /// node's instances go through its proxy over mTLS, speaking for the
    /// calling service.
    pub fn with_tls(mut self, tls: Option<Arc<MeshTls>>) -> Self {
        let node = self.peers.node().to_owned();
        self.peers = Arc::new(Peers::new(&node, self.metrics.clone()).with_tls(tls.clone()));
        self.tls = tls;
        self
    }

    /// Logs every answered request with `logger` (see [`crate::access_log`]).
    pub fn with_access_log(mut self, logger: Option<Arc<Logger>>) -> Self {
        self.access_log = logger;
        self
    }

    /// Makes `policies` the route policies of every request from now on
    /// (requests in flight keep theirs).
    pub fn set_policies(&self, policies: Policies) {
        self.policies.store(Arc::new(policies));
    }

    /// The route policies in effect.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.load_full()
    }

    /// Whether the listener, holding `open` client connections, must shed
    /// the next one.
    pub fn sheds_connection(&self, open: usize) -> bool {
        self.listener_max_connections.is_some_and(|max| open >= max)
    }

    /// Sheds a client connection: a 503 written without waiting (the
    /// socket's buffer is empty), then closed.
    pub fn shed(&self, stream: tokio::net::TcpStream) {
        self.metrics.listener_shed_connections.increment(1);
        let _ = stream.try_write(&self.shed_response);
        drop(stream);
    }

    /// The open upgrade tunnels (WebSocket), which the listener drains.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Other nodes' proxies, as the request path sees them.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Answers one client request; `client` is the client's address as an
    /// `X-Forwarded-For` value (made once per connection). With tracing on,
    /// the request gets a server span (`proxy.outbound`), child of its
    /// `traceparent` when it carries a valid one.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: HeaderValue,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let Some(span) = HttpSpan::server("proxy.outbound", req.method(), req.headers()) else {
            return Ok(self.handle(req, client, None).await);
        };
        let response = self.handle(req, client, Some(&span)).await;
        span.set_status_code(response.status().as_u16());
        span.end();
        Ok(response)
    }

    /// [`Proxy::serve`] within the request's span, if traced.
    async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: HeaderValue,
        trace: Option<&HttpSpan>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        // A gRPC caller gets the proxy's own errors as gRPC statuses.
        let grpc = protocol::is_grpc(req.headers());
        let error_response = |e: &ProxyError| {
            if grpc {
                e.to_grpc_response()
            } else {
                e.to_response()
            }
        };
        // A malformed request is answered, and its connection closed,
        // before anything else reads it.
        if let Err(e) = screen(&mut req) {
            let mut response = error_response(&e);
            if req.version() != Version::HTTP_2 {
                // Its connection is not trusted further: the body (if
                // any) may be framed otherwise than hyper read it, and
                // what follows must never be parsed as a request.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            self.metrics
                .unrouted()
                .record(response.status(), start.elapsed());
            return self.log_local(response, &req, start, Logger::unrouted, e.kind());
        }
        // Shed before doing any work for it.
        let permit = match Permit::listener(&self.listener, self.listener_max_requests) {
            Ok(permit) => permit,
            Err(e) => {
                self.metrics.listener_overloaded.increment(1);
                let response = error_response(&e);
                return self.log_local(response, &req, start, Logger::listener, e.kind());
            }
        };
        let target = match self.target(&req) {
            Ok(Some(target)) => target,
            Ok(None) => return self.agent.handle(req).await,
            Err(e) => {
                let response = error_response(&e);
                self.metrics
                    .unrouted()
                    .record(response.status(), start.elapsed());
                return self.log_local(response, &req, start, Logger::unrouted, e.kind());
            }
        };
        let (service, strip) = target;
        if let Some(span) = trace {
            span.set_str("mesh.service", service.name());
        }
        // Kept for the access log only: the request is forwarded whole.
        let head = self
            .access_log
            .as_ref()
            .map(|_| (req.method().clone(), req.uri().clone()));
        // The client's side of an upgrade, taken before the request is
        // forwarded; it completes once the 101 has been relayed.
        let upgrade =
            upgrade_of(req.version(), req.headers()).map(|_| hyper::upgrade::on(&mut req));
        let mut attempted = Attempted {
            trace,
            ..Attempted::default()
        };
        let mut reason = "";
        let forwarded = self
            .forward(&service, req, strip, &client, permit, &mut attempted)
            .await;
        let response = match forwarded {
            Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.tunnels.open(service.name(), upgrade, response)
            }
            Ok(response) => response,
            Err(e) => {
                // An instance that failed is worth a line; a service
                // without instances shows in the metrics and /routes.
                if matches!(
                    e,
                    ProxyError::Connect { .. }
                        | ProxyError::Upstream { .. }
                        | ProxyError::Timeout { .. }
                ) {
                    tracing::warn!(service = %service.name(), error = %e, cause = ?std::error::Error::source(&e), "request failed");
                }
                reason = e.kind();
                error_response(&e)
            }
        };
        service.metrics.record(response.status(), start.elapsed());
        let (Some(log), Some((method, uri))) = (&self.access_log, head) else {
            return response;
        };
        let mut entry = Entry::new(
            Direction::Outbound,
            service.name().clone(),
            method,
            uri,
            response.status(),
        );
        entry.upstream = attempted
            .last
            .map(|i| service.endpoints()[i].upstream.clone());
        entry.retries = attempted.retries;
        entry.reason = reason;
        log.wrap(response, entry, start)
    }

    /// `response` logged (when the access log is on) as an answer the
    /// proxy made itself to `req`, before it was routed to an instance.
    /// `service` is the pseudo-service it is counted under; `reason`, the
    /// error's kind.
    fn log_local<B>(
        &self,
        response: Response<ProxyBody>,
        req: &Request<B>,
        start: Instant,
        service: fn(&Logger) -> Arc<str>,
        reason: &'static str,
    ) -> Response<ProxyBody> {
        let Some(log) = &self.access_log else {
            return response;
        };
        let mut entry = Entry::new(
            Direction::Outbound,
            service(log),
            req.method().clone(),
            req.uri().clone(),
            response.status(),
        );
        entry.reason = reason;
        log.wrap(response, entry, start)
    }

    /// The service a request is for and how much of its path to strip;
    /// `None` for the agent API.
    fn target(&self, req: &Request<Incoming>) -> Result<Option<(Arc<Service>, usize)>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest("CONNECT is not supported".into()));
        }
        let (name, strip) = match route::route(req)? {
            Route::Agent => return Ok(None),
            Route::Host(name) => (name, 0),
            Route::Path { name, strip } => (name, strip),
        };
        // The peers' own service is no destination (see `peer`).
        if peer::is_peer_service(name) {
            return Err(ProxyError::UnknownService {
                service: name.to_ascii_lowercase().into(),
            });
        }
        let table = self.routes.load();
        match table.get(name) {
            Some(service) => Ok(Some((service.clone(), strip))),
            None if table.source == Source::None => Err(ProxyError::NoRoutes),
            None => Err(ProxyError::UnknownService {
                service: name.to_ascii_lowercase().into(),
            }),
        }
    }

    /// Admits the request to its service, prepares it for the instance and
    /// sends it as the route's policy says.
    async fn forward(
        &self,
        service: &Arc<Service>,
        req: Request<Incoming>,
        strip: usize,
        client: &HeaderValue,
        mut permit: Permit,
        attempted: &mut Attempted<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if service.endpoints().is_empty() {
            return Err(ProxyError::NoHealthyInstance {
                service: service.name().clone(),
            });
        }
        let policy = self.policies.load().get(service.name()).clone();
        let counters = &service.state.counters;
        if let Err(e) = permit.admit(counters, service.name(), policy.limits.max_requests) {
            service.metrics.overloaded(Limit::Requests).increment(1);
            return Err(e);
        }
        let hash = policy.hash.as_ref().and_then(|h| h.hash(req.headers()));
        // Read before `prepare` strips it with every `x-mesh-*` header.
        let source = self
            .tls
            .as_ref()
            .map(|tls| tls.source(req.headers().get(SOURCE_HEADER)));
        let (req, replay) = self.prepare(req, strip, client, &policy)?;
        let now = Instant::now();
        service.state.budget.deposit(&policy.budget, now);
        let deadline = now + policy.timeout;
        let sent = Sent {
            source,
            hash,
            deadline,
            permit,
        };
        self.attempts(service, &policy, req, replay, sent, attempted)
            .await
    }

    /// Hygiene and the upstream URI; keeps a replay copy when it may be used.
    fn prepare(
        &self,
        req: Request<Incoming>,
        strip: usize,
        client: &HeaderValue,
        policy: &RoutePolicy,
    ) -> Result<(Request<UpstreamBody>, Option<Replay>), ProxyError> {
        let (mut parts, body) = req.into_parts();
        let uri = route::upstream_uri(&parts.uri, strip)?;
        let upgrade = upgrade_of(parts.version, &parts.headers);
        strip_request_hop_by_hop(&mut parts.headers, upgrade);
        if !parts.headers.contains_key(HOST) {
            // HTTP/2 carries the host in the URI; HTTP/1.1 needs the header.
            if let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(HOST, host);
            }
        }
        append_forwarded_for(&mut parts.headers, client);
        if let Some(uri) = uri {
            parts.uri = uri;
        }
        // HTTP/1.1 whatever the client spoke, also towards an HTTP/2
        // instance: see `upstream::Sender::send`.
        parts.version = Version::HTTP_11;
        let retryable = policy.retries > 0
            && (retry::is_idempotent(&parts.method) || policy.retry_non_idempotent);
        let (body, copy) = match body {
            body if !retryable => (UpstreamBody::Incoming(body), None),
            body if body.is_end_stream() => (UpstreamBody::Incoming(body), Some(None)),
            // Too big to keep a copy of: it will not be replayed.
            body if body.size_hint().lower() > REPLAY_LIMIT as u64 => {
                (UpstreamBody::Incoming(body), None)
            }
            body => {
                let (tee, captured) = RetryBody::tee(body);
                (UpstreamBody::Retry(tee), Some(Some(captured)))
            }
        };
        let replay = copy.map(|body| Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body,
        });
        Ok((Request::from_parts(parts, body), replay))
    }

    /// Up to `1 + retries` attempts, each on an instance not tried yet,
    /// within the route's deadline, each within its per-try timeout.
    ///
    /// A request that never left the proxy (failed connect, pooled
    /// connection found closed) is tried again whatever its method and
    /// without spending the budget. One that was sent (and failed, timed
    /// out, or was answered 502, 503 or 504) only when it is replayable and
    /// the retry budget allows. Every outcome feeds the instance's latency
    /// estimate and failure record.
    async fn attempts(
        &self,
        service: &Arc<Service>,
        policy: &RoutePolicy,
        req: Request<UpstreamBody>,
        replay: Option<Replay>,
        sent: Sent,
        attempted: &mut Attempted<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Sent {
            source,
            hash,
            deadline,
            permit,
        } = sent;
        let mut now = deadline - policy.timeout;
        let mut tried = Tried::default();
        let mut next = Some(req);
        // Whether the next attempt is a retry the budget must allow.
        let mut budgeted = false;
        let mut answer: Option<Response<ProxyBody>> = None;
        let mut error: Option<ProxyError> = None;
        for attempt in 0..=policy.retries {
            let Some(mut req) = next.take() else { break };
            if now >= deadline {
                error = Some(ProxyError::Timeout {
                    service: service.name().clone(),
                    timeout: policy.timeout,
                });
                break;
            }
            let Some(i) = balance::pick(service, policy, &tried, hash, now) else {
                break;
            };
            if attempt > 0 {
                if budgeted && !service.state.budget.withdraw(&policy.budget, now) {
                    service.metrics.retries_budget_exhausted.increment(1);
                    break;
                }
                service.metrics.retries_sent.increment(1);
                attempted.retries = attempt;
            }
            attempted.last = Some(i);
            let remaining = deadline.saturating_duration_since(now);
            let limit = policy
                .per_try_timeout
                .map_or(remaining, |t| t.min(remaining));
            let endpoint = &service.endpoints()[i];
            // Its client span's context goes as the request's traceparent.
            let span = attempted
                .trace
                .map(|parent| attempt_span(parent, service, endpoint, attempt, &mut req));
            let outcome = tokio::time::timeout(
                limit,
                self.attempt(service, policy, endpoint, source.as_ref(), req),
            )
            .await;
            if let Some(span) = span {
                end_attempt_span(span, &outcome);
            }
            let started = now;
            now = Instant::now();
            let elapsed = now - started;
            // Whether the request went out: then only a replay may go again.
            let sent = match outcome {
                Ok(Attempt::Answered(response)) => {
                    let status = response.status();
                    self.answered(service, policy, i, status, elapsed, now);
                    let again = matches!(status.as_u16(), 502..=504)
                        && attempt < policy.retries
                        && replay.as_ref().is_some_and(Replay::is_ready);
                    if !again {
                        return Ok(hold(response, permit));
                    }
                    tried.add(i);
                    // Kept in case no other instance answers better.
                    answer = Some(response);
                    true
                }
                Ok(Attempt::Refused(e)) => return Err(e),
                Ok(Attempt::Unsent {
                    req,
                    error: e,
                    stale,
                }) => {
                    if !stale {
                        tried.add(i);
                        self.failed(service, policy, i, elapsed, now);
                    }
                    next = Some(*req);
                    budgeted = false;
                    error = Some(e);
                    false
                }
                Ok(Attempt::Failed { error: e, stale }) => {
                    if !stale {
                        tried.add(i);
                        self.failed(service, policy, i, elapsed, now);
                    }
                    error = Some(e);
                    true
                }
                Err(_) => {
                    service.metrics.timeouts.increment(1);
                    tried.add(i);
                    self.failed(service, policy, i, elapsed, now);
                    tracing::debug!(service = %service.name(), host = endpoint.upstream.host(), port = endpoint.upstream.port(), ?limit, "attempt timed out");
                    let timeout = if now >= deadline {
                        policy.timeout
                    } else {
                        limit
                    };
                    error = Some(ProxyError::Timeout {
                        service: service.name().clone(),
                        timeout,
                    });
                    if now >= deadline {
                        break;
                    }
                    true
                }
            };
            if sent {
                next = replay.as_ref().and_then(Replay::request);
                budgeted = true;
            }
        }
        // The last answer (a 5xx no retry could better), else the last error.
        match (answer, error) {
            (Some(response), _) => Ok(hold(response, permit)),
            (None, Some(e)) => Err(e),
            (None, None) => Err(ProxyError::NoHealthyInstance {
                service: service.name().clone(),
            }),
        }
    }

    /// One attempt on `endpoint`: a connection within the service's
    /// limits, the request sent, the response headers. `source`: who the
    /// request speaks for towards another node (mtls mode).
    async fn attempt(
        &self,
        service: &Service,
        policy: &RoutePolicy,
        endpoint: &Endpoint,
        source: Option<&Arc<Identity>>,
        mut req: Request<UpstreamBody>,
    ) -> Attempt {
        let upstream = &endpoint.upstream;
        let in_flight = upstream.start();
        let protocol = Protocol::choose(req.headers(), policy.protocol, endpoint.protocol);
        let limits = &policy.limits;
        let Some(pending) = service.state.counters.try_pending(limits.max_pending) else {
            return self.refuse(service, Limit::Pending, limits.max_pending);
        };
        // Through the instance's node's proxy when it has one (see `peer`);
        // in mtls mode, only through it.
        let hop = match self.peers.hop(endpoint) {
            Ok(hop) => hop,
            Err(no_peer) => {
                drop(pending);
                return self.unreachable(service, req, no_peer);
            }
        };
        let checkout = match &hop {
            Some(peer) => {
                peer.checkout(req.headers(), source, self.connect_timeout)
                    .await
            }
            None => upstream.checkout(protocol, self.connect_timeout).await,
        };
        drop(pending);
        let lease = match checkout {
            Ok(lease) => lease,
            Err(source) => {
                service.metrics.connect_errors.increment(1);
                tracing::debug!(service = %service.name(), host = upstream.host(), port = upstream.port(), error = %source, "connect failed");
                return Attempt::Unsent {
                    req: Box::new(req),
                    error: ProxyError::Connect {
                        service: service.name().clone(),
                        source,
                    },
                    stale: false,
                };
            }
        };
        // Counted only when a connection was opened: the pooled path pays
        // nothing for the limit. The new one is dropped when over it.
        if !lease.reused
            && let Some(max) = limits.max_connections
            && service
                .endpoints()
                .iter()
                .map(|e| e.upstream.connections())
                .sum::<usize>()
                > max
        {
            return self.refuse(service, Limit::Connections, Some(max));
        }
        if let Some(peer) = &hop {
            peer.mark(req.headers_mut(), service.name(), endpoint, protocol);
        }
        match lease.sender.send(req, in_flight).await {
            Ok(response) => match hop
                .as_ref()
                .and_then(|peer| peer.refused(&response, service.name()))
            {
                Some(error) => Attempt::Failed {
                    error,
                    stale: false,
                },
                None => Attempt::Answered(relay(response, hop.is_some())),
            },
            Err(e) => {
                service.metrics.send_errors.increment(1);
                let mut unsent = e.unsent;
                if let (Some(req), Some(_)) = (unsent.as_mut(), &hop) {
                    peer::unmark(req.headers_mut());
                }
                let sent = unsent.is_none();
                let source = e.error;
                tracing::debug!(service = %service.name(), host = upstream.host(), port = upstream.port(), reused = lease.reused, sent, error = %source, "instance failed before answering");
                let error = ProxyError::Upstream {
                    service: service.name().clone(),
                    source,
                    sent,
                };
                // A reused connection most likely went stale while idle:
                // the instance itself may be fine.
                let stale = lease.reused;
                match unsent {
                    Some(req) => Attempt::Unsent {
                        req: Box::new(req),
                        error,
                        stale,
                    },
                    None => Attempt::Failed { error, stale },
                }
            }
        }
    }

    /// mtls mode: the instance's node has no proxy, and the instance is
    /// never called directly; a failed connect to it.
    fn unreachable(
        &self,
        service: &Service,
        req: Request<UpstreamBody>,
        no_peer: peer::NoPeer,
    ) -> Attempt {
        service.metrics.connect_errors.increment(1);
        Attempt::Unsent {
            req: Box::new(req),
            error: ProxyError::Connect {
                service: service.name().clone(),
                source: std::io::Error::other(no_peer),
            },
            stale: false,
        }
    }

    fn refuse(&self, service: &Service, limit: Limit, max: Option<usize>) -> Attempt {
        service.metrics.overloaded(limit).increment(1);
        Attempt::Refused(ProxyError::Overloaded {
            service: Some(service.name().clone()),
            limit,
            max: max.unwrap_or(0),
        })
    }

    /// Instance `i` answered with `status` after `elapsed`: a latency
    /// sample, and for a 5xx a failure (counted as slow, so that an
    /// instance failing fast does not draw traffic as if it were fast).
    fn answered(
        &self,
        service: &Service,
        policy: &RoutePolicy,
        i: usize,
        status: StatusCode,
        elapsed: Duration,
        now: Instant,
    ) {
        let state = &service.endpoints()[i].state;
        if status.is_server_error() {
            state.ewma.observe(elapsed.max(FAILURE_RTT), now);
            self.eject_maybe(service, policy, i, now);
        } else {
            state.ewma.observe(elapsed, now);
            state.health.record_success(now);
        }
    }

    /// Instance `i` failed (connect, reset, timeout) after `elapsed`: a
    /// failure, and a slow answer for its latency estimate.
    fn failed(
        &self,
        service: &Service,
        policy: &RoutePolicy,
        i: usize,
        elapsed: Duration,
        now: Instant,
    ) {
        service.endpoints()[i]
            .state
            .ewma
            .observe(elapsed.max(FAILURE_RTT), now);
        self.eject_maybe(service, policy, i, now);
    }

    /// Records a failure of instance `i`; ejects it when its streak is
    /// long enough and the service can spare it.
    fn eject_maybe(&self, service: &Service, policy: &RoutePolicy, i: usize, now: Instant) {
        let endpoint = &service.endpoints()[i];
        let max = policy.outlier.max_ejected(service.endpoints().len());
        let ejected = endpoint
            .state
            .health
            .record_failure(&policy.outlier, now, || {
                outlier::ejected_count(service, now) < max
            });
        if let Some(length) = ejected {
            service.metrics.ejections.increment(1);
            service
                .metrics
                .ejected
                .set(outlier::ejected_count(service, now) as f64);
            tracing::warn!(service = %service.name(), instance = %endpoint.id, host = endpoint.upstream.host(), port = endpoint.upstream.port(), ejected_for = ?length, "instance ejected after failing in a row");
        }
    }
}

/// Refuses what the proxy will not forward as hyper parsed it (a
/// `Transfer-Encoding` other than one `chunked`), and normalizes the path
/// that routing, policy and the instance then share (see [`crate::route`]).
fn screen<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    check_transfer_encoding(req.headers()).map_err(|e| ProxyError::BadRequest(e.into()))?;
    if let Some(uri) = route::normalize(req.uri())? {
        *req.uri_mut() = uri;
    }
    Ok(())
}

/// The client span of attempt `attempt` (from 0) of a request on
/// `endpoint`, child of the request's `parent`, its context written into
/// `req` as `traceparent`.
fn attempt_span(
    parent: &HttpSpan,
    service: &Service,
    endpoint: &Endpoint,
    attempt: u32,
    req: &mut Request<UpstreamBody>,
) -> HttpSpan {
    let span = parent.client("proxy.attempt", attempt + 1);
    span.set_str("mesh.service", service.name());
    span.set_str("mesh.peer.node", &endpoint.node);
    span.set_str("mesh.instance", &endpoint.id);
    span.inject(req.headers_mut());
    span
}

/// Ends an attempt's span with how the attempt ended.
fn end_attempt_span(span: HttpSpan, outcome: &Result<Attempt, tokio::time::error::Elapsed>) {
    match outcome {
        Ok(Attempt::Answered(response)) => span.set_status_code(response.status().as_u16()),
        Ok(Attempt::Refused(error)) => span.set_error(error),
        Ok(Attempt::Unsent { error, .. } | Attempt::Failed { error, .. }) => span.set_error(error),
        Err(elapsed) => span.set_error(elapsed),
    }
    span.end();
}

/// What every attempt of a request shares.
struct Sent {
    /// Who it speaks for towards another node (mtls mode).
    source: Option<Arc<Identity>>,
    /// Its consistent-hash key, if its route hashes.
    hash: Option<u64>,
    /// When its route's timeout ends.
    deadline: Instant,
    /// Its limit counts, held until its response body ends.
    permit: Permit,
}

/// How one attempt ended.
enum Attempt {
    /// The response headers arrived.
    Answered(Response<ProxyBody>),
    /// A limit refused it.
    Refused(ProxyError),
    /// It failed before the request left: here it is back (boxed: only
    /// failures pay for it). `stale`: on a reused connection, likely not
    /// the instance's fault.
    Unsent {
        req: Box<Request<UpstreamBody>>,
        error: ProxyError,
        stale: bool,
    },
    /// It failed after the request was sent.
    Failed { error: ProxyError, stale: bool },
}

/// The response with the request's limit counts held until its body ends.
fn hold(mut response: Response<ProxyBody>, permit: Permit) -> Response<ProxyBody> {
    if let ProxyBody::Upstream(body) = response.body_mut() {
        body.hold(permit);
    }
    response
}

/// [`respond`], keeping a peer's refusal by intentions marked as such
/// (`x-mesh-refused: intention`) for the caller; `hop`: the answer came
/// through a peer, the only one who may mark it.
fn relay(response: Response<PooledBody>, hop: bool) -> Response<ProxyBody> {
    let refused = hop && peer::is_intention_refusal(&response);
    let mut response = respond(response);
    if refused {
        response.headers_mut().insert(
            peer::REFUSED_HEADER,
            HeaderValue::from_static(peer::INTENTION_REFUSAL),
        );
    }
    response
}

/// The instance's response, cleaned of hop-by-hop headers, its body
/// holding the connection until read to the end. A 101 holds nothing: its
/// connection now belongs to the tunnel (its upgrade travels in the
/// response's extensions), and the request is over.
pub(crate) fn respond(response: Response<PooledBody>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_response_hop_by_hop(parts.status, &mut parts.headers);
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        return Response::from_parts(parts, ProxyBody::empty());
    }
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

// === impl Replay ===

impl Replay {
    /// Whether the body was kept whole, so the request may go again.
    fn is_ready(&self) -> bool {
        self.body.as_ref().is_none_or(|c| c.get().is_some())
    }

    /// The request again, if its body was kept whole.
    fn request(&self) -> Option<Request<UpstreamBody>> {
        let body = match &self.body {
            None => UpstreamBody::Empty,
            Some(captured) => UpstreamBody::Retry(RetryBody::replay(captured)?),
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }
}
