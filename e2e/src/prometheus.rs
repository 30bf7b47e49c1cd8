//! Debian's Prometheus server against a test mesh, configured with the
//! files the project ships (`deploy/prometheus/`): `prometheus.yml` and
//! `alerts.yml` copied unchanged, and its file_sd targets written from the
//! test's Consul catalog by the shipped `consul-targets.sh`, which runs,
//! like Prometheus, inside one node's namespace (its Consul agent at
//! 127.0.0.1:8500, the other nodes over the private network). Its HTTP API
//! (`/api/v1/...`) is how a test sees what an operator's Grafana would.
//!
//! [`Prometheus`] owns both processes: dropping it (also when a test
//! fails) kills them; their files live in the mesh's folder.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{eventually, http::HttpClient, node::Node, process::Process, wait::eventually_every};

/// Where Debian's `prometheus` package puts the server.
const DEBIAN_BIN: &str = "/usr/bin/prometheus";

/// How often the helpers ask Prometheus again (it scrapes every 15 s).
const POLL: Duration = Duration::from_millis(500);

/// A Prometheus server started by a test, and the target writer feeding it.
#[derive(Debug)]
pub struct Prometheus {
    server: Process,
    // Kept for its Drop: it stops with the server.
    _targets: Process,
    /// Its HTTP listener, on loopback in the node's namespace.
    addr: SocketAddr,
    dir: PathBuf,
}

// === impl Prometheus ===

impl Prometheus {
    /// Starts, in `node`'s namespace, the shipped target writer
    /// (`consul-targets.sh`, following the node's Consul agent) and
    /// Prometheus with the shipped configuration, files under `dir`; waits
    /// until the first target files are written and Prometheus is ready.
    pub async fn start(node: &Node, dir: &Path) -> Result<Self> {
        let bin = server_bin()?;
        let shipped = shipped_dir();
        let config = dir.join("config");
        let targets = config.join("targets");
        std::fs::create_dir_all(&targets)
            .with_context(|| format!("create {}", targets.display()))?;
        for file in ["prometheus.yml", "alerts.yml"] {
            std::fs::copy(shipped.join(file), config.join(file))
                .with_context(|| format!("copy the shipped {file}"))?;
        }
        let mut writer = Process::new(
            format!("{}/consul-targets", node.name),
            &node.ns,
            "bash",
            [
                shipped.join("consul-targets.sh").display().to_string(),
                targets.display().to_string(),
            ],
            dir.join("consul-targets.log"),
        );
        writer.start()?;
        for file in ["mesh-proxy.json", "mesh-control.json"] {
            let path = targets.join(file);
            let log = dir.join("consul-targets.log");
            eventually(
                &format!("consul-targets.sh writes {file}"),
                Duration::from_secs(20),
                || async {
                    if path.exists() {
                        return Ok(());
                    }
                    bail!("{}", std::fs::read_to_string(&log).unwrap_or_default())
                },
            )
            .await?;
        }
        let port = free_port(node).await?;
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut server = Process::new(
            format!("{}/prometheus", node.name),
            &node.ns,
            &bin,
            [
                format!("--config.file={}", config.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address={listen}"),
            ],
            dir.join("prometheus.log"),
        );
        server.start()?;
        let prometheus = Self {
            server,
            _targets: writer,
            addr: listen,
            dir: dir.to_path_buf(),
        };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }

    async fn wait_ready(&self) -> Result<()> {
        let result = eventually_every(
            "Prometheus is ready",
            Duration::from_secs(30),
            POLL,
            || async {
                let resp = self.client().get("/-/ready").await?;
                if resp.status != 200 {
                    bail!("{} {}", resp.status, resp.text());
                }
                Ok(())
            },
        )
        .await;
        result.with_context(|| format!("Prometheus' log:\n{}", self.log_tail(30)))
    }

    /// The last `lines` of Prometheus' log and of the target writer's.
    pub fn log_tail(&self, lines: usize) -> String {
        let writer =
            std::fs::read_to_string(self.dir.join("consul-targets.log")).unwrap_or_default();
        format!(
            "{}\n--- consul-targets.sh:\n{}",
            self.server.log_tail(lines),
            writer.trim_end()
        )
    }

    fn client(&self) -> HttpClient {
        HttpClient::new(self.server.netns(), self.addr).with_timeout(Duration::from_secs(10))
    }

    /// GET `path` (with its query string) on the API; the `data` of a
    /// `success` answer.
    pub async fn api(&self, path: &str) -> Result<Value> {
        let resp = self.client().get(path).await?;
        let body: Value = resp
            .json()
            .with_context(|| format!("GET {path}: {} {}", resp.status, resp.text()))?;
        if resp.status != 200 || body["status"] != "success" {
            bail!("GET {path}: {} {body}", resp.status);
        }
        Ok(body["data"].clone())
    }

    /// An instant query: its result vector (each `{metric, value}`).
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await
            .with_context(|| format!("query {promql}"))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The metric names of every series scraped so far.
    pub async fn metric_names(&self) -> Result<BTreeSet<String>> {
        let data = self.api("/api/v1/label/__name__/values").await?;
        Ok(strings(&data))
    }

    /// The values of `label` on the series `selector` selects.
    pub async fn label_values(&self, label: &str, selector: &str) -> Result<BTreeSet<String>> {
        let path = format!(
            "/api/v1/label/{label}/values?{}",
            encode_pair("match[]", selector)
        );
        Ok(strings(&self.api(&path).await?))
    }
}

/// The shipped Prometheus files: `deploy/prometheus/` of the workspace.
pub fn shipped_dir() -> PathBuf {
    workspace_dir().join("deploy/prometheus")
}

/// The shipped Grafana dashboard.
pub fn dashboard_path() -> PathBuf {
    workspace_dir().join("deploy/grafana/meshwork.json")
}

fn workspace_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Debian's Prometheus server: `prometheus` on `PATH`, else where the
/// package puts it; fails with what to install.
pub fn server_bin() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    match on_path.or_else(|| Some(PathBuf::from(DEBIAN_BIN)).filter(|p| p.is_file())) {
        Some(path) => Ok(path),
        None => bail!(
            "the Prometheus server is not installed: install Debian's `prometheus` package \
             (apt-get install prometheus); the tests run it themselves, not its service"
        ),
    }
}

/// The `mesh_*` metric names a PromQL expression (or a Grafana
/// `label_values(...)` query) refers to.
pub fn mesh_metric_names(expr: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("mesh_") {
        let before = rest[..start].chars().next_back();
        let token: String = rest[start..].chars().take_while(|c| is_name(*c)).collect();
        rest = &rest[start + token.len()..];
        // `x_mesh_y` is not a mesh metric, and `{mesh_x="..."}` is a label.
        let after = rest.trim_start().chars().next();
        if before.is_some_and(is_name) || matches!(after, Some('=' | '!')) {
            continue;
        }
        names.insert(token);
    }
    names
}

/// A port nobody listens on in `node`'s namespace (the namespace is the
/// test's own, so nobody takes it before the caller does).
async fn free_port(node: &Node) -> Result<u16> {
    let socket = node.ns.socket(true).await?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(socket.local_addr()?.port())
}

fn strings(data: &Value) -> BTreeSet<String> {
    data.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn encode_pair(key: &str, value: &str) -> String {
    format!("{}={}", encode(key), encode(value))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_metric_names_skip_labels_and_other_prefixes() {
        let names = mesh_metric_names(
            r#"sum by (service) (rate(mesh_proxy_requests_total{code_class="5xx"}[5m])) / x_mesh_y
               and histogram_quantile(0.99, mesh_proxy_request_duration_seconds_bucket{mesh_label!="a"})"#,
        );
        let want: BTreeSet<String> = [
            "mesh_proxy_request_duration_seconds_bucket",
            "mesh_proxy_requests_total",
        ]
        .map(str::to_owned)
        .into();
        assert_eq!(names, want);
    }

    #[test]
    fn encode_keeps_unreserved_only() {
        assert_eq!(encode("up{a=\"b c\"}"), "up%7Ba%3D%22b%20c%22%7D");
    }
}
