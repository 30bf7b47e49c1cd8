//! The compose dev mesh (`deploy/compose`) run for real, with the files a
//! user runs: the public base images built from Debian's packages where the
//! engine has none (`deploy/docker/base-images.sh`), the Meshwork image
//! built by `deploy/docker/Dockerfile` from the binaries this workspace
//! already built (its `PREBUILT` mode: a release build inside Docker would
//! take most of CI's time), and a compose project of the test's own.
//!
//! A [`Project`] owns its containers, network and volumes: dropping it (also
//! when a test panics) runs `down -v`, after printing every service's last
//! log lines if the test did not reach [`Project::down`]. Projects left by a
//! killed run (their pid is gone) are taken down when the next one starts.
//!
//! Needs the Docker engine (`docker.io`), a compose tool (the `docker
//! compose` plugin or `docker-compose`), debootstrap (first run only) and
//! `strip` (binutils).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
};

use crate::bins;

/// The tag the test gives the Meshwork image it builds; the next run replaces it.
pub const IMAGE: &str = "meshwork:e2e";

/// The binaries the image carries, as the Dockerfile lists them.
pub const BINARIES: [&str; 6] = [
    "mesh-proxy",
    "mesh-bridge",
    "mesh-control",
    "meshctl",
    "mesh-deployer",
    "mesh-monitor",
];

/// Projects this harness starts are named `<PREFIX><pid>x<n>`.
const PREFIX: &str = "mwecompose";

/// How long one docker or compose command may take (image builds excepted).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository's root (the e2e crate's parent folder).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives in the workspace's folder")
        .to_path_buf()
}

/// What a command printed, with its exit status checked.
async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let mut command = Command::new(program);
    command.args(args).kill_on_drop(true);
    output(command, &format!("{program} {}", args.join(" ")), timeout).await
}

async fn output(mut command: Command, what: &str, timeout: Duration) -> Result<String> {
    command.stdin(Stdio::null());
    let out = tokio::time::timeout(timeout, command.output())
        .await
        .with_context(|| format!("`{what}` took longer than {timeout:?}"))?
        .with_context(|| format!("cannot run `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that the Docker engine answers.
pub async fn docker_ready() -> Result<()> {
    run(
        "docker",
        &["info", "--format", "{{.ServerVersion}}"],
        COMMAND_TIMEOUT,
    )
    .await
    .context(
        "the Docker engine does not answer: install it (Debian: apt-get install docker.io) \
             and start dockerd",
    )?;
    Ok(())
}

/// The compose command: `docker compose` (the plugin) or `docker-compose`.
pub async fn compose_tool() -> Result<Vec<String>> {
    if run("docker", &["compose", "version"], COMMAND_TIMEOUT)
        .await
        .is_ok()
    {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if run("docker-compose", &["version"], COMMAND_TIMEOUT)
        .await
        .is_ok()
    {
        return Ok(vec!["docker-compose".into()]);
    }
    bail!(
        "no compose tool: install the Docker compose plugin or docker-compose \
         (Debian: apt-get install docker-compose)"
    )
}

/// Builds the public images the Dockerfile and the compose file name, where
/// they are missing (`deploy/docker/base-images.sh`; a few minutes the first
/// time, nothing once they exist).
pub async fn base_images() -> Result<()> {
    let script = repo_root().join("deploy/docker/base-images.sh");
    let status = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); see its message above",
            script.display()
        );
    }
    Ok(())
}

/// Builds [`IMAGE`] with `deploy/docker/Dockerfile` from this workspace's
/// binaries (stripped, in a build context of their own), then removes what
/// the build replaced: the previous [`IMAGE`] and the builder stage's image.
pub async fn build_image() -> Result<()> {
    let context = Scratch::new("context")?;
    let bin = context.0.join("bin");
    std::fs::create_dir_all(&bin)?;
    for name in BINARIES {
        let built = bins::workspace_bin(name)?;
        let staged = bin.join(name);
        run(
            "strip",
            &["-o", &path_str(&staged)?, &path_str(&built)?],
            COMMAND_TIMEOUT,
        )
        .await
        .context("strip (Debian: apt-get install binutils)")?;
    }
    let previous = image_id(IMAGE).await;
    let dockerfile = repo_root().join("deploy/docker/Dockerfile");
    let mut build = Command::new("docker");
    build
        .args(["build", "--quiet", "--force-rm", "--file"])
        .arg(&dockerfile)
        .args([
            "--build-arg",
            "PREBUILT=bin",
            "--build-arg",
            "BUILDER_IMAGE=debian:bookworm-slim",
            "--tag",
            IMAGE,
        ])
        .arg(&context.0)
        .kill_on_drop(true);
    output(build, "docker build", Duration::from_secs(600)).await?;
    let current = image_id(IMAGE).await;
    if let Some(old) = previous.filter(|old| current.as_ref() != Some(old))
        && let Err(e) = run("docker", &["rmi", &old], COMMAND_TIMEOUT).await
    {
        eprintln!("the previous {IMAGE} ({old}) stays: {e:#}");
    }
    run(
        "docker",
        &[
            "image",
            "prune",
            "--force",
            "--filter",
            "label=io.meshwork.stage=builder",
        ],
        COMMAND_TIMEOUT,
    )
    .await?;
    Ok(())
}

async fn image_id(tag: &str) -> Option<String> {
    run(
        "docker",
        &["image", "inspect", "--format", "{{.Id}}", tag],
        COMMAND_TIMEOUT,
    )
    .await
    .ok()
    .map(|s| s.trim().to_owned())
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A compose project of `deploy/compose/docker-compose.yml`, with
/// [`IMAGE`] as the Meshwork image and every host port chosen by the engine
/// (on 127.0.0.1).
#[derive(Debug)]
pub struct Project {
    /// The project's name (`-p`).
    pub name: String,
    compose: Vec<String>,
    file: PathBuf,
    env: Vec<(&'static str, String)>,
    up: bool,
}

/// Tokens the project's components are given.
pub const API_TOKEN: &str = "e2e-compose-api-token-0123456789";
const DEPLOYER_TOKEN: &str = "e2e-compose-deployer-token-0123456789";

impl Project {
    /// A project that is not up yet, named after this process; takes down
    /// the projects of runs that were killed.
    pub async fn new(compose: Vec<String>) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let project = Self {
            name,
            compose,
            file: repo_root().join("deploy/compose/docker-compose.yml"),
            env: vec![
                ("MESHWORK_IMAGE", IMAGE.into()),
                ("MESH_DASHBOARD_PORT", "0".into()),
                ("MESH_PROMETHEUS_PORT", "0".into()),
                ("MESH_CONSUL_PORT", "0".into()),
                ("MESH_API_TOKEN", API_TOKEN.into()),
                ("MESH_DEPLOYER_TOKEN", DEPLOYER_TOKEN.into()),
            ],
            up: false,
        };
        project.remove_stale().await;
        Ok(project)
    }

    /// `up -d` with the images there are (no build, no pull).
    pub async fn up(&mut self) -> Result<()> {
        self.up = true;
        self.compose(&["up", "--detach", "--no-build"])
            .await
            .map(drop)
    }

    /// `down -v`: containers, network and volumes.
    pub async fn down(&mut self) -> Result<()> {
        self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .await?;
        self.up = false;
        Ok(())
    }

    /// Runs a compose subcommand of this project.
    pub async fn compose(&self, args: &[&str]) -> Result<String> {
        let (program, leading) = self
            .compose
            .split_first()
            .context("empty compose command")?;
        let mut command = Command::new(program);
        command
            .args(leading)
            .args(["--project-name", &self.name, "--file"])
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        let what = format!("{} {}", self.compose.join(" "), args.join(" "));
        output(command, &what, COMMAND_TIMEOUT).await
    }

    /// The id of a service's (one) container.
    pub async fn container(&self, service: &str) -> Result<String> {
        let id = self.compose(&["ps", "-q", service]).await?;
        match id.split_whitespace().next() {
            Some(id) => Ok(id.to_owned()),
            None => bail!("{}: no container for service {service}", self.name),
        }
    }

    /// Runs a command in a service's container (`docker exec`), with its output.
    pub async fn exec(&self, service: &str, args: &[&str]) -> Result<String> {
        let id = self.container(service).await?;
        let mut all = vec!["exec", id.as_str()];
        all.extend_from_slice(args);
        run("docker", &all, COMMAND_TIMEOUT)
            .await
            .with_context(|| format!("in {service}"))
    }

    /// The host address a service's container port is published at.
    pub async fn port(&self, service: &str, port: u16) -> Result<SocketAddr> {
        let out = self.compose(&["port", service, &port.to_string()]).await?;
        out.trim()
            .parse()
            .with_context(|| format!("{service}:{port} is published at {out:?}"))
    }

    /// The last `tail` log lines of every service.
    pub async fn logs(&self, tail: usize) -> String {
        match self
            .compose(&["logs", "--no-color", "--tail", &tail.to_string()])
            .await
        {
            Ok(logs) => logs,
            Err(e) => format!("(no logs: {e:#})"),
        }
    }

    /// Takes down projects of ours whose process is gone.
    async fn remove_stale(&self) {
        let Ok(labels) = run(
            "docker",
            &[
                "ps",
                "--all",
                "--filter",
                "label=com.docker.compose.project",
                "--format",
                "{{.Label \"com.docker.compose.project\"}}",
            ],
            COMMAND_TIMEOUT,
        )
        .await
        else {
            return;
        };
        let mut stale: Vec<&str> = labels
            .lines()
            .filter(|name| owner_pid(name).is_some_and(|pid| !alive(pid)))
            .collect();
        stale.sort_unstable();
        stale.dedup();
        for name in stale {
            let other = Self {
                name: name.to_owned(),
                compose: self.compose.clone(),
                file: self.file.clone(),
                env: self.env.clone(),
                up: false,
            };
            if let Err(e) = other
                .compose(&["down", "--volumes", "--timeout", "1"])
                .await
            {
                eprintln!("stale compose project {name} stays: {e:#}");
            }
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if !self.up {
            return;
        }
        let Some((program, leading)) = self.compose.split_first() else {
            return;
        };
        let compose = |args: &[&str]| {
            std::process::Command::new(program)
                .args(leading)
                .args(["--project-name", &self.name, "--file"])
                .arg(&self.file)
                .args(args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .output()
        };
        if let Ok(out) = compose(&["logs", "--no-color", "--tail", "30"]) {
            eprintln!(
                "--- compose project {} (not taken down by the test) ---\n{}",
                self.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        match compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "compose down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("compose down {}: {e}", self.name),
        }
    }
}

/// The pid in a project name `<PREFIX><pid>x<n>`, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// An HTTP/1.0 answer, read whole.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl RawResponse {
    /// Parses a whole HTTP/1.x answer.
    pub fn parse(raw: &str) -> Result<Self> {
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .with_context(|| format!("no end of headers in {raw:?}"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {status_line:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(Self {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {:?}", self.body))
    }
}

/// `GET path` from the host to a published port, HTTP/1.0, with extra header lines.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<RawResponse> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {addr}{path} took longer than 10s"))?
        .with_context(|| format!("GET {addr}{path}"))?;
    RawResponse::parse(&String::from_utf8_lossy(&raw))
}

/// `GET path` through a node's proxy (127.0.0.1:8888 in the node's network
/// namespace), from inside a container of that node, with bash's `/dev/tcp`:
/// the image needs no HTTP client for it.
pub async fn get_through_proxy(
    project: &Project,
    service: &str,
    path: &str,
) -> Result<RawResponse> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/8888 && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 10 cat <&3"
    );
    let raw = project.exec(service, &["bash", "-c", &script]).await?;
    RawResponse::parse(&raw)
}

/// A folder of the test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}-{}-{what}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_answer_parses() {
        let raw = "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nx-instance: echo-node2\r\n\r\n{\"node\":\"node2\"}";
        let answer = RawResponse::parse(raw).unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(answer.header("x-instance"), Some("echo-node2"));
        assert_eq!(answer.json().unwrap()["node"], "node2");
        assert!(RawResponse::parse("HTTP/1.0 200 OK\r\n").is_err());
    }

    #[test]
    fn only_our_project_names_have_an_owner() {
        assert_eq!(owner_pid("mwecompose1234x0"), Some(1234));
        assert_eq!(owner_pid("mwecompose1234x17"), Some(1234));
        assert_eq!(owner_pid("mwtry"), None);
        assert_eq!(owner_pid("mwecomposex0"), None);
    }
}
