//! `mesh.v1.Registry`: registrations go to the local Consul agent (the
//! first Consul address); while it is unreachable they wait in the durable
//! queue and the answer says `queued`. Consul's refusals come back with
//! Consul's message: 400 as `InvalidArgument`, 403 as `PermissionDenied`.
//! `ProxyStats` answers for the node's proxy with its admin `/stats`
//! (`--proxy-admin`), or `Unavailable` naming the address and why.
//!
//! - `outbox`: apply now or queue, and the drainer.
//! - `convert`: checks and converts between `mesh.v1` and Consul's JSON.
//! - `report`: the proxy's config status (`ReportStatus`) as stored for
//!   mesh-control.
//! - `proxy_stats`: the proxy's `/stats` (`ProxyStats`), read over HTTP.
//! - [`checks`]: `mesh.v1.Checks`, the checks another process (mesh-monitor)
//!   sets on this agent's instances, and the proxy's `/metrics` for it.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use consul_client::{Client, Error, QueryOptions};
use mesh_proto::v1::{
    DeregisterRequest, DeregisterResponse, ListInstancesRequest, ListInstancesResponse,
    ProxyStatsRequest, ProxyStatsResponse, RegisterRequest, RegisterResponse, ReportStatusRequest,
    ReportStatusResponse, ServiceRegistration, registry_server::Registry,
};
use mesh_runtime::shutdown::Shutdown;
use tonic::{Request, Response, Status};

use crate::metrics::{BridgeMetrics, CallOutcome};

pub mod checks;
mod convert;
mod outbox;
mod proxy_stats;
mod report;

pub use checks::ChecksApi;
use outbox::{Outbox, Submitted};
pub use outbox::{OutboxError, QueuedCall};
pub use proxy_stats::{ProxyAdmin, ProxyStatsError, ProxyStatsReason};

/// The Registry service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegistryApi {
    outbox: Arc<Outbox>,
    /// The local agent: registrations and `local` listings.
    agent: Client,
    /// Every Consul address: mesh-wide listings.
    consul: Client,
    metrics: BridgeMetrics,
    /// The node whose proxy reports through this bridge.
    node: Option<String>,
    /// The node's proxy's admin listener, for `ProxyStats`.
    proxy: ProxyAdmin,
}

// === impl RegistryApi ===

impl RegistryApi {
    /// Opens the queue in `queue_dir`; registrations go to `agent`,
    /// mesh-wide reads to `consul`.
    pub fn open(
        queue_dir: PathBuf,
        agent: Client,
        consul: Client,
        metrics: BridgeMetrics,
    ) -> std::io::Result<Self> {
        let outbox = Outbox::open(queue_dir, agent.clone(), metrics.clone())?;
        Ok(Self {
            outbox: Arc::new(outbox),
            agent,
            consul,
            metrics,
            node: None,
            proxy: ProxyAdmin::new(default_proxy_admin()),
        })
    }

    /// Takes `ReportStatus` from the proxy of `node` (only).
    pub fn reporting_for(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// Answers `ProxyStats` from the proxy admin listener at `addr`
    /// (otherwise [`DEFAULT_PROXY_ADMIN`](crate::config::DEFAULT_PROXY_ADMIN)).
    pub fn reading_proxy_at(mut self, addr: SocketAddr) -> Self {
        self.proxy = ProxyAdmin::new(addr);
        self
    }

    /// The Checks service on the same local agent.
    pub fn checks(&self) -> ChecksApi {
        ChecksApi::new(self.agent.clone(), self.metrics.clone(), self.proxy)
    }

    /// Applies queued calls whenever the agent is reachable, until `shutdown`.
    pub async fn drain(&self, shutdown: Shutdown) {
        self.outbox.drain(shutdown).await;
    }

    /// Sends `call` through the outbox; `true` when it was queued.
    async fn submit(&self, call: QueuedCall) -> Result<bool, Status> {
        let result = self.outbox.submit(call).await;
        let outcome = match &result {
            Ok(Submitted::Applied) => CallOutcome::Applied,
            Ok(Submitted::Queued) => CallOutcome::Queued,
            Err(OutboxError::Consul(e)) if e.is_caller_fault() => CallOutcome::Refused,
            Err(_) => CallOutcome::Failed,
        };
        self.metrics.registry_call(outcome);
        match result {
            Ok(submitted) => Ok(submitted == Submitted::Queued),
            Err(OutboxError::Consul(e)) => Err(status(&e)),
            Err(e @ OutboxError::Disk(_)) => {
                tracing::error!(error = %e, "agent unreachable and the queue cannot be written");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }

    fn refuse(&self, message: String) -> Status {
        self.metrics.registry_call(CallOutcome::Refused);
        Status::invalid_argument(message)
    }

    async fn local_instances(&self, service: &str) -> Result<Vec<ServiceRegistration>, Error> {
        let result = self.agent.agent_services().await;
        self.metrics.consul_call(&result);
        let mut instances: Vec<_> = result?
            .into_values()
            .filter(|s| service.is_empty() || s.service == service)
            .map(convert::from_agent)
            .collect();
        instances.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        Ok(instances)
    }

    async fn passing_instances(&self, service: &str) -> Result<Vec<ServiceRegistration>, Error> {
        let result = self
            .consul
            .health_service(service, true, QueryOptions::default())
            .await;
        self.metrics.consul_call(&result);
        Ok(result?.value.into_iter().map(convert::from_entry).collect())
    }
}

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let service =
            convert::registration(request.into_inner().service).map_err(|m| self.refuse(m))?;
        let (name, id) = (service.name.clone(), service.id.clone());
        let queued = self
            .submit(QueuedCall::Register {
                service: Box::new(service),
            })
            .await?;
        tracing::info!(service = %name, id = id.as_deref().unwrap_or(&name), queued, "register");
        Ok(Response::new(RegisterResponse { queued }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let id = request.into_inner().id;
        if id.trim().is_empty() {
            return Err(self.refuse("id is required".into()));
        }
        let queued = self
            .submit(QueuedCall::Deregister { id: id.clone() })
            .await?;
        tracing::info!(%id, queued, "deregister");
        Ok(Response::new(DeregisterResponse { queued }))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let req = request.into_inner();
        let instances = if req.local {
            self.local_instances(&req.service).await
        } else if req.service.is_empty() {
            return Err(Status::invalid_argument("service is required unless local"));
        } else {
            self.passing_instances(&req.service).await
        };
        let instances = instances.map_err(|e| status(&e))?;
        Ok(Response::new(ListInstancesResponse { instances }))
    }

    async fn report_status(
        &self,
        request: Request<ReportStatusRequest>,
    ) -> Result<Response<ReportStatusResponse>, Status> {
        let req = request.into_inner();
        if self.node.as_deref() != Some(req.node.trim()) {
            let serves = self.node.as_deref().unwrap_or("no node");
            return Err(Status::failed_precondition(format!(
                "this bridge takes the status of {serves}'s proxy, not of node {:?}",
                req.node
            )));
        }
        let (version, refused) = (req.version_in_effect, req.refused_version);
        let (key, value) =
            report::record(req, report::now_ms()).map_err(Status::invalid_argument)?;
        // Not queued: a status is only worth its freshness, and the proxy
        // reports again soon.
        let result = self.consul.kv_put(&key, &value, None).await;
        self.metrics.consul_call(&result);
        result.map_err(|e| status(&e))?;
        tracing::debug!(%key, version, refused, "proxy status recorded");
        Ok(Response::new(ReportStatusResponse {}))
    }

    async fn proxy_stats(
        &self,
        _request: Request<ProxyStatsRequest>,
    ) -> Result<Response<ProxyStatsResponse>, Status> {
        match self.proxy.stats().await {
            Ok(stats) => Ok(Response::new(stats)),
            Err(e) => {
                tracing::debug!(error = %e, "proxy stats unavailable");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

/// The proxy admin address of the port table.
fn default_proxy_admin() -> SocketAddr {
    crate::config::DEFAULT_PROXY_ADMIN
        .parse()
        .expect("the default proxy admin address is valid")
}

/// The gRPC status for a Consul error: whose fault, and Consul's message.
fn status(e: &Error) -> Status {
    match e {
        Error::Status { code: 400, body } => Status::invalid_argument(body.clone()),
        Error::Status {
            code: 401 | 403,
            body,
        } => Status::permission_denied(body.clone()),
        Error::Status { code: 404, body } => Status::not_found(body.clone()),
        Error::Status { code, body } if *code < 500 => Status::failed_precondition(body.clone()),
        Error::Status { .. } | Error::Unreachable { .. } => Status::unavailable(e.to_string()),
        Error::Decode(_) => Status::internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn consul_errors_map_to_whose_fault() {
        let consul = |code, body: &str| Error::Status {
            code,
            body: body.into(),
        };
        let code = |e: Error| status(&e).code();
        assert_eq!(code(consul(400, "Invalid check")), Code::InvalidArgument);
        assert_eq!(
            status(&consul(400, "Invalid check")).message(),
            "Invalid check"
        );
        assert_eq!(code(consul(403, "ACL not found")), Code::PermissionDenied);
        assert_eq!(code(consul(500, "No cluster leader")), Code::Unavailable);
        let gone = Error::Unreachable {
            addr: "http://a".into(),
            reason: "refused".into(),
        };
        assert_eq!(code(gone), Code::Unavailable);
    }
}
