//! The probe loop: every interval, list the targets, probe them (at most
//! `concurrency` at once), judge each outcome into a verdict, put changed
//! verdicts into Consul, and bring the alerts in line.
//!
//! At start it first reads the alerts of the last run back from Consul KV:
//! a target with an open alert starts from that alert's verdict, so the
//! alert stays open while the condition lasts and is not sent again.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use consul_client::Client;
use futures::{StreamExt, stream};
use mesh_runtime::{admin::Admin, backoff::Backoff, shutdown::Shutdown};
use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    alert::{AlertBook, AlertKind, Observed, now_ms},
    checks::{CheckWriter, REFRESH},
    config::Probing,
    metrics::MonitorMetrics,
    outbox,
    probe::{self, CheckStatus, Limits, Outcome, ProbeResult},
    targets::{Discovery, Target},
    verdict::{Judge, TargetState},
};

/// The longest pause between check writes to a bridge that failed.
const MAX_WRITE_PAUSE: Duration = Duration::from_secs(300);

/// Every target's latest state, shared with the gRPC API.
#[derive(Debug, Default)]
pub struct Board {
    entries: Mutex<BTreeMap<String, Entry>>,
}

/// One target on the [`Board`].
#[derive(Clone, Debug)]
pub struct Entry {
    /// The target as last listed.
    pub target: Target,
    /// Its judgement.
    pub state: TargetState,
    /// The last check status written to Consul, and when.
    written: Option<(CheckStatus, Instant)>,
    /// Writes failed in a row, and when to try again: a node without a
    /// bridge is asked at a falling rate, not every round.
    write_failures: (u32, Option<Instant>),
}

/// The loop's parts.
#[derive(Debug)]
pub struct Prober {
    /// Lists targets.
    pub discovery: Discovery,
    /// Reads the stored alerts at start.
    pub consul: Client,
    /// Timing and thresholds.
    pub probing: Probing,
    /// Where targets' states are shown.
    pub board: Arc<Board>,
    /// The alerts.
    pub book: Arc<AlertBook>,
    /// Writes verdicts into Consul; none when disabled.
    pub checks: Option<CheckWriter>,
    /// Metrics.
    pub metrics: MonitorMetrics,
    /// Marked ready after the first round.
    pub admin: Admin,
}

/// A check to write after a round.
struct Write {
    target: Target,
    status: CheckStatus,
    output: String,
}

// === impl Board ===

impl Board {
    /// A copy of every entry.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl Prober ===

impl Prober {
    /// Restores the stored alerts, then probes every interval until
    /// `shutdown`.
    pub async fn run(self, mut shutdown: Shutdown) {
        let judge = Judge::new(&self.probing);
        let Some(mut restored) = self.restore(&judge, &mut shutdown).await else {
            return;
        };
        let mut ticks = tokio::time::interval(self.probing.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.requested() => return,
            }
            tokio::select! {
                _ = self.round(&judge, &mut restored) => {}
                _ = shutdown.requested() => return,
            }
            self.admin.set_ready(true);
        }
    }

    /// Reads the last run's alerts (retrying while Consul is unreachable);
    /// the verdicts they stand for, by target. `None` on shutdown.
    async fn restore(
        &self,
        judge: &Judge,
        shutdown: &mut Shutdown,
    ) -> Option<HashMap<String, TargetState>> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match outbox::load(&self.consul).await {
                Ok(stored) => {
                    let open = self.book.restore(stored);
                    tracing::info!(open = open.len(), "alerts of the last run restored");
                    self.metrics.alerts_open(&open);
                    let states = open
                        .iter()
                        .filter_map(|a| Some((a.target.clone(), judge.restored(a)?)))
                        .collect();
                    return Some(states);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stored alerts; retrying");
                }
            }
            tokio::select! {
                _ = backoff.wait() => {}
                _ = shutdown.requested() => return None,
            }
        }
    }

    /// One round: list, probe, judge, write checks, reconcile alerts.
    async fn round(&self, judge: &Judge, restored: &mut HashMap<String, TargetState>) {
        let listing = self.discovery.list().await;
        let mut targets = listing.targets;
        if !listing.complete {
            // Keep probing what could not be listed this time.
            for (id, e) in self.board.lock().iter() {
                targets
                    .entry(id.clone())
                    .or_insert_with(|| e.target.clone());
            }
        }
        let limits = Limits {
            timeout: self.probing.timeout,
            slow: self.probing.slow_threshold,
        };
        let results: Vec<(Target, ProbeResult)> = stream::iter(targets.into_values())
            .map(|t| async move {
                let r = probe::probe(&t.spec, limits).await;
                (t, r)
            })
            .buffer_unordered(self.probing.concurrency)
            .collect()
            .await;
        let writes = self.judge_all(judge, results, listing.complete, restored);
        self.write_checks(writes).await;
        self.reconcile(listing.complete);
    }

    /// Judges every result on the board; the checks to write.
    fn judge_all(
        &self,
        judge: &Judge,
        results: Vec<(Target, ProbeResult)>,
        complete: bool,
        restored: &mut HashMap<String, TargetState>,
    ) -> Vec<Write> {
        let mut board = self.board.lock();
        if complete {
            board.retain(|id, _| results.iter().any(|(t, _)| &t.target.id == id));
        }
        let mut writes = Vec::new();
        for (target, result) in results {
            self.metrics
                .probe(target.spec.kind, result.outcome, result.latency);
            let id = target.target.id.clone();
            let entry = board.entry(id.clone()).or_insert_with(|| Entry {
                target: target.clone(),
                state: restored.remove(&id).unwrap_or_default(),
                written: None,
                write_failures: (0, None),
            });
            entry.target = target;
            if judge.observe(&mut entry.state, &result) {
                log_change(&entry.target, &result, &entry.state);
            }
            if self.checks.is_some() && entry.target.is_instance() {
                writes.extend(check_to_write(entry));
            }
        }
        let verdicts: Vec<CheckStatus> = board
            .values()
            .filter_map(|e| e.state.verdict.as_ref().map(|v| v.status))
            .collect();
        self.metrics.round(board.len(), &verdicts);
        writes
    }

    async fn write_checks(&self, writes: Vec<Write>) {
        let Some(checks) = &self.checks else { return };
        let done: Vec<(String, Result<CheckStatus, String>)> = stream::iter(writes)
            .map(|w| async move {
                let result = checks.set(&w.target, w.status, &w.output).await;
                (w.target.target.id, result.map(|()| w.status))
            })
            .buffer_unordered(self.probing.concurrency)
            .collect()
            .await;
        let mut board = self.board.lock();
        for (id, result) in done {
            let Some(e) = board.get_mut(&id) else {
                continue;
            };
            match result {
                Ok(status) => {
                    tracing::debug!(target = %id, %status, "check set in Consul");
                    e.written = Some((status, Instant::now()));
                    e.write_failures = (0, None);
                }
                Err(error) => {
                    let failures = e.write_failures.0.saturating_add(1);
                    let pause = (self.probing.interval * 2u32.saturating_pow(failures.min(16)))
                        .min(MAX_WRITE_PAUSE);
                    e.write_failures = (failures, Some(Instant::now() + pause));
                    if failures == 1 {
                        tracing::warn!(target = %id, %error, "cannot set the check in Consul; trying again at a falling rate");
                    } else {
                        tracing::debug!(target = %id, failures, %error, "cannot set the check in Consul");
                    }
                }
            }
        }
    }

    fn reconcile(&self, complete: bool) {
        let observed: Vec<Observed> = self
            .board
            .lock()
            .values()
            .map(|e| {
                let verdict = e.state.verdict.as_ref();
                Observed {
                    target: e.target.target.clone(),
                    condition: verdict.map(|v| v.condition).filter(|c| *c != Outcome::Up),
                    evidence: verdict.map(|v| v.evidence.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let done = self.book.reconcile(&observed, complete, now_ms());
        for key in &done.opened {
            tracing::warn!(alert = %key, "alert opened");
        }
        for key in &done.resolved {
            tracing::info!(alert = %key, "alert resolved");
        }
        for (keys, opened) in [(&done.opened, true), (&done.resolved, false)] {
            for key in keys {
                if let Some(kind) = key.split('/').next().and_then(|k| k.parse().ok()) {
                    self.metrics.alert_changed(AlertKind::Probe(kind), opened);
                }
            }
        }
        self.metrics.alerts_open(&self.book.open_alerts());
    }
}

/// The check to write for `entry`, if Consul does not show its verdict
/// or the last write is older than [`REFRESH`].
fn check_to_write(entry: &mut Entry) -> Option<Write> {
    let verdict = entry.state.verdict.as_ref()?;
    if entry.write_failures.1.is_some_and(|at| Instant::now() < at) {
        return None;
    }
    let shown = entry.target.consul_check == Some(verdict.status);
    match entry.written {
        // Consul shows it from an earlier run: count that as written now.
        None if shown => {
            entry.written = Some((verdict.status, Instant::now()));
            return None;
        }
        Some((status, at)) if shown && status == verdict.status && at.elapsed() < REFRESH => {
            return None;
        }
        _ => {}
    }
    Some(Write {
        target: entry.target.clone(),
        status: verdict.status,
        output: format!(
            "mesh-monitor: {}: {} ({})",
            verdict.condition.as_str(),
            verdict.evidence,
            entry.target.spec
        ),
    })
}

fn log_change(target: &Target, result: &ProbeResult, state: &TargetState) {
    let Some(v) = &state.verdict else { return };
    let id = &target.target.id;
    match v.status {
        CheckStatus::Passing => {
            tracing::info!(target = %id, condition = v.condition.as_str(), evidence = %result.evidence, "verdict: passing")
        }
        status => {
            tracing::warn!(target = %id, %status, condition = v.condition.as_str(), evidence = %result.evidence, probe = %target.spec, "verdict")
        }
    }
}
