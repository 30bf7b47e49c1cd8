//! The demo service: what a service on a node does in a mesh. It listens on
//! its own address, registers itself with the local proxy through Consul's
//! agent API (with an HTTP health check), answers every request with who it
//! is, and deregisters when stopped.
//!
//! `GET /health` answers 200 or 503; `PUT /_demo/health` with body `fail` or
//! `ok` flips it, so that tests and demos can make Consul see it critical.
//! `PUT /_demo/answer` with a status code (`500`) makes every other answer
//! carry that status, to show what a harmful route does (`200` undoes it).
//! `GET /_demo/ws` is a WebSocket echo: each text message comes back as
//! `<instance>: <text>`, each binary one as it is.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::{HeaderMap, StatusCode, Uri},
    response::IntoResponse,
    routing::{get, put},
};
use mesh_runtime::{backoff::Backoff, duration::HumanDuration, shutdown};
use serde_json::json;

/// What `meshctl demo serve` was told.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Service name to register.
    pub name: String,
    /// Instance ID; defaults to `<name>-<port>`.
    pub id: Option<String>,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address to register (what other nodes connect to); defaults to the listen IP.
    pub advertise: Option<String>,
    /// The local proxy's base URL.
    pub proxy: String,
    /// Health check interval Consul uses.
    pub check_interval: HumanDuration,
    /// Skip registration (serve only).
    pub no_register: bool,
}

#[derive(Clone)]
struct Demo {
    name: Arc<str>,
    id: Arc<str>,
    node: Arc<str>,
    healthy: Arc<AtomicBool>,
    /// The status of ordinary answers.
    status: Arc<AtomicU16>,
}

impl DemoConfig {
    fn instance_id(&self, port: u16) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.name, port))
    }
}

/// Runs the demo service until SIGTERM/SIGINT, then deregisters it.
pub async fn serve(config: DemoConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    let id = config.instance_id(local.port());
    let demo = Demo {
        name: config.name.as_str().into(),
        id: id.as_str().into(),
        node: hostname().into(),
        healthy: Arc::new(AtomicBool::new(true)),
        status: Arc::new(AtomicU16::new(200)),
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/_demo/health", put(set_health))
        .route("/_demo/answer", put(set_answer))
        .route("/_demo/ws", get(ws_echo))
        .fallback(answer)
        .with_state(demo);
    let (trigger, mut stop) = shutdown::channel();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.requested().await })
            .await
    });
    tracing::info!(name = %config.name, %id, addr = %local, "demo service listening");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let registration = tokio::select! {
        r = register(&client, &config, &id, local), if !config.no_register => r.map(Some),
        _ = shutdown::signal() => Ok(None),
    }?;
    if registration.is_some() || config.no_register {
        shutdown::signal().await;
    }
    if registration.is_some() {
        deregister(&client, &config.proxy, &id).await;
    }
    trigger.trigger();
    server.await??;
    Ok(())
}

/// Registers through the proxy, retrying with backoff until it is accepted
/// (200 applied, 202 queued). A 4xx other than 429 is final.
async fn register(
    client: &reqwest::Client,
    config: &DemoConfig,
    id: &str,
    local: SocketAddr,
) -> anyhow::Result<()> {
    let address = config
        .advertise
        .clone()
        .unwrap_or_else(|| local.ip().to_string());
    let body = json!({
        "Name": config.name,
        "ID": id,
        "Address": address,
        "Port": local.port(),
        "Tags": ["demo"],
        "Meta": {"version": env!("CARGO_PKG_VERSION")},
        "Check": {
            "HTTP": format!("http://{address}:{}/health", local.port()),
            "Interval": config.check_interval.to_string(),
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    });
    let url = format!("{}/v1/agent/service/register", config.proxy);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        match client.put(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(%id, status = %r.status(), "registered through the proxy");
                return Ok(());
            }
            Ok(r)
                if r.status().is_client_error() && r.status() != StatusCode::TOO_MANY_REQUESTS =>
            {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                anyhow::bail!("registration refused ({status}): {text}");
            }
            Ok(r) => tracing::warn!(status = %r.status(), "registration not accepted yet"),
            Err(e) => tracing::warn!(error = %e, "proxy not reachable yet"),
        }
        backoff.wait().await;
    }
}

async fn deregister(client: &reqwest::Client, proxy: &str, id: &str) {
    let url = format!("{proxy}/v1/agent/service/deregister/{id}");
    match client.put(&url).send().await {
        Ok(r) => tracing::info!(%id, status = %r.status(), "deregistered"),
        Err(e) => tracing::warn!(%id, error = %e, "could not deregister"),
    }
}

async fn health(State(demo): State<Demo>) -> StatusCode {
    if demo.healthy.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn set_health(State(demo): State<Demo>, body: String) -> impl IntoResponse {
    match body.trim() {
        "ok" => demo.healthy.store(true, Ordering::Relaxed),
        "fail" => demo.healthy.store(false, Ordering::Relaxed),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected `ok` or `fail`, got {other:?}\n"),
            );
        }
    }
    (StatusCode::OK, format!("{}\n", body.trim()))
}

async fn set_answer(State(demo): State<Demo>, body: String) -> impl IntoResponse {
    match body
        .trim()
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        Some(code) if (200..600).contains(&code.as_u16()) => {
            demo.status.store(code.as_u16(), Ordering::Relaxed);
            (StatusCode::OK, format!("{}\n", code.as_u16()))
        }
        _ => (
            StatusCode::BAD_REQUEST,
            format!(
                "expected a status code from 200 to 599, got {:?}\n",
                body.trim()
            ),
        ),
    }
}

async fn ws_echo(State(demo): State<Demo>, ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.on_upgrade(move |socket| echo_socket(socket, demo.id))
}

async fn echo_socket(mut socket: WebSocket, id: Arc<str>) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) => Message::Text(format!("{id}: {}", text.as_str()).into()),
            Message::Binary(bytes) => Message::Binary(bytes),
            Message::Close(_) => break,
            // Pings are answered by axum itself.
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

async fn answer(State(demo): State<Demo>, uri: Uri, headers: HeaderMap) -> impl IntoResponse {
    let forwarded_for = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let status =
        StatusCode::from_u16(demo.status.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK);
    (
        status,
        [("x-instance", demo.id.to_string())],
        Json(json!({
            "service": &*demo.name,
            "instance": &*demo.id,
            "node": &*demo.node,
            "path": uri.to_string(),
            "forwarded_for": forwarded_for,
        })),
    )
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
