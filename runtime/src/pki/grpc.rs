//! mTLS on a component's gRPC listener, and who may call what.
//!
//! [`ServerTls`] keeps a listener's credentials from the `tls_dir` that
//! mesh-bridge keeps on the node: the trust bundle (`ca.crt`) and one key
//! and certificate pair (`node.key` + `node.crt` for the node's identity,
//! `svc/<name>.key` + `.crt` for a service's). [`ServerTls::watch`] reads
//! them again every [`POLL`], so a renewed certificate is presented from
//! the next handshake on; a pair that does not load (half written, or not
//! issued yet) is left for the next read, and until a first pair loads the
//! listener takes no TLS connection.
//!
//! [`ServerTls::incoming`] accepts TLS connections with a client
//! certificate from the mesh CA naming one identity in the trust domain
//! and, where the component says so ([`Plaintext::Loopback`]), plaintext
//! connections from the host itself: the node is the unit of trust (its
//! proxy and its tools call their own node's bridge on 127.0.0.1), so a
//! local caller needs no certificate while every other host must show one.
//! Plaintext from any other address is closed unanswered. The first byte
//! tells the two apart: a TLS handshake starts with a handshake record
//! (0x16), an HTTP/2 connection with its preface (`PRI * ...`).
//!
//! Each accepted connection carries its [`Peer`] into every request's
//! extensions, and [`Authorize`] asks a [`CallPolicy`] whether that peer may
//! call the method. `grpc.health.v1.Health` is open to every peer the
//! listener accepted.

use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
    transport::server::Connected,
};
use tracing::Instrument;

use super::{CertResolver, Credentials, LocalKey, SpiffeId, TrustBundle, peer_identity};
use crate::shutdown::Shutdown;

/// The trust bundle's file in `tls_dir`.
pub const CA_FILE: &str = "ca.crt";
/// The node's key in `tls_dir`.
pub const NODE_KEY: &str = "node.key";
/// The node's certificate in `tls_dir`.
pub const NODE_CERT: &str = "node.crt";
/// How often `tls_dir` is read for renewed credentials.
pub const POLL: Duration = Duration::from_secs(1);
/// How long a connection has to complete its TLS handshake (or, where
/// plaintext is allowed, to send its first byte).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The health service every accepted peer may call.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Connections accepted but not yet served.
const ACCEPT_QUEUE: usize = 64;
/// Handshakes in progress at once; accepting waits beyond.
const MAX_HANDSHAKES: usize = 256;

/// The relative paths of a service's key and certificate in `tls_dir`.
pub fn service_files(service: &str) -> (String, String) {
    (format!("svc/{service}.key"), format!("svc/{service}.crt"))
}

/// Whether a listener with TLS also takes plaintext connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plaintext {
    /// TLS only.
    Refused,
    /// Plaintext from a loopback address (the host itself), TLS from any.
    Loopback,
}

/// One listener's credentials, kept up to date from `tls_dir`.
pub struct ServerTls {
    dir: PathBuf,
    key_file: String,
    cert_file: String,
    identity: SpiffeId,
    /// Whether TLS clients without a certificate are taken (they must
    /// authenticate otherwise; see [`CallPolicy::anonymous`]).
    client_auth_optional: bool,
    /// The server config of the credentials last loaded; none before the
    /// first pair loads.
    config: Mutex<Option<Arc<ServerConfig>>>,
    /// The files as last applied.
    seen: Mutex<Option<Files>>,
}

/// Why the credentials in `tls_dir` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("tls_dir: {}: {reason}", path.display())]
pub struct TlsError {
    /// The file concerned.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// Who is calling: the connection's remote address and, over TLS, the
/// identity its certificate names (verified during the handshake).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub addr: Option<SocketAddr>,
    /// The verified identity; `None` for a plaintext connection, which
    /// [`ServerTls::incoming`] takes from loopback addresses only, and for
    /// a TLS client without a certificate where that is allowed.
    pub identity: Option<SpiffeId>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// An accepted connection: plaintext from the host itself, or TLS.
pub enum Conn {
    /// Plaintext from a loopback address.
    Plain(TcpStream, Peer),
    /// Mutual TLS with a verified identity.
    Tls(Box<TlsStream<TcpStream>>, Peer),
}

/// Decides per method which verified identities may call.
pub trait CallPolicy: fmt::Debug + Send + Sync + 'static {
    /// `Ok` when `peer` may call `method` of `service` (the gRPC path's two
    /// parts, as in `/mesh.v1.Checks/SetCheck`); otherwise who may.
    fn check(&self, service: &str, method: &str, peer: &SpiffeId) -> Result<(), String>;

    /// `Ok` when a TLS client without a certificate may call `method` of
    /// `service` (only where [`ServerTls::held`] takes such clients; they
    /// authenticate otherwise, with a token).
    fn anonymous(&self, service: &str, method: &str) -> Result<(), String> {
        let _ = (service, method);
        Err("a client certificate from the mesh CA is needed".into())
    }
}

/// Checks every call against a [`CallPolicy`], in front of the service.
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    policy: Option<Arc<dyn CallPolicy>>,
}

/// `ca.crt`, the key and the certificate as read at one poll.
type Files = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Serves `router` on `listener` until `shutdown`: with `tls`, through
/// [`ServerTls::incoming`] (taking plaintext as `plaintext` says), else
/// plaintext. Small writes leave at once (TCP_NODELAY) either way.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    plaintext: Plaintext,
    mut shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let stop = shutdown.clone();
    let requested = async move { shutdown.requested().await };
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener, plaintext, stop), requested)
                .await
        }
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, requested)
                .await
        }
    }
}

// === impl ServerTls ===

impl ServerTls {
    /// Credentials for `identity` from `dir`, with the pair at `key_file`
    /// and `cert_file` (relative to `dir`), nothing loaded yet: until
    /// [`Self::reload`] or [`Self::watch`] loads a pair, TLS connections are
    /// closed.
    pub fn new(
        dir: impl Into<PathBuf>,
        identity: SpiffeId,
        key_file: &str,
        cert_file: &str,
    ) -> Self {
        Self {
            dir: dir.into(),
            key_file: key_file.to_owned(),
            cert_file: cert_file.to_owned(),
            identity,
            client_auth_optional: false,
            config: Mutex::new(None),
            seen: Mutex::new(None),
        }
    }

    /// Credentials for `identity` that the caller keeps with
    /// [`Self::install`] (no `tls_dir`), taking TLS clients with and
    /// without a certificate.
    pub fn held(identity: SpiffeId) -> Self {
        Self {
            client_auth_optional: true,
            ..Self::new(PathBuf::new(), identity, "", "")
        }
    }

    /// Presents `resolver`'s certificate and trusts `bundle` from the next
    /// handshake on.
    pub fn install(
        &self,
        bundle: &TrustBundle,
        resolver: Arc<CertResolver>,
    ) -> Result<(), TlsError> {
        let config = self.config_for(bundle, resolver)?;
        *lock(&self.config) = Some(config);
        Ok(())
    }

    /// The node's credentials (`node.key`, `node.crt`) for `identity`,
    /// which must load now; an error names the file and what is wrong.
    pub fn load_node(dir: impl Into<PathBuf>, identity: SpiffeId) -> Result<Self, TlsError> {
        let tls = Self::new(dir, identity, NODE_KEY, NODE_CERT);
        tls.reload()?;
        Ok(tls)
    }

    /// The identity presented.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Whether a pair is loaded (TLS connections are taken).
    pub fn is_loaded(&self) -> bool {
        lock(&self.config).is_some()
    }

    /// Reads the files and, when they changed, uses them for the next
    /// handshakes; `Ok(true)` when new credentials were applied.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = self.read_files()?;
        if lock(&self.seen).as_ref() == Some(&files) {
            return Ok(false);
        }
        let config = self.server_config(&files)?;
        *lock(&self.config) = Some(config);
        *lock(&self.seen) = Some(files);
        Ok(true)
    }

    /// Reads `tls_dir` every [`POLL`] until `shutdown`; a changed set that
    /// loads is used for the next handshakes, one that does not is logged
    /// once and read again.
    pub async fn watch(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut refused: Option<String> = None;
        loop {
            match self.reload() {
                Ok(true) => {
                    refused = None;
                    tracing::info!(identity = %self.identity, "new credentials from tls_dir");
                }
                Ok(false) => {}
                Err(e) => {
                    let reason = e.to_string();
                    if refused.as_ref() != Some(&reason) {
                        tracing::warn!(error = %reason, "credentials in tls_dir not used (yet)");
                        refused = Some(reason);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Accepts TCP connections on `listener` and hands out those that
    /// complete the TLS handshake in time (and, with
    /// [`Plaintext::Loopback`], plaintext ones from loopback addresses),
    /// until `shutdown`. A refused connection is logged at debug and closed.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        plaintext: Plaintext,
        mut shutdown: Shutdown,
    ) -> ReceiverStream<Result<Conn, io::Error>> {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept = async move {
            loop {
                let permit = tokio::select! {
                    _ = shutdown.requested() => return,
                    permit = handshakes.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                };
                let accepted = tokio::select! {
                    _ = shutdown.requested() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let this = self.clone();
                let tx = tx.clone();
                // Bounded by the timeout and the permit; the stream's
                // receiver (the server) owns what completes.
                tokio::spawn(async move {
                    let _permit = permit;
                    let accepted =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, this.accept(tcp, addr, plaintext))
                            .await;
                    match accepted {
                        Ok(Ok(conn)) => {
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(reason)) => {
                            tracing::debug!(peer = %addr, %reason, "connection refused")
                        }
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        };
        tokio::spawn(accept.instrument(tracing::info_span!("tls_accept")));
        ReceiverStream::new(rx)
    }

    async fn accept(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        plaintext: Plaintext,
    ) -> Result<Conn, String> {
        if plaintext == Plaintext::Loopback {
            let mut first = [0u8; 1];
            let n = tcp.peek(&mut first).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before sending anything".into());
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                if !addr.ip().is_loopback() && !is_mapped_loopback(addr) {
                    return Err("plaintext from another host: TLS required".into());
                }
                let peer = Peer {
                    addr: Some(addr),
                    identity: None,
                    tls: false,
                };
                return Ok(Conn::Plain(tcp, peer));
            }
        }
        let Some(config) = lock(&self.config).clone() else {
            return Err("no credentials in tls_dir yet".into());
        };
        let tls = TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let certs = tls.get_ref().1.peer_certificates();
        let identity = match (certs, self.client_auth_optional) {
            // Where the config allows a client without one.
            (None, true) => None,
            (certs, _) => {
                Some(peer_identity(certs).map_err(|e| format!("client certificate: {e}"))?)
            }
        };
        let peer = Peer {
            addr: Some(addr),
            identity,
            tls: true,
        };
        Ok(Conn::Tls(Box::new(tls), peer))
    }

    fn read_files(&self) -> Result<Files, TlsError> {
        read_files(&self.dir, &self.key_file, &self.cert_file)
    }

    fn server_config(&self, files: &Files) -> Result<Arc<ServerConfig>, TlsError> {
        let (bundle, credentials) = parse(
            &self.dir,
            &self.key_file,
            &self.cert_file,
            files,
            &self.identity,
        )?;
        self.config_for(&bundle, Arc::new(CertResolver::new(credentials)))
    }

    fn config_for(
        &self,
        bundle: &TrustBundle,
        resolver: Arc<CertResolver>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let config = if self.client_auth_optional {
            super::server_config_optional_client(bundle, resolver)
        } else {
            super::server_config(bundle, resolver)
        };
        let mut config = config.map_err(|e| TlsError {
            path: self.dir.join(CA_FILE),
            reason: e.to_string(),
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The folder read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("dir", &self.dir)
            .field("identity", &self.identity)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

/// `::ffff:127.0.0.1` and the like, as a dual-stack listener reports an
/// IPv4 loopback peer.
fn is_mapped_loopback(addr: SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        SocketAddr::V4(_) => false,
    }
}

fn read_files(dir: &Path, key_file: &str, cert_file: &str) -> Result<Files, TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| TlsError {
            path,
            reason: e.to_string(),
        })
    };
    Ok((read(CA_FILE)?, read(key_file)?, read(cert_file)?))
}

/// The bundle and the credentials (which must name `identity`) in `files`.
fn parse(
    dir: &Path,
    key_file: &str,
    cert_file: &str,
    (ca, key, cert): &Files,
    identity: &SpiffeId,
) -> Result<(TrustBundle, Credentials), TlsError> {
    let err = |name: &str, reason: String| TlsError {
        path: dir.join(name),
        reason,
    };
    let text = |name: &str, bytes: &[u8]| {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| err(name, "not PEM text".into()))
    };
    let bundle = TrustBundle::from_pem(identity.trust_domain().clone(), &text(CA_FILE, ca)?)
        .map_err(|e| err(CA_FILE, e.to_string()))?;
    let key =
        LocalKey::from_pem(&text(key_file, key)?).map_err(|e| err(key_file, e.to_string()))?;
    let credentials = Credentials::new(&key, &text(cert_file, cert)?, identity)
        .map_err(|e| err(cert_file, e.to_string()))?;
    Ok((bundle, credentials))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves a whole value behind: assignments only.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === impl Conn ===

impl Conn {
    fn peer(&self) -> &Peer {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => peer,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer().clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// === impl Authorize ===

impl<S> Authorize<S> {
    /// `inner` behind `policy`; without one every call goes through (a
    /// listener without TLS).
    pub fn new(inner: S, policy: Option<Arc<dyn CallPolicy>>) -> Self {
        Self { inner, policy }
    }

    fn check<B>(policy: &dyn CallPolicy, request: &http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let Some(peer) = request.extensions().get::<Peer>() else {
            return Err(Status::unauthenticated(format!(
                "{method}: the connection carries no peer"
            )));
        };
        if !peer.tls || service == HEALTH_SERVICE {
            // Plaintext is only ever accepted from the host itself.
            return Ok(());
        }
        match &peer.identity {
            Some(identity) => policy.check(service, method, identity).map_err(|who| {
                Status::permission_denied(format!("{identity} may not call {method}: {who}"))
            }),
            None => policy.anonymous(service, method).map_err(|why| {
                Status::unauthenticated(format!("{method} without a client certificate: {why}"))
            }),
        }
    }
}

impl<S: NamedService> NamedService for Authorize<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(Err(status)) = self.policy.as_deref().map(|p| Self::check(p, &request)) {
            tracing::info!(code = ?status.code(), reason = status.message(), "call refused");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

/// A client's credentials from `tls_dir` (the trust bundle and one key and
/// certificate pair), read again when older than [`POLL`] at the next
/// dial, so a renewed certificate is shown from the next handshake on.
#[derive(Debug)]
pub struct ClientTls {
    dir: PathBuf,
    key_file: String,
    cert_file: String,
    identity: SpiffeId,
    current: Mutex<ClientState>,
}

#[derive(Debug, Default)]
struct ClientState {
    files: Option<Files>,
    loaded: Option<(TrustBundle, Arc<CertResolver>)>,
    read_at: Option<std::time::Instant>,
}

/// Dials a gRPC server over TLS with a mesh client config (for
/// `Endpoint::connect_with_connector`); the URI gives the address only.
#[derive(Clone)]
pub struct MeshConnector {
    config: Arc<rustls::ClientConfig>,
}

// === impl ClientTls ===

impl ClientTls {
    /// `identity`'s credentials from `dir`, at `key_file` and `cert_file`
    /// (relative to `dir`); read at the first dial.
    pub fn new(
        dir: impl Into<PathBuf>,
        identity: SpiffeId,
        key_file: &str,
        cert_file: &str,
    ) -> Self {
        Self {
            dir: dir.into(),
            key_file: key_file.to_owned(),
            cert_file: cert_file.to_owned(),
            identity,
            current: Mutex::new(ClientState::default()),
        }
    }

    /// The identity shown.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// A connector showing the current certificate and accepting only a
    /// server that names `expected`; an error says which file is missing or
    /// wrong (not issued yet, say).
    pub fn connector(&self, expected: SpiffeId) -> Result<MeshConnector, TlsError> {
        let (bundle, resolver) = self.current()?;
        let mut config =
            super::client_config(&bundle, resolver, expected).map_err(|e| TlsError {
                path: self.dir.clone(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(MeshConnector::new(Arc::new(config)))
    }

    /// Reads the files again when the last read is older than [`POLL`];
    /// a renewed certificate is shown from the next handshake on, by every
    /// connector made before. Files that do not load (mid-write) leave the
    /// credentials as they were.
    pub fn refresh(&self) -> Result<(), TlsError> {
        self.current().map(drop)
    }

    fn current(&self) -> Result<(TrustBundle, Arc<CertResolver>), TlsError> {
        let mut state = lock(&self.current);
        let fresh = state.read_at.is_some_and(|at| at.elapsed() < POLL);
        if let (true, Some(loaded)) = (fresh, &state.loaded) {
            return Ok(loaded.clone());
        }
        state.read_at = Some(std::time::Instant::now());
        let read = read_files(&self.dir, &self.key_file, &self.cert_file).and_then(|files| {
            if state.files.as_ref() == Some(&files) {
                return Ok(None);
            }
            let parsed = parse(
                &self.dir,
                &self.key_file,
                &self.cert_file,
                &files,
                &self.identity,
            )?;
            Ok(Some((files, parsed)))
        });
        match (read, &state.loaded) {
            (Ok(None), Some(loaded)) => Ok(loaded.clone()),
            (Ok(Some((files, (bundle, credentials)))), loaded) => {
                let resolver = match loaded {
                    Some((_, resolver)) => {
                        resolver.rotate(credentials).map_err(|e| TlsError {
                            path: self.dir.join(&self.cert_file),
                            reason: e.to_string(),
                        })?;
                        resolver.clone()
                    }
                    None => Arc::new(CertResolver::new(credentials)),
                };
                let loaded = (bundle, resolver);
                state.loaded = Some(loaded.clone());
                state.files = Some(files);
                Ok(loaded)
            }
            (Err(e), Some(loaded)) => {
                tracing::debug!(error = %e, "credentials in tls_dir not used (yet)");
                Ok(loaded.clone())
            }
            (Err(e), None) => Err(e),
            // Files are only kept with what they loaded.
            (Ok(None), None) => Err(TlsError {
                path: self.dir.clone(),
                reason: "no credentials loaded".into(),
            }),
        }
    }
}

// === impl MeshConnector ===

impl MeshConnector {
    /// Dials with `config` (ALPN `h2` set by the caller).
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        Self { config }
    }
}

impl fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConnector").finish_non_exhaustive()
    }
}

impl Service<http::Uri> for MeshConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}"));
            let host = uri.host().ok_or_else(bad)?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().ok_or_else(bad)?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name is neither checked nor sent: the identity is.
            let name = rustls::pki_types::ServerName::try_from("mesh").map_err(|_| bad())?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers 200 to every call: reached only when the policy lets it.
    #[derive(Clone)]
    struct Reached;

    impl Service<http::Request<()>> for Reached {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Body::empty())))
        }
    }

    /// `svc/web` may call `Get` of `mesh.v1.Test`, nothing else.
    #[derive(Debug)]
    struct WebGets;

    impl CallPolicy for WebGets {
        fn check(&self, service: &str, method: &str, peer: &SpiffeId) -> Result<(), String> {
            let web = peer.service_name() == Some("web");
            if web && service == "mesh.v1.Test" && method == "Get" {
                Ok(())
            } else {
                Err("only svc/web may, and only Get".into())
            }
        }
    }

    fn id(uri: &str) -> SpiffeId {
        SpiffeId::parse(uri).expect("a SPIFFE ID")
    }

    /// The gRPC status code of calling `path` as `peer` behind `policy`
    /// (0 when the service was reached), and the message.
    async fn call(
        policy: Option<Arc<dyn CallPolicy>>,
        path: &str,
        peer: Option<Peer>,
    ) -> (i32, String) {
        let mut request = http::Request::builder().uri(path).body(()).unwrap();
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        let response = Authorize::new(Reached, policy).call(request).await.unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let code = header("grpc-status").map_or(0, |c| c.parse().unwrap());
        (code, header("grpc-message").unwrap_or_default())
    }

    fn tls(identity: Option<&str>) -> Option<Peer> {
        Some(Peer {
            addr: Some(SocketAddr::from(([10, 0, 0, 2], 40000))),
            identity: identity.map(id),
            tls: true,
        })
    }

    #[tokio::test]
    async fn each_call_is_decided_by_the_verified_identity() {
        let policy: Option<Arc<dyn CallPolicy>> = Some(Arc::new(WebGets));
        let web = "spiffe://mesh.test/svc/web";
        let api = "spiffe://mesh.test/svc/api";
        assert_eq!(
            call(policy.clone(), "/mesh.v1.Test/Get", tls(Some(web)))
                .await
                .0,
            0
        );
        let (code, message) = call(policy.clone(), "/mesh.v1.Test/Put", tls(Some(web))).await;
        assert_eq!(code, 7, "PERMISSION_DENIED: {message}");
        assert!(
            message.contains("Put") && message.contains("svc/web"),
            "{message}"
        );
        let (code, message) = call(policy.clone(), "/mesh.v1.Test/Get", tls(Some(api))).await;
        assert_eq!(code, 7, "{message}");
        assert!(message.contains("svc/api"), "{message}");
        // Health is open to every peer the listener took.
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(call(policy.clone(), health, tls(Some(api))).await.0, 0);
        // TLS without a certificate: refused unless the policy says
        // otherwise (UNAUTHENTICATED).
        let (code, message) = call(policy.clone(), "/mesh.v1.Test/Get", tls(None)).await;
        assert_eq!(code, 16, "{message}");
        // Plaintext (only ever from the host itself) goes through.
        let local = Peer {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
            identity: None,
            tls: false,
        };
        assert_eq!(
            call(policy.clone(), "/mesh.v1.Test/Put", Some(local))
                .await
                .0,
            0
        );
        // A connection that carries no peer is refused, not waved through.
        assert_eq!(call(policy, "/mesh.v1.Test/Get", None).await.0, 16);
        // Without a policy (no TLS on the listener) everything goes through.
        assert_eq!(call(None, "/mesh.v1.Test/Put", None).await.0, 0);
    }

    #[test]
    fn a_mapped_ipv4_loopback_peer_is_loopback() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        assert!(is_mapped_loopback(mapped));
        let other: SocketAddr = "[::ffff:10.0.0.1]:5000".parse().unwrap();
        assert!(!is_mapped_loopback(other));
    }
}
