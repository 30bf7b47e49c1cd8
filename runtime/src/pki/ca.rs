//! The mesh CA: created self-signed or loaded from an operator's certificate
//! and key; signs CSRs for the identity its caller decided.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::{PkiError, SpiffeId, TrustBundle, TrustDomain, cert};

/// How far back an issued certificate's validity starts, so a peer whose
/// clock is a little behind the CA's accepts it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The mesh's certificate authority for one trust domain.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
}

/// A CA as stored (in Consul KV, by mesh-control): its trust domain, its
/// certificate and its private key, in PEM.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredCa {
    /// The trust domain it issues for.
    pub trust_domain: String,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// The CA's private key (PKCS#8 PEM).
    pub key_pem: String,
}

// === impl Ca ===

impl Ca {
    /// Creates a self-signed CA for `trust_domain`, valid for `lifetime`.
    pub fn self_signed(trust_domain: TrustDomain, lifetime: Duration) -> Result<Self, PkiError> {
        Self::self_signed_at(trust_domain, lifetime, SystemTime::now())
    }

    /// Loads an operator's CA from its certificate (the first in `cert_pem`)
    /// and private key (PKCS#8 PEM). The certificate must be a CA allowed to
    /// sign certificates, be valid now, belong to the key, name no other
    /// trust domain, and verify the certificates it issues (checked by
    /// issuing one).
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, PkiError> {
        Self::from_pem_at(trust_domain, cert_pem, key_pem, SystemTime::now())
    }

    /// Loads a CA stored with [`Self::to_stored`], with the same checks as
    /// [`Self::from_pem`].
    pub fn from_stored(stored: &StoredCa) -> Result<Self, PkiError> {
        let trust_domain = TrustDomain::new(&stored.trust_domain)?;
        Self::from_pem(trust_domain, &stored.cert_pem, &stored.key_pem)
    }

    /// The CA in its storable form. It holds the private key: store it only
    /// where the CA's key may live.
    pub fn to_stored(&self) -> StoredCa {
        StoredCa {
            trust_domain: self.trust_domain.to_string(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.issuer.key().serialize_pem(),
        }
    }

    /// The trust domain it issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Its certificate (PEM): the trust anchor every workload needs.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Its certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When it expires; no certificate it issues outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The trust bundle of this CA alone.
    pub fn trust_bundle(&self) -> Result<TrustBundle, PkiError> {
        TrustBundle::new(self.trust_domain.clone(), vec![self.cert_der.clone()])
    }

    /// Signs `csr_pem` for `identity`, valid for `ttl` (cut to the CA's own
    /// expiry). `identity` is what the caller authorized; the CSR must ask
    /// for exactly that identity, and only its public key is used.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        self.sign_at(csr_pem, identity, ttl, SystemTime::now())
    }

    pub(super) fn self_signed_at(
        trust_domain: TrustDomain,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Self, PkiError> {
        if lifetime.is_zero() {
            return Err(PkiError::invalid(
                "the CA lifetime",
                "it must be longer than zero",
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::crypto("generating the CA key", e))?;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Meshwork");
        // The trust domain is in the URI SAN (a common name is limited to
        // 64 characters); the serial's start tells one CA from the next.
        let tag = cert::hex(&serial.to_bytes()[..4]);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Meshwork CA {tag}"));
        params.subject_alt_names = vec![uri_san(&trust_domain.id_uri())?];
        // Leaves only: no intermediate may be made under the mesh CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = datetime(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        params.not_after = datetime(later(now, lifetime, "the CA lifetime")?)?;
        params.serial_number = Some(serial);
        let cert = params
            .self_signed(&key)
            .map_err(|e| PkiError::crypto("self-signing the CA certificate", e))?;
        Self::from_parts(trust_domain, cert.der().clone(), key, now)
    }

    pub(super) fn from_pem_at(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        now: SystemTime,
    ) -> Result<Self, PkiError> {
        const WHAT: &str = "the CA certificate";
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::invalid(WHAT, format!("no PEM certificate found: {e}")))?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::crypto("reading the CA private key PEM (PKCS#8 expected)", e))?;
        Self::from_parts(trust_domain, cert_der, key, now)
    }

    /// Checks a CA certificate against its key and the clock, and makes the
    /// issuer.
    fn from_parts(
        trust_domain: TrustDomain,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        now: SystemTime,
    ) -> Result<Self, PkiError> {
        const WHAT: &str = "the CA certificate";
        let x509 = cert::parse(&cert_der).map_err(|e| PkiError::invalid(WHAT, e))?;
        let constraints = x509
            .basic_constraints()
            .map_err(|e| PkiError::invalid(WHAT, format!("unreadable basicConstraints: {e}")))?;
        if !constraints.is_some_and(|bc| bc.value.ca) {
            return Err(PkiError::invalid(
                WHAT,
                "it is not a CA (basicConstraints CA:TRUE is missing)",
            ));
        }
        let usage = x509
            .key_usage()
            .map_err(|e| PkiError::invalid(WHAT, format!("unreadable keyUsage: {e}")))?;
        if usage.is_some_and(|ku| !ku.value.key_cert_sign()) {
            return Err(PkiError::invalid(
                WHAT,
                "its keyUsage does not allow signing certificates (keyCertSign)",
            ));
        }
        check_ca_trust_domain(&x509, &trust_domain)?;
        let not_before = cert::system_time(x509.validity().not_before);
        let not_after = cert::system_time(x509.validity().not_after);
        if now < not_before {
            return Err(PkiError::invalid(
                WHAT,
                format!("it is not valid before {}", x509.validity().not_before),
            ));
        }
        if now >= not_after {
            return Err(PkiError::invalid(
                WHAT,
                format!("it expired at {}", x509.validity().not_after),
            ));
        }
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(PkiError::invalid(
                WHAT,
                "the private key does not belong to it",
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| PkiError::crypto("reading the CA certificate as an issuer", e))?;
        let cert_pem = pem_of(&cert_der);
        let ca = Self {
            trust_domain,
            issuer,
            cert_der,
            cert_pem,
            not_after,
        };
        ca.self_test(now)?;
        Ok(ca)
    }

    /// Issues a throwaway certificate and verifies it against the CA's own
    /// certificate, so a CA whose certificates would not chain to it (say, a
    /// subject the issuer cannot reproduce byte for byte) fails at load time
    /// rather than at every peer's handshake.
    fn self_test(&self, now: SystemTime) -> Result<(), PkiError> {
        const WHAT: &str = "the CA certificate";
        let probe = SpiffeId::node(&self.trust_domain, "ca-self-test")?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::crypto("generating the self-test key", e))?;
        let mut params = leaf_params(&probe)?;
        params.not_before = datetime(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        params.not_after = datetime(later(now, CLOCK_SKEW, "the self-test")?.min(self.not_after))?;
        let pem = self.issue(&params, &key)?;
        let chain = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| PkiError::invalid(WHAT, format!("its self-test certificate: {e}")))?;
        let at = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.trust_bundle()?
            .verify_server(&[chain], at)
            .map_err(|e| {
                PkiError::invalid(
                    WHAT,
                    format!("a certificate it issues does not verify against it: {e}"),
                )
            })?;
        Ok(())
    }

    pub(super) fn sign_at(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, PkiError> {
        if identity.trust_domain() != &self.trust_domain {
            return Err(PkiError::invalid(
                "the identity",
                format!(
                    "{identity} is in trust domain {:?}; this CA issues for {:?}",
                    identity.trust_domain().as_str(),
                    self.trust_domain.as_str()
                ),
            ));
        }
        if ttl.is_zero() {
            return Err(PkiError::invalid(
                "the certificate TTL",
                "it must be longer than zero",
            ));
        }
        if now >= self.not_after {
            return Err(PkiError::invalid(
                "the CA",
                "it has expired; it issues nothing until it is replaced",
            ));
        }
        let public_key = requested_key(csr_pem, identity)?;
        let mut params = leaf_params(identity)?;
        params.not_before = datetime(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        let wanted_end = later(now, ttl, "the certificate TTL")?;
        params.not_after = datetime(wanted_end.min(self.not_after))?;
        self.issue(&params, &public_key)
    }

    /// Signs `params` for `public_key`, unchecked: every caller outside tests
    /// goes through [`Self::sign`].
    pub(super) fn issue(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<String, PkiError> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| PkiError::crypto("signing the certificate", e))?;
        Ok(cert.pem())
    }
}

impl std::fmt::Debug for Ca {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === impl StoredCa ===

impl std::fmt::Debug for StoredCa {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The parameters of every leaf the CA issues for `identity`, all but its
/// validity. The subject is empty (so the SAN extension is critical): the
/// identity lives in the URI SAN alone, never in a name a verifier might
/// read instead.
pub(super) fn leaf_params(identity: &SpiffeId) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri_san(&identity.to_string())?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Reads a CSR, checks its signature (the requester holds the key) and that
/// it asks for exactly `identity`, and returns its public key.
fn requested_key(csr_pem: &str, identity: &SpiffeId) -> Result<SubjectPublicKeyInfo, PkiError> {
    const WHAT: &str = "the CSR";
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| PkiError::invalid(WHAT, format!("no PEM certificate request found: {e}")))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| PkiError::invalid(WHAT, format!("not a PKCS#10 request: {e}")))?;
    csr.verify_signature().map_err(|e| {
        PkiError::invalid(
            WHAT,
            format!("its signature does not verify ({e}): the requester does not hold the key"),
        )
    })?;
    let requested: Vec<String> = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect();
    if requested != [identity.to_string()] {
        let requested = match requested.as_slice() {
            [] => "no identity (no URI SAN)".to_owned(),
            [one] => one.clone(),
            many => format!("{} identities ({})", many.len(), many.join(", ")),
        };
        return Err(PkiError::IdentityMismatch {
            requested,
            decided: identity.clone(),
        });
    }
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| PkiError::crypto("reading the CSR's public key", e))
}

/// A CA certificate that names a SPIFFE trust domain must name ours.
fn check_ca_trust_domain(
    x509: &x509_parser::certificate::X509Certificate<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), PkiError> {
    let san = x509.subject_alternative_name().map_err(|e| {
        PkiError::invalid(
            "the CA certificate",
            format!("unreadable subjectAltName: {e}"),
        )
    })?;
    let ours = trust_domain.id_uri();
    let foreign = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(super::spiffe::SCHEME) && *uri != ours => {
                Some(*uri)
            }
            _ => None,
        });
    match foreign {
        Some(uri) => Err(PkiError::invalid(
            "the CA certificate",
            format!("it names the trust domain {uri}, not {ours}"),
        )),
        None => Ok(()),
    }
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    let uri = uri
        .to_owned()
        .try_into()
        .map_err(|e| PkiError::crypto("encoding the URI SAN", e))?;
    Ok(SanType::URI(uri))
}

/// A random positive 128-bit serial, so no two certificates share one.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    super::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::invalid("the serial number", "the system random source failed"))?;
    // Positive, and never with a leading zero byte DER would strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn later(now: SystemTime, by: Duration, what: &'static str) -> Result<SystemTime, PkiError> {
    now.checked_add(by)
        .ok_or_else(|| PkiError::invalid(what, format!("{by:?} is too long")))
}

fn datetime(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    // X.509 times end with 9999-12-31T23:59:59Z.
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since <= LAST => Ok(OffsetDateTime::from(t)),
        Ok(_) => Err(PkiError::invalid(
            "a validity time",
            "it is after the year 9999",
        )),
        Err(_) => Err(PkiError::invalid("a validity time", "it is before 1970")),
    }
}

/// A certificate as PEM, 64 base64 characters a line.
fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII, so every chunk is whole characters.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}
