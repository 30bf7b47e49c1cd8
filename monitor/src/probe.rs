//! One probe of one target, and what it saw.
//!
//! A probe tells apart:
//!
//! - **down**: the connection is refused, reset or closed before an
//!   answer, or cannot be made within the timeout (nothing serves there);
//! - **hung**: the connection is accepted (the kernel does that for a
//!   process that is alive but stuck) and no complete answer comes within
//!   the timeout. The evidence says whether any byte came at all;
//! - **unhealthy**: an answer came in time and says "not healthy" (an HTTP
//!   status other than 2xx, a gRPC health status other than `SERVING`);
//! - **slow**: a healthy answer, complete within the timeout but later
//!   than the slow threshold;
//! - **up**: a healthy answer within the slow threshold.
//!
//! Latency runs from the start of the connect to the end of the answer's
//! head (HTTP) or the answer itself (gRPC), so a slow accept counts. A TCP
//! probe only connects: it can tell up, slow and down, never hung.

use std::{fmt, io, str::FromStr, time::Duration};

use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tonic::{codegen::http::Uri, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How a target is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// `GET <path>` over HTTP/1.1; 2xx is healthy.
    Http,
    /// A TCP connect.
    Tcp,
    /// `grpc.health.v1.Health/Check` for the server as a whole.
    Grpc,
}

/// A Consul check status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Routable.
    Passing,
    /// Not routable through the mesh (the bridge routes to passing only).
    Warning,
    /// Not routable.
    Critical,
}

/// What one probe saw, as a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A healthy answer within the slow threshold.
    Up,
    /// A healthy answer later than the slow threshold.
    Slow,
    /// Refused, reset, closed, or no connection within the timeout.
    Down,
    /// Connection accepted, no complete answer within the timeout.
    Hung,
    /// An answer in time that says "not healthy".
    Unhealthy,
}

/// One target's probe: what, where, and how long it may take.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    /// How.
    pub kind: ProbeKind,
    /// `host:port`.
    pub addr: String,
    /// The HTTP path (HTTP probes only).
    pub path: String,
}

/// The limits a probe is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest the probe may take.
    pub timeout: Duration,
    /// Healthy answers later than this are slow.
    pub slow: Duration,
}

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    /// The kind of outcome.
    pub outcome: Outcome,
    /// How long the probe took (to the answer, or to the failure).
    pub latency: Duration,
    /// One line saying what happened ("no response within 2s").
    pub evidence: String,
}

// === impl ProbeKind ===

impl ProbeKind {
    /// `http`, `tcp` or `grpc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Grpc => "grpc",
        }
    }
}

impl FromStr for ProbeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Self::Http),
            "tcp" => Ok(Self::Tcp),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!(
                "unknown probe {other:?}: expected http, tcp or grpc"
            )),
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl CheckStatus ===

impl CheckStatus {
    /// Consul's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl FromStr for CheckStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "passing" => Ok(Self::Passing),
            "warning" => Ok(Self::Warning),
            "critical" => Ok(Self::Critical),
            other => Err(format!(
                "unknown check status {other:?}: expected passing, warning or critical"
            )),
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Outcome ===

impl Outcome {
    /// `up`, `slow`, `down`, `hung` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Slow => "slow",
            Self::Down => "down",
            Self::Hung => "hung",
            Self::Unhealthy => "unhealthy",
        }
    }

    /// Every outcome, for metrics.
    pub const ALL: [Outcome; 5] = [
        Self::Up,
        Self::Slow,
        Self::Down,
        Self::Hung,
        Self::Unhealthy,
    ];

    /// The check status it stands for; a slow answer gets `slow_status`.
    pub fn status(self, slow_status: CheckStatus) -> CheckStatus {
        match self {
            Self::Up => CheckStatus::Passing,
            Self::Slow => slow_status,
            Self::Down | Self::Hung | Self::Unhealthy => CheckStatus::Critical,
        }
    }
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown outcome {s:?}"))
    }
}

// === impl ProbeSpec ===

impl ProbeSpec {
    /// `http://host:port/path`, `tcp://host:port` or `grpc://host:port`.
    pub fn url(&self) -> String {
        match self.kind {
            ProbeKind::Http => format!("http://{}{}", self.addr, self.path),
            kind => format!("{kind}://{}", self.addr),
        }
    }
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// Probes `spec` once within `limits`.
pub async fn probe(spec: &ProbeSpec, limits: Limits) -> ProbeResult {
    let start = Instant::now();
    let deadline = start + limits.timeout;
    let judged = |outcome, evidence: String| ProbeResult {
        outcome,
        latency: start.elapsed(),
        evidence,
    };
    let stream = match connect(&spec.addr, deadline, limits.timeout).await {
        Ok(stream) => stream,
        Err(evidence) => return judged(Outcome::Down, evidence),
    };
    let answered = match spec.kind {
        ProbeKind::Tcp => Ok(format!("connected to {}", spec.addr)),
        ProbeKind::Http => http(stream, spec, deadline, limits.timeout).await,
        ProbeKind::Grpc => grpc(stream, spec, deadline, limits.timeout).await,
    };
    let latency = start.elapsed();
    match answered {
        Ok(evidence) if latency > limits.slow => ProbeResult {
            outcome: Outcome::Slow,
            latency,
            evidence: format!(
                "{evidence} after {}, slower than {}",
                ms(latency),
                ms(limits.slow)
            ),
        },
        Ok(evidence) => ProbeResult {
            outcome: Outcome::Up,
            latency,
            evidence: format!("{evidence} in {}", ms(latency)),
        },
        Err((outcome, evidence)) => ProbeResult {
            outcome,
            latency,
            evidence,
        },
    }
}

/// A failed probe: its outcome and evidence.
type Failure = (Outcome, String);

async fn connect(addr: &str, deadline: Instant, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(format!("connection to {addr} refused"))
        }
        Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => Err(format!("no connection to {addr} within {}", ms(timeout))),
    }
}

/// The largest response head read.
const MAX_HEAD: usize = 16 * 1024;

/// `GET path`: the status line and headers must arrive by `deadline`.
async fn http(
    mut stream: TcpStream,
    spec: &ProbeSpec,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, Failure> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: mesh-monitor\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        spec.path, spec.addr
    );
    let io_failure = |e: io::Error, got: usize| -> Failure {
        let what = if got == 0 {
            "before any response"
        } else {
            "mid-response"
        };
        (Outcome::Down, format!("connection failed {what}: {e}"))
    };
    match tokio::time::timeout_at(deadline, stream.write_all(request.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io_failure(e, 0)),
        Err(_) => return Err(hung(0, timeout)),
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(io_failure(e, buf.len())),
            Err(_) => return Err(hung(buf.len(), timeout)),
        };
        if n == 0 {
            let what = if buf.is_empty() {
                "closed the connection without a response"
            } else {
                "closed the connection mid-response"
            };
            return Err((Outcome::Down, what.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = response.code.unwrap_or(0);
                let reason = response.reason.unwrap_or("");
                return if (200..300).contains(&code) {
                    Ok(format!("answered {code}"))
                } else {
                    Err((
                        Outcome::Unhealthy,
                        format!("answered {code} {reason}").trim_end().to_owned(),
                    ))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err((Outcome::Unhealthy, "response head too large".into()));
            }
            Err(e) => {
                return Err((
                    Outcome::Unhealthy,
                    format!("answered something not HTTP: {e}"),
                ));
            }
        }
    }
}

fn hung(got: usize, timeout: Duration) -> Failure {
    let evidence = if got == 0 {
        format!(
            "accepted the connection but sent no response within {}",
            ms(timeout)
        )
    } else {
        format!(
            "sent {got} bytes but no complete response head within {}",
            ms(timeout)
        )
    };
    (Outcome::Hung, evidence)
}

/// `grpc.health.v1.Health/Check` over the connection already made.
async fn grpc(
    stream: TcpStream,
    spec: &ProbeSpec,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, Failure> {
    let endpoint = Endpoint::from_shared(format!("http://{}", spec.addr))
        .map_err(|e| (Outcome::Down, format!("bad address {}: {e}", spec.addr)))?;
    let mut slot = Some(stream);
    let connector = tower::service_fn(move |_: Uri| {
        let stream = slot.take();
        async move {
            stream
                .map(TokioIo::new)
                .ok_or_else(|| io::Error::other("the probe's connection was used"))
        }
    });
    let call = async {
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| (Outcome::Down, format!("HTTP/2 handshake failed: {e}")))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|s| grpc_failure(&s))
    };
    let response = match tokio::time::timeout_at(deadline, call).await {
        Ok(result) => result?.into_inner(),
        Err(_) => {
            return Err((
                Outcome::Hung,
                format!(
                    "accepted the connection but gave no health answer within {}",
                    ms(timeout)
                ),
            ));
        }
    };
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Ok("answered SERVING".into()),
        Ok(other) => Err((
            Outcome::Unhealthy,
            format!("answered {}", other.as_str_name()),
        )),
        Err(_) => Err((
            Outcome::Unhealthy,
            format!("answered unknown status {}", response.status),
        )),
    }
}

fn grpc_failure(status: &tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
            if status.message().contains("connection")
                || status.message().contains("transport") =>
        {
            (
                Outcome::Down,
                format!("gRPC call failed: {}", status.message()),
            )
        }
        tonic::Code::Unimplemented => (
            Outcome::Unhealthy,
            "serves no grpc.health.v1 service".into(),
        ),
        code => (
            Outcome::Unhealthy,
            format!("health check answered {code:?}: {}", status.message()),
        ),
    }
}

/// A duration in whole milliseconds, as `250ms`.
fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests;
