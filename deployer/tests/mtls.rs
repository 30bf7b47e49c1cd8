//! The deployer with `tls_dir`: only mesh-control's identity may change
//! the node, the node's own identity may read, any other mesh identity is
//! refused by name, plaintext or another CA's certificate gets no answer
//! at all, and a renewed node certificate is presented from the next
//! connection on.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use mesh_deployer::{Args, Deployer};
use mesh_proto::v1::{
    DeployRequest, ListArtifactsRequest, UploadOffsetRequest, deployer_client::DeployerClient,
};
use mesh_runtime::{
    metrics::Registry,
    pki::{self, Ca, CertResolver, Credentials, LocalKey, SpiffeId, TrustBundle, TrustDomain},
};
use tonic::{
    Code,
    codegen::{BoxFuture, Service, http::Uri},
    transport::{Channel, Endpoint},
};

const TTL: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("meshwork.test").expect("a valid trust domain")
}

/// A key and the certificate `ca` issues it for `id`, as PEM.
fn issue(ca: &Ca, id: &SpiffeId) -> Result<(LocalKey, String)> {
    let key = LocalKey::generate()?;
    let cert = ca.sign(&key.csr_pem(id)?, id, TTL)?;
    Ok((key, cert))
}

/// A deployer on port 0 with node n1's credentials from `ca`.
async fn start(ca: &Ca) -> Result<(Deployer, tempfile::TempDir)> {
    mesh_runtime::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls)?;
    let (key, cert) = issue(ca, &SpiffeId::node(&td(), "n1")?)?;
    std::fs::write(tls.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(tls.join("node.key"), key.to_pem())?;
    std::fs::write(tls.join("node.crt"), cert)?;
    let config = Args {
        node: Some("n1".into()),
        grpc_listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(dir.path().join("data")),
        tls_dir: Some(tls),
        trust_domain: Some("meshwork.test".into()),
        ..Args::default()
    }
    .validate()
    .map_err(anyhow::Error::msg)?;
    Ok((Deployer::start(&config, Registry::new()).await?, dir))
}

/// Dials over TLS as `client` (issued by `issuer`), accepting only node
/// n1's identity from `trust`.
#[derive(Clone)]
struct Dial {
    config: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
}

impl Service<Uri> for Dial {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (config, addr) = (self.config.clone(), self.addr);
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("deployer").expect("a valid name");
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

async fn client_as(
    deployer: &Deployer,
    issuer: &Ca,
    trust: &Ca,
    client: &SpiffeId,
) -> Result<DeployerClient<Channel>> {
    let (key, cert) = issue(issuer, client)?;
    let resolver = Arc::new(CertResolver::new(Credentials::new(&key, &cert, client)?));
    let bundle = TrustBundle::from_pem(td(), trust.cert_pem())?;
    let mut config = pki::client_config(&bundle, resolver, SpiffeId::node(&td(), "n1")?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let dial = Dial {
        config: Arc::new(config),
        addr: deployer.grpc_addr(),
    };
    let channel = Endpoint::from_static("http://deployer")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(dial)
        .await
        .context("connecting over TLS")?;
    Ok(DeployerClient::new(channel))
}

/// The serial of the certificate the deployer presents to a new
/// connection from mesh-control.
async fn presented_serial(deployer: &Deployer, ca: &Ca) -> Result<String> {
    let control = SpiffeId::service(&td(), "mesh-control")?;
    let (key, cert) = issue(ca, &control)?;
    let resolver = Arc::new(CertResolver::new(Credentials::new(&key, &cert, &control)?));
    let bundle = TrustBundle::from_pem(td(), ca.cert_pem())?;
    let config = pki::client_config(&bundle, resolver, SpiffeId::node(&td(), "n1")?)?;
    let tcp = tokio::net::TcpStream::connect(deployer.grpc_addr()).await?;
    let name = rustls::pki_types::ServerName::try_from("deployer")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let chain = tls.get_ref().1.peer_certificates().context("a chain")?;
    let details = pki::CertDetails::from_der(&chain[0]).map_err(anyhow::Error::msg)?;
    Ok(details.serial)
}

fn offset() -> UploadOffsetRequest {
    UploadOffsetRequest {
        service: "orders".into(),
        version: "1.0.0".into(),
        sha256: "0".repeat(64),
    }
}

fn deploy() -> DeployRequest {
    DeployRequest {
        service: "orders".into(),
        version: "1.0.0".into(),
        ..DeployRequest::default()
    }
}

#[tokio::test]
async fn only_mesh_control_may_change_the_node() -> Result<()> {
    let ca = Ca::self_signed(td(), TTL)?;
    let (deployer, _dir) = start(&ca).await?;

    let control = SpiffeId::service(&td(), "mesh-control")?;
    let mut client = client_as(&deployer, &ca, &ca, &control).await?;
    let answer = client.upload_offset(offset()).await;
    assert!(
        !matches!(&answer, Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated)),
        "{answer:?}"
    );
    client
        .list_artifacts(ListArtifactsRequest::default())
        .await?;

    for (who, may_read) in [
        (SpiffeId::service(&td(), "web")?, false),
        (SpiffeId::node(&td(), "n1")?, true),
        (SpiffeId::node(&td(), "n2")?, false),
    ] {
        let mut client = client_as(&deployer, &ca, &ca, &who).await?;
        let refused = client.deploy(deploy()).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
        let message = refused.message();
        assert!(
            message.contains("Deploy") && message.contains(&who.to_string()),
            "{message}"
        );
        assert!(message.contains("svc/mesh-control"), "{message}");
        let refused = client.upload_offset(offset()).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{who}");
        assert!(refused.message().contains("UploadOffset"), "{refused:?}");
        let read = client.list_artifacts(ListArtifactsRequest::default()).await;
        match read {
            Ok(_) => assert!(may_read, "{who} read the artifacts"),
            Err(s) => {
                assert!(!may_read, "{who}: {s:?}");
                assert_eq!(s.code(), Code::PermissionDenied);
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn plaintext_and_another_ca_get_no_answer() -> Result<()> {
    let ca = Ca::self_signed(td(), TTL)?;
    let (deployer, _dir) = start(&ca).await?;

    let plain = async {
        let mut client =
            DeployerClient::connect(format!("http://{}", deployer.grpc_addr())).await?;
        client.deploy(deploy()).await?;
        anyhow::Ok(())
    };
    let plain = tokio::time::timeout(Duration::from_secs(15), plain).await?;
    assert!(plain.is_err(), "a plaintext client was answered");

    // mesh-control's name, from a CA the deployer does not trust.
    let other = Ca::self_signed(td(), TTL)?;
    let control = SpiffeId::service(&td(), "mesh-control")?;
    let forged = async {
        let mut client = client_as(&deployer, &other, &ca, &control).await?;
        client.deploy(deploy()).await?;
        anyhow::Ok(())
    };
    let forged = tokio::time::timeout(Duration::from_secs(15), forged).await?;
    let e = forged.unwrap_err();
    assert!(
        !format!("{e:?}").contains("PermissionDenied"),
        "the handshake must fail, not the call: {e:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_renewed_node_certificate_is_presented_to_new_connections() -> Result<()> {
    let ca = Ca::self_signed(td(), TTL)?;
    let (deployer, dir) = start(&ca).await?;
    let before = presented_serial(&deployer, &ca).await?;

    // As the bridge renews: a new key, then its certificate.
    let tls = dir.path().join("tls");
    let (key, cert) = issue(&ca, &SpiffeId::node(&td(), "n1")?)?;
    std::fs::write(tls.join("node.key"), key.to_pem())?;
    std::fs::write(tls.join("node.crt"), &cert)?;
    let renewed = pki::CertDetails::from_der(&rustls::pki_types::pem::PemObject::from_pem_slice(
        cert.as_bytes(),
    )?)
    .map_err(anyhow::Error::msg)?
    .serial;
    assert_ne!(before, renewed);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = presented_serial(&deployer, &ca).await?;
        if now == renewed {
            break;
        }
        assert_eq!(now, before, "neither the old nor the new certificate");
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not presented within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn unusable_credentials_stop_the_start_naming_the_file() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls)?;
    let args = || Args {
        node: Some("n1".into()),
        grpc_listen: Some("127.0.0.1:0".parse().expect("an address")),
        admin_listen: Some("127.0.0.1:0".parse().expect("an address")),
        data_dir: Some(dir.path().join("data")),
        tls_dir: Some(tls.clone()),
        trust_domain: Some("meshwork.test".into()),
        ..Args::default()
    };
    let start = |args: Args| async move {
        let config = args.validate().map_err(anyhow::Error::msg)?;
        Deployer::start(&config, Registry::new())
            .await
            .map(drop)
            .map_err(anyhow::Error::from)
    };

    let e = start(args()).await.unwrap_err().to_string();
    assert!(e.starts_with("tls_dir: ") && e.contains("ca.crt"), "{e}");

    // Another node's certificate is not this node's identity.
    let ca = Ca::self_signed(td(), TTL)?;
    let (key, cert) = issue(&ca, &SpiffeId::node(&td(), "n2")?)?;
    std::fs::write(tls.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(tls.join("node.key"), key.to_pem())?;
    std::fs::write(tls.join("node.crt"), cert)?;
    let e = start(args()).await.unwrap_err().to_string();
    assert!(e.contains("node.crt") && e.contains("node/n2"), "{e}");
    Ok(())
}
