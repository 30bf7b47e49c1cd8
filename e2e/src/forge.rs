//! Certificates and TLS clients a test makes to play someone who reached a
//! node's address: client certificates signed by the mesh's real CA (its
//! key read from Consul KV with the harness's access) or by another,
//! with any URI SANs and validity, a node's own certificate, and rustls
//! client configs that present one of them and check no server.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, ensure};
use mesh_runtime::pki::StoredCa;
use rcgen::{CertificateParams, DistinguishedName, Issuer, KeyPair, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use crate::{Mesh, Node};

/// A client certificate and its key (PEM).
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// The certificate (chain), PEM.
    pub cert_pem: String,
    /// Its key, PEM.
    pub key_pem: String,
}

/// When a made certificate is valid.
#[derive(Clone, Copy, Debug)]
pub enum Validity {
    /// From an hour ago for two hours.
    Now,
    /// Until an hour ago.
    Expired,
}

// === impl ClientCert ===

impl ClientCert {
    /// `node`'s own node certificate and key, from its tls folder.
    pub fn of_node(node: &Node) -> Result<Self> {
        let read = |file: &str| {
            let path = node.tls_dir().join(file);
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
        };
        Ok(Self {
            cert_pem: read("node.crt")?,
            key_pem: read("node.key")?,
        })
    }
}

/// The mesh's real CA, key included, read from Consul KV `mesh/ca/root`
/// with the harness's access: what someone who needs validly signed bad
/// certificates would hold.
pub async fn mesh_ca(mesh: &Mesh) -> Result<Issuer<'static, KeyPair>> {
    let resp = mesh.consul_get("/v1/kv/mesh/ca/root?raw").await?;
    ensure!(resp.status == 200, "mesh/ca/root: {}", resp.status);
    let stored: StoredCa = serde_json::from_slice(&resp.body).context("mesh/ca/root")?;
    let key = KeyPair::from_pem(&stored.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&stored.cert_pem, key)?)
}

/// A client certificate for `uris` (its URI SANs), signed by `ca`.
pub fn signed(
    ca: &Issuer<'static, KeyPair>,
    uris: &[&str],
    validity: Validity,
) -> Result<ClientCert> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| Ok(SanType::URI((*u).try_into()?)))
        .collect::<Result<_>>()?;
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    (params.not_before, params.not_after) = match validity {
        Validity::Now => (now - hour, now + hour),
        Validity::Expired => (now - hour * 3, now - hour),
    };
    let cert = params.signed_by(&key, ca)?;
    Ok(ClientCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A gRPC channel to `addr` over TLS presenting `cert` (none: no client
/// certificate) and checking no server, its connections opened in
/// `from`'s namespace.
pub async fn tls_channel(
    from: &Node,
    addr: SocketAddr,
    cert: Option<&ClientCert>,
) -> Result<tonic::transport::Channel> {
    let config = client_config(cert, b"h2")?;
    let ns = from.ns.clone();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (ns, config) = (ns.clone(), config.clone());
        async move {
            let tcp = ns
                .connect(addr, Duration::from_secs(5))
                .await
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::from(addr.ip()), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(Duration::from_secs(20))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("gRPC over TLS to {addr} from {}", from.name))
}

/// A TLS client configuration presenting `cert` (none: no client
/// certificate) and offering `alpn`. The server's certificate is not
/// checked: the client plays someone who does not care whom it talks to.
pub fn client_config(cert: Option<&ClientCert>, alpn: &[u8]) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any server certificate; signatures are still checked with
/// ring's algorithms.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}
