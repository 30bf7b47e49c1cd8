//! Carries registrations to the bridge (`mesh.v1.Registry`). Accepted
//! means never lost: when the bridge cannot be reached the operation goes
//! to the proxy's own durable queue (`<data-dir>/queue`) and a drainer
//! forwards it, in order, once the bridge answers. While anything waits in
//! the queue new operations queue behind it, so a deregistration never
//! overtakes its registration.

use std::{sync::Arc, time::Duration};

use mesh_proto::v1::{self as pb, registry_client::RegistryClient};
use mesh_runtime::telemetry::{TracedChannel, traced};
use mesh_runtime::{
    queue::{Apply, DurableQueue},
    shutdown::Shutdown,
};
use serde::{Deserialize, Serialize};
use tonic::{Code, transport::Channel};

use crate::{agent::Registration, metrics::ProxyMetrics};

/// One agent API call, as queued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RegistryOp {
    /// Register (or replace) an instance.
    Register(Registration),
    /// Deregister an instance by ID.
    Deregister {
        /// Instance ID.
        id: String,
    },
}

/// What became of an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The bridge applied it to the agent.
    Applied,
    /// It waits in a durable queue (ours or the bridge's).
    Queued,
    /// The registry refused it as invalid; the message says why.
    Invalid(String),
    /// The registry knows no such instance.
    NotFound(String),
    /// The registry may not make it (Consul's ACLs: the bridge's token
    /// does not allow this service on this node); not queued.
    Denied(String),
    /// It could be neither applied nor queued.
    Failed(String),
}

/// Why the bridge did not apply an operation.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The bridge could not be reached or did not answer in time: try later.
    #[error("bridge unreachable: {0}")]
    Unreachable(String),
    /// The registry refused the operation as invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such instance.
    #[error("{0}")]
    NotFound(String),
    /// The registry may not do it (Consul's ACLs, or the bridge's own
    /// authorization): not worth queueing.
    #[error("registry refused: {0}")]
    Denied(String),
    /// The bridge refused for a reason of its own (a missing method): not
    /// the caller's fault, and not worth queueing.
    #[error("registry refused: {0}")]
    Refused(String),
}

/// The proxy's side of the Registry API.
#[derive(Debug)]
pub struct Registrar {
    client: RegistryClient<TracedChannel>,
    queue: Arc<DurableQueue<RegistryOp>>,
    timeout: Duration,
    metrics: Arc<ProxyMetrics>,
}

// === impl Registrar ===

impl Registrar {
    /// A registrar talking to the bridge over `channel`, queueing in `queue`.
    pub fn new(
        channel: Channel,
        queue: DurableQueue<RegistryOp>,
        timeout: Duration,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        let registrar = Self {
            client: RegistryClient::new(traced(channel)),
            queue: Arc::new(queue),
            timeout,
            metrics,
        };
        registrar.update_depth();
        registrar
    }

    /// Forwards `op`, or queues it when the bridge is unreachable or
    /// earlier operations still wait.
    pub async fn submit(&self, op: RegistryOp) -> Outcome {
        let outcome = if !self.queue.is_empty() {
            self.enqueue(op).await
        } else {
            match self.forward(&op).await {
                Ok(false) => Outcome::Applied,
                Ok(true) => Outcome::Queued,
                Err(BridgeError::Invalid(m)) => Outcome::Invalid(m),
                Err(BridgeError::NotFound(m)) => Outcome::NotFound(m),
                Err(e @ BridgeError::Denied(_)) => Outcome::Denied(e.to_string()),
                Err(e @ BridgeError::Refused(_)) => Outcome::Failed(e.to_string()),
                Err(BridgeError::Unreachable(reason)) => {
                    tracing::warn!(%reason, "bridge unreachable; registration queued");
                    self.enqueue(op).await
                }
            }
        };
        let m = &self.metrics.registrations;
        match &outcome {
            Outcome::Applied => m.applied.increment(1),
            Outcome::Queued => m.queued.increment(1),
            Outcome::Invalid(_) | Outcome::NotFound(_) => m.invalid.increment(1),
            Outcome::Denied(_) | Outcome::Failed(_) => m.failed.increment(1),
        }
        outcome
    }

    /// The instances registered on this node's agent.
    pub async fn list_local(&self) -> Result<Vec<pb::ServiceRegistration>, BridgeError> {
        let request = pb::ListInstancesRequest {
            service: String::new(),
            local: true,
        };
        let mut client = self.client.clone();
        let response = tokio::time::timeout(self.timeout, client.list_instances(request))
            .await
            .map_err(|_| BridgeError::Unreachable("no answer in time".into()))?
            .map_err(classify)?;
        Ok(response.into_inner().instances)
    }

    /// Forwards queued operations in order until shutdown.
    pub async fn drain(self: Arc<Self>, shutdown: Shutdown) {
        let queue = self.queue.clone();
        queue
            .drain(
                |op| {
                    let this = self.clone();
                    async move {
                        let result = match this.forward(&op).await {
                            Ok(_) => Apply::Done,
                            // Deregistering what is already gone is done.
                            Err(BridgeError::NotFound(_)) => Apply::Done,
                            Err(BridgeError::Invalid(m)) => Apply::Reject(m),
                            // Accepted means never lost: anything else waits.
                            Err(e) => Apply::Retry(e.to_string()),
                        };
                        if matches!(result, Apply::Done) {
                            tracing::info!(?op, "queued registration delivered to the bridge");
                        }
                        // An applied or refused item leaves the queue
                        // right after this returns.
                        let leaving = usize::from(!matches!(result, Apply::Retry(_)));
                        let left = this.queue.len().saturating_sub(leaving);
                        this.metrics.queue_depth.set(left as f64);
                        result
                    }
                },
                shutdown,
            )
            .await;
    }

    /// Counts a registration refused before reaching the registrar.
    pub fn count_invalid(&self) {
        self.metrics.registrations.invalid.increment(1);
    }

    /// Updates the queue depth gauge.
    pub fn update_depth(&self) {
        self.metrics.queue_depth.set(self.queue.len() as f64);
    }

    /// Sends `op` to the bridge; `Ok(true)` when the bridge queued it.
    async fn forward(&self, op: &RegistryOp) -> Result<bool, BridgeError> {
        let mut client = self.client.clone();
        let call = async {
            match op {
                RegistryOp::Register(r) => {
                    let request = pb::RegisterRequest {
                        service: Some(r.to_proto()),
                    };
                    client
                        .register(request)
                        .await
                        .map(|r| r.into_inner().queued)
                }
                RegistryOp::Deregister { id } => {
                    let request = pb::DeregisterRequest { id: id.clone() };
                    client
                        .deregister(request)
                        .await
                        .map(|r| r.into_inner().queued)
                }
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| BridgeError::Unreachable("no answer in time".into()))?
            .map_err(classify)
    }

    async fn enqueue(&self, op: RegistryOp) -> Outcome {
        let queue = self.queue.clone();
        // The push fsyncs: keep it off the async workers.
        let pushed = tokio::task::spawn_blocking(move || queue.push(&op)).await;
        self.update_depth();
        match pushed {
            Ok(Ok(_)) => Outcome::Queued,
            Ok(Err(e)) => {
                tracing::error!(dir = %self.queue.dir().display(), error = %e, "cannot queue registration");
                Outcome::Failed("the registry is unreachable and the proxy cannot queue".into())
            }
            Err(e) => Outcome::Failed(format!("queueing failed: {e}")),
        }
    }
}

/// Sorts a gRPC status into retry later, refused, or not found.
fn classify(status: tonic::Status) -> BridgeError {
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange => BridgeError::Invalid(status.message().to_owned()),
        Code::PermissionDenied | Code::Unauthenticated => {
            BridgeError::Denied(format!("{}: {}", status.code(), status.message()))
        }
        Code::Unimplemented => {
            BridgeError::Refused(format!("{}: {}", status.code(), status.message()))
        }
        Code::NotFound => BridgeError::NotFound(status.message().to_owned()),
        _ => BridgeError::Unreachable(format!("{}: {}", status.code(), status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_sorted_by_what_to_do() {
        assert!(matches!(
            classify(tonic::Status::invalid_argument("bad port")),
            BridgeError::Invalid(m) if m == "bad port"
        ));
        assert!(matches!(
            classify(tonic::Status::unavailable("down")),
            BridgeError::Unreachable(_)
        ));
        assert!(matches!(
            classify(tonic::Status::not_found("no such id")),
            BridgeError::NotFound(_)
        ));
        assert!(matches!(
            classify(tonic::Status::permission_denied("Permission denied")),
            BridgeError::Denied(m) if m.contains("Permission denied")
        ));
        assert!(matches!(
            classify(tonic::Status::unimplemented("no such method")),
            BridgeError::Refused(_)
        ));
    }

    #[test]
    fn ops_round_trip_through_json() {
        let op = RegistryOp::Deregister {
            id: "orders-1".into(),
        };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(json, r#"{"op":"deregister","id":"orders-1"}"#);
        assert_eq!(serde_json::from_str::<RegistryOp>(&json).unwrap(), op);
    }
}
