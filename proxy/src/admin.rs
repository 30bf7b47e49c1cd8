//! The proxy's own admin route, next to the shared `/live`, `/ready` and
//! `/metrics`: `/routes`, what the proxy routes to right now and where it
//! came from (nginx-upsync's `upstream_show`).

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, Router, extract::State, routing::get};
use serde::Serialize;

use crate::table::{Routes, RoutingTable, Source, now_unix_ms};

/// `/routes` as JSON.
#[derive(Debug, Serialize)]
pub struct RoutesView {
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
}

/// The router serving `/routes`.
pub fn router(routes: Arc<Routes>) -> Router {
    Router::new().route("/routes", get(show)).with_state(routes)
}

async fn show(State(routes): State<Arc<Routes>>) -> Json<RoutesView> {
    Json(RoutesView::of(&routes.load_full()))
}

// === impl RoutesView ===

impl RoutesView {
    /// The view of `table`.
    pub fn of(table: &RoutingTable) -> Self {
        let services = table
            .services()
            .map(|s| {
                let endpoints = s
                    .endpoints()
                    .iter()
                    .map(|e| EndpointView {
                        id: e.id.clone(),
                        address: e.upstream.host().to_owned(),
                        port: e.upstream.port(),
                        node: e.node.clone(),
                        tags: e.tags.clone(),
                        in_flight: e.upstream.in_flight(),
                    })
                    .collect();
                (s.name().to_string(), endpoints)
            })
            .collect();
        let age_ms = match table.source {
            Source::None => 0,
            _ => now_unix_ms().saturating_sub(table.updated_at_unix_ms),
        };
        Self {
            source: match table.source {
                Source::None => "none",
                Source::Dump => "dump",
                Source::Live => "live",
            },
            version: table.version,
            age_seconds: age_ms as f64 / 1000.0,
            updated_at_unix_ms: table.updated_at_unix_ms,
            services,
        }
    }
}
