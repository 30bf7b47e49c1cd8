//! rustls configs for mesh mTLS, with a certificate that can be swapped at
//! runtime.
//!
//! Both sides present the workload's current [`Credentials`] from a
//! [`CertResolver`]. rustls asks the resolver once per handshake, so
//! [`CertResolver::rotate`] changes what new handshakes present and leaves
//! open connections alone. Only TLS 1.3 is offered: both ends are the mesh's
//! own.
//!
//! Session resumption is off on both sides, so every connection is a full
//! handshake that checks the certificates as they are now: a resumed session
//! would carry an identity past its certificate's rotation, and even past its
//! expiry. Proxies keep their connections open instead.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use super::cert::CertDetails;
use super::verify::{MeshClientVerifier, MeshServerVerifier};
use super::{LocalKey, PkiError, SpiffeId, TrustBundle};

/// A workload's certificate chain with its key, ready for rustls, and what
/// the mesh reads from the certificate.
#[derive(Debug)]
pub struct Credentials {
    certified: Arc<CertifiedKey>,
    details: CertDetails,
}

/// The workload's current credentials, swapped without a lock on the
/// handshake path.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<Credentials>,
}

/// A server config for the inbound mTLS listener: it presents `certs`'
/// current certificate and requires a client certificate that `bundle`
/// trusts, with one identity in its trust domain. Which identities may call
/// is decided after the handshake, with [`super::peer_identity`].
pub fn server_config(
    bundle: &TrustBundle,
    certs: Arc<CertResolver>,
) -> Result<ServerConfig, PkiError> {
    server_config_with(bundle, certs, true)
}

/// [`server_config`] for a listener that also takes clients without a
/// certificate (they authenticate otherwise, with a token); a client that
/// presents one is verified as there.
pub fn server_config_optional_client(
    bundle: &TrustBundle,
    certs: Arc<CertResolver>,
) -> Result<ServerConfig, PkiError> {
    server_config_with(bundle, certs, false)
}

fn server_config_with(
    bundle: &TrustBundle,
    certs: Arc<CertResolver>,
    mandatory: bool,
) -> Result<ServerConfig, PkiError> {
    let verifier = MeshClientVerifier {
        bundle: bundle.clone(),
        mandatory,
    };
    let mut config = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::tls("building the server config", e))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(certs);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config for connecting to the peer whose identity must be
/// `expected`: it presents `certs`' current certificate and accepts only a
/// server certificate that `bundle` trusts and that names `expected`. The
/// server name given to the connector is not checked (and not sent as SNI):
/// the identity is what is verified.
pub fn client_config(
    bundle: &TrustBundle,
    certs: Arc<CertResolver>,
    expected: SpiffeId,
) -> Result<ClientConfig, PkiError> {
    client_config_with(bundle, Some(certs), expected)
}

/// [`client_config`] for a client with no certificate of its own yet (a
/// bridge asking for its node's first one): it still accepts only a
/// server that names `expected`.
pub fn client_config_without_cert(
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<ClientConfig, PkiError> {
    client_config_with(bundle, None, expected)
}

fn client_config_with(
    bundle: &TrustBundle,
    certs: Option<Arc<CertResolver>>,
    expected: SpiffeId,
) -> Result<ClientConfig, PkiError> {
    let verifier = MeshServerVerifier {
        bundle: bundle.clone(),
        expected,
    };
    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::tls("building the client config", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match certs {
        Some(certs) => builder.with_client_cert_resolver(certs),
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

// === impl Credentials ===

impl Credentials {
    /// Pairs `key` with the certificate chain the CA issued for it (PEM, end
    /// entity first). The certificate must be for `key`, name exactly
    /// `expected`, and not be expired.
    pub fn new(key: &LocalKey, chain_pem: &str, expected: &SpiffeId) -> Result<Self, PkiError> {
        Self::new_at(key, chain_pem, expected, SystemTime::now())
    }

    pub(super) fn new_at(
        key: &LocalKey,
        chain_pem: &str,
        expected: &SpiffeId,
        now: SystemTime,
    ) -> Result<Self, PkiError> {
        const WHAT: &str = "the issued certificate";
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::invalid(WHAT, format!("bad PEM: {e}")))?;
        let end_entity = chain
            .first()
            .ok_or_else(|| PkiError::invalid(WHAT, "no PEM certificate found"))?;
        let details = CertDetails::from_der(end_entity).map_err(|e| PkiError::invalid(WHAT, e))?;
        if &details.identity != expected {
            return Err(PkiError::invalid(
                WHAT,
                format!("it is for {}, not {expected}", details.identity),
            ));
        }
        if now >= details.not_after {
            return Err(PkiError::invalid(WHAT, "it has already expired"));
        }
        let x509 = super::cert::parse(end_entity).map_err(|e| PkiError::invalid(WHAT, e))?;
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::invalid(WHAT, "it is not for this node's key"));
        }
        let certified = CertifiedKey::from_der(chain, key.private_key_der(), &super::provider())
            .map_err(|e| PkiError::tls("loading the key and certificate", e))?;
        Ok(Self {
            certified: Arc::new(certified),
            details,
        })
    }

    /// The identity the certificate names.
    pub fn identity(&self) -> &SpiffeId {
        &self.details.identity
    }

    /// What the mesh reads from the certificate (serial, validity).
    pub fn details(&self) -> &CertDetails {
        &self.details
    }

    /// The chain and key as rustls uses them.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// When to renew: two thirds into the certificate's lifetime.
    pub fn renew_at(&self) -> SystemTime {
        self.details.renew_at()
    }
}

// === impl CertResolver ===

impl CertResolver {
    /// A resolver presenting `credentials` until rotated.
    pub fn new(credentials: Credentials) -> Self {
        Self {
            current: ArcSwap::from_pointee(credentials),
        }
    }

    /// Presents `credentials` from the next handshake on; connections already
    /// open keep theirs. Refused if they name another identity: a resolver
    /// speaks for one workload.
    pub fn rotate(&self, credentials: Credentials) -> Result<(), PkiError> {
        let current = self.current.load();
        if credentials.identity() != current.identity() {
            return Err(PkiError::invalid(
                "the new credentials",
                format!(
                    "they are for {}, but this resolver presents {}",
                    credentials.identity(),
                    current.identity()
                ),
            ));
        }
        self.current.store(Arc::new(credentials));
        Ok(())
    }

    /// The credentials presented now.
    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current.load().certified_key()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
