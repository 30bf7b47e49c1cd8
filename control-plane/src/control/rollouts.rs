//! Staging a version on many nodes and rolling it out: the calls. The
//! leader's [`crate::rollout::driver`] takes the steps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Control, check_author, next_version, unknown_node};
use crate::{
    error::ControlError,
    model::{self, RouteSpec, check_node_name, now_ms, rfc3339},
    rollout::{Rollout, RolloutOptions, RolloutState},
    store::{Current, Store},
};

/// The most nodes one version is staged on.
pub const MAX_STAGE_NODES: usize = 1000;

/// How often a pause, resume or abort is tried again when the leader
/// wrote the record in between.
const ACTION_TRIES: usize = 8;

/// A version to stage on many nodes: the same routes for each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageVersion {
    /// The nodes, in the order a rollout reaches them.
    pub nodes: Vec<String>,
    /// The whole new route set, by service name.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteSpec>,
    /// Who stages it.
    pub author: String,
}

/// A staged version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// Its number, the same on every node.
    pub version: u64,
    /// Per node, the version it is on now, which the new one is based on.
    pub nodes: Vec<StagedNode>,
}

/// One node of a staged version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedNode {
    /// The node.
    pub node: String,
    /// The version it is on.
    pub from: u64,
    /// Unified diff of the new version's proxy config against it.
    pub diff: String,
}

/// A rollout to start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRollout {
    /// The staged version.
    pub version: u64,
    /// Who starts it.
    pub author: String,
    /// Nodes in the first step; `None`: 1.
    #[serde(default)]
    pub canary: Option<u32>,
    /// Nodes per later step; `None`: 1.
    #[serde(default)]
    pub batch: Option<u32>,
    /// Soak time per step, in milliseconds; `None`: 30 s.
    #[serde(default)]
    pub soak_ms: Option<u64>,
    /// How long a proxy may take to acknowledge; `None`: 30 s.
    #[serde(default)]
    pub ack_timeout_ms: Option<u64>,
}

/// What to do with a rollout under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    /// Start no new step.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Put every node it moved back, and end it.
    Abort,
}

/// A rollout as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The version rolled out.
    pub version: u64,
    /// Who started it.
    pub author: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
    /// running, paused, succeeded, aborting or aborted.
    pub state: String,
    /// Why it paused or aborted; empty otherwise.
    pub reason: String,
    /// The step under way, from 1; `steps` + 1 once all are done.
    pub step: u32,
    /// How many steps.
    pub steps: u32,
    /// Nodes done.
    pub done: u32,
    /// Canary nodes, batch size, soak and ack timeout.
    pub canary: u32,
    /// Nodes per later step.
    pub batch: u32,
    /// Soak per step, in milliseconds.
    pub soak_ms: u64,
    /// Acknowledgement deadline, in milliseconds.
    pub ack_timeout_ms: u64,
    /// Every node, in step order.
    pub nodes: Vec<RolloutNodeView>,
    /// What happened, oldest first.
    pub events: Vec<RolloutEventView>,
    /// The replica that drives it.
    pub driver: String,
}

/// One node of a rollout as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutNodeView {
    /// The node.
    pub node: String,
    /// Its step, from 1.
    pub step: u32,
    /// The version it was on.
    pub from: u64,
    /// pending, pushing, gating, done, reverting or reverted.
    pub state: String,
    /// What is going on, or what went wrong.
    pub detail: String,
    /// When it was pushed (RFC 3339); empty: not yet.
    pub pushed_at: String,
    /// When its proxy acknowledged (RFC 3339); empty: not yet.
    pub acked_at: String,
}

/// A line of a rollout's history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEventView {
    /// When (RFC 3339).
    pub at: String,
    /// What happened.
    pub text: String,
}

// === impl Control ===

impl Control {
    /// Validates `stage` and stores its routes as one new version of every
    /// node it names, current on none of them yet.
    pub async fn stage_version(&self, stage: StageVersion) -> Result<Staged, ControlError> {
        let author = check_author(&stage.author)?;
        if stage.nodes.is_empty() {
            return Err(ControlError::invalid("nodes", "name at least one node"));
        }
        if stage.nodes.len() > MAX_STAGE_NODES {
            return Err(ControlError::invalid(
                "nodes",
                format!("at most {MAX_STAGE_NODES} nodes per version"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for node in &stage.nodes {
            check_node_name(node).map_err(|m| ControlError::invalid("nodes", m))?;
            if !seen.insert(node.as_str()) {
                return Err(ControlError::invalid(
                    "nodes",
                    format!("node {node:?} is named twice"),
                ));
            }
        }
        let catalog = self.catalog().await?;
        if let Some(node) = stage.nodes.iter().find(|n| !catalog.nodes.contains(*n)) {
            return Err(unknown_node(node));
        }
        let routes = model::validate(&stage.routes, &catalog).map_err(ControlError::Invalid)?;
        let mut nodes = Vec::with_capacity(stage.nodes.len());
        for node in &stage.nodes {
            let current = self.store.current(node).await?;
            if current.version.is_none() {
                return Err(ControlError::Refused(format!(
                    "node {node:?} has no routes yet: give it its first version with `meshctl routes set` before staging one"
                )));
            }
            nodes.push((node.clone(), current));
        }
        let release = self
            .store
            .stage(&author, &nodes, |node, number, previous| {
                next_version(node, number, previous, author.clone(), routes.clone())
            })
            .await?;
        tracing::info!(
            version = release.version, author = %author, nodes = release.nodes.len(),
            "staged a config version"
        );
        let mut out = Vec::with_capacity(nodes.len());
        for (node, current) in &nodes {
            let diff = self
                .store
                .version(node, release.version)
                .await?
                .map(|v| v.diff)
                .unwrap_or_default();
            out.push(StagedNode {
                node: node.clone(),
                from: current.version.as_ref().map_or(0, |v| v.number),
                diff,
            });
        }
        Ok(Staged {
            version: release.version,
            nodes: out,
        })
    }

    /// Starts rolling out staged version `start.version`, if no rollout is
    /// under way and every node is still on the version it was staged on.
    pub async fn start_rollout(&self, start: StartRollout) -> Result<RolloutView, ControlError> {
        let author = check_author(&start.author)?;
        let defaults = RolloutOptions::default();
        let options = RolloutOptions {
            canary: start.canary.unwrap_or(defaults.canary),
            batch: start.batch.unwrap_or(defaults.batch),
            soak_ms: start.soak_ms.unwrap_or(defaults.soak_ms),
            ack_timeout_ms: start.ack_timeout_ms.unwrap_or(defaults.ack_timeout_ms),
            ..defaults
        };
        options
            .check()
            .map_err(|(field, message)| ControlError::invalid(field, message))?;
        if start.version == 0 {
            return Err(ControlError::invalid("version", "name a staged version"));
        }
        let Some(release) = self.store.release(start.version).await? else {
            return Err(ControlError::NotFound(format!(
                "version {} was not staged on any nodes (stage it with `meshctl routes stage`)",
                start.version
            )));
        };
        if let Some((old, _)) = self.store.rollout(start.version).await? {
            return Err(ControlError::Refused(format!(
                "version {} was rolled out already ({}); stage a new version",
                start.version,
                old.state.as_str()
            )));
        }
        let (active, active_revision) = self.store.active_rollout().await?;
        if active != 0 {
            return Err(ControlError::Refused(format!(
                "the rollout of version {active} is under way: wait for it, or pause or abort it"
            )));
        }
        let mut from = Vec::with_capacity(release.nodes.len());
        for node in &release.nodes {
            let staged = self
                .store
                .version(node, release.version)
                .await?
                .ok_or_else(|| {
                    ControlError::Internal(format!(
                        "version {} of node {node} is missing although it was staged",
                        release.version
                    ))
                })?;
            let current = self.store.current(node).await?;
            let on = current_number(&current);
            if on != staged.previous_number() {
                return Err(ControlError::Refused(format!(
                    "node {node} is on version {on}, but version {} was staged on version {}: stage it again",
                    release.version,
                    staged.previous_number()
                )));
            }
            from.push((node.clone(), on));
        }
        let rollout = Rollout::new(release.version, author, options, &from, now_ms());
        if !self.store.start_rollout(&rollout, active_revision).await? {
            let (active, _) = self.store.active_rollout().await?;
            return Err(ControlError::Refused(format!(
                "another rollout started at the same time (version {active}); nothing was started"
            )));
        }
        tracing::info!(version = rollout.version, author = %rollout.author, nodes = rollout.nodes.len(), "rollout started");
        Ok((&rollout).into())
    }

    /// The rollout of `version`; 0: the one under way, or else the newest.
    pub async fn rollout(&self, version: u64) -> Result<RolloutView, ControlError> {
        let version = match version {
            0 => self.latest_rollout().await?,
            v => v,
        };
        match self.store.rollout(version).await? {
            Some((r, _)) => Ok((&r).into()),
            None => Err(ControlError::NotFound(format!(
                "there is no rollout of version {version}"
            ))),
        }
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<Vec<RolloutView>, ControlError> {
        Ok(self
            .store
            .rollouts()
            .await?
            .iter()
            .map(RolloutView::from)
            .collect())
    }

    /// Pauses, resumes or aborts the rollout of `version` (0: the one under
    /// way).
    pub async fn rollout_action(
        &self,
        version: u64,
        action: RolloutAction,
        author: &str,
    ) -> Result<RolloutView, ControlError> {
        let author = check_author(author)?;
        let version = match version {
            0 => match self.store.active_rollout().await?.0 {
                0 => {
                    return Err(ControlError::Refused("no rollout is under way".to_owned()));
                }
                v => v,
            },
            v => v,
        };
        for _ in 0..ACTION_TRIES {
            let Some((mut rollout, revision)) = self.store.rollout(version).await? else {
                return Err(ControlError::NotFound(format!(
                    "there is no rollout of version {version}"
                )));
            };
            let now = now_ms();
            let state = rollout.state;
            match (action, state) {
                (RolloutAction::Pause, RolloutState::Running) => {
                    rollout.state = RolloutState::Paused;
                    rollout.reason = format!("paused by {author}");
                    rollout.event(now, format!("paused by {author}"));
                }
                (RolloutAction::Resume, RolloutState::Paused) => {
                    rollout.state = RolloutState::Running;
                    rollout.reason.clear();
                    rollout.event(now, format!("resumed by {author}"));
                }
                (RolloutAction::Abort, RolloutState::Running | RolloutState::Paused) => {
                    rollout.abort(now, format!("aborted by {author}"));
                }
                (RolloutAction::Pause, RolloutState::Paused)
                | (RolloutAction::Resume, RolloutState::Running)
                | (RolloutAction::Abort, RolloutState::Aborting | RolloutState::Aborted) => {
                    return Ok((&rollout).into());
                }
                _ => {
                    return Err(ControlError::Refused(format!(
                        "the rollout of version {version} is {}: it cannot {}",
                        state.as_str(),
                        match action {
                            RolloutAction::Pause => "pause",
                            RolloutAction::Resume => "resume",
                            RolloutAction::Abort => "abort",
                        }
                    )));
                }
            }
            if self.store.save_rollout(&rollout, revision).await?.is_some() {
                tracing::info!(version, ?action, author = %author, "rollout changed");
                return Ok((&rollout).into());
            }
        }
        Err(ControlError::Unavailable(format!(
            "the rollout of version {version} changed too often to be written; try again"
        )))
    }

    /// The version of the rollout under way, or else of the newest one.
    async fn latest_rollout(&self) -> Result<u64, ControlError> {
        let (active, _) = self.store.active_rollout().await?;
        if active != 0 {
            return Ok(active);
        }
        self.store
            .rollouts()
            .await?
            .first()
            .map(|r| r.version)
            .ok_or_else(|| ControlError::NotFound("there are no rollouts yet".to_owned()))
    }

    /// The store, for the rollout driver.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }
}

/// The version a node is on; 0: none.
pub fn current_number(current: &Current) -> u64 {
    current.version.as_ref().map_or(0, |v| v.number)
}

// === impl RolloutView ===

impl From<&Rollout> for RolloutView {
    fn from(r: &Rollout) -> Self {
        let step_of = |node: &str| {
            r.steps
                .iter()
                .position(|s| s.iter().any(|n| n == node))
                .map_or(0, |k| k as u32 + 1)
        };
        let time = |ms: u64| if ms == 0 { String::new() } else { rfc3339(ms) };
        Self {
            version: r.version,
            author: r.author.clone(),
            created_at: rfc3339(r.created_at_ms),
            updated_at: rfc3339(r.updated_at_ms),
            state: r.state.as_str().to_owned(),
            reason: r.reason.clone(),
            step: r.step as u32 + 1,
            steps: r.steps.len() as u32,
            done: r.progress().0 as u32,
            canary: r.options.canary,
            batch: r.options.batch,
            soak_ms: r.options.soak_ms,
            ack_timeout_ms: r.options.ack_timeout_ms,
            nodes: r
                .nodes
                .iter()
                .map(|n| RolloutNodeView {
                    step: step_of(&n.node),
                    node: n.node.clone(),
                    from: n.from,
                    state: n.state.as_str().to_owned(),
                    detail: n.detail.clone(),
                    pushed_at: time(n.pushed_at_ms),
                    acked_at: time(n.acked_at_ms),
                })
                .collect(),
            events: r
                .events
                .iter()
                .map(|e| RolloutEventView {
                    at: rfc3339(e.at_ms),
                    text: e.text.clone(),
                })
                .collect(),
            driver: r.driver.clone(),
        }
    }
}
