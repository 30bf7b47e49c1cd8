//! [`Control::alerts`]: the alerts mesh-monitor keeps open, as the REST API
//! and the dashboard show them. mesh-control only relays them: the
//! monitor probes, decides and stores; a mesh without a monitor simply has
//! no alerts to show.

use mesh_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{Control, error_chain};
use crate::{error::ControlError, model::rfc3339};

/// One alert of mesh-monitor (`mesh.v1.Alert`), with its times in RFC 3339.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertView {
    /// The deduplication key, `<kind>/<target>`.
    pub key: String,
    /// What the probes saw: `down`, `hung`, `unhealthy` or `slow`.
    pub kind: String,
    /// `critical` (it does not serve), `warning` (slow) or `unknown`.
    pub severity: String,
    /// `<node>/<service id>` for an instance, `component/<name>` for a
    /// component of the monitor's config.
    pub target: String,
    /// The service name (the component's name for a component).
    pub service: String,
    /// The Consul service ID; empty for a component.
    pub instance_id: String,
    /// The Consul node; empty for a component.
    pub node: String,
    /// What was probed (`http://host:port/path`, `tcp://…`, `grpc://…`).
    pub probe: String,
    /// What the last probe saw, in one line.
    pub evidence: String,
    /// When the condition began (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339); empty while open.
    pub resolved_at: String,
    /// `open` or `resolved`.
    pub state: String,
}

/// The open alerts, and whether mesh-monitor could be asked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorAlerts {
    /// Whether mesh-control runs with a monitor (`monitor_addr`).
    pub configured: bool,
    /// Why the monitor could not be asked; empty when it answered (or none
    /// is configured).
    pub error: String,
    /// The open alerts, oldest first, as the monitor lists them.
    pub alerts: Vec<AlertView>,
}

// === impl AlertView ===

impl AlertView {
    /// The order alerts are shown in: critical before warning before
    /// anything else, then the oldest first (RFC 3339 times of one fixed
    /// width sort as text), then by key.
    pub fn worst_first(a: &AlertView, b: &AlertView) -> std::cmp::Ordering {
        let rank = |a: &AlertView| match a.severity.as_str() {
            "critical" => 0,
            "warning" => 1,
            _ => 2,
        };
        (rank(a), a.started_at.as_str(), a.key.as_str()).cmp(&(
            rank(b),
            b.started_at.as_str(),
            b.key.as_str(),
        ))
    }
}

impl From<pb::Alert> for AlertView {
    fn from(a: pb::Alert) -> Self {
        let severity = match pb::Severity::try_from(a.severity) {
            Ok(pb::Severity::Critical) => "critical",
            Ok(pb::Severity::Warning) => "warning",
            _ => "unknown",
        };
        let (state, resolved_at) = match a.resolved_at_ms {
            0 => ("open", String::new()),
            ms => ("resolved", rfc3339(ms)),
        };
        Self {
            key: a.key,
            kind: a.kind,
            severity: severity.to_owned(),
            target: a.target,
            service: a.service,
            instance_id: a.instance_id,
            node: a.node,
            probe: a.probe,
            evidence: a.evidence,
            started_at: if a.started_at_ms == 0 {
                String::new()
            } else {
                rfc3339(a.started_at_ms)
            },
            resolved_at,
            state: state.to_owned(),
        }
    }
}

// === impl MonitorAlerts ===

impl MonitorAlerts {
    /// Without a monitor: nothing to show, and nothing wrong.
    pub fn unconfigured() -> Self {
        Self::default()
    }

    /// A monitor that could not be asked, and why.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            configured: true,
            error: error.into(),
            alerts: Vec::new(),
        }
    }

    /// What a monitor listed.
    pub fn listed(alerts: Vec<pb::Alert>) -> Self {
        Self {
            configured: true,
            error: String::new(),
            alerts: alerts.into_iter().map(AlertView::from).collect(),
        }
    }

    /// How many open alerts are critical.
    pub fn critical(&self) -> usize {
        self.alerts
            .iter()
            .filter(|a| a.severity == "critical")
            .count()
    }
}

// === impl Control ===

impl Control {
    /// mesh-monitor's open alerts. Never an error: a monitor that is not
    /// configured or does not answer is said so in the answer, since the
    /// rest of the mesh works without it.
    pub async fn alerts(&self) -> MonitorAlerts {
        let (mut client, url) = match self.monitor().await {
            None => return MonitorAlerts::unconfigured(),
            Some(Ok(connected)) => connected,
            Some(Err(e)) => return MonitorAlerts::failed(unreachable_text(&e)),
        };
        match client.list_alerts(pb::ListAlertsRequest {}).await {
            Ok(answer) => MonitorAlerts::listed(answer.into_inner().alerts),
            Err(status) => {
                tracing::debug!(monitor = %url, error = %status, "mesh-monitor did not list its alerts");
                MonitorAlerts::failed(format!(
                    "mesh-monitor at {url} did not list its alerts: {}",
                    status_text(&status)
                ))
            }
        }
    }
}

/// The message of an error of [`Control::monitor`], without the kind's
/// prefix (the answer says what failed in its own words).
fn unreachable_text(e: &ControlError) -> String {
    match e {
        ControlError::Unavailable(m) | ControlError::Internal(m) => m.clone(),
        other => other.to_string(),
    }
}

/// A status as one line: its message, or its code when it has none, and
/// what is under it.
fn status_text(status: &tonic::Status) -> String {
    let message = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    };
    match std::error::Error::source(status) {
        Some(source) => format!("{message}: {}", error_chain(source)),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(severity: pb::Severity, resolved_at_ms: u64) -> pb::Alert {
        pb::Alert {
            key: "hung/n1/orders-1".into(),
            kind: "hung".into(),
            severity: severity.into(),
            target: "n1/orders-1".into(),
            service: "orders".into(),
            instance_id: "orders-1".into(),
            node: "n1".into(),
            probe: "http://10.0.0.1:9001/health".into(),
            evidence: "no response within 2s".into(),
            started_at_ms: 1_767_225_600_250,
            resolved_at_ms,
        }
    }

    #[test]
    fn an_open_alert_shows_its_severity_in_words_and_its_start_in_rfc_3339() {
        let view = AlertView::from(alert(pb::Severity::Critical, 0));
        assert_eq!(
            view,
            AlertView {
                key: "hung/n1/orders-1".into(),
                kind: "hung".into(),
                severity: "critical".into(),
                target: "n1/orders-1".into(),
                service: "orders".into(),
                instance_id: "orders-1".into(),
                node: "n1".into(),
                probe: "http://10.0.0.1:9001/health".into(),
                evidence: "no response within 2s".into(),
                started_at: "2026-01-01T00:00:00.250Z".into(),
                resolved_at: String::new(),
                state: "open".into(),
            }
        );
    }

    #[test]
    fn a_resolved_alert_and_an_unknown_severity_say_so() {
        let view = AlertView::from(alert(pb::Severity::Warning, 1_767_225_660_000));
        assert_eq!(
            (view.severity.as_str(), view.state.as_str()),
            ("warning", "resolved")
        );
        assert_eq!(view.resolved_at, "2026-01-01T00:01:00.000Z");
        let mut odd = alert(pb::Severity::Unspecified, 0);
        assert_eq!(AlertView::from(odd.clone()).severity, "unknown");
        odd.severity = 42;
        assert_eq!(AlertView::from(odd).severity, "unknown");
    }

    #[test]
    fn the_answer_says_whether_a_monitor_is_configured_and_answered() {
        let none = serde_json::to_value(MonitorAlerts::unconfigured()).expect("JSON");
        assert_eq!(
            none,
            serde_json::json!({"configured": false, "error": "", "alerts": []})
        );
        let failed = MonitorAlerts::failed("mesh-monitor at http://m:8896 is unreachable");
        assert!(failed.configured && failed.alerts.is_empty());
        let listed = MonitorAlerts::listed(vec![
            alert(pb::Severity::Warning, 0),
            alert(pb::Severity::Critical, 0),
        ]);
        assert_eq!((listed.alerts.len(), listed.critical()), (2, 1));
        assert!(listed.error.is_empty());
    }

    /// A control plane whose Consul is never asked (alerts need none).
    fn control(monitor: Option<String>) -> Control {
        let consul =
            consul_client::Client::new(&consul_client::ClientConfig::new(["http://127.0.0.1:1"]))
                .expect("a Consul client");
        let (_, leader) = tokio::sync::watch::channel(crate::leader::LeaderState::default());
        Control::new(super::super::ControlParts {
            consul,
            nginx: crate::render::NginxSettings::standard(),
            bridge_port: 1,
            deployers: super::super::DeployerSettings::default(),
            monitor,
            own: None,
            replica: "c1".into(),
            leader,
            metrics: crate::metrics::ControlMetrics::new(&mesh_runtime::metrics::Registry::new()),
        })
    }

    #[tokio::test]
    async fn without_a_monitor_there_are_no_alerts_and_nothing_wrong() {
        assert_eq!(control(None).alerts().await, MonitorAlerts::unconfigured());
    }

    #[tokio::test]
    async fn an_unreachable_monitor_is_named_with_why() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let answer = control(Some(url.clone())).alerts().await;
        assert!(answer.configured && answer.alerts.is_empty());
        assert!(
            answer
                .error
                .starts_with(&format!("mesh-monitor at {url} is unreachable")),
            "{}",
            answer.error
        );
        assert!(answer.error.contains("refused"), "{}", answer.error);
    }
}
