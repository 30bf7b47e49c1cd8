//! A workload's private key, generated where it is used, and the CSR that
//! asks the mesh CA for a certificate without the key ever leaving.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::PrivateKeyDer;

use super::{PkiError, SpiffeId};

/// A private key held by the workload that uses it (ECDSA P-256 when
/// generated here).
///
/// Only the CSR and the public key leave; the key itself is kept in memory
/// (and, if the caller chooses, on the node's own disk via [`Self::to_pem`]).
pub struct LocalKey {
    key: KeyPair,
}

// === impl LocalKey ===

impl LocalKey {
    /// Generates a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::crypto("generating an ECDSA P-256 key", e))?;
        Ok(Self { key })
    }

    /// Reads a key written by [`Self::to_pem`] (PKCS#8 PEM).
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(pem)
            .map_err(|e| PkiError::crypto("reading the private key PEM", e))?;
        Ok(Self { key })
    }

    /// The key as PKCS#8 PEM, for the node's own storage only.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }

    /// A PEM CSR asking for a certificate for `identity`: one URI SAN and an
    /// empty subject, as the certificate the CA will issue.
    pub fn csr_pem(&self, identity: &SpiffeId) -> Result<String, PkiError> {
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| PkiError::crypto("encoding the identity for the CSR", e))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| PkiError::crypto("signing the CSR", e))
    }

    /// The key in the form rustls loads.
    pub(super) fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }
}

impl std::fmt::Debug for LocalKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKey")
            .field("algorithm", self.key.algorithm())
            .finish_non_exhaustive()
    }
}
