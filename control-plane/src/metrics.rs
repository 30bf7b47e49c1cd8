//! mesh-control's Prometheus metrics, registered once on the registry
//! the binary passes down.

use mesh_runtime::metrics::{Gauge, Registry};

/// Calls by method and outcome.
pub const CALLS: &str = "mesh_control_calls_total";
/// 1 while this replica holds the leader lock.
pub const IS_LEADER: &str = "mesh_control_is_leader";
/// Times this replica took or lost the leader lock.
pub const LEADER_CHANGES: &str = "mesh_control_leader_changes_total";
/// Certificates issued, by kind of identity.
pub const CERTS_ISSUED: &str = "mesh_control_certificates_issued_total";
/// Certificate requests refused, by reason.
pub const CERTS_REFUSED: &str = "mesh_control_certificates_refused_total";

/// The handles mesh-control records on.
#[derive(Clone, Debug)]
pub struct ControlMetrics {
    registry: Registry,
    is_leader: Gauge,
}

impl ControlMetrics {
    /// Describes the metrics on `registry`.
    pub fn new(registry: &Registry) -> Self {
        registry.describe_counter(
            CALLS,
            "Control API calls by method and outcome (ok, invalid, not_found, conflict, unrenderable, unavailable, internal).",
        );
        registry.describe_gauge(IS_LEADER, "1 while this replica holds the leader lock.");
        registry.describe_counter(
            LEADER_CHANGES,
            "Times this replica took or lost the leader lock.",
        );
        registry.describe_counter(
            CERTS_ISSUED,
            "Certificates issued by kind of identity (node, service).",
        );
        registry.describe_counter(
            CERTS_REFUSED,
            "Certificate requests refused by reason (disabled, unauthenticated, invalid, denied, unavailable, internal).",
        );
        let is_leader = registry.gauge(IS_LEADER, &[]);
        is_leader.set(0.0);
        Self {
            registry: registry.clone(),
            is_leader,
        }
    }

    /// Counts one call of `method` that ended with `outcome`.
    pub fn call(&self, method: &'static str, outcome: &'static str) {
        self.registry
            .counter(CALLS, &[("method", method), ("outcome", outcome)])
            .increment(1);
    }

    /// Counts one certificate issued for a `kind` identity.
    pub fn certificate_issued(&self, kind: &'static str) {
        self.registry
            .counter(CERTS_ISSUED, &[("kind", kind)])
            .increment(1);
    }

    /// Counts one certificate request refused for `reason`.
    pub fn certificate_refused(&self, reason: &'static str) {
        self.registry
            .counter(CERTS_REFUSED, &[("reason", reason)])
            .increment(1);
    }

    /// Records that this replica leads (or not) from now on.
    pub fn leading(&self, leads: bool) {
        self.is_leader.set(if leads { 1.0 } else { 0.0 });
        self.registry.counter(LEADER_CHANGES, &[]).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_leadership_show_in_the_registry() {
        let registry = Registry::new();
        let m = ControlMetrics::new(&registry);
        m.call("SetRoutes", "ok");
        m.call("SetRoutes", "conflict");
        m.call("SetRoutes", "conflict");
        m.leading(true);
        let text = registry.render();
        assert!(
            text.contains(r#"mesh_control_calls_total{method="SetRoutes",outcome="conflict"} 2"#),
            "{text}"
        );
        assert!(text.contains("mesh_control_is_leader 1"), "{text}");
        assert!(
            text.contains("mesh_control_leader_changes_total 1"),
            "{text}"
        );
    }
}
