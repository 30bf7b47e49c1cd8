//! The outbound listener: accepts connections, serves each with hyper
//! (HTTP/1.1 and h2c, detected per connection, HTTP/1.1 upgrades on) until
//! shutdown, then drains without failing a request.
//!
//! hyper enforces the header limits: a header block larger than
//! `max_header_bytes` is answered 431, a client slower than
//! `header_read_timeout` to send its headers is disconnected.
//!
//! Draining, in order:
//! 1. the listener takes the connections already queued in the kernel,
//!    then closes, so that the kernel hands new connections to the other
//!    process sharing the port (`SO_REUSEPORT`, a new proxy taking over);
//! 2. every HTTP/1 response from then on says `Connection: close`, so each
//!    kept-alive connection closes right after its next exchange and its
//!    client reconnects, to the new process, before sending anything else;
//!    HTTP/2 connections get a GOAWAY at once (hyper's graceful shutdown),
//!    which tells their clients the same without a race;
//! 3. after [`IDLE_CLOSE`], HTTP/1 connections that sent nothing are
//!    closed too (hyper's graceful shutdown: an idle one at once, a busy one
//!    after its response). Closing an idle connection races a client
//!    sending on it, which is why it comes last, not first;
//! 4. the listener waits for every connection and tunnel; its owner aborts
//!    what is left when the grace period ends.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{HeaderValue, Request, StatusCode, Version, header::CONNECTION};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
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

/// How long after the listener closed an HTTP/1 connection may stay open
/// without sending a request; busy ones close sooner, after their next
/// response.
pub const IDLE_CLOSE: Duration = Duration::from_secs(1);

/// Where a listener is in its drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// The listener is closed: `Connection: close` on HTTP/1 responses,
    /// GOAWAY on HTTP/2.
    Draining,
    /// Idle HTTP/1 connections are closed too.
    CloseIdle,
}

/// What each connection shares with the listener.
#[derive(Clone)]
struct Shared {
    builder: Arc<auto::Builder<TokioExecutor>>,
    proxy: Arc<Proxy>,
    phase: watch::Receiver<Phase>,
    draining: Arc<AtomicBool>,
}

/// Serves `proxy` on `listener` until `shutdown`, then drains as the
/// module says. The caller bounds the drain and aborts this task when the
/// grace period is over: the connections and tunnels, owned by it, close
/// with it.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    mut shutdown: Shutdown,
) {
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let shared = Shared {
        builder: Arc::new(builder(limits)),
        proxy,
        phase: phase_rx,
        draining: Arc::new(AtomicBool::new(false)),
    };
    let mut connections = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    // Past `listener_max_connections`: a 503 and closed.
                    if shared.proxy.sheds_connection(connections.len()) {
                        shared.proxy.shed(stream);
                    } else {
                        spawn_connection(&mut connections, &shared, stream, peer);
                    }
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
    for (stream, peer) in take_queued(listener) {
        spawn_connection(&mut connections, &shared, stream, peer);
    }
    shared.draining.store(true, Ordering::Relaxed);
    let _ = phase.send(Phase::Draining);
    tracing::info!(
        connections = connections.len(),
        "outbound listener closed; draining"
    );
    let idle_close = tokio::time::sleep(IDLE_CLOSE);
    tokio::pin!(idle_close);
    loop {
        tokio::select! {
            _ = &mut idle_close, if *phase.borrow() == Phase::Draining => {
                let _ = phase.send(Phase::CloseIdle);
            }
            next = connections.join_next() => if next.is_none() { break },
        }
    }
    shared.proxy.tunnels().drain().await;
}

/// Accepts the connections waiting in the listener's queue, then closes
/// it. A non-blocking `accept` loop rather than the reactor, which may not
/// have seen the latest arrivals: whatever is queued at the close would be
/// reset by the kernel.
fn take_queued(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let mut queued = Vec::new();
    let Ok(listener) = listener.into_std() else {
        return queued;
    };
    while let Ok((stream, peer)) = listener.accept() {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        match stream {
            Ok(stream) => queued.push((stream, peer)),
            Err(e) => tracing::debug!(error = %e, "queued connection unusable"),
        }
    }
    queued
}

fn spawn_connection(
    connections: &mut JoinSet<()>,
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let span = tracing::debug_span!("client", %peer);
    connections
        .spawn(connection(shared.clone(), stream, forwarded_for(peer.ip())).instrument(span));
}

/// Serves one client connection until it closes, or drains it.
async fn connection(shared: Shared, stream: TcpStream, client: HeaderValue) {
    let Shared {
        builder,
        proxy,
        mut phase,
        draining,
    } = shared;
    // Set by the first HTTP/2 request: such a connection gets its GOAWAY
    // as soon as the listener drains.
    let h2 = Arc::new(AtomicBool::new(false));
    let service = {
        let h2 = h2.clone();
        service_fn(move |req: Request<Incoming>| {
            let http1 = req.version() != Version::HTTP_2;
            if !http1 {
                h2.store(true, Ordering::Relaxed);
            }
            let (proxy, client, draining) = (proxy.clone(), client.clone(), draining.clone());
            async move {
                let mut response = proxy.serve(req, client).await?;
                if http1
                    && draining.load(Ordering::Relaxed)
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let done = |result: Result<(), Box<dyn std::error::Error + Send + Sync>>| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    };
    tokio::select! {
        result = conn.as_mut() => return done(result),
        _ = phase.wait_for(|p| *p != Phase::Serving) => {}
    }
    if !h2.load(Ordering::Relaxed) {
        tokio::select! {
            result = conn.as_mut() => return done(result),
            _ = phase.wait_for(|p| *p == Phase::CloseIdle) => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    done(conn.await);
}

/// hyper's connection builder with `limits`, for client connections.
pub(crate) fn builder(limits: Limits) -> auto::Builder<TokioExecutor> {
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
