//! A minimal HTTP/1.1 client over plain TCP on the node: the health probe
//! of a new instance, the local proxy's agent API and its `/routes`. Both are on this
//! host, so there is no TLS, no pool and no redirect; every call is one
//! connection bounded by a timeout.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::Instrument;

/// The largest answer body read by [`send`] (the rest is an error).
const MAX_BODY: usize = 64 * 1024;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No answer within the timeout.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// Who was called.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The connection or the exchange failed.
    #[error("{addr}: {message}")]
    Failed {
        /// Who was called.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
}

/// Sends one request to `addr` and reads the answer, within `timeout`.
pub(crate) async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpError> {
    call(addr, method, path, body, timeout, MAX_BODY).await
}

/// `GET path` from `addr` within `timeout`, reading an answer of up to
/// `max_body` bytes (the proxy's `/routes` grows with the mesh).
pub(crate) async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<(StatusCode, Bytes), HttpError> {
    call(addr, Method::GET, path, None, timeout, max_body).await
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
    max_body: usize,
) -> Result<(StatusCode, Bytes), HttpError> {
    let exchange = exchange(addr, method, path, body, max_body);
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result.map_err(|message| HttpError::Failed { addr, message }),
        Err(_) => Err(HttpError::Timeout { addr, timeout }),
    }
}

async fn exchange(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    max_body: usize,
) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // The connection ends once `sender` is dropped (or on timeout, with it).
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        }
        .instrument(tracing::debug_span!("http_client", %addr)),
    );
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}
