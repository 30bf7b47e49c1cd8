//! Blue-green deploys through the gRPC API, with a fake local proxy that
//! records the agent API calls and serves `/routes` from them (an instance
//! listed only [`ROUTABLE_AFTER`] its registration, as Consul's first
//! check passes), and a real service: a small Python HTTP server (the
//! "artifact") answering `/health` and `/` with its version.
//!
//! Every process the deployer starts is killed when the test ends, also
//! when it fails ([`Harness`]'s `Drop` kills the process group of every
//! process record left).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    routing::{get, put},
};
use mesh_deployer::{Args, Config, Deployer};
use mesh_proto::v1::{
    DeployRequest, DeployResponse, LogStream, LogTailRequest, RollbackRequest, StatusRequest,
    StopRequest, UploadChunk, UploadStart, deployer_client::DeployerClient,
};
use mesh_runtime::metrics::Registry;
use sha2::{Digest, Sha256};
use tonic::{Code, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(10);
const COMMAND: &str = "python3 -u {artifact} {port} {version}";
const DRAIN: Duration = Duration::from_millis(300);
/// How long after its registration the fake proxy lists an instance in
/// `/routes`: Consul starts its check critical, the first run passes it.
const ROUTABLE_AFTER: Duration = Duration::from_millis(300);

/// A service that answers `/health` with `health` and `/` with its
/// version, and says on stderr what it does.
fn service(health: u16) -> String {
    format!(
        r#"import http.server, sys
port, version = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code, body = ({health}, b"ok") if self.path == "/health" else (200, version.encode())
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
if {health} != 200:
    sys.stderr.write("database unreachable\n")
sys.stderr.write("serving %s on %d\n" % (version, port))
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#
    )
}

/// A service that exits at once with code 3.
const CRASHING: &str = "import sys\nsys.stderr.write(\"missing config\\n\")\nsys.exit(3)\n";

/// The fake local proxy: its agent API and its admin `/routes`.
type Proxy = Arc<Mutex<Fake>>;

#[derive(Default)]
struct Fake {
    /// What the proxy was asked, and when `/routes` first listed an
    /// instance, in order: `register <id> <version> <check URL>`,
    /// `deregister <id>`, `routable <id>`.
    calls: Vec<String>,
    /// The instances registered, by id.
    registered: BTreeMap<String, Registration>,
    /// Versions whose Consul check never passes: never listed.
    failing: BTreeSet<String>,
    /// The instances `/routes` has listed.
    listed: BTreeSet<String>,
}

struct Registration {
    service: String,
    version: String,
    port: u64,
    at: Instant,
}

/// A deployer on a temporary data folder, a fake proxy, and a client.
struct Harness {
    deployer: Option<Deployer>,
    client: DeployerClient<Channel>,
    fake: Proxy,
    proxy: tokio::task::JoinHandle<()>,
    config: Config,
    data: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Result<Self> {
        Self::start_keeping(10).await
    }

    async fn start_keeping(keep_versions: usize) -> Result<Self> {
        mesh_runtime::install_crypto_provider();
        let fake = Proxy::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = listener.local_addr()?;
        let router = Router::new()
            .route("/v1/agent/service/register", put(register))
            .route("/v1/agent/service/deregister/{id}", put(deregister))
            .route("/routes", get(routes))
            .with_state(fake.clone());
        let proxy = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let data = tempfile::tempdir()?;
        let config = Args {
            node: Some("test-node".into()),
            grpc_listen: Some("127.0.0.1:0".parse()?),
            admin_listen: Some("127.0.0.1:0".parse()?),
            data_dir: Some(data.path().to_owned()),
            keep_versions: Some(keep_versions),
            proxy_addr: Some(proxy_addr),
            proxy_admin: Some(proxy_addr),
            ..Args::default()
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        let deployer = Deployer::start(&config, Registry::new()).await?;
        let client = DeployerClient::connect(format!("http://{}", deployer.grpc_addr())).await?;
        Ok(Self {
            deployer: Some(deployer),
            client,
            fake,
            proxy,
            config,
            data,
        })
    }

    /// Stops the deployer (its processes keep running) and starts another
    /// on the same data folder.
    async fn restart(&mut self) -> Result<()> {
        if let Some(deployer) = self.deployer.take() {
            ensure!(deployer.shutdown(DEADLINE).await, "shutdown timed out");
        }
        let deployer = Deployer::start(&self.config, Registry::new()).await?;
        self.client = DeployerClient::connect(format!("http://{}", deployer.grpc_addr())).await?;
        self.deployer = Some(deployer);
        Ok(())
    }

    /// Uploads `script` as `version`; returns the versions pruned.
    async fn upload(&mut self, version: &str, script: &str) -> Result<Vec<String>> {
        let data = script.as_bytes().to_vec();
        let start = UploadStart {
            service: "orders".into(),
            version: version.into(),
            file_name: "app.py".into(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
            offset: 0,
        };
        let message = UploadChunk {
            start: Some(start),
            data,
        };
        let result = self
            .client
            .upload(tokio_stream::iter([message]))
            .await
            .with_context(|| format!("upload {version}"))?;
        Ok(result.into_inner().pruned)
    }

    async fn rollback(&mut self) -> Result<DeployResponse, tonic::Status> {
        let request = RollbackRequest {
            service: "orders".into(),
        };
        Ok(self.client.rollback(request).await?.into_inner())
    }

    async fn deploy(
        &mut self,
        version: &str,
        health_timeout: Duration,
    ) -> Result<DeployResponse, tonic::Status> {
        let request = deploy_request(version, health_timeout);
        Ok(self.client.deploy(request).await?.into_inner())
    }

    /// `(version, instance id)` of every instance running, by id.
    async fn running(&mut self) -> Result<Vec<(String, String)>> {
        let request = StatusRequest {
            service: "orders".into(),
        };
        let status = self.client.status(request).await?.into_inner();
        Ok(status
            .instances
            .into_iter()
            .map(|i| (i.version, i.instance_id))
            .collect())
    }

    fn calls(&self) -> Vec<String> {
        self.fake.lock().expect("not poisoned").calls.clone()
    }

    /// The ids registered with the fake proxy.
    fn registered(&self) -> Vec<String> {
        let fake = self.fake.lock().expect("not poisoned");
        fake.registered.keys().cloned().collect()
    }

    /// Makes the Consul check of `version`'s instances fail: the proxy
    /// never lists them.
    fn fail_check(&self, version: &str) {
        let mut fake = self.fake.lock().expect("not poisoned");
        fake.failing.insert(version.to_owned());
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.proxy.abort();
        // The deployer leaves its processes running when it goes (as on a
        // crash): kill them, whatever happened in the test.
        drop(self.deployer.take());
        kill_recorded(&self.data.path().join("processes"));
    }
}

/// Kills the process group of every process record in `dir`.
fn kill_recorded(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let pid = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["pid"].as_i64())
            .and_then(|pid| i32::try_from(pid).ok());
        if let Some(pid) = pid.filter(|&p| p > 1) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn register(State(proxy): State<Proxy>, body: Bytes) -> &'static str {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = v["ID"].as_str().unwrap_or("?").to_owned();
    let version = v["Meta"]["version"].as_str().unwrap_or("?").to_owned();
    let line = format!(
        "register {id} {version} {}",
        v["Check"]["HTTP"].as_str().unwrap_or("?"),
    );
    let registration = Registration {
        service: v["Name"].as_str().unwrap_or("?").to_owned(),
        version,
        port: v["Port"].as_u64().unwrap_or(0),
        at: Instant::now(),
    };
    let mut fake = proxy.lock().expect("not poisoned");
    fake.calls.push(line);
    fake.registered.insert(id, registration);
    ""
}

async fn deregister(State(proxy): State<Proxy>, UrlPath(id): UrlPath<String>) -> &'static str {
    let mut fake = proxy.lock().expect("not poisoned");
    fake.calls.push(format!("deregister {id}"));
    fake.registered.remove(&id);
    ""
}

/// The registered instances whose check passed, as mesh-proxy's
/// `/routes` shows them; records when each is listed first.
async fn routes(State(proxy): State<Proxy>) -> Json<serde_json::Value> {
    let mut fake = proxy.lock().expect("not poisoned");
    let Fake {
        calls,
        registered,
        failing,
        listed,
    } = &mut *fake;
    let mut services: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    for (id, r) in registered.iter() {
        if r.at.elapsed() < ROUTABLE_AFTER || failing.contains(&r.version) {
            continue;
        }
        if listed.insert(id.clone()) {
            calls.push(format!("routable {id}"));
        }
        services
            .entry(&r.service)
            .or_default()
            .push(serde_json::json!({
                "id": id, "address": "127.0.0.1", "port": r.port, "node": "test-node",
                "tags": [], "in_flight": 0, "ejected_until": null,
            }));
    }
    Json(serde_json::json!({ "pid": 1, "source": "live", "services": services, "peers": {} }))
}

fn deploy_request(version: &str, health_timeout: Duration) -> DeployRequest {
    DeployRequest {
        service: "orders".into(),
        version: version.into(),
        command: COMMAND.into(),
        health_timeout_ms: health_timeout.as_millis() as u64,
        drain_ms: DRAIN.as_millis() as u64,
        stop_grace_ms: 2000,
        tags: vec!["blue-green".into()],
        ..DeployRequest::default()
    }
}

/// What `GET /` on `port` answers, or `None` when nothing listens.
async fn version_on(port: u32) -> Option<String> {
    let url = format!("http://127.0.0.1:{port}/");
    let response = reqwest::get(url).await.ok()?;
    response.text().await.ok()
}

/// Waits until nothing answers on `port`.
async fn gone(port: u32) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while version_on(port).await.is_some() {
        ensure!(Instant::now() < deadline, "port {port} still answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn instance(r: &DeployResponse) -> Result<(String, u32)> {
    let i = r.instance.as_ref().context("no instance in the answer")?;
    Ok((i.instance_id.clone(), i.port))
}

fn position(calls: &[String], prefix: &str) -> Result<usize> {
    calls
        .iter()
        .position(|c| c.starts_with(prefix))
        .with_context(|| format!("no call {prefix:?} in {calls:?}"))
}

#[tokio::test]
async fn deploys_swap_blue_green_refuse_a_bad_version_and_roll_back() -> Result<()> {
    let mut h = Harness::start().await?;
    h.upload("1", &service(200)).await?;
    h.upload("2", &service(200)).await?;
    h.upload("3", &service(503)).await?;
    h.upload("4", CRASHING).await?;

    // v1: started, healthy, registered with its check and version.
    let v1 = h.deploy("1", DEADLINE).await?;
    let (v1_id, v1_port) = instance(&v1)?;
    assert_eq!(v1_id, format!("orders-1-{v1_port}"));
    assert!(v1.replaced.is_empty());
    assert_eq!(version_on(v1_port).await.as_deref(), Some("1"));
    assert_eq!(
        h.calls(),
        [
            format!("register {v1_id} 1 http://127.0.0.1:{v1_port}/health"),
            format!("routable {v1_id}"),
        ]
    );

    // v2: routable (its check passed) before v1 is deregistered; v1
    // stopped after the drain.
    let started = Instant::now();
    let v2 = h.deploy("2", DEADLINE).await?;
    assert!(
        started.elapsed() >= ROUTABLE_AFTER + DRAIN,
        "v2 was not awaited or v1 not drained"
    );
    let (v2_id, v2_port) = instance(&v2)?;
    assert_eq!(v2.replaced, [v1_id.as_str()]);
    let calls = h.calls();
    ensure!(
        position(&calls, &format!("register {v2_id} 2"))?
            < position(&calls, &format!("routable {v2_id}"))?
            && position(&calls, &format!("routable {v2_id}"))?
                < position(&calls, &format!("deregister {v1_id}"))?,
        "v2 must be routable before v1 goes: {calls:?}"
    );
    assert_eq!(h.registered(), [v2_id.as_str()]);
    assert_eq!(version_on(v2_port).await.as_deref(), Some("2"));
    gone(v1_port).await?;
    assert_eq!(h.running().await?, [("2".to_owned(), v2_id.clone())]);

    // v3 fails its gate; while it is tried, another deploy is refused.
    let mut other = h.client.clone();
    let bad = tokio::spawn(async move {
        other
            .deploy(deploy_request("3", Duration::from_millis(1500)))
            .await
    });
    let deadline = Instant::now() + DEADLINE;
    while !h.running().await?.iter().any(|(v, _)| v == "3") {
        ensure!(Instant::now() < deadline, "v3 never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = h
        .deploy("2", DEADLINE)
        .await
        .expect_err("a deploy is under way");
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert_eq!(busy.message(), "a deploy of orders is under way");
    let failed = bad.await?.expect_err("v3 is unhealthy");
    assert_eq!(failed.code(), Code::FailedPrecondition, "{failed:?}");
    assert!(
        failed.message().contains("/health answered 503"),
        "{failed:?}"
    );
    assert!(
        failed.message().contains("database unreachable"),
        "{failed:?}"
    );
    assert_eq!(version_on(v2_port).await.as_deref(), Some("2"));
    assert_eq!(h.running().await?, [("2".to_owned(), v2_id.clone())]);

    // v4 exits at once: the gate says so without waiting for its deadline.
    let started = Instant::now();
    let crashed = h.deploy("4", DEADLINE).await.expect_err("v4 exits");
    assert!(started.elapsed() < DEADLINE / 2, "the gate waited it out");
    assert_eq!(crashed.code(), Code::FailedPrecondition, "{crashed:?}");
    assert!(
        crashed.message().contains("process exited with code 3"),
        "{crashed:?}"
    );
    assert!(crashed.message().contains("missing config"), "{crashed:?}");
    ensure!(
        !h.calls()
            .iter()
            .any(|c| c.contains("orders-3-") || c.contains("orders-4-")),
        "a failed version was registered: {:?}",
        h.calls()
    );
    assert_eq!(h.running().await?, [("2".to_owned(), v2_id.clone())]);

    // Rollback: the version stored before v2, run as the last deploy was.
    let back = h.rollback().await?;
    let (back_id, back_port) = instance(&back)?;
    assert!(back_id.starts_with("orders-1-"), "{back_id}");
    assert_eq!(back.replaced, [v2_id.as_str()]);
    assert_eq!(version_on(back_port).await.as_deref(), Some("1"));
    gone(v2_port).await?;

    let tail = h
        .client
        .log_tail(LogTailRequest {
            instance_id: back_id.clone(),
            lines: 5,
            stream: LogStream::Stderr.into(),
        })
        .await?
        .into_inner();
    assert_eq!(tail.lines, [format!("serving 1 on {back_port}")]);

    // Stop: deregistered and stopped; nothing runs.
    let stopped = h
        .client
        .stop(StopRequest {
            service: "orders".into(),
            stop_grace_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.stopped, [back_id.as_str()]);
    assert_eq!(h.calls().last(), Some(&format!("deregister {back_id}")));
    gone(back_port).await?;
    assert!(h.running().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_deploy_needs_a_stored_version_and_rollback_a_deploy() -> Result<()> {
    let mut h = Harness::start().await?;
    let missing = h.deploy("9", DEADLINE).await.expect_err("not stored");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let never = h.rollback().await.expect_err("never deployed");
    assert_eq!(never.code(), Code::FailedPrecondition, "{never:?}");
    h.upload("1", &service(200)).await?;
    let mut bad = deploy_request("1", DEADLINE);
    bad.command = "python3 {jar}".into();
    let e = h.client.deploy(bad).await.expect_err("unknown variable");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    if !h.calls().is_empty() || !h.running().await?.is_empty() {
        bail!("a refused deploy left something behind");
    }
    Ok(())
}

#[tokio::test]
async fn instances_and_deploy_records_outlive_a_deployer_restart() -> Result<()> {
    let mut h = Harness::start_keeping(1).await?;
    h.upload("1", &service(200)).await?;
    let (v1_id, _) = instance(&h.deploy("1", DEADLINE).await?)?;
    // v1 runs: kept although only the newest version is.
    assert!(h.upload("2", &service(200)).await?.is_empty());
    let v2 = h.deploy("2", DEADLINE).await?;
    let (v2_id, v2_port) = instance(&v2)?;
    assert_eq!(v2.replaced, [v1_id]);
    let pid = v2.instance.as_ref().map(|i| i.pid);

    // The new deployer adopts v2 (same process) and rolls back from the
    // record the old one wrote.
    h.restart().await?;
    let status = h
        .client
        .status(StatusRequest::default())
        .await?
        .into_inner()
        .instances;
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].instance_id, v2_id);
    assert_eq!(Some(status[0].pid), pid);
    assert_eq!(status[0].port, v2_port);
    assert_eq!(version_on(v2_port).await.as_deref(), Some("2"));

    let back = h.rollback().await?;
    let (back_id, back_port) = instance(&back)?;
    assert!(back_id.starts_with("orders-1-"), "{back_id}");
    assert_eq!(back.replaced, [v2_id.as_str()]);
    assert_eq!(version_on(back_port).await.as_deref(), Some("1"));
    gone(v2_port).await?;
    assert_eq!(h.calls().last(), Some(&format!("deregister {v2_id}")));

    // v2 no longer runs: pruned; v1 runs: kept.
    assert_eq!(h.upload("3", &service(200)).await?, ["2"]);
    Ok(())
}

#[tokio::test]
async fn a_new_instance_the_proxy_never_routes_is_withdrawn_and_the_old_keeps_serving() -> Result<()>
{
    let mut h = Harness::start().await?;
    h.upload("1", &service(200)).await?;
    h.upload("2", &service(200)).await?;
    let (v1_id, v1_port) = instance(&h.deploy("1", DEADLINE).await?)?;

    // v2 passes the health gate, but its Consul check never does.
    h.fail_check("2");
    let timeout = Duration::from_millis(1000);
    let started = Instant::now();
    let e = h
        .deploy("2", timeout)
        .await
        .expect_err("v2 is never routable");
    assert!(started.elapsed() >= timeout, "the deploy did not wait");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let calls = h.calls();
    let v2_id = calls
        .iter()
        .find_map(|c| c.strip_prefix("register orders-2-"))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|port| format!("orders-2-{port}"))
        .with_context(|| format!("v2 was not registered: {calls:?}"))?;
    assert_eq!(
        e.message(),
        format!(
            "instance {v2_id} never became routable in the local proxy within 1s \
             (its Consul check may be failing)"
        )
    );
    // v2 deregistered and stopped; v1 never deregistered, still serving.
    assert_eq!(calls[2..].len(), 2, "{calls:?}");
    assert!(
        calls[2].starts_with(&format!("register {v2_id} 2 ")),
        "{calls:?}"
    );
    assert_eq!(calls[3], format!("deregister {v2_id}"));
    assert_eq!(h.registered(), [v1_id.as_str()]);
    assert_eq!(h.running().await?, [("1".to_owned(), v1_id.clone())]);
    assert_eq!(version_on(v1_port).await.as_deref(), Some("1"));
    let v2_port = v2_id.rsplit('-').next().unwrap_or_default().parse()?;
    gone(v2_port).await?;
    Ok(())
}
