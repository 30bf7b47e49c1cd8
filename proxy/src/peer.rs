//! Other nodes' proxies ("peers"), and the hop through them.
//!
//! A proxy with an inbound listener ([`crate::inbound`]) registers itself
//! as service [`SERVICE`] (ID `mesh-proxy-<node>`, the inbound port, a TCP
//! check; see [`registration`]) through its own registration path, so every
//! proxy's routing table carries the peers as that service's endpoints,
//! each with its Consul node. [`Peers`] keeps node → peer from those
//! endpoints and is rebuilt whenever the service changes: peers appear and
//! go with their registration and its health check.
//!
//! Outbound, an attempt whose chosen instance runs on another node that has
//! a peer goes to that peer's inbound listener instead ([`Peers::hop`]),
//! naming the instance in [`ENDPOINT_HEADER`]. Requests travel as streams
//! of one multiplexed HTTP/2 connection per peer: the peer endpoint's own
//! [`Upstream`], so the pooled client (stream bound, reconnect, keep-alive
//! pings) does the work. An HTTP/1.1 upgrade (WebSocket) takes an HTTP/1.1
//! connection of its own instead, the only version the upgrade exists in.
//! The inbound listener closes such a connection after one exchange unless
//! it became a tunnel (`Connection: close`), so it never carries a second
//! request: should an answer without a switch hand it back to the
//! instance's idle list, it is found closed there and dropped.
//!
//! Balancing, retries and outlier detection stay on the calling side, per
//! instance, exactly as for a direct call: a peer that cannot be reached is
//! a failed connect to the instance, and an answer the peer made itself
//! ([`REFUSED_HEADER`]: the instance is not on its node, or it could not
//! reach it) a failed attempt on the instance. The exception is a refusal
//! by intentions ([`INTENTION_REFUSAL`]): another instance would be
//! refused alike and this one did nothing wrong, so the caller gets the
//! 403 as it is.
//!
//! In mtls mode ([`crate::tls`]) the hop is TLS with mesh identities: the
//! calling side presents the identity of the service it speaks for (or
//! the node's) and accepts only `node/<peer node>`, so a peer keeps one
//! connection per identity it speaks for. An instance on another node is
//! then never called directly: a node without a peer is unreachable
//! ([`NoPeer`]).
//!
//! `mesh-proxy` names no service a caller may call: the outbound listener
//! answers 404 for it, and the agent API refuses the name and its IDs.
//!
//! - [`header`]: the hop's headers, the instance's name encoded and read.
//! - [`registration`]: this proxy's own `mesh-proxy` registration.
//! - [`watch`]: what discovery subscribes to, `mesh-proxy` included.

pub mod header;
pub mod registration;
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, Response, header::UPGRADE};
use mesh_runtime::{pki::SpiffeId, shutdown::Shutdown};
use serde::Serialize;
use tokio::sync::watch as tokio_watch;

pub use self::header::{ENDPOINT_HEADER, EndpointRef, PROTOCOL_HEADER, REFUSED_HEADER};
use crate::{
    error::ProxyError,
    metrics::{PeerMetrics, ProxyMetrics},
    protocol::Protocol,
    table::{Endpoint, RoutingTable, Service},
    tls::{Identity, MeshTls, TlsTarget},
    upstream::{Lease, Upstream},
};

/// The `x-mesh-refused` value of a request the intentions deny: the one
/// refusal the calling proxy relays to its caller (a 403), neither retried
/// on another instance nor held against the instance.
pub const INTENTION_REFUSAL: &str = "intention";

/// The service name proxies with an inbound listener register under.
pub const SERVICE: &str = "mesh-proxy";

/// How often the peer connection gauges are brought up to date.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// The registration ID of the proxy on `node`.
pub fn registration_id(node: &str) -> String {
    format!("{SERVICE}-{node}")
}

/// Whether `name` is the peers' service, which no caller may name.
pub fn is_peer_service(name: &str) -> bool {
    name.len() == SERVICE.len() && name.eq_ignore_ascii_case(SERVICE)
}

/// The proxies of the other nodes, by node; swapped whole.
#[derive(Debug)]
pub struct Peers {
    node: Box<str>,
    own_id: String,
    map: ArcSwap<PeerMap>,
    metrics: Arc<ProxyMetrics>,
    /// The credentials of mtls mode; `None`: direct mode.
    tls: Option<Arc<MeshTls>>,
}

type PeerMap = HashMap<Box<str>, Arc<Peer>>;

/// One other node's proxy, reached at its inbound listener.
#[derive(Debug)]
pub struct Peer {
    node: Box<str>,
    id: String,
    /// Its inbound listener, from the routing table: the connection of
    /// direct mode, and the address of mtls mode's.
    upstream: Arc<Upstream>,
    metrics: Arc<PeerMetrics>,
    tls: Option<Arc<MeshTls>>,
    /// mtls mode: one connection state per identity spoken for, made at
    /// its first request.
    by_source: ArcSwap<BySource>,
}

/// Connection states by the identity they speak for.
type BySource = HashMap<SpiffeId, (Arc<Identity>, Arc<Upstream>)>;

/// mtls mode: an instance on another node whose proxy is not known (not
/// registered, or not passing), which is never called directly.
#[derive(Debug, thiserror::Error)]
#[error(
    "node {node} has no proxy registered (service mesh-proxy); in mtls mode its instances are reached only through it"
)]
pub struct NoPeer {
    /// The instance's node.
    pub node: String,
}

/// One peer in `/routes`.
#[derive(Debug, Serialize)]
pub struct PeerView {
    /// Its registration ID.
    pub id: String,
    /// Its inbound listener's address.
    pub address: String,
    /// Its inbound listener's port.
    pub port: u16,
    /// Whether the HTTP/2 connection to it is open.
    pub h2_connected: bool,
    /// Connections open to it (the HTTP/2 one and upgrades' own).
    pub connections: usize,
}

// === impl Peers ===

impl Peers {
    /// No peers yet; this proxy runs on `node`.
    pub fn new(node: &str, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            node: node.into(),
            own_id: registration_id(node),
            map: ArcSwap::from_pointee(PeerMap::new()),
            metrics,
            tls: None,
        }
    }

    /// mtls mode with `tls`: peers are reached over mTLS, and only
    /// through them.
    pub fn with_tls(mut self, tls: Option<Arc<MeshTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// This proxy's node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The credentials of mtls mode; `None` in direct mode.
    pub fn tls(&self) -> Option<&Arc<MeshTls>> {
        self.tls.as_ref()
    }

    /// The peer that carries a request to `endpoint`: its node's proxy,
    /// unless that is this node or the node has none (called directly; in
    /// mtls mode, refused). Lock-free.
    pub fn hop(&self, endpoint: &Endpoint) -> Result<Option<Arc<Peer>>, NoPeer> {
        if *endpoint.node == *self.node || endpoint.node.is_empty() {
            return Ok(None);
        }
        let map = self.map.load();
        match map.get(endpoint.node.as_str()) {
            Some(peer) => Ok(Some(peer.clone())),
            None if self.tls.is_some() => Err(NoPeer {
                node: endpoint.node.to_string(),
            }),
            None => Ok(None),
        }
    }

    /// The peers now, by node.
    pub fn view(&self) -> BTreeMap<String, PeerView> {
        self.map
            .load()
            .values()
            .map(|p| (p.node.to_string(), p.view()))
            .collect()
    }

    /// Rebuilds the peers from `service`, the `mesh-proxy` endpoints of a
    /// new table (`None`: no proxy is registered).
    fn rebuild(&self, service: Option<&Service>) {
        let old = self.map.load_full();
        let mut map = PeerMap::new();
        for e in service.map_or(&[][..], Service::endpoints) {
            if e.id == self.own_id {
                if *e.node != *self.node {
                    tracing::error!(id = %e.id, consul_node = %e.node, node = %self.node, "this proxy's registration is on another Consul node name: set `node` to the Consul agent's node name, or the inbound listener refuses every instance");
                }
                continue;
            }
            if e.node.is_empty() || *e.node == *self.node {
                continue;
            }
            // Two registrations for one node: the one named for it wins.
            if map.get(e.node.as_str()).is_some_and(|p| {
                p.id == registration_id(&p.node) || e.id != registration_id(&e.node)
            }) {
                continue;
            }
            // The same registration keeps its peer, and with it mtls
            // mode's connections.
            let peer = match old.get(e.node.as_str()) {
                Some(o) if o.id == e.id && Arc::ptr_eq(&o.upstream, &e.upstream) => o.clone(),
                _ => Arc::new(Peer {
                    node: e.node.as_str().into(),
                    id: e.id.clone(),
                    upstream: e.upstream.clone(),
                    metrics: self.metrics.peer(&e.node),
                    tls: self.tls.clone(),
                    by_source: ArcSwap::default(),
                }),
            };
            map.insert(e.node.as_str().into(), peer);
        }
        for (node, peer) in &map {
            if !old
                .get(node)
                .is_some_and(|o| Arc::ptr_eq(&o.upstream, &peer.upstream))
            {
                tracing::info!(peer = %node, host = peer.upstream.host(), port = peer.upstream.port(), "peer proxy joined; requests to its node's instances go through it");
            }
        }
        for (node, gone) in old.iter().filter(|(n, _)| !map.contains_key(*n)) {
            tracing::info!(peer = %node, "peer proxy left; its node's instances are called directly");
            gone.metrics.set_connections(0, 0);
        }
        self.metrics.peers.set(map.len() as f64);
        self.map.store(Arc::new(map));
    }

    fn update_gauges(&self) {
        for peer in self.map.load().values() {
            let (h1, h2) = peer.connections();
            peer.metrics.set_connections(h1, h2);
        }
    }

    /// Follows the routing table: rebuilds the peers whenever its
    /// `mesh-proxy` service changes, and keeps the connection gauges up to
    /// date, until shutdown.
    pub async fn follow(
        self: Arc<Self>,
        mut tables: tokio_watch::Receiver<Arc<RoutingTable>>,
        mut stop: Shutdown,
    ) {
        let mut last: Option<Arc<Service>> = None;
        let mut tick = tokio::time::interval(GAUGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let table = tables.borrow_and_update().clone();
            let service = table.get(SERVICE);
            let same = match (&last, service) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                self.rebuild(service.map(|s| &**s));
                self.update_gauges();
                last = service.cloned();
            }
            loop {
                tokio::select! {
                    changed = tables.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    _ = tick.tick() => self.update_gauges(),
                    _ = stop.requested() => return,
                }
            }
        }
    }
}

// === impl Peer ===

impl Peer {
    /// The peer's node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A connection to the peer's inbound listener for a request with
    /// `headers`: a stream of the HTTP/2 connection, or for an upgrade an
    /// HTTP/1.1 connection of its own. In mtls mode, the connection that
    /// speaks for `source`.
    pub async fn checkout(
        &self,
        headers: &HeaderMap,
        source: Option<&Arc<Identity>>,
        timeout: Duration,
    ) -> io::Result<Lease> {
        let upstream = match (&self.tls, source) {
            (Some(tls), Some(source)) => self.upstream_for(tls, source),
            _ => self.upstream.clone(),
        };
        upstream
            .checkout(hop_protocol(headers), timeout)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "the proxy of node {} at {}:{}: {e}",
                        self.node,
                        self.upstream.host(),
                        self.upstream.port()
                    ),
                )
            })
    }

    /// Names `endpoint` of `service` on a request about to go to the peer,
    /// and the `protocol` the peer is to use towards it; counts it.
    pub fn mark(
        &self,
        headers: &mut HeaderMap,
        service: &str,
        endpoint: &Endpoint,
        protocol: Protocol,
    ) {
        self.metrics.request(hop_protocol(headers));
        headers.insert(ENDPOINT_HEADER, EndpointRef::encode(service, &endpoint.id));
        headers.insert(
            PROTOCOL_HEADER,
            HeaderValue::from_static(match protocol {
                Protocol::Http1 => "http1",
                Protocol::Http2 => "h2",
            }),
        );
    }

    /// When `response` is the peer's own answer (it refused the request, or
    /// could not reach the instance), the failed attempt it stands for.
    /// An intention's refusal is none: it is the answer (see
    /// [`is_intention_refusal`]).
    pub fn refused<B>(&self, response: &Response<B>, service: &Arc<str>) -> Option<ProxyError> {
        let kind = response.headers().get(REFUSED_HEADER)?;
        if kind == INTENTION_REFUSAL {
            return None;
        }
        let kind = String::from_utf8_lossy(kind.as_bytes());
        Some(ProxyError::Connect {
            service: service.clone(),
            source: io::Error::other(format!(
                "the proxy of node {} answered {}: {kind}",
                self.node,
                response.status()
            )),
        })
    }

    /// The connection state that speaks for `source`, made at its first
    /// request (and anew when the identity was removed and came back with
    /// other credentials). Lock-free once made.
    fn upstream_for(&self, tls: &Arc<MeshTls>, source: &Arc<Identity>) -> Arc<Upstream> {
        let current = |map: &BySource| {
            map.get(source.id())
                .filter(|(who, _)| Arc::ptr_eq(who, source))
                .map(|(_, upstream)| upstream.clone())
        };
        if let Some(upstream) = current(&self.by_source.load()) {
            return upstream;
        }
        let made = Arc::new(
            Upstream::new(self.upstream.host(), self.upstream.port()).with_tls(TlsTarget {
                mesh: tls.clone(),
                source: source.clone(),
                node: self.node.clone(),
            }),
        );
        self.by_source.rcu(|map| {
            let mut map = BySource::clone(map);
            if current(&map).is_none() {
                map.insert(source.id().clone(), (source.clone(), made.clone()));
            }
            map
        });
        current(&self.by_source.load()).unwrap_or(made)
    }

    /// Connections open to the peer: HTTP/1.1 and HTTP/2.
    fn connections(&self) -> (usize, usize) {
        let by_source = self.by_source.load();
        std::iter::once(&self.upstream)
            .chain(by_source.values().map(|(_, upstream)| upstream))
            .fold((0, 0), |(h1, h2), u| {
                let up_h2 = usize::from(u.has_h2());
                (h1 + u.connections().saturating_sub(up_h2), h2 + up_h2)
            })
    }

    fn view(&self) -> PeerView {
        let (h1, h2) = self.connections();
        PeerView {
            id: self.id.clone(),
            address: self.upstream.host().to_owned(),
            port: self.upstream.port(),
            h2_connected: h2 > 0,
            connections: h1 + h2,
        }
    }
}

/// Removes what [`Peer::mark`] added, from a request given back unsent.
pub fn unmark(headers: &mut HeaderMap) {
    headers.remove(ENDPOINT_HEADER);
    headers.remove(PROTOCOL_HEADER);
}

/// Whether `response` is a peer's refusal by intentions, which the caller
/// gets as it is.
pub fn is_intention_refusal<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get(REFUSED_HEADER)
        .is_some_and(|kind| kind == INTENTION_REFUSAL)
}

/// The protocol of the hop itself: HTTP/1.1 for an upgrade, HTTP/2 else.
fn hop_protocol(headers: &HeaderMap) -> Protocol {
    if headers.contains_key(UPGRADE) {
        Protocol::Http1
    } else {
        Protocol::Http2
    }
}

#[cfg(test)]
mod tests;
