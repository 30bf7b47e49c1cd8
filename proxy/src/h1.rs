//! The HTTP/1.1 client of the request path. A request is written to a
//! pooled connection and its response read from it by the request's own
//! task: no connection task, no channel and no wake-up between the two.
//! (A client that runs each connection as a task of its own hands every
//! request and every response body across a channel; measured on the
//! proxy, that was a third of its instructions per request.)
//!
//! Framing, RFC 9112 §6: a request body of known length goes with its
//! `Content-Length`, any other with `Transfer-Encoding: chunked`. A
//! response to HEAD, a 1xx, 204 or 304 has no body; then chunked, then
//! `Content-Length`, else the body runs to the close. Refused as a broken
//! answer (the caller's 502): a head over [`MAX_HEAD`] bytes or with more
//! than [`MAX_HEADERS`] fields, anything `httparse` rejects, both
//! `Transfer-Encoding` and `Content-Length` (the classic smuggling shape),
//! a `Content-Length` that is not one number, a transfer coding other than
//! chunked last, a malformed chunk.
//!
//! A connection goes back to the pool only when its exchange completed
//! cleanly: the request body written whole, the response read to its
//! framed end with nothing after it, HTTP/1.1 without `Connection: close`.
//! An interim 1xx is skipped; a `101` hands the socket to the caller with
//! whatever the instance sent after it ([`Upgraded`]).
//!
//! The socket is TCP, or TLS to another node's proxy in mtls mode ([`Io`]).

use std::{
    error::Error as StdError,
    fmt, io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version,
    header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING},
};
use http_body::{Body as _, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use crate::body::UpstreamBody;

/// A boxed error, what bodies and sends fail with.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Largest response head (status line and fields) read from an instance.
pub const MAX_HEAD: usize = 64 * 1024;

/// Most fields in a response head (or in chunked trailers).
pub const MAX_HEADERS: usize = 128;

/// What a read asks the socket for at least.
const READ_SIZE: usize = 8 * 1024;

/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// One HTTP/1.1 connection to an instance (boxed: it moves between the
/// pool, a request and its response body).
pub struct Conn(Box<Inner>);

/// The socket of a connection: TCP, or TLS to another node's proxy (mtls
/// mode, see [`crate::tls`]).
pub enum Io {
    /// Cleartext.
    Tcp(TcpStream),
    /// mTLS with the mesh identities.
    Tls(Box<TlsStream<TcpStream>>),
}

struct Inner {
    io: Io,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// The request head being written; kept for its capacity.
    head: Vec<u8>,
    /// Released when the connection is dropped.
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

/// A `101 Switching Protocols` response's connection, in its extensions:
/// the socket and the bytes the instance sent after the 101, taken once.
#[derive(Clone)]
pub struct Upgraded(std::sync::Arc<std::sync::Mutex<Option<(Io, Bytes)>>>);

/// A send that failed, over HTTP/1.1 or HTTP/2.
#[derive(Debug)]
pub struct SendError {
    /// The request, when none of it was sent (it may go elsewhere).
    pub unsent: Option<Request<UpstreamBody>>,
    /// Why.
    pub error: BoxError,
}

/// An instance's response body, read from its connection as polled.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    /// Whether the connection may carry another exchange once the body
    /// is read to its end.
    reusable: bool,
    /// The rest of the request body, when the instance answered before it
    /// was through: written as this body is read.
    upload: Option<Box<Upload>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes left.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// To the close.
    Close,
    /// Read whole.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line comes next.
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

/// A broken exchange.
#[derive(Debug)]
pub(crate) struct Broken(&'static str);

// === impl Conn ===

impl Conn {
    /// A connection on `io`; `guard` is dropped with it (an open count).
    pub fn new(io: impl Into<Io>, guard: Box<dyn std::any::Any + Send + Sync>) -> Self {
        Self(Box::new(Inner {
            io: io.into(),
            buf: BytesMut::new(),
            head: Vec::new(),
            _guard: guard,
        }))
    }

    /// Whether an idle connection can carry a request: the instance has
    /// neither closed it nor sent anything unasked. Costs no system call
    /// while the socket has shown no activity since its last exchange.
    pub fn is_usable(&self) -> bool {
        if !self.0.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let tcp = self.0.io.tcp();
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: closed, reset or unasked bytes, unless the last
            // read filled its buffer exactly and the readiness is left over.
            // Under TLS any record is one of the former: not reused.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.0.io, Io::Tcp(_))
                    && matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.0.io.tcp().peer_addr().ok())
            .field("buffered", &self.0.buf.len())
            .finish()
    }
}

/// Sends `req` on `conn` and reads the response head; the body follows
/// as the returned response's body is polled.
pub async fn send(conn: Conn, req: Request<UpstreamBody>) -> Result<Response<Body>, SendError> {
    let mut boxed = conn;
    let conn = &mut *boxed.0;
    let (parts, body) = req.into_parts();
    let has_body = !body.is_end_stream();
    let chunked = encode_head(&mut conn.head, &parts, &body);
    // Written whole, or not at all as far as the caller is concerned: an
    // error on the first write means the instance received nothing.
    let mut written = 0;
    while written < conn.head.len() {
        match conn.io.write(&conn.head[written..]).await {
            Ok(0) => {
                return Err(failed(
                    written,
                    parts,
                    body,
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            Ok(n) => written += n,
            Err(e) => return Err(failed(written, parts, body, e)),
        }
    }
    // TLS may hold the head back; TCP has nothing to flush.
    if let Err(e) = conn.io.flush().await {
        return Err(failed(written, parts, body, e));
    }
    let head_only = parts.method == Method::HEAD;
    drop(parts);
    // The body is written while the response head is awaited: an instance
    // may answer before the body is through (a 413, or a full-duplex
    // stream such as an echo), and then the rest of the body follows as
    // the response body is read ([`Body`]).
    let mut upload = has_body.then(|| Upload::new(body, chunked));
    let head = std::future::poll_fn(|cx| {
        if let Some(up) = upload.as_mut()
            && let Poll::Ready(done) = up.poll_drive(&mut conn.io, cx)
        {
            done?;
            upload = None;
        }
        poll_read_head(conn, head_only, cx)
    })
    .await;
    let (mut response, framing, keep_alive) = head.map_err(|error| SendError {
        unsent: None,
        error,
    })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let read = conn.buf.split().freeze();
        let Inner { io, .. } = *boxed.0;
        response
            .extensions_mut()
            .insert(Upgraded(std::sync::Arc::new(std::sync::Mutex::new(Some(
                (io, read),
            )))));
        return Ok(response.map(|()| Body::empty()));
    }
    let body = Body {
        conn: Some(boxed),
        framing,
        reusable: keep_alive && framing != Framing::Close,
        upload: upload.map(Box::new),
    };
    Ok(response.map(|()| body))
}

/// A request body on its way to the instance.
struct Upload {
    body: UpstreamBody,
    chunked: bool,
    /// Encoded and not written yet.
    out: BytesMut,
    /// The body ended; `out` holds the last of it.
    ended: bool,
}

impl Upload {
    fn new(body: UpstreamBody, chunked: bool) -> Self {
        Self {
            body,
            chunked,
            out: BytesMut::new(),
            ended: false,
        }
    }

    /// Writes what the body has ready; `Ready(Ok)` once it was written
    /// whole. Pulls the next frame only when the last one is out, so the
    /// client's body moves at the instance's pace.
    fn poll_drive(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            while !self.out.is_empty() {
                match ready!(Pin::new(&mut *io).poll_write(cx, &self.out)) {
                    Ok(0) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                    }
                    Ok(n) => self.out.advance(n),
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            // Out of TLS's buffer before waiting for more (TCP: nothing).
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    if self.chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    self.ended = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                Some(Ok(frame)) => {
                    // Trailers: an HTTP/1.1 request carries none here.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        self.out
                            .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        self.out.extend_from_slice(&data);
                        self.out.extend_from_slice(b"\r\n");
                    } else {
                        self.out.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn failed(
    written: usize,
    parts: http::request::Parts,
    body: UpstreamBody,
    error: io::Error,
) -> SendError {
    SendError {
        unsent: (written == 0).then(|| Request::from_parts(parts, body)),
        error: error.into(),
    }
}

/// The `Content-Length` a request without one is sent with, over HTTP/1.1
/// and HTTP/2 alike: a body of known size says it; an empty one says 0
/// only for a method that expects content (RFC 9110 §8.6).
pub fn declared_length(method: &Method, body: &UpstreamBody) -> Option<u64> {
    if body.is_end_stream() {
        matches!(*method, Method::POST | Method::PUT | Method::PATCH).then_some(0)
    } else {
        body.size_hint().exact()
    }
}

/// Writes the request head into `out`; says whether the body goes chunked.
fn encode_head(out: &mut Vec<u8>, parts: &http::request::Parts, body: &UpstreamBody) -> bool {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut chunked = false;
    if !parts.headers.contains_key(CONTENT_LENGTH) {
        if let Some(n) = declared_length(&parts.method, body) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        } else if !body.is_end_stream() {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            chunked = true;
        }
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

/// Reads until a final response head is in the buffer; skips interim 1xx.
fn poll_read_head(
    conn: &mut Inner,
    head_only: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, BoxError>> {
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, head_only)? {
                Some(Parsed::Final(response, framing, keep_alive)) => {
                    return Poll::Ready(Ok((response, framing, keep_alive)));
                }
                Some(Parsed::Interim) => continue,
                None if conn.buf.len() >= MAX_HEAD => {
                    return Poll::Ready(Err(Broken("response head too large").into()));
                }
                None => {}
            }
        }
        if ready!(Body::poll_fill(conn, cx))? == 0 {
            return Poll::Ready(Err(
                Broken("connection closed before the response head").into()
            ));
        }
    }
}

/// A final response head, its body's framing, and whether the connection
/// may be kept alive.
type Head = (Response<()>, Framing, bool);

enum Parsed {
    Final(Response<()>, Framing, bool),
    Interim,
}

/// Parses one response head at the start of `buf`, consuming it.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Parsed>, BoxError> {
    // Uninitialised: zeroing the array on every parse would cost more
    // than the parse.
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Broken("too many response header fields").into());
        }
        Err(_) => return Err(Broken("malformed response head").into()),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Broken("malformed status code"))?;
    let http11 = parsed.version == Some(1);
    // Where each field sits in the head, so that the values can be
    // slices of it rather than copies.
    let base = buf.as_ptr() as usize;
    let spans: Vec<(usize, usize, usize, usize)> = parsed
        .headers
        .iter()
        .map(|field| {
            (
                field.name.as_ptr() as usize - base,
                field.name.len(),
                field.value.as_ptr() as usize - base,
                field.value.len(),
            )
        })
        .collect();
    let head = buf.split_to(len).freeze();
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(Parsed::Interim));
    }
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(n, nl, v, vl) in &spans {
        let name = HeaderName::from_bytes(&head[n..n + nl])
            .map_err(|_| Broken("invalid response header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| Broken("invalid response header value"))?;
        headers.append(name, value);
    }
    let framing = framing(status, head_only, &headers)?;
    let keep_alive = http11 && !has_token(&headers, &CONNECTION, "close");
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = headers;
    Ok(Some(Parsed::Final(response, framing, keep_alive)))
}

/// How the body of a response is delimited (RFC 9112 §6.3).
fn framing(status: StatusCode, head_only: bool, headers: &HeaderMap) -> Result<Framing, BoxError> {
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Done);
    }
    let has_cl = headers.contains_key(CONTENT_LENGTH);
    if headers.contains_key(TRANSFER_ENCODING) {
        if has_cl {
            return Err(Broken("both Transfer-Encoding and Content-Length").into());
        }
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty());
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Close,
        });
    }
    if !has_cl {
        return Ok(Framing::Close);
    }
    Ok(match content_length(headers)? {
        None => Framing::Close,
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
    })
}

/// The `Content-Length` of a head: `None` without one; refused when a
/// value is not a number or two disagree.
pub(crate) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Broken> {
    let mut length: Option<u64> = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or(Broken("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Broken("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

// === impl Io ===

impl Io {
    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl From<TcpStream> for Io {
    fn from(tcp: TcpStream) -> Self {
        Self::Tcp(tcp)
    }
}

impl From<TlsStream<TcpStream>> for Io {
    fn from(tls: TlsStream<TcpStream>) -> Self {
        Self::Tls(Box::new(tls))
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

// === impl Upgraded ===

impl Upgraded {
    /// The socket and the bytes read past the 101; `None` once taken.
    pub fn take(&self) -> Option<(Io, Bytes)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

// === impl Body ===

impl Body {
    fn empty() -> Self {
        Self {
            conn: None,
            framing: Framing::Done,
            reusable: false,
            upload: None,
        }
    }

    /// The connection, once the body was read to its end and the
    /// connection may carry another exchange.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        if matches!(self.framing, Framing::Done | Framing::Length(0))
            && self.reusable
            && self.upload.is_none()
        {
            self.conn.take().filter(|c| c.0.buf.is_empty())
        } else {
            None
        }
    }

    /// Reads more into the connection's buffer; `Ok(0)` at the close.
    /// Through `AsyncRead`, which forgets the socket's readiness after a
    /// short read: the next exchange's first read then waits for the
    /// reactor instead of costing a system call that finds nothing.
    fn poll_fill(conn: &mut Inner, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        conn.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(Conn(conn)) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let conn = &mut **conn;
            if let Some(up) = self.upload.as_mut()
                && let Poll::Ready(done) = up.poll_drive(&mut conn.io, cx)
            {
                done?;
                self.upload = None;
            }
            match self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if conn.buf.is_empty() && ready!(Self::poll_fill(conn, cx))? == 0 {
                        return Poll::Ready(Some(Err(
                            Broken("connection closed in the body").into()
                        )));
                    }
                    let n = conn
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = conn.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.framing = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.buf.is_empty() && ready!(Self::poll_fill(conn, cx))? == 0 {
                        self.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match chunk_step(&mut conn.buf, state)? {
                    Step::Need => {
                        if ready!(Self::poll_fill(conn, cx))? == 0 {
                            return Poll::Ready(Some(Err(
                                Broken("connection closed in the body").into()
                            )));
                        }
                    }
                    Step::Next(state) => self.framing = Framing::Chunked(state),
                    Step::Data(data, state) => {
                        self.framing = Framing::Chunked(state);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Step::End(trailers) => {
                        self.framing = Framing::Done;
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                },
            }
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("framing", &self.framing)
            .field("reusable", &self.reusable)
            .finish()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let next = this.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = &next {
            this.framing = Framing::Done;
            this.reusable = false;
        }
        next
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum Step {
    /// More bytes are needed.
    Need,
    /// Moved on without data.
    Next(Chunk),
    /// Chunk data.
    Data(Bytes, Chunk),
    /// The body ended, with its trailers if it had any.
    End(Option<HeaderMap>),
}

/// One step of the chunked decoder over `buf`.
fn chunk_step(buf: &mut BytesMut, state: Chunk) -> Result<Step, BoxError> {
    match state {
        Chunk::Size => {
            let Some(end) = find_crlf(buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(Broken("chunk-size line too long").into());
                }
                return Ok(Step::Need);
            };
            let line = &buf[..end];
            let size = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            let size = parse_hex(size).ok_or(Broken("invalid chunk size"))?;
            buf.advance(end + 2);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::Need);
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = buf.split_to(n).freeze();
            let left = left - n as u64;
            Ok(Step::Data(
                data,
                if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                },
            ))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::Need);
            }
            if &buf[..2] != b"\r\n" {
                return Err(Broken("chunk data not followed by CRLF").into());
            }
            buf.advance(2);
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for field in fields.iter() {
                        let name = HeaderName::from_bytes(field.name.as_bytes())
                            .map_err(|_| Broken("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(field.value)
                            .map_err(|_| Broken("invalid trailer value"))?;
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    Ok(Step::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(Step::Need),
                Ok(httparse::Status::Partial) => Err(Broken("trailers too large").into()),
                Err(_) => Err(Broken("malformed trailers").into()),
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 15 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some(n * 16 + u64::from(v))
    })
}

// === impl Broken ===

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "broken HTTP/1.1 exchange: {}", self.0)
    }
}

impl StdError for Broken {}

#[cfg(test)]
mod tests;
