//! `mesh.v1.Checks`: checks whose status another process sets on the
//! instances of this node's agent. mesh-monitor probes instances on every
//! node, and its verdict must live on the agent that owns an instance:
//! Consul keeps a service's checks on its agent, the agent's anti-entropy
//! removes a check written to the catalog alone, and agents listen on
//! loopback. So the monitor asks the node's bridge, and the bridge keeps a
//! TTL check on its agent.
//!
//! The TTL is [`CHECK_TTL`] (30 days): a status stands until it is set
//! again, so a monitor that stops leaves verdicts as they were instead of
//! turning every instance critical when the TTL runs out. The monitor sets
//! a check again whenever Consul shows another status than its verdict, and
//! refreshes it long before the TTL ends.
//!
//! A TTL check's status changes only through `agent/check/update`
//! (registering it again keeps the old status), so a call updates first and
//! registers only when the agent does not know the check yet: the first
//! verdict on an instance, or after the instance was deregistered and
//! registered anew (registering it again keeps the check). The agent sends an
//! output change without a status change to the servers only every few
//! minutes, so the output of a check's first status may show late (see
//! `first_status`).
//!
//! `ProxyMetrics` hands the monitor the node's proxy's `/metrics` for the
//! same reason: the proxy's admin listener is loopback on its node.

use consul_client::{AgentCheckRegistration, Client, Error};
use mesh_proto::v1::{
    ProxyMetricsRequest, ProxyMetricsResponse, SetCheckRequest, SetCheckResponse,
    checks_server::Checks,
};
use tonic::{Request, Response, Status};

use super::ProxyAdmin;
use crate::metrics::{BridgeMetrics, CallOutcome};

/// How long a set status stands without being set again.
pub const CHECK_TTL: &str = "720h";
/// The check ID prefix when the caller names none.
pub const DEFAULT_CHECK_PREFIX: &str = "mesh-monitor:";
/// The check name when the caller names none.
pub const DEFAULT_CHECK_NAME: &str = "mesh-monitor";
/// The longest output kept (Consul shows it; a verdict is one line).
const MAX_OUTPUT: usize = 4096;

/// The Checks service over the local agent. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChecksApi {
    agent: Client,
    metrics: BridgeMetrics,
    /// The node's proxy's admin listener, for `ProxyMetrics`.
    proxy: ProxyAdmin,
}

/// A checked `SetCheckRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CheckUpdate {
    service_id: String,
    check_id: String,
    name: String,
    status: &'static str,
    output: String,
}

// === impl ChecksApi ===

impl ChecksApi {
    /// Checks go to `agent`, the local agent; `ProxyMetrics` reads the
    /// proxy at `proxy`.
    pub fn new(agent: Client, metrics: BridgeMetrics, proxy: ProxyAdmin) -> Self {
        Self {
            agent,
            metrics,
            proxy,
        }
    }

    async fn apply(&self, u: &CheckUpdate) -> Result<(), Status> {
        let updated = self
            .agent
            .agent_check_update(&u.check_id, u.status, &u.output)
            .await;
        self.metrics.consul_call(&updated);
        match updated {
            Ok(()) => return Ok(()),
            Err(e) if unknown_check(&e) => {}
            Err(e) => return Err(status(&e, u)),
        }
        let reg = AgentCheckRegistration {
            id: Some(u.check_id.clone()),
            name: u.name.clone(),
            notes: Some("status set through mesh-bridge (mesh.v1.Checks)".into()),
            ttl: Some(CHECK_TTL.into()),
            status: Some(first_status(u.status).into()),
            service_id: Some(u.service_id.clone()),
            deregister_critical_service_after: None,
        };
        let registered = self.agent.agent_check_register(&reg).await;
        self.metrics.consul_call(&registered);
        registered.map_err(|e| status(&e, u))?;
        let updated = self
            .agent
            .agent_check_update(&u.check_id, u.status, &u.output)
            .await;
        self.metrics.consul_call(&updated);
        updated.map_err(|e| status(&e, u))
    }
}

#[tonic::async_trait]
impl Checks for ChecksApi {
    async fn set_check(
        &self,
        request: Request<SetCheckRequest>,
    ) -> Result<Response<SetCheckResponse>, Status> {
        let update = match CheckUpdate::parse(request.into_inner()) {
            Ok(u) => u,
            Err(message) => {
                self.metrics.registry_call(CallOutcome::Refused);
                return Err(Status::invalid_argument(message));
            }
        };
        let result = self.apply(&update).await;
        self.metrics.registry_call(match &result {
            Ok(()) => CallOutcome::Applied,
            Err(s) if s.code() == tonic::Code::Unavailable => CallOutcome::Failed,
            Err(_) => CallOutcome::Refused,
        });
        result?;
        tracing::debug!(
            instance = %update.service_id, check = %update.check_id,
            status = update.status, "check set"
        );
        Ok(Response::new(SetCheckResponse {}))
    }

    async fn proxy_metrics(
        &self,
        _request: Request<ProxyMetricsRequest>,
    ) -> Result<Response<ProxyMetricsResponse>, Status> {
        match self.proxy.metrics().await {
            Ok(metrics) => Ok(Response::new(metrics)),
            Err(e) => {
                tracing::debug!(error = %e, "proxy metrics unavailable");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

// === impl CheckUpdate ===

impl CheckUpdate {
    fn parse(req: SetCheckRequest) -> Result<Self, String> {
        let service_id = req.service_id.trim().to_owned();
        if service_id.is_empty() {
            return Err("service_id is required".into());
        }
        let status = match req.status.as_str() {
            "passing" => "passing",
            "warning" => "warning",
            "critical" => "critical",
            other => {
                return Err(format!(
                    "status {other:?} is not passing, warning or critical"
                ));
            }
        };
        let check_id = match req.check_id.trim() {
            "" => format!("{DEFAULT_CHECK_PREFIX}{service_id}"),
            id => id.to_owned(),
        };
        let name = match req.name.trim() {
            "" => DEFAULT_CHECK_NAME.to_owned(),
            name => name.to_owned(),
        };
        let mut output = req.output;
        if output.len() > MAX_OUTPUT {
            let cut = (0..=MAX_OUTPUT)
                .rev()
                .find(|i| output.is_char_boundary(*i))
                .unwrap_or(0);
            output.truncate(cut);
        }
        Ok(Self {
            service_id,
            check_id,
            name,
            status,
            output,
        })
    }
}

/// The status a new check is registered with before its update to
/// `status`. The agent sends a check's output alone to the servers only
/// every `check_update_interval` (5 minutes by default), a status change at
/// once; so a non-passing verdict registers with the other non-passing
/// status and its update, a status change, carries the output along at
/// once. Both are out of routing. A passing one registers passing (never
/// out of routing for a moment) and its output follows later.
fn first_status(status: &'static str) -> &'static str {
    match status {
        "critical" => "warning",
        "warning" => "critical",
        passing => passing,
    }
}

/// Whether Consul refused an update because it does not know the check
/// (1.8 answers 500 "does not have associated TTL"; later ones 404).
fn unknown_check(e: &Error) -> bool {
    match e {
        Error::Status { code: 404, .. } => true,
        Error::Status { body, .. } => {
            body.contains("does not have associated TTL") || body.contains("Unknown check")
        }
        _ => false,
    }
}

/// The gRPC status for a Consul error; an unknown instance is NOT_FOUND.
fn status(e: &Error, u: &CheckUpdate) -> Status {
    match e {
        Error::Status { body, .. } if body.contains("does not exist") => {
            Status::not_found(format!(
                "instance {:?} is not registered on this node's agent",
                u.service_id
            ))
        }
        Error::Status { code, body } if (400..500).contains(code) => {
            Status::invalid_argument(body.clone())
        }
        _ => Status::unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_gets_defaults_and_bad_ones_name_the_field() {
        let u = CheckUpdate::parse(SetCheckRequest {
            service_id: "web-1".into(),
            status: "critical".into(),
            output: "hung".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(u.check_id, "mesh-monitor:web-1");
        assert_eq!((u.name.as_str(), u.status), ("mesh-monitor", "critical"));
        let e = CheckUpdate::parse(SetCheckRequest {
            status: "passing".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("service_id"), "{e}");
        let e = CheckUpdate::parse(SetCheckRequest {
            service_id: "web-1".into(),
            status: "ok".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("\"ok\""), "{e}");
    }

    #[test]
    fn unknown_checks_and_instances_are_told_apart() {
        let consul = |code, body: &str| Error::Status {
            code,
            body: body.into(),
        };
        assert!(unknown_check(&consul(
            500,
            "CheckID \"x\" does not have associated TTL"
        )));
        assert!(unknown_check(&consul(404, "Unknown check ID")));
        assert!(!unknown_check(&consul(500, "No cluster leader")));
        let u = CheckUpdate::parse(SetCheckRequest {
            service_id: "web-1".into(),
            status: "passing".into(),
            ..Default::default()
        })
        .unwrap();
        let s = status(&consul(500, "ServiceID \"web-1\" does not exist"), &u);
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(
            status(&consul(500, "No cluster leader"), &u).code(),
            tonic::Code::Unavailable
        );
    }
}
