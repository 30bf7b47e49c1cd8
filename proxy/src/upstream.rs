//! One instance's connection state: its requests in flight and its pool of
//! idle keep-alive HTTP/1.1 connections.
//!
//! An [`Upstream`] is keyed by address and outlives routing tables: a new
//! table reuses the `Arc` of every instance that stays, so swapping tables
//! neither drops warm connections nor resets the least-request counts.
//!
//! A connection is checked out for one request ([`Lease`]) and goes back
//! to the idle list when the response body has been read to the end
//! ([`PooledBody`]); a body dropped half-read closes its connection, since
//! HTTP/1.1 cannot reuse it. A checked-out connection that turns out to be
//! closed is thrown away: the request was not sent, so the caller may try
//! again elsewhere.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::body::UpstreamBody;

/// Idle connections kept per instance; more are closed. Enough for the
/// concurrency of one busy caller without keeping sockets nobody uses.
pub const MAX_IDLE: usize = 128;

/// An idle connection older than this is closed rather than reused: the
/// instance has likely timed it out already (nginx's default is 60s too).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The sending half of one HTTP/1.1 connection to an instance.
pub type Sender = http1::SendRequest<UpstreamBody>;

/// One instance's address, requests in flight and idle connections.
#[derive(Debug)]
pub struct Upstream {
    host: Box<str>,
    port: u16,
    // Parsed once when the address is an IP, so connecting skips the resolver.
    addr: Option<SocketAddr>,
    in_flight: AtomicUsize,
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// Counts a request against an instance from pick to end of response body.
#[derive(Debug)]
pub struct InFlight(Arc<Upstream>);

/// A connection checked out for one request.
#[derive(Debug)]
pub struct Lease {
    /// The connection.
    pub sender: Sender,
    /// Whether it came from the idle list (so may have gone stale).
    pub reused: bool,
}

/// An instance's response body. Returns its connection to the pool once
/// read to the end, and ends the request's in-flight count when done.
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    held: Option<(Sender, InFlight)>,
}

// === impl Upstream ===

impl Upstream {
    /// An instance at `host:port` (an IP or a name) with no connections yet.
    pub fn new(host: &str, port: u16) -> Self {
        let addr = host.parse().ok().map(|ip| SocketAddr::new(ip, port));
        Self {
            host: host.into(),
            port,
            addr,
            in_flight: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The host part of the address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests in flight to this instance.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Idle connections in the pool.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Counts one more request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// An open idle connection, most recently used first (its socket is
    /// warm), or a new one within `connect_timeout`.
    pub async fn checkout(&self, connect_timeout: Duration) -> io::Result<Lease> {
        while let Some(mut idle) = self.pop_idle() {
            if idle.sender.is_closed() || idle.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Returned right at end of body, the connection task may not
            // have marked it ready yet; it does so at once, or it has closed.
            if idle.sender.ready().await.is_ok() {
                return Ok(Lease {
                    sender: idle.sender,
                    reused: true,
                });
            }
        }
        let sender = self.connect(connect_timeout).await?;
        Ok(Lease {
            sender,
            reused: false,
        })
    }

    /// Puts a connection whose exchange completed back in the idle list.
    pub fn release(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn pop_idle(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    async fn connect(&self, timeout: Duration) -> io::Result<Sender> {
        let connect = async {
            match self.addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect((&*self.host, self.port)).await,
            }
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        // The task ends when the connection closes, which happens once its
        // sender is dropped (pool full, instance gone, proxy stopping).
        let span = tracing::debug_span!("upstream_conn", host = %self.host, port = self.port);
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            }
            .instrument(span),
        );
        Ok(sender)
    }
}

// === impl InFlight ===

impl InFlight {
    /// The instance counted against.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl PooledBody ===

impl PooledBody {
    /// Wraps `inner`, the answer sent on `sender`.
    pub fn new(inner: Incoming, sender: Sender, in_flight: InFlight) -> Self {
        Self {
            inner,
            held: Some((sender, in_flight)),
        }
    }

    /// Ends the exchange: the connection goes back to the pool when the
    /// body was read whole, else it is closed (dropped).
    fn finish(&mut self, complete: bool) {
        // Taken either way: the in-flight count ends here.
        if let Some((sender, in_flight)) = self.held.take()
            && complete
        {
            in_flight.upstream().release(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.finish(true),
            Some(Ok(_)) if this.inner.is_end_stream() => this.finish(true),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.finish(false),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A server that knows the length stops polling after the last
        // frame, and an empty body is never polled: both end here.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let up = Arc::new(Upstream::new("127.0.0.1", 1));
        let a = up.start();
        let b = up.start();
        assert_eq!(up.in_flight(), 2);
        drop(a);
        assert_eq!(up.in_flight(), 1);
        drop(b);
        assert_eq!(up.in_flight(), 0);
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_fails_fast() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let up = Upstream::new("127.0.0.1", port);
        let e = up.checkout(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
