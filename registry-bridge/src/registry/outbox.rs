//! Registry calls on their way to the local agent. A call goes straight to
//! the agent; when the agent is unreachable it waits in a durable queue on
//! disk and a drainer applies it, in order, once the agent is back. While
//! anything waits, new calls queue behind it: a deregistration must never
//! overtake its registration.

use std::{io, path::PathBuf};

use consul_client::{AgentServiceRegistration, Client, Error};
use mesh_runtime::{
    queue::{Apply, DurableQueue},
    shutdown::Shutdown,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::metrics::BridgeMetrics;

/// A Registry call as it waits in the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum QueuedCall {
    /// Register (or replace) an instance.
    Register {
        /// Consul's registration.
        service: Box<AgentServiceRegistration>,
    },
    /// Deregister an instance.
    Deregister {
        /// Instance ID.
        id: String,
    },
}

/// Where a submitted call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// The agent applied it.
    Applied,
    /// It waits in the queue.
    Queued,
}

/// Why a call was neither applied nor queued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The agent answered with an error.
    #[error(transparent)]
    Consul(#[from] Error),
    /// The queue could not be written.
    #[error("cannot queue the call: {0}")]
    Disk(#[from] io::Error),
}

/// The queue and the agent it drains to.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: DurableQueue<QueuedCall>,
    agent: Client,
    // Held while deciding between "apply now" and "queue", and while the
    // drainer applies an item, so calls reach the agent in order.
    order: Mutex<()>,
    metrics: BridgeMetrics,
}

// === impl Outbox ===

impl Outbox {
    /// Opens (creating) the queue in `dir`; calls go to `agent`.
    pub(crate) fn open(dir: PathBuf, agent: Client, metrics: BridgeMetrics) -> io::Result<Self> {
        let queue = DurableQueue::open(dir)?;
        metrics.queue_depth.set(queue.len() as f64);
        if !queue.is_empty() {
            tracing::info!(waiting = queue.len(), dir = %queue.dir().display(), "queued registry calls found");
        }
        Ok(Self {
            queue,
            agent,
            order: Mutex::new(()),
            metrics,
        })
    }

    /// Applies `call` now, or queues it when the agent is unreachable or
    /// other calls wait already.
    pub(crate) async fn submit(&self, call: QueuedCall) -> Result<Submitted, OutboxError> {
        let _order = self.order.lock().await;
        if !self.queue.is_empty() {
            return self.enqueue(&call);
        }
        match self.apply(&call).await {
            Ok(()) => Ok(Submitted::Applied),
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, "agent unreachable; call queued");
                self.enqueue(&call)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Applies queued calls in order until `shutdown`.
    pub(crate) async fn drain(&self, shutdown: Shutdown) {
        self.queue
            .drain(|call| self.apply_queued(call), shutdown)
            .await;
    }

    async fn apply_queued(&self, call: QueuedCall) -> Apply {
        let _order = self.order.lock().await;
        let outcome = match self.apply(&call).await {
            Ok(()) => Apply::Done,
            Err(e) if e.is_caller_fault() => Apply::Reject(format!("{call:?}: {e}")),
            Err(e) => return Apply::Retry(e.to_string()),
        };
        if matches!(outcome, Apply::Done) {
            tracing::info!(?call, "queued call applied");
        }
        // The drainer removes the item right after this returns.
        self.metrics
            .queue_depth
            .set(self.queue.len().saturating_sub(1) as f64);
        outcome
    }

    fn enqueue(&self, call: &QueuedCall) -> Result<Submitted, OutboxError> {
        self.queue.push(call)?;
        self.metrics.queue_depth.set(self.queue.len() as f64);
        Ok(Submitted::Queued)
    }

    async fn apply(&self, call: &QueuedCall) -> Result<(), Error> {
        let result = match call {
            QueuedCall::Register { service } => self.agent.agent_service_register(service).await,
            QueuedCall::Deregister { id } => self.agent.agent_service_deregister(id).await,
        };
        self.metrics.consul_call(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_calls_keep_consuls_json() {
        let call = QueuedCall::Register {
            service: Box::new(AgentServiceRegistration {
                name: "web".into(),
                port: Some(80),
                ..Default::default()
            }),
        };
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "register", "service": {"Name": "web", "Port": 80}})
        );
        assert_eq!(serde_json::from_value::<QueuedCall>(json).unwrap(), call);
    }
}
