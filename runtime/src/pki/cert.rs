//! Reading an issued certificate: its identity (exactly one SPIFFE URI
//! SAN), its validity, its serial, and when to renew it.
//!
//! These functions parse; they do not verify a signature or a chain. Trust
//! decisions go through [`super::TrustBundle`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use super::SpiffeId;

/// What the mesh reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDetails {
    /// The identity of its only URI SAN.
    pub identity: SpiffeId,
    /// The serial number in lowercase hex.
    pub serial: String,
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

/// When to renew a certificate valid from `not_before` to `not_after`: at two
/// thirds of its lifetime, which leaves a third for retries before it
/// expires. A certificate whose end is not after its start is due at once.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    match not_after.duration_since(not_before) {
        Ok(lifetime) => {
            not_before
                + lifetime
                    .checked_mul(2)
                    .map_or(lifetime / 3 * 2, |double| double / 3)
        }
        Err(_) => not_before,
    }
}

// === impl CertDetails ===

impl CertDetails {
    /// Reads a DER certificate. The error says what is missing or wrong.
    pub fn from_der(cert: &CertificateDer<'_>) -> Result<Self, String> {
        let x509 = parse(cert)?;
        Ok(Self {
            identity: identity(&x509)?,
            serial: hex(x509.raw_serial()),
            not_before: system_time(x509.validity().not_before),
            not_after: system_time(x509.validity().not_after),
        })
    }

    /// When to renew it: [`renew_at`] of its validity.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.not_before, self.not_after)
    }
}

/// Parses a DER certificate with nothing left over.
pub(super) fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match x509_parser::parse_x509_certificate(cert) {
        Ok(([], x509)) => Ok(x509),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("not an X.509 certificate: {e}")),
    }
}

/// The identity a certificate carries: its URI SANs must be exactly one,
/// and that one a mesh SPIFFE ID.
pub(super) fn identity(x509: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err("the certificate has no URI SAN (no SPIFFE ID)".into()),
        [uri] => SpiffeId::parse(uri).map_err(|e| e.to_string()),
        many => Err(format!(
            "the certificate has {} URI SANs ({}); a mesh certificate carries exactly one",
            many.len(),
            many.join(", ")
        )),
    }
}

/// An X.509 time as a `SystemTime`.
pub(super) fn system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
