//! The log watcher's events into the [`AlertBook`]: a
//! [`LogEvent::Firing`] opens the log alert of its key (or, when it is
//! open, only refreshes its evidence), a [`LogEvent::Resolved`] resolves
//! it.
//!
//! After a restart the watcher's windows start empty, so a log alert read
//! back from KV is open again (not sent again) but unconfirmed: if the
//! watcher fires its key again, it simply stays open and resolves when the
//! watcher says so; if the watcher does not fire it within the rule's
//! window (and a little more for the first reads), its condition ended
//! while the monitor was down and it is resolved then. A restored alert of
//! a rule no longer configured (or with no `[logs]` table at all) is
//! resolved at once.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_runtime::{duration::HumanDuration, shutdown::Shutdown};
use tokio::sync::mpsc;

use crate::{
    alert::{AlertBook, AlertKind, Firing, now_ms},
    logs::{LogEvent, Logs, rules::Rule},
    metrics::MonitorMetrics,
};

/// Events from the watcher that may wait for the book, at most.
pub const EVENT_BUFFER: usize = 256;

/// Feeds log events into the book; see the module docs.
#[derive(Debug)]
pub struct LogAlerts {
    book: Arc<AlertBook>,
    metrics: MonitorMetrics,
    /// Per rule name: its window, and whether it is per service.
    rules: BTreeMap<String, (Duration, bool)>,
    /// Added to a rule's window before a restored alert resolves: the
    /// watcher's first reads and rounds.
    grace: Duration,
    /// Restored alerts the watcher has not fired again, with when they
    /// resolve.
    unconfirmed: BTreeMap<String, Instant>,
}

// === impl LogAlerts ===

impl LogAlerts {
    /// A feed into `book` for the rules of `logs` (none: every restored
    /// log alert resolves).
    pub fn new(book: Arc<AlertBook>, logs: Option<&Logs>, metrics: MonitorMetrics) -> Self {
        let rules = logs
            .into_iter()
            .flat_map(|l| &l.rules)
            .map(|rule| match rule {
                Rule::Pattern(r) => (r.name.clone(), (r.window, false)),
                Rule::ErrorRate(r) => (r.name.clone(), (r.window, true)),
            })
            .collect();
        let grace = logs.map_or(Duration::ZERO, |l| {
            l.rescan_interval.max(l.poll_interval) * 2
        });
        Self {
            book,
            metrics,
            rules,
            grace,
            unconfirmed: BTreeMap::new(),
        }
    }

    /// Takes the log alerts the book restored at `now`: unconfirmed until
    /// their rule's window (and the grace) has passed; those of a rule no
    /// longer configured resolve at once.
    pub fn restored(&mut self, now: Instant, now_ms: u64) {
        for alert in self.book.open_alerts() {
            if alert.kind != AlertKind::Log {
                continue;
            }
            match self.rules.get(&alert.rule) {
                Some((window, _)) => {
                    let deadline = now + *window + self.grace;
                    self.unconfirmed.insert(alert.key, deadline);
                }
                None => {
                    let evidence = format!("log rule {:?} is no longer configured", alert.rule);
                    self.resolve(&alert.key, &evidence, now_ms);
                }
            }
        }
    }

    /// One event of the watcher.
    pub fn apply(&mut self, event: LogEvent, now_ms: u64) {
        self.unconfirmed.remove(event.key());
        match event {
            LogEvent::Firing {
                key,
                rule,
                severity,
                summary,
                evidence,
            } => {
                self.metrics.log_rule_changed(&rule, true);
                let target = key
                    .strip_prefix(&format!("log:{rule}:"))
                    .unwrap_or(&key)
                    .to_owned();
                let per_service = self.rules.get(&rule).is_some_and(|(_, s)| *s);
                let firing = Firing {
                    service: if per_service {
                        target.clone()
                    } else {
                        String::new()
                    },
                    key,
                    rule,
                    target,
                    severity,
                    summary,
                    lines: evidence,
                    node: String::new(),
                };
                if self.book.open_log(&firing, now_ms) {
                    tracing::warn!(alert = %firing.key, "alert opened");
                    self.metrics.alert_changed(AlertKind::Log, true);
                    self.metrics.alerts_open(&self.book.open_alerts());
                }
            }
            LogEvent::Resolved { key, rule, summary } => {
                self.metrics.log_rule_changed(&rule, false);
                self.resolve(&key, &summary, now_ms);
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
            let rule = key.split(':').nth(1).unwrap_or_default();
            let window = self.rules.get(rule).map_or(Duration::ZERO, |(w, _)| *w);
            let evidence = format!(
                "not seen again within {} after the monitor restarted",
                HumanDuration(window)
            );
            self.resolve(&key, &evidence, now_ms);
        }
    }

    /// The next time a restored alert resolves, if any waits.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.unconfirmed.values().min().copied()
    }

    /// Waits for the book's restore, then applies `events` (and resolves
    /// unconfirmed alerts in time) until `shutdown`; once `events` is
    /// closed, only until no restored alert waits.
    pub async fn run(mut self, mut events: mpsc::Receiver<LogEvent>, mut shutdown: Shutdown) {
        tokio::select! {
            () = self.book.wait_restored() => {}
            () = shutdown.requested() => return,
        }
        self.restored(Instant::now(), now_ms());
        let mut open = true;
        loop {
            let expiry = self.next_expiry();
            if !open && expiry.is_none() {
                return;
            }
            let sleep = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv(), if open => match event {
                    Some(event) => self.apply(event, now_ms()),
                    None => open = false,
                },
                () = sleep => self.expire(Instant::now(), now_ms()),
                () = shutdown.requested() => return,
            }
        }
    }

    fn resolve(&self, key: &str, evidence: &str, now_ms: u64) {
        if self.book.resolve_log(key, evidence, now_ms) {
            tracing::info!(alert = %key, "alert resolved");
            self.metrics.alert_changed(AlertKind::Log, false);
            self.metrics.alerts_open(&self.book.open_alerts());
        }
    }
}

#[cfg(test)]
mod tests;
