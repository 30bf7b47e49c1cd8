//! The proxy's own admin routes, next to the shared `/live`, `/ready` and
//! `/metrics`:
//!
//! - `/routes`: what the proxy routes to right now and where it came from
//!   (nginx-upsync's `upstream_show`), with each endpoint's load, latency
//!   estimate and ejection, the other nodes' proxies requests to their
//!   nodes' instances go through, the node config version from
//!   mesh-control in effect (or refused, and why), and in mtls mode the
//!   identities this proxy presents (serial, expiry).
//! - `/stats`: readiness, the node config version in effect, and the
//!   outbound requests, errors and latency since the proxy started, as
//!   JSON (see [`stats`](crate::stats)); the bridge serves it to
//!   mesh-control as `Registry.ProxyStats`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, Router, extract::State, routing::get};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    intentions::{Enforcer, IntentionsView},
    node_config,
    peer::{PeerView, Peers},
    stats::{Stats, StatsSource},
    table::{Routes, RoutingTable, Source, now_unix_ms},
    tls::TlsView,
};

/// `/routes` as JSON.
#[derive(Debug, Serialize)]
pub struct RoutesView {
    /// The proxy process's id: during a takeover both processes answer on
    /// the shared admin port, and this tells them apart.
    pub pid: u32,
    /// `live`, `dump` or `none`.
    pub source: &'static str,
    /// The bridge's version of the table.
    pub version: u64,
    /// Seconds since the table's data was produced.
    pub age_seconds: f64,
    /// When it was produced, Unix milliseconds.
    pub updated_at_unix_ms: u64,
    /// Services and their endpoints, by name.
    pub services: BTreeMap<String, Vec<EndpointView>>,
    /// Other nodes' proxies, by node: requests to an instance on one of
    /// these nodes go through its proxy.
    pub peers: BTreeMap<String, PeerView>,
    /// The node config from mesh-control: the version in effect, the last
    /// one refused and why, and where each route table comes from.
    pub config: node_config::Status,
    /// mtls mode: the identities presented now; absent in direct mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsView>,
    /// mtls mode: the intentions in force on the inbound listener (no
    /// `revision`: none, every request is denied); absent in direct mode,
    /// which enforces none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intentions: Option<IntentionsView>,
}

/// One endpoint in `/routes`.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// Instance ID.
    pub id: String,
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Consul node.
    pub node: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Requests in flight to it.
    pub in_flight: usize,
    /// When its ejection by outlier detection ends, in Unix milliseconds;
    /// `null` when it is not ejected.
    pub ejected_until: Option<u64>,
    /// Its failures in a row so far.
    pub consecutive_failures: u32,
    /// Its peak-EWMA latency estimate, in milliseconds.
    pub latency_ewma_ms: f64,
}

/// What `/routes` shows.
type Shown = (
    Arc<Routes>,
    Arc<Peers>,
    watch::Receiver<node_config::Status>,
    Option<Arc<Enforcer>>,
);

/// The router serving `/routes` and `/stats`.
pub fn router(
    routes: Arc<Routes>,
    peers: Arc<Peers>,
    config: watch::Receiver<node_config::Status>,
    intentions: Option<Arc<Enforcer>>,
    stats: StatsSource,
) -> Router {
    Router::new()
        .route("/routes", get(show))
        .with_state((routes, peers, config, intentions))
        .merge(
            Router::new()
                .route("/stats", get(stats_json))
                .with_state(stats),
        )
}

async fn stats_json(State(stats): State<StatsSource>) -> Json<Stats> {
    Json(stats.snapshot())
}

async fn show(State((routes, peers, config, intentions)): State<Shown>) -> Json<RoutesView> {
    let mut view = RoutesView::of(&routes.load_full());
    view.peers = peers.view();
    view.tls = peers.tls().map(|tls| tls.view());
    view.config = config.borrow().clone();
    view.intentions = intentions.map(|i| i.view());
    Json(view)
}

// === impl RoutesView ===

impl RoutesView {
    /// The view of `table`.
    pub fn of(table: &RoutingTable) -> Self {
        let now = tokio::time::Instant::now();
        let now_ms = now_unix_ms();
        let services = table.map_endpoints(|e| EndpointView {
            id: e.id.clone(),
            address: e.upstream.host().to_owned(),
            port: e.upstream.port(),
            node: e.node.clone(),
            tags: e.tags.clone(),
            in_flight: e.upstream.in_flight(),
            ejected_until: e.state.health.ejected_until(now).map(|until| {
                let left = until.saturating_duration_since(now).as_millis();
                now_ms.saturating_add(u64::try_from(left).unwrap_or(u64::MAX))
            }),
            consecutive_failures: e.state.health.consecutive_failures(),
            latency_ewma_ms: (e.state.ewma.estimate(now) / 1e4).round() / 100.0,
        });
        let age_ms = match table.source {
            Source::None => 0,
            _ => now_unix_ms().saturating_sub(table.updated_at_unix_ms),
        };
        Self {
            pid: std::process::id(),
            source: match table.source {
                Source::None => "none",
                Source::Dump => "dump",
                Source::Live => "live",
            },
            version: table.version,
            age_seconds: age_ms as f64 / 1000.0,
            updated_at_unix_ms: table.updated_at_unix_ms,
            services,
            peers: BTreeMap::new(),
            config: node_config::Status {
                source: "none",
                ..node_config::Status::default()
            },
            tls: None,
            intentions: None,
        }
    }
}
