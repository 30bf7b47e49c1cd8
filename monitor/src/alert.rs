//! Alerts: one per kind and target at a time ([`Alert::key`]), opened when
//! a target's condition turns bad and resolved when it ends, with the
//! evidence the probes saw. Three sources feed the book: the probe loop
//! ([`AlertBook::reconcile`], which owns the alerts of kind
//! [`AlertKind::Probe`]), the log watcher ([`AlertBook::open_log`] and
//! [`AlertBook::resolve_log`], one alert of kind [`AlertKind::Log`] per
//! `log:<rule>:<file or service>` key) and the traffic detector
//! ([`AlertBook::open_event`] and [`AlertBook::resolve_event`] with
//! [`AlertKind::Traffic`], one per `traffic:<signal>:<node>/<service>`
//! key); none resolves another's.
//!
//! The [`AlertBook`] holds the open alerts in memory (for `ListAlerts`,
//! `WatchAlerts` and `/metrics`) and hands every change to the
//! [`outbox`](crate::outbox), which keeps the alert in Consul KV under
//! [`KV_PREFIX`] and calls the webhook. An open alert read back from KV
//! at start-up ([`AlertBook::restore`]) is open again without being sent
//! again; one whose open or resolve was not yet sent (the last run died in
//! between) is sent now.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use crate::probe::Outcome;

/// Where alerts live in Consul KV: `mesh/monitor/alerts/<key>`.
pub const KV_PREFIX: &str = "mesh/monitor/alerts/";

/// Changes a slow `WatchAlerts` stream may lag behind before it is cut.
const WATCH_BUFFER: usize = 1024;

/// How bad an alert is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// It answers, slowly.
    #[default]
    Warning,
    /// It does not serve.
    Critical,
}

/// What raised an alert: a probe outcome, a log rule or a traffic signal.
/// Stored as one word (`hung`, `slow`, ..., `log`, `traffic`), so that
/// alerts stored before log alerts existed read back unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum AlertKind {
    /// What the probes saw; the probe loop's alerts.
    Probe(Outcome),
    /// A log rule fired; the log watcher's alerts.
    Log,
    /// A proxy traffic signal left its baseline; the traffic detector's
    /// alerts.
    Traffic,
}

/// One alert, as stored in KV and sent to the webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// `<outcome>/<target>` for a probe alert, `log:<rule>:<file or
    /// service>` for a log alert, `traffic:<signal>:<node>/<service>` for
    /// a traffic alert.
    pub key: String,
    /// What raised it.
    pub kind: AlertKind,
    /// How bad.
    pub severity: Severity,
    /// The target's ID (`<node>/<service id>`, `component/<name>`).
    pub target: String,
    /// The service (or component) name.
    pub service: String,
    /// The Consul service ID; empty for a component.
    #[serde(default)]
    pub instance_id: String,
    /// The Consul node; empty for a component.
    #[serde(default)]
    pub node: String,
    /// What was probed (`http://host:port/path`).
    pub probe: String,
    /// What the probes saw, one line.
    pub evidence: String,
    /// When it opened, in ms since the Unix epoch.
    pub started_at_ms: u64,
    /// When it was resolved; none while open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at_ms: Option<u64>,
    /// Whether its opening was sent (the webhook called).
    #[serde(default)]
    pub open_sent: bool,
    /// The log rule or traffic signal that raised it; empty for a probe
    /// alert.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
    /// Some lines behind it (a pattern rule's latest matches, the counts
    /// behind a rate, a traffic signal's value, baseline and floor); empty
    /// for a probe alert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
}

/// A log rule's or traffic signal's condition that opens an alert
/// ([`AlertBook::open_log`], [`AlertBook::open_event`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Firing {
    /// `log:<rule>:<file or service>`, `traffic:<signal>:<node>/<service>`.
    pub key: String,
    /// The rule's (or signal's) name.
    pub rule: String,
    /// The file, service or `<node>/<service>` the key names.
    pub target: String,
    /// The service, for a rule per service; empty for a file.
    pub service: String,
    /// The Consul node, for a traffic signal; empty otherwise.
    pub node: String,
    /// How bad.
    pub severity: Severity,
    /// What was seen, one line.
    pub summary: String,
    /// The lines behind it.
    pub lines: Vec<String>,
}

/// A change of the open alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An alert opened.
    Opened(Alert),
    /// An alert was resolved (`resolved_at_ms` set).
    Resolved(Alert),
}

/// A target as alerts name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRef {
    /// The target's ID.
    pub id: String,
    /// The service (or component) name.
    pub service: String,
    /// The Consul service ID; empty for a component.
    pub instance_id: String,
    /// The Consul node; empty for a component.
    pub node: String,
    /// What is probed.
    pub probe: String,
}

/// One target as the last round left it: its bad condition, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The target.
    pub target: TargetRef,
    /// The condition of its verdict when not `up`; none when up or not
    /// judged yet.
    pub condition: Option<Outcome>,
    /// What its last probe saw.
    pub evidence: String,
}

/// The open alerts, and where their changes go.
#[derive(Debug)]
pub struct AlertBook {
    open: Mutex<BTreeMap<String, Alert>>,
    watchers: broadcast::Sender<Change>,
    outbox: mpsc::UnboundedSender<Change>,
    /// Whether the stored alerts were restored: log alerts are taken only
    /// after, so that one still open in KV is not opened (and sent) again.
    restored: watch::Sender<bool>,
}

/// What [`AlertBook::reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Keys of the alerts opened.
    pub opened: Vec<String>,
    /// Keys of the alerts resolved.
    pub resolved: Vec<String>,
}

// === impl Severity ===

impl Severity {
    /// The severity of an alert of `kind`.
    pub fn of(kind: Outcome) -> Self {
        match kind {
            Outcome::Slow | Outcome::Up => Self::Warning,
            Outcome::Down | Outcome::Hung | Outcome::Unhealthy => Self::Critical,
        }
    }

    /// `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

// === impl AlertKind ===

impl AlertKind {
    /// `up`, `slow`, `down`, `hung`, `unhealthy`, `log` or `traffic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Probe(outcome) => outcome.as_str(),
            Self::Log => "log",
            Self::Traffic => "traffic",
        }
    }

    /// The probe outcome, for a probe alert.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            Self::Probe(outcome) => Some(outcome),
            Self::Log | Self::Traffic => None,
        }
    }
}

impl From<AlertKind> for String {
    fn from(kind: AlertKind) -> Self {
        kind.as_str().to_owned()
    }
}

impl TryFrom<String> for AlertKind {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "log" => return Ok(Self::Log),
            "traffic" => return Ok(Self::Traffic),
            _ => {}
        }
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .map(Self::Probe)
            .ok_or_else(|| format!("unknown alert kind {s:?}"))
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Alert ===

impl Alert {
    /// The deduplication key of an alert of `kind` on `target`.
    pub fn key_of(kind: Outcome, target: &str) -> String {
        format!("{}/{target}", kind.as_str())
    }

    /// A new alert of `kind` on `target`, opening at `now_ms`.
    pub fn open(kind: Outcome, target: &TargetRef, evidence: &str, now_ms: u64) -> Self {
        Self {
            key: Self::key_of(kind, &target.id),
            kind: AlertKind::Probe(kind),
            severity: Severity::of(kind),
            target: target.id.clone(),
            service: target.service.clone(),
            instance_id: target.instance_id.clone(),
            node: target.node.clone(),
            probe: target.probe.clone(),
            evidence: evidence.to_owned(),
            started_at_ms: now_ms,
            resolved_at_ms: None,
            open_sent: false,
            rule: String::new(),
            lines: Vec::new(),
        }
    }

    /// A new log alert for `firing`, opening at `now_ms`.
    pub fn open_log(firing: &Firing, now_ms: u64) -> Self {
        Self::open_event(AlertKind::Log, firing, now_ms)
    }

    /// A new alert of `kind` (log or traffic) for `firing`, opening at
    /// `now_ms`.
    pub fn open_event(kind: AlertKind, firing: &Firing, now_ms: u64) -> Self {
        Self {
            key: firing.key.clone(),
            kind,
            severity: firing.severity,
            target: firing.target.clone(),
            service: firing.service.clone(),
            instance_id: String::new(),
            node: firing.node.clone(),
            probe: String::new(),
            evidence: firing.summary.clone(),
            started_at_ms: now_ms,
            resolved_at_ms: None,
            open_sent: false,
            rule: firing.rule.clone(),
            lines: firing.lines.clone(),
        }
    }

    /// Its Consul KV key. A log or traffic alert's key names a file or
    /// `<node>/<service>`, whose `/`s are escaped (`%2F`, and `%` as
    /// `%25`): the key stays one KV entry without empty path segments.
    pub fn kv_key(&self) -> String {
        match self.kind {
            AlertKind::Probe(_) => format!("{KV_PREFIX}{}", self.key),
            AlertKind::Log | AlertKind::Traffic => format!(
                "{KV_PREFIX}{}",
                self.key.replace('%', "%25").replace('/', "%2F")
            ),
        }
    }
}

// === impl AlertBook ===

impl AlertBook {
    /// An empty book; changes go to the returned receiver (the outbox).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Change>) {
        let (outbox, rx) = mpsc::unbounded_channel();
        let (watchers, _) = broadcast::channel(WATCH_BUFFER);
        let book = Self {
            open: Mutex::new(BTreeMap::new()),
            watchers,
            outbox,
            restored: watch::channel(false).0,
        };
        (book, rx)
    }

    /// Takes back the alerts read from KV at start-up: open ones are open
    /// again (sent again only if their opening never was); resolved ones
    /// whose resolve was not sent go to the outbox to be sent and removed.
    /// Returns the open ones.
    pub fn restore(&self, stored: Vec<Alert>) -> Vec<Alert> {
        let mut open = self.lock();
        let mut restored = Vec::new();
        for alert in stored {
            if alert.resolved_at_ms.is_some() {
                let _ = self.outbox.send(Change::Resolved(alert));
                continue;
            }
            if !alert.open_sent {
                let _ = self.outbox.send(Change::Opened(alert.clone()));
            }
            restored.push(alert.clone());
            open.insert(alert.key.clone(), alert);
        }
        self.restored.send_replace(true);
        restored
    }

    /// Waits until [`AlertBook::restore`] was called.
    pub async fn wait_restored(&self) {
        let mut rx = self.restored.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Opens the log alert of `firing.key` unless it is open; if it is
    /// (restored at start-up, or fired again), only its evidence is
    /// updated and nothing is sent. `true` when it opened.
    pub fn open_log(&self, firing: &Firing, now_ms: u64) -> bool {
        self.open_event(AlertKind::Log, firing, now_ms)
    }

    /// Resolves the open log alert `key` with `evidence`; `false` when no
    /// log alert of that key is open.
    pub fn resolve_log(&self, key: &str, evidence: &str, now_ms: u64) -> bool {
        self.resolve_event(AlertKind::Log, key, evidence, now_ms)
    }

    /// Opens the alert of `kind` (log or traffic) and `firing.key` unless
    /// it is open; if it is (restored at start-up, or fired again), only
    /// its evidence is updated and nothing is sent. `true` when it opened.
    pub fn open_event(&self, kind: AlertKind, firing: &Firing, now_ms: u64) -> bool {
        let mut open = self.lock();
        if let Some(alert) = open.get_mut(&firing.key) {
            alert.evidence.clone_from(&firing.summary);
            alert.lines.clone_from(&firing.lines);
            return false;
        }
        let alert = Alert::open_event(kind, firing, now_ms);
        open.insert(alert.key.clone(), alert.clone());
        self.publish(Change::Opened(alert));
        true
    }

    /// Resolves the open alert of `kind` and `key` with `evidence`;
    /// `false` when no alert of that kind and key is open.
    pub fn resolve_event(&self, kind: AlertKind, key: &str, evidence: &str, now_ms: u64) -> bool {
        let mut open = self.lock();
        if !open.get(key).is_some_and(|a| a.kind == kind) {
            return false;
        }
        let Some(mut alert) = open.remove(key) else {
            return false;
        };
        alert.resolved_at_ms = Some(now_ms);
        evidence.clone_into(&mut alert.evidence);
        self.publish(Change::Resolved(alert));
        true
    }

    /// The open alerts, oldest first.
    pub fn open_alerts(&self) -> Vec<Alert> {
        let mut alerts: Vec<Alert> = self.lock().values().cloned().collect();
        alerts.sort_by(|a, b| (a.started_at_ms, &a.key).cmp(&(b.started_at_ms, &b.key)));
        alerts
    }

    /// The open alerts and a receiver of every change after them.
    pub fn subscribe(&self) -> (Vec<Alert>, broadcast::Receiver<Change>) {
        // Under the lock: no change falls between the list and the receiver.
        let open = self.lock();
        let rx = self.watchers.subscribe();
        let mut alerts: Vec<Alert> = open.values().cloned().collect();
        alerts.sort_by(|a, b| (a.started_at_ms, &a.key).cmp(&(b.started_at_ms, &b.key)));
        (alerts, rx)
    }

    /// Brings the open probe alerts in line with a round's observations:
    /// an alert for every bad condition, none for the rest. When
    /// `complete` (every target was listed), alerts of targets no longer
    /// probed are resolved too; otherwise they stay as they are. Log and
    /// traffic alerts are not the probes' and are left alone.
    pub fn reconcile(&self, observed: &[Observed], complete: bool, now_ms: u64) -> Reconciled {
        let mut done = Reconciled::default();
        let mut open = self.lock();
        let mut wanted = HashSet::new();
        let mut seen = HashSet::new();
        for o in observed {
            seen.insert(o.target.id.as_str());
            let Some(kind) = o.condition else { continue };
            let key = Alert::key_of(kind, &o.target.id);
            if let Some(alert) = open.get_mut(&key) {
                alert.evidence.clone_from(&o.evidence);
            } else {
                let alert = Alert::open(kind, &o.target, &o.evidence, now_ms);
                open.insert(key.clone(), alert.clone());
                self.publish(Change::Opened(alert));
                done.opened.push(key.clone());
            }
            wanted.insert(key);
        }
        let ended: Vec<String> = open
            .values()
            .filter(|a| a.kind.outcome().is_some())
            .filter(|a| !wanted.contains(&a.key))
            .filter(|a| complete || seen.contains(a.target.as_str()))
            .map(|a| a.key.clone())
            .collect();
        let last_seen: BTreeMap<&str, &str> = observed
            .iter()
            .map(|o| (o.target.id.as_str(), o.evidence.as_str()))
            .collect();
        for key in ended {
            let Some(mut alert) = open.remove(&key) else {
                continue;
            };
            alert.resolved_at_ms = Some(now_ms);
            alert.evidence = match last_seen.get(alert.target.as_str()) {
                Some(evidence) => (*evidence).to_owned(),
                None => "no longer probed (deregistered or removed from the config)".into(),
            };
            self.publish(Change::Resolved(alert));
            done.resolved.push(key);
        }
        done
    }

    fn publish(&self, change: Change) {
        // No watcher is fine; the outbox ends only with the process.
        let _ = self.watchers.send(change.clone());
        let _ = self.outbox.send(change);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Alert>> {
        // A panic elsewhere must not stop alerting: the map stays valid.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
