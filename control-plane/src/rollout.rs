//! Staged rollouts: a config version brought to its nodes a step at a
//! time (the canary nodes first, then batches), each step gated on the
//! proxies acknowledging the version, their health, and a soak time.
//!
//! A rollout is one JSON record in Consul KV (`mesh/rollouts/<version>`),
//! written with check-and-set. The leader replica drives it
//! ([`driver`]): it writes what it is about to do *before* doing it (a
//! node is `pushing` before its routes key changes, `reverting` before
//! they change back), and every side effect is idempotent given the
//! record. So when the leader dies at any point, the next leader reads the
//! record and carries on: it pushes again (a no-op when the push landed),
//! goes on gating from the stored times and baseline, or reverts. No node
//! is skipped and none is left in a state the record does not name.
//!
//! A failed gate, or `abort`, puts every node the rollout moved back on the
//! version it had before, in reverse order, and ends the rollout
//! `aborted` with the reason. Nodes not yet reached are not touched.
//!
//! Nodes that still serve their routes with nginx (Consul node metadata
//! `mesh-frontend = "nginx"`, see [`Frontend`]) have no mesh-proxy to read
//! the version from Consul KV: after the same KV move, the driver renders
//! the version's nginx.conf and has the node's mesh-deployer apply it
//! (`ApplyConfig`: write, `nginx -t`, reload, then a GET through nginx that
//! answers only once the version is in effect; the deployer puts the old
//! file back when a step fails). The node acknowledges when the apply
//! succeeds; a refused apply (nginx -t, reload or verify failed) fails the
//! gate with the deployer's words, nginx -t's output included. The proxy
//! health gate does not apply to such a node: the verify is its health
//! check, and the soak is only a wait. A revert moves KV back and applies
//! the previous version's nginx.conf the same way.
//!
//! A proxy node acknowledges by its proxy's report (Consul KV, written
//! through its bridge): the version the node should run (its routes key)
//! is compared with the version its proxy says is in effect, and the gate
//! waits until they agree, or fails when the proxy refused the version or
//! did not take it within the acknowledgement timeout.
//!
//! When mesh-control has a mesh-monitor (`--monitor-addr`), each gating
//! node that has acknowledged is also judged by the monitor's verdict on
//! it (mesh.v1.Monitor `Verdict`, asked every tick): an unhealthy verdict
//! (an open critical alert on an instance probed on the node: down, hung,
//! unhealthy) fails the gate with the monitor's reasons, which aborts and
//! reverts the rollout like any failed gate ([`monitor_gate`]). A monitor
//! that does not answer, or probes nothing on the node, does not fail the
//! gate: the driver logs it, records it once in the rollout's events, and
//! the node is judged by its other gates alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::ProxyReport;

pub mod driver;
pub mod failpoint;
pub mod nginx;
#[cfg(test)]
mod tests;

/// The most events a rollout record keeps (the oldest go first).
pub const MAX_EVENTS: usize = 200;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Steps are being taken.
    Running,
    /// No new step starts; a step under way finishes its gates.
    Paused,
    /// Every node is on the version.
    Succeeded,
    /// The nodes it moved are being put back.
    Aborting,
    /// Ended: every node it moved is back on its previous version.
    Aborted,
}

/// Where one node of a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not reached yet.
    Pending,
    /// Its routes key is being set to the version.
    Pushing,
    /// Pushed: waiting for the proxy's acknowledgement, health and soak.
    Gating,
    /// On the version, every gate passed.
    Done,
    /// Being put back on its previous version.
    Reverting,
    /// Back on its previous version.
    Reverted,
}

/// The Consul node metadata key that names what serves a node's routes.
pub const FRONTEND_META: &str = "mesh-frontend";

/// What serves a node's routes, from its Consul agent's node metadata
/// [`FRONTEND_META`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frontend {
    /// mesh-proxy, which reads its version from Consul KV (no metadata).
    #[default]
    Proxy,
    /// nginx (or OpenResty), whose nginx.conf the node's deployer applies.
    Nginx,
}

/// How a rollout proceeds and what its gates accept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// Nodes in the first step (0: no canary step).
    pub canary: u32,
    /// Nodes per step after the canary (at least 1).
    pub batch: u32,
    /// How long a step's nodes must stay healthy after acknowledging.
    pub soak_ms: u64,
    /// How long a proxy may take to acknowledge (or to show it is ready).
    pub ack_timeout_ms: u64,
    /// How much the share of 5xx answers may rise over the node's
    /// baseline (0.02: two percentage points).
    pub max_error_rate_increase: f64,
    /// How many times the baseline p99 latency may be reached (2.0: twice).
    pub max_latency_ratio: f64,
}

/// Defaults: one canary, then one node at a time, 30 s soak, 30 s to
/// acknowledge, 2 points more 5xx, twice the p99.
impl Default for RolloutOptions {
    fn default() -> Self {
        Self {
            canary: 1,
            batch: 1,
            soak_ms: 30_000,
            ack_timeout_ms: 30_000,
            max_error_rate_increase: 0.02,
            max_latency_ratio: 2.0,
        }
    }
}

/// A node's proxy counters, cumulative since it started (from its bridge).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The proxy says it is ready.
    pub ready: bool,
    /// Responses.
    pub requests: u64,
    /// Responses with status 500 or more.
    pub errors: u64,
    /// Latency bucket upper bounds, in seconds (finite).
    pub latency_bounds: Vec<f64>,
    /// Requests per bucket (not cumulative); one more than the bounds:
    /// the last counts the requests slower than the last bound.
    pub latency_counts: Vec<u64>,
}

/// One node of a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeProgress {
    /// The node.
    pub node: String,
    /// The version it was on when the version was staged: where a revert
    /// puts it back.
    pub from: u64,
    /// Where it is.
    pub state: NodeState,
    /// What serves its routes, as read when its push was decided.
    #[serde(default)]
    pub frontend: Frontend,
    /// Its proxy's counters just before the push; `None` before it (and
    /// for an nginx node).
    #[serde(default)]
    pub baseline: Option<Stats>,
    /// When the push was decided (ms since the epoch); 0: not yet.
    #[serde(default)]
    pub pushed_at_ms: u64,
    /// When the proxy was seen running the version; 0: not yet.
    #[serde(default)]
    pub acked_at_ms: u64,
    /// When the revert was decided; 0: not reverted.
    #[serde(default)]
    pub reverted_at_ms: u64,
    /// What is going on, or what went wrong, in words.
    #[serde(default)]
    pub detail: String,
}

/// A line of a rollout's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What happened.
    pub text: String,
}

/// A rollout, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The config version rolled out (one number across nodes).
    pub version: u64,
    /// Who started it.
    pub author: String,
    /// When (ms since the epoch).
    pub created_at_ms: u64,
    /// When the record last changed.
    pub updated_at_ms: u64,
    /// How it proceeds.
    pub options: RolloutOptions,
    /// Where it is.
    pub state: RolloutState,
    /// Why it was paused, aborted or why it failed; empty otherwise.
    #[serde(default)]
    pub reason: String,
    /// The nodes of each step, in order.
    pub steps: Vec<Vec<String>>,
    /// The step under way (`steps.len()` once every step is done).
    pub step: usize,
    /// Every node, in step order.
    pub nodes: Vec<NodeProgress>,
    /// What happened, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
    /// The replica that last wrote the record.
    #[serde(default)]
    pub driver: String,
}

/// What a gate says now.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not decided yet; what it waits for.
    Wait(String),
    /// Every gate passed.
    Pass,
    /// A gate failed; why.
    Fail(String),
}

// === impl RolloutState ===

impl RolloutState {
    /// Whether the rollout has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Aborted)
    }

    /// The name the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Aborting => "aborting",
            Self::Aborted => "aborted",
        }
    }
}

// === impl NodeState ===

impl NodeState {
    /// The name the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Pushing => "pushing",
            Self::Gating => "gating",
            Self::Done => "done",
            Self::Reverting => "reverting",
            Self::Reverted => "reverted",
        }
    }

    /// Whether the rollout may have changed the node's routes.
    pub fn is_moved(self) -> bool {
        matches!(
            self,
            Self::Pushing | Self::Gating | Self::Done | Self::Reverting
        )
    }
}

// === impl Frontend ===

impl Frontend {
    /// What a node's metadata says; `Err` names a value that is neither.
    pub fn of_meta(meta: &BTreeMap<String, String>) -> Result<Self, String> {
        match meta.get(FRONTEND_META).map(|v| v.trim()) {
            None | Some("" | "proxy") => Ok(Self::Proxy),
            Some("nginx") => Ok(Self::Nginx),
            Some(other) => Err(format!(
                "node metadata {FRONTEND_META} = {other:?} is neither \"nginx\" nor \"proxy\""
            )),
        }
    }

    /// The name the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Nginx => "nginx",
        }
    }
}

// === impl RolloutOptions ===

impl RolloutOptions {
    /// Checks the options; the error names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.batch == 0 {
            return Err(("batch", "must be at least 1".into()));
        }
        if self.ack_timeout_ms == 0 {
            return Err(("ack_timeout", "must be more than 0".into()));
        }
        if self.ack_timeout_ms > 3_600_000 || self.soak_ms > 86_400_000 {
            return Err((
                if self.soak_ms > 86_400_000 {
                    "soak"
                } else {
                    "ack_timeout"
                },
                "is too long (soak at most 24 h, ack timeout at most 1 h)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_error_rate_increase) {
            return Err((
                "max_error_rate_increase",
                format!(
                    "{} is not a share from 0 to 1",
                    self.max_error_rate_increase
                ),
            ));
        }
        if !self.max_latency_ratio.is_finite() || self.max_latency_ratio < 1.0 {
            return Err((
                "max_latency_ratio",
                format!("{} must be 1 or more", self.max_latency_ratio),
            ));
        }
        Ok(())
    }
}

/// The steps of a rollout over `nodes`, in order: `canary` nodes first,
/// then `batch` at a time.
pub fn plan(nodes: &[String], canary: u32, batch: u32) -> Vec<Vec<String>> {
    let canary = (canary as usize).min(nodes.len());
    let batch = (batch as usize).max(1);
    let mut steps = Vec::new();
    if canary > 0 {
        steps.push(nodes[..canary].to_vec());
    }
    steps.extend(nodes[canary..].chunks(batch).map(<[String]>::to_vec));
    steps
}

// === impl Rollout ===

impl Rollout {
    /// A new running rollout of `version` from `from` (node, previous
    /// version), in that order.
    pub fn new(
        version: u64,
        author: String,
        options: RolloutOptions,
        from: &[(String, u64)],
        now_ms: u64,
    ) -> Self {
        let names: Vec<String> = from.iter().map(|(n, _)| n.clone()).collect();
        let steps = plan(&names, options.canary, options.batch);
        let mut rollout = Self {
            version,
            author: author.clone(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            options,
            state: RolloutState::Running,
            reason: String::new(),
            steps: Vec::new(),
            step: 0,
            nodes: from
                .iter()
                .map(|(node, from)| NodeProgress {
                    node: node.clone(),
                    from: *from,
                    state: NodeState::Pending,
                    frontend: Frontend::Proxy,
                    baseline: None,
                    pushed_at_ms: 0,
                    acked_at_ms: 0,
                    reverted_at_ms: 0,
                    detail: String::new(),
                })
                .collect(),
            events: Vec::new(),
            driver: String::new(),
        };
        let shape = rollout
            .steps_text(&steps)
            .unwrap_or_else(|| "no nodes".to_owned());
        rollout.steps = steps;
        rollout.event(
            now_ms,
            format!("started by {author} to version {version}: {shape}"),
        );
        rollout
    }

    fn steps_text(&self, steps: &[Vec<String>]) -> Option<String> {
        (!steps.is_empty()).then(|| {
            steps
                .iter()
                .enumerate()
                .map(|(k, s)| format!("step {} [{}]", k + 1, s.join(", ")))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// Appends a line to the history, dropping the oldest past [`MAX_EVENTS`].
    pub fn event(&mut self, at_ms: u64, text: impl Into<String>) {
        self.events.push(Event {
            at_ms,
            text: text.into(),
        });
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
        self.updated_at_ms = at_ms;
    }

    /// The node's progress.
    pub fn node(&self, node: &str) -> Option<&NodeProgress> {
        self.nodes.iter().find(|n| n.node == node)
    }

    /// The node's progress, to change.
    pub fn node_mut(&mut self, node: &str) -> Option<&mut NodeProgress> {
        self.nodes.iter_mut().find(|n| n.node == node)
    }

    /// The nodes of the step under way; empty once every step is done.
    pub fn current_step(&self) -> &[String] {
        self.steps.get(self.step).map_or(&[], Vec::as_slice)
    }

    /// Nodes done, of all.
    pub fn progress(&self) -> (usize, usize) {
        let done = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Done)
            .count();
        (done, self.nodes.len())
    }

    /// Starts aborting with `reason`, unless it has ended or is aborting.
    pub fn abort(&mut self, now_ms: u64, reason: impl Into<String>) -> bool {
        if self.state.is_final() || self.state == RolloutState::Aborting {
            return false;
        }
        let reason = reason.into();
        self.event(now_ms, format!("aborting: {reason}"));
        self.state = RolloutState::Aborting;
        self.reason = reason;
        true
    }
}

// === impl Stats ===

impl Stats {
    /// The counters since `base` (a proxy restart resets them: then all
    /// of `self` counts).
    pub fn since(&self, base: &Stats) -> Stats {
        if self.requests < base.requests
            || self.errors < base.errors
            || self.latency_bounds != base.latency_bounds
        {
            return self.clone();
        }
        Stats {
            ready: self.ready,
            requests: self.requests - base.requests,
            errors: self.errors - base.errors,
            latency_bounds: self.latency_bounds.clone(),
            latency_counts: self
                .latency_counts
                .iter()
                .zip(base.latency_counts.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }

    /// The share of 5xx answers; 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The upper bound of the bucket holding quantile `q` of the
    /// latencies, in seconds; `None` without samples; infinite when it is
    /// past the last bound.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency_counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (k, count) in self.latency_counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(self.latency_bounds.get(k).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }

    fn samples(&self) -> u64 {
        self.latency_counts.iter().sum()
    }
}

/// Fewest 5xx answers after a push before the error-rate gate judges.
pub const MIN_ERRORS: u64 = 5;

/// Fewest answers after a push before the latency gate judges: from 100
/// on, the p99's rank, ceil(0.99 n), is under n, so the slowest answer
/// alone is never the p99 and one slow request (say under CPU
/// contention) cannot fail the gate.
pub const MIN_LATENCY_SAMPLES: u64 = 100;

/// The latency gate never fails a p99 whose bucket's upper bound is at
/// most this, in seconds: a bucket bound of the proxy's histogram
/// ([`mesh_runtime::metrics::LATENCY_BUCKETS`]), so the gate fails only a
/// p99 in a bucket above 100 ms. A rise from 1 ms to 3 ms, or from the
/// 25 ms bucket to the 100 ms one, is noise, not harm.
pub const LATENCY_FLOOR_SECONDS: f64 = 0.1;

/// Whether the proxy is as healthy as before the push: `Err` says how it
/// is worse.
pub fn health(baseline: &Stats, now: &Stats, options: &RolloutOptions) -> Result<(), String> {
    if !now.ready {
        return Err("the proxy is not ready".into());
    }
    let after = now.since(baseline);
    let before_rate = baseline.error_rate();
    let after_rate = after.error_rate();
    if after.errors >= MIN_ERRORS && after_rate > before_rate + options.max_error_rate_increase {
        return Err(format!(
            "error rate {:.1}% ({} of {} answers were 5xx) against {:.1}% before",
            after_rate * 100.0,
            after.errors,
            after.requests,
            before_rate * 100.0
        ));
    }
    if after.samples() >= MIN_LATENCY_SAMPLES
        && let (Some(p99), before) = (
            after.latency_quantile(0.99),
            baseline.latency_quantile(0.99),
        )
    {
        let limit = before.map_or(LATENCY_FLOOR_SECONDS, |b| {
            (b * options.max_latency_ratio).max(LATENCY_FLOOR_SECONDS)
        });
        if p99 > limit {
            return Err(format!(
                "p99 latency {} against {} before",
                seconds(p99),
                before.map_or_else(|| "none".to_owned(), seconds)
            ));
        }
    }
    Ok(())
}

fn seconds(s: f64) -> String {
    if s.is_infinite() {
        "over the largest bucket".to_owned()
    } else if s < 1.0 {
        format!("≤ {:.0} ms", s * 1000.0)
    } else {
        format!("≤ {s:.1} s")
    }
}

/// The gate of a node that was pushed `version`, now: its proxy's last
/// report, its counters (or why they could not be read), the time.
/// Sets `acked_at_ms` when the proxy is first seen running the version.
pub fn gate(
    progress: &mut NodeProgress,
    version: u64,
    report: Option<&ProxyReport>,
    stats: Result<&Stats, &str>,
    options: &RolloutOptions,
    now_ms: u64,
) -> Verdict {
    let node = progress.node.clone();
    if progress.acked_at_ms == 0 {
        if let Some(r) = report {
            if r.refused_version == version && r.version_in_effect != version {
                return Verdict::Fail(format!(
                    "node {node} refused version {version}: {}",
                    if r.reason.is_empty() {
                        "no reason given"
                    } else {
                        &r.reason
                    }
                ));
            }
            if r.version_in_effect == version {
                progress.acked_at_ms = now_ms;
            }
        }
        if progress.acked_at_ms == 0 {
            let waited = now_ms.saturating_sub(progress.pushed_at_ms);
            if waited > options.ack_timeout_ms {
                return Verdict::Fail(format!(
                    "node {node} did not acknowledge version {version} within {} s (in effect: {})",
                    options.ack_timeout_ms / 1000,
                    report.map_or_else(
                        || "unknown, its proxy never reported".to_owned(),
                        |r| format!("version {}", r.version_in_effect)
                    )
                ));
            }
            return Verdict::Wait(format!("waiting for node {node} to acknowledge"));
        }
    }
    let since_ack = now_ms.saturating_sub(progress.acked_at_ms);
    let stats = match stats {
        Ok(s) => s,
        Err(why) => {
            if since_ack > options.ack_timeout_ms {
                return Verdict::Fail(format!("node {node}'s proxy health is unknown: {why}"));
            }
            return Verdict::Wait(format!("reading node {node}'s proxy health: {why}"));
        }
    };
    let baseline = progress.baseline.clone().unwrap_or_default();
    if let Err(why) = health(&baseline, stats, options) {
        if !stats.ready && since_ack <= options.ack_timeout_ms {
            return Verdict::Wait(format!("waiting for node {node}'s proxy to be ready"));
        }
        return Verdict::Fail(format!(
            "node {node} is unhealthy on version {version}: {why}"
        ));
    }
    if since_ack < options.soak_ms {
        let left = (options.soak_ms - since_ack).div_ceil(1000);
        return Verdict::Wait(format!("node {node} soaking, {left} s left"));
    }
    Verdict::Pass
}

/// What mesh-monitor said of a node when its gate asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MonitorSays {
    /// Its verdict: healthy or not, and one line per open alert.
    Verdict {
        /// No open critical alert on the node.
        healthy: bool,
        /// `<kind> <target>: <evidence>` per open alert (warnings too).
        reasons: Vec<String>,
    },
    /// It probes nothing on the node.
    NothingProbed,
    /// It did not answer; why.
    Silent(String),
}

/// The gate of a node with mesh-monitor's word on it: `verdict` is what
/// the other gates say, `acked` whether the node runs the version. An
/// unhealthy verdict on an acknowledged node fails the gate (also one
/// that would pass now: the monitor has the last word); no monitor, a
/// silent one or one that probes nothing there leaves `verdict` as it is.
pub fn monitor_gate(
    node: &str,
    verdict: Verdict,
    acked: bool,
    monitor: Option<&MonitorSays>,
) -> Verdict {
    if !acked || matches!(verdict, Verdict::Fail(_)) {
        return verdict;
    }
    match monitor {
        Some(MonitorSays::Verdict {
            healthy: false,
            reasons,
        }) => {
            let why = if reasons.is_empty() {
                "no reason given".to_owned()
            } else {
                reasons.join("; ")
            };
            Verdict::Fail(format!("mesh-monitor: node {node} is unhealthy: {why}"))
        }
        _ => verdict,
    }
}

/// A rollout's progress per node state, for summaries.
pub fn counts(rollout: &Rollout) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for n in &rollout.nodes {
        *out.entry(n.state.as_str()).or_insert(0) += 1;
    }
    out
}
