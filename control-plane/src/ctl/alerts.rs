//! `meshctl alerts [--watch]`: mesh-monitor's open alerts, asked of the
//! monitor itself (`mesh.v1.Monitor`), since mesh-control's gRPC API has
//! no call for them.

use std::{fmt::Write as _, time::Duration};

use mesh_proto::v1::{self as pb, alert_event::Type, monitor_client::MonitorClient};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{CtlError, Output, table};
use crate::control::{AlertView, error_chain};

/// Default mesh-monitor gRPC address.
pub const DEFAULT_MONITOR_ADDR: &str = "http://127.0.0.1:8896";

/// How long connecting to mesh-monitor may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long `ListAlerts` may take (a watch takes as long as it is
/// followed).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected client of mesh-monitor and how to print.
#[derive(Debug)]
pub struct AlertsCtl {
    client: MonitorClient<Channel>,
    output: Output,
    addr: String,
}

/// One change a watch saw, as `--watch --output json` prints it (one JSON
/// object a line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlertChange {
    /// `open` (already open when the watch began, or just opened),
    /// `resolved`, or `synced` (every alert open when the watch began was
    /// sent; no alert).
    pub event: String,
    /// The alert; `None` for `synced`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertView>,
}

// === impl AlertsCtl ===

impl AlertsCtl {
    /// Connects to mesh-monitor at `addr` (`host:port` or an `http://`
    /// URL); unreachable is one line naming it (exit 69).
    pub async fn connect(addr: &str, output: Output) -> Result<Self, CtlError> {
        let url = monitor_url(addr);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| CtlError::new(format!("monitor_addr: {addr:?} is not a URL: {e}"), 64))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|e| {
            CtlError::new(
                format!(
                    "cannot reach mesh-monitor at {url}: {} (is it running? set --monitor-addr or MESH_MONITOR_ADDR)",
                    error_chain(&e)
                ),
                69,
            )
        })?;
        Ok(Self {
            client: MonitorClient::new(channel),
            output,
            addr: url,
        })
    }

    /// `meshctl alerts`: the open alerts, the critical ones first.
    pub async fn list(&mut self) -> Result<String, CtlError> {
        let mut request = tonic::Request::new(pb::ListAlertsRequest {});
        request.set_timeout(CALL_TIMEOUT);
        let answer = self
            .client
            .list_alerts(request)
            .await
            .map_err(|s| self.status_error(&s))?;
        let mut alerts: Vec<AlertView> = answer
            .into_inner()
            .alerts
            .into_iter()
            .map(AlertView::from)
            .collect();
        alerts.sort_by(AlertView::worst_first);
        Ok(match self.output {
            Output::Json => json_text(&alerts, true),
            Output::Table => alerts_table(&alerts),
        })
    }

    /// `meshctl alerts --watch`: the open alerts, then each alert as it
    /// opens or resolves, until mesh-monitor goes away (an error, exit 69).
    /// A watch that fell behind (`DATA_LOSS`) watches again, from the
    /// alerts open then.
    pub async fn watch(&mut self, mut out: impl FnMut(&str)) -> Result<String, CtlError> {
        loop {
            let mut stream = self
                .client
                .watch_alerts(pb::WatchAlertsRequest {})
                .await
                .map_err(|s| self.status_error(&s))?
                .into_inner();
            let mut opening = Vec::new();
            let mut synced = false;
            let end = loop {
                let event = match stream.message().await {
                    Ok(Some(event)) => event,
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                };
                let Some(change) = change_of(event) else {
                    continue;
                };
                match self.output {
                    Output::Json => out(&json_text(&change, false)),
                    Output::Table if !synced => match change.alert {
                        Some(alert) => opening.push(alert),
                        None => {
                            opening.sort_by(AlertView::worst_first);
                            out(&alerts_table(&opening));
                            out("\n");
                        }
                    },
                    Output::Table => out(&change_line(&change)),
                }
                synced |= change.event == "synced";
            };
            match end {
                Some(status) if status.code() == tonic::Code::DataLoss => {
                    if self.output == Output::Table {
                        out(&format!("-- {}; the alerts open now:\n", status.message()));
                    }
                }
                Some(status) => return Err(self.status_error(&status)),
                None => {
                    return Err(CtlError::new(
                        format!("mesh-monitor at {} ended the watch", self.addr),
                        69,
                    ));
                }
            }
        }
    }

    /// A failed call as one line naming the monitor.
    fn status_error(&self, status: &tonic::Status) -> CtlError {
        let e = CtlError::from_status(status);
        let why = if e.message.is_empty() {
            format!("{:?}", status.code())
        } else {
            e.message
        };
        CtlError::new(format!("mesh-monitor at {}: {why}", self.addr), e.exit_code)
    }
}

/// `host:port` as an `http://` URL; a URL as it is.
pub fn monitor_url(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// An event of the watch as a change to print; `None` for a type this
/// meshctl does not know, or an open or resolved event without its alert.
pub fn change_of(event: pb::AlertEvent) -> Option<AlertChange> {
    let word = match Type::try_from(event.r#type).ok()? {
        Type::Open => "open",
        Type::Resolved => "resolved",
        Type::Synced => {
            return Some(AlertChange {
                event: "synced".into(),
                alert: None,
            });
        }
        Type::Unspecified => return None,
    };
    Some(AlertChange {
        event: word.into(),
        alert: Some(AlertView::from(event.alert?)),
    })
}

/// The alerts as a table (`SEVERITY KIND TARGET SINCE SUMMARY`), or a line
/// saying there are none.
pub fn alerts_table(alerts: &[AlertView]) -> String {
    if alerts.is_empty() {
        return "no open alerts\n".to_owned();
    }
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            vec![
                a.severity.clone(),
                a.kind.clone(),
                a.target.clone(),
                a.started_at.clone(),
                one_line(&a.evidence),
            ]
        })
        .collect();
    table(&["SEVERITY", "KIND", "TARGET", "SINCE", "SUMMARY"], &rows)
}

/// A change of a watch in one line: when, what, which alert, why.
pub fn change_line(change: &AlertChange) -> String {
    let Some(a) = &change.alert else {
        return String::new();
    };
    let (at, what) = if change.event == "resolved" {
        (a.resolved_at.as_str(), "RESOLVED")
    } else {
        (a.started_at.as_str(), "OPEN    ")
    };
    let mut line = format!("{at}  {what}  {:<8}  {} {}", a.severity, a.kind, a.target);
    if !a.evidence.is_empty() {
        let _ = write!(line, ": {}", one_line(&a.evidence));
    }
    line.push('\n');
    line
}

/// Evidence is one line by contract; a stray newline must not break a
/// table.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `value` as JSON: pretty for a list, one line for a watch's change.
fn json_text<T: Serialize>(value: &T, pretty: bool) -> String {
    let mut text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(kind: &str, target: &str, severity: &str, started_at: &str) -> AlertView {
        AlertView {
            key: format!("{kind}/{target}"),
            kind: kind.into(),
            severity: severity.into(),
            target: target.into(),
            evidence: "no response\nwithin 2s".into(),
            started_at: started_at.into(),
            state: "open".into(),
            ..AlertView::default()
        }
    }

    #[test]
    fn the_table_shows_the_worst_first_each_alert_on_one_line() {
        let mut alerts = vec![
            view("slow", "n1/web-1", "warning", "2026-01-01T00:00:00.000Z"),
            view(
                "down",
                "component/consul",
                "critical",
                "2026-01-01T00:00:09.000Z",
            ),
            view("hung", "n2/api-1", "critical", "2026-01-01T00:00:01.000Z"),
        ];
        alerts.sort_by(AlertView::worst_first);
        assert_eq!(
            alerts_table(&alerts),
            "SEVERITY  KIND  TARGET            SINCE                     SUMMARY\n\
             critical  hung  n2/api-1          2026-01-01T00:00:01.000Z  no response within 2s\n\
             critical  down  component/consul  2026-01-01T00:00:09.000Z  no response within 2s\n\
             warning   slow  n1/web-1          2026-01-01T00:00:00.000Z  no response within 2s\n"
        );
        assert_eq!(alerts_table(&[]), "no open alerts\n");
    }

    #[test]
    fn a_watch_prints_each_change_as_one_line() {
        let mut resolved = view("hung", "n2/api-1", "critical", "2026-01-01T00:00:01.000Z");
        resolved.resolved_at = "2026-01-01T00:05:00.000Z".into();
        resolved.state = "resolved".into();
        let line = change_line(&AlertChange {
            event: "resolved".into(),
            alert: Some(resolved),
        });
        assert_eq!(
            line,
            "2026-01-01T00:05:00.000Z  RESOLVED  critical  hung n2/api-1: no response within 2s\n"
        );
    }

    #[test]
    fn watch_events_become_changes_and_unknown_ones_are_skipped() {
        let alert = pb::Alert {
            key: "down/n1/web-1".into(),
            kind: "down".into(),
            severity: pb::Severity::Critical.into(),
            target: "n1/web-1".into(),
            started_at_ms: 1_767_225_600_000,
            ..pb::Alert::default()
        };
        let event = |t: Type, alert: Option<pb::Alert>| pb::AlertEvent {
            r#type: t.into(),
            alert,
        };
        let open = change_of(event(Type::Open, Some(alert.clone()))).expect("a change");
        assert_eq!(open.event, "open");
        assert_eq!(
            open.alert.as_ref().map(|a| a.severity.as_str()),
            Some("critical")
        );
        assert_eq!(
            json_text(
                &change_of(event(Type::Synced, None)).expect("a change"),
                false
            ),
            "{\"event\":\"synced\"}\n"
        );
        assert_eq!(change_of(event(Type::Unspecified, Some(alert))), None);
        assert_eq!(change_of(event(Type::Open, None)), None);
    }

    #[test]
    fn an_address_without_a_scheme_is_http() {
        assert_eq!(monitor_url("10.0.0.5:8896"), "http://10.0.0.5:8896");
        assert_eq!(monitor_url(DEFAULT_MONITOR_ADDR), DEFAULT_MONITOR_ADDR);
    }

    #[tokio::test]
    async fn an_unreachable_monitor_is_one_line_naming_the_address() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let e = AlertsCtl::connect(&format!("127.0.0.1:{port}"), Output::Table)
            .await
            .expect_err("nothing listens there");
        assert_eq!(e.exit_code, 69);
        assert!(
            e.message.starts_with(&format!(
                "cannot reach mesh-monitor at http://127.0.0.1:{port}"
            )),
            "{}",
            e.message
        );
        assert!(e.message.contains("MESH_MONITOR_ADDR"), "{}", e.message);
    }
}
