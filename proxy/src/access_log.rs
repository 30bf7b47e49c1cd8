//! The access log (`access_log`): one JSON object per line for every
//! request the proxy answered, written once its response has ended (or
//! failed): each request of `mesh_proxy_requests_total` (by service, or
//! `_unrouted`) and of `mesh_proxy_inbound_requests_total`, and those the
//! outbound listener's own limit refused (`_listener`). The agent API
//! (registrations) is not logged.
//!
//! The request path never touches the disk: when a response ends, its
//! [`Entry`] goes into a bounded queue to a dedicated writer thread, which
//! formats it (serde_json: names and paths come from clients and are
//! escaped) into a buffered file and flushes at least every
//! [`FLUSH_EVERY`]. A full queue drops the line and counts it in
//! `mesh_proxy_access_log_dropped_total`; the request never waits. With
//! the log off, the request path pays one `Option` check.
//!
//! Rotation: [`AccessLog::reopen`] (SIGHUP, logrotate's `postrotate`)
//! makes the writer reopen the path, and the writer also reopens it on its
//! own when the path no longer names the open file (renamed or deleted:
//! checked every [`CHECK_PATH_EVERY`]). The file is opened with
//! `O_APPEND`, so `copytruncate` works as is.
//!
//! A line, fields in this order:
//! `{"ts":"2026-01-02T03:04:05.678Z","direction":"outbound","node":"n1",
//! "service":"orders","method":"GET","path":"/x","status":200,
//! "duration_ms":1.234,"upstream":"10.0.0.7:8080","retries":0,
//! "bytes_out":512,"reason":""}`, and inbound in mtls mode the calling
//! proxy's identity last (`"peer":"spiffe://<trust domain>/svc/web"`):
//! see [`Entry`].

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    task::{Context, Poll},
    thread,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use mesh_runtime::metrics::{Counter, Registry};
use serde::Serialize;

use crate::{body::ProxyBody, h1::BoxError, tls::PeerIdentity, upstream::Upstream};

/// The longest a written line waits in the buffer before it reaches the file.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// How often the writer checks that its path still names the open file.
pub const CHECK_PATH_EVERY: Duration = Duration::from_secs(2);

/// Lines waiting for the writer; past this, lines are dropped and counted.
pub const QUEUE: usize = 8192;

/// The writer's buffer: whole lines only, so that each write to the file
/// holds whole lines (another process appending to the same file, as
/// during a restart, never splits one).
const BUFFER: usize = 64 << 10;

/// The file's mode when the log creates it.
const MODE: u32 = 0o640;

const DROPPED: &str = "mesh_proxy_access_log_dropped_total";

/// The access log's owner: its writer thread, stopped (everything queued
/// written and flushed) by [`AccessLog::close`].
#[derive(Debug)]
pub struct AccessLog {
    logger: Arc<Logger>,
    reopen: Arc<AtomicBool>,
    writer: Option<thread::JoinHandle<()>>,
}

/// The request path's handle: queues entries without waiting.
#[derive(Debug)]
pub struct Logger {
    queue: SyncSender<Msg>,
    dropped: Counter,
    /// The pseudo-services of requests that matched no service and of the
    /// listener's own limit, made once.
    unrouted: Arc<str>,
    listener: Arc<str>,
}

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From a local service, routed by service name.
    Outbound,
    /// From another node's proxy, for an instance on this node.
    Inbound,
}

/// One request as the access log writes it.
#[derive(Debug)]
pub struct Entry {
    /// The listener it came in on.
    pub direction: Direction,
    /// The service it was routed to, as `/metrics` labels it: `_unrouted`
    /// when it matched none, `_listener` when the listener's own limit
    /// refused it, empty when an inbound request named none.
    pub service: Arc<str>,
    /// Its method.
    pub method: Method,
    /// Its target; the line has its path only (a query may hold secrets).
    pub uri: Uri,
    /// The status the client received (the proxy's own errors included; a
    /// gRPC caller gets those as 200 with a `grpc-status`).
    pub status: StatusCode,
    /// The instance of the last attempt, if one was picked.
    pub upstream: Option<Arc<Upstream>>,
    /// Attempts after the first.
    pub retries: u32,
    /// For an answer the proxy made itself, its error kind (as the body's
    /// `error`: `no_healthy_instance`, `timeout`, `overloaded`, ...); for
    /// a response body that failed midway, `body_failed`; else empty.
    pub reason: &'static str,
    /// From the request's arrival to the end of its response.
    pub duration: Duration,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Inbound in mtls mode: the calling proxy's verified identity.
    pub peer: Option<PeerIdentity>,
    /// When the response ended.
    pub at: SystemTime,
}

/// A response body that sends its request's [`Entry`] once it ends,
/// fails, or is dropped (the client went away): exactly once.
#[derive(Debug)]
pub struct LoggedBody {
    inner: ProxyBody,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    logger: Arc<Logger>,
    entry: Entry,
    start: tokio::time::Instant,
}

// Lines go by value: boxing them would allocate per request, and `Stop`
// is sent once.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Line(Entry),
    Stop,
}

/// Why the access log cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("access_log {}: {source}", path.display())]
pub struct OpenError {
    /// The path.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// A line as written; field order is the line's.
#[derive(Serialize)]
struct Line<'a> {
    ts: &'a str,
    direction: Direction,
    node: &'a str,
    service: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    duration_ms: f64,
    upstream: &'a str,
    retries: u32,
    bytes_out: u64,
    reason: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    peer: &'a str,
}

// === impl AccessLog ===

impl AccessLog {
    /// Opens (creates, mode 0640) `path` for appending and starts its
    /// writer; lines name `node`. Dropped lines are counted on `registry`.
    pub fn open(path: &Path, node: &str, registry: &Registry) -> Result<Self, OpenError> {
        let file = open(path).map_err(|source| OpenError {
            path: path.to_owned(),
            source,
        })?;
        registry.describe_counter(
            DROPPED,
            "Access log lines not written: the writer's queue was full, or the file could not be written.",
        );
        let dropped = registry.counter(DROPPED, &[]);
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            path: path.to_owned(),
            node: node.to_owned(),
            out: Some(BufWriter::with_capacity(BUFFER, file)),
            line: Vec::with_capacity(512),
            reopen: reopen.clone(),
            dropped: dropped.clone(),
            failing: false,
        };
        let writer = thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(&lines))
            .map_err(|source| OpenError {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            logger: Arc::new(Logger {
                queue,
                dropped,
                unrouted: crate::metrics::UNROUTED.into(),
                listener: crate::metrics::LISTENER.into(),
            }),
            reopen,
            writer: Some(writer),
        })
    }

    /// The handle the request path logs with.
    pub fn logger(&self) -> Arc<Logger> {
        self.logger.clone()
    }

    /// Makes the writer reopen the path (after a rotation) within
    /// [`FLUSH_EVERY`]: what was written before goes to the old file.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Writes everything queued, flushes and stops the writer. Lines of
    /// responses that end later are dropped (and counted).
    pub async fn close(mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let queue = self.logger.queue.clone();
        let stopped = tokio::task::spawn_blocking(move || {
            // Waits for room when the queue is full: it is being drained.
            let _ = queue.send(Msg::Stop);
            let _ = writer.join();
        });
        let _ = stopped.await;
    }
}

// === impl Logger ===

impl Logger {
    /// The service label of requests that matched no service.
    pub fn unrouted(&self) -> Arc<str> {
        self.unrouted.clone()
    }

    /// The service label of requests the listener's own limit refused.
    pub fn listener(&self) -> Arc<str> {
        self.listener.clone()
    }

    /// `response` with a body that logs `entry` when it ends; `start`: when
    /// the request arrived.
    pub fn wrap(
        self: &Arc<Self>,
        response: http::Response<ProxyBody>,
        entry: Entry,
        start: tokio::time::Instant,
    ) -> http::Response<ProxyBody> {
        let (parts, inner) = response.into_parts();
        let body = LoggedBody {
            inner,
            pending: Some(Pending {
                logger: self.clone(),
                entry,
                start,
            }),
        };
        http::Response::from_parts(parts, ProxyBody::Logged(Box::new(body)))
    }

    /// Queues `entry` for the writer, or drops and counts it.
    pub fn send(&self, entry: Entry) {
        match self.queue.try_send(Msg::Line(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.increment(1);
            }
        }
    }
}

// === impl Entry ===

impl Entry {
    /// An entry for a request answered with `status`; the rest is filled
    /// in as the request goes (see the fields).
    pub fn new(
        direction: Direction,
        service: Arc<str>,
        method: Method,
        uri: Uri,
        status: StatusCode,
    ) -> Self {
        Self {
            direction,
            service,
            method,
            uri,
            status,
            upstream: None,
            retries: 0,
            reason: "",
            duration: Duration::ZERO,
            bytes_out: 0,
            peer: None,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    /// Writes the entry as one JSON line (with its `\n`) naming `node`.
    pub fn write_line(&self, node: &str, out: &mut impl Write) -> io::Result<()> {
        let upstream = self.upstream.as_ref().map_or_else(String::new, |u| {
            if u.host().contains(':') {
                format!("[{}]:{}", u.host(), u.port())
            } else {
                format!("{}:{}", u.host(), u.port())
            }
        });
        let peer = self
            .peer
            .as_ref()
            .map_or_else(String::new, |p| p.to_string());
        let line = Line {
            ts: &rfc3339_millis(self.at),
            direction: self.direction,
            node,
            service: &self.service,
            method: self.method.as_str(),
            path: self.uri.path(),
            status: self.status.as_u16(),
            // Microseconds in milliseconds: at most three decimals.
            duration_ms: self.duration.as_micros() as f64 / 1000.0,
            upstream: &upstream,
            retries: self.retries,
            bytes_out: self.bytes_out,
            reason: self.reason,
            peer: &peer,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")
    }
}

// === impl LoggedBody ===

impl LoggedBody {
    /// Sends the entry, once; `failed`: the body ended with an error.
    fn finish(&mut self, failed: bool) {
        if let Some(Pending {
            logger,
            mut entry,
            start,
        }) = self.pending.take()
        {
            entry.duration = start.elapsed();
            entry.at = SystemTime::now();
            if failed && entry.reason.is_empty() {
                entry.reason = "body_failed";
            }
            logger.send(entry);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(data), Some(p)) = (frame.data_ref(), &mut this.pending) {
                    p.entry.bytes_out += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(false);
                }
            }
            Some(Err(_)) => this.finish(true),
            None => this.finish(false),
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // An empty body is never polled, a client that went away stops
        // polling: either way the request is over.
        self.finish(false);
    }
}

// === the writer ===

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    node: String,
    out: Option<BufWriter<File>>,
    /// The line being made, whole before it goes into the buffer.
    line: Vec<u8>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
    /// Whether the last write failed (logged once per failing streak).
    failing: bool,
}

impl Writer {
    fn run(mut self, lines: &mpsc::Receiver<Msg>) {
        let mut flushed = Instant::now();
        let mut checked = Instant::now();
        loop {
            let stop = match lines.recv_timeout(FLUSH_EVERY) {
                Ok(Msg::Line(entry)) => {
                    self.write(&entry);
                    false
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => true,
                Err(RecvTimeoutError::Timeout) => false,
            };
            if stop {
                // Whatever was queued before the stop.
                while let Ok(Msg::Line(entry)) = lines.try_recv() {
                    self.write(&entry);
                }
                self.flush();
                return;
            }
            if flushed.elapsed() >= FLUSH_EVERY {
                self.flush();
                flushed = Instant::now();
            }
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.reopen("reopen asked");
                checked = Instant::now();
            } else if checked.elapsed() >= CHECK_PATH_EVERY {
                if !self.path_is_open_file() {
                    self.reopen("the path no longer names the open file");
                }
                checked = Instant::now();
            }
        }
    }

    fn write(&mut self, entry: &Entry) {
        self.line.clear();
        let result = match (&mut self.out, entry.write_line(&self.node, &mut self.line)) {
            (Some(out), Ok(())) => out.write_all(&self.line),
            (None, _) => Err(io::Error::other("the access log is not open")),
            (_, Err(e)) => Err(e),
        };
        self.outcome(result);
    }

    fn flush(&mut self) {
        if let Some(out) = &mut self.out {
            let result = out.flush();
            self.outcome(result);
        }
    }

    fn outcome(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.dropped.increment(1);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(file = %self.path.display(), error = %e, "access log lines are being lost");
                }
            }
        }
    }

    /// Flushes to the old file, then opens the path anew.
    fn reopen(&mut self, why: &str) {
        self.flush();
        match open(&self.path) {
            Ok(file) => {
                tracing::info!(file = %self.path.display(), why, "access log reopened");
                self.out = Some(BufWriter::with_capacity(BUFFER, file));
                self.failing = false;
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, why, "access log cannot be reopened; keeping the open file");
            }
        }
    }

    /// Whether the path still names the file being written (not renamed
    /// away or deleted by a rotation).
    fn path_is_open_file(&self) -> bool {
        let Some(out) = &self.out else { return false };
        match (std::fs::metadata(&self.path), out.get_ref().metadata()) {
            (Ok(at_path), Ok(open)) => at_path.ino() == open.ino() && at_path.dev() == open.dev(),
            // Deleted: reopen creates it.
            (Err(_), _) => false,
            (_, Err(_)) => true,
        }
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(MODE)
        .open(path)
}

/// `at` as RFC 3339 in UTC with milliseconds: `2026-01-02T03:04:05.678Z`.
pub fn rfc3339_millis(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
