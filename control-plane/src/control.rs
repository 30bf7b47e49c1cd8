//! [`Control`]: the control plane's calls, whatever the transport. The
//! gRPC service ([`crate::grpc`]) and the REST mirror ([`crate::rest`]) are
//! thin layers over it, so both answer the same and fail the same.
//!
//! Every replica serves every call: reads go to Consul, writes are
//! check-and-set transactions ([`crate::store`]), so no call needs the
//! leader.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use consul_client::{Client, QueryOptions, ServiceEntry};
use futures::{StreamExt as _, TryStreamExt as _};
use mesh_proto::v1::{
    self as pb, deployer_client, monitor_client::MonitorClient, registry_client::RegistryClient,
};
use mesh_runtime::{
    backoff::Backoff,
    pki::{
        self, CertResolver, Credentials, LocalKey, SpiffeId, TrustBundle,
        grpc::{MeshConnector, ServerTls},
    },
    shutdown::Shutdown,
    telemetry::{TracedChannel, traced},
};
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::{
    config::Secret,
    diff,
    error::ControlError,
    identity::Identity,
    leader::LeaderState,
    metrics::ControlMetrics,
    model::{self, Catalog, Routes, Version, check_node_name, now_ms, rfc3339},
    render::{Format, Instance, NginxSettings, Upstreams, proxy_config},
    store::{Conflict, Store},
};

pub mod alerts;
pub mod deployments;
pub mod intentions;
pub mod rollouts;
pub mod types;

pub use self::{alerts::*, deployments::*, intentions::*, rollouts::*, types::*};

/// How long a connect to a node's bridge may take.
pub const BRIDGE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a call to a node's bridge may take.
pub const BRIDGE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Keepalive pings to a node's deployer, so that a vanished one fails a
/// long call instead of hanging it.
const DEPLOYER_KEEPALIVE: Duration = Duration::from_secs(10);

/// The largest message to or from a deployer (an upload chunk, a config).
const DEPLOYER_MAX_MESSAGE: usize = 8 << 20;

/// The longest author name.
pub const MAX_AUTHOR_LEN: usize = 128;

/// Health reads in flight at once when listing services.
const SERVICE_READS: usize = 8;

/// The control plane's calls.
#[derive(Clone, Debug)]
pub struct Control {
    consul: Client,
    store: Store,
    nginx: NginxSettings,
    bridge_port: u16,
    deployers: DeployerSettings,
    monitor: Option<String>,
    own: Option<OwnIdentity>,
    replica: String,
    leader: watch::Receiver<LeaderState>,
    metrics: ControlMetrics,
    default_intention: mesh_runtime::intentions::Action,
}

/// How mesh-control reaches each node's mesh-deployer.
#[derive(Clone, Debug, Default)]
pub struct DeployerSettings {
    /// The port it serves `mesh.v1.Deployer` on, at the node's address.
    pub port: u16,
    /// The bearer token it wants, if any.
    pub token: Option<Secret>,
    /// mTLS: mesh-control's own identity, presented to deployers whose
    /// node identity is verified; `None`: plaintext.
    pub tls: Option<OwnIdentity>,
}

/// The service name of mesh-control's own identity, the one deployers
/// with `tls_dir` let change their node.
pub const CONTROL_SERVICE: &str = "mesh-control";
/// The service name of mesh-monitor's identity, which a monitor at an
/// `https://` URL must show.
pub const MONITOR_SERVICE: &str = "mesh-monitor";

/// mesh-control's own certificate (`spiffe://<trust domain>/svc/mesh-control`),
/// from a key made here and signed by the mesh CA it holds: issued when
/// first needed, and again once two thirds of its lifetime have passed.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct OwnIdentity {
    identity: Identity,
    current: Arc<tokio::sync::Mutex<Option<Arc<OwnCert>>>>,
}

/// One issued certificate of [`OwnIdentity`].
#[derive(Debug)]
struct OwnCert {
    resolver: Arc<CertResolver>,
    bundle: TrustBundle,
    renew_at: SystemTime,
}

/// A client of one node's deployer, sending the token when there is one.
pub type DeployerClient = deployer_client::DeployerClient<
    tonic::service::interceptor::InterceptedService<TracedChannel, BearerToken>,
>;

/// Adds `authorization: Bearer <token>` to every call, when set; its
/// `Debug` shows no token.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::AsciiMetadataValue>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.0.as_ref().map(|_| "<redacted>");
        f.debug_tuple("BearerToken").field(&shown).finish()
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

// === impl OwnIdentity ===

impl OwnIdentity {
    /// Issues with `identity`'s CA and `cert_ttl`.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            current: Arc::default(),
        }
    }

    /// A client config presenting the current certificate and accepting
    /// only `node`'s identity (`node/<node>`).
    pub async fn client_config(
        &self,
        node: &str,
    ) -> Result<Arc<rustls::ClientConfig>, ControlError> {
        self.config_expecting(node, |td| SpiffeId::node(td, node))
            .await
    }

    /// A client config presenting the current certificate and accepting
    /// only mesh-monitor's identity (`svc/mesh-monitor`).
    pub async fn monitor_client_config(&self) -> Result<Arc<rustls::ClientConfig>, ControlError> {
        self.config_expecting(MONITOR_SERVICE, |td| SpiffeId::service(td, MONITOR_SERVICE))
            .await
    }

    async fn config_expecting(
        &self,
        peer: &str,
        expected: impl FnOnce(&pki::TrustDomain) -> Result<SpiffeId, pki::SpiffeIdError>,
    ) -> Result<Arc<rustls::ClientConfig>, ControlError> {
        let cert = self.current().await?;
        let expected = expected(cert.bundle.trust_domain())
            .map_err(|e| ControlError::Internal(format!("{peer:?}: {e}")))?;
        let mut config = pki::client_config(&cert.bundle, cert.resolver.clone(), expected)
            .map_err(|e| ControlError::Internal(format!("a TLS config: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Keeps `tls` presenting the current certificate until `shutdown`:
    /// installs it, waits until it is due for renewal, and again; retries
    /// with a backoff while the CA is not there yet.
    pub async fn serve_with(self, tls: Arc<ServerTls>, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let wait = match self.current().await {
                Ok(cert) => match tls.install(&cert.bundle, cert.resolver.clone()) {
                    Ok(()) => {
                        backoff.reset();
                        let until = cert.renew_at.duration_since(SystemTime::now());
                        until.unwrap_or_default().max(Duration::from_secs(1))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot serve gRPC over TLS yet");
                        backoff.next_delay()
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "no certificate for the gRPC listener yet");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The certificate to present, issued anew when none is or it is due.
    async fn current(&self) -> Result<Arc<OwnCert>, ControlError> {
        let mut current = self.current.lock().await;
        if let Some(cert) = current.as_ref().filter(|c| SystemTime::now() < c.renew_at) {
            return Ok(cert.clone());
        }
        let cert = Arc::new(self.issue().await?);
        *current = Some(cert.clone());
        Ok(cert)
    }

    async fn issue(&self) -> Result<OwnCert, ControlError> {
        let unavailable =
            |e: String| ControlError::Unavailable(format!("mesh-control's own certificate: {e}"));
        let ca = self
            .identity
            .authority()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let id = SpiffeId::service(ca.trust_domain(), CONTROL_SERVICE)
            .map_err(|e| unavailable(e.to_string()))?;
        let key = LocalKey::generate().map_err(|e| unavailable(e.to_string()))?;
        let csr = key.csr_pem(&id).map_err(|e| unavailable(e.to_string()))?;
        let ttl = self.identity.settings().cert_ttl;
        let pem = ca
            .sign(&csr, &id, ttl)
            .map_err(|e| unavailable(e.to_string()))?;
        let credentials =
            Credentials::new(&key, &pem, &id).map_err(|e| unavailable(e.to_string()))?;
        let bundle = ca.trust_bundle().map_err(|e| unavailable(e.to_string()))?;
        let renew_at = credentials.renew_at();
        tracing::info!(
            identity = %id, serial = %credentials.details().serial,
            "issued mesh-control's own certificate"
        );
        Ok(OwnCert {
            resolver: Arc::new(CertResolver::new(credentials)),
            bundle,
            renew_at,
        })
    }
}

/// What a [`Control`] is built from.
#[derive(Clone, Debug)]
pub struct ControlParts {
    /// The Consul client.
    pub consul: Client,
    /// How nginx.conf is rendered.
    pub nginx: NginxSettings,
    /// The port of each node's bridge (`mesh.v1.Registry`).
    pub bridge_port: u16,
    /// How each node's deployer is reached.
    pub deployers: DeployerSettings,
    /// mesh-monitor's gRPC URL, if there is one.
    pub monitor: Option<String>,
    /// mesh-control's own identity, for a monitor at an `https://` URL.
    pub own: Option<OwnIdentity>,
    /// This replica's name.
    pub replica: String,
    /// Who leads, as the leader lock says.
    pub leader: watch::Receiver<LeaderState>,
    /// Where calls are counted.
    pub metrics: ControlMetrics,
}

// === impl Control ===

impl Control {
    /// The calls over `parts`.
    pub fn new(parts: ControlParts) -> Self {
        Self {
            store: Store::new(parts.consul.clone()),
            consul: parts.consul,
            nginx: parts.nginx,
            bridge_port: parts.bridge_port,
            deployers: parts.deployers,
            monitor: parts.monitor,
            own: parts.own,
            replica: parts.replica,
            leader: parts.leader,
            metrics: parts.metrics,
            default_intention: mesh_runtime::intentions::Action::Deny,
        }
    }

    /// Counts the outcome of `method` and passes it on.
    pub fn counted<T>(
        &self,
        method: &'static str,
        result: Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let outcome = result.as_ref().map_or_else(ControlError::kind, |_| "ok");
        self.metrics.call(method, outcome);
        if let Err(e) = &result {
            match e {
                ControlError::Internal(_) => tracing::error!(method, error = %e, "call failed"),
                ControlError::Unavailable(_) => tracing::warn!(method, error = %e, "call failed"),
                _ => tracing::debug!(method, error = %e, "call refused"),
            }
        }
        result
    }

    /// Which replica answers and which one leads.
    pub fn status(&self) -> Status {
        let state = self.leader.borrow().clone();
        let leader = state.leader.unwrap_or_default();
        Status {
            replica: self.replica.clone(),
            is_leader: state.is_leader,
            leader_since: if leader.replica.is_empty() {
                String::new()
            } else {
                rfc3339(leader.since_ms)
            },
            leader: leader.replica,
            leader_grpc: leader.grpc,
            leader_http: leader.http,
        }
    }

    /// Consul's catalog nodes with their newest config version and what
    /// their proxies last reported.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ControlError> {
        let nodes = self.consul.catalog_nodes(QueryOptions::default()).await?;
        let versions = self.store.node_versions().await?;
        let reports = self.store.reports().await?;
        Ok(nodes
            .value
            .into_iter()
            .map(|n| {
                let routes_version = versions.get(&n.node).copied().unwrap_or(0);
                NodeInfo {
                    proxy: ProxyStatus::of(routes_version, reports.get(&n.node)),
                    routes_version,
                    name: n.node,
                    address: n.address,
                    datacenter: n.datacenter,
                }
            })
            .collect())
    }

    /// Consul's services with their instances and health.
    pub async fn services(&self) -> Result<Vec<ServiceInfo>, ControlError> {
        let catalog = self
            .consul
            .catalog_services(QueryOptions::default())
            .await?;
        let mut names: Vec<(String, Vec<String>)> = catalog.value.into_iter().collect();
        names.sort();
        futures::stream::iter(names)
            .map(|(name, mut tags)| async move {
                let entries = self
                    .consul
                    .health_service(&name, false, QueryOptions::default())
                    .await?;
                tags.sort();
                tags.dedup();
                Ok::<_, ControlError>(ServiceInfo {
                    instances: entries.value.iter().map(instance_info).collect(),
                    name,
                    tags,
                })
            })
            .buffered(SERVICE_READS)
            .try_collect()
            .await
    }

    /// `node`'s current routes and revision.
    pub async fn routes(&self, node: &str) -> Result<NodeRoutes, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        let current = self.store.current(node).await?;
        let Some(version) = current.version else {
            self.require_node(node).await?;
            return Ok(NodeRoutes {
                node: node.to_owned(),
                ..NodeRoutes::default()
            });
        };
        Ok(NodeRoutes {
            node: node.to_owned(),
            revision: current.revision,
            version: version.number,
            routes: version
                .routes
                .iter()
                .map(|(k, r)| (k.clone(), r.to_spec()))
                .collect(),
        })
    }

    /// Validates `change` and stores it as `node`'s next version, if the
    /// node's routes are still at `change.expected_revision`.
    pub async fn set_routes(
        &self,
        node: &str,
        change: SetRoutes,
    ) -> Result<SetRoutesResult, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        let author = check_author(&change.author)?;
        let catalog = self.catalog().await?;
        if !catalog.nodes.contains(node) {
            return Err(unknown_node(node));
        }
        let routes = model::validate(&change.routes, &catalog).map_err(ControlError::Invalid)?;
        let current = self.store.current(node).await?;
        if current.revision != change.expected_revision {
            return Err(ControlError::Conflict(Conflict {
                key: Store::routes_key(node),
                expected: change.expected_revision,
                actual: current.revision,
                current: current.version.map(|v| (v.number, v.author)),
            }));
        }
        let (version, revision) = self
            .store
            .commit_next(node, change.expected_revision, |number| {
                next_version(
                    node,
                    number,
                    current.version.as_ref(),
                    author.clone(),
                    routes.clone(),
                )
            })
            .await?;
        tracing::info!(
            node, version = version.number, author = %version.author, revision,
            routes = version.routes.len(), "stored a new config version"
        );
        Ok(SetRoutesResult {
            version: (&version).into(),
            revision,
        })
    }

    /// `node`'s versions, newest first.
    pub async fn versions(&self, node: &str) -> Result<Vec<VersionSummary>, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        let (versions, current) =
            tokio::try_join!(self.store.versions(node), self.store.current(node))?;
        if versions.is_empty() {
            self.require_node(node).await?;
        }
        let current = current.version.map_or(0, |v| v.number);
        Ok(versions
            .iter()
            .rev()
            .map(|v| VersionSummary {
                current: v.number == current,
                ..VersionSummary::from(v)
            })
            .collect())
    }

    /// `node`'s version `number`.
    pub async fn version(&self, node: &str, number: u64) -> Result<VersionView, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        match self.store.version(node, number).await? {
            Some(v) => Ok((&v).into()),
            None => Err(ControlError::NotFound(format!(
                "node {node:?} has no config version {number}"
            ))),
        }
    }

    /// `node`'s config at a version, for mesh-proxy or nginx, with its diff
    /// against the previous version rendered the same way.
    pub async fn render(&self, node: &str, query: RenderQuery) -> Result<Rendered, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        let version = if query.version == 0 {
            self.store.current(node).await?.version
        } else {
            Some(
                self.store
                    .version(node, query.version)
                    .await?
                    .ok_or_else(|| {
                        ControlError::NotFound(format!(
                            "node {node:?} has no config version {}",
                            query.version
                        ))
                    })?,
            )
        };
        let version = match version {
            Some(v) => v,
            None => {
                self.require_node(node).await?;
                empty_version(node)
            }
        };
        let previous = match version.previous_number() {
            0 => None,
            n => self.store.version(node, n).await?,
        };
        let (text, diff) = match query.format {
            Format::Proxy => (version.rendered.clone(), version.diff.clone()),
            Format::Nginx => {
                let upstreams = query.upstreams.unwrap_or(self.nginx.upstreams);
                self.render_nginx(&version, previous.as_ref(), upstreams)
                    .await?
            }
        };
        Ok(Rendered {
            node: node.to_owned(),
            version: version.number,
            format: query.format,
            text,
            diff,
        })
    }

    /// Registers an instance on `node` through the node's bridge.
    pub async fn register(
        &self,
        node: &str,
        registration: Registration,
    ) -> Result<RegisterResult, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        mesh_runtime::pki::spiffe::check_workload_name(&registration.name)
            .map_err(|m| ControlError::invalid("service.name", m))?;
        if !(1..=65535).contains(&registration.port) {
            return Err(ControlError::invalid(
                "service.port",
                format!("{} is not a port (1 to 65535)", registration.port),
            ));
        }
        let id = if registration.id.is_empty() {
            registration.name.clone()
        } else {
            registration.id.clone()
        };
        let (mut bridge, url) = self.bridge(node).await?;
        let request = pb::RegisterRequest {
            service: Some(to_proto(registration)),
        };
        let answer = bridge
            .register(request)
            .await
            .map_err(|s| bridge_error(node, &url, &s))?;
        let queued = answer.into_inner().queued;
        tracing::info!(node, id, queued, "registered through the node's bridge");
        Ok(RegisterResult { queued })
    }

    /// Deregisters instance `id` from `node` through the node's bridge.
    pub async fn deregister(&self, node: &str, id: &str) -> Result<RegisterResult, ControlError> {
        check_node_name(node).map_err(|m| ControlError::invalid("node", m))?;
        if id.trim().is_empty() {
            return Err(ControlError::invalid("id", "an instance ID is required"));
        }
        let (mut bridge, url) = self.bridge(node).await?;
        let request = pb::DeregisterRequest { id: id.to_owned() };
        let answer = bridge
            .deregister(request)
            .await
            .map_err(|s| bridge_error(node, &url, &s))?;
        let queued = answer.into_inner().queued;
        tracing::info!(node, id, queued, "deregistered through the node's bridge");
        Ok(RegisterResult { queued })
    }

    // --- helpers ---

    /// The node and service names in Consul's catalog.
    async fn catalog(&self) -> Result<Catalog, ControlError> {
        let (nodes, services) = tokio::try_join!(
            self.consul.catalog_nodes(QueryOptions::default()),
            self.consul.catalog_services(QueryOptions::default()),
        )?;
        Ok(Catalog {
            nodes: nodes.value.into_iter().map(|n| n.node).collect(),
            services: services.value.into_keys().collect(),
        })
    }

    /// The node's address in Consul's catalog, or NotFound when it is not
    /// there.
    pub async fn node_address(&self, node: &str) -> Result<String, ControlError> {
        self.require_node(node).await
    }

    /// The node's address, or NotFound when it is not in the catalog.
    async fn require_node(&self, node: &str) -> Result<String, ControlError> {
        let nodes = self.consul.catalog_nodes(QueryOptions::default()).await?;
        nodes
            .value
            .into_iter()
            .find(|n| n.node == node)
            .map(|n| n.address)
            .ok_or_else(|| unknown_node(node))
    }

    /// A Registry client of `node`'s bridge, and its URL.
    pub(crate) async fn bridge(
        &self,
        node: &str,
    ) -> Result<(RegistryClient<TracedChannel>, String), ControlError> {
        let (channel, url) = self
            .node_channel(node, self.bridge_port, "bridge", |e| {
                e.timeout(BRIDGE_CALL_TIMEOUT)
            })
            .await?;
        Ok((RegistryClient::new(traced(channel)), url))
    }

    /// A channel to `what` (a bridge, a deployer) on `node` at `port`,
    /// with `tune` applied to its endpoint, and its URL. Nodes with
    /// identities (deployer_mtls) take other hosts over mTLS only:
    /// mesh-control then shows its own identity and accepts only the
    /// node's.
    async fn node_channel(
        &self,
        node: &str,
        port: u16,
        what: &str,
        tune: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<(tonic::transport::Channel, String), ControlError> {
        let address = self.require_node(node).await?;
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address
        };
        let url = format!("http://{host}:{port}");
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| ControlError::Internal(format!("{what} address {url}: {e}")))?
            .connect_timeout(BRIDGE_CONNECT_TIMEOUT);
        let endpoint = tune(endpoint);
        let connected = match &self.deployers.tls {
            Some(own) => {
                let config = own.client_config(node).await?;
                endpoint
                    .connect_with_connector(MeshConnector::new(config))
                    .await
            }
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|e| {
            ControlError::Unavailable(format!(
                "node {node}'s {what} at {url} is unreachable: {}",
                error_chain(&e)
            ))
        })?;
        Ok((channel, url))
    }

    /// A client of `node`'s mesh-deployer, and its URL. The channel has no
    /// call timeout: uploads and deploys take as long as they take, so
    /// callers bound each call themselves.
    pub async fn deployer(&self, node: &str) -> Result<(DeployerClient, String), ControlError> {
        let (channel, url) = self
            .node_channel(node, self.deployers.port, "deployer", |e| {
                e.http2_keep_alive_interval(DEPLOYER_KEEPALIVE)
                    .keep_alive_timeout(DEPLOYER_KEEPALIVE)
            })
            .await?;
        let token = match &self.deployers.token {
            None => None,
            Some(Secret(t)) => {
                let mut value: tonic::metadata::AsciiMetadataValue =
                    format!("Bearer {t}").parse().map_err(|_| {
                        ControlError::Internal("deployer_token is not a valid header value".into())
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let client =
            deployer_client::DeployerClient::with_interceptor(traced(channel), BearerToken(token))
                .max_decoding_message_size(DEPLOYER_MAX_MESSAGE)
                .max_encoding_message_size(DEPLOYER_MAX_MESSAGE);
        Ok((client, url))
    }

    /// What serves `node`'s routes, from its Consul node metadata; `Err`
    /// (inner) names a metadata value that is neither nginx nor proxy.
    pub async fn frontend(
        &self,
        node: &str,
    ) -> Result<Result<crate::rollout::Frontend, String>, ControlError> {
        let nodes = self.consul.catalog_nodes(QueryOptions::default()).await?;
        let found = nodes
            .value
            .into_iter()
            .find(|n| n.node == node)
            .ok_or_else(|| unknown_node(node))?;
        Ok(crate::rollout::Frontend::of_meta(&found.meta))
    }

    /// How nginx.conf is rendered and applied on this mesh.
    pub fn nginx_settings(&self) -> &NginxSettings {
        &self.nginx
    }

    /// nginx.conf of `node` at version `number` (0: no routes), rendered
    /// with this mesh's settings, for its deployer to apply.
    pub async fn nginx_conf(&self, node: &str, number: u64) -> Result<String, ControlError> {
        let version = match number {
            0 => empty_version(node),
            n => self.store.version(node, n).await?.ok_or_else(|| {
                ControlError::NotFound(format!("node {node:?} has no config version {n}"))
            })?,
        };
        let (text, _) = self
            .render_nginx(&version, None, self.nginx.upstreams)
            .await?;
        Ok(text)
    }

    /// A client of mesh-monitor, and its URL; `None` when mesh-control
    /// runs without one (`monitor_addr` unset).
    pub async fn monitor(
        &self,
    ) -> Option<Result<(MonitorClient<TracedChannel>, String), ControlError>> {
        let url = self.monitor.clone()?;
        // https: mutual TLS, mesh-control's own identity against the
        // monitor's; the endpoint itself dials plain TCP for the connector.
        let tls = url.starts_with("https://");
        let dialled = match url.strip_prefix("https://") {
            Some(rest) => format!("http://{rest}"),
            None => url.clone(),
        };
        let endpoint = match Endpoint::from_shared(dialled) {
            Ok(e) => e
                .connect_timeout(BRIDGE_CONNECT_TIMEOUT)
                .timeout(BRIDGE_CALL_TIMEOUT),
            Err(e) => {
                return Some(Err(ControlError::Internal(format!(
                    "monitor address {url}: {e}"
                ))));
            }
        };
        let connected = match (tls, &self.own) {
            (false, _) => endpoint.connect().await,
            (true, Some(own)) => match own.monitor_client_config().await {
                Ok(config) => {
                    endpoint
                        .connect_with_connector(MeshConnector::new(config))
                        .await
                }
                Err(e) => return Some(Err(e)),
            },
            (true, None) => {
                return Some(Err(ControlError::Internal(format!(
                    "monitor address {url}: https needs identity_token"
                ))));
            }
        };
        Some(match connected {
            Ok(channel) => Ok((MonitorClient::new(traced(channel)), url)),
            Err(e) => Err(ControlError::Unavailable(format!(
                "mesh-monitor at {url} is unreachable: {}",
                error_chain(&e)
            ))),
        })
    }

    /// nginx.conf for `version` and for `previous`, and their diff.
    async fn render_nginx(
        &self,
        version: &Version,
        previous: Option<&Version>,
        upstreams: Upstreams,
    ) -> Result<(String, String), ControlError> {
        let mut instances = BTreeMap::new();
        if upstreams == Upstreams::Static {
            let mut names: Vec<&String> = version.routes.keys().collect();
            if let Some(p) = previous {
                names.extend(p.routes.keys());
            }
            names.sort();
            names.dedup();
            for name in names {
                let entries = self
                    .consul
                    .health_service(name, true, QueryOptions::default())
                    .await?;
                instances.insert(
                    name.clone(),
                    entries.value.iter().map(static_instance).collect(),
                );
            }
        }
        let node = &version.node;
        let text =
            self.nginx
                .render(upstreams, node, version.number, &version.routes, &instances)?;
        let diff = match previous {
            None => String::new(),
            Some(p) => {
                let old = self
                    .nginx
                    .render(upstreams, node, p.number, &p.routes, &instances)?;
                diff::unified(
                    &old,
                    &text,
                    &format!("{node} version {} (nginx)", p.number),
                    &format!("{node} version {} (nginx)", version.number),
                )
            }
        };
        Ok((text, diff))
    }
}

/// Version `number` of `node` with `routes`, based on `previous`,
/// rendered and diffed against it.
pub(crate) fn next_version(
    node: &str,
    number: u64,
    previous: Option<&Version>,
    author: String,
    routes: Routes,
) -> Version {
    let rendered = proxy_config(node, number, &routes);
    let (old, old_label) = match previous {
        Some(p) => (
            p.rendered.as_str(),
            format!("{node} version {} (proxy)", p.number),
        ),
        None => ("", "/dev/null".to_owned()),
    };
    let diff = diff::unified(
        old,
        &rendered,
        &old_label,
        &format!("{node} version {number} (proxy)"),
    );
    Version {
        node: node.to_owned(),
        number,
        previous: Some(previous.map_or(0, |p| p.number)),
        author,
        created_at_ms: now_ms(),
        routes,
        rendered,
        diff,
    }
}

/// Version 0 of a node without routes: what its proxy runs before any.
fn empty_version(node: &str) -> Version {
    Version {
        node: node.to_owned(),
        number: 0,
        previous: Some(0),
        author: String::new(),
        created_at_ms: 0,
        routes: Routes::new(),
        rendered: proxy_config(node, 0, &Routes::new()),
        diff: String::new(),
    }
}

pub(crate) fn check_author(author: &str) -> Result<String, ControlError> {
    let author = author.trim();
    if author.is_empty() {
        return Err(ControlError::invalid(
            "author",
            "who makes the change is required",
        ));
    }
    if author.len() > MAX_AUTHOR_LEN || author.chars().any(char::is_control) {
        return Err(ControlError::invalid(
            "author",
            format!("at most {MAX_AUTHOR_LEN} printable characters"),
        ));
    }
    Ok(author.to_owned())
}

pub(crate) fn unknown_node(node: &str) -> ControlError {
    ControlError::NotFound(format!("node {node:?} is not in Consul's catalog"))
}

fn instance_info(e: &ServiceEntry) -> InstanceInfo {
    let checks: Vec<CheckInfo> = e
        .checks
        .iter()
        .map(|c| CheckInfo {
            id: c.check_id.clone(),
            status: c.status.clone(),
            output: c.output.trim().to_owned(),
        })
        .collect();
    let health = ["critical", "warning"]
        .into_iter()
        .find(|s| checks.iter().any(|c| c.status == *s))
        .unwrap_or("passing");
    InstanceInfo {
        id: e.service.id.clone(),
        node: e.node.node.clone(),
        address: e.address().to_owned(),
        port: e.service.port,
        tags: e.service.tags.clone(),
        meta: e.service.meta.clone(),
        health: health.to_owned(),
        checks,
    }
}

fn static_instance(e: &ServiceEntry) -> Instance {
    Instance {
        id: e.service.id.clone(),
        address: e.address().to_owned(),
        port: e.service.port,
        tags: e.service.tags.clone(),
        meta: e.service.meta.clone(),
    }
}

/// A registration as the bridge's Registry takes it.
pub fn to_proto(r: Registration) -> pb::ServiceRegistration {
    pb::ServiceRegistration {
        id: r.id,
        name: r.name,
        address: r.address,
        port: r.port,
        tags: r.tags,
        meta: r.meta.into_iter().collect(),
        checks: r
            .checks
            .into_iter()
            .map(|c| pb::Check {
                http: c.http,
                tcp: c.tcp,
                ttl: c.ttl,
                interval: c.interval,
                timeout: c.timeout,
                deregister_critical_service_after: c.deregister_critical_service_after,
            })
            .collect(),
    }
}

/// What a node's bridge answered, as the caller should see it.
fn bridge_error(node: &str, url: &str, status: &tonic::Status) -> ControlError {
    let message = status.message();
    match status.code() {
        tonic::Code::InvalidArgument => ControlError::invalid(
            "service",
            format!("node {node}'s bridge refused it: {message}"),
        ),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            ControlError::Unavailable(format!(
                "node {node}'s bridge at {url} did not answer: {message}"
            ))
        }
        code => ControlError::Internal(format!(
            "node {node}'s bridge at {url} answered {code:?}: {message}"
        )),
    }
}

/// An error with its sources, which say why (a transport error alone
/// says only "transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
