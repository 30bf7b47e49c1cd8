//! `meshctl deploy …`: rolling deployments of an artifact (a jar) to the
//! nodes' mesh-deployers, one node at a time, through mesh-control.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use mesh_proto::v1::{self as pb, control_client::ControlClient};
use mesh_runtime::duration::HumanDuration;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;
use tonic::transport::Endpoint;

use super::{CONNECT_TIMEOUT, Ctl, CtlError, Output, table};
use crate::{
    control::{DeploymentView, NodeDeploymentsView, error_chain},
    deploy::DEFAULT_COMMAND,
};

/// The bytes per Deploy message.
pub const UPLOAD_CHUNK: usize = 64 << 10;

/// How often `deploy status --watch` asks.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The exit code of a watched deployment that halted or was aborted.
pub const FAILED_EXIT: i32 = 1;

/// The exit code of bad input.
const BAD_INPUT: i32 = 65;

/// `meshctl deploy` input, as typed (checked by [`DeployArgs::check`]).
#[derive(Clone, Debug, Default)]
pub struct DeployArgs {
    /// The service.
    pub service: Option<String>,
    /// The artifact's path.
    pub artifact: Option<PathBuf>,
    /// Its version.
    pub version: Option<String>,
    /// The nodes, in order (comma-separated lists allowed).
    pub nodes: Vec<String>,
    /// The command [default: [`DEFAULT_COMMAND`]].
    pub command: Option<String>,
    /// `K=V` environment entries.
    pub env: Vec<String>,
    /// Registration tags.
    pub tags: Vec<String>,
    /// The health path.
    pub health_path: Option<String>,
    /// The health timeout, e.g. `60s`.
    pub health_timeout: Option<String>,
    /// The drain, e.g. `5s`.
    pub drain: Option<String>,
    /// The soak per node, e.g. `10s`.
    pub soak: Option<String>,
    /// Who deploys.
    pub author: String,
}

/// A checked `meshctl deploy`: the start message and the file.
#[derive(Clone, Debug)]
pub struct DeployPlan {
    /// What mesh-control is told first.
    pub start: pb::DeployStart,
    /// The artifact.
    pub path: PathBuf,
}

// === impl DeployArgs ===

impl DeployArgs {
    /// Checks the flags and reads the artifact's size and SHA-256; bad
    /// input is one line naming the flag (exit 65).
    pub async fn check(self) -> Result<DeployPlan, CtlError> {
        let need = |v: Option<String>, flag: &str, what: &str| {
            v.filter(|s| !s.trim().is_empty())
                .ok_or_else(|| CtlError::new(format!("--{flag} is required: {what}"), BAD_INPUT))
        };
        let service = need(self.service, "service", "the service to deploy")?;
        let version = need(
            self.version,
            "version",
            "the artifact's version, e.g. 2.4.1",
        )?;
        let path = self
            .artifact
            .ok_or_else(|| CtlError::new("--artifact is required: the jar to deploy", BAD_INPUT))?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                CtlError::new(
                    format!("--artifact: {} has no file name", path.display()),
                    BAD_INPUT,
                )
            })?
            .to_owned();
        let env = parse_env(&self.env)?;
        let ms = |flag: &str, v: Option<String>| -> Result<u64, CtlError> {
            match v {
                None => Ok(0),
                Some(text) => text
                    .parse::<HumanDuration>()
                    .map(|d| u64::try_from(d.get().as_millis()).unwrap_or(u64::MAX))
                    .map_err(|e| CtlError::new(format!("--{flag}: {text:?}: {e}"), BAD_INPUT)),
            }
        };
        let health_timeout_ms = ms("health-timeout", self.health_timeout)?;
        let drain_ms = ms("drain", self.drain)?;
        let soak_ms = ms("soak", self.soak)?;
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        let (size, sha256) = digest(&path).await?;
        Ok(DeployPlan {
            start: pb::DeployStart {
                service,
                version,
                file_name,
                size,
                sha256,
                nodes,
                strategy: "rolling".to_owned(),
                command: self
                    .command
                    .filter(|c| !c.trim().is_empty())
                    .unwrap_or_else(|| DEFAULT_COMMAND.to_owned()),
                env: env.into_iter().collect(),
                health_path: self.health_path.unwrap_or_default(),
                health_timeout_ms,
                drain_ms,
                soak_ms,
                tags: self.tags,
                author: self.author,
            },
            path,
        })
    }
}

/// `K=V` entries as a map; a bad one names itself.
pub fn parse_env(entries: &[String]) -> Result<BTreeMap<String, String>, CtlError> {
    let mut env = BTreeMap::new();
    for entry in entries {
        match entry.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                env.insert(k.trim().to_owned(), v.to_owned());
            }
            _ => {
                return Err(CtlError::new(
                    format!("--env: {entry:?} is not KEY=VALUE"),
                    BAD_INPUT,
                ));
            }
        }
    }
    Ok(env)
}

/// The file's size and SHA-256 (lowercase hex).
pub async fn digest(path: &Path) -> Result<(u64, String), CtlError> {
    let unreadable = |e: std::io::Error| {
        CtlError::new(format!("--artifact: {}: {e}", path.display()), BAD_INPUT)
    };
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    if !file.metadata().await.map_err(unreadable)?.is_file() {
        return Err(CtlError::new(
            format!("--artifact: {} is not a file", path.display()),
            BAD_INPUT,
        ));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; UPLOAD_CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(unreadable)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    if size == 0 {
        return Err(CtlError::new(
            format!("--artifact: {} is empty", path.display()),
            BAD_INPUT,
        ));
    }
    Ok((size, hex::encode(hasher.finalize())))
}

// === impl Ctl ===

impl Ctl {
    /// `meshctl deploy --service S --artifact PATH --version V …`:
    /// streams the artifact and starts the deployment; with `watch`,
    /// follows it like `deploy status --watch`.
    pub async fn deploy(
        &mut self,
        plan: DeployPlan,
        watch: bool,
        out: impl FnMut(&str),
    ) -> Result<String, CtlError> {
        // No call timeout: a large artifact takes as long as it takes.
        let channel = Endpoint::from_shared(self.addr.clone())
            .map_err(|e| CtlError::new(format!("control_addr: {e}"), 64))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| {
                CtlError::new(
                    format!(
                        "cannot reach mesh-control at {}: {}",
                        self.addr,
                        error_chain(&e)
                    ),
                    69,
                )
            })?;
        let file = tokio::fs::File::open(&plan.path).await.map_err(|e| {
            CtlError::new(
                format!("--artifact: {}: {e}", plan.path.display()),
                BAD_INPUT,
            )
        })?;
        let first = pb::DeployChunk {
            start: Some(plan.start),
            data: Vec::new(),
        };
        let data = futures::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            match file.read(&mut buf).await {
                Ok(0) | Err(_) => None, // mesh-control reports a short stream
                Ok(n) => {
                    buf.truncate(n);
                    Some((
                        pb::DeployChunk {
                            start: None,
                            data: buf,
                        },
                        Some(file),
                    ))
                }
            }
        });
        let messages = futures::stream::once(async { first }).chain(data);
        let mut client = ControlClient::with_interceptor(channel, self.api_token())
            .max_encoding_message_size(UPLOAD_CHUNK * 2);
        let view = client
            .deploy(messages)
            .await
            .map(|r| DeploymentView::from(r.into_inner()))
            .map_err(|s| CtlError::from_status(&s))?;
        if watch {
            return self.deploy_watch(view.id, "", out).await;
        }
        Ok(self.print(&view, deployment_text))
    }

    /// `meshctl deploy status [ID] [--service S]`.
    pub async fn deploy_status(&mut self, id: u64, service: &str) -> Result<String, CtlError> {
        let view = self.deployment(id, service).await?;
        Ok(self.print(&view, deployment_text))
    }

    /// `meshctl deploy status [ID] --watch`: prints the history as it
    /// grows until the deployment ends; halted or aborted is an error
    /// (exit 1).
    pub async fn deploy_watch(
        &mut self,
        id: u64,
        service: &str,
        mut out: impl FnMut(&str),
    ) -> Result<String, CtlError> {
        let mut view = self.deployment(id, service).await?;
        let id = view.id;
        let mut shown = 0;
        loop {
            if self.output == Output::Table {
                for e in view.events.iter().skip(shown) {
                    out(&format!("{}  {}\n", e.at, one_line(&e.text)));
                }
                shown = view.events.len();
            }
            if view.state != "running" && !view.nodes.iter().any(|n| in_flight(&n.state)) {
                break;
            }
            tokio::time::sleep(WATCH_EVERY).await;
            view = self.deployment(id, "").await?;
        }
        let text = self.print(&view, deployment_text);
        if matches!(view.state.as_str(), "halted" | "aborted") {
            out(&text);
            return Err(CtlError::new(
                format!(
                    "deployment {id} of {} {} {}: {}",
                    view.service,
                    view.version,
                    view.state,
                    one_line(&view.reason)
                ),
                FAILED_EXIT,
            ));
        }
        Ok(text)
    }

    /// `meshctl deploy list [--service S]`.
    pub async fn deploy_list(&mut self, service: &str) -> Result<String, CtlError> {
        let service = service.to_owned();
        let r = self
            .call(|mut c| async move {
                c.list_deployments(pb::ListDeploymentsRequest { service })
                    .await
            })
            .await?;
        let all: Vec<DeploymentView> = r
            .deployments
            .into_iter()
            .map(DeploymentView::from)
            .collect();
        Ok(self.print(&all, |all| deployments_table(all)))
    }

    /// `meshctl deploy abort ID`.
    pub async fn deploy_abort(&mut self, id: u64, author: String) -> Result<String, CtlError> {
        let r = self
            .call(|mut c| async move {
                c.abort_deployment(pb::AbortDeploymentRequest { id, author })
                    .await
            })
            .await?;
        let view = DeploymentView::from(r);
        Ok(self.print(&view, deployment_text))
    }

    /// `meshctl deploy nodes [--service S]`.
    pub async fn deploy_nodes(&mut self, service: &str) -> Result<String, CtlError> {
        let service = service.to_owned();
        let r = self
            .call(|mut c| async move {
                c.list_node_deployments(pb::ListNodeDeploymentsRequest { service })
                    .await
            })
            .await?;
        let nodes: Vec<NodeDeploymentsView> =
            r.nodes.into_iter().map(NodeDeploymentsView::from).collect();
        Ok(self.print(&nodes, |n| node_deployments_text(n)))
    }

    async fn deployment(&mut self, id: u64, service: &str) -> Result<DeploymentView, CtlError> {
        let service = service.to_owned();
        let r = self
            .call(|mut c| async move {
                c.get_deployment(pb::GetDeploymentRequest { id, service })
                    .await
            })
            .await?;
        Ok(DeploymentView::from(r))
    }
}

/// Text on one line: a deployer's message ends with the tail of the
/// process's stderr, many lines.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn in_flight(state: &str) -> bool {
    matches!(
        state,
        "uploading" | "deploying" | "soaking" | "rolling-back"
    )
}

/// A deployment in words: its state, its nodes and its history.
pub fn deployment_text(d: &DeploymentView) -> String {
    let done = d.nodes.iter().filter(|n| n.state == "done").count();
    let mut text = format!(
        "deployment {} of {} {}: {} ({done} of {} nodes done)",
        d.id,
        d.service,
        d.version,
        d.state,
        d.nodes.len()
    );
    if !d.reason.is_empty() {
        let _ = write!(text, ": {}", one_line(&d.reason));
    }
    let _ = writeln!(
        text,
        "\nstarted by {} at {}; {} ({} bytes, SHA-256 {}); soak {} s",
        d.author,
        d.created_at,
        d.file_name,
        d.size,
        d.sha256,
        d.soak_ms / 1000
    );
    let _ = writeln!(text, "command: {}", d.command);
    let rows: Vec<Vec<String>> = d
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                n.state.clone(),
                n.from_version.clone(),
                n.instance_id.clone(),
                one_line(&n.detail),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["NODE", "STATE", "FROM", "INSTANCE", "DETAIL"],
        &rows,
    ));
    if !d.events.is_empty() {
        text.push_str("\nhistory:\n");
        for e in &d.events {
            let _ = writeln!(text, "  {}  {}", e.at, one_line(&e.text));
        }
    }
    text
}

fn deployments_table(all: &[DeploymentView]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|d| {
            let done = d.nodes.iter().filter(|n| n.state == "done").count();
            vec![
                d.id.to_string(),
                d.service.clone(),
                d.version.clone(),
                d.state.clone(),
                format!("{done}/{}", d.nodes.len()),
                d.author.clone(),
                d.created_at.clone(),
                one_line(&d.reason),
            ]
        })
        .collect();
    table(
        &[
            "ID", "SERVICE", "VERSION", "STATE", "DONE", "AUTHOR", "STARTED", "REASON",
        ],
        &rows,
    )
}

/// Each node's instances, then the versions each keeps, then the
/// deployers that did not answer.
pub fn node_deployments_text(nodes: &[NodeDeploymentsView]) -> String {
    let mut instances = Vec::new();
    let mut kept = Vec::new();
    let mut errors = String::new();
    for n in nodes {
        if !n.error.is_empty() {
            let _ = writeln!(errors, "  {}: {}", n.node, one_line(&n.error));
        }
        for i in &n.instances {
            instances.push(vec![
                n.node.clone(),
                i.service.clone(),
                i.version.clone(),
                i.instance_id.clone(),
                i.port.to_string(),
                if i.pid == 0 {
                    String::new()
                } else {
                    i.pid.to_string()
                },
                i.state.clone(),
                i.restarts.to_string(),
            ]);
        }
        for a in &n.artifacts {
            kept.push(vec![
                n.node.clone(),
                a.service.clone(),
                a.version.clone(),
                a.file_name.clone(),
                a.size.to_string(),
                a.sha256.chars().take(12).collect(),
                a.stored_at.clone(),
            ]);
        }
    }
    let mut text = table(
        &[
            "NODE", "SERVICE", "VERSION", "INSTANCE", "PORT", "PID", "STATE", "RESTARTS",
        ],
        &instances,
    );
    text.push_str("\nkept versions:\n");
    text.push_str(&table(
        &[
            "NODE", "SERVICE", "VERSION", "FILE", "SIZE", "SHA-256", "STORED",
        ],
        &kept,
    ));
    if !errors.is_empty() {
        text.push_str("\nnot answering:\n");
        text.push_str(&errors);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries_are_key_value_and_a_bad_one_is_named() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        let e = parse_env(&["NOPE".into()]).unwrap_err();
        assert_eq!(e.exit_code, 65);
        assert!(
            e.message.contains("--env") && e.message.contains("NOPE"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn the_artifact_is_hashed_and_a_missing_or_empty_one_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.jar");
        std::fs::write(&path, b"abc").unwrap();
        let (size, sha) = digest(&path).await.unwrap();
        assert_eq!(size, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let missing = digest(&dir.path().join("nope.jar")).await.unwrap_err();
        assert_eq!(missing.exit_code, 65);
        assert!(missing.message.contains("nope.jar"), "{}", missing.message);
        std::fs::write(&path, b"").unwrap();
        let empty = digest(&path).await.unwrap_err();
        assert!(empty.message.contains("empty"), "{}", empty.message);
    }

    #[test]
    fn a_halted_deployment_reads_on_one_line_per_node() {
        let view = DeploymentView {
            id: 3,
            service: "orders".into(),
            version: "2.0".into(),
            state: "halted".into(),
            reason: "n1: deploy failed: exited with code 3; stderr:\nboom\n".into(),
            nodes: vec![crate::control::DeploymentNodeView {
                node: "n1".into(),
                state: "rolled-back".into(),
                detail: "deploy failed: exited with code 3; stderr:\nboom".into(),
                from_version: "1.0".into(),
                ..Default::default()
            }],
            ..DeploymentView::default()
        };
        let text = deployment_text(&view);
        assert!(
            text.starts_with(
                "deployment 3 of orders 2.0: halted (0 of 1 nodes done): n1: deploy failed: exited with code 3; stderr: | boom\n"
            ),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("n1")).unwrap();
        assert!(
            row.contains("rolled-back") && row.contains("1.0") && row.ends_with("| boom"),
            "{row}"
        );
    }

    #[tokio::test]
    async fn deploy_flags_are_checked_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.jar");
        std::fs::write(&path, b"jar bytes").unwrap();
        let args = DeployArgs {
            service: Some("orders".into()),
            artifact: Some(path.clone()),
            version: Some("2.4.1".into()),
            nodes: vec!["n1,n2".into(), "n3".into()],
            soak: Some("2s".into()),
            env: vec!["JAVA_OPTS=-Xmx64m".into()],
            author: "ops".into(),
            ..DeployArgs::default()
        };
        let plan = args.clone().check().await.unwrap();
        assert_eq!(plan.start.nodes, ["n1", "n2", "n3"]);
        assert_eq!(plan.start.file_name, "orders.jar");
        assert_eq!(plan.start.size, 9);
        assert_eq!(plan.start.soak_ms, 2000);
        assert_eq!(plan.start.command, DEFAULT_COMMAND);
        assert_eq!(plan.start.env["JAVA_OPTS"], "-Xmx64m");

        let no_service = DeployArgs {
            service: None,
            ..args.clone()
        };
        let e = no_service.check().await.unwrap_err();
        assert_eq!((e.exit_code, e.message.contains("--service")), (65, true));
        let bad_soak = DeployArgs {
            soak: Some("soon".into()),
            ..args
        };
        let e = bad_soak.check().await.unwrap_err();
        assert_eq!(
            (e.exit_code, e.message.contains("--soak")),
            (65, true),
            "{}",
            e.message
        );
    }
}
