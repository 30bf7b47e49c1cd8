//! A webhook receiver inside a node's namespace: it answers every POST
//! with 204 and keeps the JSON bodies, in arrival order, for a test to
//! read (what an operator's alert sink would have been sent).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::netns::Netns;

/// A running receiver; dropping it stops it.
#[derive(Debug)]
pub struct WebhookSink {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

// === impl WebhookSink ===

impl WebhookSink {
    /// Listens on `listen` inside `ns`; POSTs to any path are kept.
    pub async fn start(ns: &Netns, listen: SocketAddr) -> Result<Self> {
        let socket = ns.socket(listen.is_ipv4()).await?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(listen)
            .with_context(|| format!("webhook sink: bind {listen} in {}", ns.name()))?;
        let listener = socket.listen(64)?;
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| keep(kept.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            url: format!("http://{listen}/alerts"),
            bodies,
            task,
        })
    }

    /// The URL to give mesh-monitor.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every body received so far.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The `event`s (`open`, `resolved`) received for the alert `key`, in
    /// order.
    pub fn events_for(&self, key: &str) -> Vec<String> {
        self.bodies()
            .iter()
            .filter(|b| b["alert"]["key"] == key)
            .map(|b| b["event"].as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps a POST's JSON body; anything else is refused.
async fn keep(
    kept: Arc<Mutex<Vec<Value>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = if req.method() != hyper::Method::POST {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        match req.into_body().collect().await {
            Ok(body) => match serde_json::from_slice::<Value>(&body.to_bytes()) {
                Ok(value) => {
                    kept.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(value);
                    StatusCode::NO_CONTENT
                }
                Err(_) => StatusCode::BAD_REQUEST,
            },
            Err(_) => StatusCode::BAD_REQUEST,
        }
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    Ok(resp)
}
