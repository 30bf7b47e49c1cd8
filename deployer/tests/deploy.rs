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
    net::SocketAddr,
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
use mesh_deployer::{
    Args, Config, Deployer,
    supervisor::{ProcessSpec, Supervisor, SupervisorConfig},
};
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

/// A service like [`service`] whose `/health` answers 503 for its first
/// `secs` seconds.
fn slow_service(secs: u32) -> String {
    service(200)
        .replace(
            "code, body = (200, b\"ok\")",
            &format!("code, body = (200 if time.time() > start + {secs} else 503, b\"ok\")"),
        )
        .replace(
            "import http.server, sys",
            "import http.server, sys, time\nstart = time.time()",
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
    /// While set, a deregistration is recorded as `held deregister <id>`
    /// and never answered (the instance stays registered).
    hold_deregistrations: bool,
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
        let (fake, proxy, proxy_addr) = start_proxy().await?;
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
        self.stop_deployer().await?;
        self.start_again().await
    }

    /// Stops the deployer; its processes keep running.
    async fn stop_deployer(&mut self) -> Result<()> {
        if let Some(deployer) = self.deployer.take() {
            ensure!(deployer.shutdown(DEADLINE).await, "shutdown timed out");
        }
        Ok(())
    }

    /// Starts a deployer on the data folder.
    async fn start_again(&mut self) -> Result<()> {
        let deployer = Deployer::start(&self.config, Registry::new()).await?;
        self.client = DeployerClient::connect(format!("http://{}", deployer.grpc_addr())).await?;
        self.deployer = Some(deployer);
        Ok(())
    }

    /// Stops the deployer and starts one on a runtime of its own, asks it
    /// to deploy `version`, and drops that runtime once `at` holds for the
    /// fake proxy's calls: every task of that deployer, its deploy's too,
    /// ends where it is and its processes keep running, as when a deployer
    /// is killed. Then the proxy answers deregistrations again and a
    /// deployer starts on the same data folder.
    async fn crash_during(&mut self, version: &str, at: fn(&[String]) -> bool) -> Result<()> {
        self.stop_deployer().await?;
        let (config, fake) = (self.config.clone(), self.fake.clone());
        let request = deploy_request(version, DEADLINE);
        let (done, crashed) = tokio::sync::oneshot::channel();
        // A thread of its own: a runtime cannot be driven from within one.
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(done.send(Err(e.into()))),
            };
            let result = runtime.block_on(async move {
                let deployer = Deployer::start(&config, Registry::new()).await?;
                let url = format!("http://{}", deployer.grpc_addr());
                let mut client = DeployerClient::connect(url).await?;
                tokio::spawn(async move { client.deploy(request).await });
                let deadline = Instant::now() + DEADLINE;
                loop {
                    let calls = fake.lock().expect("not poisoned").calls.clone();
                    if at(&calls) {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "the deploy never got there: {calls:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Dropped with the runtime, mid-deploy.
                std::mem::forget(deployer);
                Ok(())
            });
            drop(runtime);
            let _ = done.send(result);
        });
        crashed.await.context("the crashing deployer's thread")??;
        self.fake.lock().expect("not poisoned").hold_deregistrations = false;
        self.start_again().await
    }

    /// The in-flight marks left in the data folder.
    fn in_flight(&self) -> Vec<String> {
        let dir = self.data.path().join("deploys").join("in-flight");
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Uploads `script` as `version`; returns the versions pruned.
    async fn upload(&mut self, version: &str, script: &str) -> Result<Vec<String>> {
        upload(&mut self.client, version, script).await
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

/// Uploads `script` as `version` of orders; returns the versions pruned.
async fn upload(
    client: &mut DeployerClient<Channel>,
    version: &str,
    script: &str,
) -> Result<Vec<String>> {
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
    let result = client
        .upload(tokio_stream::iter([message]))
        .await
        .with_context(|| format!("upload {version}"))?;
    Ok(result.into_inner().pruned)
}

/// Starts the fake proxy: its state, its task and its address (agent API
/// and admin in one).
async fn start_proxy() -> Result<(Proxy, tokio::task::JoinHandle<()>, SocketAddr)> {
    let fake = Proxy::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = listener.local_addr()?;
    let proxy = serve_proxy(fake.clone(), listener);
    Ok((fake, proxy, proxy_addr))
}

/// Serves the fake proxy `fake` on `listener`.
fn serve_proxy(fake: Proxy, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    let router = Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/routes", get(routes))
        .with_state(fake);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
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
    {
        let mut fake = proxy.lock().expect("not poisoned");
        if !fake.hold_deregistrations {
            fake.calls.push(format!("deregister {id}"));
            fake.registered.remove(&id);
            return "";
        }
        fake.calls.push(format!("held deregister {id}"));
    }
    std::future::pending().await
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
        ..
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

/// The instance id of the first registration of `version` in `calls`.
fn registered_id(calls: &[String], version: &str) -> Result<String> {
    let prefix = format!("register orders-{version}-");
    calls
        .iter()
        .find(|c| c.starts_with(&prefix))
        .and_then(|c| c.split_whitespace().nth(1))
        .map(str::to_owned)
        .with_context(|| format!("{version} was never registered: {calls:?}"))
}

/// The port an instance id ends in.
fn port_of(id: &str) -> Result<u32> {
    let port = id.rsplit('-').next().unwrap_or_default();
    port.parse().with_context(|| format!("no port in {id}"))
}

#[tokio::test]
async fn a_deploy_cut_short_before_its_swap_is_undone_when_the_deployer_starts_again() -> Result<()>
{
    let mut h = Harness::start().await?;
    h.upload("1", &service(200)).await?;
    h.upload("2", &service(200)).await?;
    let v1 = h.deploy("1", DEADLINE).await?;
    let (v1_id, v1_port) = instance(&v1)?;
    let v1_pid = v1.instance.as_ref().map(|i| i.pid);

    // v2 is healthy and registered, but not routable yet when the deployer
    // dies: the swap was not decided.
    h.fail_check("2");
    h.crash_during("2", |calls| {
        calls.iter().any(|c| c.starts_with("register orders-2-"))
    })
    .await?;

    let calls = h.calls();
    let v2_id = registered_id(&calls, "2")?;
    let v2_port = port_of(&v2_id)?;
    ensure!(
        position(&calls, &format!("register {v2_id}"))?
            < position(&calls, &format!("deregister {v2_id}"))?,
        "v2 was not deregistered: {calls:?}"
    );
    assert_eq!(h.registered(), [v1_id.as_str()]);
    gone(v2_port).await?;
    let status = h
        .client
        .status(StatusRequest::default())
        .await?
        .into_inner()
        .instances;
    let left: Vec<_> = status
        .iter()
        .map(|i| (i.instance_id.as_str(), i.pid))
        .collect();
    assert_eq!(left, [(v1_id.as_str(), v1_pid.unwrap_or_default())]);
    assert_eq!(version_on(v1_port).await.as_deref(), Some("1"));
    assert!(h.in_flight().is_empty(), "{:?}", h.in_flight());
    let record = h
        .data
        .path()
        .join("processes")
        .join(format!("{v2_id}.json"));
    assert!(!record.exists(), "v2's process record is left");

    // The service deploys as before.
    let v2 = h.deploy("1", DEADLINE).await?;
    assert_eq!(v2.replaced, [v1_id.as_str()]);
    Ok(())
}

#[tokio::test]
async fn a_deploy_cut_short_after_its_swap_was_decided_is_finished_when_the_deployer_starts_again()
-> Result<()> {
    let mut h = Harness::start().await?;
    h.upload("1", &service(200)).await?;
    h.upload("2", &service(200)).await?;
    let (v1_id, v1_port) = instance(&h.deploy("1", DEADLINE).await?)?;

    // v2 is routable and recorded; the deployer dies while it asks the
    // proxy to deregister v1 (which stays registered).
    h.fake.lock().expect("not poisoned").hold_deregistrations = true;
    h.crash_during("2", |calls| {
        calls
            .iter()
            .any(|c| c.starts_with("held deregister orders-1-"))
    })
    .await?;

    let calls = h.calls();
    let v2_id = registered_id(&calls, "2")?;
    let v2_port = port_of(&v2_id)?;
    ensure!(
        position(&calls, &format!("held deregister {v1_id}"))?
            < position(&calls, &format!("deregister {v1_id}"))?,
        "v1 was not deregistered after the restart: {calls:?}"
    );
    assert_eq!(h.registered(), [v2_id.as_str()]);
    gone(v1_port).await?;
    assert_eq!(h.running().await?, [("2".to_owned(), v2_id.clone())]);
    assert_eq!(version_on(v2_port).await.as_deref(), Some("2"));
    assert!(h.in_flight().is_empty(), "{:?}", h.in_flight());

    // Rollback goes back to v1 from the record of v2's deploy.
    let back = h.rollback().await?;
    assert_eq!(back.replaced, [v2_id.as_str()]);
    Ok(())
}

#[tokio::test]
async fn a_second_instance_found_at_start_up_is_retired_even_with_the_proxy_down() -> Result<()> {
    let mut h = Harness::start().await?;
    h.upload("1", &service(200)).await?;
    let (v1_id, v1_port) = instance(&h.deploy("1", DEADLINE).await?)?;
    h.stop_deployer().await?;

    // An instance of the service the deploy record does not name, started
    // behind the last deployer's back (no in-flight mark).
    let script = h.data.path().join("extra.py");
    std::fs::write(&script, service(200))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let extra_id = format!("orders-2-{port}");
    let supervisor = Supervisor::new(SupervisorConfig::new(h.data.path().join("processes")))?;
    let extra = ProcessSpec {
        service: "orders".into(),
        instance_id: extra_id.clone(),
        version: "2".into(),
        command: [
            "python3",
            "-u",
            &script.display().to_string(),
            &port.to_string(),
            "2",
        ]
        .map(str::to_owned)
        .to_vec(),
        env: BTreeMap::new(),
        work_dir: h.data.path().join("work"),
        log_dir: h.data.path().join("logs"),
    };
    supervisor.start(extra).await?;
    drop(supervisor);
    let deadline = Instant::now() + DEADLINE;
    while version_on(u32::from(port)).await.is_none() {
        ensure!(Instant::now() < deadline, "the extra instance never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The proxy is down: start-up does not wait for it.
    h.proxy.abort();
    let started = Instant::now();
    h.start_again().await?;
    assert!(
        started.elapsed() < DEADLINE / 2,
        "start-up waited for the proxy"
    );
    gone(u32::from(port)).await?;
    assert_eq!(h.running().await?, [("1".to_owned(), v1_id.clone())]);
    assert_eq!(version_on(v1_port).await.as_deref(), Some("1"));

    // The proxy is back: the extra instance's deregistration is retried.
    let deadline = Instant::now() + DEADLINE;
    let listener = loop {
        match tokio::net::TcpListener::bind(h.config.proxy_addr).await {
            Ok(listener) => break listener,
            Err(e) => ensure!(
                Instant::now() < deadline,
                "cannot serve the proxy again: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    h.proxy = serve_proxy(h.fake.clone(), listener);
    let wanted = format!("deregister {extra_id}");
    while !h.calls().contains(&wanted) {
        ensure!(
            Instant::now() < deadline,
            "never deregistered: {:?}",
            h.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!h.calls().contains(&format!("deregister {v1_id}")));
    Ok(())
}

/// A `mesh-deployer` process; killed (SIGKILL) when dropped.
struct Binary {
    child: std::process::Child,
    grpc: SocketAddr,
}

impl Binary {
    /// Starts `mesh-deployer` on `data`, talking to the proxy at `proxy`.
    fn spawn(data: &Path, proxy: SocketAddr) -> Result<Self> {
        let grpc = free_addr()?;
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-deployer"))
            .arg("--node=test-node")
            .arg(format!("--grpc-listen={grpc}"))
            .arg(format!("--admin-listen={}", free_addr()?))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--proxy-addr={proxy}"))
            .arg(format!("--proxy-admin={proxy}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start mesh-deployer")?;
        Ok(Self { child, grpc })
    }

    /// A client, once it answers.
    async fn client(&mut self) -> Result<DeployerClient<Channel>> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match DeployerClient::connect(format!("http://{}", self.grpc)).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    if let Some(status) = self.child.try_wait()? {
                        bail!("mesh-deployer {status}");
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "mesh-deployer never answered: {e}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// What a test leaves on the node: killed when it ends.
struct Leftovers {
    proxy: tokio::task::JoinHandle<()>,
    data: tempfile::TempDir,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        self.proxy.abort();
        kill_recorded(&self.data.path().join("processes"));
    }
}

/// An address on 127.0.0.1 nothing listens on now.
fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Whether process `pid` is gone (or a zombie: ended, not reaped).
fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| matches!(state, "Z" | "X")),
    }
}

#[tokio::test]
async fn a_deployer_killed_in_a_health_gate_leaves_the_old_instance_alone_after_its_restart()
-> Result<()> {
    mesh_runtime::install_crypto_provider();
    let (fake, proxy, proxy_addr) = start_proxy().await?;
    let node = Leftovers {
        proxy,
        data: tempfile::tempdir()?,
    };
    let mut deployer = Binary::spawn(node.data.path(), proxy_addr)?;
    let mut client = deployer.client().await?;
    upload(&mut client, "1", &service(200)).await?;
    upload(&mut client, "2", &slow_service(30)).await?;
    let v1 = client
        .deploy(deploy_request("1", DEADLINE))
        .await?
        .into_inner();
    let (v1_id, v1_port) = instance(&v1)?;
    let v1_pid = v1.instance.as_ref().map_or(0, |i| i.pid);

    // v2 is in its health gate (healthy only after 30 s) when the
    // deployer is killed.
    let mut other = client.clone();
    let deploy = tokio::spawn(async move {
        other
            .deploy(deploy_request("2", Duration::from_secs(60)))
            .await
    });
    let deadline = Instant::now() + DEADLINE;
    let (v2_id, v2_pid) = loop {
        let status = client.status(StatusRequest::default()).await?.into_inner();
        if let Some(i) = status
            .instances
            .iter()
            .find(|i| i.version == "2" && i.pid != 0)
        {
            break (i.instance_id.clone(), i.pid);
        }
        ensure!(Instant::now() < deadline, "v2 never started: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    deployer.kill()?;
    deploy.abort();
    ensure!(!pid_gone(v2_pid), "v2 ended with the deployer");

    let mut deployer = Binary::spawn(node.data.path(), proxy_addr)?;
    let mut client = deployer.client().await?;
    let status = client.status(StatusRequest::default()).await?.into_inner();
    let left: Vec<_> = status
        .instances
        .iter()
        .map(|i| (i.instance_id.as_str(), i.pid))
        .collect();
    assert_eq!(left, [(v1_id.as_str(), v1_pid)]);
    let deadline = Instant::now() + DEADLINE;
    while !pid_gone(v2_pid) {
        ensure!(Instant::now() < deadline, "v2 (pid {v2_pid}) still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gone(port_of(&v2_id)?).await?;
    assert_eq!(version_on(v1_port).await.as_deref(), Some("1"));
    let calls = fake.lock().expect("not poisoned").calls.clone();
    ensure!(
        calls.contains(&format!("deregister {v2_id}")),
        "v2 was not deregistered: {calls:?}"
    );
    assert!(!calls.contains(&format!("deregister {v1_id}")), "{calls:?}");
    Ok(())
}
