//! The leader's side of deployments: every [`TICK`], while this replica
//! holds the leader lock, it starts one pass over each deployment under
//! way (one task per deployment, so a long deploy on one service does not
//! hold up another). A pass takes the deployment's current node one step
//! on. Each step is written to the record (check-and-set) before what it
//! does, and first asks the node's deployer what it already has and runs,
//! so a new leader, or a deployer back after a restart, carries on.
//!
//! A deployer that does not answer (transport errors, UNAVAILABLE, or
//! ABORTED while it is busy) is not a failure: the node keeps its state
//! and the next pass tries again, until [`UNREACHABLE_LIMIT`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use mesh_proto::v1 as pb;
use mesh_runtime::shutdown::Shutdown;
use tokio::{sync::watch, task::JoinHandle};
use tonic::{Code, Status};
use tracing::Instrument as _;

use super::{Deployment, DeploymentState, NodeState};
use crate::{
    control::{Control, DeployerClient},
    error::ControlError,
    leader::LeaderState,
    model::now_ms,
    store::Store,
};

/// How often the leader looks at the deployments under way.
pub const TICK: Duration = Duration::from_millis(500);

/// How long a node's deployer may stay out of reach before its node fails.
pub const UNREACHABLE_LIMIT: Duration = Duration::from_secs(120);

/// How long a quick call to a deployer (Status, ListArtifacts) may take.
const QUICK_CALL: Duration = Duration::from_secs(10);

/// What a deploy call may take on top of the health timeout and drain.
const DEPLOY_SLACK: Duration = Duration::from_secs(60);

/// How long a new instance may take to show passing in Consul after its
/// soak time, before the soak fails.
const REGISTER_GRACE_MS: u64 = 30_000;

/// How long an active marker may name a deployment without a record (an
/// upload whose replica died) before the leader clears it.
const STALE_MARKER: Duration = Duration::from_secs(15 * 60);

/// How often a write after a long call is tried again on a record that
/// moved meanwhile (an abort came in).
const COMMIT_TRIES: usize = 4;

/// Drives the deployments under way while this replica leads.
#[derive(Debug)]
pub struct Driver {
    control: Control,
    leader: watch::Receiver<LeaderState>,
    replica: String,
    passes: HashMap<u64, JoinHandle<()>>,
    missing: HashMap<u64, Instant>,
}

/// Whether a pass may go on: `Stop` when the record moved under it.
enum Flow {
    Go,
    Stop,
}

// === impl Driver ===

impl Driver {
    /// A driver for replica `replica`.
    pub fn new(control: Control, leader: watch::Receiver<LeaderState>, replica: String) -> Self {
        Self {
            control,
            leader,
            replica,
            passes: HashMap::new(),
            missing: HashMap::new(),
        }
    }

    /// Runs until shutdown; passes under way are stopped then (their
    /// records say where they were, for the next leader).
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.requested() => break,
                changed = self.leader.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(TICK) => {}
            }
            if !self.leader.borrow().is_leader {
                continue;
            }
            match self.tick().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "deployment pass failed; trying again");
                }
                Err(e) => tracing::debug!(error = %e, "deployment pass failed again"),
            }
        }
        for (_, pass) in self.passes.drain() {
            pass.abort();
        }
    }

    /// Starts a pass over each deployment under way that has none running.
    async fn tick(&mut self) -> Result<(), ControlError> {
        self.passes.retain(|_, pass| !pass.is_finished());
        let store = self.control.store();
        let active = store.active_deployments().await?;
        self.missing
            .retain(|id, _| active.iter().any(|(_, a)| a == id));
        for (service, id) in active {
            if self.passes.contains_key(&id) {
                continue;
            }
            if store.deployment(id).await?.is_none() {
                // Its upload is under way, or its replica died during it.
                let since = *self.missing.entry(id).or_insert_with(Instant::now);
                if since.elapsed() > STALE_MARKER {
                    tracing::warn!(
                        service,
                        id,
                        "clearing the marker of a deployment that was never stored"
                    );
                    store.release_deployment(&service, id).await?;
                    self.missing.remove(&id);
                }
                continue;
            }
            let control = self.control.clone();
            let replica = self.replica.clone();
            let span = tracing::info_span!("deployment", id, service);
            let pass = tokio::spawn(
                async move {
                    if let Err(e) = pass(control, id, replica).await {
                        tracing::warn!(error = %e, "deployment pass failed; trying again");
                    }
                }
                .instrument(span),
            );
            self.passes.insert(id, pass);
        }
        Ok(())
    }
}

/// One pass over deployment `id`.
async fn pass(control: Control, id: u64, replica: String) -> Result<(), ControlError> {
    let Some((deployment, revision)) = control.store().deployment(id).await? else {
        return Ok(());
    };
    let mut run = Run {
        control: &control,
        d: deployment,
        revision,
        replica: &replica,
    };
    run.step().await
}

/// One pass over one deployment record.
struct Run<'a> {
    control: &'a Control,
    d: Deployment,
    revision: u64,
    replica: &'a str,
}

/// What a deployer call came to.
enum Answer<T> {
    /// It answered.
    Ok(T),
    /// It did not (or was busy): try again later; why.
    Away(String),
    /// It refused: the status.
    Refused(Status),
}

// === impl Run ===

impl Run<'_> {
    fn store(&self) -> &Store {
        self.control.store()
    }

    /// Writes the record; `Stop` when it moved since it was read.
    async fn save(&mut self) -> Result<Flow, ControlError> {
        self.d.driver = self.replica.to_owned();
        match self.store().save_deployment(&self.d, self.revision).await? {
            Some(revision) => {
                self.revision = revision;
                Ok(Flow::Go)
            }
            None => Ok(Flow::Stop),
        }
    }

    /// Applies `change` to the record and writes it; when the record moved
    /// meanwhile (an abort during a long call), reads it again and applies
    /// `change` to that.
    async fn commit(&mut self, change: impl Fn(&mut Deployment, u64)) -> Result<(), ControlError> {
        for _ in 0..COMMIT_TRIES {
            change(&mut self.d, now_ms());
            if let Flow::Go = self.save().await? {
                return Ok(());
            }
            let Some((d, revision)) = self.store().deployment(self.d.id).await? else {
                return Ok(());
            };
            self.d = d;
            self.revision = revision;
        }
        Err(ControlError::Unavailable(format!(
            "deployment {} changed too often to be written",
            self.d.id
        )))
    }

    /// Takes the current node one step on.
    async fn step(&mut self) -> Result<(), ControlError> {
        if self.d.is_settled() {
            // Ended, but the marker was not cleared: clear it.
            self.save().await?;
            return Ok(());
        }
        let Some(k) = self.d.current() else {
            let now = now_ms();
            if !self.d.finish_if_done(now) && self.d.state == DeploymentState::Running {
                self.d.halt("a node did not end done", now);
            }
            self.save().await?;
            if self.d.state == DeploymentState::Succeeded {
                tracing::info!(id = self.d.id, "deployment succeeded");
            }
            return Ok(());
        };
        let state = self.d.nodes[k].state;
        if self.d.state != DeploymentState::Running {
            return self.settle(k).await;
        }
        match state {
            NodeState::Pending => {
                let version = self.d.spec.version.clone();
                self.d.set_node(
                    k,
                    NodeState::Uploading,
                    format!("sending version {version}"),
                    now_ms(),
                );
                if let Flow::Go = self.save().await? {
                    self.upload(k).await?;
                }
                Ok(())
            }
            NodeState::Uploading => self.upload(k).await,
            NodeState::Deploying => self.deploy(k).await,
            NodeState::Soaking => self.soak(k).await,
            NodeState::RollingBack => self.roll_back(k).await,
            _ => Ok(()),
        }
    }

    /// The node's deployer, or why it is out of reach.
    async fn client(&mut self, k: usize) -> Result<Option<DeployerClient>, ControlError> {
        let node = self.d.nodes[k].node.clone();
        match self.control.deployer(&node).await {
            Ok((client, _)) => Ok(Some(client)),
            Err(e) => {
                self.away(k, e.to_string()).await?;
                Ok(None)
            }
        }
    }

    /// The node's deployer did not answer: wait, or fail the node once
    /// it has been away for [`UNREACHABLE_LIMIT`].
    async fn away(&mut self, k: usize, why: String) -> Result<(), ControlError> {
        let now = now_ms();
        let limit = UNREACHABLE_LIMIT.as_millis() as u64;
        let n = &mut self.d.nodes[k];
        let node = n.node.clone();
        if n.unreachable_since_ms == 0 {
            n.unreachable_since_ms = now;
        } else if now.saturating_sub(n.unreachable_since_ms) > limit {
            let reason = format!(
                "{node}'s deployer was out of reach for more than {} s: {why}",
                limit / 1000
            );
            tracing::warn!(node, %reason, "node failed");
            return self.fail_node(k, NodeState::Failed, reason).await;
        }
        let detail = format!("waiting for the deployer ({why})");
        if n.detail != detail {
            n.detail = detail;
            self.save().await?;
        }
        Ok(())
    }

    /// Ends node `k` in `state` with `reason` and halts the deployment
    /// (unless it ended meanwhile).
    async fn fail_node(
        &mut self,
        k: usize,
        state: NodeState,
        reason: String,
    ) -> Result<(), ControlError> {
        let node = self.d.nodes[k].node.clone();
        self.commit(|d, now| {
            d.set_node(k, state, reason.clone(), now);
            d.nodes[k].unreachable_since_ms = 0;
            if d.state == DeploymentState::Running {
                // A soak failure named the reason when the rollback began.
                let why = if d.reason.is_empty() {
                    format!("{node}: {reason}")
                } else {
                    d.reason.clone()
                };
                d.halt(why, now);
            }
        })
        .await
    }

    /// Sends the artifact to the node's deployer, unless it has it; then
    /// reads the version it runs and moves the node on to deploying.
    async fn upload(&mut self, k: usize) -> Result<(), ControlError> {
        let Some(mut client) = self.client(k).await? else {
            return Ok(());
        };
        let spec = self.d.spec.clone();
        let listed = quick(client.list_artifacts(pb::ListArtifactsRequest {
            service: spec.service.clone(),
        }))
        .await;
        let artifacts = match listed {
            Answer::Ok(a) => a.artifacts,
            Answer::Away(why) => return self.away(k, why).await,
            Answer::Refused(s) => {
                let reason = format!("its deployer refused ListArtifacts: {}", s.message());
                return self.fail_node(k, NodeState::Failed, reason).await;
            }
        };
        match artifacts.iter().find(|a| a.version == spec.version) {
            Some(a) if a.sha256 == spec.sha256 => {}
            Some(a) => {
                let reason = format!(
                    "it keeps {} {} with other bytes (SHA-256 {})",
                    spec.service, spec.version, a.sha256
                );
                return self.fail_node(k, NodeState::Failed, reason).await;
            }
            None => {
                if let Some(done) = self.send(k, &mut client).await? {
                    return Ok(done);
                }
            }
        }
        let status = quick(client.status(pb::StatusRequest {
            service: spec.service.clone(),
        }))
        .await;
        let from = match status {
            Answer::Ok(s) => running_version(&s.instances).unwrap_or_default(),
            Answer::Away(why) => return self.away(k, why).await,
            Answer::Refused(s) => {
                let reason = format!("its deployer refused Status: {}", s.message());
                return self.fail_node(k, NodeState::Failed, reason).await;
            }
        };
        let now = now_ms();
        let detail = if from.is_empty() {
            format!("deploying version {}", spec.version)
        } else {
            format!("deploying version {} over {from}", spec.version)
        };
        self.d.nodes[k].from_version = Some(from);
        self.d.nodes[k].unreachable_since_ms = 0;
        self.d.set_node(k, NodeState::Deploying, detail, now);
        if let Flow::Go = self.save().await? {
            self.deploy(k).await?;
        }
        Ok(())
    }

    /// Streams the artifact from KV to the deployer, from where an upload
    /// cut short stopped. `Some(())`: the node was dealt with (away or
    /// failed); `None`: the deployer stored it.
    async fn send(
        &mut self,
        k: usize,
        client: &mut DeployerClient,
    ) -> Result<Option<()>, ControlError> {
        let spec = self.d.spec.clone();
        let Some(meta) = self.store().artifact(&spec.service, &spec.version).await? else {
            let reason = format!(
                "{} {} is no longer kept in Consul KV",
                spec.service, spec.version
            );
            self.fail_node(k, NodeState::Failed, reason).await?;
            return Ok(Some(()));
        };
        let offset = match quick(client.upload_offset(pb::UploadOffsetRequest {
            service: spec.service.clone(),
            version: spec.version.clone(),
            sha256: spec.sha256.clone(),
        }))
        .await
        {
            Answer::Ok(o) if o.offset < meta.size => o.offset,
            Answer::Ok(_) | Answer::Refused(_) => 0,
            Answer::Away(why) => {
                self.away(k, why).await?;
                return Ok(Some(()));
            }
        };
        let mut answer = self.stream_upload(client, &meta, offset).await?;
        if offset > 0
            && matches!(&answer, Answer::Refused(s) if s.code() == Code::FailedPrecondition)
        {
            // The kept bytes did not fit: from the beginning.
            answer = self.stream_upload(client, &meta, 0).await?;
        }
        match answer {
            Answer::Ok(()) => {
                tracing::info!(node = %self.d.nodes[k].node, offset, "artifact sent");
                Ok(None)
            }
            Answer::Away(why) => {
                self.away(k, why).await?;
                Ok(Some(()))
            }
            Answer::Refused(s) => {
                let reason = format!("its deployer refused the upload: {}", s.message());
                self.fail_node(k, NodeState::Failed, reason).await?;
                Ok(Some(()))
            }
        }
    }

    /// One Upload call from `offset`.
    async fn stream_upload(
        &self,
        client: &mut DeployerClient,
        meta: &super::ArtifactMeta,
        offset: u64,
    ) -> Result<Answer<()>, ControlError> {
        let spec = &self.d.spec;
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let start = pb::UploadChunk {
            start: Some(pb::UploadStart {
                service: spec.service.clone(),
                version: spec.version.clone(),
                file_name: meta.file_name.clone(),
                size: meta.size,
                sha256: meta.sha256.clone(),
                offset,
            }),
            data: Vec::new(),
        };
        let chunks = chunk_stream(
            self.store().clone(),
            spec.service.clone(),
            spec.version.clone(),
            meta.clone(),
            offset,
            failed.clone(),
        );
        let messages = futures::stream::once(async { start }).chain(chunks);
        let limit = Duration::from_secs(300 + (meta.size >> 20));
        let answer = call(limit, client.upload(messages)).await;
        let kv_failure = failed.lock().ok().and_then(|f| f.clone());
        if let Some(e) = kv_failure {
            return Err(ControlError::Unavailable(format!(
                "reading the artifact from Consul KV: {e}"
            )));
        }
        Ok(match answer {
            Answer::Ok(_) => Answer::Ok(()),
            Answer::Away(why) => Answer::Away(why),
            Answer::Refused(s) => Answer::Refused(s),
        })
    }

    /// Deploys the new version, unless it runs already and is healthy;
    /// then the node soaks.
    async fn deploy(&mut self, k: usize) -> Result<(), ControlError> {
        let Some(mut client) = self.client(k).await? else {
            return Ok(());
        };
        let spec = self.d.spec.clone();
        let instances = match quick(client.status(pb::StatusRequest {
            service: spec.service.clone(),
        }))
        .await
        {
            Answer::Ok(s) => s.instances,
            Answer::Away(why) => return self.away(k, why).await,
            Answer::Refused(s) => {
                let reason = format!("its deployer refused Status: {}", s.message());
                return self.fail_node(k, NodeState::Failed, reason).await;
            }
        };
        // A deploy that finished while nobody listened (the deployer or
        // the leader restarted): only the new version runs, and Consul
        // has it passing. Anything else is deployed again.
        let live: Vec<&pb::Instance> = instances.iter().filter(|i| i.state != "stopped").collect();
        if let [i] = live.as_slice()
            && i.version == spec.version
            && i.state == "running"
        {
            let health = self
                .control
                .instance_health(&spec.service, &i.instance_id)
                .await?;
            if health.is_some_and(|h| h.status == "passing") {
                return self.soaking(k, (*i).clone()).await;
            }
        }
        let address = self.control.node_address(&self.d.nodes[k].node).await?;
        let request = deploy_request(&spec, &spec.version, address);
        let limit = Duration::from_millis(spec.health_timeout_ms + spec.drain_ms) + DEPLOY_SLACK;
        tracing::info!(node = %self.d.nodes[k].node, version = %spec.version, "deploying");
        match call(limit, client.deploy(request)).await {
            Answer::Ok(r) => {
                let instance = r.instance.unwrap_or_default();
                self.soaking(k, instance).await
            }
            Answer::Away(why) => self.away(k, why).await,
            Answer::Refused(s) => {
                let message = s.message().to_owned();
                let state = match s.code() {
                    Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument => {
                        self.back_on_from(k, &mut client).await
                    }
                    _ => NodeState::Failed,
                };
                tracing::warn!(node = %self.d.nodes[k].node, %message, "deploy failed");
                self.fail_node(k, state, format!("deploy failed: {message}"))
                    .await
            }
        }
    }

    /// `RolledBack` when the node runs the version it ran before (its
    /// deployer left it serving), else `Failed`.
    async fn back_on_from(&self, k: usize, client: &mut DeployerClient) -> NodeState {
        let from = self.d.nodes[k].from_version.clone().unwrap_or_default();
        if from.is_empty() {
            return NodeState::Failed;
        }
        match quick(client.status(pb::StatusRequest {
            service: self.d.spec.service.clone(),
        }))
        .await
        {
            Answer::Ok(s)
                if s.instances
                    .iter()
                    .any(|i| i.version == from && i.state == "running") =>
            {
                NodeState::RolledBack
            }
            _ => NodeState::Failed,
        }
    }

    /// The new version runs as `instance`: the node soaks.
    async fn soaking(&mut self, k: usize, instance: pb::Instance) -> Result<(), ControlError> {
        let version = self.d.spec.version.clone();
        let soak_s = self.d.spec.soak_ms.div_ceil(1000);
        self.commit(|d, now| {
            let n = &mut d.nodes[k];
            n.instance_id.clone_from(&instance.instance_id);
            n.soak_started_at_ms = now;
            n.soak_restarts = instance.restarts;
            n.unreachable_since_ms = 0;
            if d.state == DeploymentState::Running {
                d.set_node(
                    k,
                    NodeState::Soaking,
                    format!(
                        "{} runs version {version}; soaking for {soak_s} s",
                        instance.instance_id
                    ),
                    now,
                );
            } else {
                d.set_node(
                    k,
                    NodeState::Done,
                    format!("runs version {version}; the deployment was aborted before its soak"),
                    now,
                );
            }
        })
        .await
    }

    /// Checks the soaking node: its new instance still runs, was not
    /// restarted, and passes its Consul checks; done once the soak is over.
    async fn soak(&mut self, k: usize) -> Result<(), ControlError> {
        let Some(mut client) = self.client(k).await? else {
            return Ok(());
        };
        let spec = self.d.spec.clone();
        let instances = match quick(client.status(pb::StatusRequest {
            service: spec.service.clone(),
        }))
        .await
        {
            Answer::Ok(s) => s.instances,
            Answer::Away(why) => return self.away(k, why).await,
            Answer::Refused(s) => {
                let reason = format!("its deployer refused Status: {}", s.message());
                return self.rolling_back(k, reason).await;
            }
        };
        let n = self.d.nodes[k].clone();
        let instance = instances
            .iter()
            .find(|i| i.instance_id == n.instance_id)
            .or_else(|| instances.iter().find(|i| i.version == spec.version));
        let health = match instance {
            Some(i) => {
                self.control
                    .instance_health(&spec.service, &i.instance_id)
                    .await?
            }
            None => None,
        };
        let now = now_ms();
        let verdict = soak_verdict(
            instance,
            health
                .as_ref()
                .map(|h| (h.status.as_str(), h.output.as_str())),
            n.soak_restarts,
            now.saturating_sub(n.soak_started_at_ms),
            spec.soak_ms,
        );
        match verdict {
            Soak::Fail(why) => {
                tracing::warn!(node = %n.node, %why, "soak failed");
                self.rolling_back(k, why).await
            }
            Soak::Pass => {
                self.d.nodes[k].unreachable_since_ms = 0;
                self.d.set_node(
                    k,
                    NodeState::Done,
                    format!("runs version {}, healthy through its soak", spec.version),
                    now,
                );
                if let Flow::Go = self.save().await?
                    && self.d.finish_if_done(now)
                {
                    self.save().await?;
                    tracing::info!(id = self.d.id, "deployment succeeded");
                }
                Ok(())
            }
            Soak::Wait(what) => {
                let n = &mut self.d.nodes[k];
                if n.detail != what || n.unreachable_since_ms != 0 {
                    n.detail = what;
                    n.unreachable_since_ms = 0;
                    self.save().await?;
                }
                Ok(())
            }
        }
    }

    /// The soak failed: the node goes back to the version it ran.
    async fn rolling_back(&mut self, k: usize, reason: String) -> Result<(), ControlError> {
        let node = self.d.nodes[k].node.clone();
        let now = now_ms();
        self.d.reason = format!("{node}: {reason}");
        self.d.set_node(k, NodeState::RollingBack, reason, now);
        if let Flow::Go = self.save().await? {
            self.roll_back(k).await?;
        }
        Ok(())
    }

    /// Puts the version the node ran back (a deploy of it), or stops the
    /// service when it ran none; then the deployment halts.
    async fn roll_back(&mut self, k: usize) -> Result<(), ControlError> {
        let Some(mut client) = self.client(k).await? else {
            return Ok(());
        };
        let spec = self.d.spec.clone();
        let from = self.d.nodes[k].from_version.clone().unwrap_or_default();
        let why = self.d.nodes[k].detail.clone();
        if from.is_empty() {
            let stop = pb::StopRequest {
                service: spec.service.clone(),
                stop_grace_ms: 0,
            };
            return match call(QUICK_CALL + QUICK_CALL, client.stop(stop)).await {
                Answer::Ok(_) => {
                    let detail =
                        format!("it ran no version before: stopped {}; {why}", spec.version);
                    self.fail_node(k, NodeState::RolledBack, detail).await
                }
                Answer::Away(e) => self.away(k, e).await,
                Answer::Refused(s) => {
                    let detail =
                        format!("stopping {} failed: {}; {why}", spec.version, s.message());
                    self.fail_node(k, NodeState::Failed, detail).await
                }
            };
        }
        let instances = match quick(client.status(pb::StatusRequest {
            service: spec.service.clone(),
        }))
        .await
        {
            Answer::Ok(s) => s.instances,
            Answer::Away(e) => return self.away(k, e).await,
            Answer::Refused(_) => Vec::new(),
        };
        let back = instances
            .iter()
            .any(|i| i.version == from && i.state == "running")
            && !instances.iter().any(|i| i.version == spec.version);
        if back {
            let detail = format!("back on version {from}; {why}");
            return self.fail_node(k, NodeState::RolledBack, detail).await;
        }
        let address = self.control.node_address(&self.d.nodes[k].node).await?;
        let request = deploy_request(&spec, &from, address);
        let limit = Duration::from_millis(spec.health_timeout_ms + spec.drain_ms) + DEPLOY_SLACK;
        match call(limit, client.deploy(request)).await {
            Answer::Ok(_) => {
                let detail = format!("back on version {from}; {why}");
                self.fail_node(k, NodeState::RolledBack, detail).await
            }
            Answer::Away(e) => self.away(k, e).await,
            Answer::Refused(s) => {
                let detail = format!("putting back version {from} failed: {}; {why}", s.message());
                self.fail_node(k, NodeState::Failed, detail).await
            }
        }
    }

    /// The deployment ended (aborted) while node `k` was under way:
    /// record where the node is now.
    async fn settle(&mut self, k: usize) -> Result<(), ControlError> {
        match self.d.nodes[k].state {
            NodeState::Uploading => {
                self.d.set_node(
                    k,
                    NodeState::Skipped,
                    "the deployment was aborted during its upload",
                    now_ms(),
                );
                self.save().await?;
                Ok(())
            }
            NodeState::Deploying | NodeState::Soaking => {
                let Some(mut client) = self.client(k).await? else {
                    return Ok(());
                };
                let spec = self.d.spec.clone();
                let instances = match quick(client.status(pb::StatusRequest {
                    service: spec.service.clone(),
                }))
                .await
                {
                    Answer::Ok(s) => s.instances,
                    Answer::Away(e) => return self.away(k, e).await,
                    Answer::Refused(_) => Vec::new(),
                };
                let from = self.d.nodes[k].from_version.clone().unwrap_or_default();
                let (state, detail) = if instances
                    .iter()
                    .any(|i| i.version == spec.version && i.state == "running")
                {
                    (
                        NodeState::Done,
                        format!(
                            "runs version {}; the deployment was aborted before its soak ended",
                            spec.version
                        ),
                    )
                } else if !from.is_empty()
                    && instances
                        .iter()
                        .any(|i| i.version == from && i.state == "running")
                {
                    (
                        NodeState::RolledBack,
                        format!("still on version {from}; the deployment was aborted"),
                    )
                } else {
                    (
                        NodeState::Failed,
                        "the deployment was aborted during its deploy".to_owned(),
                    )
                };
                self.d.set_node(k, state, detail, now_ms());
                self.save().await?;
                Ok(())
            }
            NodeState::RollingBack => self.roll_back(k).await,
            _ => Ok(()),
        }
    }
}

/// What a soak check says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Soak {
    /// Not over yet; what it waits for.
    Wait(String),
    /// Healthy through the soak.
    Pass,
    /// Why it failed.
    Fail(String),
}

/// The soak of the new `instance` (as the deployer shows it; `None`: it
/// runs none), with its Consul health (status and output; `None`: not
/// registered), its restarts when the soak started, and how long it has
/// soaked of `soak_ms`.
pub fn soak_verdict(
    instance: Option<&pb::Instance>,
    health: Option<(&str, &str)>,
    restarts_at_start: u32,
    soaked_ms: u64,
    soak_ms: u64,
) -> Soak {
    let Some(i) = instance else {
        return Soak::Fail("the new instance no longer runs".into());
    };
    if i.restarts > restarts_at_start {
        return Soak::Fail(format!(
            "{} was restarted during its soak ({} restarts, {} when it started)",
            i.instance_id, i.restarts, restarts_at_start
        ));
    }
    match i.state.as_str() {
        "running" => {}
        "restarting" => {
            return Soak::Fail(format!(
                "{} ended during its soak and is restarting",
                i.instance_id
            ));
        }
        state => return Soak::Fail(format!("{} is {state}", i.instance_id)),
    }
    if let Some(("critical", output)) = health {
        return Soak::Fail(format!(
            "{}'s health check is critical in Consul: {output}",
            i.instance_id
        ));
    }
    let passing = matches!(health, Some(("passing", _)));
    if soaked_ms >= soak_ms {
        if passing {
            return Soak::Pass;
        }
        if soaked_ms >= soak_ms + REGISTER_GRACE_MS {
            return Soak::Fail(match health {
                None => format!("{} is not registered in Consul", i.instance_id),
                Some((status, output)) => {
                    format!("{}'s health is {status} in Consul: {output}", i.instance_id)
                }
            });
        }
        return Soak::Wait(format!(
            "waiting for {} to pass its checks in Consul",
            i.instance_id
        ));
    }
    let left = (soak_ms - soaked_ms).div_ceil(1000);
    Soak::Wait(format!("{} soaking, {left} s left", i.instance_id))
}

/// The version the deployer runs for the service: a running instance's,
/// else any instance's; `None` when it runs none.
pub fn running_version(instances: &[pb::Instance]) -> Option<String> {
    instances
        .iter()
        .find(|i| i.state == "running")
        .or_else(|| instances.first())
        .map(|i| i.version.clone())
}

/// Whether a deployer's status means "not now" rather than "no".
pub fn is_away(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
    )
}

/// Whether an INTERNAL status is the connection breaking (tonic says so
/// for HTTP/2 errors) rather than the deployer's answer.
fn is_cut(status: &Status) -> bool {
    status.code() == Code::Internal
        && [
            "h2 protocol error",
            "transport error",
            "connection reset",
            "broken pipe",
        ]
        .iter()
        .any(|m| status.message().to_ascii_lowercase().contains(m))
}

/// A quick deployer call, bounded by [`QUICK_CALL`].
async fn quick<T>(call_fut: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Answer<T> {
    call(QUICK_CALL, call_fut).await
}

/// A deployer call bounded by `limit`, sorted by what to do about it.
async fn call<T>(
    limit: Duration,
    call_fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Answer<T> {
    match tokio::time::timeout(limit, call_fut).await {
        Err(_) => Answer::Away(format!("no answer within {} s", limit.as_secs())),
        Ok(Ok(r)) => Answer::Ok(r.into_inner()),
        Ok(Err(s)) if is_away(s.code()) || is_cut(&s) => Answer::Away(if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_owned()
        }),
        Ok(Err(s)) => Answer::Refused(s),
    }
}

/// What a node's deployer is asked to deploy: `version` of the spec's
/// service with its settings, listening on and registered with `address`
/// (the node's address in Consul's catalog, so that other nodes' proxies
/// reach the instance too).
fn deploy_request(spec: &super::DeploySpec, version: &str, address: String) -> pb::DeployRequest {
    pb::DeployRequest {
        service: spec.service.clone(),
        version: version.to_owned(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        work_dir: String::new(),
        health_path: spec.health_path.clone(),
        health_timeout_ms: spec.health_timeout_ms,
        drain_ms: spec.drain_ms,
        stop_grace_ms: 0,
        tags: spec.tags.clone(),
        address,
    }
}

/// The artifact's chunks from KV as upload messages, from `offset`. A KV
/// read that fails ends the stream and is noted in `failed`.
fn chunk_stream(
    store: Store,
    service: String,
    version: String,
    meta: super::ArtifactMeta,
    offset: u64,
    failed: Arc<Mutex<Option<String>>>,
) -> impl futures::Stream<Item = pb::UploadChunk> + Send + 'static {
    let chunk_size = meta.chunk_size.max(1);
    let first = offset / chunk_size;
    let skip = (offset % chunk_size) as usize;
    futures::stream::unfold(first, move |n| {
        let (store, service, version, failed) = (
            store.clone(),
            service.clone(),
            version.clone(),
            failed.clone(),
        );
        async move {
            if n >= meta.chunks {
                return None;
            }
            match store.chunk(&service, &version, n).await {
                Ok(mut data) => {
                    if n == first && skip > 0 {
                        data.drain(..skip.min(data.len()));
                    }
                    Some((pb::UploadChunk { start: None, data }, n + 1))
                }
                Err(e) => {
                    if let Ok(mut f) = failed.lock() {
                        *f = Some(e.to_string());
                    }
                    None
                }
            }
        }
    })
}
