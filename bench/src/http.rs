//! A keep-alive HTTP/1.1 client connection (hyper's `client::conn::http1`)
//! to one address, reconnected when it fails; every exchange is bounded by
//! a timeout. Used to poll the proxy, talk to Consul and hold long-polls.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header::HOST};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};

/// Bound on one ordinary exchange (connect, send, read the whole body).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A response read whole.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// A client of one address.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    conn: Option<(SendRequest<Full<Bytes>>, JoinHandle<()>)>,
}

// === impl Reply ===

impl Reply {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "status {}: body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

// === impl Client ===

impl Client {
    /// A client of `addr`; it connects on first use.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply> {
        self.request(Method::GET, host, path, Bytes::new(), TIMEOUT)
            .await
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json(&mut self, path: &str, body: &serde_json::Value) -> Result<Reply> {
        let body = Bytes::from(serde_json::to_vec(body)?);
        let host = self.addr.to_string();
        self.request(Method::PUT, &host, path, body, TIMEOUT).await
    }

    /// One exchange within `timeout`; the connection is dropped after a
    /// failure so the next exchange starts afresh.
    pub async fn request(
        &mut self,
        method: Method,
        host: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, host)
            .body(Full::new(body))?;
        let result = tokio::time::timeout(timeout, self.send(req)).await;
        let result = result
            .map_err(|_| anyhow!("no answer from {} within {timeout:?}", self.addr))
            .and_then(|r| r);
        if result.is_err() {
            self.close();
        }
        result
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply> {
        if self.conn.as_ref().is_none_or(|(s, _)| s.is_closed()) {
            self.conn = Some(self.connect().await?);
        }
        let (sender, _) = self.conn.as_mut().context("connected above")?;
        if sender.ready().await.is_err() {
            // The server closed the idle connection just now: nothing was
            // sent yet, so a new connection may carry the request.
            self.close();
            self.conn = Some(self.connect().await?);
        }
        let (sender, _) = self.conn.as_mut().context("connected above")?;
        sender.ready().await?;
        let response = sender.send_request(req).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn connect(&self) -> Result<(SendRequest<Full<Bytes>>, JoinHandle<()>)> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, task))
    }

    fn close(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}
