//! The leader's side of rollouts: every [`TICK`], while this replica holds
//! the leader lock, it reads the rollout under way and takes the next
//! transition. Each transition is written to the record (check-and-set)
//! before its side effect, and every side effect checks what is already
//! done, so a new leader picks up wherever the last one stopped.

use std::{collections::BTreeMap, time::Duration};

use mesh_proto::v1 as pb;
use mesh_runtime::shutdown::Shutdown;
use tokio::sync::watch;
use tracing::Instrument as _;

use super::{
    Frontend, MonitorSays, NodeState, Rollout, RolloutState, Stats, Verdict, failpoint, gate,
    monitor_gate,
    nginx::{self, Apply},
};
use crate::{
    control::{Control, current_number},
    error::ControlError,
    leader::LeaderState,
    model::now_ms,
    store::ProxyReport,
};

/// How often the leader looks at the rollout under way.
pub const TICK: Duration = Duration::from_millis(500);

/// Reads of a proxy's counters before a push, before giving up.
const BASELINE_TRIES: usize = 3;

/// How long mesh-monitor may take to give its verdict on a node before a
/// gate goes on without it (a tick must not hang on a stuck monitor).
const MONITOR_TIMEOUT: Duration = Duration::from_secs(2);

/// Drives the rollout under way while this replica leads.
#[derive(Debug)]
pub struct Driver {
    control: Control,
    leader: watch::Receiver<LeaderState>,
    replica: String,
}

/// Whether a pass may go on: `Stop` when the record moved under it (a
/// pause or an abort came in) and the next pass must read it again.
enum Flow {
    Go,
    Stop,
}

// === impl Driver ===

impl Driver {
    /// A driver for replica `replica`.
    pub fn new(control: Control, leader: watch::Receiver<LeaderState>, replica: String) -> Self {
        Self {
            control,
            leader,
            replica,
        }
    }

    /// Runs until shutdown.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.requested() => return,
                changed = self.leader.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(TICK) => {}
            }
            if !self.leader.borrow().is_leader {
                continue;
            }
            let span = tracing::info_span!("rollout");
            match self.pass().instrument(span).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "rollout pass failed; trying again");
                }
                Err(e) => tracing::debug!(error = %e, "rollout pass failed again"),
            }
        }
    }

    /// One look at the rollout under way.
    async fn pass(&self) -> Result<(), ControlError> {
        let store = self.control.store();
        let (active, _) = store.active_rollout().await?;
        if active == 0 {
            return Ok(());
        }
        let Some((rollout, revision)) = store.rollout(active).await? else {
            tracing::warn!(
                version = active,
                "the active rollout has no record; nothing to drive"
            );
            return Ok(());
        };
        let mut run = Run {
            control: &self.control,
            rollout,
            revision,
            replica: &self.replica,
        };
        match run.rollout.state {
            RolloutState::Succeeded | RolloutState::Aborted => {
                // Ended, but the active key was not cleared: clear it.
                run.save().await?;
                Ok(())
            }
            RolloutState::Aborting => run.revert().await,
            RolloutState::Running | RolloutState::Paused => run.advance().await,
        }
    }
}

/// One pass over one rollout record.
struct Run<'a> {
    control: &'a Control,
    rollout: Rollout,
    revision: u64,
    replica: &'a str,
}

// === impl Run ===

impl Run<'_> {
    /// Writes the record; `Stop` when it moved since it was read.
    async fn save(&mut self) -> Result<Flow, ControlError> {
        self.rollout.driver = self.replica.to_owned();
        match self
            .control
            .store()
            .save_rollout(&self.rollout, self.revision)
            .await?
        {
            Some(revision) => {
                self.revision = revision;
                Ok(Flow::Go)
            }
            None => Ok(Flow::Stop),
        }
    }

    /// Gates the step under way, finishes it, or starts the next one.
    async fn advance(&mut self) -> Result<(), ControlError> {
        let version = self.rollout.version;
        if self.rollout.step >= self.rollout.steps.len() {
            let now = now_ms();
            self.rollout.state = RolloutState::Succeeded;
            self.rollout.reason.clear();
            self.rollout.event(
                now,
                format!("succeeded: every node is on version {version}"),
            );
            self.save().await?;
            tracing::info!(version, "rollout succeeded");
            return Ok(());
        }
        let step: Vec<String> = self.rollout.current_step().to_vec();
        if self.rollout.step == 0
            && self
                .rollout
                .nodes
                .iter()
                .all(|n| n.state == NodeState::Pending)
        {
            failpoint::hit("rollout.after-plan");
        }
        // A push decided but perhaps not made (the last leader died).
        for node in &step {
            if self.state_of(node) == NodeState::Pushing {
                if let Err(reason) = self.push(node).await? {
                    return self.fail(node, reason).await;
                }
                if let Flow::Stop = self.pushed(node).await? {
                    return Ok(());
                }
            }
        }
        // The gates of the pushed nodes.
        let reports = self.control.store().reports_of(&step).await?;
        for node in &step {
            if self.state_of(node) != NodeState::Gating {
                continue;
            }
            let options = self.rollout.options.clone();
            let frontend = self.frontend_of(node);
            let (stats, apply) = match frontend {
                Frontend::Proxy => (Some(node_stats(self.control, node).await), None),
                Frontend::Nginx => (None, self.apply_for_gate(node).await),
            };
            let monitor = monitor_says(self.control, node).await;
            let now = now_ms();
            let noted = self.note_monitor(node, monitor.as_ref(), now);
            let Some(progress) = self.rollout.node_mut(node) else {
                continue;
            };
            let acked = progress.acked_at_ms;
            let verdict = match (frontend, &stats) {
                (Frontend::Proxy, Some(stats)) => gate(
                    progress,
                    version,
                    reports.get(node),
                    stats.as_ref().map_err(String::as_str),
                    &options,
                    now,
                ),
                _ => nginx::gate(progress, version, apply.as_ref(), &options, now),
            };
            let verdict = monitor_gate(node, verdict, progress.acked_at_ms != 0, monitor.as_ref());
            if progress.acked_at_ms != 0 {
                failpoint::hit("rollout.during-gate");
            }
            match verdict {
                Verdict::Fail(reason) => return self.fail(node, reason).await,
                Verdict::Pass => {
                    progress.state = NodeState::Done;
                    progress.detail = format!("on version {version}, healthy through the soak");
                    self.rollout
                        .event(now, format!("{node} passed its gates on version {version}"));
                    if let Flow::Stop = self.save().await? {
                        return Ok(());
                    }
                }
                Verdict::Wait(what) => {
                    let newly_acked = acked == 0 && progress.acked_at_ms != 0;
                    if progress.detail != what || newly_acked || noted {
                        progress.detail = what;
                        if newly_acked {
                            let how = match &apply {
                                Some(Apply::Done { sha256, changed }) => format!(
                                    ": its deployer applied the nginx.conf (sha256 {}{})",
                                    sha256.get(..12).unwrap_or(sha256),
                                    if *changed { "" } else { ", unchanged" }
                                ),
                                _ => String::new(),
                            };
                            self.rollout
                                .event(now, format!("{node} acknowledged version {version}{how}"));
                        }
                        if let Flow::Stop = self.save().await? {
                            return Ok(());
                        }
                    }
                }
            }
        }
        if step.iter().all(|n| self.state_of(n) == NodeState::Done) {
            let now = now_ms();
            let k = self.rollout.step + 1;
            self.rollout.step = k;
            self.rollout.event(
                now,
                format!("step {k} of {} done", self.rollout.steps.len()),
            );
            self.save().await?;
            return Ok(());
        }
        if self.rollout.state != RolloutState::Running {
            return Ok(());
        }
        // Start the step's pending nodes.
        for node in &step {
            if self.state_of(node) != NodeState::Pending {
                continue;
            }
            let frontend = match self.control.frontend(node).await {
                Ok(Ok(f)) => f,
                Ok(Err(why)) => return self.fail(node, format!("node {node}: {why}")).await,
                Err(ControlError::NotFound(why)) => return self.fail(node, why).await,
                Err(e) => return Err(e),
            };
            // An nginx node has no proxy counters: its gate is the apply.
            let baseline = match frontend {
                Frontend::Nginx => None,
                Frontend::Proxy => match baseline(self.control, node).await {
                    Ok(s) => Some(s),
                    Err(why) => {
                        let reason = format!(
                            "cannot read node {node}'s proxy health before the push: {why}"
                        );
                        return self.fail(node, reason).await;
                    }
                },
            };
            let now = now_ms();
            if let Some(p) = self.rollout.node_mut(node) {
                p.state = NodeState::Pushing;
                p.frontend = frontend;
                p.baseline = baseline;
                p.pushed_at_ms = now;
                p.detail = format!("pushing version {version}");
            }
            if let Flow::Stop = self.save().await? {
                return Ok(());
            }
            if let Err(reason) = self.push(node).await? {
                return self.fail(node, reason).await;
            }
            failpoint::hit("rollout.after-push");
            if let Flow::Stop = self.pushed(node).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The ApplyConfig of an nginx node's gate: made until the node has
    /// acknowledged, then `None`.
    async fn apply_for_gate(&self, node: &str) -> Option<Apply> {
        let p = self.rollout.node(node)?;
        if p.acked_at_ms != 0 {
            return None;
        }
        let timeout = nginx::call_timeout(&self.rollout.options, p.pushed_at_ms, now_ms());
        let version = self.rollout.version;
        let apply = nginx::apply(self.control, node, version, timeout).await;
        match &apply {
            Apply::Done { sha256, changed } => {
                tracing::info!(node, version, sha256, changed, "nginx.conf applied");
            }
            Apply::Refused(why) => tracing::warn!(node, version, %why, "nginx.conf refused"),
            Apply::Unreachable(why) => {
                tracing::info!(node, version, %why, "nginx.conf not applied yet");
            }
        }
        Some(apply)
    }

    /// Records once in the events that mesh-monitor gave no verdict on
    /// `node` (silent, or it probes nothing there), so the node is gated
    /// without it; whether the record changed.
    fn note_monitor(&mut self, node: &str, monitor: Option<&MonitorSays>, now: u64) -> bool {
        let (prefix, text) = match monitor {
            Some(MonitorSays::Silent(why)) => {
                // The prefix ends where the node name does: n1 is not n10.
                let prefix = format!("mesh-monitor did not answer about {node} (");
                let text = format!("{prefix}{why}); {node} is gated without its verdict");
                (prefix, text)
            }
            Some(MonitorSays::NothingProbed) => {
                let prefix = format!("mesh-monitor probes nothing on {node};");
                let text = format!("{prefix} {node} is gated without its verdict");
                (prefix, text)
            }
            Some(MonitorSays::Verdict { .. }) | None => return false,
        };
        if self
            .rollout
            .events
            .iter()
            .any(|e| e.text.starts_with(&prefix))
        {
            tracing::debug!(node, %text, "no monitor verdict again");
            return false;
        }
        tracing::warn!(node, %text, "no monitor verdict; gating on the other gates");
        self.rollout.event(now, text);
        true
    }

    /// Records that `node` was pushed.
    async fn pushed(&mut self, node: &str) -> Result<Flow, ControlError> {
        let now = now_ms();
        let version = self.rollout.version;
        if let Some(p) = self.rollout.node_mut(node) {
            p.state = NodeState::Gating;
            p.detail = match p.frontend {
                Frontend::Proxy => format!("waiting for node {node} to acknowledge"),
                Frontend::Nginx => {
                    format!("applying the nginx.conf of version {version} to node {node}")
                }
            };
        }
        self.rollout
            .event(now, format!("pushed version {version} to {node}"));
        self.save().await
    }

    /// Makes the rollout's version `node`'s current one, unless it is
    /// already; `Err` (inner) when the node moved outside the rollout.
    async fn push(&self, node: &str) -> Result<Result<(), String>, ControlError> {
        let store = self.control.store();
        let version = self.rollout.version;
        let from = self.rollout.node(node).map_or(0, |p| p.from);
        let current = store.current(node).await?;
        let on = current_number(&current);
        if on == version {
            return Ok(Ok(()));
        }
        if on != from {
            return Ok(Err(format!(
                "node {node} moved to version {on} outside the rollout (it was on {from})"
            )));
        }
        let Some(record) = store.version(node, version).await? else {
            return Ok(Err(format!("node {node} has no version {version} record")));
        };
        if !store.put_current(&record, current.revision).await? {
            return Err(ControlError::Unavailable(format!(
                "node {node}'s routes changed during the push; trying again"
            )));
        }
        tracing::info!(node, version, "pushed");
        Ok(Ok(()))
    }

    /// A gate of `node` failed: abort, which reverts every node moved.
    async fn fail(&mut self, node: &str, reason: String) -> Result<(), ControlError> {
        let now = now_ms();
        if let Some(p) = self.rollout.node_mut(node) {
            p.detail.clone_from(&reason);
        }
        tracing::warn!(version = self.rollout.version, node, %reason, "rollout gate failed");
        self.rollout.abort(now, reason);
        self.save().await?;
        Ok(())
    }

    /// Puts every node the rollout moved back on its previous version,
    /// the last moved first, and ends the rollout once all are back.
    async fn revert(&mut self) -> Result<(), ControlError> {
        let now = now_ms();
        let version = self.rollout.version;
        // Decide every revert at once, then make them.
        let mut decided = false;
        for p in self.rollout.nodes.iter_mut().rev() {
            if p.state.is_moved() && p.state != NodeState::Reverting {
                p.state = NodeState::Reverting;
                p.reverted_at_ms = now;
                decided = true;
            }
        }
        if decided {
            self.rollout.event(
                now,
                "putting the nodes moved back on their previous versions",
            );
            if let Flow::Stop = self.save().await? {
                return Ok(());
            }
        }
        let reverting: Vec<(String, u64)> = self
            .rollout
            .nodes
            .iter()
            .rev()
            .filter(|p| p.state == NodeState::Reverting)
            .map(|p| (p.node.clone(), p.from))
            .collect();
        let store = self.control.store();
        let mut outcome = BTreeMap::new();
        for (node, from) in &reverting {
            failpoint::hit("rollout.before-revert");
            let current = store.current(node).await?;
            let on = current_number(&current);
            if on == *from {
                outcome.insert(node.clone(), None);
                continue;
            }
            if on != version {
                outcome.insert(
                    node.clone(),
                    Some(format!(
                        "moved to version {on} outside the rollout; left as it is"
                    )),
                );
                continue;
            }
            let Some(record) = store.version(node, *from).await? else {
                return Err(ControlError::Internal(format!(
                    "node {node} has no version {from} record to go back to"
                )));
            };
            if !store.put_current(&record, current.revision).await? {
                return Err(ControlError::Unavailable(format!(
                    "node {node}'s routes changed during the revert; trying again"
                )));
            }
            tracing::info!(node, from, version, "reverted");
            outcome.insert(node.clone(), None);
        }
        // An nginx node gets its previous version's nginx.conf back.
        let mut applied = BTreeMap::new();
        for (node, from) in &reverting {
            let Some(p) = self.rollout.node(node) else {
                continue;
            };
            if p.frontend != Frontend::Nginx || outcome.get(node) != Some(&None) {
                continue;
            }
            let timeout = nginx::call_timeout(&self.rollout.options, p.reverted_at_ms, now_ms());
            let apply = nginx::apply(self.control, node, *from, timeout).await;
            tracing::info!(node, from, ?apply, "nginx.conf of the previous version");
            applied.insert(node.clone(), apply);
        }
        // Done once each proxy runs its old version again (or did not
        // say so before its deadline: then the record says that).
        let names: Vec<String> = reverting.iter().map(|(n, _)| n.clone()).collect();
        let reports = store.reports_of(&names).await?;
        let now = now_ms();
        let ack_timeout = self.rollout.options.ack_timeout_ms;
        let mut changed = false;
        for p in &mut self.rollout.nodes {
            if p.state != NodeState::Reverting {
                continue;
            }
            let Some(note) = outcome.remove(&p.node) else {
                continue;
            };
            let report: Option<&ProxyReport> = reports.get(&p.node);
            let in_effect = report.map(|r| r.version_in_effect);
            let late = now.saturating_sub(p.reverted_at_ms) > ack_timeout;
            let detail = match note {
                Some(moved) => moved,
                None if p.frontend == Frontend::Nginx => match applied.remove(&p.node) {
                    Some(Apply::Done { .. }) => {
                        format!("back on version {} (its nginx.conf applied)", p.from)
                    }
                    Some(Apply::Refused(why)) => format!(
                        "put back on version {} in Consul; its nginx.conf was not applied: {why}",
                        p.from
                    ),
                    Some(Apply::Unreachable(why)) if late => format!(
                        "put back on version {} in Consul; its deployer did not apply its nginx.conf within {} s: {why}",
                        p.from,
                        ack_timeout / 1000
                    ),
                    _ => {
                        let wait = format!("putting back version {}", p.from);
                        if p.detail != wait {
                            p.detail = wait;
                            changed = true;
                        }
                        continue;
                    }
                },
                None if in_effect == Some(p.from) => format!("back on version {}", p.from),
                None if late => format!(
                    "put back on version {} in Consul; its proxy did not acknowledge it within {} s (in effect: {})",
                    p.from,
                    ack_timeout / 1000,
                    in_effect.map_or_else(|| "unknown".to_owned(), |v| format!("version {v}"))
                ),
                None => {
                    let wait = format!("putting back version {}", p.from);
                    if p.detail != wait {
                        p.detail = wait;
                        changed = true;
                    }
                    continue;
                }
            };
            p.state = NodeState::Reverted;
            p.detail = detail;
            changed = true;
            let line = format!("{} reverted: {}", p.node, p.detail);
            self.rollout.events.push(super::Event {
                at_ms: now,
                text: line,
            });
        }
        if changed && let Flow::Stop = self.save().await? {
            return Ok(());
        }
        if self.rollout.nodes.iter().all(|p| !p.state.is_moved()) {
            let reason = self.rollout.reason.clone();
            self.rollout.state = RolloutState::Aborted;
            self.rollout.event(now, format!("aborted: {reason}"));
            self.save().await?;
            tracing::warn!(version, %reason, "rollout aborted; every node moved is back");
        }
        Ok(())
    }

    fn frontend_of(&self, node: &str) -> Frontend {
        self.rollout
            .node(node)
            .map_or(Frontend::Proxy, |p| p.frontend)
    }

    fn state_of(&self, node: &str) -> NodeState {
        self.rollout
            .node(node)
            .map_or(NodeState::Pending, |p| p.state)
    }
}

/// `node`'s proxy counters through its bridge; `Err` says why not.
pub async fn node_stats(control: &Control, node: &str) -> Result<Stats, String> {
    let (mut bridge, url) = control.bridge(node).await.map_err(|e| e.to_string())?;
    let answer = bridge
        .proxy_stats(pb::ProxyStatsRequest {})
        .await
        .map_err(|s| format!("node {node}'s bridge at {url}: {}", s.message()))?
        .into_inner();
    Ok(stats_of(answer))
}

/// The counters a rollout compares, from the bridge's answer.
/// Requests slower than the last bound become a last count, past the
/// bounds (an infinite bound would not survive JSON).
pub fn stats_of(answer: pb::ProxyStatsResponse) -> Stats {
    let bounds = answer.latency_bounds_seconds;
    let mut counts = answer.latency_counts;
    counts.resize(bounds.len(), 0);
    let bounded: u64 = counts.iter().sum();
    counts.push(answer.latency_count.saturating_sub(bounded));
    Stats {
        ready: answer.ready,
        requests: answer.requests,
        errors: answer.errors,
        latency_bounds: bounds,
        latency_counts: counts,
    }
}

/// What mesh-monitor says of `node` now; `None` when mesh-control runs
/// without a monitor.
async fn monitor_says(control: &Control, node: &str) -> Option<MonitorSays> {
    let (mut client, url) = match control.monitor().await? {
        Ok(c) => c,
        Err(e) => return Some(MonitorSays::Silent(e.to_string())),
    };
    let request = pb::VerdictRequest {
        node: node.to_owned(),
        instance_id: String::new(),
    };
    Some(
        match tokio::time::timeout(MONITOR_TIMEOUT, client.verdict(request)).await {
            Err(_) => MonitorSays::Silent(format!(
                "mesh-monitor at {url} gave no verdict within {} s",
                MONITOR_TIMEOUT.as_secs()
            )),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => MonitorSays::NothingProbed,
            Ok(Err(s)) => MonitorSays::Silent(format!("mesh-monitor at {url}: {}", s.message())),
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                MonitorSays::Verdict {
                    healthy: answer.healthy,
                    reasons: answer.reasons,
                }
            }
        },
    )
}

/// The counters before a push, read a few times before giving up.
async fn baseline(control: &Control, node: &str) -> Result<Stats, String> {
    let mut last = String::new();
    for attempt in 0..BASELINE_TRIES {
        if attempt > 0 {
            tokio::time::sleep(TICK).await;
        }
        match node_stats(control, node).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}
