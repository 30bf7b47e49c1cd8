//! What the proxy's integration tests share: a fake bridge (a real tonic
//! server on port 0 serving `Registry` and `Discovery`), test upstreams
//! (echo, resetting, hanging), a proxy started on port 0, a tiny HTTP
//! client, and `eventually` for deadline-bound assertions.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_proto::v1::{
    self as pb,
    discovery_server::{Discovery, DiscoveryServer},
    registry_server::{Registry as RegistryApi, RegistryServer},
    route_update::Kind,
};
use mesh_proxy::{App, Args, Config};
use mesh_runtime::metrics::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Response as GrpcResponse, Status};

pub const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port nothing listens on for as long as it is held: bound
/// without listening, it refuses connections, and no other test of this
/// binary can take it meanwhile (a port merely found free and let go could
/// be another test's listener a moment later).
pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    ClosedPort { socket, addr }
}

/// A port held closed; see [`closed_port`].
pub struct ClosedPort {
    socket: tokio::net::TcpSocket,
    /// The address that refuses connections.
    pub addr: SocketAddr,
}

impl ClosedPort {
    /// Lets the port go, for the test to listen on it itself.
    pub fn release(self) -> SocketAddr {
        drop(self.socket);
        self.addr
    }

    /// Keeps the port closed until this test binary exits (one socket is
    /// left open for it), for a proxy that outlives the caller's scope.
    pub fn keep(self) -> SocketAddr {
        std::mem::forget(self.socket);
        self.addr
    }
}

// ---------------------------------------------------------------- bridge

/// How the fake bridge answers Register/Deregister.
#[derive(Clone, Debug)]
pub enum Reply {
    Applied,
    Queued,
    Invalid(String),
}

#[derive(Debug)]
pub struct BridgeState {
    services: Mutex<Vec<pb::ServiceEndpoints>>,
    version: AtomicU64,
    /// Snapshots say the bridge cannot reach Consul.
    stale: std::sync::atomic::AtomicBool,
    subscribers: Mutex<Vec<mpsc::Sender<Result<pb::RouteUpdate, Status>>>>,
    pub watches: Mutex<Vec<pb::WatchRequest>>,
    pub registered: Mutex<Vec<pb::ServiceRegistration>>,
    pub deregistered: Mutex<Vec<String>>,
    pub reply: Mutex<Reply>,
    /// Config statuses the proxy reported.
    pub reports: Mutex<Vec<pb::ReportStatusRequest>>,
    /// The intentions every snapshot carries, once set.
    intentions: Mutex<Option<pb::Intentions>>,
}

/// A tonic server implementing `mesh.v1.Registry` and `mesh.v1.Discovery`.
pub struct FakeBridge {
    pub addr: SocketAddr,
    pub state: Arc<BridgeState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeBridge {
    pub async fn start(services: Vec<pb::ServiceEndpoints>) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), services).await
    }

    pub async fn start_on(addr: SocketAddr, services: Vec<pb::ServiceEndpoints>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BridgeState {
            services: Mutex::new(services),
            version: AtomicU64::new(0),
            stale: std::sync::atomic::AtomicBool::new(false),
            subscribers: Mutex::new(Vec::new()),
            watches: Mutex::new(Vec::new()),
            registered: Mutex::new(Vec::new()),
            deregistered: Mutex::new(Vec::new()),
            reply: Mutex::new(Reply::Applied),
            reports: Mutex::new(Vec::new()),
            intentions: Mutex::new(None),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(RegistryServer::from_arc(state.clone()))
            .add_service(DiscoveryServer::from_arc(state.clone()));
        let task = tokio::spawn(async move {
            let _ = server
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Replaces the service set and sends a snapshot to every subscriber.
    pub fn snapshot(&self, services: Vec<pb::ServiceEndpoints>) {
        *self.state.services.lock().unwrap() = services.clone();
        self.state.send(Kind::Snapshot(pb::Snapshot { services }));
    }

    /// Sends a delta to every subscriber.
    pub fn delta(&self, upserted: Vec<pb::ServiceEndpoints>, removed: Vec<&str>) {
        let removed = removed.into_iter().map(str::to_owned).collect();
        self.state
            .send(Kind::Delta(pb::Delta { upserted, removed }));
    }

    /// Sends the node's config version `version` with `text` in a delta
    /// without services, as the bridge does when only the config changed.
    pub fn send_config(&self, version: u64, text: &str) {
        use sha2::Digest;
        let config = pb::NodeConfig {
            version,
            text: text.to_owned(),
            sha256: hex::encode(sha2::Sha256::digest(text.as_bytes())),
        };
        let update = pb::RouteUpdate {
            version: self.state.version.fetch_add(1, Ordering::SeqCst) + 1,
            kind: Some(Kind::Delta(pb::Delta::default())),
            stale: false,
            config: Some(config),
            intentions: None,
        };
        let mut subs = self.state.subscribers.lock().unwrap();
        subs.retain(|s| s.try_send(Ok(update.clone())).is_ok());
    }

    /// Makes `json` (runtime::intentions' form) at `revision` the
    /// intentions: in every snapshot from now on, and sent now in a delta
    /// without services, as the bridge does when only they changed.
    pub fn set_intentions(&self, revision: u64, json: serde_json::Value) {
        let intentions = pb::Intentions {
            revision,
            json: json.to_string(),
        };
        *self.state.intentions.lock().unwrap() = Some(intentions.clone());
        let update = pb::RouteUpdate {
            version: self.state.version.fetch_add(1, Ordering::SeqCst) + 1,
            kind: Some(Kind::Delta(pb::Delta::default())),
            stale: false,
            config: None,
            intentions: Some(intentions),
        };
        let mut subs = self.state.subscribers.lock().unwrap();
        subs.retain(|s| s.try_send(Ok(update.clone())).is_ok());
    }

    /// Config statuses the proxy reported so far.
    pub fn reports(&self) -> Vec<pb::ReportStatusRequest> {
        self.state.reports.lock().unwrap().clone()
    }

    /// Marks the snapshots sent from now on as stale (Consul unreachable).
    pub fn set_stale(&self, stale: bool) {
        self.state.stale.store(stale, Ordering::SeqCst);
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.state.reply.lock().unwrap() = reply;
    }

    pub fn registered(&self) -> Vec<pb::ServiceRegistration> {
        self.state.registered.lock().unwrap().clone()
    }

    /// Ends every stream and stops serving.
    pub async fn stop(mut self) {
        self.state.subscribers.lock().unwrap().clear();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for FakeBridge {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl BridgeState {
    fn send(&self, kind: Kind) {
        let update = pb::RouteUpdate {
            version: self.version.fetch_add(1, Ordering::SeqCst) + 1,
            kind: Some(kind),
            stale: self.stale.load(Ordering::SeqCst),
            config: None,
            intentions: None,
        };
        let mut subs = self.subscribers.lock().unwrap();
        subs.retain(|s| s.try_send(Ok(update.clone())).is_ok());
    }

    fn reply(&self) -> Result<bool, Status> {
        match self.reply.lock().unwrap().clone() {
            Reply::Applied => Ok(false),
            Reply::Queued => Ok(true),
            Reply::Invalid(m) => Err(Status::invalid_argument(m)),
        }
    }
}

#[tonic::async_trait]
impl RegistryApi for BridgeState {
    async fn register(
        &self,
        request: tonic::Request<pb::RegisterRequest>,
    ) -> Result<GrpcResponse<pb::RegisterResponse>, Status> {
        let queued = self.reply()?;
        let service = request.into_inner().service.unwrap_or_default();
        self.registered.lock().unwrap().push(service);
        Ok(GrpcResponse::new(pb::RegisterResponse { queued }))
    }

    async fn deregister(
        &self,
        request: tonic::Request<pb::DeregisterRequest>,
    ) -> Result<GrpcResponse<pb::DeregisterResponse>, Status> {
        let queued = self.reply()?;
        self.deregistered
            .lock()
            .unwrap()
            .push(request.into_inner().id);
        Ok(GrpcResponse::new(pb::DeregisterResponse { queued }))
    }

    async fn list_instances(
        &self,
        request: tonic::Request<pb::ListInstancesRequest>,
    ) -> Result<GrpcResponse<pb::ListInstancesResponse>, Status> {
        assert!(
            request.get_ref().local,
            "the agent API lists local instances"
        );
        let instances = self.registered.lock().unwrap().clone();
        Ok(GrpcResponse::new(pb::ListInstancesResponse { instances }))
    }

    async fn report_status(
        &self,
        request: tonic::Request<pb::ReportStatusRequest>,
    ) -> Result<GrpcResponse<pb::ReportStatusResponse>, Status> {
        self.reports.lock().unwrap().push(request.into_inner());
        Ok(GrpcResponse::new(pb::ReportStatusResponse {}))
    }
    async fn proxy_stats(
        &self,
        _request: tonic::Request<pb::ProxyStatsRequest>,
    ) -> Result<GrpcResponse<pb::ProxyStatsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake bridge does not read proxies",
        ))
    }
}

#[tonic::async_trait]
impl Discovery for BridgeState {
    type WatchStream = ReceiverStream<Result<pb::RouteUpdate, Status>>;

    async fn watch(
        &self,
        request: tonic::Request<pb::WatchRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        self.watches.lock().unwrap().push(request.into_inner());
        let (tx, rx) = mpsc::channel(64);
        let services = self.services.lock().unwrap().clone();
        let first = pb::RouteUpdate {
            version: self.version.fetch_add(1, Ordering::SeqCst) + 1,
            kind: Some(Kind::Snapshot(pb::Snapshot { services })),
            stale: self.stale.load(Ordering::SeqCst),
            config: None,
            intentions: self.intentions.lock().unwrap().clone(),
        };
        tx.try_send(Ok(first)).unwrap();
        self.subscribers.lock().unwrap().push(tx);
        Ok(GrpcResponse::new(ReceiverStream::new(rx)))
    }
}

pub fn service(name: &str, endpoints: Vec<pb::Endpoint>) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        name: name.into(),
        endpoints,
    }
}

pub fn endpoint(id: &str, addr: SocketAddr) -> pb::Endpoint {
    pb::Endpoint {
        id: id.into(),
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
        node: "node-1".into(),
        tags: vec!["t1".into()],
        meta: Default::default(),
    }
}

// ---------------------------------------------------------------- upstreams

#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Answers 200 with JSON {instance, path, headers}.
    Echo,
    /// Reads the request head, then resets the connection.
    Reset,
    /// Accepts and never answers.
    Hang,
}

/// A test instance of a service.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    /// `<method> <target>` of every request an `Echo` instance parsed, in
    /// order (also those whose answer nobody read).
    pub seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start(id: &str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (conns, reqs, id) = (connections.clone(), requests.clone(), id.to_owned());
        let seen_by_task = seen.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                match behaviour {
                    Behaviour::Echo => {
                        let (id, reqs, seen) = (id.clone(), reqs.clone(), seen_by_task.clone());
                        tokio::spawn(async move {
                            let service = service_fn(move |req: Request<Incoming>| {
                                reqs.fetch_add(1, Ordering::SeqCst);
                                seen.lock().unwrap().push(format!(
                                    "{} {}",
                                    req.method(),
                                    req.uri()
                                ));
                                echo(id.clone(), req)
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Behaviour::Reset => {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        read_head(&mut stream).await;
                        let _ = stream.set_zero_linger();
                        drop(stream);
                    }
                    Behaviour::Hang => held.push(stream),
                }
            }
        });
        Self {
            addr,
            connections,
            requests,
            seen,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// `<method> <target>` of the requests seen so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(stream: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn echo(
    id: String,
    req: Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut headers = BTreeMap::<String, Vec<String>>::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.to_string())
            .or_default()
            .push(v.to_str().unwrap_or("").to_owned());
    }
    let version = format!("{:?}", req.version());
    let body = req.into_body().collect().await?.to_bytes();
    let json = serde_json::json!({
        "instance": id,
        "path": path,
        "version": version,
        "headers": headers,
        "body_len": body.len(),
    });
    let response = hyper::Response::builder()
        .header("content-type", "application/json")
        .header("x-instance", id)
        // Hop-by-hop headers the proxy must not pass on.
        .header("connection", "x-up-secret")
        .header("x-up-secret", "1")
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap();
    Ok(response)
}

// ---------------------------------------------------------------- proxy

/// A proxy on port 0 (outbound and admin), with its own metrics registry.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub registry: Registry,
    pub data_dir: PathBuf,
    app: Option<App>,
}

impl TestProxy {
    pub async fn start(bridge: SocketAddr, data_dir: &Path) -> Self {
        Self::start_with(bridge, data_dir, |_| {}).await
    }

    pub async fn start_with(
        bridge: SocketAddr,
        data_dir: &Path,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        mesh_runtime::install_crypto_provider();
        let mut config = Args {
            node: Some("test-node".into()),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            bridge_addr: Some(format!("http://{bridge}")),
            data_dir: Some(data_dir.to_owned()),
            connect_timeout: Some("500ms".parse().unwrap()),
            ..Args::default()
        }
        .validate()
        .unwrap();
        tweak(&mut config);
        let registry = Registry::new();
        let app = App::start(config, registry.clone()).await.unwrap();
        Self {
            addr: app.outbound_addr(),
            admin: app.admin_addr(),
            registry,
            data_dir: data_dir.to_owned(),
            app: Some(app),
        }
    }

    /// The running proxy.
    pub fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown(Duration::from_secs(2)).await;
        }
    }

    /// `/routes` as JSON.
    pub async fn routes(&self) -> serde_json::Value {
        get(self.admin, "/routes", &[]).await.json()
    }

    /// Waits until `/routes` satisfies `ok`.
    pub async fn wait_routes(
        &self,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(what, || async {
            let r = self.routes().await;
            ok(&r).then_some(r)
        })
        .await
    }

    /// Waits until the live table has service `name` with `n` endpoints.
    pub async fn wait_service(&self, name: &str, n: usize) {
        self.wait_routes(&format!("{name} with {n} endpoints"), |r| {
            r["source"] == "live" && r["services"][name].as_array().is_some_and(|e| e.len() == n)
        })
        .await;
    }

    pub fn dump_path(&self) -> PathBuf {
        self.data_dir.join("routes.dump")
    }
}

// ---------------------------------------------------------------- client

/// A response, body read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn instance(&self) -> String {
        self.headers
            .get("x-instance")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

/// Sends `req` on a new HTTP/1.1 connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("response in time")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET path` with `Host: 127.0.0.1` unless `headers` name one.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(addr, "GET", path, headers, Bytes::new()).await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut b = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header("host", addr.ip().to_string());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(addr, b.body(Full::new(body.into())).unwrap()).await
}

/// Writes `raw` bytes and reads the response head until the connection closes.
pub async fn raw(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("read failed after {} bytes: {e}", out.len()),
        Err(_) => panic!("no close in time; got {:?}", String::from_utf8_lossy(&out)),
    }
    String::from_utf8_lossy(&out).into_owned()
}
