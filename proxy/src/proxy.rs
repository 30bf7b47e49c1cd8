//! The request path, one chain read top-down:
//! route (which service) → prepare (hygiene, URI) → balance (which
//! instance) → retry/timeout → connect (a pooled connection) → respond.
//!
//! Nothing here locks the routing table (an `ArcSwap` load) or allocates
//! beyond what hyper needs for a Host-routed request on a warm connection:
//! the URI and headers are reused, bodies are enums, metric handles live in
//! the table. A path-routed request allocates its shortened URI; a
//! retryable request (bodyless GET/HEAD/OPTIONS, with retries on) keeps a
//! copy of its headers in case the instance fails after they were sent.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version, header::HOST};
use http_body::Body;
use hyper::body::Incoming;

use crate::{
    agent::Agent,
    balance::{self, Tried},
    body::{ProxyBody, UpstreamBody},
    config::{Config, LoadBalancing},
    error::ProxyError,
    headers::{append_forwarded_for, strip_hop_by_hop},
    metrics::ProxyMetrics,
    route::{self, Route},
    table::{Routes, Service, Source},
    upstream::PooledBody,
};

/// The outbound proxy: everything a request needs, shared by connections.
#[derive(Debug)]
pub struct Proxy {
    routes: Arc<Routes>,
    agent: Agent,
    metrics: Arc<ProxyMetrics>,
    lb: LoadBalancing,
    retries: u32,
    request_timeout: Duration,
    connect_timeout: Duration,
}

/// What a request copies to be replayed after a failure once sent: only a
/// bodyless idempotent request is replayed.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
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
        Self {
            routes,
            agent,
            metrics,
            lb: config.lb,
            retries: config.retries,
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
        }
    }

    /// Answers one client request; `client` is the client's address as an
    /// `X-Forwarded-For` value (made once per connection).
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: HeaderValue,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let target = match self.target(&req) {
            Ok(Some(target)) => target,
            Ok(None) => return Ok(self.agent.handle(req).await),
            Err(e) => {
                let response = e.to_response();
                self.metrics
                    .unrouted()
                    .record(response.status(), start.elapsed());
                return Ok(response);
            }
        };
        let (service, strip) = target;
        let response = match self.forward(&service, req, strip, &client).await {
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
                e.to_response()
            }
        };
        service.metrics.record(response.status(), start.elapsed());
        Ok(response)
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
        let table = self.routes.load();
        match table.get(name) {
            Some(service) => Ok(Some((service.clone(), strip))),
            None if table.source == Source::None => Err(ProxyError::NoRoutes),
            None => Err(ProxyError::UnknownService {
                service: name.to_ascii_lowercase().into(),
            }),
        }
    }

    /// Prepares the request for the instance and sends it, retrying what
    /// is safe to retry, within the request timeout.
    async fn forward(
        &self,
        service: &Arc<Service>,
        req: Request<Incoming>,
        strip: usize,
        client: &HeaderValue,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if service.endpoints().is_empty() {
            return Err(ProxyError::NoHealthyInstance {
                service: service.name().clone(),
            });
        }
        let (req, replay) = self.prepare(req, strip, client)?;
        match tokio::time::timeout(self.request_timeout, self.attempts(service, req, replay)).await
        {
            Ok(result) => result,
            Err(_) => {
                service.metrics.timeouts.increment(1);
                Err(ProxyError::Timeout {
                    service: service.name().clone(),
                    timeout: self.request_timeout,
                })
            }
        }
    }

    /// Hygiene and the upstream URI; keeps a replay copy when it may be used.
    fn prepare(
        &self,
        req: Request<Incoming>,
        strip: usize,
        client: &HeaderValue,
    ) -> Result<(Request<UpstreamBody>, Option<Replay>), ProxyError> {
        let (mut parts, body) = req.into_parts();
        let uri = route::upstream_uri(&parts.uri, strip)?;
        strip_hop_by_hop(&mut parts.headers);
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
        // Upstream connections are HTTP/1.1 whatever the client spoke.
        parts.version = Version::HTTP_11;
        let replay = (self.retries > 0
            && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
            && body.is_end_stream())
        .then(|| Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        });
        Ok((
            Request::from_parts(parts, UpstreamBody::Incoming(body)),
            replay,
        ))
    }

    /// Up to `1 + retries` attempts, each on an instance not tried yet.
    /// A failed connect, or a pooled connection found closed before the
    /// request went out, is retried whatever the method; a failure after
    /// sending only for a replayable request.
    async fn attempts(
        &self,
        service: &Arc<Service>,
        mut req: Request<UpstreamBody>,
        replay: Option<Replay>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut tried = Tried::default();
        let mut last = None;
        for _ in 0..=self.retries {
            let Some(i) = balance::pick(self.lb, service, &tried) else {
                break;
            };
            let upstream = &service.endpoints()[i].upstream;
            let in_flight = upstream.start();
            let mut lease = match upstream.checkout(self.connect_timeout).await {
                Ok(lease) => lease,
                Err(source) => {
                    service.metrics.connect_errors.increment(1);
                    tracing::debug!(service = %service.name(), host = upstream.host(), port = upstream.port(), error = %source, "connect failed");
                    tried.add(i);
                    last = Some(ProxyError::Connect {
                        service: service.name().clone(),
                        source,
                    });
                    continue;
                }
            };
            match lease.sender.try_send_request(req).await {
                Ok(response) => return Ok(respond(response, lease.sender, in_flight)),
                Err(mut e) => {
                    service.metrics.send_errors.increment(1);
                    let unsent = e.take_message();
                    let sent = unsent.is_none();
                    let source = e.into_error();
                    tracing::debug!(service = %service.name(), host = upstream.host(), port = upstream.port(), reused = lease.reused, sent, error = %source, "instance failed before answering");
                    // A reused connection most likely went stale while
                    // idle: the instance itself may be fine.
                    if !lease.reused {
                        tried.add(i);
                    }
                    let error = ProxyError::Upstream {
                        service: service.name().clone(),
                        source,
                        sent,
                    };
                    req = match (unsent, &replay) {
                        (Some(req), _) => req,
                        (None, Some(replay)) => replay.request(),
                        (None, None) => return Err(error),
                    };
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| ProxyError::NoHealthyInstance {
            service: service.name().clone(),
        }))
    }
}

/// The instance's response, cleaned of hop-by-hop headers, its body
/// holding the connection until read to the end.
fn respond(
    response: Response<Incoming>,
    sender: crate::upstream::Sender,
    in_flight: crate::upstream::InFlight,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        ProxyBody::Upstream(PooledBody::new(body, sender, in_flight)),
    )
}

// === impl Replay ===

impl Replay {
    fn request(&self) -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}
