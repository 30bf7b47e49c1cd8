//! mesh-control's certificate authority: `mesh.v1.Identity.Sign` issues
//! short-lived certificates, one SPIFFE ID each, for the CSRs of keys the
//! nodes generated themselves.
//!
//! # Where the CA comes from
//!
//! Either the operator hands mesh-control a CA certificate and key
//! (`ca_cert_file`, `ca_key_file`), used as is, or mesh-control makes one.
//! A made CA lives in Consul KV at `mesh/ca/root` (JSON
//! [`StoredCa`](mesh_runtime::pki::StoredCa), key included): the first
//! replica to find none creates it with check-and-set on index 0, and a
//! replica that loses that race reads the winner's, so every replica signs
//! with the same CA. Either way the CA certificate is published at
//! `mesh/ca/bundle` (PEM), where anyone may read it. See [`ca_store`].
//!
//! # Who gets what
//!
//! A caller names its node and the identity it wants. It may have
//! `spiffe://<trust-domain>/node/<node>` for the node it names, and
//! `spiffe://<trust-domain>/svc/<name>` when Consul's catalog has an
//! instance of `<name>` on that node. The CSR must ask for exactly that
//! identity; only its public key is used.
//!
//! # What this does not protect against (yet)
//!
//! - Every node presents the same bootstrap token (`identity_token`), and
//!   nothing ties a caller to the node it names: a holder of the token can
//!   ask for any node's identity, and for any service registered on any
//!   node. The token is as sensitive as every identity in the mesh. A later
//!   step authenticates renewals with the caller's current certificate
//!   (mTLS), so that a node can only renew what it holds.
//! - The catalog is trusted: whoever may register an instance on a node in
//!   Consul may make that node eligible for the service's identity. Consul
//!   ACLs are the guard there.
//! - A made CA's key is in Consul KV: restrict `mesh/ca/root` to
//!   mesh-control with a Consul ACL policy, or bring an operator CA.
//! - There is no revocation: a certificate is valid until it expires, which
//!   is why certificates are short-lived (`cert_ttl`).
//!
//! - [`ca_store`]: the CA in Consul KV: created once, loaded by every replica.
//! - [`grpc`]: the tonic service and its bearer-token check.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use consul_client::{Client, QueryOptions};
use mesh_runtime::{
    backoff::Backoff,
    pki::{
        Ca, CertDetails, PkiError, SpiffeId, TrustDomain, Workload,
        spiffe::{RESERVED_SERVICES, check_node_name},
    },
    shutdown::Shutdown,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::sync::OnceCell;

use crate::{config::Secret, control::CONTROL_SERVICE, metrics::ControlMetrics};

pub mod ca_store;
pub mod grpc;

/// The trust domain when none is set.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshwork.local";
/// How long an issued certificate is valid when `cert_ttl` is not set.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest `cert_ttl`: renewal at two thirds must have room for retries.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(60);
/// The longest `cert_ttl`: certificates are revoked only by expiring.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a CA mesh-control makes is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The shortest `identity_token` accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// How long a catalog read for an authorization may take.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(5);

/// How issuance is set up (from mesh-control's config).
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// The trust domain every identity is in.
    pub trust_domain: TrustDomain,
    /// The operator's CA, when one was given; else the CA in Consul KV.
    pub operator_ca: Option<OperatorCa>,
    /// How long an issued certificate is valid.
    pub cert_ttl: Duration,
    /// The bearer token callers present; `None`: no issuance.
    pub token: Option<Secret>,
}

/// An operator's CA certificate and key, as read from their files.
#[derive(Clone, Debug)]
pub struct OperatorCa {
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: Secret,
}

/// The issuing side of `mesh.v1.Identity`, whatever the transport. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Identity {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    consul: Client,
    settings: IdentitySettings,
    ca: OnceCell<Arc<Ca>>,
    metrics: ControlMetrics,
}

/// A certificate issued by [`Identity::sign`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The trust anchors (PEM).
    pub trust_bundle_pem: String,
    /// When it expires.
    pub not_after: SystemTime,
    /// When to renew it.
    pub renew_at: SystemTime,
}

/// Why a certificate was not issued; each maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A field that is malformed; names the field.
    #[error("{field}: {message}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The caller may not have this identity.
    #[error("{0}")]
    Denied(String),
    /// Consul (the catalog or the CA in KV) is out of reach; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The CA cannot sign (a stored CA that does not load, a signing failure).
    #[error("{0}")]
    Internal(String),
}

// === impl IdentitySettings ===

impl IdentitySettings {
    /// Checks the settings as given; an error names the key.
    pub fn from_settings(
        trust_domain: Option<&str>,
        ca_cert_file: Option<&Path>,
        ca_key_file: Option<&Path>,
        cert_ttl: Option<Duration>,
        token: Option<&str>,
    ) -> Result<Self, String> {
        let trust_domain = TrustDomain::new(trust_domain.unwrap_or(DEFAULT_TRUST_DOMAIN).trim())
            .map_err(|e| format!("trust_domain: {e}"))?;
        let operator_ca = match (ca_cert_file, ca_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(OperatorCa::read(&trust_domain, cert, key)?),
            (Some(_), None) => {
                return Err("ca_key_file: must be set with ca_cert_file".into());
            }
            (None, Some(_)) => {
                return Err("ca_cert_file: must be set with ca_key_file".into());
            }
        };
        let cert_ttl = cert_ttl.unwrap_or(DEFAULT_CERT_TTL);
        if !(MIN_CERT_TTL..=MAX_CERT_TTL).contains(&cert_ttl) {
            return Err(format!(
                "cert_ttl: {} is out of range (1m to 720h)",
                mesh_runtime::duration::HumanDuration(cert_ttl)
            ));
        }
        let token = match token.map(str::trim) {
            None | Some("") => None,
            Some(t) if t.len() < MIN_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(format!(
                    "identity_token: must be at least {MIN_TOKEN_LEN} printable characters \
                     without spaces"
                ));
            }
            Some(t) => Some(Secret(t.to_owned())),
        };
        Ok(Self {
            trust_domain,
            operator_ca,
            cert_ttl,
            token,
        })
    }
}

// === impl OperatorCa ===

impl OperatorCa {
    /// Reads both files and checks that they make a CA for `trust_domain`.
    fn read(trust_domain: &TrustDomain, cert: &Path, key: &Path) -> Result<Self, String> {
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| format!("ca_cert_file: {}: {e}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .map_err(|e| format!("ca_key_file: {}: {e}", key.display()))?;
        Ca::from_pem(trust_domain.clone(), &cert_pem, &key_pem).map_err(|e| {
            format!(
                "ca_cert_file: {} with ca_key_file {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(Self {
            cert_pem,
            key_pem: Secret(key_pem),
        })
    }
}

// === impl Identity ===

impl Identity {
    /// Issues as `settings` say, reading the catalog (and the CA, unless
    /// the operator gave one) through `consul`.
    pub fn new(consul: Client, settings: IdentitySettings, metrics: ControlMetrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                consul,
                settings,
                ca: OnceCell::new(),
                metrics,
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &IdentitySettings {
        &self.inner.settings
    }

    /// Whether issuance is on (an `identity_token` is set).
    pub fn enabled(&self) -> bool {
        self.inner.settings.token.is_some()
    }

    /// Where refusals and issued certificates are counted.
    pub fn metrics(&self) -> &ControlMetrics {
        &self.inner.metrics
    }

    /// Loads (or creates) the CA and publishes its bundle, retrying with
    /// backoff until it succeeds or `shutdown`: so the CA exists, and
    /// bridges find the bundle, before the first node asks.
    pub async fn prepare(self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut last_error = String::new();
        loop {
            match self.ca().await {
                Ok(ca) => {
                    tracing::info!(
                        trust_domain = %ca.trust_domain(),
                        operator = self.inner.settings.operator_ca.is_some(),
                        "the mesh CA is ready"
                    );
                    return;
                }
                Err(e) => {
                    let message = e.to_string();
                    if message != last_error {
                        tracing::warn!(error = %message, "the mesh CA is not ready; retrying");
                        last_error = message;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = backoff.wait() => {}
            }
        }
    }

    /// Decides whether node `node` may have `identity` and, if so, signs
    /// `csr_pem` for it.
    pub async fn sign(
        &self,
        node: &str,
        identity: &str,
        csr_pem: &str,
    ) -> Result<Issued, SignError> {
        let result = self.authorize_and_sign(node, identity, csr_pem).await;
        match &result {
            Ok(_) => {
                let kind = match SpiffeId::parse(identity).map(|id| id.workload().clone()) {
                    Ok(Workload::Node(_)) => "node",
                    _ => "service",
                };
                self.inner.metrics.certificate_issued(kind);
            }
            Err(e) => {
                tracing::info!(node, identity, error = %e, "certificate refused");
                self.inner.metrics.certificate_refused(e.reason());
            }
        }
        result
    }

    async fn authorize_and_sign(
        &self,
        node: &str,
        identity: &str,
        csr_pem: &str,
    ) -> Result<Issued, SignError> {
        let id = self.authorize(node, identity).await?;
        let ca = self.ca().await?;
        let signed_at = SystemTime::now();
        let cert_pem = ca
            .sign(csr_pem, &id, self.inner.settings.cert_ttl)
            .map_err(|e| match e {
                PkiError::Crypto { .. } | PkiError::Tls { .. } => {
                    SignError::Internal(format!("signing for {id}: {e}"))
                }
                other => SignError::Invalid {
                    field: "csr_pem",
                    message: other.to_string(),
                },
            })?;
        let details = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|der| CertDetails::from_der(&der))
            .map_err(|e| SignError::Internal(format!("the issued certificate: {e}")))?;
        tracing::info!(
            node, identity = %id, serial = %details.serial,
            not_after_ms = millis(details.not_after), "certificate issued"
        );
        Ok(Issued {
            cert_pem,
            trust_bundle_pem: ca.cert_pem().to_owned(),
            not_after: details.not_after,
            renew_at: renew_at(signed_at, details.not_after),
        })
    }

    /// The identity `node` may have, or why not.
    async fn authorize(&self, node: &str, identity: &str) -> Result<SpiffeId, SignError> {
        check_node_name(node).map_err(|message| SignError::Invalid {
            field: "node",
            message,
        })?;
        let id = SpiffeId::parse(identity).map_err(|e| SignError::Invalid {
            field: "identity",
            message: e.to_string(),
        })?;
        let ours = &self.inner.settings.trust_domain;
        if id.trust_domain() != ours {
            return Err(SignError::Denied(format!(
                "node {node:?} may not have {id}: this mesh's trust domain is {ours:?}"
            )));
        }
        match id.workload() {
            Workload::Node(name) if name.eq_ignore_ascii_case(node) => Ok(id),
            Workload::Node(_) => Err(SignError::Denied(format!(
                "node {node:?} may not have {id}: a node gets only its own node identity"
            ))),
            // mesh-control issues its own (deployer_mtls, monitor_addr
            // https): a node that registered an instance named mesh-control
            // must not get the right to change every node.
            Workload::Service(name) if name == CONTROL_SERVICE => Err(SignError::Denied(format!(
                "node {node:?} may not have {id}: it is mesh-control's own identity, never a node's"
            ))),
            Workload::Service(name) => {
                self.check_instance_on(node, name).await?;
                Ok(id)
            }
        }
    }

    /// Consul's catalog must have an instance of `service` on `node`.
    async fn check_instance_on(&self, node: &str, service: &str) -> Result<(), SignError> {
        if RESERVED_SERVICES.contains(&service) {
            return Err(SignError::Denied(format!(
                "{service:?} is reserved by the mesh: no service identity is issued for it"
            )));
        }
        let read = self
            .inner
            .consul
            .catalog_node_services(node, QueryOptions::default());
        let instances = tokio::time::timeout(CATALOG_TIMEOUT, read)
            .await
            .map_err(|_| {
                SignError::Unavailable(format!(
                    "Consul's catalog did not answer within {CATALOG_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| SignError::Unavailable(format!("reading Consul's catalog: {e}")))?
            .value;
        if instances
            .iter()
            .any(|i| i.service.eq_ignore_ascii_case(service))
        {
            Ok(())
        } else {
            Err(SignError::Denied(format!(
                "node {node:?} may not have spiffe://{}/svc/{service}: Consul's catalog has \
                 no instance of {service:?} on node {node:?}",
                self.inner.settings.trust_domain
            )))
        }
    }

    /// The CA, as [`Identity::sign`] uses it: for the certificates
    /// mesh-control issues itself (its own `svc/mesh-control`).
    pub async fn authority(&self) -> Result<Arc<Ca>, SignError> {
        self.ca().await
    }

    /// The CA, loaded once (from the operator's files, or from Consul KV,
    /// created there if missing) with its bundle published.
    async fn ca(&self) -> Result<Arc<Ca>, SignError> {
        self.inner
            .ca
            .get_or_try_init(|| async {
                let settings = &self.inner.settings;
                let ca = match &settings.operator_ca {
                    Some(operator) => Ca::from_pem(
                        settings.trust_domain.clone(),
                        &operator.cert_pem,
                        &operator.key_pem.0,
                    )
                    .map_err(|e| SignError::Internal(format!("the operator's CA: {e}")))?,
                    None => {
                        let (ca, origin) =
                            ca_store::load_or_create(&self.inner.consul, &settings.trust_domain)
                                .await?;
                        tracing::info!(?origin, key = ca_store::ROOT_KEY, "mesh CA loaded");
                        ca
                    }
                };
                ca_store::publish_bundle(&self.inner.consul, &ca).await?;
                Ok(Arc::new(ca))
            })
            .await
            .cloned()
    }
}

// === impl SignError ===

impl SignError {
    /// A short name of the reason, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::Denied(_) => "denied",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<SignError> for tonic::Status {
    fn from(e: SignError) -> Self {
        let code = match &e {
            SignError::Invalid { .. } => tonic::Code::InvalidArgument,
            SignError::Denied(_) => tonic::Code::PermissionDenied,
            SignError::Unavailable(_) => tonic::Code::Unavailable,
            SignError::Internal(_) => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// When a certificate signed at `signed_at` is due for renewal: at two
/// thirds of the lifetime it has left. Its validity starts a little before
/// `signed_at` (for clock skew), so two thirds of its whole validity would
/// make a short-lived certificate due at once.
pub fn renew_at(signed_at: SystemTime, not_after: SystemTime) -> SystemTime {
    let left = not_after.duration_since(signed_at).unwrap_or_default();
    signed_at + left / 3 * 2
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(
        td: Option<&str>,
        cert: Option<&Path>,
        key: Option<&Path>,
        ttl: Option<Duration>,
        token: Option<&str>,
    ) -> Result<IdentitySettings, String> {
        IdentitySettings::from_settings(td, cert, key, ttl, token)
    }

    #[test]
    fn defaults_issue_nothing_until_a_token_is_set() {
        let s = settings(None, None, None, None, None).unwrap();
        assert_eq!(s.trust_domain.as_str(), "meshwork.local");
        assert_eq!(s.cert_ttl, Duration::from_secs(86400));
        assert!(s.token.is_none() && s.operator_ca.is_none());
        let s = settings(None, None, None, None, Some("0123456789abcdef")).unwrap();
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let minute = Duration::from_secs(60);
        for (result, name) in [
            (
                settings(Some("Mesh"), None, None, None, None),
                "trust_domain:",
            ),
            (
                settings(None, Some(&cert), None, None, None),
                "ca_key_file:",
            ),
            (
                settings(None, None, Some(&key), None, None),
                "ca_cert_file:",
            ),
            (
                settings(None, Some(&cert), Some(&key), None, None),
                "ca_cert_file:",
            ),
            (
                settings(None, Some(&dir.path().join("none")), Some(&key), None, None),
                "ca_cert_file:",
            ),
            (
                settings(None, None, None, Some(minute / 2), None),
                "cert_ttl:",
            ),
            (
                settings(None, None, None, Some(minute * 60 * 24 * 31), None),
                "cert_ttl:",
            ),
            (
                settings(None, None, None, None, Some("short")),
                "identity_token:",
            ),
        ] {
            let e = result.unwrap_err();
            assert!(e.starts_with(name), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime_left() {
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renew_at(t, t + Duration::from_secs(90)),
            t + Duration::from_secs(60)
        );
        assert_eq!(renew_at(t, t - Duration::from_secs(1)), t);
    }
}
