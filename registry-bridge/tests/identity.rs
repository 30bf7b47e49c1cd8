//! The bridge's certificates against a real Consul dev agent and an
//! in-test mesh-control Identity service (a CA from the mesh's PKI
//! library): the node's and each local service's key and certificate
//! appear in the TLS folder, follow services registered and deregistered
//! later, are renewed at two thirds of their life, and no key is ever sent.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use consul_client::{
    AgentServiceRegistration, Client, ClientConfig, QueryOptions, testing::DevAgent,
};
use mesh_proto::v1::{
    self as pb,
    identity_server::{Identity, IdentityServer},
};
use mesh_registry_bridge::{Args, Bridge};
use mesh_runtime::{
    duration::HumanDuration,
    metrics::Registry,
    pki::{Ca, CertDetails, Credentials, LocalKey, SpiffeId, TrustDomain},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

const DEADLINE: Duration = Duration::from_secs(20);
const TOKEN: &str = "identity-token-0123456789";
const TRUST_DOMAIN: &str = "test.mesh";

/// mesh-control's Identity service as far as the bridge can tell: checks
/// the token, signs what is asked for, remembers every request.
#[derive(Clone)]
struct FakeControl {
    ca: Arc<Ca>,
    ttl: Duration,
    requests: Arc<Mutex<Vec<pb::SignRequest>>>,
}

#[tonic::async_trait]
impl Identity for FakeControl {
    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let authorized = request
            .metadata()
            .get("authorization")
            .is_some_and(|v| v == format!("Bearer {TOKEN}").as_str());
        if !authorized {
            return Err(Status::unauthenticated("wrong token"));
        }
        let r = request.into_inner();
        self.requests
            .lock()
            .expect("no test panics holding it")
            .push(r.clone());
        let id =
            SpiffeId::parse(&r.identity).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert_pem = self
            .ca
            .sign(&r.csr_pem, &id, self.ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::SignResponse {
            cert_pem,
            trust_bundle_pem: self.ca.cert_pem().to_owned(),
            not_after_ms: 0,
            renew_at_ms: 0,
        }))
    }
}

impl FakeControl {
    /// Serves on a free port; the URL.
    async fn start(ttl: Duration) -> Result<(Self, String)> {
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let fake = Self {
            ca: Arc::new(Ca::self_signed(td, Duration::from_secs(86400))?),
            ttl,
            requests: Arc::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let service = IdentityServer::new(fake.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Ok((fake, url))
    }

    fn asked_for(&self, identity: &str) -> usize {
        let requests = self.requests.lock().expect("no test panics holding it");
        requests.iter().filter(|r| r.identity == identity).count()
    }
}

struct Harness {
    _agent: DevAgent,
    consul: Client,
    node: String,
    bridge: Option<Bridge>,
    registry: Registry,
    tls: PathBuf,
    dirs: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Result<Self> {
        mesh_runtime::install_crypto_provider();
        let agent = DevAgent::start().await;
        let consul = Client::new(&ClientConfig::new([agent.addr()]))?;
        let node = consul
            .catalog_nodes(QueryOptions::default())
            .await?
            .value
            .first()
            .map(|n| n.node.clone())
            .context("the dev agent's node is in the catalog")?;
        let dirs = tempfile::tempdir()?;
        Ok(Self {
            _agent: agent,
            consul,
            node,
            bridge: None,
            registry: Registry::new(),
            tls: dirs.path().join("tls"),
            dirs,
        })
    }

    /// Starts the bridge with its TLS folder; mesh-control at
    /// `control_addr`, else found in the catalog.
    async fn start_bridge(
        &mut self,
        agent_addr: String,
        control_addr: Option<String>,
    ) -> Result<()> {
        let config = Args {
            node: Some(self.node.clone()),
            consul_addr: vec![agent_addr],
            grpc_listen: Some("127.0.0.1:0".parse()?),
            admin_listen: Some("127.0.0.1:0".parse()?),
            data_dir: Some(self.dirs.path().join("data")),
            wait: Some(HumanDuration(Duration::from_secs(5))),
            tls_dir: Some(self.tls.clone()),
            control_addr,
            identity_token: Some(TOKEN.into()),
            trust_domain: Some(TRUST_DOMAIN.into()),
            ..Args::default()
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        self.bridge = Some(Bridge::start(&config, self.registry.clone()).await?);
        Ok(())
    }

    async fn register(&self, id: &str, name: &str) -> Result<()> {
        self.consul
            .agent_service_register(&AgentServiceRegistration {
                id: Some(id.into()),
                name: name.into(),
                port: Some(9000),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    fn node_identity(&self) -> SpiffeId {
        let td = TrustDomain::new(TRUST_DOMAIN).expect("valid");
        SpiffeId::node(&td, &self.node).expect("a valid node name")
    }

    async fn stop(&mut self) {
        if let Some(bridge) = self.bridge.take() {
            bridge.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn service(name: &str) -> SpiffeId {
    let td = TrustDomain::new(TRUST_DOMAIN).expect("valid");
    SpiffeId::service(&td, name).expect("a valid service name")
}

/// The key and certificate at `key`/`cert` make a pair for `identity`:
/// what the proxy will load. Returns the certificate's details.
fn pair(key: &Path, cert: &Path, identity: &SpiffeId) -> Result<CertDetails> {
    let key = LocalKey::from_pem(&std::fs::read_to_string(key)?)?;
    let credentials = Credentials::new(&key, &std::fs::read_to_string(cert)?, identity)?;
    Ok(credentials.details().clone())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777)
}

/// Polls `check` until it succeeds or `DEADLINE` passes.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > DEADLINE => {
                return Err(e.context(format!("{what}: not true after {DEADLINE:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The value of the metric line starting with `name` (labels included).
fn gauge(registry: &Registry, name: &str) -> Result<f64> {
    let text = registry.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("{name} missing:\n{text}"))
}

fn metric(registry: &Registry, line: &str) -> Result<()> {
    let text = registry.render();
    ensure!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    Ok(())
}

#[tokio::test]
async fn certificates_follow_the_services_on_the_node() -> Result<()> {
    let (control, url) = FakeControl::start(Duration::from_secs(3600)).await?;
    let mut h = Harness::new().await?;
    // mesh-control as the bridge finds it: a passing instance whose
    // `grpc` meta is its gRPC URL.
    h.consul
        .agent_service_register(&AgentServiceRegistration {
            id: Some("mesh-control-c1".into()),
            name: "mesh-control".into(),
            meta: [("grpc".to_owned(), url)].into(),
            ..Default::default()
        })
        .await?;
    h.register("orders-1", "orders").await?;
    let addr = h._agent.addr();
    h.start_bridge(addr, None).await?;

    let tls = h.tls.clone();
    let node_id = h.node_identity();
    eventually("the node's and orders' certificates", || {
        pair(&tls.join("node.key"), &tls.join("node.crt"), &node_id)?;
        pair(
            &tls.join("svc/orders.key"),
            &tls.join("svc/orders.crt"),
            &service("orders"),
        )?;
        ensure!(std::fs::read_to_string(tls.join("ca.crt"))? == control.ca.cert_pem());
        Ok(())
    })
    .await?;
    for file in [
        "ca.crt",
        "node.key",
        "node.crt",
        "svc/orders.key",
        "svc/orders.crt",
    ] {
        assert_eq!(mode(&tls.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(mode(&tls.join("svc")), 0o700);
    let payments = service("payments");

    h.register("payments-1", "payments").await?;
    eventually("payments' certificate", || {
        pair(
            &tls.join("svc/payments.key"),
            &tls.join("svc/payments.crt"),
            &payments,
        )
        .map(drop)
    })
    .await?;

    h.consul.agent_service_deregister("orders-1").await?;
    eventually("orders' files deleted", || {
        let left = ["svc/orders.key", "svc/orders.crt"].map(|f| tls.join(f).exists());
        ensure!(left == [false, false], "still there: {left:?}");
        Ok(())
    })
    .await?;
    // Still there: the node's and payments'. Never asked for:
    // mesh-control's, although its instance is on this node too (it is
    // mesh-control's own identity, never a node's).
    pair(&tls.join("node.key"), &tls.join("node.crt"), &node_id)?;
    pair(
        &tls.join("svc/payments.key"),
        &tls.join("svc/payments.crt"),
        &payments,
    )?;
    ensure!(
        !tls.join("svc/mesh-control.crt").exists(),
        "the bridge holds mesh-control's identity"
    );
    let registry = h.registry.clone();
    eventually("held certificates counted", || {
        metric(&registry, "mesh_bridge_certificates 2")
    })
    .await?;
    let expiry = gauge(&registry, "mesh_bridge_certificate_expiry_seconds")?;
    ensure!((3000.0..=3600.0).contains(&expiry), "expiry in {expiry} s");

    // Only CSRs went out: no key ever left the node.
    let requests = control.requests.lock().unwrap().clone();
    ensure!(!requests.is_empty());
    for r in &requests {
        ensure!(r.node == h.node, "{r:?}");
        ensure!(r.csr_pem.contains("CERTIFICATE REQUEST") && !r.csr_pem.contains("PRIVATE"));
    }
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn certificates_are_renewed_at_two_thirds_of_their_life() -> Result<()> {
    let (control, url) = FakeControl::start(Duration::from_secs(6)).await?;
    let mut h = Harness::new().await?;
    let addr = h._agent.addr();
    h.start_bridge(addr, Some(url)).await?;
    let (key, cert) = (h.tls.join("node.key"), h.tls.join("node.crt"));
    let node_id = h.node_identity();
    let first = eventually("the node's certificate", || pair(&key, &cert, &node_id)).await?;
    let second = eventually("a renewed certificate", || {
        let now = pair(&key, &cert, &node_id)?;
        ensure!(now.serial != first.serial, "not renewed yet");
        Ok(now)
    })
    .await?;
    // Issued 6 s before its expiry; the first was due 4 s after its issue.
    // X.509 times are whole seconds: a second either way.
    let later = second.not_after.duration_since(first.not_after)?;
    if !(Duration::from_secs(2)..=Duration::from_secs(5)).contains(&later) {
        bail!("renewed {later:?} after the first issue; two thirds of 6 s is 4 s");
    }
    ensure!(control.asked_for(&node_id.to_string()) >= 2);
    let ok = gauge(
        &h.registry,
        r#"mesh_bridge_certificate_renewals_total{result="ok"}"#,
    )?;
    ensure!(ok >= 2.0, "{ok} successful requests counted");
    h.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_restarted_bridge_keeps_valid_certificates_and_drops_stale_ones() -> Result<()> {
    let (control, url) = FakeControl::start(Duration::from_secs(3600)).await?;
    let mut h = Harness::new().await?;
    h.register("orders-1", "orders").await?;
    let addr = h._agent.addr();
    h.start_bridge(addr.clone(), Some(url.clone())).await?;
    let tls = h.tls.clone();
    let node_id = h.node_identity();
    let (node_key, node_cert) = (tls.join("node.key"), tls.join("node.crt"));
    let first = eventually("the first certificates", || {
        pair(
            &tls.join("svc/orders.key"),
            &tls.join("svc/orders.crt"),
            &service("orders"),
        )?;
        pair(&node_key, &node_cert, &node_id)
    })
    .await?;
    h.stop().await;

    // While the bridge is down, orders leaves the node.
    h.consul.agent_service_deregister("orders-1").await?;
    h.registry = Registry::new();
    h.start_bridge(addr, Some(url)).await?;
    eventually("orders' files deleted", || {
        ensure!(!tls.join("svc/orders.crt").exists() && !tls.join("svc/orders.key").exists());
        Ok(())
    })
    .await?;
    let registry = h.registry.clone();
    eventually("the node's certificate held", || {
        metric(&registry, "mesh_bridge_certificates 1")
    })
    .await?;
    // The node's certificate, still valid, was kept: not asked for again.
    let now = pair(&node_key, &node_cert, &node_id)?;
    assert_eq!(now.serial, first.serial);
    assert_eq!(control.asked_for(&node_id.to_string()), 1);
    h.stop().await;
    Ok(())
}
