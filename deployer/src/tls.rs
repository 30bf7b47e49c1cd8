//! mTLS on the gRPC listener, and who may call what.
//!
//! With `tls_dir` set, the listener speaks TLS only. It presents the node's
//! identity (`spiffe://<trust domain>/node/<node>`, `node.key` +
//! `node.crt`) and requires a client certificate from the mesh CA
//! (`ca.crt`) naming one identity in the trust domain: mesh-bridge keeps
//! these files, and [`NodeTls::watch`] reads them again every [`POLL`], so
//! a renewed certificate is presented from the next handshake on (a pair
//! that does not load, half written, is left for the next read).
//!
//! [`Authorize`] then decides per method, from the verified identity:
//! everything that changes the node (Deploy, Rollback, Stop, Upload,
//! UploadOffset, ApplyConfig) only for mesh-control
//! (`spiffe://<trust domain>/svc/mesh-control`); the reads (Status,
//! ListArtifacts, LogTail) also for this node's own identity, for tools
//! on the node. Any other caller gets PERMISSION_DENIED naming the method
//! and its identity.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use mesh_runtime::{
    pki::{self, CertResolver, Credentials, LocalKey, SpiffeId, TrustBundle},
    shutdown::Shutdown,
};
use rustls::ServerConfig;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use tracing::Instrument;

use crate::config::TlsSettings;

/// The trust bundle's file in `tls_dir`.
pub const CA_FILE: &str = "ca.crt";
/// The node's key.
pub const NODE_KEY: &str = "node.key";
/// The node's certificate.
pub const NODE_CERT: &str = "node.crt";
/// How often `tls_dir` is read for renewed credentials.
pub const POLL: Duration = Duration::from_secs(1);
/// How long a connection has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The service name of mesh-control's identity, the only caller that may
/// change anything on the node.
pub const CONTROL_SERVICE: &str = "mesh-control";

/// Methods that change the node: mesh-control's alone.
const CONTROL_ONLY: [&str; 6] = [
    "Deploy",
    "Rollback",
    "Stop",
    "Upload",
    "UploadOffset",
    "ApplyConfig",
];
/// Methods that read: mesh-control's and the node's own.
const READS: [&str; 3] = ["Status", "ListArtifacts", "LogTail"];

/// Connections accepted but not yet served.
const ACCEPT_QUEUE: usize = 64;
/// Handshakes in progress at once; accepting waits beyond.
const MAX_HANDSHAKES: usize = 256;

/// The node's credentials, kept up to date from `tls_dir`.
pub struct NodeTls {
    dir: PathBuf,
    identity: SpiffeId,
    resolver: Arc<CertResolver>,
    /// The server config of the current bundle; a new bundle makes a new
    /// one for the next handshakes.
    config: Mutex<Arc<ServerConfig>>,
    /// The files as last applied.
    seen: Mutex<Files>,
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

/// Who may call which Deployer method, in front of the service.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
}

/// What [`Authorize`] checks, made before the service it wraps.
#[derive(Clone, Debug)]
pub struct Authorization {
    policy: Option<Arc<Policy>>,
}

/// The identities that may call.
#[derive(Debug)]
struct Policy {
    control: SpiffeId,
    node: SpiffeId,
}

/// `ca.crt`, `node.key`, `node.crt` as read at one poll.
type Files = (Vec<u8>, Vec<u8>, Vec<u8>);

// === impl NodeTls ===

impl NodeTls {
    /// Loads the node's credentials for `node` from `settings.dir`; an
    /// error names the file and what is wrong.
    pub fn load(settings: &TlsSettings, node: &str) -> Result<Self, TlsError> {
        let dir = settings.dir.clone();
        let identity = SpiffeId::node(&settings.trust_domain, node).map_err(|e| TlsError {
            path: dir.clone(),
            reason: format!("node {node:?} is no identity: {e}"),
        })?;
        let files = read_files(&dir)?;
        let (bundle, credentials) = parse(&dir, &files, &identity)?;
        let resolver = Arc::new(CertResolver::new(credentials));
        let config = server_config(&dir, &bundle, resolver.clone())?;
        Ok(Self {
            dir,
            identity,
            resolver,
            config: Mutex::new(config),
            seen: Mutex::new(files),
        })
    }

    /// The identity presented: `node/<node>`.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Who may call what on this node.
    fn policy(&self) -> Result<Policy, TlsError> {
        let control = SpiffeId::service(self.identity.trust_domain(), CONTROL_SERVICE)
            .map_err(|e| self.error(self.dir.clone(), e.to_string()))?;
        Ok(Policy {
            control,
            node: self.identity.clone(),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(lock(&self.config).clone())
    }

    fn error(&self, path: PathBuf, reason: String) -> TlsError {
        TlsError { path, reason }
    }

    /// Reads `tls_dir` every [`POLL`] until `shutdown`; a changed set that
    /// loads is used for the next handshakes, one that does not is logged
    /// once and read again.
    pub async fn watch(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut refused: Option<Files> = None;
        loop {
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let Ok(files) = read_files(&self.dir) else {
                continue;
            };
            if *lock(&self.seen) == files || refused.as_ref() == Some(&files) {
                continue;
            }
            match self.apply(&files) {
                Ok(()) => {
                    *lock(&self.seen) = files;
                    tracing::info!(identity = %self.identity, "new credentials from tls_dir");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "credentials in tls_dir not used (yet)");
                    refused = Some(files);
                }
            }
        }
    }

    fn apply(&self, files: &Files) -> Result<(), TlsError> {
        let (bundle, credentials) = parse(&self.dir, files, &self.identity)?;
        self.resolver
            .rotate(credentials)
            .map_err(|e| self.error(self.dir.join(NODE_CERT), e.to_string()))?;
        let config = server_config(&self.dir, &bundle, self.resolver.clone())?;
        *lock(&self.config) = config;
        Ok(())
    }

    /// Accepts TCP connections on `listener` and hands out those that
    /// complete the TLS handshake in time, until `shutdown`. A failed
    /// handshake is logged at debug and dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: Shutdown,
    ) -> ReceiverStream<Result<TlsStream<tokio::net::TcpStream>, io::Error>> {
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
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = self.acceptor();
                let tx = tx.clone();
                // Bounded by the timeout and the permit; the stream's
                // receiver (the server) owns what completes.
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        };
        tokio::spawn(accept.instrument(tracing::info_span!("tls_accept")));
        ReceiverStream::new(rx)
    }
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("dir", &self.dir)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves a whole value behind: assignments only.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_files(dir: &Path) -> Result<Files, TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| TlsError {
            path,
            reason: e.to_string(),
        })
    };
    Ok((read(CA_FILE)?, read(NODE_KEY)?, read(NODE_CERT)?))
}

fn parse(
    dir: &Path,
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
        LocalKey::from_pem(&text(NODE_KEY, key)?).map_err(|e| err(NODE_KEY, e.to_string()))?;
    let credentials = Credentials::new(&key, &text(NODE_CERT, cert)?, identity)
        .map_err(|e| err(NODE_CERT, e.to_string()))?;
    Ok((bundle, credentials))
}

fn server_config(
    dir: &Path,
    bundle: &TrustBundle,
    resolver: Arc<CertResolver>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = pki::server_config(bundle, resolver).map_err(|e| TlsError {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

// === impl Authorization ===

impl Authorization {
    /// Checks every call against `tls`'s policy; without TLS, every call
    /// goes through (the token, if any, is checked in front).
    pub fn new(tls: Option<&NodeTls>) -> Result<Self, TlsError> {
        let policy = tls.map(NodeTls::policy).transpose()?.map(Arc::new);
        Ok(Self { policy })
    }

    /// `inner` behind the check.
    pub fn wrap<S>(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: self.policy.clone(),
        }
    }
}

impl Policy {
    /// Whether the peer of `request` may call its method.
    fn check<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        let method = path.rsplit('/').next().unwrap_or(path);
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let peer = pki::peer_identity(certs.as_deref().map(Vec::as_slice))
            .map_err(|e| Status::unauthenticated(format!("{method}: {e}")))?;
        let allowed = peer == self.control || (READS.contains(&method) && peer == self.node);
        if allowed && peer.trust_domain() == self.control.trust_domain() {
            return Ok(());
        }
        let who = if CONTROL_ONLY.contains(&method) {
            format!("only {}", self.control)
        } else {
            format!("only {} and {}", self.control, self.node)
        };
        Err(Status::permission_denied(format!(
            "{peer} may not call {method}: {who} may"
        )))
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
        if let Some(Err(status)) = self.policy.as_ref().map(|p| p.check(&request)) {
            tracing::info!(code = ?status.code(), reason = status.message(), "call refused");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}
