//! Mesh identity: SPIFFE IDs, the mesh CA, workload keys and certificates,
//! and the rustls configs that authenticate one proxy to another.
//!
//! # Trust model
//!
//! One mesh is one *trust domain*, and one CA speaks for it: mesh-control
//! either creates the CA itself ([`Ca::self_signed`]) or is handed an
//! operator's CA certificate and key ([`Ca::from_pem`]). The CA's
//! certificate is the only trust anchor a proxy or agent needs
//! ([`TrustBundle`]). A peer is trusted when its certificate chains to that
//! anchor, is within its validity period, and names exactly one identity in
//! our trust domain; nothing else about it (its DNS name, its address, its
//! subject) grants anything.
//!
//! An identity is a SPIFFE ID carried as the certificate's only URI SAN:
//! `spiffe://<trust-domain>/svc/<name>` for a service,
//! `spiffe://<trust-domain>/node/<node>` for a node agent ([`SpiffeId`]). A
//! certificate with no URI SAN, with two, or with one from another trust
//! domain is refused, so a certificate can never be read as two identities.
//!
//! Keys are generated where they are used ([`LocalKey`]) and never leave
//! that node: the node sends a CSR naming the identity it asks for, and the
//! CA signs the identity *it* decided for the caller ([`Ca::sign`]), after
//! the caller (mesh-control) has authorized the request. A CSR that asks for
//! anything else is refused rather than corrected; nothing but the public
//! key is copied from it.
//!
//! Certificates are short-lived. A workload renews at two thirds of its
//! certificate's lifetime ([`renew_at`]) and swaps the new certificate into
//! its [`CertResolver`]: new handshakes present it, connections already
//! open keep the session they negotiated. Revocation is by expiry.
//!
//! Modules:
//! - [`spiffe`]: trust domains and SPIFFE IDs, parsed strictly.
//! - [`key`]: a workload's private key and its CSR.
//! - [`ca`]: the mesh CA: create, load, sign, store.
//! - [`cert`]: reading an issued certificate (identity, validity, renewal).
//! - [`verify`]: the trust bundle and peer verification.
//! - [`tls`]: rustls server and client configs with a swappable certificate.
//! - [`grpc`]: mTLS on the components' gRPC listeners, and who may call what.

pub mod ca;
pub mod cert;
pub mod grpc;
pub mod key;
pub mod spiffe;
pub mod tls;
pub mod verify;

#[cfg(test)]
mod tests;

pub use ca::{Ca, StoredCa};
pub use cert::{CertDetails, renew_at};
pub use key::LocalKey;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, Workload};
pub use tls::{
    CertResolver, Credentials, client_config, client_config_without_cert, server_config,
    server_config_optional_client,
};
pub use verify::{PeerError, TrustBundle, peer_identity};

/// Why a key, CSR, certificate or CA could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A bad trust domain, name or SPIFFE ID.
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    /// Input that is not what it should be: `what` names it.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was refused (`the CSR`, `the CA certificate`, ...).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A CSR that asks for another identity than the one the CA decided.
    #[error("the CSR asks for {requested}, but the CA was told to issue {decided}: refused")]
    IdentityMismatch {
        /// What the CSR asked for.
        requested: String,
        /// The identity the caller authorized.
        decided: SpiffeId,
    },
    /// Key generation, signing or encoding failed.
    #[error("{what}: {source}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// rustls refused a key, certificate or config.
    #[error("{what}: {source}")]
    Tls {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: rustls::Error,
    },
}

// === impl PkiError ===

impl PkiError {
    fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }

    fn crypto(what: &'static str, source: rcgen::Error) -> Self {
        Self::Crypto { what, source }
    }

    fn tls(what: &'static str, source: rustls::Error) -> Self {
        Self::Tls { what, source }
    }
}

/// The crypto provider every mesh TLS config and verifier uses (ring), named
/// explicitly so no config depends on the process default being installed.
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
