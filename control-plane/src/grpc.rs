//! `mesh.v1.Control` over gRPC: converts messages to the model's types and
//! back, and leaves every decision to [`Control`].

use std::collections::BTreeMap;

use futures::StreamExt as _;
use mesh_proto::v1::{self as pb, control_server};
use tonic::{Request, Response, Status};

use crate::{
    control::{self, Control, RenderQuery},
    deploy::DeploySpec,
    error::ControlError,
    model::RouteSpec,
    render::{Format, Upstreams},
};

/// The largest message taken: a deploy chunk's 4 MiB of data, with room
/// for its framing.
const MAX_MESSAGE: usize = 5 << 20;

/// The gRPC face of [`Control`].
#[derive(Clone, Debug)]
pub struct ControlApi {
    control: Control,
}

impl ControlApi {
    /// Serves `control`.
    pub fn new(control: Control) -> Self {
        Self { control }
    }

    /// The tonic service; a message may be as large as a deploy chunk
    /// (4 MiB of data) and its framing.
    pub fn into_server(self) -> control_server::ControlServer<Self> {
        control_server::ControlServer::new(self).max_decoding_message_size(MAX_MESSAGE)
    }

    fn done<T, U>(
        &self,
        method: &'static str,
        result: Result<T, ControlError>,
        to_pb: impl FnOnce(T) -> U,
    ) -> Result<Response<U>, Status> {
        self.control
            .counted(method, result)
            .map(|value| Response::new(to_pb(value)))
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl control_server::Control for ControlApi {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        let s = self.control.status();
        self.done("GetStatus", Ok(s), |s| pb::ControlStatus {
            replica: s.replica,
            is_leader: s.is_leader,
            leader: s.leader,
            leader_grpc: s.leader_grpc,
            leader_http: s.leader_http,
            leader_since: s.leader_since,
        })
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let result = self.control.nodes().await;
        self.done("ListNodes", result, |nodes| pb::ListNodesResponse {
            nodes: nodes.into_iter().map(node_pb).collect(),
        })
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let result = self.control.services().await;
        self.done("ListServices", result, |services| {
            pb::ListServicesResponse {
                services: services.into_iter().map(service_pb).collect(),
            }
        })
    }

    async fn get_routes(
        &self,
        request: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::NodeRoutes>, Status> {
        let node = request.into_inner().node;
        let result = self.control.routes(&node).await;
        self.done("GetRoutes", result, |r| pb::NodeRoutes {
            node: r.node,
            revision: r.revision,
            version: r.version,
            routes: routes_pb(r.routes),
        })
    }

    async fn set_routes(
        &self,
        request: Request<pb::SetRoutesRequest>,
    ) -> Result<Response<pb::SetRoutesResponse>, Status> {
        let pb::SetRoutesRequest {
            node,
            routes,
            expected_revision,
            author,
        } = request.into_inner();
        let result = async {
            let change = control::SetRoutes {
                routes: routes_from_pb(routes)?,
                expected_revision,
                author,
            };
            self.control.set_routes(&node, change).await
        }
        .await;
        self.done("SetRoutes", result, |r| pb::SetRoutesResponse {
            version: Some(version_pb(r.version)),
            revision: r.revision,
        })
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let node = request.into_inner().node;
        let result = self.control.versions(&node).await;
        self.done("ListVersions", result, |versions| {
            pb::ListVersionsResponse {
                versions: versions
                    .into_iter()
                    .map(|v| pb::VersionSummary {
                        number: v.number,
                        author: v.author,
                        created_at: v.created_at,
                        routes: v.routes,
                        current: v.current,
                    })
                    .collect(),
            }
        })
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::ConfigVersion>, Status> {
        let request = request.into_inner();
        let result = self.control.version(&request.node, request.number).await;
        self.done("GetVersion", result, version_pb)
    }

    async fn render(
        &self,
        request: Request<pb::RenderRequest>,
    ) -> Result<Response<pb::RenderResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            let query = RenderQuery {
                format: request
                    .format
                    .parse::<Format>()
                    .map_err(|m| ControlError::invalid("format", m))?,
                version: request.version,
                upstreams: match request.upstreams.trim() {
                    "" => None,
                    text => Some(
                        text.parse::<Upstreams>()
                            .map_err(|m| ControlError::invalid("upstreams", m))?,
                    ),
                },
            };
            self.control.render(&request.node, query).await
        }
        .await;
        self.done("Render", result, |r| pb::RenderResponse {
            node: r.node,
            version: r.version,
            format: r.format.to_string(),
            text: r.text,
            diff: r.diff,
        })
    }

    async fn register(
        &self,
        request: Request<pb::ControlRegisterRequest>,
    ) -> Result<Response<pb::ControlRegisterResponse>, Status> {
        let pb::ControlRegisterRequest { node, service } = request.into_inner();
        let result = async {
            let service = service.ok_or_else(|| {
                ControlError::invalid("service", "the instance to register is required")
            })?;
            self.control
                .register(&node, registration_from_pb(service))
                .await
        }
        .await;
        self.done("Register", result, |r| pb::ControlRegisterResponse {
            queued: r.queued,
        })
    }

    async fn deregister(
        &self,
        request: Request<pb::ControlDeregisterRequest>,
    ) -> Result<Response<pb::ControlDeregisterResponse>, Status> {
        let request = request.into_inner();
        let result = self.control.deregister(&request.node, &request.id).await;
        self.done("Deregister", result, |r| pb::ControlDeregisterResponse {
            queued: r.queued,
        })
    }

    async fn stage_version(
        &self,
        request: Request<pb::StageVersionRequest>,
    ) -> Result<Response<pb::StageVersionResponse>, Status> {
        let pb::StageVersionRequest {
            nodes,
            routes,
            author,
        } = request.into_inner();
        let result = async {
            let stage = control::StageVersion {
                nodes,
                routes: routes_from_pb(routes)?,
                author,
            };
            self.control.stage_version(stage).await
        }
        .await;
        self.done("StageVersion", result, |s| pb::StageVersionResponse {
            version: s.version,
            nodes: s
                .nodes
                .into_iter()
                .map(|n| pb::StagedNode {
                    node: n.node,
                    from: n.from,
                    diff: n.diff,
                })
                .collect(),
        })
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let r = request.into_inner();
        let start = control::StartRollout {
            version: r.version,
            author: r.author,
            canary: r.canary,
            batch: r.batch,
            soak_ms: r.soak_ms,
            ack_timeout_ms: r.ack_timeout_ms,
        };
        let result = self.control.start_rollout(start).await;
        self.done("StartRollout", result, pb::Rollout::from)
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let version = request.into_inner().version;
        let result = self.control.rollout(version).await;
        self.done("GetRollout", result, pb::Rollout::from)
    }

    async fn list_rollouts(
        &self,
        _: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let result = self.control.rollouts().await;
        self.done("ListRollouts", result, |all| pb::ListRolloutsResponse {
            rollouts: all.into_iter().map(pb::Rollout::from).collect(),
        })
    }

    async fn deploy(
        &self,
        request: Request<tonic::Streaming<pb::DeployChunk>>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let mut stream = request.into_inner();
        let result = async {
            let first = stream
                .message()
                .await
                .map_err(|s| {
                    ControlError::invalid("start", format!("the stream failed: {}", s.message()))
                })?
                .ok_or_else(|| ControlError::invalid("start", "the stream is empty"))?;
            let start = first.start.ok_or_else(|| {
                ControlError::invalid("start", "the first message must carry `start`")
            })?;
            let head = (!first.data.is_empty()).then_some(Ok(first.data));
            let rest = stream.map(|chunk| match chunk {
                Ok(c) if c.start.is_some() => Err(ControlError::invalid(
                    "start",
                    "only the first message carries `start`",
                )),
                Ok(c) => Ok(c.data),
                Err(s) => Err(ControlError::Refused(format!(
                    "the upload was cut short ({}); nothing was stored",
                    s.message()
                ))),
            });
            let data = futures::stream::iter(head).chain(rest).boxed();
            self.control.deploy(deploy_spec_from_pb(start), data).await
        }
        .await;
        self.done("Deploy", result, pb::Deployment::from)
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let r = request.into_inner();
        let result = self.control.deployment(r.id, &r.service).await;
        self.done("GetDeployment", result, pb::Deployment::from)
    }

    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        let service = request.into_inner().service;
        let result = self.control.deployments(&service).await;
        self.done("ListDeployments", result, |all| {
            pb::ListDeploymentsResponse {
                deployments: all.into_iter().map(pb::Deployment::from).collect(),
            }
        })
    }

    async fn abort_deployment(
        &self,
        request: Request<pb::AbortDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let r = request.into_inner();
        let result = self.control.abort_deployment(r.id, &r.author).await;
        self.done("AbortDeployment", result, pb::Deployment::from)
    }

    async fn list_node_deployments(
        &self,
        request: Request<pb::ListNodeDeploymentsRequest>,
    ) -> Result<Response<pb::ListNodeDeploymentsResponse>, Status> {
        let service = request.into_inner().service;
        let result = self.control.node_deployments(&service).await;
        self.done("ListNodeDeployments", result, |nodes| {
            pb::ListNodeDeploymentsResponse {
                nodes: nodes.into_iter().map(pb::NodeDeployments::from).collect(),
            }
        })
    }

    async fn change_rollout(
        &self,
        request: Request<pb::ChangeRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let r = request.into_inner();
        let result = async {
            let action = match r.action.as_str() {
                "pause" => control::RolloutAction::Pause,
                "resume" => control::RolloutAction::Resume,
                "abort" => control::RolloutAction::Abort,
                other => {
                    return Err(ControlError::invalid(
                        "action",
                        format!("{other:?} is not pause, resume or abort"),
                    ));
                }
            };
            self.control
                .rollout_action(r.version, action, &r.author)
                .await
        }
        .await;
        self.done("ChangeRollout", result, pb::Rollout::from)
    }
}

// === conversions ===

fn node_pb(n: control::NodeInfo) -> pb::NodeInfo {
    pb::NodeInfo {
        name: n.name,
        address: n.address,
        datacenter: n.datacenter,
        routes_version: n.routes_version,
        proxy: Some(pb::ProxyStatus {
            state: n.proxy.state,
            version_in_effect: n.proxy.version_in_effect,
            last_seen: n.proxy.last_seen,
            refused_version: n.proxy.refused_version,
            reason: n.proxy.reason,
        }),
    }
}

fn service_pb(s: control::ServiceInfo) -> pb::ServiceInfo {
    pb::ServiceInfo {
        name: s.name,
        tags: s.tags,
        instances: s
            .instances
            .into_iter()
            .map(|i| pb::InstanceInfo {
                id: i.id,
                node: i.node,
                address: i.address,
                port: i.port,
                tags: i.tags,
                meta: i.meta.into_iter().collect(),
                health: i.health,
                checks: i
                    .checks
                    .into_iter()
                    .map(|c| pb::CheckInfo {
                        id: c.id,
                        status: c.status,
                        output: c.output,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn version_pb(v: control::VersionView) -> pb::ConfigVersion {
    pb::ConfigVersion {
        node: v.node,
        number: v.number,
        author: v.author,
        created_at: v.created_at,
        routes: routes_pb(v.routes),
        rendered: v.rendered,
        diff: v.diff,
    }
}

/// Routes by name as `Route` messages (empty strings for unset keys).
pub fn routes_pb(routes: BTreeMap<String, RouteSpec>) -> Vec<pb::Route> {
    routes
        .into_iter()
        .map(|(service, spec)| pb::Route {
            service,
            timeout: spec.timeout.unwrap_or_default(),
            per_try_timeout: spec.per_try_timeout.unwrap_or_default(),
            retries: spec.retries.and_then(|n| u32::try_from(n).ok()),
            lb: spec.lb.unwrap_or_default(),
            weights: spec
                .weights
                .into_iter()
                .filter_map(|(k, w)| Some((k, u32::try_from(w).ok()?)))
                .collect(),
            hash_header: spec.hash_header.unwrap_or_default(),
            hash_cookie: spec.hash_cookie.unwrap_or_default(),
        })
        .collect()
}

/// `Route` messages as routes by name; a service given twice is refused.
pub fn routes_from_pb(routes: Vec<pb::Route>) -> Result<BTreeMap<String, RouteSpec>, ControlError> {
    let mut out = BTreeMap::new();
    for (k, r) in routes.into_iter().enumerate() {
        let some = |s: String| Some(s).filter(|s| !s.trim().is_empty());
        let spec = RouteSpec {
            timeout: some(r.timeout),
            per_try_timeout: some(r.per_try_timeout),
            retries: r.retries.map(i64::from),
            lb: some(r.lb),
            weights: r
                .weights
                .into_iter()
                .map(|(k, w)| (k, i64::from(w)))
                .collect(),
            hash_header: some(r.hash_header),
            hash_cookie: some(r.hash_cookie),
        };
        if out.insert(r.service.clone(), spec).is_some() {
            return Err(ControlError::invalid(
                format!("routes[{k}].service"),
                format!("{:?} is given twice", r.service),
            ));
        }
    }
    Ok(out)
}

fn registration_from_pb(s: pb::ServiceRegistration) -> control::Registration {
    control::Registration {
        id: s.id,
        name: s.name,
        address: s.address,
        port: s.port,
        tags: s.tags,
        meta: s.meta.into_iter().collect(),
        checks: s
            .checks
            .into_iter()
            .map(|c| control::Check {
                http: c.http,
                tcp: c.tcp,
                ttl: c.ttl,
                interval: c.interval,
                timeout: c.timeout,
                deregister_critical_service_after: c.deregister_critical_service_after,
            })
            .collect(),
    }
}

impl From<control::RolloutView> for pb::Rollout {
    fn from(r: control::RolloutView) -> Self {
        Self {
            version: r.version,
            author: r.author,
            created_at: r.created_at,
            updated_at: r.updated_at,
            state: r.state,
            reason: r.reason,
            step: r.step,
            steps: r.steps,
            done: r.done,
            canary: r.canary,
            batch: r.batch,
            soak_ms: r.soak_ms,
            ack_timeout_ms: r.ack_timeout_ms,
            nodes: r
                .nodes
                .into_iter()
                .map(|n| pb::RolloutNode {
                    node: n.node,
                    step: n.step,
                    from: n.from,
                    state: n.state,
                    detail: n.detail,
                    pushed_at: n.pushed_at,
                    acked_at: n.acked_at,
                })
                .collect(),
            events: r
                .events
                .into_iter()
                .map(|e| pb::RolloutEvent {
                    at: e.at,
                    text: e.text,
                })
                .collect(),
            driver: r.driver,
        }
    }
}

impl From<pb::Rollout> for control::RolloutView {
    fn from(r: pb::Rollout) -> Self {
        Self {
            version: r.version,
            author: r.author,
            created_at: r.created_at,
            updated_at: r.updated_at,
            state: r.state,
            reason: r.reason,
            step: r.step,
            steps: r.steps,
            done: r.done,
            canary: r.canary,
            batch: r.batch,
            soak_ms: r.soak_ms,
            ack_timeout_ms: r.ack_timeout_ms,
            nodes: r
                .nodes
                .into_iter()
                .map(|n| control::RolloutNodeView {
                    node: n.node,
                    step: n.step,
                    from: n.from,
                    state: n.state,
                    detail: n.detail,
                    pushed_at: n.pushed_at,
                    acked_at: n.acked_at,
                })
                .collect(),
            events: r
                .events
                .into_iter()
                .map(|e| control::RolloutEventView {
                    at: e.at,
                    text: e.text,
                })
                .collect(),
            driver: r.driver,
        }
    }
}

/// A deploy's `start` as the model takes it.
pub fn deploy_spec_from_pb(s: pb::DeployStart) -> DeploySpec {
    DeploySpec {
        service: s.service,
        version: s.version,
        file_name: s.file_name,
        size: s.size,
        sha256: s.sha256,
        nodes: s.nodes,
        strategy: s.strategy,
        command: s.command,
        env: s.env.into_iter().collect(),
        health_path: s.health_path,
        health_timeout_ms: s.health_timeout_ms,
        drain_ms: s.drain_ms,
        soak_ms: s.soak_ms,
        tags: s.tags,
        author: s.author,
    }
}

impl From<control::DeploymentView> for pb::Deployment {
    fn from(d: control::DeploymentView) -> Self {
        Self {
            id: d.id,
            service: d.service,
            version: d.version,
            sha256: d.sha256,
            size: d.size,
            file_name: d.file_name,
            strategy: d.strategy,
            author: d.author,
            created_at: d.created_at,
            updated_at: d.updated_at,
            state: d.state,
            reason: d.reason,
            nodes: d
                .nodes
                .into_iter()
                .map(|n| pb::DeploymentNode {
                    node: n.node,
                    state: n.state,
                    detail: n.detail,
                    from_version: n.from_version,
                    instance_id: n.instance_id,
                    started_at: n.started_at,
                    finished_at: n.finished_at,
                })
                .collect(),
            events: d
                .events
                .into_iter()
                .map(|e| pb::RolloutEvent {
                    at: e.at,
                    text: e.text,
                })
                .collect(),
            driver: d.driver,
            command: d.command,
            health_path: d.health_path,
            health_timeout_ms: d.health_timeout_ms,
            drain_ms: d.drain_ms,
            soak_ms: d.soak_ms,
        }
    }
}

impl From<pb::Deployment> for control::DeploymentView {
    fn from(d: pb::Deployment) -> Self {
        Self {
            id: d.id,
            service: d.service,
            version: d.version,
            sha256: d.sha256,
            size: d.size,
            file_name: d.file_name,
            strategy: d.strategy,
            author: d.author,
            created_at: d.created_at,
            updated_at: d.updated_at,
            state: d.state,
            reason: d.reason,
            nodes: d
                .nodes
                .into_iter()
                .map(|n| control::DeploymentNodeView {
                    node: n.node,
                    state: n.state,
                    detail: n.detail,
                    from_version: n.from_version,
                    instance_id: n.instance_id,
                    started_at: n.started_at,
                    finished_at: n.finished_at,
                })
                .collect(),
            events: d
                .events
                .into_iter()
                .map(|e| control::RolloutEventView {
                    at: e.at,
                    text: e.text,
                })
                .collect(),
            driver: d.driver,
            command: d.command,
            health_path: d.health_path,
            health_timeout_ms: d.health_timeout_ms,
            drain_ms: d.drain_ms,
            soak_ms: d.soak_ms,
        }
    }
}

impl From<control::NodeDeploymentsView> for pb::NodeDeployments {
    fn from(n: control::NodeDeploymentsView) -> Self {
        Self {
            node: n.node,
            deployer: n.deployer,
            error: n.error,
            instances: n.instances.into_iter().map(Into::into).collect(),
            artifacts: n.artifacts.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::NodeDeployments> for control::NodeDeploymentsView {
    fn from(n: pb::NodeDeployments) -> Self {
        Self {
            node: n.node,
            deployer: n.deployer,
            error: n.error,
            instances: n.instances.into_iter().map(Into::into).collect(),
            artifacts: n.artifacts.into_iter().map(Into::into).collect(),
        }
    }
}
