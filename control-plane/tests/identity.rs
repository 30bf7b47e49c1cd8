//! mesh-control's CA against a real Consul dev agent: who may have which
//! identity (its own node's, and a service's only with an instance on the
//! node in the catalog), tokens and CSRs refused by name, one CA for every
//! replica even when they race to create it, and an operator's CA used as
//! given.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use consul_client::{
    AgentServiceRegistration, Client, ClientConfig, QueryOptions, testing::DevAgent,
};
use mesh_control_plane::{
    app::ControlPlane,
    config::Args,
    identity::ca_store::{self, BUNDLE_KEY, Origin, ROOT_KEY},
};
use mesh_proto::v1::{self as pb, identity_client::IdentityClient};
use mesh_runtime::{
    metrics::Registry,
    pki::{Ca, CertDetails, LocalKey, SpiffeId, TrustBundle, TrustDomain},
};
use rustls_pki_types::{CertificateDer, UnixTime, pem::PemObject};
use tonic::{Code, transport::Channel};

const TOKEN: &str = "identity-token-0123456789";
const TRUST_DOMAIN: &str = "test.mesh";

/// A replica on free ports with a client of its Identity service.
struct Replica {
    plane: Option<ControlPlane>,
    client: IdentityClient<Channel>,
    registry: Registry,
}

impl Replica {
    async fn start(agent: &DevAgent, name: &str, extra: &[&str]) -> Result<Self> {
        let mut flags = vec!["--trust-domain", TRUST_DOMAIN];
        flags.extend_from_slice(extra);
        let registry = Registry::new();
        let plane = support::replica(agent, name, &flags, registry.clone()).await?;
        let client = IdentityClient::connect(format!("http://{}", plane.grpc_addr())).await?;
        Ok(Self {
            plane: Some(plane),
            client,
            registry,
        })
    }

    /// Asks for `identity` as `node` with a fresh key's CSR, presenting
    /// `token` (none: no authorization header).
    async fn sign(
        &self,
        token: Option<&str>,
        node: &str,
        identity: &str,
    ) -> Result<pb::SignResponse, tonic::Status> {
        let key = LocalKey::generate().expect("a key is generated");
        let csr_pem = match SpiffeId::parse(identity) {
            Ok(id) => key.csr_pem(&id).expect("a CSR is signed"),
            Err(_) => String::new(),
        };
        self.sign_csr(token, node, identity, csr_pem).await
    }

    async fn sign_csr(
        &self,
        token: Option<&str>,
        node: &str,
        identity: &str,
        csr_pem: String,
    ) -> Result<pb::SignResponse, tonic::Status> {
        let mut request = tonic::Request::new(pb::SignRequest {
            node: node.into(),
            identity: identity.into(),
            csr_pem,
        });
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("ASCII");
            request.metadata_mut().insert("authorization", value);
        }
        self.client
            .clone()
            .sign(request)
            .await
            .map(|r| r.into_inner())
    }

    async fn stop(&mut self) {
        if let Some(plane) = self.plane.take() {
            plane.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn consul(agent: &DevAgent) -> Client {
    Client::new(&ClientConfig::new([agent.addr()])).expect("a valid test address")
}

/// The dev agent's own node name (the only node in its catalog).
async fn agent_node(consul: &Client) -> Result<String> {
    let nodes = consul.catalog_nodes(QueryOptions::default()).await?.value;
    nodes
        .first()
        .map(|n| n.node.clone())
        .context("the dev agent's node is in the catalog")
}

/// The node identity of `node` (identities are lowercase).
fn node_identity(node: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/node/{}", node.to_ascii_lowercase())
}

fn details(cert_pem: &str) -> CertDetails {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("a PEM certificate");
    CertDetails::from_der(&der).expect("a mesh certificate")
}

/// The certificate verifies against `bundle_pem` and names `identity`.
fn assert_issued(response: &pb::SignResponse, bundle_pem: &str, identity: &str) {
    let td = TrustDomain::new(TRUST_DOMAIN).expect("a valid trust domain");
    let bundle = TrustBundle::from_pem(td, bundle_pem).expect("a bundle");
    let der = CertificateDer::from_pem_slice(response.cert_pem.as_bytes()).expect("PEM");
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970"),
    );
    let verified = bundle
        .verify_server(&[der], now)
        .expect("the certificate chains to the bundle");
    assert_eq!(verified.to_string(), identity);
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn metric(registry: &Registry, line: &str) -> bool {
    registry.render().lines().any(|l| l == line)
}

#[tokio::test]
async fn a_node_gets_its_own_identity_and_those_of_services_on_it() -> Result<()> {
    let agent = DevAgent::start().await;
    let consul = consul(&agent);
    let node = agent_node(&consul).await?;
    consul
        .agent_service_register(&AgentServiceRegistration {
            id: Some("orders-1".into()),
            name: "orders".into(),
            port: Some(9000),
            ..Default::default()
        })
        .await?;
    let mut replica = Replica::start(
        &agent,
        "c1",
        &["--identity-token", TOKEN, "--cert-ttl", "1h"],
    )
    .await?;

    let node_id = node_identity(&node);
    let before = SystemTime::now();
    let issued = replica.sign(Some(TOKEN), &node, &node_id).await?;
    assert_issued(&issued, &issued.trust_bundle_pem, &node_id);
    let d = details(&issued.cert_pem);
    assert_eq!(issued.not_after_ms, millis(d.not_after));
    // Renewal at two thirds of the hour: 40 minutes from issue.
    let renew_in = Duration::from_millis(issued.renew_at_ms - millis(before));
    assert!(
        renew_in > Duration::from_secs(2390) && renew_in <= Duration::from_secs(2401),
        "renew_at in {renew_in:?}"
    );
    let lifetime = d.not_after.duration_since(before)?;
    assert!(
        lifetime > Duration::from_secs(3590) && lifetime <= Duration::from_secs(3601),
        "cert_ttl 1h, got {lifetime:?}"
    );
    // The bundle every replica hands out is the one in Consul KV.
    let bundle = consul
        .kv_get(BUNDLE_KEY, QueryOptions::default())
        .await?
        .value;
    assert_eq!(
        bundle.map(|p| p.value),
        Some(issued.trust_bundle_pem.clone().into_bytes())
    );

    let orders = format!("spiffe://{TRUST_DOMAIN}/svc/orders");
    let issued = replica.sign(Some(TOKEN), &node, &orders).await?;
    assert_issued(&issued, &issued.trust_bundle_pem, &orders);

    // Another node's identity, a service not on this node, a service on
    // this node asked for by another, mesh-control's own (whose instance
    // the replica registered on this node): refused, naming identity and
    // node.
    let other_node = format!("spiffe://{TRUST_DOMAIN}/node/elsewhere");
    let payments = format!("spiffe://{TRUST_DOMAIN}/svc/payments");
    let control = format!("spiffe://{TRUST_DOMAIN}/svc/mesh-control");
    for (asker, identity) in [
        (node.as_str(), other_node.as_str()),
        (node.as_str(), payments.as_str()),
        ("elsewhere", orders.as_str()),
        (node.as_str(), control.as_str()),
    ] {
        let e = replica
            .sign(Some(TOKEN), asker, identity)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{identity}: {e:?}");
        assert!(
            e.message().contains(identity) && e.message().contains(asker),
            "{}",
            e.message()
        );
    }
    let foreign = "spiffe://other.mesh/svc/orders";
    let e = replica.sign(Some(TOKEN), &node, foreign).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // No token, a wrong token.
    for token in [None, Some("wrong-token-0123456789")] {
        let e = replica.sign(token, &node, &node_id).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
    }

    // A CSR for another identity than the one asked for, and garbage.
    let key = LocalKey::generate()?;
    let csr = key.csr_pem(&SpiffeId::parse(&orders)?)?;
    let e = replica
        .sign_csr(Some(TOKEN), &node, &node_id, csr)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("csr_pem:") && e.message().contains(&orders),
        "{}",
        e.message()
    );
    let e = replica
        .sign_csr(Some(TOKEN), &node, &node_id, "not a CSR".into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = replica
        .sign(Some(TOKEN), &node, "spiffe://Test.Mesh/x")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("identity:"), "{}", e.message());

    let r = &replica.registry;
    for line in [
        r#"mesh_control_certificates_issued_total{kind="node"} 1"#,
        r#"mesh_control_certificates_issued_total{kind="service"} 1"#,
        r#"mesh_control_certificates_refused_total{reason="denied"} 5"#,
        r#"mesh_control_certificates_refused_total{reason="unauthenticated"} 2"#,
        r#"mesh_control_certificates_refused_total{reason="invalid"} 3"#,
    ] {
        assert!(metric(r, line), "{line} missing:\n{}", r.render());
    }
    replica.stop().await;
    Ok(())
}

#[tokio::test]
async fn without_an_identity_token_nothing_is_issued() -> Result<()> {
    let agent = DevAgent::start().await;
    let node = agent_node(&consul(&agent)).await?;
    let mut replica = Replica::start(&agent, "c1", &[]).await?;
    let id = node_identity(&node);
    let e = replica.sign(Some(TOKEN), &node, &id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("identity_token"), "{}", e.message());
    // Nor is a CA made.
    let root = consul(&agent)
        .kv_get(ROOT_KEY, QueryOptions::default())
        .await?
        .value;
    assert!(root.is_none(), "a CA was stored without issuance on");
    replica.stop().await;
    Ok(())
}

#[tokio::test]
async fn replicas_racing_to_create_the_ca_end_with_one() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    for round in 0..3 {
        let (a, b) = (consul(&agent), consul(&agent));
        let (first, second) = tokio::join!(
            ca_store::load_or_create(&a, &td),
            ca_store::load_or_create(&b, &td),
        );
        let ((first, o1), (second, o2)) = (first?, second?);
        assert_eq!(
            first.cert_pem(),
            second.cert_pem(),
            "round {round}: two CAs"
        );
        let mut origins = [o1, o2];
        origins.sort_by_key(|o| *o != Origin::Created);
        assert_eq!(origins[0], Origin::Created, "round {round}: {origins:?}");
        assert_ne!(origins[1], Origin::Created, "round {round}: {origins:?}");
        let stored = a.kv_get(ROOT_KEY, QueryOptions::default()).await?.value;
        let stored: mesh_runtime::pki::StoredCa =
            serde_json::from_slice(&stored.context("the root is stored")?.value)?;
        assert_eq!(stored.cert_pem, first.cert_pem());
        // Once there, it is found, not replaced.
        let (again, origin) = ca_store::load_or_create(&a, &td).await?;
        assert_eq!(
            (again.cert_pem(), origin),
            (first.cert_pem(), Origin::Found)
        );
        a.kv_delete(ROOT_KEY, None).await?;
    }

    // Two replicas started together issue under the same CA.
    let node = agent_node(&consul(&agent)).await?;
    let flags = ["--identity-token", TOKEN];
    let (r1, r2) = tokio::join!(
        Replica::start(&agent, "c1", &flags),
        Replica::start(&agent, "c2", &flags)
    );
    let (mut r1, mut r2) = (r1?, r2?);
    let id = node_identity(&node);
    let (i1, i2) = tokio::join!(
        r1.sign(Some(TOKEN), &node, &id),
        r2.sign(Some(TOKEN), &node, &id)
    );
    let (i1, i2) = (i1?, i2?);
    assert_eq!(i1.trust_bundle_pem, i2.trust_bundle_pem);
    assert_issued(&i2, &i1.trust_bundle_pem, &id);
    r1.stop().await;
    r2.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_operator_ca_from_files_is_used_as_given() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let node = agent_node(&consul(&agent)).await?;
    let ca = Ca::self_signed(TrustDomain::new(TRUST_DOMAIN)?, Duration::from_secs(86400))?;
    let stored = ca.to_stored();
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    std::fs::write(&cert, &stored.cert_pem)?;
    std::fs::write(&key, &stored.key_pem)?;
    let flags = [
        "--identity-token",
        TOKEN,
        "--ca-cert-file",
        cert.to_str().context("UTF-8 path")?,
        "--ca-key-file",
        key.to_str().context("UTF-8 path")?,
    ];
    let mut replica = Replica::start(&agent, "c1", &flags).await?;
    let id = node_identity(&node);
    let issued = replica.sign(Some(TOKEN), &node, &id).await?;
    assert_eq!(issued.trust_bundle_pem, stored.cert_pem);
    assert_issued(&issued, &stored.cert_pem, &id);
    let c = consul(&agent);
    let bundle = c.kv_get(BUNDLE_KEY, QueryOptions::default()).await?.value;
    assert_eq!(bundle.map(|p| p.value), Some(stored.cert_pem.into_bytes()));
    assert!(
        c.kv_get(ROOT_KEY, QueryOptions::default())
            .await?
            .value
            .is_none(),
        "no CA of mesh-control's own is made"
    );
    replica.stop().await;

    // Only one of the two files: refused by name.
    let e = <Args as clap::Parser>::try_parse_from([
        "mesh-control",
        "--ca-cert-file",
        cert.to_str().context("UTF-8 path")?,
    ])?
    .validate()
    .unwrap_err();
    assert!(e.starts_with("ca_key_file:"), "{e}");
    Ok(())
}
