//! mesh-monitor's Prometheus metrics, on the registry passed down.
//!
//! - `mesh_monitor_probes_total{probe, outcome}`: probes by kind and outcome.
//! - `mesh_monitor_probe_seconds{probe}`: probe latency.
//! - `mesh_monitor_targets`: targets probed in the last round.
//! - `mesh_monitor_verdicts{status}`: targets by verdict.
//! - `mesh_monitor_alerts_open{severity}`: open alerts.
//! - `mesh_monitor_alerts_opened_total{kind}`, `..._resolved_total{kind}`.
//! - `mesh_monitor_check_writes_total{result}`: checks set through bridges.
//! - `mesh_monitor_webhook_calls_total{result}`: webhook events delivered
//!   or given up.
//! - `mesh_monitor_log_lines_total`: log lines read.
//! - `mesh_monitor_log_matches_total{rule}`: lines a log rule counted (a
//!   pattern rule's matches, an error-rate rule's requests).
//! - `mesh_monitor_log_rule_changes_total{rule, state}`: log rules that
//!   started (`firing`) or stopped (`resolved`) firing.

use std::time::Duration;

use mesh_runtime::metrics::Registry;

use crate::{
    alert::{Alert, AlertKind, Severity},
    probe::{CheckStatus, Outcome, ProbeKind},
};

/// The monitor's metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MonitorMetrics {
    registry: Registry,
}

// === impl MonitorMetrics ===

impl MonitorMetrics {
    /// Describes the metrics on `registry`.
    pub fn new(registry: &Registry) -> Self {
        let r = registry;
        r.describe_counter(
            "mesh_monitor_probes_total",
            "Probes, by probe kind and outcome (up, slow, down, hung, unhealthy).",
        );
        r.describe_histogram("mesh_monitor_probe_seconds", "How long probes took.");
        r.describe_gauge("mesh_monitor_targets", "Targets probed in the last round.");
        r.describe_gauge(
            "mesh_monitor_verdicts",
            "Targets by the status of their verdict.",
        );
        r.describe_gauge("mesh_monitor_alerts_open", "Open alerts, by severity.");
        r.describe_counter(
            "mesh_monitor_alerts_opened_total",
            "Alerts opened, by kind.",
        );
        r.describe_counter(
            "mesh_monitor_alerts_resolved_total",
            "Alerts resolved, by kind.",
        );
        r.describe_counter(
            "mesh_monitor_traffic_scrapes_total",
            "Reads of a node's proxy metrics through its bridge, by result (ok, unavailable, unreadable).",
        );
        r.describe_counter(
            "mesh_monitor_check_writes_total",
            "Checks set in Consul through the nodes' bridges, by result (ok, error).",
        );
        r.describe_counter("mesh_monitor_webhook_calls_total", "Alert events sent to the webhook, by result (ok: delivered, failed: every try failed).");
        r.describe_counter("mesh_monitor_log_lines_total", "Log lines read.");
        r.describe_counter(
            "mesh_monitor_log_matches_total",
            "Log lines a rule counted (pattern matches, access-log requests), by rule.",
        );
        r.describe_counter(
            "mesh_monitor_log_rule_changes_total",
            "Log rules that started (firing) or stopped (resolved) firing, by rule.",
        );
        let metrics = Self {
            registry: registry.clone(),
        };
        metrics.alerts_open(&[]);
        metrics
    }

    /// One probe.
    pub fn probe(&self, kind: ProbeKind, outcome: Outcome, took: Duration) {
        self.registry
            .counter(
                "mesh_monitor_probes_total",
                &[("probe", kind.as_str()), ("outcome", outcome.as_str())],
            )
            .increment(1);
        self.registry
            .histogram("mesh_monitor_probe_seconds", &[("probe", kind.as_str())])
            .record(took.as_secs_f64());
    }

    /// The targets of a round and their verdicts.
    pub fn round(&self, targets: usize, verdicts: &[CheckStatus]) {
        self.registry
            .gauge("mesh_monitor_targets", &[])
            .set(targets as f64);
        for status in [
            CheckStatus::Passing,
            CheckStatus::Warning,
            CheckStatus::Critical,
        ] {
            let n = verdicts.iter().filter(|s| **s == status).count();
            self.registry
                .gauge("mesh_monitor_verdicts", &[("status", status.as_str())])
                .set(n as f64);
        }
    }

    /// The open alerts now.
    pub fn alerts_open(&self, open: &[Alert]) {
        for severity in [Severity::Warning, Severity::Critical] {
            let n = open.iter().filter(|a| a.severity == severity).count();
            self.registry
                .gauge(
                    "mesh_monitor_alerts_open",
                    &[("severity", severity.as_str())],
                )
                .set(n as f64);
        }
    }

    /// An alert opened (`true`) or was resolved.
    pub fn alert_changed(&self, kind: AlertKind, opened: bool) {
        let name = if opened {
            "mesh_monitor_alerts_opened_total"
        } else {
            "mesh_monitor_alerts_resolved_total"
        };
        self.registry
            .counter(name, &[("kind", kind.as_str())])
            .increment(1);
    }

    /// A check write through a bridge.
    pub fn check_write(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.registry
            .counter("mesh_monitor_check_writes_total", &[("result", result)])
            .increment(1);
    }

    /// Log lines read, and the ones each rule counted, since the last call.
    pub fn log_lines(&self, read: u64, counted: &[(&str, u64)]) {
        self.registry
            .counter("mesh_monitor_log_lines_total", &[])
            .increment(read);
        for (rule, n) in counted {
            self.registry
                .counter("mesh_monitor_log_matches_total", &[("rule", rule)])
                .increment(*n);
        }
    }

    /// A log rule started (`true`) or stopped firing.
    pub fn log_rule_changed(&self, rule: &str, firing: bool) {
        let state = if firing { "firing" } else { "resolved" };
        self.registry
            .counter(
                "mesh_monitor_log_rule_changes_total",
                &[("rule", rule), ("state", state)],
            )
            .increment(1);
    }

    /// A read of a node's proxy metrics: `ok`, `unavailable` (no bridge
    /// or no proxy) or `unreadable` (not the text format).
    pub fn traffic_scrape(&self, result: &'static str) {
        self.registry
            .counter("mesh_monitor_traffic_scrapes_total", &[("result", result)])
            .increment(1);
    }

    /// A webhook event delivered, or given up after every try.
    pub fn webhook_call(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.registry
            .counter("mesh_monitor_webhook_calls_total", &[("result", result)])
            .increment(1);
    }
}
