//! The subscription to the bridge: `Discovery.Watch(node, services)`, each
//! snapshot (replace) or delta (upsert, remove) built into a new immutable
//! table and swapped in atomically. A broken stream is resubscribed with
//! jittered backoff; meanwhile the proxy keeps routing from the table it
//! has, so a bridge or registry outage never empties it. For the same
//! reason a snapshot without a single endpoint does not replace a table
//! that has some (deltas, which say what changed, always apply), and a
//! stale snapshot (the bridge cannot reach Consul) does not replace a table
//! loaded from the dump: a fresh snapshot follows when Consul is back.
//!
//! A message may also carry the node's config version from mesh-control:
//! it goes to the [`Layers`], which check it before it takes effect; and
//! the mesh's intentions, which go to the [`Enforcer`] (mtls mode).

use std::{sync::Arc, time::Duration};

use mesh_proto::v1::{self as pb, discovery_client::DiscoveryClient, route_update::Kind};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};
use tonic::transport::Channel;

use crate::{
    intentions::Enforcer,
    metrics::ProxyMetrics,
    node_config::Layers,
    table::{Builder, Routes, Source, now_unix_ms},
};

/// Resubscribe delays: quick at first, at most a few seconds apart.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The largest routing update accepted from the bridge (a snapshot of
/// about 4 million endpoints).
pub const MAX_UPDATE_BYTES: usize = 256 * 1024 * 1024;

/// The discovery client of one proxy.
#[derive(Debug)]
pub struct Discovery {
    channel: Channel,
    request: pb::WatchRequest,
    open_timeout: Duration,
    routes: Arc<Routes>,
    metrics: Arc<ProxyMetrics>,
    node_config: Option<Arc<Layers>>,
    intentions: Option<Arc<Enforcer>>,
}

// === impl Discovery ===

impl Discovery {
    /// Watches `services` (empty: all) for `node` over `channel`; opening
    /// a stream may take `open_timeout`.
    pub fn new(
        channel: Channel,
        node: String,
        services: Vec<String>,
        open_timeout: Duration,
        routes: Arc<Routes>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            channel,
            request: pb::WatchRequest { node, services },
            open_timeout,
            routes,
            metrics,
            node_config: None,
            intentions: None,
        }
    }

    /// Hands each node config the bridge sends to `layers`.
    pub fn with_node_config(mut self, layers: Arc<Layers>) -> Self {
        self.node_config = Some(layers);
        self
    }

    /// Hands the intentions the bridge sends to `enforcer`.
    pub fn with_intentions(mut self, enforcer: Option<Arc<Enforcer>>) -> Self {
        self.intentions = enforcer;
        self
    }

    /// Subscribes, applies updates, and resubscribes until shutdown.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        // Log the first failure of an outage, not every retry of it.
        let mut healthy = true;
        loop {
            let result = tokio::select! {
                r = self.watch(&mut backoff, &mut healthy) => r,
                _ = shutdown.requested() => return,
            };
            self.metrics.discovery_connected.set(0.0);
            match result {
                Ok(()) if healthy => {
                    tracing::warn!("discovery stream ended by the bridge; resubscribing")
                }
                Err(e) if healthy => {
                    tracing::warn!(error = %e, "discovery stream failed; routing from the current table while resubscribing")
                }
                Ok(()) => tracing::debug!("discovery stream ended"),
                Err(e) => tracing::debug!(error = %e, "discovery still unavailable"),
            }
            healthy = false;
            tokio::select! {
                _ = backoff.wait() => {}
                _ = shutdown.requested() => return,
            }
        }
    }

    async fn watch(&self, backoff: &mut Backoff, healthy: &mut bool) -> Result<(), tonic::Status> {
        // tonic refuses messages over 4 MiB by default, about 64,000
        // endpoints in one snapshot: a large mesh would never subscribe.
        let mut client =
            DiscoveryClient::new(mesh_runtime::telemetry::traced(self.channel.clone()))
                .max_decoding_message_size(MAX_UPDATE_BYTES);
        let response = tokio::time::timeout(self.open_timeout, client.watch(self.request.clone()))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("the bridge did not answer in time"))??;
        let mut stream = response.into_inner();
        // No timeout on waiting for the next update: a quiet mesh sends
        // none for hours. The channel's HTTP/2 keep-alive pings find a
        // bridge that is gone.
        while let Some(update) = stream.message().await? {
            if !*healthy {
                tracing::info!("discovery stream to the bridge is up");
                *healthy = true;
            }
            self.metrics.discovery_connected.set(1.0);
            backoff.reset();
            self.apply(update);
        }
        Ok(())
    }

    /// Builds the table `update` leads to and makes it current; a node
    /// config it carries goes to the layers.
    pub fn apply(&self, mut update: pb::RouteUpdate) {
        self.metrics.discovery_updates.increment(1);
        if let (Some(layers), Some(config)) = (&self.node_config, update.config.take()) {
            layers.offer(config);
        }
        if let (Some(enforcer), Some(intentions)) = (&self.intentions, update.intentions.take()) {
            enforcer.offer(intentions);
        }
        let current = self.routes.load_full();
        let builder = Builder::new(&current, &self.metrics);
        let table = match &update.kind {
            Some(Kind::Snapshot(s)) if is_empty(s) && current.endpoint_count() > 0 => {
                // A bridge that knows no endpoint at all (just started,
                // registry away) is no better than what we route from now.
                tracing::warn!(
                    version = update.version,
                    source = ?current.source,
                    "bridge sent a snapshot without endpoints; keeping the current table"
                );
                return;
            }
            Some(Kind::Snapshot(_))
                if update.stale
                    && current.source == Source::Dump
                    && current.endpoint_count() > 0 =>
            {
                // The bridge's answers are as old as Consul's absence; the
                // dump is no worse, and says honestly where routes come from.
                tracing::warn!(
                    version = update.version,
                    "bridge cannot reach Consul; routing from the dump until it can"
                );
                return;
            }
            Some(Kind::Snapshot(s)) => {
                builder.snapshot(&s.services, Source::Live, update.version, now_unix_ms())
            }
            Some(Kind::Delta(d)) => builder.delta(&current, d, update.version),
            None => return,
        };
        let is_snapshot = matches!(update.kind, Some(Kind::Snapshot(_)));
        if is_snapshot || current.source != Source::Live {
            tracing::info!(
                version = table.version,
                services = table.len(),
                endpoints = table.endpoint_count(),
                "routing table loaded from the bridge"
            );
        } else {
            tracing::debug!(version = table.version, "routing delta applied");
        }
        self.routes.publish(table);
    }
}

fn is_empty(snapshot: &pb::Snapshot) -> bool {
    snapshot.services.iter().all(|s| s.endpoints.is_empty())
}
