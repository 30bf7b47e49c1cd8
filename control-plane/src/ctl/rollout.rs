//! `meshctl routes stage` and `meshctl rollout …`.

use std::{fmt::Write as _, time::Duration};

use mesh_proto::v1 as pb;

use super::{Ctl, CtlError, read_route_file, table};
use crate::{
    control::{RolloutView, Staged, StagedNode},
    grpc::routes_pb,
};

/// How often `rollout status --watch` asks.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The exit code of `rollout status --watch` when the rollout aborted.
pub const ABORTED_EXIT: i32 = 2;

/// `meshctl routes stage` input.
#[derive(Clone, Debug)]
pub struct StageArgs {
    /// The nodes, in rollout order.
    pub nodes: Vec<String>,
    /// The route file.
    pub file: std::path::PathBuf,
    /// Who stages it.
    pub author: String,
}

/// `meshctl rollout start` input.
#[derive(Clone, Debug, Default)]
pub struct StartArgs {
    /// The staged version.
    pub version: u64,
    /// Who starts it.
    pub author: String,
    /// Canary nodes.
    pub canary: Option<u32>,
    /// Nodes per later step.
    pub batch: Option<u32>,
    /// Soak per step.
    pub soak: Option<Duration>,
    /// Acknowledgement deadline.
    pub ack_timeout: Option<Duration>,
}

// === impl Ctl ===

impl Ctl {
    /// `meshctl routes stage -f FILE --node A --node B`.
    pub async fn routes_stage(&mut self, args: StageArgs) -> Result<String, CtlError> {
        let routes = read_route_file(&args.file)?;
        let request = pb::StageVersionRequest {
            nodes: args.nodes,
            routes: routes_pb(routes),
            author: args.author,
        };
        let r = self
            .call(|mut c| async move { c.stage_version(request).await })
            .await?;
        let staged = Staged {
            version: r.version,
            nodes: r
                .nodes
                .into_iter()
                .map(|n| StagedNode {
                    node: n.node,
                    from: n.from,
                    diff: n.diff,
                })
                .collect(),
        };
        Ok(self.print(&staged, |s| {
            let mut text = format!(
                "staged config version {} on {} node(s); roll it out with `meshctl rollout start --version {}`\n",
                s.version,
                s.nodes.len(),
                s.version
            );
            for n in &s.nodes {
                let _ = writeln!(text, "\n{}: version {} -> {}", n.node, n.from, s.version);
                text.push_str(&n.diff);
            }
            text
        }))
    }

    /// `meshctl rollout start --version V …`.
    pub async fn rollout_start(&mut self, args: StartArgs) -> Result<String, CtlError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let request = pb::StartRolloutRequest {
            version: args.version,
            author: args.author,
            canary: args.canary,
            batch: args.batch,
            soak_ms: args.soak.map(ms),
            ack_timeout_ms: args.ack_timeout.map(ms),
        };
        let r = self
            .call(|mut c| async move { c.start_rollout(request).await })
            .await?;
        let view = RolloutView::from(r);
        Ok(self.print(&view, rollout_text))
    }

    /// `meshctl rollout status [V]`.
    pub async fn rollout_status(&mut self, version: u64) -> Result<String, CtlError> {
        let view = self.rollout(version).await?;
        Ok(self.print(&view, rollout_text))
    }

    /// `meshctl rollouts`: every rollout, newest first.
    pub async fn rollout_list(&mut self) -> Result<String, CtlError> {
        let r = self
            .call(|mut c| async move { c.list_rollouts(pb::ListRolloutsRequest {}).await })
            .await?;
        let all: Vec<RolloutView> = r.rollouts.into_iter().map(RolloutView::from).collect();
        Ok(self.print(&all, |all| rollouts_table(all)))
    }

    /// `meshctl rollout status [V] --watch`: prints the history as it
    /// grows until the rollout ends; an aborted one is an error (exit 2).
    pub async fn rollout_watch(
        &mut self,
        version: u64,
        mut out: impl FnMut(&str),
    ) -> Result<String, CtlError> {
        let mut view = self.rollout(version).await?;
        let version = view.version;
        let mut shown = 0;
        loop {
            match self.output {
                super::Output::Json => {}
                super::Output::Table => {
                    for e in view.events.iter().skip(shown) {
                        out(&format!("{}  {}\n", e.at, e.text));
                    }
                    shown = view.events.len();
                }
            }
            if matches!(view.state.as_str(), "succeeded" | "aborted") {
                break;
            }
            tokio::time::sleep(WATCH_EVERY).await;
            view = self.rollout(version).await?;
        }
        let text = self.print(&view, rollout_text);
        if view.state == "aborted" {
            out(&text);
            return Err(CtlError::new(
                format!("the rollout of version {version} aborted: {}", view.reason),
                ABORTED_EXIT,
            ));
        }
        Ok(text)
    }

    /// `meshctl rollout pause|resume|abort [V]`.
    pub async fn rollout_change(
        &mut self,
        version: u64,
        action: &str,
        author: String,
    ) -> Result<String, CtlError> {
        let request = pb::ChangeRolloutRequest {
            version,
            action: action.to_owned(),
            author,
        };
        let r = self
            .call(|mut c| async move { c.change_rollout(request).await })
            .await?;
        let view = RolloutView::from(r);
        Ok(self.print(&view, rollout_text))
    }

    async fn rollout(&mut self, version: u64) -> Result<RolloutView, CtlError> {
        let r = self
            .call(|mut c| async move { c.get_rollout(pb::GetRolloutRequest { version }).await })
            .await?;
        Ok(RolloutView::from(r))
    }
}

/// A rollout in words: its state, its nodes and its history.
pub fn rollout_text(r: &RolloutView) -> String {
    let mut text = format!(
        "rollout of version {}: {} ({} of {} nodes done",
        r.version,
        r.state,
        r.done,
        r.nodes.len()
    );
    if r.step <= r.steps {
        let _ = write!(text, ", step {} of {}", r.step, r.steps);
    }
    text.push(')');
    if !r.reason.is_empty() {
        let _ = write!(text, ": {}", r.reason);
    }
    let _ = writeln!(
        text,
        "\nstarted by {} at {}; canary {}, batch {}, soak {} s, ack timeout {} s",
        r.author,
        r.created_at,
        r.canary,
        r.batch,
        r.soak_ms / 1000,
        r.ack_timeout_ms / 1000
    );
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.step.to_string(),
                n.node.clone(),
                format!("{} -> {}", n.from, r.version),
                n.state.clone(),
                n.detail.clone(),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["STEP", "NODE", "VERSION", "STATE", "DETAIL"],
        &rows,
    ));
    if !r.events.is_empty() {
        text.push_str("\nhistory:\n");
        for e in &r.events {
            let _ = writeln!(text, "  {}  {}", e.at, e.text);
        }
    }
    text
}

fn rollouts_table(all: &[RolloutView]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|r| {
            vec![
                r.version.to_string(),
                r.state.clone(),
                format!("{}/{}", r.done, r.nodes.len()),
                r.author.clone(),
                r.created_at.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    table(
        &["VERSION", "STATE", "DONE", "AUTHOR", "STARTED", "REASON"],
        &rows,
    )
}
