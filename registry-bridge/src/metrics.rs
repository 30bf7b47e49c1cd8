//! The bridge's metrics, registered once on the registry passed down and
//! recorded through kept handles.

use std::{fmt, time::Duration};

use consul_client::Error;
use mesh_runtime::metrics::{Counter, Gauge, Histogram, Registry};

/// Handles of every bridge metric.
#[derive(Clone)]
pub struct BridgeMetrics {
    /// Active per-service blocking-query loops.
    pub(crate) watches: Gauge,
    /// Open Discovery.Watch streams.
    pub(crate) subscribers: Gauge,
    requests_ok: Counter,
    requests_unreachable: Counter,
    requests_status: Counter,
    requests_decode: Counter,
    errors: Counter,
    /// Answers ignored because a server without a leader would shrink a set.
    pub(crate) untrusted: Counter,
    /// Calls waiting in the durable queue.
    pub(crate) queue_depth: Gauge,
    /// 1 while Consul answers the watches' reads, 0 while it does not.
    pub(crate) consul_reachable: Gauge,
    snapshots: Counter,
    deltas: Counter,
    /// Time a blocking query took to answer.
    pub(crate) query_seconds: Histogram,
    applied: Counter,
    queued: Counter,
    refused: Counter,
    failed: Counter,
}

/// What became of a Registry call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallOutcome {
    /// Consul applied it.
    Applied,
    /// Waits in the durable queue.
    Queued,
    /// Consul or the bridge refused it (the caller's fault).
    Refused,
    /// Neither applied nor queued for another reason (Consul 5xx, disk).
    Failed,
}

// === impl BridgeMetrics ===

impl fmt::Debug for BridgeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeMetrics").finish_non_exhaustive()
    }
}

impl BridgeMetrics {
    /// Describes and registers every metric on `r`.
    pub fn new(r: &Registry) -> Self {
        describe(r);
        let requests =
            |outcome| r.counter("mesh_bridge_consul_requests_total", &[("outcome", outcome)]);
        let sent = |kind| r.counter("mesh_bridge_updates_sent_total", &[("kind", kind)]);
        let calls =
            |outcome| r.counter("mesh_bridge_registry_calls_total", &[("outcome", outcome)]);
        Self {
            watches: r.gauge("mesh_bridge_watches", &[]),
            subscribers: r.gauge("mesh_bridge_subscribers", &[]),
            requests_ok: requests("ok"),
            requests_unreachable: requests("unreachable"),
            requests_status: requests("status"),
            requests_decode: requests("decode"),
            errors: r.counter("mesh_bridge_consul_errors_total", &[]),
            untrusted: r.counter("mesh_bridge_untrusted_answers_total", &[]),
            queue_depth: r.gauge("mesh_bridge_queue_depth", &[]),
            consul_reachable: r.gauge("mesh_bridge_consul_reachable", &[]),
            snapshots: sent("snapshot"),
            deltas: sent("delta"),
            query_seconds: r.histogram("mesh_bridge_blocking_query_duration_seconds", &[]),
            applied: calls("applied"),
            queued: calls("queued"),
            refused: calls("refused"),
            failed: calls("failed"),
        }
    }

    /// Counts one Consul call by outcome.
    pub(crate) fn consul_call<T>(&self, result: &Result<T, Error>) {
        let counter = match result {
            Ok(_) => &self.requests_ok,
            Err(Error::Unreachable { .. }) => &self.requests_unreachable,
            Err(Error::Status { .. }) => &self.requests_status,
            Err(Error::Decode(_)) => &self.requests_decode,
        };
        counter.increment(1);
        if result.is_err() {
            self.errors.increment(1);
        }
    }

    /// Records a blocking query's duration.
    pub(crate) fn blocking_query(&self, took: Duration) {
        self.query_seconds.record(took.as_secs_f64());
    }

    /// Counts one update sent to a subscriber.
    pub(crate) fn update_sent(&self, snapshot: bool) {
        let counter = if snapshot {
            &self.snapshots
        } else {
            &self.deltas
        };
        counter.increment(1);
    }

    /// Counts one Registry call by outcome.
    pub(crate) fn registry_call(&self, outcome: CallOutcome) {
        let counter = match outcome {
            CallOutcome::Applied => &self.applied,
            CallOutcome::Queued => &self.queued,
            CallOutcome::Refused => &self.refused,
            CallOutcome::Failed => &self.failed,
        };
        counter.increment(1);
    }
}

fn describe(r: &Registry) {
    r.describe_gauge(
        "mesh_bridge_watches",
        "Active per-service Consul blocking queries.",
    );
    r.describe_gauge("mesh_bridge_subscribers", "Open Discovery.Watch streams.");
    r.describe_counter(
        "mesh_bridge_consul_requests_total",
        "Consul HTTP calls by outcome (ok, unreachable, status, decode).",
    );
    r.describe_counter(
        "mesh_bridge_consul_errors_total",
        "Consul HTTP calls that failed.",
    );
    r.describe_counter(
        "mesh_bridge_untrusted_answers_total",
        "Answers from a server without a leader that would have shrunk a set; ignored.",
    );
    r.describe_gauge(
        "mesh_bridge_queue_depth",
        "Registry calls waiting in the durable queue for the agent.",
    );
    r.describe_gauge(
        "mesh_bridge_consul_reachable",
        "1 while Consul answers the watches' reads; 0 while routes are its last answers.",
    );
    r.describe_counter(
        "mesh_bridge_updates_sent_total",
        "Route updates sent to subscribers, by kind (snapshot, delta).",
    );
    r.describe_histogram(
        "mesh_bridge_blocking_query_duration_seconds",
        "How long Consul held a blocking query before answering.",
    );
    r.describe_counter(
        "mesh_bridge_registry_calls_total",
        "Register/Deregister calls by outcome (applied, queued, refused, failed).",
    );
}
