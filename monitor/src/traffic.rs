//! Traffic alerts: every `interval` the monitor reads each node's proxy's
//! `/metrics` through the node's mesh-bridge (`mesh.v1.Checks.ProxyMetrics`:
//! the proxy's admin listener is loopback on its node), turns the counters'
//! differences into a round per node and service (request rate, 5xx rate,
//! timeout rate, p99), and a [`Detector`] with a learned baseline per
//! signal raises `traffic:<signal>:<node>/<service>` alerts of kind
//! [`AlertKind::Traffic`] into the [`AlertBook`], beside the probe and log
//! alerts and apart from them.
//!
//! After a restart the detector has learned nothing, so a traffic alert
//! read back from KV is open again (not sent again) but unconfirmed: if the
//! detector fires its key again it simply stays open; if it does not by the
//! end of the warm-up (and the rounds a resolve takes), it is resolved
//! then. With traffic alerts off, restored ones resolve at once.
//!
//! - [`prom`]: a minimal Prometheus text reader.
//! - [`counters`]: counters per service, and rounds from their differences.
//! - [`detector`]: baselines, floors, firing and resolving.
//! - `scrape`: the loop over the nodes' bridges.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    alert::{AlertBook, AlertKind},
    metrics::MonitorMetrics,
};

pub mod counters;
pub mod detector;
pub mod prom;
mod scrape;

pub use detector::{Detector, Signal, Thresholds, TrafficEvent};
pub use scrape::Scraper;

/// The default time between scrapes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// How traffic is watched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrafficConfig {
    /// Whether traffic is watched at all.
    pub enabled: bool,
    /// Time between scrapes.
    pub interval: Duration,
    /// The detector's floors and learning.
    pub thresholds: Thresholds,
}

/// Feeds the detector's events into the book; see the module docs.
#[derive(Debug)]
pub struct TrafficAlerts {
    book: Arc<AlertBook>,
    metrics: MonitorMetrics,
    /// How long a restored alert waits for the detector to confirm it.
    confirm_within: Duration,
    /// Whether traffic is watched (otherwise restored alerts resolve).
    enabled: bool,
    /// Restored alerts the detector has not fired again, with when they
    /// resolve.
    unconfirmed: BTreeMap<String, Instant>,
}

// === impl TrafficConfig ===

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: DEFAULT_INTERVAL,
            thresholds: Thresholds::default(),
        }
    }
}

// === impl TrafficAlerts ===

impl TrafficAlerts {
    /// A feed into `book` for `config`.
    pub fn new(book: Arc<AlertBook>, config: &TrafficConfig, metrics: MonitorMetrics) -> Self {
        let rounds = config.thresholds.warmup_rounds + config.thresholds.resolve_after + 2;
        Self {
            book,
            metrics,
            confirm_within: config.interval * rounds,
            enabled: config.enabled,
            unconfirmed: BTreeMap::new(),
        }
    }

    /// Takes the traffic alerts the book restored at `now`: unconfirmed
    /// until the detector could have fired them again; with traffic off,
    /// resolved at once.
    pub fn restored(&mut self, now: Instant, now_ms: u64) {
        for alert in self.book.open_alerts() {
            if alert.kind != AlertKind::Traffic {
                continue;
            }
            if self.enabled {
                self.unconfirmed
                    .insert(alert.key, now + self.confirm_within);
            } else {
                self.resolve(&alert.key, "traffic alerts are turned off", now_ms);
            }
        }
    }

    /// One event of the detector.
    pub fn apply(&mut self, event: TrafficEvent, now_ms: u64) {
        match event {
            TrafficEvent::Firing(firing) => {
                self.unconfirmed.remove(&firing.key);
                if self.book.open_event(AlertKind::Traffic, &firing, now_ms) {
                    tracing::warn!(alert = %firing.key, evidence = %firing.summary, "alert opened");
                    self.metrics.alert_changed(AlertKind::Traffic, true);
                    self.metrics.alerts_open(&self.book.open_alerts());
                }
            }
            TrafficEvent::Resolved { key, evidence } => {
                self.unconfirmed.remove(&key);
                self.resolve(&key, &evidence, now_ms);
            }
        }
    }

    /// Resolves the open traffic alerts of `node` (it left the catalog).
    pub fn node_gone(&mut self, node: &str, now_ms: u64) {
        for alert in self.book.open_alerts() {
            if alert.kind == AlertKind::Traffic && alert.node == node {
                self.unconfirmed.remove(&alert.key);
                self.resolve(&alert.key, "the node left the catalog", now_ms);
            }
        }
    }

    /// Resolves the unconfirmed alerts whose time is up at `now`.
    pub fn expire(&mut self, now: Instant, now_ms: u64) {
        let due: Vec<String> = self
            .unconfirmed
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.unconfirmed.remove(&key);
            self.resolve(
                &key,
                "not seen again after the monitor restarted and learned its baseline",
                now_ms,
            );
        }
    }

    fn resolve(&self, key: &str, evidence: &str, now_ms: u64) {
        if self
            .book
            .resolve_event(AlertKind::Traffic, key, evidence, now_ms)
        {
            tracing::info!(alert = %key, %evidence, "alert resolved");
            self.metrics.alert_changed(AlertKind::Traffic, false);
            self.metrics.alerts_open(&self.book.open_alerts());
        }
    }
}

#[cfg(test)]
mod tests;
