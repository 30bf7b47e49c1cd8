//! A small HTTP/1.1 client for talking into a namespace: hyper's
//! `client::conn::http1` over a stream opened inside the namespace, one
//! keep-alive connection reused until it fails. Also raw byte exchanges, for
//! requests a well-behaved client cannot send (two `Host` headers).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Method, Request, StatusCode, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    task::JoinHandle,
};

use crate::{acl::Secret, netns::Netns};

/// Default bound on one request (connect, send, read the whole body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A response read in full.
#[derive(Clone, Debug)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// An HTTP/1.1 client bound to one address inside one namespace, keeping its
/// connection alive between requests.
#[derive(Debug)]
pub struct HttpClient {
    ns: Netns,
    addr: SocketAddr,
    timeout: Duration,
    /// Headers sent with every request (a Consul token), values hidden
    /// from `Debug`.
    headers: Vec<(String, Secret)>,
    conn: Option<Conn>,
}

#[derive(Debug)]
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

/// The status line and headers of a raw exchange.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// Status code of the first response line.
    pub status: u16,
    /// Everything read (head and whatever part of the body arrived).
    pub text: String,
}

// === impl Response ===

impl Response {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON (status {}): {}", self.status, self.text()))
    }

    /// A header's value as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

// === impl HttpClient ===

impl HttpClient {
    /// A client for `addr` inside `ns`; connects on first use.
    pub fn new(ns: &Netns, addr: SocketAddr) -> Self {
        Self {
            ns: ns.clone(),
            addr,
            timeout: REQUEST_TIMEOUT,
            headers: Vec::new(),
            conn: None,
        }
    }

    /// Sends `X-Consul-Token: token` with every request (none: no header).
    pub fn with_consul_token(mut self, token: Option<&str>) -> Self {
        if let Some(token) = token {
            self.headers
                .push(("x-consul-token".into(), Secret::new(token)));
        }
        self
    }

    /// Sets the bound on each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The address it talks to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// GET `path`.
    pub async fn get(&mut self, path: &str) -> Result<Response> {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    /// PUT `path` with `body`.
    pub async fn put(&mut self, path: &str, body: impl Into<Bytes>) -> Result<Response> {
        self.request(Method::PUT, path, &[], body.into()).await
    }

    /// Sends one request. `Host` is the client's address unless `headers`
    /// names one. A failed request drops the connection; the next one
    /// connects again.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response> {
        let mut builder = Request::builder().method(method.clone()).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            builder = builder.header("host", self.addr.to_string());
        }
        for (k, v) in &self.headers {
            if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case(k)) {
                builder = builder.header(k.as_str(), v.expose());
            }
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder.body(Full::new(body)).context("build request")?;
        let timeout = self.timeout;
        let result = tokio::time::timeout(timeout, self.send(req)).await;
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e.context(format!(
                    "{method} {path} to {} in {}",
                    self.addr,
                    self.ns.name()
                )))
            }
            Err(_) => {
                self.conn = None;
                bail!(
                    "{method} {path} to {} in {} timed out after {timeout:?}",
                    self.addr,
                    self.ns.name()
                )
            }
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response> {
        let conn = match self.conn.take() {
            Some(conn) if !conn.sender.is_closed() => conn,
            _ => self.connect().await?,
        };
        let mut conn = conn;
        conn.sender.ready().await.context("connection not ready")?;
        let resp = conn.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.context("read body")?.to_bytes();
        // Kept for the next request only once the whole exchange succeeded,
        // and unless the server said it closes it (RFC 9112 §9.6: no
        // further request on that connection).
        let closing = parts
            .headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if !closing {
            self.conn = Some(conn);
        }
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn connect(&self) -> Result<Conn> {
        let stream = self.ns.connect(self.addr, self.timeout).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1 handshake")?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender, task })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === raw exchanges ===

/// Writes `request` as-is to `addr` inside `ns` and reads the response head
/// (until the blank line, EOF, or `timeout`). Write errors are ignored when a
/// response arrives anyway (a server may answer and close before reading
/// everything, as for a too-large header).
pub async fn raw_exchange(
    ns: &Netns,
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<RawResponse> {
    let work = async {
        let mut stream = ns.connect(addr, timeout).await?;
        let write = stream.write_all(request).await;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Err(e) if buf.is_empty() => {
                    return Err(anyhow!(e).context(format!("read response (write: {write:?})")));
                }
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| text.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("no HTTP status line in {text:?} (write: {write:?})"))?;
        Ok(RawResponse { status, text })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow!("raw exchange with {addr} in {} timed out", ns.name()))?
}
