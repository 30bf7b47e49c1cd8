//! The routing table: an immutable snapshot of services and their healthy
//! endpoints, swapped whole and atomically ([`Routes`], an `ArcSwap`) so the
//! request path reads it without a lock.
//!
//! A new table is built from the current one: a service whose endpoints did
//! not change in a delta keeps its `Arc` (and round-robin position), an
//! endpoint that stays at the same address keeps its [`Upstream`] (idle
//! connections and in-flight count) and its [`EndpointState`] (latency
//! estimate, ejection), and a service that stays keeps its
//! [`ServiceState`] (retry budget, limit counters).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use mesh_proto::v1 as pb;
use mesh_runtime::admin::Admin;
use tokio::sync::watch;

use crate::{
    balance::{EndpointState, Ring},
    metrics::{ProxyMetrics, ServiceMetrics},
    policy::ServiceState,
    protocol::Protocol,
    upstream::Upstream,
};

/// Longest service name a table holds (DNS label length).
pub const MAX_NAME: usize = 63;

/// Where the current table came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Nothing loaded yet.
    None,
    /// The dump file written by an earlier run.
    Dump,
    /// The bridge's discovery stream.
    Live,
}

/// An immutable routing table.
#[derive(Debug)]
pub struct RoutingTable {
    services: HashMap<Box<str>, Arc<Service>>,
    /// Where it came from.
    pub source: Source,
    /// The bridge's version of the update it reflects (or the dump's).
    pub version: u64,
    /// When its data was produced (for a dump: when the dump was written),
    /// in Unix milliseconds.
    pub updated_at_unix_ms: u64,
}

/// A service and its healthy endpoints.
#[derive(Debug)]
pub struct Service {
    name: Arc<str>,
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
    ring: OnceLock<Ring>,
    /// The service's metric handles.
    pub metrics: Arc<ServiceMetrics>,
    /// Its retry budget and limit counters, shared across tables.
    pub state: Arc<ServiceState>,
}

/// One healthy instance of a service.
#[derive(Debug)]
pub struct Endpoint {
    /// Instance ID.
    pub id: String,
    /// Consul node it runs on.
    pub node: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Meta.
    pub meta: BTreeMap<String, String>,
    /// The protocol it declares (tags `h2`/`grpc`, `Meta.protocol`).
    pub protocol: Protocol,
    /// Its connection state, shared across tables.
    pub upstream: Arc<Upstream>,
    /// Its latency estimate and failure record, shared across tables.
    pub state: Arc<EndpointState>,
}

/// The current table, its swaps, and who is told about them.
#[derive(Debug)]
pub struct Routes {
    current: ArcSwap<RoutingTable>,
    changes: watch::Sender<Arc<RoutingTable>>,
    admin: Admin,
}

/// Builds tables that share state with the current one.
pub struct Builder<'a> {
    metrics: &'a ProxyMetrics,
    upstreams: HashMap<(&'a str, u16), &'a Endpoint>,
    states: HashMap<&'a str, &'a Arc<ServiceState>>,
}

// === impl RoutingTable ===

impl RoutingTable {
    /// The empty table a proxy starts with.
    pub fn empty() -> Self {
        Self {
            services: HashMap::new(),
            source: Source::None,
            version: 0,
            updated_at_unix_ms: 0,
        }
    }

    /// The service named `name`, ignoring ASCII case (tables store
    /// lowercase names). Allocation-free.
    pub fn get(&self, name: &str) -> Option<&Arc<Service>> {
        if !name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.services.get(name);
        }
        let mut buf = [0u8; MAX_NAME];
        let lower = buf.get_mut(..name.len())?;
        lower.copy_from_slice(name.as_bytes());
        lower.make_ascii_lowercase();
        self.services.get(std::str::from_utf8(lower).ok()?)
    }

    /// Services by name, sorted.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        let mut all: Vec<_> = self.services.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
    }

    /// Every service's endpoints, each mapped by `f`, keyed by service
    /// name: what `/routes` and the dump file show of a table.
    pub fn map_endpoints<T>(
        &self,
        mut f: impl FnMut(&Endpoint) -> T,
    ) -> std::collections::BTreeMap<String, Vec<T>> {
        self.services
            .values()
            .map(|s| {
                (
                    s.name().to_string(),
                    s.endpoints().iter().map(&mut f).collect(),
                )
            })
            .collect()
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether it holds no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Total endpoints over all services.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
}

// === impl Service ===

impl Service {
    /// The service's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its endpoints.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The round-robin cursor's next position.
    pub fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Its consistent-hash ring, built on first use.
    pub fn ring(&self) -> &Ring {
        self.ring.get_or_init(|| {
            Ring::new(
                self.endpoints
                    .iter()
                    .map(|e| (e.upstream.host(), e.upstream.port())),
            )
        })
    }
}

// === impl Routes ===

impl Routes {
    /// An empty table; `admin` is marked ready once a table is loaded.
    pub fn new(admin: Admin) -> Self {
        let empty = Arc::new(RoutingTable::empty());
        let (changes, _) = watch::channel(empty.clone());
        Self {
            current: ArcSwap::new(empty),
            changes,
            admin,
        }
    }

    /// The current table. Lock-free; keep the guard short (no awaits).
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.current.load()
    }

    /// The current table as an `Arc`.
    pub fn load_full(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Makes `table` current and tells the dump writer.
    pub fn publish(&self, table: RoutingTable) {
        let table = Arc::new(table);
        self.current.store(table.clone());
        if table.source != Source::None {
            self.admin.set_ready(true);
        }
        self.changes.send_replace(table);
    }

    /// Every table published from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.changes.subscribe()
    }
}

// === impl Builder ===

impl<'a> Builder<'a> {
    /// A builder that reuses the endpoints of `current`.
    pub fn new(current: &'a RoutingTable, metrics: &'a ProxyMetrics) -> Self {
        let upstreams = current
            .services
            .values()
            .flat_map(|s| s.endpoints.iter())
            .map(|e| ((e.upstream.host(), e.upstream.port()), e))
            .collect();
        let states = current
            .services
            .values()
            .map(|s| (&*s.name, &s.state))
            .collect();
        Self {
            metrics,
            upstreams,
            states,
        }
    }

    /// A table of exactly `services` (a snapshot, or a dump).
    pub fn snapshot(
        &self,
        services: &[pb::ServiceEndpoints],
        source: Source,
        version: u64,
        updated_at_unix_ms: u64,
    ) -> RoutingTable {
        let services = services
            .iter()
            .filter_map(|s| self.service(s))
            .map(|s| (s.name.as_ref().into(), Arc::new(s)))
            .collect();
        let table = RoutingTable {
            services,
            source,
            version,
            updated_at_unix_ms,
        };
        self.set_gauges(&table);
        table
    }

    /// `current` with `delta` applied; untouched services keep their `Arc`.
    pub fn delta(&self, current: &RoutingTable, delta: &pb::Delta, version: u64) -> RoutingTable {
        let mut services = current.services.clone();
        for name in &delta.removed {
            if let Some(gone) = services.remove(name.to_ascii_lowercase().as_str()) {
                gone.metrics.endpoints.set(0.0);
            }
        }
        for s in &delta.upserted {
            if let Some(s) = self.service(s) {
                services.insert(s.name.as_ref().into(), Arc::new(s));
            }
        }
        let table = RoutingTable {
            services,
            source: Source::Live,
            version,
            updated_at_unix_ms: now_unix_ms(),
        };
        self.set_gauges(&table);
        table
    }

    fn service(&self, s: &pb::ServiceEndpoints) -> Option<Service> {
        let name = s.name.to_ascii_lowercase();
        if name.is_empty() || name.len() > MAX_NAME {
            tracing::warn!(service = %s.name, "service name unusable; skipped");
            return None;
        }
        let endpoints = s
            .endpoints
            .iter()
            .filter_map(|e| self.endpoint(&name, e))
            .collect();
        Some(Service {
            metrics: self.metrics.service(&name),
            state: self
                .states
                .get(name.as_str())
                .map_or_else(Default::default, |s| Arc::clone(s)),
            ring: OnceLock::new(),
            name: name.into(),
            endpoints,
            // Start each new service at a random position so that many
            // proxies do not all hit its first instance first.
            next: AtomicUsize::new(fastrand::usize(..1024)),
        })
    }

    fn endpoint(&self, service: &str, e: &pb::Endpoint) -> Option<Endpoint> {
        let port = u16::try_from(e.port).ok().filter(|p| *p != 0);
        let (Some(port), false) = (port, e.address.is_empty()) else {
            tracing::warn!(service, id = %e.id, address = %e.address, port = e.port, "endpoint without a usable address; skipped");
            return None;
        };
        let (upstream, state) = match self.upstreams.get(&(e.address.as_str(), port)) {
            Some(e) => (Arc::clone(&e.upstream), Arc::clone(&e.state)),
            None => (Arc::new(Upstream::new(&e.address, port)), Arc::default()),
        };
        let meta = e.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Some(Endpoint {
            id: e.id.clone(),
            node: e.node.clone(),
            protocol: Protocol::of_instance(&e.tags, &meta),
            tags: e.tags.clone(),
            meta,
            upstream,
            state,
        })
    }

    fn set_gauges(&self, table: &RoutingTable) {
        for s in table.services.values() {
            s.metrics.endpoints.set(s.endpoints.len() as f64);
        }
    }
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use mesh_runtime::metrics::Registry;

    use super::*;

    pub(crate) fn ep(id: &str, port: u32) -> pb::Endpoint {
        pb::Endpoint {
            id: id.into(),
            address: "127.0.0.1".into(),
            port,
            node: "n1".into(),
            ..Default::default()
        }
    }

    fn svc(name: &str, eps: Vec<pb::Endpoint>) -> pb::ServiceEndpoints {
        pb::ServiceEndpoints {
            name: name.into(),
            endpoints: eps,
        }
    }

    #[test]
    fn endpoints_that_stay_keep_their_upstream() {
        let metrics = ProxyMetrics::new(&Registry::new());
        let empty = RoutingTable::empty();
        let t1 = Builder::new(&empty, &metrics).snapshot(
            &[svc("orders", vec![ep("a", 1), ep("b", 2)])],
            Source::Live,
            1,
            0,
        );
        let a1 = t1.get("orders").unwrap().endpoints()[0].upstream.clone();
        let a1_state = t1.get("orders").unwrap().endpoints()[0].state.clone();
        let orders_state = t1.get("orders").unwrap().state.clone();
        let t2 = Builder::new(&t1, &metrics).snapshot(
            &[svc("orders", vec![ep("a", 1), ep("c", 3)])],
            Source::Live,
            2,
            0,
        );
        let orders = t2.get("orders").unwrap();
        assert!(Arc::ptr_eq(&a1, &orders.endpoints()[0].upstream));
        // Ejections and latency estimates survive the swap too, and the
        // service keeps its retry budget and limit counters.
        assert!(Arc::ptr_eq(&a1_state, &orders.endpoints()[0].state));
        assert!(Arc::ptr_eq(&orders_state, &orders.state));
        assert_eq!(orders.endpoints()[1].upstream.port(), 3);
    }

    #[test]
    fn delta_upserts_and_removes_and_keeps_the_rest() {
        let metrics = ProxyMetrics::new(&Registry::new());
        let empty = RoutingTable::empty();
        let t1 = Builder::new(&empty, &metrics).snapshot(
            &[
                svc("orders", vec![ep("a", 1)]),
                svc("billing", vec![ep("b", 2)]),
            ],
            Source::Live,
            1,
            0,
        );
        let delta = pb::Delta {
            upserted: vec![svc("users", vec![ep("u", 4)])],
            removed: vec!["billing".into()],
        };
        let t2 = Builder::new(&t1, &metrics).delta(&t1, &delta, 2);
        assert!(t2.get("billing").is_none());
        assert!(t2.get("users").is_some());
        assert!(Arc::ptr_eq(
            t1.get("orders").unwrap(),
            t2.get("orders").unwrap()
        ));
        assert_eq!(t2.version, 2);
    }

    #[test]
    fn lookup_ignores_case_and_unusable_endpoints_are_skipped() {
        let metrics = ProxyMetrics::new(&Registry::new());
        let empty = RoutingTable::empty();
        let t = Builder::new(&empty, &metrics).snapshot(
            &[svc("Orders", vec![ep("a", 1), ep("zero", 0)])],
            Source::Live,
            1,
            0,
        );
        assert_eq!(t.get("ORDERS").unwrap().endpoints().len(), 1);
        assert!(t.get(&"x".repeat(100)).is_none());
    }
}
