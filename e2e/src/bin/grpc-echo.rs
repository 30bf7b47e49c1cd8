//! grpc-echo: the e2e tests' gRPC service (`meshwork.e2e.echo.Echo`, h2c).
//! Like `meshctl demo serve` it listens on its own address, registers
//! itself through the node's proxy with Consul's agent API (tag `grpc`, a
//! TCP check), and deregisters on SIGTERM.
//!
//! `grpc-echo --name NAME --listen IP:PORT [--id ID] [--proxy http://127.0.0.1:8888]`

use std::{net::SocketAddr, pin::Pin, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures::Stream;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use mesh_e2e::echo::pb::{
    EchoReply, EchoRequest, StreamRequest,
    echo_server::{Echo, EchoServer},
};
use mesh_runtime::{backoff::Backoff, shutdown};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

/// What the command line says.
struct Args {
    name: String,
    listen: SocketAddr,
    id: String,
    proxy: SocketAddr,
}

/// The service: every answer names the instance.
struct EchoService {
    id: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(64);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let (trigger, mut stop) = shutdown::channel();
    let service = EchoServer::new(EchoService {
        id: args.id.clone(),
    });
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { stop.requested().await },
            )
            .await
    });
    eprintln!("grpc-echo {} listening on {}", args.id, args.listen);
    let registered = tokio::select! {
        r = register(&args) => { r?; true }
        _ = shutdown::signal() => false,
    };
    if registered {
        eprintln!("grpc-echo {} registered through {}", args.id, args.proxy);
        shutdown::signal().await;
        let path = format!("/v1/agent/service/deregister/{}", args.id);
        if let Err(e) = put(args.proxy, &path, String::new()).await {
            eprintln!("grpc-echo: could not deregister: {e:#}");
        }
    }
    trigger.trigger();
    server.await??;
    Ok(())
}

/// Registers through the proxy (tag `grpc`, a TCP check), retrying with
/// backoff until it is accepted.
async fn register(args: &Args) -> Result<()> {
    let body = serde_json::json!({
        "Name": args.name,
        "ID": args.id,
        "Address": args.listen.ip().to_string(),
        "Port": args.listen.port(),
        "Tags": ["grpc"],
        "Check": {
            "TCP": args.listen.to_string(),
            "Interval": "1s",
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    });
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match put(args.proxy, "/v1/agent/service/register", body.to_string()).await {
            Ok(200..=299) => return Ok(()),
            Ok(status @ 400..=499) if status != 429 => bail!("registration refused: {status}"),
            Ok(status) => eprintln!("grpc-echo: registration not accepted yet ({status})"),
            Err(e) => eprintln!("grpc-echo: proxy not reachable yet: {e:#}"),
        }
        backoff.wait().await;
    }
}

/// `PUT path` with `body` to the proxy; the status.
async fn put(proxy: SocketAddr, path: &str, body: String) -> Result<u16> {
    let exchange = async {
        let stream = TcpStream::connect(proxy).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::PUT)
            .uri(path)
            .header("host", proxy.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok::<_, anyhow::Error>(status)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("timed out")?
}

// === impl Args ===

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Self> {
        let (mut name, mut listen, mut id) = (None, None, None);
        let mut proxy: SocketAddr = ([127, 0, 0, 1], 8888).into();
        while let Some(flag) = argv.next() {
            let value = argv
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--name" => name = Some(value),
                "--listen" => listen = Some(value.parse().context("--listen")?),
                "--id" => id = Some(value),
                "--proxy" => {
                    let addr = value.strip_prefix("http://").unwrap_or(&value);
                    proxy = addr.parse().context("--proxy")?;
                }
                other => bail!("unknown flag {other}"),
            }
        }
        let name = name.context("--name is required")?;
        let listen: SocketAddr = listen.context("--listen is required")?;
        let id = id.unwrap_or_else(|| format!("{name}-{}", listen.port()));
        Ok(Self {
            name,
            listen,
            id,
            proxy,
        })
    }
}

// === impl EchoService ===

impl EchoService {
    fn reply(&self, message: String, seq: u32) -> EchoReply {
        EchoReply {
            message,
            instance: self.id.clone(),
            seq,
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: GrpcRequest<EchoRequest>,
    ) -> Result<GrpcResponse<EchoReply>, Status> {
        Ok(GrpcResponse::new(
            self.reply(request.into_inner().message, 0),
        ))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: GrpcRequest<StreamRequest>,
    ) -> Result<GrpcResponse<Self::ServerStreamStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let id = self.id.clone();
        tokio::spawn(async move {
            for seq in 0..request.count {
                if request.fail_after > 0 && seq == request.fail_after {
                    let _ = tx
                        .send(Err(Status::aborted("stream broke on purpose")))
                        .await;
                    return;
                }
                let reply = EchoReply {
                    message: format!("{} {seq}", request.message),
                    instance: id.clone(),
                    seq,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(u64::from(request.interval_ms))).await;
            }
        });
        Ok(GrpcResponse::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn client_stream(
        &self,
        request: GrpcRequest<Streaming<EchoRequest>>,
    ) -> Result<GrpcResponse<EchoReply>, Status> {
        let mut inbound = request.into_inner();
        let mut messages = Vec::new();
        while let Some(message) = inbound.next().await {
            messages.push(message?.message);
        }
        let count = u32::try_from(messages.len()).unwrap_or(u32::MAX);
        Ok(GrpcResponse::new(self.reply(messages.join(","), count)))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: GrpcRequest<Streaming<EchoRequest>>,
    ) -> Result<GrpcResponse<Self::BidiStream>, Status> {
        let id = self.id.clone();
        let mut seq = 0u32;
        let replies = request.into_inner().map(move |message| {
            let reply = EchoReply {
                message: message?.message,
                instance: id.clone(),
                seq,
            };
            seq += 1;
            Ok(reply)
        });
        Ok(GrpcResponse::new(Box::pin(replies)))
    }
}
