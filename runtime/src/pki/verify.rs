//! Peer verification: a presented chain is trusted when it chains to the
//! mesh CA, is within its validity, and its end-entity certificate carries
//! exactly one SPIFFE ID, in our trust domain.
//!
//! The chain and validity checks are webpki's (through rustls); this module
//! adds the identity rule, and the rustls verifiers that apply it during the
//! handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use super::{PkiError, SpiffeId, TrustDomain, cert};

/// Why a peer is not trusted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No certificate at all (a plaintext or anonymous peer).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The chain does not lead to the mesh CA, or a certificate in it is
    /// expired, not yet valid or not for this use.
    #[error("the peer's certificate is not trusted: {0}")]
    Untrusted(rustls::Error),
    /// The certificate is trusted but names no single mesh identity.
    #[error("the peer's certificate has no usable identity: {0}")]
    Identity(String),
    /// A valid identity, from another trust domain.
    #[error("the peer is {identity}, outside the trust domain {expected:?}")]
    ForeignTrustDomain {
        /// The peer's identity.
        identity: SpiffeId,
        /// Ours.
        expected: String,
    },
    /// A valid identity in our trust domain, but not the one we dialled.
    #[error("the peer is {actual}, not the expected {expected}")]
    Unexpected {
        /// Who we meant to reach.
        expected: SpiffeId,
        /// Who answered.
        actual: SpiffeId,
    },
}

/// The trust anchors of one trust domain: the mesh CA's certificate(s).
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// Verifies a client's certificate during the handshake: chain, validity
/// and identity. Authorization (which identities may call) is the caller's,
/// after the handshake, with [`peer_identity`].
#[derive(Debug)]
pub(super) struct MeshClientVerifier {
    pub(super) bundle: TrustBundle,
    /// Whether a client must present a certificate; one that does is
    /// verified either way.
    pub(super) mandatory: bool,
}

/// Verifies a server's certificate during the handshake: chain, validity,
/// and that its identity is the one expected for this peer (not a DNS
/// name).
#[derive(Debug)]
pub(super) struct MeshServerVerifier {
    pub(super) bundle: TrustBundle,
    pub(super) expected: SpiffeId,
}

/// The identity of the peer of an established connection, from the
/// certificates rustls reports (`peer_certificates()`): the chain was
/// verified during the handshake by this module's verifiers, so this only
/// reads the identity.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, PeerError> {
    let end_entity = certs
        .and_then(<[_]>::first)
        .ok_or(PeerError::NoCertificate)?;
    let x509 = cert::parse(end_entity).map_err(PeerError::Identity)?;
    cert::identity(&x509).map_err(PeerError::Identity)
}

// === impl PeerError ===

impl From<PeerError> for rustls::Error {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::NoCertificate => rustls::Error::NoCertificatesPresented,
            PeerError::Untrusted(e) => e,
            other => rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(other),
            ))),
        }
    }
}

// === impl TrustBundle ===

impl TrustBundle {
    /// A bundle of `anchors` (DER) for `trust_domain`.
    pub fn new(
        trust_domain: TrustDomain,
        anchors: Vec<CertificateDer<'static>>,
    ) -> Result<Self, PkiError> {
        const WHAT: &str = "the trust bundle";
        if anchors.is_empty() {
            return Err(PkiError::invalid(WHAT, "it has no CA certificate"));
        }
        let mut roots = RootCertStore::empty();
        for (i, anchor) in anchors.into_iter().enumerate() {
            roots.add(anchor).map_err(|e| {
                PkiError::invalid(
                    WHAT,
                    format!("certificate {} is not a usable anchor: {e}", i + 1),
                )
            })?;
        }
        let roots = Arc::new(roots);
        let provider = super::provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| PkiError::invalid(WHAT, e.to_string()))?;
        Ok(Self {
            trust_domain,
            roots,
            provider,
            client_verifier,
        })
    }

    /// A bundle of every certificate in `pem` for `trust_domain`.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, PkiError> {
        let anchors = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::invalid("the trust bundle", format!("bad PEM: {e}")))?;
        Self::new(trust_domain, anchors)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Verifies a chain a client presented (end entity first) and returns
    /// its identity.
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, PeerError> {
        let (end_entity, intermediates) = chain.split_first().ok_or(PeerError::NoCertificate)?;
        self.client_verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(PeerError::Untrusted)?;
        self.identity_in_domain(end_entity)
    }

    /// Verifies a chain a server presented (end entity first) and returns
    /// its identity. No DNS name is checked: the identity is what counts.
    pub fn verify_server(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, PeerError> {
        let (end_entity, intermediates) = chain.split_first().ok_or(PeerError::NoCertificate)?;
        let parsed = ParsedCertificate::try_from(end_entity).map_err(PeerError::Untrusted)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(PeerError::Untrusted)?;
        self.identity_in_domain(end_entity)
    }

    fn identity_in_domain(&self, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, PeerError> {
        let x509 = cert::parse(end_entity).map_err(PeerError::Identity)?;
        let identity = cert::identity(&x509).map_err(PeerError::Identity)?;
        if identity.trust_domain() != &self.trust_domain {
            return Err(PeerError::ForeignTrustDomain {
                identity,
                expected: self.trust_domain.to_string(),
            });
        }
        Ok(identity)
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.roots.len())
            .finish_non_exhaustive()
    }
}

// === impl MeshClientVerifier ===

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.bundle.client_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
            .chain(intermediates.iter().cloned())
            .collect();
        self.bundle.verify_client(&chain, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.client_verifier.supported_verify_schemes()
    }
}

// === impl MeshServerVerifier ===

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
            .chain(intermediates.iter().cloned())
            .collect();
        let actual = self.bundle.verify_server(&chain, now)?;
        if actual != self.expected {
            return Err(PeerError::Unexpected {
                expected: self.expected.clone(),
                actual,
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.bundle.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.bundle.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
