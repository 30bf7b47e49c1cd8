//! Consul watches shared by every subscriber: one blocking-query loop per
//! watched service (`/v1/health/service/<name>?passing`), one on the
//! catalog (`/v1/catalog/services`), one per subscribed node on its
//! config version (`mesh/nodes/<node>/routes`) and one on the intentions
//! (`mesh/intentions`), each publishing its latest trusted answer on a
//! `tokio::sync::watch` channel.
//!
//! [`Watches::service`] starts a service's loop on its first subscriber and
//! the loop stops itself when its last receiver is dropped. Every applied
//! answer also bumps one change counter ([`Watches::changes`]), so that a
//! subscriber following many services waits on one channel.
//!
//! - `topics`: the map of shared channels and the last-receiver rule.
//! - `blocking`: Consul's blocking-query rules and the loop that runs them.
//! - `trust`: which answers may replace what is known.
//! - `service` / `catalog` / `node_config` / `intentions`: the kinds of
//!   watched data.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use consul_client::Client;
use mesh_proto::v1::Endpoint;
use mesh_runtime::shutdown::Shutdown;
use tokio::{sync::watch, task::JoinSet};
use tracing::Instrument;

use crate::metrics::BridgeMetrics;

mod blocking;
mod catalog;
mod intentions;
mod node_config;
mod service;
mod topics;
mod trust;

use blocking::Source;
use topics::Topics;

pub use intentions::{IntentionsEntry, IntentionsView};
pub use node_config::{NodeConfigEntry, NodeConfigView};

/// A service's passing endpoints, sorted by node then instance ID.
pub type Endpoints = Arc<[Endpoint]>;

/// What is known of a service: `None` until Consul's first trusted answer.
pub type ServiceView = Option<Endpoints>;

/// The catalog's service names: `None` until Consul's first trusted answer.
pub type CatalogView = Option<Arc<BTreeSet<String>>>;

/// How the watches read Consul.
#[derive(Clone, Copy, Debug)]
pub struct Reads {
    /// How long Consul may hold a blocking query.
    pub wait: Duration,
    /// Read from any server (`?stale`) rather than the leader.
    pub stale: bool,
}

/// The shared watches. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Watches {
    hub: Arc<Hub>,
}

/// What every watch loop shares.
pub(crate) struct Hub {
    client: Client,
    reads: Reads,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
    services: Topics<ServiceView>,
    catalog: Topics<CatalogView>,
    configs: Topics<NodeConfigView>,
    intentions: Topics<IntentionsView>,
    changes: watch::Sender<u64>,
    /// Whether the last Consul read of any loop got an answer.
    reachable: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

// === impl Watches ===

impl Watches {
    /// Watches through `client` with blocking queries read as `reads`
    /// says, until `shutdown`.
    pub fn new(client: Client, reads: Reads, metrics: BridgeMetrics, shutdown: Shutdown) -> Self {
        let hub = Hub {
            client,
            reads,
            metrics,
            shutdown,
            services: Topics::default(),
            catalog: Topics::default(),
            configs: Topics::default(),
            intentions: Topics::default(),
            changes: watch::channel(0).0,
            reachable: watch::channel(false).0,
            tasks: Mutex::new(JoinSet::new()),
        };
        Self { hub: Arc::new(hub) }
    }

    /// Subscribes to the passing endpoints of `name`, starting its loop if
    /// nobody watches it yet.
    pub fn service(&self, name: &str) -> watch::Receiver<ServiceView> {
        let (rx, new) = self.hub.services.subscribe(name);
        if let Some(tx) = new {
            self.spawn(service::ServiceSource::new(name), tx);
        }
        rx
    }

    /// Subscribes to the catalog's service names.
    pub fn catalog(&self) -> watch::Receiver<CatalogView> {
        let (rx, new) = self.hub.catalog.subscribe("");
        if let Some(tx) = new {
            self.spawn(catalog::CatalogSource, tx);
        }
        rx
    }

    /// Subscribes to `node`'s config version, starting its loop if no
    /// stream of the node watches it yet; the loop stops with the last
    /// receiver.
    pub fn node_config(&self, node: &str) -> watch::Receiver<NodeConfigView> {
        let (rx, new) = self.hub.configs.subscribe(node);
        if let Some(tx) = new {
            self.spawn(node_config::NodeConfigSource::new(node), tx);
        }
        rx
    }

    /// Subscribes to the mesh's intentions, with `default` while
    /// `mesh/intentions-default` is not set, starting their loop if no
    /// stream watches them yet; the loop stops with the last receiver.
    pub fn intentions(
        &self,
        default: mesh_runtime::intentions::Action,
    ) -> watch::Receiver<IntentionsView> {
        let (rx, new) = self.hub.intentions.subscribe(intentions::INTENTIONS_ROOT);
        if let Some(tx) = new {
            self.spawn(intentions::IntentionsSource::new(default), tx);
        }
        rx
    }

    /// A counter bumped after every applied answer of any watch. Subscribe
    /// to it before reading the views, so that no change is missed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.hub.changes.subscribe()
    }

    /// Whether Consul answered the last read of any loop: while it does
    /// not, every view is the last trusted answer, of unknown age.
    pub fn reachable(&self) -> bool {
        *self.hub.reachable.borrow()
    }

    /// Follows [`Watches::reachable`]: changes each time Consul goes away
    /// or comes back.
    pub fn reachability(&self) -> watch::Receiver<bool> {
        self.hub.reachable.subscribe()
    }

    /// Number of services with a running loop.
    pub fn active(&self) -> usize {
        self.hub.services.len()
    }

    /// Waits for every loop to end (they end on shutdown).
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *lock(&self.hub.tasks));
        tasks.join_all().await;
    }

    fn spawn<S: Source>(&self, source: S, tx: watch::Sender<S::View>) {
        let span = tracing::info_span!("watch", kind = S::KIND, name = %source.key());
        let hub = self.hub.clone();
        let gauge = S::COUNTED.then(|| hub.metrics.watches.clone());
        let task = async move {
            if let Some(g) = &gauge {
                g.increment(1.0);
            }
            blocking::run(&source, tx, &hub).await;
            if let Some(g) = &gauge {
                g.decrement(1.0);
            }
        };
        let mut tasks = lock(&self.hub.tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task.instrument(span));
    }
}

// === impl Hub ===

impl Hub {
    /// Tells every subscriber that some view changed.
    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records whether a Consul read got an answer. A change wakes the
    /// subscribers following [`Watches::reachability`] (a stale stream gets
    /// a fresh snapshot) and, when Consul is back, the loops waiting out a
    /// backoff.
    fn set_reachable(&self, reachable: bool) {
        if self
            .reachable
            .send_if_modified(|r| std::mem::replace(r, reachable) != reachable)
        {
            self.metrics
                .consul_reachable
                .set(if reachable { 1.0 } else { 0.0 });
        }
    }

    /// Resolves the next time Consul turns reachable after being away.
    async fn recovered(&self) {
        let mut rx = self.reachable.subscribe();
        rx.borrow_and_update();
        while rx.changed().await.is_ok() {
            if *rx.borrow_and_update() {
                return;
            }
        }
        std::future::pending().await
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("reads", &self.reads)
            .field("services", &self.services.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
