//! mtls mode: the identities this proxy speaks for, and the TLS of the hop
//! between proxies.
//!
//! The node's mesh-bridge keeps the credentials in one folder (`tls_dir`),
//! replacing each file atomically, a key before its certificate:
//!
//! - `ca.crt`: the trust bundle (PEM, one or more mesh CA certificates);
//! - `node.key` + `node.crt`: the node's identity,
//!   `spiffe://<trust domain>/node/<node>`;
//! - `svc/<service>.key` + `svc/<service>.crt`: one identity per service
//!   registered on this node, `spiffe://<trust domain>/svc/<service>`.
//!
//! Keys are PKCS#8 PEM. The trust domain is the configured one, else the
//! one the CA certificate names in its URI SAN `spiffe://<trust domain>`.
//!
//! The inbound listener presents the node's certificate and requires a
//! client certificate the bundle trusts ([`MeshTls::accept`]); the peer's
//! identity then travels in each of its requests' extensions
//! ([`PeerIdentity`]). A connection to another node's proxy presents the
//! identity of the calling service ([`MeshTls::source`]) and accepts only
//! that node's identity ([`TlsTarget`]).
//!
//! Rotation: [`MeshTls::watch`] reads the folder every [`POLL`]; a changed
//! pair is loaded (the key must match the certificate, the certificate
//! name the identity and be valid) and swapped in for the next handshakes,
//! while open connections keep theirs. A pair that does not load (half
//! written: a new key beside the old certificate) is left for the next
//! read and never used; each change is logged once.

use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use mesh_runtime::{
    metrics::Counter,
    pki::{
        self, CertResolver, Credentials, LocalKey, PeerError, SpiffeId, TrustBundle, TrustDomain,
    },
    shutdown::Shutdown,
};
use rustls::{
    CertificateError, ClientConfig, ServerConfig,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{config::TlsConfig, protocol::Protocol};

/// The trust bundle's file in `tls_dir`.
pub const CA_FILE: &str = "ca.crt";
/// The node's key.
pub const NODE_KEY: &str = "node.key";
/// The node's certificate.
pub const NODE_CERT: &str = "node.crt";
/// The folder of the services' keys and certificates.
pub const SVC_DIR: &str = "svc";

/// How often the folder is read for new credentials.
pub const POLL: Duration = Duration::from_secs(1);

/// How long an inbound connection has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `x-mesh-source: <service>`: which of this node's services a request to
/// another node speaks for, when more than one has credentials here.
/// Read by the outbound listener only; removed before any hop, as every
/// `x-mesh-*` header.
pub const SOURCE_HEADER: HeaderName = HeaderName::from_static("x-mesh-source");

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// An identity this proxy speaks for, with its current certificate.
#[derive(Debug)]
pub struct Identity {
    id: SpiffeId,
    certs: Arc<CertResolver>,
}

/// The mesh components that register as services: a request that names
/// no source never speaks as one of them.
const COMPONENTS: [&str; 5] = [
    "mesh-bridge",
    "mesh-control",
    "mesh-deployer",
    "mesh-monitor",
    "mesh-proxy",
];

/// The verified identity of the proxy at the other end of an inbound
/// connection, in each of its requests' extensions.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Arc<SpiffeId>);

/// An inbound connection whose handshake succeeded.
pub struct Accepted {
    /// The connection.
    pub stream: server::TlsStream<TcpStream>,
    /// Who is at the other end.
    pub peer: PeerIdentity,
    /// When the certificate it was authenticated with expires: the
    /// connection ends then (gracefully), so that an identity never
    /// outlives its certificate on a connection kept open.
    pub expires: Option<SystemTime>,
}

/// The credentials of mtls mode, kept up to date from `tls_dir`.
pub struct MeshTls {
    dir: PathBuf,
    trust_domain: TrustDomain,
    node: Arc<Identity>,
    /// The services with credentials here, by lowercase name.
    services: ArcSwap<HashMap<Box<str>, Arc<Identity>>>,
    server: ArcSwap<ServerConfig>,
    bundle: ArcSwap<TrustBundle>,
    /// Client configs by (source identity, peer node, protocol), made at
    /// the first connect; emptied when the bundle changes.
    clients: Mutex<ClientConfigs>,
    /// The folder's contents as last applied and as last refused.
    seen: Mutex<(Files, Files)>,
}

/// mtls mode in `/routes`.
#[derive(Debug, Serialize)]
pub struct TlsView {
    /// The trust domain.
    pub trust_domain: String,
    /// The node's identity, then the services', by name.
    pub identities: Vec<IdentityView>,
}

/// One identity in `/routes`.
#[derive(Debug, Serialize)]
pub struct IdentityView {
    /// Its SPIFFE ID.
    pub id: String,
    /// The serial of the certificate presented now (lowercase hex).
    pub serial: String,
    /// When that certificate expires, Unix seconds.
    pub not_after_unix: u64,
}

/// A connection to another node's proxy: who speaks (`source`) to which
/// node's proxy.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    /// The credentials.
    pub mesh: Arc<MeshTls>,
    /// The identity presented.
    pub source: Arc<Identity>,
    /// The peer's node: its certificate must name `node/<node>`.
    pub node: Box<str>,
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

/// Why an inbound connection was closed before HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    /// It spoke something else than TLS (cleartext HTTP).
    #[error("the peer did not start a TLS handshake (plaintext?)")]
    Plaintext,
    /// The handshake took longer than [`HANDSHAKE_TIMEOUT`].
    #[error("the TLS handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    /// The peer presented no client certificate.
    #[error("the peer presented no client certificate")]
    NoCertificate,
    /// The certificate does not chain to the mesh CA.
    #[error("the peer's certificate is not trusted: {0}")]
    Untrusted(String),
    /// The certificate is expired (or not valid yet).
    #[error("the peer's certificate is expired or not yet valid: {0}")]
    Expired(String),
    /// The certificate names no single identity of our trust domain.
    #[error("the peer's certificate names no usable identity: {0}")]
    Identity(String),
    /// Anything else (protocol errors, a reset).
    #[error("the TLS handshake failed: {0}")]
    Handshake(io::Error),
}

/// The files of `tls_dir`, as read at one poll: `None` for a missing one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Files {
    ca: Option<Vec<u8>>,
    node: Pair,
    services: BTreeMap<String, Pair>,
}

/// Client configs by source identity and peer node.
type ClientConfigs = HashMap<(SpiffeId, Box<str>, Protocol), Arc<ClientConfig>>;

/// A key and its certificate.
type Pair = (Option<Vec<u8>>, Option<Vec<u8>>);

// === impl Identity ===

impl Identity {
    fn new(credentials: Credentials) -> Self {
        Self {
            id: credentials.identity().clone(),
            certs: Arc::new(CertResolver::new(credentials)),
        }
    }

    /// The SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The serial of the certificate presented now (lowercase hex).
    pub fn serial(&self) -> String {
        self.certs.current().details().serial.clone()
    }

    fn view(&self) -> IdentityView {
        let current = self.certs.current();
        let details = current.details();
        IdentityView {
            id: self.id.to_string(),
            serial: details.serial.clone(),
            not_after_unix: details
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// === impl MeshTls ===

impl MeshTls {
    /// Loads the credentials of the proxy on `node` from `config.dir`. The
    /// bundle and the node's pair must load; a service's pair that does
    /// not is left out (with a warning) and tried again by [`Self::watch`].
    pub fn load(config: &TlsConfig, node: &str) -> Result<Self, TlsError> {
        let dir = config.dir.clone();
        let files = Files::read(&dir);
        let ca_path = dir.join(CA_FILE);
        let ca_pem = text(files.ca.as_deref()).ok_or_else(|| TlsError {
            path: ca_path.clone(),
            reason: "missing, empty or not UTF-8: the trust bundle (PEM) must be there".into(),
        })?;
        let trust_domain = match &config.trust_domain {
            Some(td) => td.clone(),
            None => trust_domain_of(ca_pem).map_err(|reason| TlsError {
                path: ca_path.clone(),
                reason,
            })?,
        };
        let bundle = TrustBundle::from_pem(trust_domain.clone(), ca_pem).map_err(|e| TlsError {
            path: ca_path.clone(),
            reason: e.to_string(),
        })?;
        let node_id = SpiffeId::node(&trust_domain, node).map_err(|e| TlsError {
            path: dir.join(NODE_CERT),
            reason: e.to_string(),
        })?;
        let node_credentials = credentials(&files.node, &node_id).map_err(|reason| TlsError {
            path: dir.join(NODE_CERT),
            reason,
        })?;
        let node = Arc::new(Identity::new(node_credentials));
        let server = make_server_config(&bundle, &node).map_err(|e| TlsError {
            path: ca_path,
            reason: e.to_string(),
        })?;
        let mut applied = Files {
            ca: files.ca.clone(),
            node: files.node.clone(),
            services: BTreeMap::new(),
        };
        let mut refused = Files::default();
        let mut services = HashMap::new();
        for (name, pair) in &files.services {
            match service_credentials(&trust_domain, name, pair) {
                Ok(c) => {
                    applied.services.insert(name.clone(), pair.clone());
                    services.insert(name.as_str().into(), Arc::new(Identity::new(c)));
                }
                Err(reason) => {
                    tracing::warn!(service = %name, %reason, "service credentials not loaded; trying again at the next change");
                    refused.services.insert(name.clone(), pair.clone());
                }
            }
        }
        tracing::info!(dir = %dir.display(), %trust_domain, node = %node.id, serial = %node.serial(), services = services.len(), "mtls credentials loaded");
        Ok(Self {
            dir,
            trust_domain,
            node,
            services: ArcSwap::from_pointee(services),
            server: ArcSwap::from_pointee(server),
            bundle: ArcSwap::from_pointee(bundle),
            clients: Mutex::default(),
            seen: Mutex::new((applied, refused)),
        })
    }

    /// [`Self::load`] once the bundle and the node's pair are all in
    /// `config.dir`: until then it looks again every [`POLL`], saying
    /// once what it waits for. At a node's first start the bridge may not
    /// have them yet (mesh-control out of reach, say); a proxy that exited
    /// instead would be restarted only until its service manager gives
    /// up. Files that are there but do not load are an error at once.
    pub async fn load_when_present(config: &TlsConfig, node: &str) -> Result<Self, TlsError> {
        let mut waited = false;
        loop {
            let missing: Vec<&str> = [CA_FILE, NODE_KEY, NODE_CERT]
                .into_iter()
                .filter(|file| !config.dir.join(file).exists())
                .collect();
            if missing.is_empty() {
                if waited {
                    tracing::info!(dir = %config.dir.display(), "mtls credentials are there");
                }
                return Self::load(config, node);
            }
            if !waited {
                tracing::warn!(dir = %config.dir.display(), missing = %missing.join(", "), "waiting for the node's mtls credentials (the bridge writes them); the proxy starts once they are there");
                waited = true;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The node's identity.
    pub fn node(&self) -> &Arc<Identity> {
        &self.node
    }

    /// The identity of service `name`, when it has credentials here.
    pub fn service(&self, name: &str) -> Option<Arc<Identity>> {
        self.services.load().get(name).cloned()
    }

    /// What `/routes` shows: the identities presented now.
    pub fn view(&self) -> TlsView {
        let services = self.services.load();
        let mut names: Vec<&Box<str>> = services.keys().collect();
        names.sort();
        let identities = std::iter::once(self.node.view())
            .chain(names.into_iter().map(|n| services[n].view()))
            .collect();
        TlsView {
            trust_domain: self.trust_domain.to_string(),
            identities,
        }
    }

    /// Who a request to another node speaks for: the service `named` (the
    /// request's [`SOURCE_HEADER`]) when it has credentials here, else the
    /// only service with credentials here that is no mesh component, else
    /// the node. Lock-free.
    pub fn source(&self, named: Option<&HeaderValue>) -> Arc<Identity> {
        let services = self.services.load();
        if let Some(name) = named.and_then(|v| v.to_str().ok()) {
            let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                services.get(name.to_ascii_lowercase().as_str())
            } else {
                services.get(name)
            };
            if let Some(identity) = found {
                return identity.clone();
            }
        }
        // The mesh's own components register as services too (mesh-control
        // gets a certificate like any service): they are not what the
        // node's applications speak as.
        let mut apps = services
            .iter()
            .filter(|(name, _)| !COMPONENTS.contains(&&***name))
            .map(|(_, identity)| identity);
        match (apps.next(), apps.next()) {
            (Some(only), None) => only.clone(),
            _ => self.node.clone(),
        }
    }

    /// Secures an inbound connection: the node's certificate presented, a
    /// client certificate the bundle trusts required, within
    /// [`HANDSHAKE_TIMEOUT`]; with the peer's identity and when its
    /// certificate expires. `Ok(None)`: the peer closed before sending a
    /// byte (a TCP health check), which is no failure.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Option<Accepted>, HandshakeFailure> {
        let acceptor = TlsAcceptor::from(self.server.load_full());
        let handshake = async {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(0) => return Ok(None),
                Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
                    return Err(HandshakeFailure::Plaintext);
                }
                Ok(_) => {}
                Err(e) => return Err(HandshakeFailure::Handshake(e)),
            }
            let stream = acceptor.accept(tcp).await.map_err(HandshakeFailure::of)?;
            let certs = stream.get_ref().1.peer_certificates();
            let identity =
                pki::peer_identity(certs).map_err(|e| HandshakeFailure::Identity(e.to_string()))?;
            // Verified by the handshake, so readable; the leaf comes first.
            let expires = certs
                .and_then(<[CertificateDer<'_>]>::first)
                .and_then(|leaf| pki::CertDetails::from_der(leaf).ok())
                .map(|d| d.not_after);
            Ok(Some(Accepted {
                stream,
                peer: PeerIdentity(Arc::new(identity)),
                expires,
            }))
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| HandshakeFailure::Timeout)?
    }

    /// Secures a connection to the proxy of `node` that will speak
    /// `protocol` (its ALPN), presenting `source` and accepting only
    /// `node/<node>` of our trust domain.
    pub async fn connect(
        &self,
        source: &Identity,
        node: &str,
        protocol: Protocol,
        tcp: TcpStream,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        let config = self.client_config(source, node, protocol)?;
        // Not checked, and not sent (no SNI): the identity is what counts.
        let name = ServerName::try_from("mesh-proxy").map_err(io::Error::other)?;
        TlsConnector::from(config).connect(name, tcp).await
    }

    fn client_config(
        &self,
        source: &Identity,
        node: &str,
        protocol: Protocol,
    ) -> io::Result<Arc<ClientConfig>> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let key = (source.id.clone(), Box::<str>::from(node), protocol);
        if let Some(config) = clients.get(&key) {
            return Ok(config.clone());
        }
        let expected = SpiffeId::node(&self.trust_domain, node).map_err(|e| {
            io::Error::other(format!("node {node:?} cannot be a mesh identity: {e}"))
        })?;
        let mut config = pki::client_config(&self.bundle.load(), source.certs.clone(), expected)
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![match protocol {
            Protocol::Http2 => b"h2".to_vec(),
            Protocol::Http1 => b"http/1.1".to_vec(),
        }];
        let config = Arc::new(config);
        clients.insert(key, config.clone());
        Ok(config)
    }

    /// Reads `tls_dir` every [`POLL`] and applies what changed, counting
    /// each change in `reloads` (applied, refused), until shutdown.
    pub async fn watch(self: Arc<Self>, reloads: [Counter; 2], mut stop: Shutdown) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => return,
            }
            let this = self.clone();
            let Ok((applied, refused)) = tokio::task::spawn_blocking(move || this.reload()).await
            else {
                continue;
            };
            reloads[0].increment(applied);
            reloads[1].increment(refused);
        }
    }

    /// Reads the folder once and applies what changed since the last read:
    /// the changes applied and refused.
    pub fn reload(&self) -> (u64, u64) {
        let files = Files::read(&self.dir);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (applied, refused) = &mut *seen;
        let mut counts = (0, 0);
        let mut count = |ok: bool| {
            if ok {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        };
        if files.ca != applied.ca && files.ca != refused.ca {
            let ok = self.apply_bundle(files.ca.as_deref());
            remember(ok, &files.ca, &mut applied.ca, &mut refused.ca);
            count(ok);
        }
        if files.node != applied.node && files.node != refused.node {
            let ok = match credentials(&files.node, &self.node.id)
                .and_then(|c| self.node.certs.rotate(c).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    tracing::info!(identity = %self.node.id, serial = %self.node.serial(), "node certificate rotated");
                    true
                }
                Err(reason) => {
                    tracing::warn!(identity = %self.node.id, %reason, "new node credentials not loaded; keeping the current ones until the next change");
                    false
                }
            };
            remember(ok, &files.node, &mut applied.node, &mut refused.node);
            count(ok);
        }
        for (name, pair) in &files.services {
            if applied.services.get(name) == Some(pair) || refused.services.get(name) == Some(pair)
            {
                continue;
            }
            let ok = self.apply_service(name, pair);
            let (to, other) = if ok {
                (&mut applied.services, &mut refused.services)
            } else {
                (&mut refused.services, &mut applied.services)
            };
            to.insert(name.clone(), pair.clone());
            if ok {
                other.remove(name);
            }
            count(ok);
        }
        let gone: Vec<String> = applied
            .services
            .keys()
            .filter(|n| !files.services.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            applied.services.remove(&name);
            self.services.rcu(|m| {
                let mut m = HashMap::clone(m);
                m.remove(name.as_str());
                m
            });
            tracing::info!(service = %name, "service credentials removed; its requests speak for the node");
            count(true);
        }
        refused
            .services
            .retain(|n, _| files.services.contains_key(n));
        counts
    }

    /// A new trust bundle: new handshakes verify with it.
    fn apply_bundle(&self, pem: Option<&[u8]>) -> bool {
        let loaded = text(pem)
            .ok_or_else(|| "missing, empty or not UTF-8".to_owned())
            .and_then(|pem| {
                TrustBundle::from_pem(self.trust_domain.clone(), pem).map_err(|e| e.to_string())
            })
            .and_then(|bundle| {
                make_server_config(&bundle, &self.node)
                    .map(|server| (bundle, server))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((bundle, server)) => {
                self.bundle.store(Arc::new(bundle));
                self.server.store(Arc::new(server));
                self.clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                tracing::info!(file = %self.dir.join(CA_FILE).display(), "trust bundle reloaded");
                true
            }
            Err(reason) => {
                tracing::warn!(file = %self.dir.join(CA_FILE).display(), %reason, "new trust bundle not loaded; keeping the current one until the next change");
                false
            }
        }
    }

    /// New or rotated credentials of service `name`.
    fn apply_service(&self, name: &str, pair: &Pair) -> bool {
        let loaded = service_credentials(&self.trust_domain, name, pair);
        let result = loaded.and_then(|c| match self.service(name) {
            Some(identity) => identity
                .certs
                .rotate(c)
                .map(|()| identity)
                .map_err(|e| e.to_string()),
            None => {
                let identity = Arc::new(Identity::new(c));
                self.services.rcu(|m| {
                    let mut m = HashMap::clone(m);
                    m.insert(name.into(), identity.clone());
                    m
                });
                Ok(identity)
            }
        });
        match result {
            Ok(identity) => {
                tracing::info!(identity = %identity.id, serial = %identity.serial(), "service certificate loaded");
                true
            }
            Err(reason) => {
                tracing::warn!(service = %name, %reason, "new service credentials not loaded; keeping the current ones until the next change");
                false
            }
        }
    }
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("node", &self.node.id)
            .field("services", &self.services.load().len())
            .finish_non_exhaustive()
    }
}

// === impl TlsTarget ===

impl TlsTarget {
    /// Secures `tcp` to the target's proxy, for `protocol`.
    pub async fn connect(
        &self,
        protocol: Protocol,
        tcp: TcpStream,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        self.mesh
            .connect(&self.source, &self.node, protocol, tcp)
            .await
    }
}

// === impl HandshakeFailure ===

impl HandshakeFailure {
    /// The metric's `reason` (see `InboundMetrics::TLS_REASONS`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Timeout => "timeout",
            Self::NoCertificate => "no_certificate",
            Self::Untrusted(_) => "untrusted",
            Self::Expired(_) => "expired",
            Self::Identity(_) => "identity",
            Self::Handshake(_) => "handshake",
        }
    }

    /// Sorts a failed handshake by what rustls said.
    fn of(e: io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Self::Handshake(e);
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Self::NoCertificate,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Self::Expired(tls.to_string()),
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                let inner: &(dyn std::error::Error + 'static) = &*other.0;
                match inner.downcast_ref::<PeerError>() {
                    Some(PeerError::Identity(_) | PeerError::ForeignTrustDomain { .. }) => {
                        Self::Identity(inner.to_string())
                    }
                    Some(PeerError::NoCertificate) => Self::NoCertificate,
                    _ => Self::Untrusted(inner.to_string()),
                }
            }
            rustls::Error::InvalidCertificate(_) => Self::Untrusted(tls.to_string()),
            _ => Self::Handshake(e),
        }
    }
}

// === impl Files ===

impl Files {
    fn read(dir: &Path) -> Self {
        let read = |p: PathBuf| std::fs::read(p).ok();
        let mut services = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir.join(SVC_DIR)) {
            for entry in entries.flatten() {
                let path = entry.path();
                let is_cert = path.extension().is_some_and(|e| e == "crt");
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if is_cert {
                    let pair = (read(path.with_extension("key")), read(path.clone()));
                    // Identities name services in lowercase.
                    services.insert(name.to_ascii_lowercase(), pair);
                }
            }
        }
        Self {
            ca: read(dir.join(CA_FILE)),
            node: (read(dir.join(NODE_KEY)), read(dir.join(NODE_CERT))),
            services,
        }
    }
}

/// Marks `files` as applied or refused (and forgets the other).
fn remember<T: Clone>(ok: bool, files: &T, applied: &mut T, refused: &mut T) {
    if ok {
        *applied = files.clone();
    } else {
        *refused = files.clone();
    }
}

fn text(bytes: Option<&[u8]>) -> Option<&str> {
    bytes
        .and_then(|b| std::str::from_utf8(b).ok())
        .filter(|t| !t.trim().is_empty())
}

/// Credentials from a key and certificate pair, for `expected`.
fn credentials(pair: &Pair, expected: &SpiffeId) -> Result<Credentials, String> {
    let key = text(pair.0.as_deref()).ok_or("the key is missing, empty or not UTF-8")?;
    let cert = text(pair.1.as_deref()).ok_or("the certificate is missing, empty or not UTF-8")?;
    let key = LocalKey::from_pem(key).map_err(|e| e.to_string())?;
    Credentials::new(&key, cert, expected).map_err(|e| e.to_string())
}

fn service_credentials(
    trust_domain: &TrustDomain,
    name: &str,
    pair: &Pair,
) -> Result<Credentials, String> {
    let id = SpiffeId::service(trust_domain, name).map_err(|e| e.to_string())?;
    credentials(pair, &id)
}

/// The inbound listener's config: the node's certificate, client
/// certificates required, HTTP/2 or HTTP/1.1 (upgrades).
fn make_server_config(
    bundle: &TrustBundle,
    node: &Identity,
) -> Result<ServerConfig, pki::PkiError> {
    let mut config = pki::server_config(bundle, node.certs.clone())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The trust domain the first CA certificate of `pem` names in its URI SAN
/// `spiffe://<trust domain>`.
fn trust_domain_of(pem: &str) -> Result<TrustDomain, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    for cert in &certs {
        let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert) else {
            continue;
        };
        let Ok(Some(san)) = x509.subject_alternative_name() else {
            continue;
        };
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(td) = uri.strip_prefix(pki::spiffe::SCHEME)
                && !td.contains('/')
            {
                return TrustDomain::new(td).map_err(|e| e.to_string());
            }
        }
    }
    Err(
        "no CA certificate names a trust domain (URI SAN spiffe://<trust domain>); set trust_domain"
            .into(),
    )
}

#[cfg(test)]
mod tests;
