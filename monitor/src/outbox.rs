//! Carries every alert change out, one at a time and in order: into
//! Consul KV (so that it survives a restart), then to the webhook, then
//! records that it was sent. Opening: store the alert, call the webhook,
//! store it again marked sent. Resolving: store it resolved, call the
//! webhook, delete it. A crash in between leaves the alert in KV with what
//! remains to do, and the next run does it ([`AlertBook::restore`]).
//!
//! KV writes are retried (jittered backoff) until they succeed or the
//! monitor stops; a webhook that fails all its tries is logged and counted,
//! and the alert moves on.
//!
//! [`AlertBook::restore`]: crate::alert::AlertBook::restore

use std::time::Duration;

use consul_client::{Client, Error, QueryOptions};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};
use tokio::sync::mpsc;

use crate::{
    alert::{Alert, Change, KV_PREFIX},
    metrics::MonitorMetrics,
    webhook::{Event, Webhook},
};

/// Delivers alert changes: KV and the webhook.
#[derive(Debug)]
pub struct Outbox {
    consul: Client,
    webhook: Option<Webhook>,
    metrics: MonitorMetrics,
}

// === impl Outbox ===

impl Outbox {
    /// An outbox writing to `consul`, calling `webhook` if any.
    pub fn new(consul: Client, webhook: Option<Webhook>, metrics: MonitorMetrics) -> Self {
        Self {
            consul,
            webhook,
            metrics,
        }
    }

    /// Delivers changes from `rx` in order until `shutdown` (or the book
    /// is gone). A change under way when shutdown comes is carried out
    /// (within the owner's grace period), except for KV writes that keep
    /// failing: those are left to the next run.
    pub async fn run(&self, mut rx: mpsc::UnboundedReceiver<Change>, mut shutdown: Shutdown) {
        loop {
            let change = tokio::select! {
                change = rx.recv() => change,
                _ = shutdown.requested() => None,
            };
            let Some(change) = change else { return };
            self.deliver(change, &shutdown).await;
        }
    }

    /// One change, through to the end.
    async fn deliver(&self, change: Change, shutdown: &Shutdown) {
        match change {
            Change::Opened(mut alert) => {
                alert.open_sent = false;
                self.store(&alert, shutdown).await;
                self.call(Event::Open, &alert).await;
                alert.open_sent = true;
                self.store(&alert, shutdown).await;
            }
            Change::Resolved(alert) => {
                self.store(&alert, shutdown).await;
                self.call(Event::Resolved, &alert).await;
                self.remove(&alert, shutdown).await;
            }
        }
    }

    async fn call(&self, event: Event, alert: &Alert) {
        let Some(webhook) = &self.webhook else { return };
        let result = webhook.send(event, alert).await;
        self.metrics.webhook_call(result.is_ok());
        match result {
            Ok(()) => tracing::debug!(key = %alert.key, ?event, "webhook called"),
            Err(error) => {
                tracing::warn!(key = %alert.key, ?event, %error, "webhook failed every try; the alert moves on")
            }
        }
    }

    async fn store(&self, alert: &Alert, shutdown: &Shutdown) {
        let value = match serde_json::to_vec(alert) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(key = %alert.key, error = %e, "alert does not serialize");
                return;
            }
        };
        let key = alert.kv_key();
        self.retry("store alert", &key, shutdown, || {
            self.consul.kv_put(&key, &value, None)
        })
        .await;
    }

    async fn remove(&self, alert: &Alert, shutdown: &Shutdown) {
        let key = alert.kv_key();
        self.retry("remove alert", &key, shutdown, || {
            self.consul.kv_delete(&key, None)
        })
        .await;
    }

    /// Retries `call` until it succeeds, or shutdown was requested.
    async fn retry<F, Fut>(&self, what: &str, key: &str, shutdown: &Shutdown, mut call: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, Error>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match call().await {
                Ok(_) => return,
                Err(e) if shutdown.is_requested() => {
                    tracing::warn!(%key, error = %e, "{what}: Consul call failed; left to the next run");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "{what}: Consul call failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }
}

/// Reads every alert stored under [`KV_PREFIX`]; entries that do not parse
/// are logged and left alone.
pub async fn load(consul: &Client) -> Result<Vec<Alert>, Error> {
    let pairs = consul.kv_list(KV_PREFIX, QueryOptions::default()).await?;
    let mut alerts = Vec::new();
    for pair in pairs.value {
        match serde_json::from_slice::<Alert>(&pair.value) {
            Ok(alert) if pair.key == alert.kv_key() => alerts.push(alert),
            Ok(alert) => {
                tracing::warn!(key = %pair.key, alert = %alert.key, "alert stored under another key; ignored")
            }
            Err(e) => {
                tracing::warn!(key = %pair.key, error = %e, "stored alert does not parse; ignored")
            }
        }
    }
    Ok(alerts)
}
