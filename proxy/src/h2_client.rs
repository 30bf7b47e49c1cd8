//! The HTTP/2 client of the request path, on the `h2` crate: a request's
//! own task opens its stream and reads its response. The connection's task
//! only moves frames and pings. (hyper's HTTP/2 client hands every request
//! to the connection's task over a channel and spawns a task per response
//! that sends it back over another: measured on the proxy, those hops were
//! a tenth of its instructions per request over h2c.)
//!
//! What hyper's client did and this one keeps: connection-specific
//! headers never reach HTTP/2 (the request path strips them before, see
//! [`crate::headers`]); a request without `Content-Length` gets the one
//! HTTP/1.1 would send ([`h1::declared_length`]);
//! a request body streams from a task of its own, polled before it claims
//! any send window, so that a body with nothing to send never holds
//! window another stream needs; a reset with `NO_ERROR` ends a response
//! body early but cleanly (RFC 9113 §8.1); a PING every
//! [`KEEP_ALIVE`]`.0` must be answered within [`KEEP_ALIVE`]`.1` or the
//! connection is closed. Windows are fixed at hyper's defaults (2 MiB per
//! stream, 5 MiB per connection).

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{
    Ping, Reason, RecvStream, SendStream,
    client::{Connection, SendRequest},
};
use http::{HeaderValue, Request, Response, header::CONTENT_LENGTH};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    body::UpstreamBody,
    h1::{self, BoxError, SendError},
};

/// PING interval on a connection, and how long its answer may take:
/// finds an instance that vanished without a FIN.
pub const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// Receive window of one stream.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// Receive window of the connection.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Streams opened before the instance's SETTINGS say how many it allows.
const INITIAL_MAX_STREAMS: usize = 100;

/// Bytes of request bodies buffered per stream before their sender waits.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// The sending side of one HTTP/2 connection, and whether it has ended.
#[derive(Debug)]
pub struct Conn {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// An instance's response body, read from its stream as polled.
#[derive(Debug)]
pub struct Body {
    recv: RecvStream,
    data_done: bool,
    /// What `Content-Length` says is left.
    remaining: Option<u64>,
}

// === impl Conn ===

impl Conn {
    /// Whether the connection has ended (closed, failed or unanswered
    /// PING); its streams have failed with it.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` on a new stream and waits for the response head. A
    /// request body streams from a task of its own.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Body>, SendError> {
        let mut sender = self.sender.clone();
        if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
            return Err(SendError {
                unsent: Some(req),
                error: e.into(),
            });
        }
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(CONTENT_LENGTH)
            && let Some(len) = h1::declared_length(&parts.method, &body)
        {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        let eos = body.is_end_stream();
        let sent = |e: h2::Error| SendError {
            unsent: None,
            error: e.into(),
        };
        let (response, stream) = sender
            .send_request(Request::from_parts(parts, ()), eos)
            .map_err(sent)?;
        if !eos {
            tokio::spawn(Pipe::new(body, stream));
        }
        let response = response.await.map_err(sent)?;
        // For the size hint only: h2 itself holds the body to its length.
        let remaining = h1::content_length(response.headers()).ok().flatten();
        Ok(response.map(|recv| Body {
            recv,
            data_done: false,
            remaining,
        }))
    }
}

/// The HTTP/2 handshake on `io`: the connection, and the future that runs
/// it (to spawn), which ends when the connection does.
pub async fn handshake<IO>(
    io: IO,
) -> Result<(Conn, impl Future<Output = Result<(), BoxError>> + Send), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_max_send_streams(INITIAL_MAX_STREAMS)
        .max_header_list_size(h1::MAX_HEAD as u32)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let conn = Conn {
        sender,
        closed: closed.clone(),
    };
    let run = async move {
        let result = drive(connection).await;
        closed.store(true, Ordering::Release);
        result
    };
    Ok((conn, run))
}

/// Runs `connection` until it ends, with a PING every [`KEEP_ALIVE`]`.0`
/// that must be answered in time, else the connection is dropped (its
/// socket closed, its streams failed).
async fn drive<IO>(mut connection: Connection<IO, Bytes>) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mut ping) = connection.ping_pong() else {
        return connection.await.map_err(Into::into);
    };
    let mut connection = std::pin::pin!(connection);
    loop {
        tokio::select! {
            ended = connection.as_mut() => return ended.map_err(Into::into),
            () = tokio::time::sleep(KEEP_ALIVE.0) => {}
        }
        let answered = tokio::time::timeout(KEEP_ALIVE.1, ping.ping(Ping::opaque()));
        tokio::select! {
            ended = connection.as_mut() => return ended.map_err(Into::into),
            answered = answered => match answered {
                Ok(Ok(_pong)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(format!("PING unanswered after {:?}", KEEP_ALIVE.1).into()),
            },
        }
    }
}

// === impl Body ===

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read means consumed: the instance may send more.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(early_end(e)),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(early_end(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A stream error while reading: a reset with `NO_ERROR` is an instance
/// that answered before reading the whole request and ends the body
/// cleanly; any other fails it.
fn early_end(e: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    (e.reason() != Some(Reason::NO_ERROR)).then_some(Err(e))
}

/// A request body streaming to its stream: each frame polled before any
/// send window is claimed for it, then sent once the window allows.
struct Pipe {
    body: UpstreamBody,
    stream: SendStream<Bytes>,
    /// A chunk waiting for window, and whether it ends the body.
    waiting: Option<(Bytes, bool)>,
}

impl Pipe {
    fn new(body: UpstreamBody, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            waiting: None,
        }
    }

    /// Drives the body to its end; `Err` when the stream was reset or the
    /// body failed (the stream is then reset too).
    fn poll_pipe(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // Registered while waiting for the body or for window, so that
            // a reset by the instance ends the wait.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx)? {
                return Poll::Ready(Err(h2::Error::from(reason).into()));
            }
            if let Some((_, eos)) = &self.waiting {
                let eos = *eos;
                while self.stream.capacity() == 0 {
                    match ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Poll::Ready(Err(e.into())),
                        None => return Poll::Ready(Err("the stream closed while sending".into())),
                    }
                }
                let (chunk, _) = self.waiting.take().unwrap_or_default();
                self.stream.send_data(chunk, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = self.body.is_end_stream();
                        if !chunk.has_remaining() {
                            // Needs no window: sent at once.
                            self.stream.send_data(chunk, eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // One byte claimed: h2 raises the claim to the
                        // chunk when it is sent.
                        self.stream.reserve_capacity(1);
                        self.waiting = Some((chunk, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    self.stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(e.into()));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl Future for Pipe {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let result = ready!(self.get_mut().poll_pipe(cx));
        if let Err(e) = result {
            tracing::debug!(error = %e, "request body to an HTTP/2 instance ended early");
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests;
