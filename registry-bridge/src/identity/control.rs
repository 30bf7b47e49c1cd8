//! The way to mesh-control's Identity service: the configured URL, or the
//! `grpc` address a passing `mesh-control` instance publishes in Consul's
//! catalog.
//!
//! An `https://` URL (mesh-control with `grpc_tls`) is dialled over TLS:
//! the server must show `svc/mesh-control` from the mesh CA (the bundle in
//! the TLS folder, or before the first certificate, the one mesh-control
//! publishes in Consul KV at `mesh/ca/bundle`), so the identity token goes
//! to mesh-control only; the bridge shows its node's certificate when it
//! has a valid one, which renews that node's certificates by itself.

use std::{net::IpAddr, sync::Arc, time::Duration};

use consul_client::{Client, QueryOptions, ServiceEntry};
use mesh_proto::v1::{self as pb, identity_client::IdentityClient};
use mesh_runtime::pki::{
    self, CertResolver, Credentials, LocalKey, SpiffeId, TrustBundle, grpc::MeshConnector,
};
use mesh_runtime::telemetry::{TracedChannel, traced};
use tonic::{Code, Status, metadata::AsciiMetadataValue, transport::Endpoint};

use super::{Token, files::TlsDir};

/// Where mesh-control publishes its CA's certificate.
pub const BUNDLE_KEY: &str = "mesh/ca/bundle";

/// The service every mesh-control replica registers.
pub const CONTROL_SERVICE: &str = "mesh-control";

/// How long connecting to mesh-control may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one Sign call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate could not be had; `kind` is logged once per change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct SignFailure {
    /// A short name of the kind of failure (`unreachable`, `denied`, ...).
    pub(crate) kind: &'static str,
    /// What happened.
    pub(crate) message: String,
}

/// Reaches mesh-control, finding it in the catalog when not configured.
#[derive(Debug)]
pub(crate) struct ControlClient {
    consul: Client,
    configured: Option<String>,
    authorization: AsciiMetadataValue,
    tls: ControlTls,
    /// The client in use and its URL; dropped after a transport failure,
    /// and after each call over TLS (the next shows the newest
    /// certificate).
    current: Option<(String, IdentityClient<TracedChannel>)>,
}

/// What a TLS dial to mesh-control needs: the node's folder and identity.
#[derive(Debug)]
pub(crate) struct ControlTls {
    /// The TLS folder (`ca.crt`, `node.key`, `node.crt`).
    pub(crate) dir: TlsDir,
    /// The node's identity.
    pub(crate) node: SpiffeId,
}

// === impl ControlClient ===

impl ControlClient {
    pub(crate) fn new(
        consul: Client,
        configured: Option<String>,
        token: &Token,
        tls: ControlTls,
    ) -> Result<Self, String> {
        let authorization = format!("Bearer {}", token.expose())
            .parse()
            .map_err(|_| "identity_token: not a valid header value".to_owned())?;
        Ok(Self {
            consul,
            configured,
            authorization,
            tls,
            current: None,
        })
    }

    /// Asks mesh-control to sign `csr_pem` for `identity`.
    pub(crate) async fn sign(
        &mut self,
        node: &str,
        identity: &str,
        csr_pem: String,
    ) -> Result<pb::SignResponse, SignFailure> {
        let mut client = self.client(node).await?;
        let mut request = tonic::Request::new(pb::SignRequest {
            node: node.to_owned(),
            identity: identity.to_owned(),
            csr_pem,
        });
        request.set_timeout(CALL_TIMEOUT);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        let result = client.sign(request).await;
        if self
            .current
            .as_ref()
            .is_some_and(|(url, _)| url.starts_with("https://"))
        {
            self.current = None;
        }
        match result {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) {
                    // Find mesh-control again next time: this replica may be gone.
                    self.current = None;
                }
                Err(failure(&status))
            }
        }
    }

    async fn client(&mut self, node: &str) -> Result<IdentityClient<TracedChannel>, SignFailure> {
        if let Some((_, client)) = &self.current {
            return Ok(client.clone());
        }
        let url = match &self.configured {
            Some(url) => url.clone(),
            None => self.discover(node).await?,
        };
        let https = url.strip_prefix("https://");
        let dialled = https.map_or_else(|| url.clone(), |rest| format!("http://{rest}"));
        let endpoint = Endpoint::from_shared(dialled)
            .map_err(|e| SignFailure {
                kind: "control_addr",
                message: format!("mesh-control's address {url:?} is not a URL: {e}"),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = match https {
            Some(_) => endpoint.connect_with_connector_lazy(self.connector().await?),
            None => endpoint.connect_lazy(),
        };
        let client = IdentityClient::new(traced(channel));
        tracing::debug!(%url, "using mesh-control");
        self.current = Some((url, client.clone()));
        Ok(client)
    }

    /// A TLS connector accepting only mesh-control and showing the node's
    /// certificate when there is a valid one.
    async fn connector(&self) -> Result<MeshConnector, SignFailure> {
        let td = self.tls.node.trust_domain();
        let failed = |message: String| SignFailure {
            kind: "tls",
            message,
        };
        let bundle_pem = match std::fs::read_to_string(self.tls.dir.ca()) {
            Ok(pem) => pem,
            Err(_) => {
                let stored = self
                    .consul
                    .kv_get(BUNDLE_KEY, QueryOptions::default())
                    .await
                    .map_err(|e| failed(format!("reading {BUNDLE_KEY} from Consul: {e}")))?
                    .value
                    .ok_or_else(|| {
                        failed(format!(
                            "{BUNDLE_KEY} is not in Consul yet (mesh-control publishes it)"
                        ))
                    })?;
                String::from_utf8(stored.value)
                    .map_err(|_| failed(format!("{BUNDLE_KEY}: not PEM text")))?
            }
        };
        let bundle = TrustBundle::from_pem(td.clone(), &bundle_pem)
            .map_err(|e| failed(format!("the mesh CA's certificate: {e}")))?;
        let expected = SpiffeId::service(td, CONTROL_SERVICE)
            .map_err(|e| failed(format!("mesh-control's identity: {e}")))?;
        let own = self
            .tls
            .dir
            .read_pair(&self.tls.node)
            .and_then(|(key, cert)| {
                let key = LocalKey::from_pem(&key).ok()?;
                Credentials::new(&key, &cert, &self.tls.node).ok()
            });
        let config = match own {
            Some(credentials) => {
                pki::client_config(&bundle, Arc::new(CertResolver::new(credentials)), expected)
            }
            None => pki::client_config_without_cert(&bundle, expected),
        };
        let mut config = config.map_err(|e| failed(format!("a TLS config: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(MeshConnector::new(Arc::new(config)))
    }

    /// The gRPC URL of a passing mesh-control instance that the bridge of
    /// `node` can reach.
    async fn discover(&self, node: &str) -> Result<String, SignFailure> {
        let entries = self
            .consul
            .health_service(CONTROL_SERVICE, true, QueryOptions::default())
            .await
            .map_err(|e| SignFailure {
                kind: "discovery",
                message: format!("finding {CONTROL_SERVICE} in Consul's catalog: {e}"),
            })?
            .value;
        entries
            .iter()
            .find_map(|e| grpc_url(e, node))
            .ok_or_else(|| SignFailure {
                kind: "discovery",
                message: format!(
                    "no passing {CONTROL_SERVICE} instance in Consul's catalog with a grpc \
                     address node {node:?} can reach (a replica on another node must listen \
                     on an address other than loopback; or set control_addr)"
                ),
            })
    }
}

/// The instance's `grpc` meta, with an unspecified host (a replica
/// listening on every address) replaced by the instance's or its node's
/// address, whichever is not loopback: a replica registers its HTTP
/// listener's address, often 127.0.0.1, which names another host for
/// every bridge but its own node's.
///
/// `None` when the bridge of `node` cannot reach it: a loopback URL names
/// the replica only for a bridge on the replica's node (or in a mesh on
/// one host, whose node address is loopback itself); elsewhere it would
/// name the bridge's own host.
fn grpc_url(entry: &ServiceEntry, node: &str) -> Option<String> {
    let url = entry.service.meta.get("grpc")?;
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (host, port) = rest.rsplit_once(':')?;
    let ip = host.trim_matches(['[', ']']).parse::<IpAddr>().ok();
    let url = if ip.is_some_and(|ip| ip.is_unspecified()) {
        let known: Vec<&String> = [&entry.service.address, &entry.node.address]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        let address = known.iter().find(|a| !is_loopback(a)).or(known.first())?;
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("{scheme}://[{v6}]:{port}"),
            _ => format!("{scheme}://{address}:{port}"),
        }
    } else {
        url.clone()
    };
    let loopback = url
        .split_once("://")
        .and_then(|(_, r)| r.rsplit_once(':'))
        .is_some_and(|(host, _)| is_loopback(host.trim_matches(['[', ']'])) || host == "localhost");
    let same_host = entry.node.node.eq_ignore_ascii_case(node) || is_loopback(&entry.node.address);
    (!loopback || same_host).then_some(url)
}

fn is_loopback(address: &str) -> bool {
    address.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn failure(status: &Status) -> SignFailure {
    let kind = match status.code() {
        Code::Unavailable | Code::DeadlineExceeded => "unreachable",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "denied",
        Code::InvalidArgument => "invalid",
        Code::FailedPrecondition => "disabled",
        _ => "error",
    };
    SignFailure {
        kind,
        message: format!(
            "mesh-control refused or failed ({:?}): {}",
            status.code(),
            status.message()
        ),
    }
}

#[cfg(test)]
mod tests {
    use consul_client::{AgentService, Node};

    use super::*;

    fn entry(grpc: &str, service_address: &str, node_address: &str) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                node: "n1".into(),
                address: node_address.into(),
                ..Default::default()
            },
            service: AgentService {
                address: service_address.into(),
                meta: [("grpc".to_owned(), grpc.to_owned())].into(),
                ..Default::default()
            },
            checks: Vec::new(),
        }
    }

    #[test]
    fn an_unspecified_grpc_host_becomes_the_instance_address() {
        assert_eq!(
            grpc_url(&entry("http://10.0.0.2:8892", "", "10.0.0.9"), "n2").as_deref(),
            Some("http://10.0.0.2:8892")
        );
        assert_eq!(
            grpc_url(&entry("http://0.0.0.0:8892", "10.0.0.3", "10.0.0.9"), "n2").as_deref(),
            Some("http://10.0.0.3:8892")
        );
        assert_eq!(
            grpc_url(&entry("http://[::]:8892", "", "fd00::9"), "n2").as_deref(),
            Some("http://[fd00::9]:8892")
        );
        assert_eq!(grpc_url(&entry("http://0.0.0.0:8892", "", ""), "n2"), None);
        // mesh-control with grpc_tls publishes https, and it stays https.
        assert_eq!(
            grpc_url(&entry("https://0.0.0.0:8892", "", "10.0.0.9"), "n2").as_deref(),
            Some("https://10.0.0.9:8892")
        );
        assert_eq!(grpc_url(&entry("ftp://10.0.0.2:8892", "", ""), "n2"), None);
    }

    #[test]
    fn a_loopback_instance_address_gives_way_to_the_node_address() {
        // A replica with its HTTP listener on loopback and gRPC on every
        // address: other nodes reach it at its node's address.
        assert_eq!(
            grpc_url(&entry("http://0.0.0.0:8892", "127.0.0.1", "10.0.0.9"), "n2").as_deref(),
            Some("http://10.0.0.9:8892")
        );
        // A single-host mesh (a dev agent) has nothing else.
        assert_eq!(
            grpc_url(
                &entry("http://0.0.0.0:8892", "127.0.0.1", "127.0.0.1"),
                "n2"
            )
            .as_deref(),
            Some("http://127.0.0.1:8892")
        );
    }

    #[test]
    fn a_loopback_grpc_address_serves_only_the_replicas_own_node() {
        let on_n1 = entry("http://127.0.0.1:8892", "127.0.0.1", "10.0.0.9");
        assert_eq!(
            grpc_url(&on_n1, "n1").as_deref(),
            Some("http://127.0.0.1:8892")
        );
        // From n2, 127.0.0.1 is n2 itself: that replica is out of reach.
        assert_eq!(grpc_url(&on_n1, "n2"), None);
        let localhost = entry("http://localhost:8892", "", "10.0.0.9");
        assert_eq!(grpc_url(&localhost, "n2"), None);
        // A mesh on one host: its node address is loopback too.
        let single = entry("http://127.0.0.1:8892", "", "127.0.0.1");
        assert_eq!(
            grpc_url(&single, "dev").as_deref(),
            Some("http://127.0.0.1:8892")
        );
    }
}
