//! The outbound listener: accepts connections, serves each with hyper
//! (HTTP/1.1 and h2c, detected per connection) until shutdown, then stops
//! accepting and lets open connections finish their requests.
//!
//! hyper enforces the header limits: a header block larger than
//! `max_header_bytes` is answered 431, a client slower than
//! `header_read_timeout` to send its headers is disconnected.

use std::{net::IpAddr, sync::Arc, time::Duration};

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::Instrument;

use crate::{
    config::{Config, MIN_HEADER_BYTES},
    proxy::Proxy,
};

/// Limits hyper enforces on client connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has to send its request headers.
    pub header_read_timeout: Duration,
    /// Largest request header block.
    pub max_header_bytes: usize,
}

// === impl Limits ===

impl Limits {
    /// The limits `config` sets.
    pub fn of(config: &Config) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes,
        }
    }
}

/// Serves `proxy` on `listener` until `shutdown`, then closes idle
/// connections and waits for busy ones (the caller bounds the wait and
/// aborts this task when the grace period is over: the connections, owned
/// by it, close with it).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    mut shutdown: Shutdown,
) {
    let builder = Arc::new(builder(limits));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    let _ = stream.set_nodelay(true);
                    let client = forwarded_for(peer.ip());
                    let proxy = proxy.clone();
                    let service = service_fn(move |req| proxy.clone().serve(req, client.clone()));
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    let span = tracing::debug_span!("client", %peer);
                    connections.spawn(async move {
                        let io = TokioIo::new(stream);
                        let conn = builder.serve_connection(io, service);
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                    }.instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: slow down
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = shutdown.requested() => break,
                    }
                }
            }
        }
    }
    drop(listener);
    tracing::info!(
        connections = connections.len(),
        "outbound listener closed; draining"
    );
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}

fn builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// The client's address as an `X-Forwarded-For` value.
fn forwarded_for(ip: IpAddr) -> HeaderValue {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}
