//! The node's mesh certificates: the bridge keeps a certificate for its
//! node agent (`spiffe://<trust-domain>/node/<node>`) and one for every
//! service with an instance registered on its node
//! (`spiffe://<trust-domain>/svc/<name>`), in a folder the proxy reads
//! (layout in [`files`]).
//!
//! Each key is generated here ([`LocalKey`]) and written only to that
//! folder; mesh-control (`mesh.v1.Identity.Sign`, with the bearer
//! `identity_token`) sees only the CSR. Each certificate is renewed, with a
//! fresh key, at two thirds of the lifetime it had left when it arrived
//! (its validity starts a little in the past, for clock skew, which would
//! make a short-lived certificate due at once), retried with a jittered
//! backoff on failure, logged once per kind of failure. When a service's
//! last instance leaves the node, its key and certificate are deleted.
//!
//! The services are read with a blocking query on the node's catalog entry
//! (`/v1/catalog/node/<node>`); until its first answer, no service file is
//! touched. Certificates still valid on disk at start are used, not
//! reissued.
//!
//! - [`files`]: the folder layout and its atomic, owner-only writes.
//! - [`control`]: reaching mesh-control (configured, or found in the catalog).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use consul_client::{Client, QueryOptions};
use mesh_runtime::{
    backoff::Backoff,
    metrics::{Counter, Gauge, Registry},
    pki::{
        Credentials, LocalKey, SpiffeId, TrustDomain, Workload,
        spiffe::{check_node_name, check_service_name},
    },
    shutdown::Shutdown,
};
use tokio::sync::watch;

pub mod control;
pub mod files;

use control::{ControlClient, ControlTls, SignFailure};
use files::TlsDir;

/// The trust domain when none is set (as mesh-control's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "meshwork.local";
/// The shortest `identity_token` accepted (as mesh-control's rule).
pub const MIN_TOKEN_LEN: usize = 16;

/// Certificates held (node and services).
pub const CERTIFICATES: &str = "mesh_bridge_certificates";
/// Seconds until the earliest expiry of a held certificate.
pub const EXPIRY_SECONDS: &str = "mesh_bridge_certificate_expiry_seconds";
/// Sign requests by result.
pub const RENEWALS: &str = "mesh_bridge_certificate_renewals_total";

/// Shortest and longest pause before asking again after a failure.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// The longest the loop sleeps without refreshing its metrics.
const TICK: Duration = Duration::from_secs(15);

/// How the node's certificates are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The folder the proxy reads.
    pub tls_dir: PathBuf,
    /// mesh-control's gRPC URL; `None`: found in Consul's catalog.
    pub control_addr: Option<String>,
    /// The bearer token for mesh-control's Identity service.
    pub token: Token,
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
}

/// A bearer token; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// Keeps the node's certificates until shutdown.
#[derive(Debug)]
pub struct Keeper {
    node: String,
    node_id: SpiffeId,
    trust_domain: TrustDomain,
    consul: Client,
    wait: Duration,
    dir: TlsDir,
    control: ControlClient,
    metrics: IdentityMetrics,
    held: BTreeMap<SpiffeId, Held>,
}

/// One identity the keeper looks after.
#[derive(Debug)]
struct Held {
    /// When the certificate on disk expires; `None` before the first one.
    not_after: Option<SystemTime>,
    /// When to ask for the next one.
    due: SystemTime,
    backoff: Backoff,
    /// The kind of the last failure, logged once until it changes.
    failing: Option<&'static str>,
}

/// The keeper's metrics.
#[derive(Clone)]
struct IdentityMetrics {
    held: Gauge,
    expiry: Gauge,
    ok: Counter,
    failed: Counter,
}

// === impl IdentityConfig ===

impl IdentityConfig {
    /// Checks the settings as given; `None` when `tls_dir` is not set. An
    /// error names the key.
    pub fn from_settings(
        node: &str,
        tls_dir: Option<PathBuf>,
        control_addr: Option<&str>,
        token: Option<&str>,
        trust_domain: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let Some(tls_dir) = tls_dir else {
            return Ok(None);
        };
        let token = match token.map(str::trim) {
            None | Some("") => return Err("identity_token: must be set with tls_dir".into()),
            Some(t) if t.len() < MIN_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(format!(
                    "identity_token: must be at least {MIN_TOKEN_LEN} printable characters \
                     without spaces"
                ));
            }
            Some(t) => Token(t.to_owned()),
        };
        let trust_domain = TrustDomain::new(trust_domain.unwrap_or(DEFAULT_TRUST_DOMAIN).trim())
            .map_err(|e| format!("trust_domain: {e}"))?;
        check_node_name(node).map_err(|e| format!("node: {e} (it names the node's identity)"))?;
        let control_addr = match control_addr.map(str::trim) {
            None | Some("") => None,
            Some(a) => {
                let url = if a.contains("://") {
                    a.to_owned()
                } else {
                    format!("http://{a}")
                };
                if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
                    return Err(format!(
                        "control_addr: {a:?} is not host:port or an http:// URL"
                    ));
                }
                Some(url)
            }
        };
        Ok(Some(Self {
            tls_dir,
            control_addr,
            token,
            trust_domain,
        }))
    }
}

// === impl Token ===

impl Token {
    /// The token itself, for the authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// === impl Keeper ===

impl Keeper {
    /// A keeper for `node`'s certificates, reading the catalog through
    /// `consul` with blocking queries of `wait`; creates the folder.
    pub fn new(
        config: &IdentityConfig,
        node: &str,
        consul: Client,
        wait: Duration,
        registry: &Registry,
    ) -> io::Result<Self> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let node_id =
            SpiffeId::node(&config.trust_domain, node).map_err(|e| invalid(e.to_string()))?;
        let dir = TlsDir::open(config.tls_dir.clone())?;
        let control = ControlClient::new(
            consul.clone(),
            config.control_addr.clone(),
            &config.token,
            ControlTls {
                dir: dir.clone(),
                node: node_id.clone(),
            },
        )
        .map_err(invalid)?;
        Ok(Self {
            node: node.to_owned(),
            node_id,
            trust_domain: config.trust_domain.clone(),
            consul,
            wait,
            dir,
            control,
            metrics: IdentityMetrics::new(registry),
            held: BTreeMap::new(),
        })
    }

    /// Keeps the certificates until `shutdown`.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let (tx, mut services) = watch::channel(None);
        let watcher = watch_node_services(
            self.consul.clone(),
            self.node.clone(),
            self.wait,
            tx,
            shutdown.clone(),
        );
        let keeper = async move {
            loop {
                let current = services.borrow_and_update().clone();
                self.reconcile(current.as_ref()).await;
                let sleep = self.next_due();
                tokio::select! {
                    _ = shutdown.requested() => break,
                    changed = services.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(sleep) => {}
                }
            }
        };
        tokio::join!(watcher, keeper);
    }

    /// Brings the folder in line with `services` (`None`: not known yet,
    /// so service files are left alone) and asks for every certificate due.
    async fn reconcile(&mut self, services: Option<&BTreeSet<String>>) {
        let mut wanted = vec![self.node_id.clone()];
        if let Some(services) = services {
            self.drop_gone(services);
            wanted.extend(
                services
                    .iter()
                    .filter_map(|s| SpiffeId::service(&self.trust_domain, s).ok()),
            );
        }
        for id in wanted {
            if !self.held.contains_key(&id)
                && let Some(held) = self.held_on_disk(&id)
            {
                tracing::info!(identity = %id, "certificate on disk is still valid");
                self.held.insert(id.clone(), held);
            }
            let due = self
                .held
                .get(&id)
                .is_none_or(|h| h.due <= SystemTime::now());
            if due {
                self.issue(&id).await;
            }
        }
        self.record();
    }

    /// Deletes the files of services no longer on the node.
    fn drop_gone(&mut self, services: &BTreeSet<String>) {
        self.held.retain(|id, _| match id.workload() {
            Workload::Service(name) => services.contains(name),
            Workload::Node(_) => true,
        });
        let on_disk = match self.dir.services() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the service certificates");
                return;
            }
        };
        for name in on_disk.iter().filter(|n| !services.contains(*n)) {
            match self.dir.remove_service(name) {
                Ok(()) => tracing::info!(
                    service = %name,
                    "service no longer on this node: its key and certificate are deleted"
                ),
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "cannot delete the certificate")
                }
            }
        }
    }

    /// A valid certificate for `id` left on disk (by an earlier run).
    fn held_on_disk(&self, id: &SpiffeId) -> Option<Held> {
        if !self.dir.ca().exists() {
            return None;
        }
        let (key_pem, cert_pem) = self.dir.read_pair(id)?;
        let key = LocalKey::from_pem(&key_pem).ok()?;
        let credentials = Credentials::new(&key, &cert_pem, id).ok()?;
        Some(Held {
            not_after: Some(credentials.details().not_after),
            due: credentials.renew_at(),
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
            failing: None,
        })
    }

    /// Asks for a certificate for `id` with a fresh key; on success writes
    /// the bundle, the key, then the certificate.
    async fn issue(&mut self, id: &SpiffeId) {
        let result = self.sign(id).await;
        let held = self.held.entry(id.clone()).or_insert_with(|| Held {
            not_after: None,
            due: SystemTime::now(),
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
            failing: None,
        });
        match result {
            Ok(not_after) => {
                self.metrics.ok.increment(1);
                let now = SystemTime::now();
                held.not_after = Some(not_after);
                held.due = renew_due(now, not_after);
                held.backoff.reset();
                if held.failing.take().is_some() {
                    tracing::info!(identity = %id, "certificate issued again after failures");
                }
                tracing::debug!(identity = %id, "certificate written");
            }
            Err(failure) => {
                self.metrics.failed.increment(1);
                let delay = held.backoff.next_delay();
                held.due = SystemTime::now() + delay;
                if held.failing.replace(failure.kind) != Some(failure.kind) {
                    tracing::warn!(
                        identity = %id, kind = failure.kind, error = %failure.message,
                        "cannot get a certificate; retrying with backoff"
                    );
                }
            }
        }
    }

    /// One Sign round trip and the files written; the new expiry.
    async fn sign(&mut self, id: &SpiffeId) -> Result<SystemTime, SignFailure> {
        let local = |kind: &'static str, e: &dyn fmt::Display| SignFailure {
            kind,
            message: e.to_string(),
        };
        let key = LocalKey::generate().map_err(|e| local("key", &e))?;
        let csr = key.csr_pem(id).map_err(|e| local("key", &e))?;
        let response = self.control.sign(&self.node, &id.to_string(), csr).await?;
        let credentials = Credentials::new(&key, &response.cert_pem, id)
            .map_err(|e| local("response", &format!("mesh-control's answer: {e}")))?;
        let write = |e: io::Error| local("write", &format!("writing the TLS folder: {e}"));
        self.dir
            .write_ca(&response.trust_bundle_pem)
            .map_err(write)?;
        self.dir
            .write_pair(id, &key.to_pem(), &response.cert_pem)
            .map_err(write)?;
        Ok(credentials.details().not_after)
    }

    /// How long until the next certificate is due (at most [`TICK`]).
    fn next_due(&self) -> Duration {
        let now = SystemTime::now();
        self.held
            .values()
            .map(|h| h.due.duration_since(now).unwrap_or_default())
            .min()
            .unwrap_or(TICK)
            .min(TICK)
    }

    fn record(&self) {
        let now = SystemTime::now();
        let valid: Vec<Duration> = self
            .held
            .values()
            .filter_map(|h| h.not_after?.duration_since(now).ok())
            .collect();
        self.metrics.held.set(valid.len() as f64);
        self.metrics
            .expiry
            .set(valid.iter().min().map_or(0.0, Duration::as_secs_f64));
    }
}

/// Two thirds of the lifetime left at `now`.
fn renew_due(now: SystemTime, not_after: SystemTime) -> SystemTime {
    let left = not_after.duration_since(now).unwrap_or_default();
    now + left / 3 * 2
}

/// Follows the services with an instance on `node` (lowercase, Consul's
/// own `consul` service and names no identity may have left out) with
/// blocking queries, until `shutdown`.
async fn watch_node_services(
    consul: Client,
    node: String,
    wait: Duration,
    tx: watch::Sender<Option<BTreeSet<String>>>,
    mut shutdown: Shutdown,
) {
    let mut index = 0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut failing = false;
    loop {
        let opts = if index == 0 {
            QueryOptions::default()
        } else {
            QueryOptions::blocking(index, wait)
        };
        let read = consul.catalog_node_services(&node, opts);
        let answer = tokio::select! {
            _ = shutdown.requested() => return,
            answer = read => answer,
        };
        match answer {
            Ok(answer) => {
                if failing {
                    tracing::info!(%node, "the node's catalog entry is readable again");
                    failing = false;
                }
                backoff.reset();
                // An index going backwards (or none) starts over.
                index = if answer.index < index {
                    0
                } else {
                    answer.index
                };
                let names: BTreeSet<String> = answer
                    .value
                    .iter()
                    .map(|i| i.service.to_ascii_lowercase())
                    // mesh-control's identity is its own, never a node's.
                    .filter(|s| {
                        s != "consul"
                            && s != control::CONTROL_SERVICE
                            && check_service_name(s).is_ok()
                    })
                    .collect();
                tx.send_if_modified(|known| {
                    let changed = known.as_ref() != Some(&names);
                    *known = Some(names);
                    changed
                });
                if index == 0 {
                    backoff.wait().await;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(%node, error = %e, "cannot read the node's services; retrying");
                    failing = true;
                }
                tokio::select! {
                    _ = shutdown.requested() => return,
                    _ = backoff.wait() => {}
                }
            }
        }
    }
}

// === impl IdentityMetrics ===

impl IdentityMetrics {
    fn new(r: &Registry) -> Self {
        r.describe_gauge(CERTIFICATES, "Valid certificates held (node and services).");
        r.describe_gauge(
            EXPIRY_SECONDS,
            "Seconds until the earliest held certificate expires (0 while none is held).",
        );
        r.describe_counter(
            RENEWALS,
            "Certificate requests to mesh-control by result (ok, failed), first issues included.",
        );
        Self {
            held: r.gauge(CERTIFICATES, &[]),
            expiry: r.gauge(EXPIRY_SECONDS, &[]),
            ok: r.counter(RENEWALS, &[("result", "ok")]),
            failed: r.counter(RENEWALS, &[("result", "failed")]),
        }
    }
}

impl fmt::Debug for IdentityMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_what_is_left() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            renew_due(now, now + Duration::from_secs(6)),
            now + Duration::from_secs(4)
        );
        assert_eq!(renew_due(now, now - Duration::from_secs(1)), now);
    }

    #[test]
    fn settings_name_their_key() {
        let dir = Some(PathBuf::from("/tmp/tls"));
        let token = Some("0123456789abcdef");
        assert_eq!(
            IdentityConfig::from_settings("n1", None, None, None, None).unwrap(),
            None
        );
        let c =
            IdentityConfig::from_settings("n1", dir.clone(), Some("10.0.0.2:8892"), token, None)
                .unwrap()
                .unwrap();
        assert_eq!(c.control_addr.as_deref(), Some("http://10.0.0.2:8892"));
        assert_eq!(c.trust_domain.as_str(), DEFAULT_TRUST_DOMAIN);
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        for (node, addr, token, td, key) in [
            ("n1", None, None, None, "identity_token:"),
            ("n1", None, Some("short"), None, "identity_token:"),
            ("n1", None, token, Some("Bad.Domain"), "trust_domain:"),
            ("n1", Some("https://c:8892"), token, None, "control_addr:"),
            ("bad node", None, token, None, "node:"),
        ] {
            let e = IdentityConfig::from_settings(node, dir.clone(), addr, token, td).unwrap_err();
            assert!(e.starts_with(key), "{e}");
        }
    }
}
