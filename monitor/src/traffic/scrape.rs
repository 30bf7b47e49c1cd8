//! The scrape loop: every interval, the catalog's nodes, each node's
//! proxy's `/metrics` through its bridge (a few nodes at a time, each call
//! bounded in time), and the rounds since the last scrape into the
//! detector. A node whose bridge or proxy does not answer is skipped
//! quietly (not every node runs a proxy); its next answer makes a longer
//! round. A node that left the catalog is forgotten, and its alerts
//! resolved.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use consul_client::{Client, QueryOptions};
use futures::{StreamExt, stream};
use mesh_proto::v1::{ProxyMetricsRequest, checks_client::ChecksClient};
use mesh_runtime::shutdown::Shutdown;
use mesh_runtime::telemetry::TracedChannel;

use super::{
    Detector, TrafficAlerts, TrafficConfig,
    counters::{self, Snapshot},
};
use crate::{alert::now_ms, bridges::Bridges};

/// Bridges asked at the same time.
const CONCURRENCY: usize = 16;
/// The longest a call may take (shorter with a shorter interval).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer taken: the bridge sends at most 4 MiB of text.
const MAX_MESSAGE: usize = 5 * 1024 * 1024;

/// Scrapes the nodes' proxies and feeds the detector; see the module docs.
#[derive(Debug)]
pub struct Scraper {
    consul: Client,
    bridges: Arc<Bridges>,
    config: TrafficConfig,
    detector: Detector,
    alerts: TrafficAlerts,
    /// Each node's last snapshot, and when it was taken.
    last: BTreeMap<String, (Instant, Snapshot)>,
}

// === impl Scraper ===

impl Scraper {
    /// Scrapes the nodes in `consul`'s catalog through their `bridges`,
    /// into `alerts`.
    pub fn new(
        consul: Client,
        bridges: Arc<Bridges>,
        config: TrafficConfig,
        alerts: TrafficAlerts,
    ) -> Self {
        Self {
            consul,
            bridges,
            detector: Detector::new(config.thresholds),
            config,
            alerts,
            last: BTreeMap::new(),
        }
    }

    /// Waits for the book's restore, then scrapes every interval until
    /// `shutdown`; with traffic off, only resolves restored alerts.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        tokio::select! {
            () = self.alerts.book.wait_restored() => {}
            () = shutdown.requested() => return,
        }
        self.alerts.restored(Instant::now(), now_ms());
        if !self.config.enabled {
            return;
        }
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.requested() => return,
            }
            tokio::select! {
                () = self.round() => {}
                () = shutdown.requested() => return,
            }
            self.alerts.expire(Instant::now(), now_ms());
        }
    }

    /// One scrape of every node.
    async fn round(&mut self) {
        let nodes = match self.consul.catalog_nodes(QueryOptions::default()).await {
            Ok(nodes) => nodes.value,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the nodes; no traffic round");
                return;
            }
        };
        let listed: BTreeSet<String> = nodes.iter().map(|n| n.node.clone()).collect();
        self.forget_except(&listed);
        self.bridges.retain(&listed);
        let calls: Vec<(String, Result<TracedChannel, String>)> = nodes
            .into_iter()
            .map(|n| {
                let channel = self.bridges.channel(&n.node, &n.address);
                (n.node, channel)
            })
            .collect();
        let timeout = CALL_TIMEOUT.min(self.config.interval);
        let answers: Vec<(String, Result<String, String>)> = stream::iter(calls)
            .map(|(node, channel)| async move {
                let text = match channel {
                    Ok(channel) => fetch(channel, timeout).await,
                    Err(e) => Err(e),
                };
                (node, text)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (node, answer) in answers {
            match answer {
                Ok(text) => self.ingest(&node, &text, Instant::now()),
                Err(e) => {
                    self.alerts.metrics.traffic_scrape("unavailable");
                    tracing::debug!(%node, error = %e, "no proxy metrics");
                }
            }
        }
    }

    /// Takes `node`'s `/metrics` text read at `at`: the rounds since its
    /// last one go to the detector.
    pub fn ingest(&mut self, node: &str, text: &str, at: Instant) {
        let snapshot = match counters::snapshot(text) {
            Ok(s) => s,
            Err(e) => {
                self.alerts.metrics.traffic_scrape("unreadable");
                tracing::warn!(%node, error = %e, "the proxy's metrics are unreadable");
                return;
            }
        };
        self.alerts.metrics.traffic_scrape("ok");
        if let Some((then, before)) = self.last.get(node) {
            let seconds = at.saturating_duration_since(*then).as_secs_f64();
            if seconds > 0.0 {
                let rounds = counters::rounds(before, &snapshot, seconds);
                let now_ms = now_ms();
                for (service, round) in &rounds {
                    for event in self.detector.observe(node, service, round) {
                        self.alerts.apply(event, now_ms);
                    }
                }
            }
        }
        self.last.insert(node.to_owned(), (at, snapshot));
    }

    /// Forgets the nodes not in `listed`, resolving their alerts.
    pub fn forget_except(&mut self, listed: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .last
            .keys()
            .filter(|n| !listed.contains(*n))
            .cloned()
            .collect();
        for node in gone {
            self.last.remove(&node);
            self.detector.forget(&node);
            self.alerts.node_gone(&node, now_ms());
        }
    }
}

/// The proxy's `/metrics` text through the bridge on `channel`.
async fn fetch(channel: TracedChannel, timeout: Duration) -> Result<String, String> {
    let mut client = ChecksClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    match tokio::time::timeout(timeout, client.proxy_metrics(ProxyMetricsRequest {})).await {
        Ok(Ok(answer)) => Ok(answer.into_inner().text),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
