//! Rolling deployments of artifacts (jars) across nodes' mesh-deployers:
//! the calls, and the deployments as the API shows them. The leader's
//! [`crate::deploy::driver`] takes the nodes one at a time.

use std::{collections::BTreeSet, pin::Pin, time::Duration};

use consul_client::QueryOptions;
use futures::{Stream, StreamExt as _};
use mesh_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Control, RolloutEventView, check_author, unknown_node};
use crate::{
    deploy::{
        ArtifactMeta, CHUNK_SIZE, DeploySpec, Deployment, DeploymentState, KEEP_VERSIONS,
        chunk_count, prune,
    },
    error::ControlError,
    model::{now_ms, rfc3339},
};

/// How long one node's deployer may take to say what it runs and keeps.
pub const NODE_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// How often an abort is tried again when the leader wrote the record in
/// between.
const ABORT_TRIES: usize = 8;

/// An artifact's bytes as they arrive, in order; an `Err` ends the upload.
pub type ArtifactBytes = Pin<Box<dyn Stream<Item = Result<Vec<u8>, ControlError>> + Send>>;

/// How a node's instance looks in Consul.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceHealth {
    /// passing, warning or critical (the worst of its checks).
    pub status: String,
    /// The output of the worst check, trimmed.
    pub output: String,
}

/// A rolling deployment as the API shows it (`mesh.v1.Deployment`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    /// Its number, from 1, in the order deployments were started.
    pub id: u64,
    /// The service deployed.
    pub service: String,
    /// The artifact's version.
    pub version: String,
    /// The artifact's SHA-256, lowercase hex.
    pub sha256: String,
    /// The artifact's size in bytes.
    pub size: u64,
    /// The artifact's file name on the nodes.
    pub file_name: String,
    /// How nodes are taken (`rolling`).
    pub strategy: String,
    /// Who started it.
    pub author: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
    /// running, succeeded, halted or aborted.
    pub state: String,
    /// Why it halted or was aborted; empty otherwise.
    pub reason: String,
    /// Every node, in the order they are deployed.
    pub nodes: Vec<DeploymentNodeView>,
    /// What happened, oldest first.
    pub events: Vec<RolloutEventView>,
    /// The replica that drives it.
    pub driver: String,
    /// The command each deployer runs.
    pub command: String,
    /// The path that answers 2xx once an instance serves.
    pub health_path: String,
    /// How long a new instance has to become healthy, in milliseconds.
    pub health_timeout_ms: u64,
    /// How long an old instance keeps serving once deregistered, in
    /// milliseconds.
    pub drain_ms: u64,
    /// How long a node must stay healthy before the next, in milliseconds.
    pub soak_ms: u64,
}

/// One node of a deployment as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentNodeView {
    /// The node.
    pub node: String,
    /// pending, uploading, deploying, soaking, done, failed, rolling-back,
    /// rolled-back or skipped.
    pub state: String,
    /// What is going on, or what went wrong.
    pub detail: String,
    /// The version it ran before; empty: none.
    pub from_version: String,
    /// The instance the deploy started, once known.
    pub instance_id: String,
    /// When its deploy started (RFC 3339); empty: not yet.
    pub started_at: String,
    /// When it finished (RFC 3339); empty: not yet.
    pub finished_at: String,
}

/// What one node's deployer runs and keeps (`mesh.v1.NodeDeployments`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDeploymentsView {
    /// The node.
    pub node: String,
    /// The deployer's URL.
    pub deployer: String,
    /// Why the deployer could not be asked; empty when it answered.
    pub error: String,
    /// The instances it runs.
    pub instances: Vec<DeployedInstance>,
    /// The artifacts it keeps, newest first.
    pub artifacts: Vec<StoredArtifact>,
}

/// An instance a node's deployer runs (`mesh.v1.Instance`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedInstance {
    /// The service.
    pub service: String,
    /// The version it runs.
    pub version: String,
    /// `<service>-<version>-<port>`.
    pub instance_id: String,
    /// The port it listens on.
    pub port: u32,
    /// Its process id; 0 while none runs.
    pub pid: u32,
    /// running, restarting, crashed or stopped.
    pub state: String,
    /// How often it was restarted.
    pub restarts: u32,
}

/// An artifact a node's deployer keeps (`mesh.v1.Artifact`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    /// The service.
    pub service: String,
    /// Its version.
    pub version: String,
    /// Its file name.
    pub file_name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// When it was stored (RFC 3339).
    pub stored_at: String,
}

// === impl Control ===

impl Control {
    /// Validates `spec`, stores the artifact from `data` in KV (or finds
    /// it stored already with the same SHA-256), and starts a deployment
    /// of it. Runs in its own task, so an upload cut short (the caller
    /// gone) still cleans up what it wrote.
    pub async fn deploy(
        &self,
        spec: DeploySpec,
        data: ArtifactBytes,
    ) -> Result<DeploymentView, ControlError> {
        let control = self.clone();
        tokio::spawn(async move { control.deploy_inner(spec, data).await })
            .await
            .map_err(|e| ControlError::Internal(format!("the deploy task failed: {e}")))?
    }

    async fn deploy_inner(
        &self,
        spec: DeploySpec,
        data: ArtifactBytes,
    ) -> Result<DeploymentView, ControlError> {
        let mut spec = spec
            .check()
            .map_err(|(field, message)| ControlError::invalid(field, message))?;
        spec.author = if spec.author.trim().is_empty() {
            "anonymous".to_owned()
        } else {
            check_author(&spec.author)?
        };
        spec.nodes = self.deploy_nodes(&spec.service, &spec.nodes).await?;
        let service = spec.service.clone();
        let (active, revision) = self.store.active_deployment(&service).await?;
        if active != 0 {
            return Err(under_way(&service, active));
        }
        let id = self.store.next_deployment_id().await?;
        if !self.store.claim_deployment(&service, id, revision).await? {
            let (active, _) = self.store.active_deployment(&service).await?;
            return Err(under_way(&service, active));
        }
        let result = self.store_and_start(id, spec, data).await;
        if result.is_err()
            && let Err(e) = self.store.release_deployment(&service, id).await
        {
            tracing::warn!(service, id, error = %e, "could not clear the deployment marker");
        }
        result
    }

    /// The nodes of a deployment of `service`: those named (each in the
    /// catalog), or else every node with an instance of it, sorted.
    async fn deploy_nodes(
        &self,
        service: &str,
        named: &[String],
    ) -> Result<Vec<String>, ControlError> {
        if !named.is_empty() {
            let catalog = self.consul.catalog_nodes(QueryOptions::default()).await?;
            let known: BTreeSet<&str> = catalog.value.iter().map(|n| n.node.as_str()).collect();
            if let Some(node) = named.iter().find(|n| !known.contains(n.as_str())) {
                return Err(unknown_node(node));
            }
            return Ok(named.to_vec());
        }
        let entries = self
            .consul
            .health_service(service, false, QueryOptions::default())
            .await?;
        let nodes: BTreeSet<String> = entries.value.into_iter().map(|e| e.node.node).collect();
        if nodes.is_empty() {
            return Err(ControlError::Refused(format!(
                "no node runs {service} (no instance in Consul's catalog): name the nodes to deploy to"
            )));
        }
        Ok(nodes.into_iter().collect())
    }

    /// Stores the artifact (unless stored), prunes old versions and
    /// creates the record of deployment `id`.
    async fn store_and_start(
        &self,
        id: u64,
        mut spec: DeploySpec,
        data: ArtifactBytes,
    ) -> Result<DeploymentView, ControlError> {
        let (service, version) = (spec.service.clone(), spec.version.clone());
        match self.store.artifact(&service, &version).await? {
            Some(meta) if meta.sha256 == spec.sha256 && meta.size == spec.size => {
                tracing::info!(
                    service,
                    version,
                    "artifact stored already; its bytes are not needed"
                );
                spec.file_name = meta.file_name;
            }
            Some(meta) => {
                return Err(ControlError::Refused(format!(
                    "{service} {version} is stored already with other bytes (SHA-256 {}, {} bytes): a stored version never changes, give this artifact a new version",
                    meta.sha256, meta.size
                )));
            }
            None => {
                if let Err(e) = self.store_artifact(&spec, data).await {
                    if let Err(clean) = self.store.delete_chunks(&service, &version).await {
                        tracing::warn!(service, version, error = %clean, "could not delete the chunks of a failed upload");
                    }
                    return Err(e);
                }
            }
        }
        self.prune_artifacts(&service, &version).await;
        let deployment = Deployment::new(id, spec, now_ms());
        if !self.store.create_deployment(&deployment).await? {
            return Err(ControlError::Internal(format!(
                "deployment {id} exists although the sequence just gave its id"
            )));
        }
        tracing::info!(
            id, service, version, author = %deployment.spec.author,
            nodes = deployment.nodes.len(), "deployment started"
        );
        Ok((&deployment).into())
    }

    /// Writes the artifact's chunks as they arrive, checking its size and
    /// SHA-256, then its metadata (only if absent).
    async fn store_artifact(
        &self,
        spec: &DeploySpec,
        mut data: ArtifactBytes,
    ) -> Result<(), ControlError> {
        let (service, version) = (&spec.service, &spec.version);
        let mut hasher = Sha256::new();
        let mut pending: Vec<u8> = Vec::with_capacity(CHUNK_SIZE);
        let (mut received, mut n) = (0u64, 0u64);
        while let Some(bytes) = data.next().await {
            let bytes = bytes?;
            received += bytes.len() as u64;
            if received > spec.size {
                return Err(ControlError::invalid(
                    "size",
                    format!("more bytes came than the {} announced", spec.size),
                ));
            }
            hasher.update(&bytes);
            pending.extend_from_slice(&bytes);
            while pending.len() >= CHUNK_SIZE {
                self.store
                    .put_chunk(service, version, n, &pending[..CHUNK_SIZE])
                    .await?;
                pending.drain(..CHUNK_SIZE);
                n += 1;
            }
        }
        if received < spec.size {
            return Err(ControlError::Refused(format!(
                "the upload was cut short: {received} of {} bytes came; nothing was stored",
                spec.size
            )));
        }
        if !pending.is_empty() {
            self.store.put_chunk(service, version, n, &pending).await?;
            n += 1;
        }
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != spec.sha256 {
            return Err(ControlError::Refused(format!(
                "the artifact's SHA-256 is {sha256}, not {} as announced; nothing was stored",
                spec.sha256
            )));
        }
        debug_assert_eq!(n, chunk_count(spec.size));
        let meta = ArtifactMeta {
            sha256,
            size: spec.size,
            file_name: spec.file_name.clone(),
            chunk_size: CHUNK_SIZE as u64,
            chunks: n,
            stored_at: now_ms(),
        };
        if !self.store.put_artifact(service, version, &meta).await? {
            return Err(ControlError::Refused(format!(
                "{service} {version} was stored by another upload at the same time; deploy again"
            )));
        }
        tracing::info!(
            service,
            version,
            size = spec.size,
            chunks = n,
            "artifact stored"
        );
        Ok(())
    }

    /// Deletes the oldest stored versions of `service` beyond
    /// [`KEEP_VERSIONS`], except `current` and those of deployments under
    /// way. Failures are logged: the next deploy prunes again.
    async fn prune_artifacts(&self, service: &str, current: &str) {
        let result = async {
            let stored = self.store.artifacts(service).await?;
            let mut in_use = BTreeSet::from([current.to_owned()]);
            for (s, id) in self.store.active_deployments().await? {
                if s == service
                    && let Some((d, _)) = self.store.deployment(id).await?
                {
                    in_use.insert(d.spec.version);
                }
            }
            let stored: Vec<(String, u64)> = stored
                .into_iter()
                .map(|(v, meta)| (v, meta.stored_at))
                .collect();
            for version in prune(&stored, &in_use, KEEP_VERSIONS) {
                self.store.delete_artifact(service, &version).await?;
                tracing::info!(service, version, "pruned an old artifact version");
            }
            Ok::<_, ControlError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(service, error = %e, "could not prune old artifact versions");
        }
    }

    /// Deployment `id`; 0: the newest of `service`, or of any service.
    pub async fn deployment(&self, id: u64, service: &str) -> Result<DeploymentView, ControlError> {
        if id == 0 {
            let all = self.deployments(service).await?;
            return all.into_iter().next().ok_or_else(|| {
                ControlError::NotFound(if service.is_empty() {
                    "there are no deployments yet".to_owned()
                } else {
                    format!("there are no deployments of {service} yet")
                })
            });
        }
        match self.store.deployment(id).await? {
            Some((d, _)) => Ok((&d).into()),
            None => Err(ControlError::NotFound(format!(
                "there is no deployment {id}"
            ))),
        }
    }

    /// Every deployment (of `service`, when not empty), newest first.
    pub async fn deployments(&self, service: &str) -> Result<Vec<DeploymentView>, ControlError> {
        Ok(self
            .store
            .deployments()
            .await?
            .iter()
            .filter(|d| service.is_empty() || d.spec.service == service)
            .map(DeploymentView::from)
            .collect())
    }

    /// Aborts deployment `id`: no further node is touched.
    pub async fn abort_deployment(
        &self,
        id: u64,
        author: &str,
    ) -> Result<DeploymentView, ControlError> {
        if id == 0 {
            return Err(ControlError::invalid("id", "name the deployment to abort"));
        }
        let author = if author.trim().is_empty() {
            "anonymous".to_owned()
        } else {
            check_author(author)?
        };
        for _ in 0..ABORT_TRIES {
            let Some((mut d, revision)) = self.store.deployment(id).await? else {
                return Err(ControlError::NotFound(format!(
                    "there is no deployment {id}"
                )));
            };
            match d.state {
                DeploymentState::Running => {}
                DeploymentState::Aborted => return Ok((&d).into()),
                state => {
                    return Err(ControlError::Refused(format!(
                        "deployment {id} has ended ({}): there is nothing to abort",
                        state.as_str()
                    )));
                }
            }
            d.abort(&author, now_ms());
            if self.store.save_deployment(&d, revision).await?.is_some() {
                tracing::info!(id, author = %author, "deployment aborted");
                return Ok((&d).into());
            }
        }
        Err(ControlError::Unavailable(format!(
            "deployment {id} changed too often to be written; try again"
        )))
    }

    /// What every catalog node's deployer runs and keeps (of `service`,
    /// when not empty); a deployer that does not answer within
    /// [`NODE_STATUS_TIMEOUT`] shows why instead.
    pub async fn node_deployments(
        &self,
        service: &str,
    ) -> Result<Vec<NodeDeploymentsView>, ControlError> {
        let nodes = self.consul.catalog_nodes(QueryOptions::default()).await?;
        let mut names: Vec<String> = nodes.value.into_iter().map(|n| n.node).collect();
        names.sort();
        let asks = names.into_iter().map(|node| async move {
            let mut view = NodeDeploymentsView {
                node: node.clone(),
                ..NodeDeploymentsView::default()
            };
            let ask = self.ask_deployer(&node, service, &mut view);
            match tokio::time::timeout(NODE_STATUS_TIMEOUT, ask).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => view.error = e,
                Err(_) => {
                    view.error = format!(
                        "the deployer did not answer within {} s",
                        NODE_STATUS_TIMEOUT.as_secs()
                    );
                }
            }
            view
        });
        Ok(futures::future::join_all(asks).await)
    }

    async fn ask_deployer(
        &self,
        node: &str,
        service: &str,
        view: &mut NodeDeploymentsView,
    ) -> Result<(), String> {
        let (mut client, url) = self.deployer(node).await.map_err(|e| e.to_string())?;
        view.deployer = url;
        let status = client
            .status(pb::StatusRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| format!("Status: {}", s.message()))?
            .into_inner();
        let artifacts = client
            .list_artifacts(pb::ListArtifactsRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| format!("ListArtifacts: {}", s.message()))?
            .into_inner();
        view.instances = status.instances.into_iter().map(Into::into).collect();
        view.artifacts = artifacts.artifacts.into_iter().map(Into::into).collect();
        Ok(())
    }

    /// How instance `instance_id` of `service` looks in Consul; `None`
    /// when it is not registered.
    pub(crate) async fn instance_health(
        &self,
        service: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceHealth>, ControlError> {
        let entries = self
            .consul
            .health_service(service, false, QueryOptions::default())
            .await?;
        let Some(entry) = entries
            .value
            .into_iter()
            .find(|e| e.service.id == instance_id)
        else {
            return Ok(None);
        };
        let rank = |s: &str| match s {
            "critical" => 2,
            "warning" => 1,
            _ => 0,
        };
        let worst = entry.checks.iter().max_by_key(|c| rank(&c.status));
        Ok(Some(match worst {
            Some(c) if rank(&c.status) > 0 => InstanceHealth {
                status: c.status.clone(),
                output: c.output.trim().to_owned(),
            },
            _ => InstanceHealth {
                status: "passing".to_owned(),
                output: String::new(),
            },
        }))
    }
}

fn under_way(service: &str, id: u64) -> ControlError {
    ControlError::Refused(format!(
        "deployment {id} of {service} is under way: wait for it to end, or abort it (`meshctl deploy abort {id}`)"
    ))
}

// === conversions ===

impl From<&Deployment> for DeploymentView {
    fn from(d: &Deployment) -> Self {
        let time = |ms: u64| if ms == 0 { String::new() } else { rfc3339(ms) };
        Self {
            id: d.id,
            service: d.spec.service.clone(),
            version: d.spec.version.clone(),
            sha256: d.spec.sha256.clone(),
            size: d.spec.size,
            file_name: d.spec.file_name.clone(),
            strategy: d.spec.strategy.clone(),
            author: d.spec.author.clone(),
            created_at: rfc3339(d.created_at_ms),
            updated_at: rfc3339(d.updated_at_ms),
            state: d.state.as_str().to_owned(),
            reason: d.reason.clone(),
            nodes: d
                .nodes
                .iter()
                .map(|n| DeploymentNodeView {
                    node: n.node.clone(),
                    state: n.state.as_str().to_owned(),
                    detail: n.detail.clone(),
                    from_version: n.from_version.clone().unwrap_or_default(),
                    instance_id: n.instance_id.clone(),
                    started_at: time(n.started_at_ms),
                    finished_at: time(n.finished_at_ms),
                })
                .collect(),
            events: d
                .events
                .iter()
                .map(|e| RolloutEventView {
                    at: rfc3339(e.at_ms),
                    text: e.text.clone(),
                })
                .collect(),
            driver: d.driver.clone(),
            command: d.spec.command.clone(),
            health_path: d.spec.health_path.clone(),
            health_timeout_ms: d.spec.health_timeout_ms,
            drain_ms: d.spec.drain_ms,
            soak_ms: d.spec.soak_ms,
        }
    }
}

impl From<pb::Instance> for DeployedInstance {
    fn from(i: pb::Instance) -> Self {
        Self {
            service: i.service,
            version: i.version,
            instance_id: i.instance_id,
            port: i.port,
            pid: i.pid,
            state: i.state,
            restarts: i.restarts,
        }
    }
}

impl From<pb::Artifact> for StoredArtifact {
    fn from(a: pb::Artifact) -> Self {
        Self {
            service: a.service,
            version: a.version,
            file_name: a.file_name,
            size: a.size,
            sha256: a.sha256,
            stored_at: a.stored_at,
        }
    }
}

impl From<DeployedInstance> for pb::Instance {
    fn from(i: DeployedInstance) -> Self {
        Self {
            service: i.service,
            version: i.version,
            instance_id: i.instance_id,
            port: i.port,
            pid: i.pid,
            state: i.state,
            restarts: i.restarts,
        }
    }
}

impl From<StoredArtifact> for pb::Artifact {
    fn from(a: StoredArtifact) -> Self {
        Self {
            service: a.service,
            version: a.version,
            file_name: a.file_name,
            size: a.size,
            sha256: a.sha256,
            stored_at: a.stored_at,
        }
    }
}
