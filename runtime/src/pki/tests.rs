use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

use super::ca::leaf_params;
use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long any one handshake or read in these tests may take.
const DEADLINE: Duration = Duration::from_secs(10);

fn init() {
    crate::install_crypto_provider();
}

fn td() -> TrustDomain {
    TrustDomain::new("mesh.example").unwrap()
}

fn svc(name: &str) -> SpiffeId {
    SpiffeId::service(&td(), name).unwrap()
}

fn new_ca() -> Ca {
    Ca::self_signed(td(), DAY).unwrap()
}

/// A node's flow: its own key, a CSR, the CA's certificate, credentials.
fn issue(ca: &Ca, id: &SpiffeId, ttl: Duration) -> Credentials {
    let key = LocalKey::generate().unwrap();
    let cert = ca.sign(&key.csr_pem(id).unwrap(), id, ttl).unwrap();
    Credentials::new(&key, &cert, id).unwrap()
}

/// Credentials for a certificate the CA signed from raw parameters
/// (bypassing [`Ca::sign`]'s rules), to test what peers do with it.
fn issue_raw(ca: &Ca, params: &CertificateParams, now: SystemTime) -> (LocalKey, String) {
    let key = LocalKey::generate().unwrap();
    let public = KeyPair::from_pem(&key.to_pem()).unwrap();
    let mut params = params.clone();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + HOUR).into();
    (key, ca.issue(&params, &public).unwrap())
}

/// A certificate for `id` from a CA with its own key but exactly `ca`'s
/// subject name.
fn impostor_issued(ca: &Ca, id: &SpiffeId, now: SystemTime) -> String {
    let (ours, _) = x509_of(ca.cert_pem());
    let x509 = cert::parse(&ours).unwrap();
    let cn = x509.subject().iter_common_name().next().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Meshwork");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn.as_str().unwrap());
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    assert_eq!(
        cert::parse(cert.der()).unwrap().subject().as_raw(),
        x509.subject().as_raw(),
        "the impostor must copy the name byte for byte"
    );
    let issuer = rcgen::Issuer::new(params, key);
    let mut leaf = leaf_params(id).unwrap();
    leaf.not_before = (now - HOUR).into();
    leaf.not_after = (now + HOUR).into();
    let leaf_key = KeyPair::generate().unwrap();
    leaf.signed_by(&leaf_key, &issuer).unwrap().pem()
}

fn der(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn x509_of(pem: &str) -> (CertificateDer<'static>, String) {
    (der(pem).remove(0), pem.to_owned())
}

fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let x509 = cert::parse(cert).unwrap();
    x509.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn csr_with_uris(key: &LocalKey, uris: &[&str]) -> String {
    let pair = KeyPair::from_pem(&key.to_pem()).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
        .collect();
    params.serialize_request(&pair).unwrap().pem().unwrap()
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

fn now_unix() -> UnixTime {
    UnixTime::now()
}

// === the CA ===

#[test]
fn self_signed_ca_is_a_leaf_only_ca_for_its_trust_domain() {
    let ca = new_ca();
    let (cert, _) = x509_of(ca.cert_pem());
    let x509 = cert::parse(&cert).unwrap();
    let bc = x509.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    assert!(x509.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(uri_sans(&cert), ["spiffe://mesh.example"]);
    let lifetime = ca.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        lifetime > DAY - Duration::from_secs(60) && lifetime <= DAY,
        "{lifetime:?}"
    );
    assert_eq!(ca.trust_domain(), &td());
}

#[test]
fn signed_certificate_carries_only_the_decided_identity_with_leaf_usages() {
    let ca = new_ca();
    let key = LocalKey::generate().unwrap();
    let id = svc("orders");
    let before = SystemTime::now();
    let pem = ca.sign(&key.csr_pem(&id).unwrap(), &id, HOUR).unwrap();
    let (cert, _) = x509_of(&pem);
    let x509 = cert::parse(&cert).unwrap();

    assert_eq!(uri_sans(&cert), ["spiffe://mesh.example/svc/orders"]);
    assert!(
        x509.subject().iter().next().is_none(),
        "the identity is in the SAN alone"
    );
    assert!(x509.subject_alternative_name().unwrap().unwrap().critical);
    let bc = x509.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca, "a leaf must not be a CA");
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.any && !eku.code_signing);
    assert_eq!(x509.public_key().raw, key.public_key_der().as_slice());

    let details = CertDetails::from_der(&cert).unwrap();
    assert_eq!(details.identity, id);
    let backdated = before.duration_since(details.not_before).unwrap();
    assert!(
        backdated >= ca::CLOCK_SKEW - Duration::from_secs(1),
        "{backdated:?}"
    );
    let ttl = details.not_after.duration_since(before).unwrap();
    assert!(ttl.abs_diff(HOUR) <= Duration::from_secs(2), "{ttl:?}");
}

#[test]
fn each_certificate_gets_its_own_serial() {
    let ca = new_ca();
    let key = LocalKey::generate().unwrap();
    let id = svc("orders");
    let csr = key.csr_pem(&id).unwrap();
    let serial = |pem: String| CertDetails::from_der(&der(&pem)[0]).unwrap().serial;
    let first = serial(ca.sign(&csr, &id, HOUR).unwrap());
    let second = serial(ca.sign(&csr, &id, HOUR).unwrap());
    assert_ne!(
        first, second,
        "the same key signed twice must not repeat a serial"
    );
    assert_eq!(first.len(), 32, "a 128-bit serial: {first}");
}

#[test]
fn sign_cuts_validity_at_the_ca_expiry() {
    let ca = Ca::self_signed(td(), HOUR).unwrap();
    let key = LocalKey::generate().unwrap();
    let id = svc("orders");
    let pem = ca.sign(&key.csr_pem(&id).unwrap(), &id, DAY).unwrap();
    let details = CertDetails::from_der(&der(&pem)[0]).unwrap();
    assert_eq!(details.not_after, ca.not_after());
}

#[test]
fn sign_refuses_a_csr_that_asks_for_another_identity() {
    let ca = new_ca();
    let key = LocalKey::generate().unwrap();
    let csr = key.csr_pem(&svc("payments")).unwrap();
    let err = ca.sign(&csr, &svc("orders"), HOUR).unwrap_err();
    assert!(matches!(err, PkiError::IdentityMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("spiffe://mesh.example/svc/payments")
            && msg.contains("spiffe://mesh.example/svc/orders"),
        "{msg}"
    );
}

#[test]
fn sign_refuses_a_csr_with_no_identity_or_two() {
    let ca = new_ca();
    let key = LocalKey::generate().unwrap();
    let id = svc("orders");
    let none = ca.sign(&csr_with_uris(&key, &[]), &id, HOUR).unwrap_err();
    assert!(none.to_string().contains("no identity"), "{none}");
    let two = csr_with_uris(
        &key,
        &[
            "spiffe://mesh.example/svc/orders",
            "spiffe://mesh.example/svc/admin",
        ],
    );
    let err = ca.sign(&two, &id, HOUR).unwrap_err();
    assert!(err.to_string().contains("2 identities"), "{err}");
}

#[test]
fn sign_refuses_an_identity_outside_its_trust_domain() {
    let ca = new_ca();
    let other = SpiffeId::service(&TrustDomain::new("other.example").unwrap(), "orders").unwrap();
    let key = LocalKey::generate().unwrap();
    let err = ca
        .sign(&key.csr_pem(&other).unwrap(), &other, HOUR)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"other.example\"") && err.contains("\"mesh.example\""),
        "{err}"
    );
}

#[test]
fn sign_refuses_a_csr_whose_signature_does_not_verify() {
    let ca = new_ca();
    let id = svc("orders");
    let csr = LocalKey::generate().unwrap().csr_pem(&id).unwrap();
    let mut bytes = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let forged = pem_block("CERTIFICATE REQUEST", &bytes);
    let err = ca.sign(&forged, &id, HOUR).unwrap_err().to_string();
    assert!(err.contains("does not hold the key"), "{err}");
}

#[test]
fn sign_refuses_garbage_and_a_zero_ttl() {
    let ca = new_ca();
    let id = svc("orders");
    let err = ca.sign("not a csr", &id, HOUR).unwrap_err().to_string();
    assert!(
        err.starts_with("the CSR: no PEM certificate request"),
        "{err}"
    );
    let csr = LocalKey::generate().unwrap().csr_pem(&id).unwrap();
    let err = ca.sign(&csr, &id, Duration::ZERO).unwrap_err().to_string();
    assert!(
        err.contains("TTL") && err.contains("longer than zero"),
        "{err}"
    );
}

#[test]
fn an_expired_ca_issues_nothing() {
    let ca = new_ca();
    let id = svc("orders");
    let csr = LocalKey::generate().unwrap().csr_pem(&id).unwrap();
    let err = ca
        .sign_at(&csr, &id, HOUR, ca.not_after() + Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the CA: it has expired"), "{err}");
}

#[test]
fn a_stored_ca_loads_back_and_keeps_issuing_for_the_same_anchor() {
    let ca = new_ca();
    let stored = ca.to_stored();
    assert!(!format!("{stored:?}").contains("PRIVATE KEY"));
    assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    let json = serde_json::to_string(&stored).unwrap();
    let back: StoredCa = serde_json::from_str(&json).unwrap();
    let loaded = Ca::from_stored(&back).unwrap();
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.not_after(), ca.not_after());

    let creds = issue(&loaded, &svc("orders"), HOUR);
    let bundle = ca.trust_bundle().unwrap();
    let chain = &creds.certified_key().cert;
    assert_eq!(
        bundle.verify_client(chain, now_unix()).unwrap(),
        svc("orders")
    );
}

#[test]
fn an_operator_ca_made_elsewhere_loads_and_issues() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let now = SystemTime::now();
    params.not_before = (now - HOUR).into();
    params.not_after = (now + DAY).into();
    let cert = params.self_signed(&key).unwrap();
    let ca = Ca::from_pem(td(), &cert.pem(), &key.serialize_pem()).unwrap();
    let creds = issue(&ca, &svc("orders"), HOUR);
    let bundle = TrustBundle::from_pem(td(), &cert.pem()).unwrap();
    assert_eq!(
        bundle
            .verify_server(&creds.certified_key().cert, now_unix())
            .unwrap(),
        svc("orders")
    );
}

#[test]
fn loading_a_ca_refuses_a_non_ca_an_expired_ca_and_a_foreign_key() {
    let ca = new_ca();
    let stored = ca.to_stored();

    let key = LocalKey::generate().unwrap();
    let id = svc("orders");
    let leaf = ca.sign(&key.csr_pem(&id).unwrap(), &id, HOUR).unwrap();
    let err = Ca::from_pem(td(), &leaf, &key.to_pem())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a CA"), "{err}");

    let now = SystemTime::now();
    let old = Ca::self_signed_at(td(), HOUR, now - 2 * HOUR)
        .unwrap()
        .to_stored();
    let err = Ca::from_pem(td(), &old.cert_pem, &old.key_pem)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the CA certificate: it expired at"), "{err}");

    let future = Ca::self_signed_at(td(), DAY, now + HOUR)
        .unwrap()
        .to_stored();
    let err = Ca::from_pem(td(), &future.cert_pem, &future.key_pem)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid before"), "{err}");

    let other = new_ca().to_stored();
    let err = Ca::from_pem(td(), &stored.cert_pem, &other.key_pem)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the private key does not belong to it"),
        "{err}"
    );

    let err = Ca::from_pem(td(), "garbage", &stored.key_pem)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the CA certificate: no PEM certificate"),
        "{err}"
    );
    let err = Ca::from_pem(td(), &stored.cert_pem, "garbage")
        .unwrap_err()
        .to_string();
    assert!(err.contains("the CA private key"), "{err}");
}

#[test]
fn an_operator_ca_made_with_openssl_loads_and_issues() {
    let cert = include_str!("testdata/openssl-ca.crt");
    let ca = Ca::from_pem(td(), cert, include_str!("testdata/openssl-ca.key")).unwrap();
    let creds = issue(&ca, &svc("orders"), HOUR);
    let bundle = TrustBundle::from_pem(td(), cert).unwrap();
    let chain = &creds.certified_key().cert;
    assert_eq!(
        bundle.verify_client(chain, now_unix()).unwrap(),
        svc("orders")
    );
}

#[test]
fn loading_a_ca_whose_subject_cannot_be_reproduced_fails_at_load() {
    // DC=com, DC=example: a repeated attribute type, which the issuer name
    // of the certificates it would issue cannot carry byte for byte.
    let err = Ca::from_pem(
        td(),
        include_str!("testdata/openssl-dc-ca.crt"),
        include_str!("testdata/openssl-dc-ca.key"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("a certificate it issues does not verify against it"),
        "{err}"
    );
}

#[test]
fn loading_a_ca_refuses_one_for_another_trust_domain() {
    let stored = new_ca().to_stored();
    let other = TrustDomain::new("other.example").unwrap();
    let err = Ca::from_pem(other, &stored.cert_pem, &stored.key_pem)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("names the trust domain spiffe://mesh.example, not spiffe://other.example"),
        "{err}"
    );
}

#[test]
fn loading_a_ca_refuses_one_whose_key_usage_forbids_signing() {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = (now - HOUR).into();
    params.not_after = (now + DAY).into();
    let cert = params.self_signed(&key).unwrap();
    let err = Ca::from_pem(td(), &cert.pem(), &key.serialize_pem())
        .unwrap_err()
        .to_string();
    assert!(err.contains("keyCertSign"), "{err}");
}

// === keys, credentials, renewal ===

#[test]
fn a_key_survives_pem_and_its_debug_hides_it() {
    let key = LocalKey::generate().unwrap();
    let again = LocalKey::from_pem(&key.to_pem()).unwrap();
    assert_eq!(again.public_key_der(), key.public_key_der());
    assert!(!format!("{key:?}").contains("PRIVATE"));
    let err = LocalKey::from_pem("nope").unwrap_err().to_string();
    assert!(err.starts_with("reading the private key PEM"), "{err}");
}

#[test]
fn credentials_refuse_a_certificate_for_another_key_identity_or_an_expired_one() {
    let ca = new_ca();
    let id = svc("orders");
    let key = LocalKey::generate().unwrap();
    let cert = ca.sign(&key.csr_pem(&id).unwrap(), &id, HOUR).unwrap();

    let stranger = LocalKey::generate().unwrap();
    let err = Credentials::new(&stranger, &cert, &id)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not for this node's key"), "{err}");

    let err = Credentials::new(&key, &cert, &svc("payments"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("it is for spiffe://mesh.example/svc/orders, not"),
        "{err}"
    );

    let later = SystemTime::now() + 2 * HOUR;
    let err = Credentials::new_at(&key, &cert, &id, later)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already expired"), "{err}");

    let err = Credentials::new(&key, "", &id).unwrap_err().to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[test]
fn renewal_is_due_two_thirds_into_the_lifetime() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        renew_at(start, start + Duration::from_secs(90 * 60)),
        start + Duration::from_secs(60 * 60)
    );
    assert_eq!(
        renew_at(start, start + Duration::from_secs(1)),
        start + Duration::from_nanos(666_666_666)
    );
    assert_eq!(renew_at(start, start), start);
    assert_eq!(renew_at(start, start - HOUR), start);

    let creds = issue(&new_ca(), &svc("orders"), Duration::from_secs(3 * 3600));
    let d = creds.details();
    assert_eq!(creds.renew_at(), renew_at(d.not_before, d.not_after));
    let from_now = creds.renew_at().duration_since(SystemTime::now()).unwrap();
    // 3 h plus the backdating, two thirds of it, less the backdating.
    assert!(
        from_now.abs_diff(Duration::from_secs(7200 - 20)) < Duration::from_secs(5),
        "{from_now:?}"
    );
}

// === verification without a handshake ===

#[test]
fn a_mesh_certificate_verifies_as_client_and_server_and_names_its_peer() {
    let ca = new_ca();
    let bundle = ca.trust_bundle().unwrap();
    let node = SpiffeId::node(&td(), "node-1").unwrap();
    let creds = issue(&ca, &node, HOUR);
    let chain = &creds.certified_key().cert;
    assert_eq!(bundle.verify_client(chain, now_unix()).unwrap(), node);
    assert_eq!(bundle.verify_server(chain, now_unix()).unwrap(), node);
    assert_eq!(peer_identity(Some(chain)).unwrap(), node);
}

#[test]
fn verification_refuses_what_the_mesh_must_not_trust() {
    let ca = new_ca();
    let bundle = ca.trust_bundle().unwrap();
    let now = SystemTime::now();

    // A CA that copies our CA's name exactly (an impostor), another mesh
    // CA of the same trust domain, and one of another trust domain.
    let from_impostor = der(&impostor_issued(&ca, &svc("orders"), now));
    let from_stranger = issue(&new_ca(), &svc("orders"), HOUR)
        .certified_key()
        .cert
        .clone();
    let elsewhere = Ca::self_signed(TrustDomain::new("elsewhere").unwrap(), DAY).unwrap();
    let from_elsewhere = issue_raw(&elsewhere, &leaf_params(&svc("orders")).unwrap(), now);
    let from_elsewhere = der(&from_elsewhere.1);

    let mut two = leaf_params(&svc("orders")).unwrap();
    two.subject_alt_names.push(SanType::URI(
        "spiffe://mesh.example/svc/admin"
            .to_owned()
            .try_into()
            .unwrap(),
    ));
    let two_uris = der(&issue_raw(&ca, &two, now).1);

    let mut dns_only = leaf_params(&svc("orders")).unwrap();
    dns_only.subject_alt_names = vec![SanType::DnsName("orders.mesh".try_into().unwrap())];
    let no_uri = der(&issue_raw(&ca, &dns_only, now).1);

    let mut https = leaf_params(&svc("orders")).unwrap();
    https.subject_alt_names = vec![SanType::URI(
        "https://mesh.example/svc/orders"
            .to_owned()
            .try_into()
            .unwrap(),
    )];
    let not_spiffe = der(&issue_raw(&ca, &https, now).1);

    let foreign_id =
        SpiffeId::service(&TrustDomain::new("other.example").unwrap(), "orders").unwrap();
    let foreign = der(&issue_raw(&ca, &leaf_params(&foreign_id).unwrap(), now).1);

    let key = LocalKey::generate().unwrap();
    let id = svc("orders");
    let old = ca
        .sign_at(&key.csr_pem(&id).unwrap(), &id, HOUR, now - 2 * DAY)
        .unwrap();
    let expired = der(&old);

    for verify in [TrustBundle::verify_client, TrustBundle::verify_server] {
        let check = |chain: &[CertificateDer<'_>]| verify(&bundle, chain, now_unix());
        assert!(matches!(
            check(&from_impostor),
            Err(PeerError::Untrusted(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature
            )))
        ));
        assert!(matches!(
            check(&from_stranger),
            Err(PeerError::Untrusted(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )))
        ));
        assert!(matches!(
            check(&from_elsewhere),
            Err(PeerError::Untrusted(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )))
        ));
        let err = check(&two_uris).unwrap_err();
        assert!(matches!(err, PeerError::Identity(_)), "{err:?}");
        assert!(err.to_string().contains("has 2 URI SANs"), "{err}");
        let err = check(&no_uri).unwrap_err();
        assert!(err.to_string().contains("no URI SAN"), "{err}");
        let err = check(&not_spiffe).unwrap_err();
        assert!(
            err.to_string().contains("must start with \"spiffe://\""),
            "{err}"
        );
        let err = check(&foreign).unwrap_err();
        assert!(
            matches!(err, PeerError::ForeignTrustDomain { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("outside the trust domain \"mesh.example\""),
            "{err}"
        );
        let err = check(&expired).unwrap_err();
        assert!(
            matches!(
                err,
                PeerError::Untrusted(rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            ),
            "{err:?}"
        );
        assert!(matches!(check(&[]), Err(PeerError::NoCertificate)));
    }
    assert!(matches!(peer_identity(None), Err(PeerError::NoCertificate)));
}

#[test]
fn a_trust_bundle_needs_an_anchor() {
    let err = TrustBundle::new(td(), Vec::new()).unwrap_err().to_string();
    assert!(err.contains("no CA certificate"), "{err}");
    let err = TrustBundle::from_pem(td(), "").unwrap_err().to_string();
    assert!(err.contains("no CA certificate"), "{err}");
}

// === handshakes ===

/// One side of the mesh: a CA-issued identity and its resolver.
fn side(ca: &Ca, id: &SpiffeId) -> Arc<CertResolver> {
    Arc::new(CertResolver::new(issue(ca, id, HOUR)))
}

fn server(ca: &Ca, certs: Arc<CertResolver>) -> TlsAcceptor {
    let config = server_config(&ca.trust_bundle().unwrap(), certs).unwrap();
    TlsAcceptor::from(Arc::new(config))
}

fn client(ca: &Ca, certs: Arc<CertResolver>, expected: SpiffeId) -> TlsConnector {
    let config = client_config(&ca.trust_bundle().unwrap(), certs, expected).unwrap();
    TlsConnector::from(Arc::new(config))
}

type ServerStream = tokio_rustls::server::TlsStream<DuplexStream>;
type ClientStream = tokio_rustls::client::TlsStream<DuplexStream>;

/// Runs both ends of a handshake over an in-memory pipe. TLS 1.3 clients
/// finish before the server has checked their certificate, so a client
/// refused by the server sees it on its first read.
async fn handshake(
    acceptor: &TlsAcceptor,
    connector: &TlsConnector,
) -> (io::Result<ServerStream>, io::Result<ClientStream>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    // The name is neither sent nor checked: identities are.
    let name = ServerName::try_from("peer.mesh.invalid").unwrap();
    let both = async { tokio::join!(acceptor.accept(s), connector.connect(name, c)) };
    tokio::time::timeout(DEADLINE, both)
        .await
        .expect("handshake hung")
}

/// The rustls error inside an I/O error, as text (with a [`PeerError`]'s
/// own message when it is one).
fn tls_error(e: &io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<PeerError>()
            .map_or_else(|| tls.to_string(), ToString::to_string),
        _ => tls.to_string(),
    }
}

async fn round_trip(server: &mut ServerStream, client: &mut ClientStream, msg: &[u8]) {
    let work = async {
        client.write_all(msg).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; msg.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
        server.write_all(&got).await.unwrap();
        server.flush().await.unwrap();
        let mut back = vec![0; msg.len()];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("round trip hung");
}

async fn refused_by_server(acceptor: &TlsAcceptor, connector: &TlsConnector) -> String {
    let (server, client) = handshake(acceptor, connector).await;
    let err = server.expect_err("the server must refuse the client");
    if let Ok(mut client) = client {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(DEADLINE, client.read(&mut buf)).await;
        assert!(
            !matches!(read, Ok(Ok(n)) if n > 0),
            "a refused client must not read data"
        );
    }
    tls_error(&err)
}

#[tokio::test]
async fn mesh_handshake_surfaces_each_peers_identity() {
    init();
    let ca = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("orders")));
    let connector = client(&ca, side(&ca, &svc("web")), svc("orders"));
    let (server, client) = handshake(&acceptor, &connector).await;
    let (mut server, mut client) = (server.unwrap(), client.unwrap());

    let seen_by_server = peer_identity(server.get_ref().1.peer_certificates()).unwrap();
    assert_eq!(seen_by_server, svc("web"));
    let seen_by_client = peer_identity(client.get_ref().1.peer_certificates()).unwrap();
    assert_eq!(seen_by_client, svc("orders"));
    round_trip(&mut server, &mut client, b"hello through the mesh").await;
}

#[tokio::test]
async fn handshake_refuses_a_client_cert_from_another_ca() {
    init();
    let ca = new_ca();
    let stranger = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("orders")));
    // The stranger's client trusts our server, but presents its own cert.
    let connector = client(&ca, side(&stranger, &svc("web")), svc("orders"));
    let err = refused_by_server(&acceptor, &connector).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn handshake_refuses_a_client_cert_with_two_uri_sans() {
    init();
    let ca = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("orders")));
    let mut two = leaf_params(&svc("web")).unwrap();
    two.subject_alt_names.push(SanType::URI(
        "spiffe://mesh.example/svc/admin"
            .to_owned()
            .try_into()
            .unwrap(),
    ));
    let (key, pem) = issue_raw(&ca, &two, SystemTime::now());
    // Credentials refuse such a cert, so present it through rustls directly.
    let certified = rustls::sign::CertifiedKey::from_der(
        der(&pem),
        key.private_key_der(),
        &rustls::crypto::ring::default_provider(),
    )
    .unwrap();
    let err = Credentials::new(&key, &pem, &svc("web"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 URI SANs"), "{err}");
    let connector = raw_client(&ca, certified, svc("orders"));
    let err = refused_by_server(&acceptor, &connector).await;
    assert!(err.contains("has 2 URI SANs"), "{err}");
}

#[tokio::test]
async fn handshake_refuses_an_expired_client_cert() {
    init();
    let ca = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("orders")));
    let key = LocalKey::generate().unwrap();
    let id = svc("web");
    let then = SystemTime::now() - 2 * DAY;
    let pem = ca
        .sign_at(&key.csr_pem(&id).unwrap(), &id, HOUR, then)
        .unwrap();
    let creds = Credentials::new_at(&key, &pem, &id, then).unwrap();
    let connector = client(&ca, Arc::new(CertResolver::new(creds)), svc("orders"));
    let err = refused_by_server(&acceptor, &connector).await;
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test]
async fn handshake_refuses_a_client_without_a_cert() {
    init();
    let ca = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("orders")));
    let mut config = client_config(
        &ca.trust_bundle().unwrap(),
        side(&ca, &svc("web")),
        svc("orders"),
    )
    .unwrap();
    config.client_auth_cert_resolver = Arc::new(NoClientCert);
    let connector = TlsConnector::from(Arc::new(config));
    let err = refused_by_server(&acceptor, &connector).await;
    assert!(err.contains("no certificates"), "{err}");
}

#[tokio::test]
async fn server_refuses_plaintext() {
    init();
    let ca = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("orders")));
    let (mut c, s) = tokio::io::duplex(64 * 1024);
    let talk = async {
        let accept = acceptor.accept(s);
        let send = async {
            c.write_all(b"GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n")
                .await
                .unwrap();
            let mut reply = Vec::new();
            // The server answers with at most an alert, then closes.
            let _ = c.read_to_end(&mut reply).await;
            reply
        };
        tokio::join!(accept, send)
    };
    let (accepted, reply) = tokio::time::timeout(DEADLINE, talk).await.expect("hung");
    let err = accepted.expect_err("plaintext must be refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(
        !String::from_utf8_lossy(&reply).contains("HTTP"),
        "no HTTP answer to plaintext"
    );
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    init();
    let ca = new_ca();
    let acceptor = server(&ca, side(&ca, &svc("payments")));
    let connector = client(&ca, side(&ca, &svc("web")), svc("orders"));
    let (_, client) = handshake(&acceptor, &connector).await;
    let err = tls_error(&client.expect_err("the client must refuse the server"));
    assert!(
        err.contains("the peer is spiffe://mesh.example/svc/payments, not the expected spiffe://mesh.example/svc/orders"),
        "{err}"
    );
}

#[tokio::test]
async fn client_refuses_a_server_from_another_ca() {
    init();
    let ca = new_ca();
    let stranger = new_ca();
    let acceptor = server(&stranger, side(&stranger, &svc("orders")));
    let connector = client(&ca, side(&ca, &svc("web")), svc("orders"));
    let (_, client) = handshake(&acceptor, &connector).await;
    let err = tls_error(&client.expect_err("the client must refuse the server"));
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn rotation_serves_new_handshakes_the_new_cert_and_keeps_open_connections() {
    init();
    let ca = new_ca();
    let orders = side(&ca, &svc("orders"));
    let acceptor = server(&ca, orders.clone());
    let connector = client(&ca, side(&ca, &svc("web")), svc("orders"));
    let serial = |c: &ClientStream| {
        let certs = c.get_ref().1.peer_certificates().unwrap();
        CertDetails::from_der(&certs[0]).unwrap().serial
    };

    let (s1, c1) = handshake(&acceptor, &connector).await;
    let (mut s1, mut c1) = (s1.unwrap(), c1.unwrap());
    let old_serial = serial(&c1);
    assert_eq!(old_serial, orders.current().details().serial);

    let renewed = issue(&ca, &svc("orders"), HOUR);
    let new_serial = renewed.details().serial.clone();
    assert_ne!(new_serial, old_serial);
    orders.rotate(renewed).unwrap();

    let (s2, c2) = handshake(&acceptor, &connector).await;
    let (mut s2, mut c2) = (s2.unwrap(), c2.unwrap());
    assert_eq!(
        serial(&c2),
        new_serial,
        "a new handshake presents the new cert"
    );
    assert_eq!(serial(&c1), old_serial);
    round_trip(&mut s1, &mut c1, b"the old connection still works").await;
    round_trip(&mut s2, &mut c2, b"and so does the new one").await;

    let err = orders
        .rotate(issue(&ca, &svc("payments"), HOUR))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("this resolver presents spiffe://mesh.example/svc/orders"),
        "{err}"
    );
    assert_eq!(orders.current().details().serial, new_serial);
}

/// A client config presenting `certified` as is.
fn raw_client(ca: &Ca, certified: rustls::sign::CertifiedKey, expected: SpiffeId) -> TlsConnector {
    let mut config: ClientConfig =
        client_config(&ca.trust_bundle().unwrap(), side(ca, &svc("web")), expected).unwrap();
    config.client_auth_cert_resolver = Arc::new(Fixed(Arc::new(certified)));
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}
