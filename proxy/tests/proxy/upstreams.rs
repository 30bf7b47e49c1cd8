//! Instances for the protocol tests: a streaming echo (HTTP/1.1 and h2c),
//! a gRPC service (tonic, `mesh.v1` Registry and Discovery as the test
//! API), a WebSocket echo and an instance that refuses upgrades; and the
//! clients that talk to them through the proxy (h2c, gRPC, keep-alive
//! HTTP/1.1 that honours `Connection: close`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_proto::v1::{
    self as pb,
    discovery_server::{Discovery, DiscoveryServer},
    registry_server::{Registry as RegistryApi, RegistryServer},
    route_update::Kind,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};
use tonic::Status;

use crate::support::DEADLINE;

pub type Body = BoxBody<Bytes, hyper::Error>;

// ---------------------------------------------------------------- echo

/// An instance speaking HTTP/1.1 and h2c (hyper-util auto) that streams
/// each request body frame back as it arrives, then trailers
/// `x-echo-frames: <n>`. `x-version` says the HTTP version it was called
/// with; `/slow` answers after 400 ms.
pub struct StreamEcho {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl StreamEcho {
    pub async fn start() -> Self {
        Self::start_with(auto::Builder::new(TokioExecutor::new())).await
    }

    /// An instance that speaks h2c only.
    pub async fn start_h2_only() -> Self {
        Self::start_with(auto::Builder::new(TokioExecutor::new()).http2_only()).await
    }

    async fn start_with(builder: auto::Builder<TokioExecutor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (conns, reqs) = (connections.clone(), requests.clone());
        let builder = Arc::new(builder);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (builder, reqs) = (builder.clone(), reqs.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        reqs.fetch_add(1, Ordering::SeqCst);
                        stream_echo(req)
                    });
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
            task,
        }
    }
}

impl Drop for StreamEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn stream_echo(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let version = format!("{:?}", req.version());
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut frames = 0u32;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        // An empty frame may carry a stream's end alone.
                        frames += u32::from(!data.is_empty());
                        if tx.send(Ok(Frame::data(data))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo-frames", HeaderValue::from(frames));
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let response = Response::builder()
        .header("x-version", version)
        .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
        .unwrap();
    Ok(response)
}

// ---------------------------------------------------------------- clients

/// An h2c (prior knowledge) connection to `addr`.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A request body fed frame by frame through the returned sender.
pub fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, hyper::Error>>, Body) {
    let (tx, rx) = mpsc::channel(16);
    (tx, BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
}

pub fn empty() -> Body {
    BodyExt::boxed(Full::new(Bytes::new()).map_err(|never| match never {}))
}

/// The next frame of `body` within the deadline.
pub async fn next_frame<B>(body: &mut B) -> Option<Frame<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("a frame in time")
        .map(|f| f.unwrap())
}

/// A keep-alive HTTP/1.1 client as a well-behaved one: it reuses its
/// connection until the server says `Connection: close`, and counts the
/// connections it opened.
pub struct KeepAlive {
    addr: SocketAddr,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    pub connections: usize,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            conn: None,
            connections: 0,
        }
    }

    /// GET `path` with `Host: host`; the status, the `connection` header.
    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
    ) -> Result<(StatusCode, Option<String>), String> {
        let mut sender = match self.conn.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let stream = TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(conn);
                self.connections += 1;
                sender
            }
        };
        let req = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let exchange = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            body.collect().await?;
            Ok::<_, hyper::Error>(parts)
        };
        let parts = tokio::time::timeout(DEADLINE, exchange)
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("{e}"))?;
        let connection = parts
            .headers
            .get("connection")
            .map(|v| v.to_str().unwrap().to_owned());
        // RFC 9112 §9.6: no further request after a `close`.
        if !connection
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            self.conn = Some(sender);
        }
        Ok((parts.status, connection))
    }
}

// ---------------------------------------------------------------- gRPC

/// A gRPC instance (tonic). Registry.Register answers `queued: true`, or
/// FAILED_PRECONDITION "refused: <name>" for a service named `fail`.
/// Discovery.Watch streams `services.len()` updates named by the request's
/// `services`, one every 20 ms, then ends OK, or with ABORTED "stream
/// broke" when the node is `break`.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct GrpcApi;

impl GrpcUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = Arc::new(GrpcApi);
        let server = tonic::transport::Server::builder()
            .add_service(RegistryServer::from_arc(api.clone()))
            .add_service(DiscoveryServer::from_arc(api));
        let task = tokio::spawn(async move {
            let _ = server
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self { addr, task }
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tonic::async_trait]
impl RegistryApi for GrpcApi {
    async fn register(
        &self,
        request: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::RegisterResponse>, Status> {
        let name = request.into_inner().service.unwrap_or_default().name;
        if name == "fail" {
            return Err(Status::failed_precondition(format!("refused: {name}")));
        }
        Ok(tonic::Response::new(pb::RegisterResponse { queued: true }))
    }

    async fn deregister(
        &self,
        _request: tonic::Request<pb::DeregisterRequest>,
    ) -> Result<tonic::Response<pb::DeregisterResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn list_instances(
        &self,
        _request: tonic::Request<pb::ListInstancesRequest>,
    ) -> Result<tonic::Response<pb::ListInstancesResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn report_status(
        &self,
        _request: tonic::Request<pb::ReportStatusRequest>,
    ) -> Result<tonic::Response<pb::ReportStatusResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn proxy_stats(
        &self,
        _request: tonic::Request<pb::ProxyStatsRequest>,
    ) -> Result<tonic::Response<pb::ProxyStatsResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

#[tonic::async_trait]
impl Discovery for GrpcApi {
    type WatchStream = ReceiverStream<Result<pb::RouteUpdate, Status>>;

    async fn watch(
        &self,
        request: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for (i, name) in request.services.iter().enumerate() {
                let update = pb::RouteUpdate {
                    version: i as u64 + 1,
                    kind: Some(Kind::Snapshot(pb::Snapshot {
                        services: vec![pb::ServiceEndpoints {
                            name: name.clone(),
                            endpoints: vec![],
                        }],
                    })),
                    stale: false,
                    config: None,
                    intentions: None,
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if request.node == "break" {
                let _ = tx.send(Err(Status::aborted("stream broke"))).await;
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// A gRPC channel to the proxy at `proxy`, calling service `service` by
/// its name in the `:authority` (Host routing), as a gRPC client does.
pub async fn grpc_channel(proxy: SocketAddr, service: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(format!("http://{service}").parse().unwrap())
        .timeout(DEADLINE)
        .connect()
        .await
        .unwrap()
}

// ---------------------------------------------------------------- upgrades

/// How an upgrade instance answers an upgrade request.
#[derive(Clone, Copy, Debug)]
pub enum UpgradeReply {
    /// 101 and a WebSocket echo.
    WebSocket,
    /// A plain answer with this status (no switch).
    Refuse(u16),
}

/// An HTTP/1.1 instance for upgrades. Any request without `Upgrade` gets
/// 200 "plain"; the headers of every upgrade request are kept.
pub struct UpgradeUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl UpgradeUpstream {
    pub async fn start(reply: UpgradeReply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| upgrade(reply, kept.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }
}

impl Drop for UpgradeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upgrade(
    reply: UpgradeReply,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !req.headers().contains_key("upgrade") {
        return Ok(Response::new(Full::new(Bytes::from_static(b"plain"))));
    }
    seen.lock().unwrap().push(req.headers().clone());
    match reply {
        UpgradeReply::Refuse(status) => Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"no upgrade here")))
            .unwrap()),
        UpgradeReply::WebSocket => {
            let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("echo: {}", t.as_str())),
                        Message::Binary(b) => Message::Binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
                let _ = ws.close(None).await;
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", derive_accept_key(&key))
                .body(Full::new(Bytes::new()))
                .unwrap())
        }
    }
}
