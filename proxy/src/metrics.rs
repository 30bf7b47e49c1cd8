//! The proxy's metrics, registered once on the registry passed down from
//! `main`. Per-service handles ([`ServiceMetrics`]) are made when a routing
//! table is built and kept in its entries, so recording a request is a few
//! atomic adds: no label is formatted, nothing is looked up.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::StatusCode;
use mesh_runtime::metrics::{Counter, Gauge, Histogram, Registry};

use crate::{limits::Limit, protocol::Protocol};

pub(crate) const REQUESTS: &str = "mesh_proxy_requests_total";
pub(crate) const DURATION: &str = "mesh_proxy_request_duration_seconds";
const UPSTREAM_ERRORS: &str = "mesh_proxy_upstream_errors_total";
const ENDPOINTS: &str = "mesh_proxy_endpoints";
const DISCOVERY_CONNECTED: &str = "mesh_proxy_discovery_connected";
const DISCOVERY_UPDATES: &str = "mesh_proxy_discovery_updates_total";
const DUMP_AGE: &str = "mesh_proxy_dump_age_seconds";
const REGISTRATIONS: &str = "mesh_proxy_registrations_total";
const QUEUE_DEPTH: &str = "mesh_proxy_queue_depth";
const RETRIES: &str = "mesh_proxy_retries_total";
const EJECTIONS: &str = "mesh_proxy_ejections_total";
const EJECTED: &str = "mesh_proxy_endpoints_ejected";
pub(crate) const OVERLOADED: &str = "mesh_proxy_overloaded_total";
const PEERS: &str = "mesh_proxy_peers";
const PEER_REQUESTS: &str = "mesh_proxy_peer_requests_total";
const PEER_CONNECTIONS: &str = "mesh_proxy_peer_connections";
const INBOUND_REQUESTS: &str = "mesh_proxy_inbound_requests_total";
const INBOUND_CONNECTIONS: &str = "mesh_proxy_inbound_connections_total";
const INBOUND_REFUSED: &str = "mesh_proxy_inbound_refused_total";
const INBOUND_TLS_FAILURES: &str = "mesh_proxy_inbound_tls_failures_total";
const TLS_RELOADS: &str = "mesh_proxy_tls_reloads_total";
const NODE_CONFIG_VERSION: &str = "mesh_proxy_node_config_version";
const NODE_CONFIGS: &str = "mesh_proxy_node_configs_total";

/// The service label of the outbound listener's own limits.
pub const LISTENER: &str = "_listener";

/// The service label of requests that matched no service.
pub const UNROUTED: &str = "_unrouted";

/// Every metric the proxy records, except the per-service ones it makes on
/// demand with [`ProxyMetrics::service`].
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    services: Mutex<HashMap<String, Arc<ServiceMetrics>>>,
    peer_handles: Mutex<HashMap<String, Arc<PeerMetrics>>>,
    unrouted: Arc<ServiceMetrics>,
    /// 1 while the discovery stream is up.
    pub discovery_connected: Gauge,
    /// Snapshots and deltas applied.
    pub discovery_updates: Counter,
    /// Age of the last good dump (written or loaded), in seconds.
    pub dump_age: Gauge,
    /// Registration API calls by outcome.
    pub registrations: Registrations,
    /// Items waiting in the registration queue.
    pub queue_depth: Gauge,
    /// Requests the listener shed (`listener_max_requests`).
    pub listener_overloaded: Counter,
    /// Connections the listener shed (`listener_max_connections`).
    pub listener_shed_connections: Counter,
    /// Other nodes' proxies known now.
    pub peers: Gauge,
    /// The node config version in effect (0: none).
    pub node_config_version: Gauge,
    /// Node configs from mesh-control applied.
    pub node_configs_applied: Counter,
    /// Node configs from mesh-control refused (the last good one kept).
    pub node_configs_refused: Counter,
}

/// One peer's handles (another node's proxy), kept in the peer map.
#[derive(Debug)]
pub struct PeerMetrics {
    /// Requests sent through it, HTTP/1.1 (upgrades) and HTTP/2.
    requests: [Counter; 2],
    /// Connections open to it, HTTP/1.1 and HTTP/2.
    connections: [Gauge; 2],
}

/// The inbound listener's handles (requests from other nodes' proxies).
#[derive(Debug)]
pub struct InboundMetrics {
    /// Requests by protocol (HTTP/1.1, HTTP/2) and status class 1xx..5xx.
    requests: [[Counter; 5]; 2],
    /// Connections that carried a request, by protocol.
    connections: [Counter; 2],
    /// Requests the listener answered itself, by reason.
    refused: [Counter; InboundMetrics::REASONS.len()],
    /// Connections closed before HTTP because TLS failed, by reason.
    tls_failures: [Counter; InboundMetrics::TLS_REASONS.len()],
}

/// `mesh_proxy_registrations_total` by `outcome`.
#[derive(Debug)]
pub struct Registrations {
    /// Forwarded and applied by the bridge.
    pub applied: Counter,
    /// Accepted into a durable queue (ours or the bridge's).
    pub queued: Counter,
    /// Refused as invalid.
    pub invalid: Counter,
    /// Failed otherwise.
    pub failed: Counter,
}

/// One service's handles, kept in its routing-table entry.
#[derive(Debug)]
pub struct ServiceMetrics {
    /// Requests by status class, 1xx..5xx.
    requests: [Counter; 5],
    duration: Histogram,
    /// Failed connects to an instance.
    pub connect_errors: Counter,
    /// Instances that failed before answering.
    pub send_errors: Counter,
    /// Requests that ran out of time.
    pub timeouts: Counter,
    /// Healthy endpoints in the current table.
    pub endpoints: Gauge,
    /// Retries sent.
    pub retries_sent: Counter,
    /// Retries not sent: over the retry budget.
    pub retries_budget_exhausted: Counter,
    /// Instances ejected by outlier detection.
    pub ejections: Counter,
    /// Instances ejected now.
    pub ejected: Gauge,
    /// Requests refused by a limit: connections, pending, requests.
    overloaded: [Counter; 3],
}

// === impl ProxyMetrics ===

impl ProxyMetrics {
    /// Describes and registers everything on `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe_counter(REQUESTS, "Requests proxied, by service and status class.");
        registry.describe_histogram(
            DURATION,
            "Time from request to response headers, by service, in seconds.",
        );
        registry.describe_counter(
            UPSTREAM_ERRORS,
            "Failed attempts to reach an instance, by service and kind (connect, send, timeout).",
        );
        registry.describe_gauge(
            ENDPOINTS,
            "Healthy endpoints per service in the routing table.",
        );
        registry.describe_gauge(
            DISCOVERY_CONNECTED,
            "1 while the discovery stream to the bridge is up.",
        );
        registry.describe_counter(
            DISCOVERY_UPDATES,
            "Routing snapshots and deltas received from the bridge.",
        );
        registry.describe_gauge(DUMP_AGE, "Age of the last good routing dump, in seconds.");
        registry.describe_counter(REGISTRATIONS, "Agent API registrations, by outcome.");
        registry.describe_gauge(
            QUEUE_DEPTH,
            "Registrations waiting in the proxy's durable queue.",
        );
        registry.describe_counter(
            RETRIES,
            "Retries by service and outcome (sent, budget_exhausted).",
        );
        registry.describe_counter(
            EJECTIONS,
            "Instances ejected by outlier detection, by service.",
        );
        registry.describe_gauge(EJECTED, "Instances ejected now, by service.");
        registry.describe_counter(
            OVERLOADED,
            "Requests refused at once by a limit, by service and limit.",
        );
        registry.describe_gauge(PEERS, "Other nodes' proxies known (service mesh-proxy).");
        registry.describe_counter(
            PEER_REQUESTS,
            "Requests sent through another node's proxy, by peer node and protocol.",
        );
        registry.describe_gauge(
            PEER_CONNECTIONS,
            "Connections open to another node's proxy, by peer node and protocol.",
        );
        registry.describe_counter(
            INBOUND_REQUESTS,
            "Requests from other nodes' proxies on the inbound listener, by protocol and status class.",
        );
        registry.describe_counter(
            INBOUND_CONNECTIONS,
            "Inbound listener connections that carried a request, by protocol.",
        );
        registry.describe_counter(
            INBOUND_REFUSED,
            "Requests the inbound listener answered itself, by reason.",
        );
        registry.describe_counter(
            INBOUND_TLS_FAILURES,
            "Inbound connections closed before HTTP (mtls mode), by reason: plaintext, timeout, no_certificate, untrusted, expired, identity, handshake.",
        );
        registry.describe_counter(
            TLS_RELOADS,
            "Changes of the TLS folder (mtls mode), by outcome: applied, or refused and the last good credentials kept.",
        );
        registry.describe_gauge(
            NODE_CONFIG_VERSION,
            "The node's config version from mesh-control in effect; 0: none.",
        );
        registry.describe_counter(
            NODE_CONFIGS,
            "Node config versions from mesh-control, by outcome (applied, refused).",
        );
        let outcome = |o: &str| registry.counter(REGISTRATIONS, &[("outcome", o)]);
        Self {
            node_config_version: registry.gauge(NODE_CONFIG_VERSION, &[]),
            node_configs_applied: registry.counter(NODE_CONFIGS, &[("outcome", "applied")]),
            node_configs_refused: registry.counter(NODE_CONFIGS, &[("outcome", "refused")]),
            unrouted: Arc::new(ServiceMetrics::new(registry, UNROUTED)),
            services: Mutex::new(HashMap::new()),
            peer_handles: Mutex::new(HashMap::new()),
            peers: registry.gauge(PEERS, &[]),
            discovery_connected: registry.gauge(DISCOVERY_CONNECTED, &[]),
            discovery_updates: registry.counter(DISCOVERY_UPDATES, &[]),
            dump_age: registry.gauge(DUMP_AGE, &[]),
            registrations: Registrations {
                applied: outcome("applied"),
                queued: outcome("queued"),
                invalid: outcome("invalid"),
                failed: outcome("failed"),
            },
            queue_depth: registry.gauge(QUEUE_DEPTH, &[]),
            listener_overloaded: registry.counter(
                OVERLOADED,
                &[
                    ("service", LISTENER),
                    ("limit", Limit::ListenerRequests.as_str()),
                ],
            ),
            listener_shed_connections: registry.counter(
                OVERLOADED,
                &[
                    ("service", LISTENER),
                    ("limit", Limit::ListenerConnections.as_str()),
                ],
            ),
            registry: registry.clone(),
        }
    }

    /// The handles of `service`, made on first use. Called when a routing
    /// table is built, never per request.
    pub fn service(&self, service: &str) -> Arc<ServiceMetrics> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(ServiceMetrics::new(&self.registry, service)))
            .clone()
    }

    /// The handles for requests that matched no service.
    pub fn unrouted(&self) -> &ServiceMetrics {
        &self.unrouted
    }

    /// The handles of the peer on `node`, made on first use. Called when
    /// the peers are rebuilt, never per request.
    pub fn peer(&self, node: &str) -> Arc<PeerMetrics> {
        let mut peers = self.peer_handles.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(node.to_owned())
            .or_insert_with(|| Arc::new(PeerMetrics::new(&self.registry, node)))
            .clone()
    }

    /// The inbound listener's handles.
    pub fn inbound(&self) -> InboundMetrics {
        InboundMetrics::new(&self.registry)
    }

    /// `mesh_proxy_tls_reloads_total`: applied, refused.
    pub fn tls_reloads(&self) -> [Counter; 2] {
        ["applied", "refused"].map(|o| self.registry.counter(TLS_RELOADS, &[("outcome", o)]))
    }
}

// === impl PeerMetrics ===

impl PeerMetrics {
    fn new(registry: &Registry, node: &str) -> Self {
        let requests =
            |p: &str| registry.counter(PEER_REQUESTS, &[("peer", node), ("protocol", p)]);
        let connections =
            |p: &str| registry.gauge(PEER_CONNECTIONS, &[("peer", node), ("protocol", p)]);
        Self {
            requests: [requests("http1"), requests("h2")],
            connections: [connections("http1"), connections("h2")],
        }
    }

    /// Counts a request sent through the peer over `protocol`.
    pub fn request(&self, protocol: Protocol) {
        self.requests[protocol_index(protocol)].increment(1);
    }

    /// Sets the connections open to the peer.
    pub fn set_connections(&self, http1: usize, h2: usize) {
        self.connections[0].set(http1 as f64);
        self.connections[1].set(h2 as f64);
    }
}

// === impl InboundMetrics ===

impl InboundMetrics {
    /// Why the inbound listener answers a request itself: the `reason` label.
    pub const REASONS: [&'static str; 9] = [
        "bad_request",
        "missing_endpoint",
        "bad_endpoint",
        "unknown_instance",
        "foreign_instance",
        "intention",
        "overloaded",
        "connect_failed",
        "upstream_failed",
    ];

    /// Why an inbound connection was closed before HTTP in mtls mode:
    /// the `reason` label (see [`crate::tls::HandshakeFailure`]).
    pub const TLS_REASONS: [&'static str; 7] = [
        "plaintext",
        "timeout",
        "no_certificate",
        "untrusted",
        "expired",
        "identity",
        "handshake",
    ];

    fn new(registry: &Registry) -> Self {
        let class = |p: &str, c: &str| {
            registry.counter(INBOUND_REQUESTS, &[("protocol", p), ("code_class", c)])
        };
        let classes = |p: &str| {
            [
                class(p, "1xx"),
                class(p, "2xx"),
                class(p, "3xx"),
                class(p, "4xx"),
                class(p, "5xx"),
            ]
        };
        let connections = |p: &str| registry.counter(INBOUND_CONNECTIONS, &[("protocol", p)]);
        Self {
            requests: [classes("http1"), classes("h2")],
            connections: [connections("http1"), connections("h2")],
            refused: Self::REASONS.map(|r| registry.counter(INBOUND_REFUSED, &[("reason", r)])),
            tls_failures: Self::TLS_REASONS
                .map(|r| registry.counter(INBOUND_TLS_FAILURES, &[("reason", r)])),
        }
    }

    /// Records one request that arrived over `protocol` and was answered
    /// with `status`.
    pub fn record(&self, protocol: Protocol, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.requests[protocol_index(protocol)][class].increment(1);
    }

    /// Counts a connection whose first request arrived over `protocol`.
    pub fn connection(&self, protocol: Protocol) {
        self.connections[protocol_index(protocol)].increment(1);
    }

    /// Counts a request answered by the listener itself for `reason`, one
    /// of [`InboundMetrics::REASONS`].
    pub fn refused(&self, reason: &str) {
        if let Some(i) = Self::REASONS.iter().position(|r| *r == reason) {
            self.refused[i].increment(1);
        }
    }

    /// Counts a connection closed because its TLS failed for `reason`, one
    /// of [`InboundMetrics::TLS_REASONS`].
    pub fn tls_failure(&self, reason: &str) {
        if let Some(i) = Self::TLS_REASONS.iter().position(|r| *r == reason) {
            self.tls_failures[i].increment(1);
        }
    }
}

fn protocol_index(protocol: Protocol) -> usize {
    match protocol {
        Protocol::Http1 => 0,
        Protocol::Http2 => 1,
    }
}

// === impl ServiceMetrics ===

impl ServiceMetrics {
    fn new(registry: &Registry, service: &str) -> Self {
        let class =
            |c: &str| registry.counter(REQUESTS, &[("service", service), ("code_class", c)]);
        let error =
            |k: &str| registry.counter(UPSTREAM_ERRORS, &[("service", service), ("kind", k)]);
        let retries = |o: &str| registry.counter(RETRIES, &[("service", service), ("outcome", o)]);
        let overloaded =
            |l: Limit| registry.counter(OVERLOADED, &[("service", service), ("limit", l.as_str())]);
        Self {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: registry.histogram(DURATION, &[("service", service)]),
            connect_errors: error("connect"),
            send_errors: error("send"),
            timeouts: error("timeout"),
            endpoints: registry.gauge(ENDPOINTS, &[("service", service)]),
            retries_sent: retries("sent"),
            retries_budget_exhausted: retries("budget_exhausted"),
            ejections: registry.counter(EJECTIONS, &[("service", service)]),
            ejected: registry.gauge(EJECTED, &[("service", service)]),
            overloaded: [
                overloaded(Limit::Connections),
                overloaded(Limit::Pending),
                overloaded(Limit::Requests),
            ],
        }
    }

    /// Counts a request refused by `limit`.
    pub fn overloaded(&self, limit: Limit) -> &Counter {
        match limit {
            Limit::Connections => &self.overloaded[0],
            Limit::Pending => &self.overloaded[1],
            Limit::Requests | Limit::ListenerRequests | Limit::ListenerConnections => {
                &self.overloaded[2]
            }
        }
    }

    /// Records one answered request.
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.requests[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_handles_are_made_once_and_recorded() {
        let registry = Registry::new();
        let m = ProxyMetrics::new(&registry);
        let a = m.service("orders");
        let b = m.service("orders");
        assert!(Arc::ptr_eq(&a, &b));
        a.record(StatusCode::OK, Duration::from_millis(3));
        a.record(StatusCode::BAD_GATEWAY, Duration::from_millis(3));
        a.endpoints.set(2.0);
        let text = registry.render();
        assert!(
            text.contains(r#"mesh_proxy_requests_total{service="orders",code_class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_proxy_requests_total{service="orders",code_class="5xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_proxy_endpoints{service="orders"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("mesh_proxy_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
