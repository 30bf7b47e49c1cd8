//! Channels to the nodes' mesh-bridges (`mesh.v1.Checks`), kept per node.
//!
//! Without TLS a bridge is dialled in plaintext at the node's catalog
//! address. With `tls_dir` the monitor shows its own identity
//! (`spiffe://<trust domain>/svc/mesh-monitor`, issued by its node's
//! bridge because the monitor registers itself as `mesh-monitor`) and
//! accepts only the bridge of the node it dials
//! (`spiffe://<trust domain>/node/<node>`): a host that answers at a
//! node's address without that node's certificate gets no check and no
//! question.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use mesh_runtime::pki::{
    SpiffeId,
    grpc::{ClientTls, service_files},
};
use mesh_runtime::telemetry::{TracedChannel, traced};
use tonic::transport::Endpoint;

use crate::config::TlsSettings;

/// The service name the monitor registers and its identity names.
pub const MONITOR_SERVICE: &str = "mesh-monitor";
/// How long a connect to a bridge may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Dials the bridges; see the module docs.
#[derive(Debug)]
pub struct Bridges {
    port: u16,
    tls: Option<ClientTls>,
    /// Lazily connecting channels by node and address.
    channels: Mutex<HashMap<(String, String), TracedChannel>>,
}

// === impl Bridges ===

impl Bridges {
    /// Bridges at every node's address and `port`, over mTLS with `tls`.
    pub fn new(port: u16, tls: Option<&TlsSettings>) -> Result<Self, String> {
        let tls = tls
            .map(|tls| {
                let me = SpiffeId::service(&tls.trust_domain, MONITOR_SERVICE)
                    .map_err(|e| format!("trust_domain: {e}"))?;
                let (key, cert) = service_files(MONITOR_SERVICE);
                Ok::<_, String>(ClientTls::new(tls.dir.clone(), me, &key, &cert))
            })
            .transpose()?;
        Ok(Self {
            port,
            tls,
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// The port dialled.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A channel to `node`'s bridge at `address`, made at the first call
    /// and kept; connecting is lazy. With TLS, an error when the monitor's
    /// certificate is not there (yet).
    pub fn channel(&self, node: &str, address: &str) -> Result<TracedChannel, String> {
        if let Some(tls) = &self.tls {
            // A renewed certificate is shown from the next handshake on.
            tls.refresh()
                .map_err(|e| format!("no certificate for {}: {e}", tls.identity()))?;
        }
        let key = (node.to_owned(), address.to_owned());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address.to_owned()
        };
        let url = format!("http://{host}:{}", self.port);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("bridge address {url}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = match &self.tls {
            None => endpoint.connect_lazy(),
            Some(tls) => {
                let expected = SpiffeId::node(tls.identity().trust_domain(), node)
                    .map_err(|e| format!("node {node:?}: {e}"))?;
                let connector = tls
                    .connector(expected)
                    .map_err(|e| format!("no certificate for {}: {e}", tls.identity()))?;
                endpoint.connect_with_connector_lazy(connector)
            }
        };
        let channel = traced(channel);
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    /// Forgets the channels of nodes not in `nodes`.
    pub fn retain(&self, nodes: &std::collections::BTreeSet<String>) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|(node, _), _| nodes.contains(node));
    }
}

/// With mTLS, the monitor's own instance in Consul (`mesh-monitor` on its
/// node), so that the node's bridge issues it the `svc/mesh-monitor`
/// identity. It points at the admin listener, with Consul's HTTP check on
/// `/live`; registered with retries until it holds, deregistered on
/// shutdown (the bridge then deletes the certificate).
#[derive(Debug)]
pub struct SelfRegistration {
    consul: consul_client::Client,
    registration: consul_client::AgentServiceRegistration,
}

/// How often an unregistered monitor tries again, at most.
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(30);
/// Consul's interval for the `/live` check.
const LIVE_CHECK_INTERVAL: &str = "10s";
/// How long a critical instance stays before Consul removes it.
const REAP_CRITICAL_AFTER: &str = "10m";

impl SelfRegistration {
    /// The instance of the monitor on `node`, its admin listener at `admin`.
    pub fn new(consul: consul_client::Client, node: &str, admin: std::net::SocketAddr) -> Self {
        use consul_client::{AgentServiceCheck, AgentServiceRegistration};
        let id = format!("{MONITOR_SERVICE}-{node}");
        let check_host = if admin.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], admin.port()))
        } else {
            admin
        };
        let registration = AgentServiceRegistration {
            id: Some(id.clone()),
            name: MONITOR_SERVICE.into(),
            address: (!admin.ip().is_unspecified()).then(|| admin.ip().to_string()),
            port: Some(admin.port()),
            // Where a prober asks whether the monitor serves.
            meta: [("health-path".to_owned(), "/live".to_owned())].into(),
            check: Some(AgentServiceCheck {
                check_id: Some(id),
                name: Some("mesh-monitor alive".into()),
                http: Some(format!("http://{check_host}/live")),
                interval: Some(LIVE_CHECK_INTERVAL.into()),
                deregister_critical_service_after: Some(REAP_CRITICAL_AFTER.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Self {
            consul,
            registration,
        }
    }

    /// Registers (retrying with a backoff) and keeps the instance until
    /// `shutdown`, then deregisters it.
    pub async fn run(self, mut shutdown: mesh_runtime::shutdown::Shutdown) {
        let mut backoff =
            mesh_runtime::backoff::Backoff::new(Duration::from_millis(200), REGISTER_RETRY_MAX);
        loop {
            match self.consul.agent_service_register(&self.registration).await {
                Ok(()) => {
                    tracing::info!(service = MONITOR_SERVICE, "registered for its identity");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot register mesh-monitor; retrying"),
            }
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        shutdown.requested().await;
        let id = self.registration.id.as_deref().unwrap_or(MONITOR_SERVICE);
        if let Err(e) = self.consul.agent_service_deregister(id).await {
            tracing::warn!(error = %e, "cannot deregister mesh-monitor");
        }
    }
}
