//! `mesh.v1.Monitor`: the open alerts (listed, or watched as a stream of
//! changes) and the verdict on a node or an instance.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use mesh_proto::v1::{
    self as pb, AlertEvent, ListAlertsRequest, ListAlertsResponse, VerdictRequest, VerdictResponse,
    WatchAlertsRequest, alert_event::Type, monitor_server::Monitor,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    alert::{Alert, AlertBook, Change, Severity},
    probe::CheckStatus,
    prober::Board,
};

/// Events a watch stream buffers for a slow reader.
const STREAM_BUFFER: usize = 64;

/// The Monitor service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MonitorApi {
    book: Arc<AlertBook>,
    board: Arc<Board>,
}

// === impl MonitorApi ===

impl MonitorApi {
    /// Serves `book`'s alerts and `board`'s verdicts.
    pub fn new(book: Arc<AlertBook>, board: Arc<Board>) -> Self {
        Self { book, board }
    }
}

#[tonic::async_trait]
impl Monitor for MonitorApi {
    type WatchAlertsStream = Pin<Box<dyn Stream<Item = Result<AlertEvent, Status>> + Send>>;

    async fn watch_alerts(
        &self,
        _request: Request<WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let (open, mut changes) = self.book.subscribe();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            for alert in &open {
                if tx.send(Ok(event(Type::Open, Some(alert)))).await.is_err() {
                    return;
                }
            }
            if tx.send(Ok(event(Type::Synced, None))).await.is_err() {
                return;
            }
            loop {
                let sent = match changes.recv().await {
                    Ok(Change::Opened(a)) => tx.send(Ok(event(Type::Open, Some(&a)))).await,
                    Ok(Change::Resolved(a)) => tx.send(Ok(event(Type::Resolved, Some(&a)))).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!(
                            "this watch fell {n} changes behind; watch again"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_alerts(
        &self,
        _request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        let alerts = self.book.open_alerts().iter().map(to_proto).collect();
        Ok(Response::new(ListAlertsResponse { alerts }))
    }

    async fn verdict(
        &self,
        request: Request<VerdictRequest>,
    ) -> Result<Response<VerdictResponse>, Status> {
        let req = request.into_inner();
        let (node, instance) = (req.node.trim(), req.instance_id.trim());
        if node.is_empty() == instance.is_empty() {
            return Err(Status::invalid_argument(
                "set exactly one of node and instance_id",
            ));
        }
        let entries: Vec<_> = self
            .board
            .entries()
            .into_iter()
            .filter(|e| {
                let t = &e.target.target;
                if node.is_empty() {
                    t.instance_id == instance
                } else {
                    t.node == node
                }
            })
            .collect();
        if entries.is_empty() {
            let what = if node.is_empty() { "instance" } else { "node" };
            let name = if node.is_empty() { instance } else { node };
            return Err(Status::not_found(format!(
                "mesh-monitor probes nothing on {what} {name:?}"
            )));
        }
        let ids: Vec<&str> = entries
            .iter()
            .map(|e| e.target.target.id.as_str())
            .collect();
        let alerts: Vec<Alert> = self
            .book
            .open_alerts()
            .into_iter()
            .filter(|a| ids.contains(&a.target.as_str()))
            .collect();
        let critical_verdict = entries.iter().any(|e| {
            e.state
                .verdict
                .as_ref()
                .is_some_and(|v| v.status == CheckStatus::Critical)
        });
        let healthy = !critical_verdict && !alerts.iter().any(|a| a.severity == Severity::Critical);
        let reasons = alerts
            .iter()
            .map(|a| format!("{} {}: {}", a.kind.as_str(), a.target, a.evidence))
            .collect();
        Ok(Response::new(VerdictResponse {
            healthy,
            reasons,
            targets: u32::try_from(entries.len()).unwrap_or(u32::MAX),
        }))
    }
}

fn event(kind: Type, alert: Option<&Alert>) -> AlertEvent {
    AlertEvent {
        r#type: kind as i32,
        alert: alert.map(to_proto),
    }
}

/// An alert as `mesh.v1` sends it.
pub fn to_proto(a: &Alert) -> pb::Alert {
    let severity = match a.severity {
        Severity::Warning => pb::Severity::Warning,
        Severity::Critical => pb::Severity::Critical,
    };
    pb::Alert {
        key: a.key.clone(),
        kind: a.kind.as_str().into(),
        severity: severity as i32,
        target: a.target.clone(),
        service: a.service.clone(),
        instance_id: a.instance_id.clone(),
        node: a.node.clone(),
        probe: a.probe.clone(),
        evidence: a.evidence.clone(),
        started_at_ms: a.started_at_ms,
        resolved_at_ms: a.resolved_at_ms.unwrap_or(0),
    }
}
