//! One instance's connection state: its requests in flight, its pool of
//! idle keep-alive HTTP/1.1 connections, and its one multiplexed HTTP/2
//! connection.
//!
//! An [`Upstream`] is keyed by address and outlives routing tables: a new
//! table reuses the `Arc` of every instance that stays, so swapping tables
//! neither drops warm connections nor resets the least-request counts.
//!
//! HTTP/1.1 ([`crate::h1`], driven by the request's own task): a
//! connection is checked out for one request ([`Lease`]) and goes back to
//! the idle list when the response body has been read to the end
//! ([`PooledBody`]); a body dropped half-read closes its connection, since
//! HTTP/1.1 cannot reuse it. An idle connection the instance closed is
//! thrown away at checkout; one that fails as the request is written gives
//! the request back unsent, so the caller may try again elsewhere. A
//! `101 Switching Protocols` hands the socket over to a tunnel.
//!
//! HTTP/2 (h2c, prior knowledge; [`crate::h2_client`], also driven by the
//! request's own task): one connection per instance carries every request
//! as a stream. Streams are bounded ([`H2_MAX_STREAMS`] per connection, as
//! a semaphore whose permit a stream holds until its response body ends);
//! past the bound requests wait for a free stream within the request's
//! deadline rather than queueing without limit inside the HTTP/2 client. A
//! closed connection is replaced on the next checkout, one connect at a
//! time.
//!
//! An upstream may be another node's proxy in mtls mode
//! ([`Upstream::with_tls`]): its connections, HTTP/2 and HTTP/1.1 alike,
//! are then TLS with the mesh identities ([`crate::tls`]).

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

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::Instrument;

use crate::{
    body::UpstreamBody,
    h1::{self, BoxError},
    h2_client,
    limits::Permit,
    protocol::Protocol,
    tls::TlsTarget,
};

/// Idle connections kept per instance; more are closed. Enough for the
/// concurrency of one busy caller without keeping sockets nobody uses.
pub const MAX_IDLE: usize = 128;

/// An idle connection older than this is closed rather than reused: the
/// instance has likely timed it out already (nginx's default is 60s too).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Streams in flight on one HTTP/2 connection to an instance, at most. An
/// instance may allow fewer (its `SETTINGS_MAX_CONCURRENT_STREAMS`); HTTP/2
/// then holds the extra streams back itself.
pub const H2_MAX_STREAMS: usize = 512;

/// The sending half of one connection to an instance.
#[derive(Debug)]
pub enum Sender {
    /// An HTTP/1.1 connection, checked out for this one request.
    Http1(h1::Conn),
    /// The instance's HTTP/2 connection, with the stream this request holds.
    Http2(Arc<H2Conn>, OwnedSemaphorePermit),
}

/// One instance's address, requests in flight and connections.
#[derive(Debug)]
pub struct Upstream {
    host: Box<str>,
    port: u16,
    // Parsed once when the address is an IP, so connecting skips the resolver.
    addr: Option<SocketAddr>,
    in_flight: AtomicUsize,
    idle: Mutex<Vec<Idle>>,
    h2: ArcSwapOption<H2Conn>,
    // Held while connecting over HTTP/2, so that a burst of requests to a
    // fresh instance opens one connection, not one each.
    h2_connecting: tokio::sync::Mutex<()>,
    // Open connections (HTTP/1.1 and HTTP/2), for the service's
    // `max_connections`: each connection task holds one count.
    connections: Arc<AtomicUsize>,
    // Another node's proxy in mtls mode: connections are TLS.
    tls: Option<TlsTarget>,
}

#[derive(Debug)]
struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// An instance's HTTP/2 connection and its stream bound.
#[derive(Debug)]
pub struct H2Conn {
    conn: h2_client::Conn,
    streams: Arc<Semaphore>,
}

/// Counts a request against an instance from pick to end of response body
/// (and holds the request's limit counts, [`crate::limits::Permit`], as long).
#[derive(Debug)]
pub struct InFlight(Arc<Upstream>, Option<Permit>);

/// One open connection's count, given back when its task ends.
#[derive(Debug)]
struct OpenCount(Arc<AtomicUsize>);

/// A connection checked out for one request.
#[derive(Debug)]
pub struct Lease {
    /// The connection.
    pub sender: Sender,
    /// Whether the connection was open already (so may have gone stale).
    pub reused: bool,
}

/// An instance's response body. Returns its connection to the pool (or
/// its HTTP/2 stream) once read to the end, and ends the request's
/// in-flight count when done.
#[derive(Debug)]
pub struct PooledBody {
    inner: Inner,
    /// The request's count on the instance (and its limit counts), and
    /// for HTTP/2 the stream it holds; released when the body ends.
    held: Option<(InFlight, Option<OwnedSemaphorePermit>)>,
}

#[derive(Debug)]
enum Inner {
    Http1(h1::Body),
    Http2(h2_client::Body),
}

pub use crate::h1::SendError;

// === impl Sender ===

impl Sender {
    /// Sends `req` and waits for the response head; the body holds the
    /// connection (or stream) and `in_flight` until it ends. On an error
    /// before the request went out, the error gives it back.
    pub async fn send(
        self,
        req: Request<UpstreamBody>,
        in_flight: InFlight,
    ) -> Result<Response<PooledBody>, SendError> {
        // The request stays HTTP/1.1 with an origin-form URI and its Host
        // header for HTTP/2 too: h2 then sends `:scheme http` and the Host
        // header as is, which RFC 9113 §8.3.1 allows, without building an
        // absolute URI for each request.
        match self {
            Self::Http1(conn) => Ok(h1::send(conn, req).await?.map(|body| PooledBody {
                inner: Inner::Http1(body),
                held: Some((in_flight, None)),
            })),
            Self::Http2(h2, stream) => Ok(h2.conn.send(req).await?.map(|body| PooledBody {
                inner: Inner::Http2(body),
                held: Some((in_flight, Some(stream))),
            })),
        }
    }

    /// The protocol of the connection.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::Http1(_) => Protocol::Http1,
            Self::Http2(..) => Protocol::Http2,
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Http1(conn) => !conn.is_usable(),
            Self::Http2(h2, _) => h2.conn.is_closed(),
        }
    }
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
            h2: ArcSwapOption::empty(),
            h2_connecting: tokio::sync::Mutex::new(()),
            connections: Arc::default(),
            tls: None,
        }
    }

    /// Secures every connection with `target`'s mesh identities: an
    /// upstream that is another node's proxy in mtls mode.
    pub fn with_tls(mut self, target: TlsTarget) -> Self {
        self.tls = Some(target);
        self
    }

    /// The host part of the address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections open to this instance.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    fn count_open(&self) -> OpenCount {
        self.connections.fetch_add(1, Ordering::Relaxed);
        OpenCount(self.connections.clone())
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
        InFlight(self.clone(), None)
    }

    /// A connection for one request over `protocol`, within
    /// `connect_timeout` when one must be opened.
    ///
    /// HTTP/1.1: an open idle connection, most recently used first (its
    /// socket is warm), or a new one. HTTP/2: a stream on the instance's
    /// connection (opened when there is none or it closed), waiting for a
    /// free stream when [`H2_MAX_STREAMS`] are in flight.
    pub async fn checkout(
        &self,
        protocol: Protocol,
        connect_timeout: Duration,
    ) -> io::Result<Lease> {
        match protocol {
            Protocol::Http1 => self.checkout_h1(connect_timeout).await,
            Protocol::Http2 => self.checkout_h2(connect_timeout).await,
        }
    }

    async fn checkout_h1(&self, connect_timeout: Duration) -> io::Result<Lease> {
        while let Some(idle) = self.pop_idle() {
            if idle.conn.is_usable() && idle.since.elapsed() <= IDLE_TIMEOUT {
                return Ok(Lease {
                    sender: Sender::Http1(idle.conn),
                    reused: true,
                });
            }
        }
        // Boxed: the connect path is rare and its future large; inline it
        // would be moved with every request's future.
        let conn = Box::pin(self.connect_h1(connect_timeout)).await?;
        Ok(Lease {
            sender: Sender::Http1(conn),
            reused: false,
        })
    }

    async fn checkout_h2(&self, connect_timeout: Duration) -> io::Result<Lease> {
        let (conn, reused) = match self.open_h2() {
            Some(conn) => (conn, true),
            None => (Box::pin(self.connect_h2(connect_timeout)).await?, false),
        };
        // Lock-free while streams are free; waits (within the caller's
        // deadline) once the connection carries its bound.
        let permit = match conn.streams.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => conn
                .streams
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("HTTP/2 connection closed"))?,
        };
        Ok(Lease {
            sender: Sender::Http2(conn, permit),
            reused,
        })
    }

    /// The instance's HTTP/2 connection while it is open.
    fn open_h2(&self) -> Option<Arc<H2Conn>> {
        self.h2.load_full().filter(|c| !c.conn.is_closed())
    }

    /// Puts a connection whose exchange completed back in the idle list.
    pub fn release(&self, conn: h1::Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the idle connections the instance closed (or sent bytes
    /// unasked on) and those idle past [`IDLE_TIMEOUT`]. Checkout skips
    /// them too, but only when it gets to them: without a sweep, sockets
    /// at the bottom of a busy pool would stay half-closed for good.
    pub fn sweep_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| i.conn.is_usable() && i.since.elapsed() <= IDLE_TIMEOUT);
    }

    /// Whether the instance has an open HTTP/2 connection.
    pub fn has_h2(&self) -> bool {
        self.open_h2().is_some()
    }

    fn pop_idle(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    async fn tcp(&self, timeout: Duration) -> io::Result<TcpStream> {
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
        Ok(stream)
    }

    async fn connect_h1(&self, timeout: Duration) -> io::Result<h1::Conn> {
        let stream = self.tcp(timeout).await?;
        let io = match &self.tls {
            None => h1::Io::from(stream),
            Some(tls) => tls_handshake(tls, Protocol::Http1, stream, timeout)
                .await?
                .into(),
        };
        // Counted open until dropped: pool full, instance gone, closed
        // after a broken exchange, or handed to a tunnel by a 101.
        Ok(h1::Conn::new(io, Box::new(self.count_open())))
    }

    /// The HTTP/2 handshake on `io`; the connection runs in a task of its
    /// own, counted open until it ends.
    async fn h2_handshake<IO>(&self, io: IO, timeout: Duration) -> io::Result<h2_client::Conn>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (conn, run) = tokio::time::timeout(timeout, h2_client::handshake(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out"))?
            .map_err(io::Error::other)?;
        let span = tracing::debug_span!("upstream_h2", host = %self.host, port = self.port);
        let open = self.count_open();
        tokio::spawn(
            async move {
                let _open = open;
                if let Err(e) = run.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            }
            .instrument(span),
        );
        Ok(conn)
    }

    /// Opens the instance's HTTP/2 connection, unless a concurrent
    /// checkout just did.
    async fn connect_h2(&self, timeout: Duration) -> io::Result<Arc<H2Conn>> {
        let _one_at_a_time = tokio::time::timeout(timeout, self.h2_connecting.lock())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?;
        if let Some(conn) = self.open_h2() {
            return Ok(conn);
        }
        let stream = self.tcp(timeout).await?;
        let conn = match &self.tls {
            None => self.h2_handshake(stream, timeout).await?,
            Some(tls) => {
                let stream = tls_handshake(tls, Protocol::Http2, stream, timeout).await?;
                self.h2_handshake(stream, timeout).await?
            }
        };
        let conn = Arc::new(H2Conn {
            conn,
            streams: Arc::new(Semaphore::new(H2_MAX_STREAMS)),
        });
        // Streams waiting on the closed connection's permits wake with an
        // error and the request fails over like any closed connection.
        if let Some(old) = self.h2.swap(Some(conn.clone())) {
            old.streams.close();
        }
        Ok(conn)
    }
}

/// The TLS handshake of a connection to another node's proxy, within
/// `timeout`.
async fn tls_handshake(
    tls: &TlsTarget,
    protocol: Protocol,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tokio::time::timeout(timeout, tls.connect(protocol, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
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

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl PooledBody ===

impl PooledBody {
    /// Keeps the request's limit counts until the body ends.
    pub fn hold(&mut self, permit: Permit) {
        if let Some((in_flight, _)) = &mut self.held {
            in_flight.1 = Some(permit);
        }
    }

    /// Ends the exchange: an HTTP/1.1 connection goes back to the pool
    /// when the body was read whole and the connection allows another
    /// exchange, else it is closed (dropped); an HTTP/2 stream is freed
    /// either way.
    fn finish(&mut self) {
        // Taken either way: the in-flight count ends here.
        if let Some((in_flight, _stream)) = self.held.take()
            && let Inner::Http1(body) = &mut self.inner
            && let Some(conn) = body.take_reusable()
        {
            in_flight.upstream().release(conn);
        }
    }

    fn inner_is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Http1(body) => body.is_end_stream(),
            Inner::Http2(body) => body.is_end_stream(),
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Inner::Http1(body) => ready!(Pin::new(body).poll_frame(cx)),
            Inner::Http2(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|f| f.map_err(Into::into))
            }
        };
        match &frame {
            Some(Ok(_)) if !this.inner_is_end_stream() => {}
            _ => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner_is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http1(body) => body.size_hint(),
            Inner::Http2(body) => body.size_hint(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A server that knows the length stops polling after the last
        // frame, and an empty body is never polled: both end here. A body
        // dropped half-read leaves its HTTP/1.1 connection unusable:
        // `take_reusable` gives nothing and it closes.
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::{TokioExecutor, TokioIo};

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
    async fn sweep_closes_idle_connections_the_instance_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream::new("127.0.0.1", listener.local_addr().unwrap().port());
        let timeout = Duration::from_secs(1);
        let (a, b) = (
            up.checkout(Protocol::Http1, timeout).await.unwrap(),
            up.checkout(Protocol::Http1, timeout).await.unwrap(),
        );
        let (first, _) = listener.accept().await.unwrap();
        let (_second, _) = listener.accept().await.unwrap();
        for lease in [a, b] {
            let Sender::Http1(conn) = lease.sender else {
                panic!("an HTTP/1.1 lease")
            };
            up.release(conn);
        }
        assert_eq!((up.idle_count(), up.connections()), (2, 2));
        up.sweep_idle();
        assert_eq!(up.idle_count(), 2, "both are open");
        // The instance closes one: the next sweeps drop it, and only it.
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while up.idle_count() > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            up.sweep_idle();
        }
        assert_eq!((up.idle_count(), up.connections()), (1, 1));
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_fails_fast() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let up = Upstream::new("127.0.0.1", port);
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let e = up
                .checkout(protocol, Duration::from_secs(1))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{protocol}");
        }
    }

    /// An h2c server on port 0 that answers 200; counts its connections.
    async fn h2_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(
                        http_body_util::Empty::<Bytes>::new(),
                    ))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, connections)
    }

    #[tokio::test]
    async fn h2_streams_share_one_connection_and_wait_past_the_bound() {
        let (addr, connections) = h2_server().await;
        let up = Arc::new(Upstream::new("127.0.0.1", addr.port()));
        let timeout = Duration::from_secs(1);
        let mut leases = Vec::new();
        for _ in 0..H2_MAX_STREAMS {
            leases.push(up.checkout(Protocol::Http2, timeout).await.unwrap());
        }
        assert!(leases[1..].iter().all(|l| l.reused));

        // One more waits for a free stream...
        let waiting = up.checkout(Protocol::Http2, timeout);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(100), &mut waiting).await;
        assert!(early.is_err(), "a stream past the bound waits");
        // ...and gets the one a finished request frees.
        leases.pop();
        let lease = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a freed stream")
            .unwrap();
        assert_eq!(lease.sender.protocol(), Protocol::Http2);
        let req = Request::get("/").body(UpstreamBody::Empty).unwrap();
        let resp = lease.sender.send(req, up.start()).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        assert!(up.has_h2());
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }
}
