//! Keeps the dashboard's [`Snapshot`] fresh while someone watches it.
//!
//! One [`Publisher`] per replica, whatever the number of open pages: it
//! reads the state, publishes it on a watch channel when it changed, and
//! waits for the next change. [`ConsulSource`] wakes on Consul's blocking
//! queries (catalog nodes, catalog services, and the KV prefixes in
//! [`WATCHED_PREFIXES`]: routes, proxy reports, rollouts, deployments,
//! mesh-monitor's open alerts and the intentions)
//! and on a change of the leader lock at once; a health check that flips
//! need not move any of those indexes, so the state is also read again
//! every [`REFRESH`]. What the nodes' deployers run is asked of each
//! deployer, so it is asked again only when a deployment moved or
//! [`REFRESH`] has passed, and not at all before a first deployment.
//! mesh-monitor's alerts are asked of the monitor on every read, alongside
//! Consul; a monitor that does not answer is shown as such, and does not
//! fail the read.
//! While no page is open nothing is read.

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use consul_client::{Client, QueryOptions};
use futures::future::BoxFuture;
use mesh_runtime::shutdown::Shutdown;
use tokio::sync::{Notify, watch};

use super::state::{Reading, Snapshot, assemble};
use crate::{
    control::{Control, DeploymentView, NodeDeploymentsView, NodeInfo, NodeRoutes, VersionSummary},
    error::ControlError,
    leader::LeaderState,
    model::{now_ms, rfc3339},
};

/// The longest a change no blocking query sees (a health check) takes to
/// show.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The least time between two reads: a burst of changes is read once.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How long to wait after Consul failed to answer a blocking query.
pub const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The KV prefixes whose changes wake the publisher at once: each node's
/// routes, what each node's proxy reported, the rollouts and the
/// deployments (the leader writes a rollout's or a deployment's record at
/// each of its steps, so its progress shows as it happens), and the alerts
/// mesh-monitor keeps open (it stores one once it lists it, so the read
/// that follows sees it), and the intentions with their default (one
/// prefix for both). Not the artifacts' prefix: their bytes are large and
/// never change.
pub const WATCHED_PREFIXES: [&str; 6] = [
    "mesh/nodes/",
    "mesh/status/",
    "mesh/rollouts/",
    "mesh/deployments/",
    "mesh/monitor/alerts/",
    crate::store::intentions::INTENTIONS_ROOT,
];

/// Blocking queries held while a page is open: catalog nodes, catalog
/// services, one per watched prefix.
const WATCHES: usize = 2 + WATCHED_PREFIXES.len();

/// Where the state comes from, and when it may have changed.
pub trait Source: Send {
    /// Reads everything the dashboard shows.
    fn read(&mut self) -> impl Future<Output = Result<Reading, ControlError>> + Send;

    /// Resolves when the state may have changed (or after a while anyway).
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
}

/// The sending side of the state: the newest snapshot, `None` while nobody
/// watches (the last one read may be stale by then).
#[derive(Debug)]
pub struct Publisher {
    state: Arc<watch::Sender<Option<Arc<Snapshot>>>>,
    wake: Arc<Notify>,
}

/// What the SSE handler subscribes with.
#[derive(Clone, Debug)]
pub struct Subscriptions {
    state: Arc<watch::Sender<Option<Arc<Snapshot>>>>,
    wake: Arc<Notify>,
}

/// [`Source`] over the control plane's calls and Consul's blocking queries.
#[derive(Debug)]
pub struct ConsulSource {
    control: Control,
    consul: Client,
    leader: watch::Receiver<LeaderState>,
    /// Each node's routes and versions, by the routes version they were
    /// read at: versions are immutable, so they are read again only when
    /// the node's version moves.
    history: BTreeMap<String, (u64, NodeRoutes, Vec<VersionSummary>)>,
    /// What the deployers said last, when, and at which deployments.
    deployers: Option<DeployersRead>,
    indexes: [u64; WATCHES],
}

/// One asking of every node's deployer.
#[derive(Debug)]
struct DeployersRead {
    at: Instant,
    /// Each deployment's id and last change, when they were asked.
    deployments: Vec<(u64, String)>,
    nodes: Vec<NodeDeploymentsView>,
}

// === impl Publisher ===

impl Publisher {
    /// A publisher and the handle pages subscribe with.
    pub fn new() -> (Self, Subscriptions) {
        let (state, _) = watch::channel(None);
        let state = Arc::new(state);
        let wake = Arc::new(Notify::new());
        let subscriptions = Subscriptions {
            state: state.clone(),
            wake: wake.clone(),
        };
        (Self { state, wake }, subscriptions)
    }

    /// Publishes the state from `source` while someone watches, until
    /// `shutdown`.
    pub async fn run<S: Source>(self, mut source: S, mut shutdown: Shutdown) {
        let mut last: Option<Snapshot> = None;
        loop {
            if self.state.receiver_count() == 0 {
                // Nobody watches: what was read goes stale from now on.
                self.state.send_replace(None);
                last = None;
                tokio::select! {
                    _ = shutdown.requested() => break,
                    _ = self.wake.notified() => continue,
                }
            }
            let started = tokio::time::Instant::now();
            let read = tokio::select! {
                _ = shutdown.requested() => break,
                read = source.read() => read,
            };
            let next = match read {
                Ok(reading) => assemble(reading, rfc3339(now_ms())),
                Err(e) => {
                    tracing::debug!(error = %e, "dashboard state not read");
                    let good = last.clone().unwrap_or_default();
                    good.with_error(e.to_string(), rfc3339(now_ms()))
                }
            };
            self.publish(&mut last, next);
            // A page that opens now gets the state already sent: no need
            // to read it again.
            tokio::select! {
                _ = shutdown.requested() => break,
                _ = source.changed() => {}
            }
            tokio::select! {
                _ = shutdown.requested() => break,
                _ = tokio::time::sleep_until(started + MIN_INTERVAL) => {}
            }
        }
        self.state.send_replace(None);
    }

    /// Sends `next` if it shows something else than `last`, or if nothing
    /// was sent since the pages went away.
    fn publish(&self, last: &mut Option<Snapshot>, next: Snapshot) {
        let unchanged =
            last.as_ref().is_some_and(|l| l.same_as(&next)) && self.state.borrow().is_some();
        if unchanged {
            return;
        }
        self.state.send_replace(Some(Arc::new(next.clone())));
        *last = Some(next);
    }
}

// === impl Subscriptions ===

impl Subscriptions {
    /// A receiver of the state; wakes the publisher if it was idle. The
    /// current state, if any, counts as unseen.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let mut rx = self.state.subscribe();
        rx.mark_changed();
        self.wake.notify_one();
        rx
    }

    /// The newest state; `None` while nobody watches.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.state.borrow().clone()
    }
}

// === impl ConsulSource ===

impl ConsulSource {
    /// Reads through `control`, wakes on `consul`'s indexes and on `leader`.
    pub fn new(control: Control, consul: Client, leader: watch::Receiver<LeaderState>) -> Self {
        Self {
            control,
            consul,
            leader,
            history: BTreeMap::new(),
            deployers: None,
            indexes: [0; WATCHES],
        }
    }

    /// Routes and versions of every node with routes, read again only for
    /// nodes whose version moved.
    async fn histories(
        &mut self,
        nodes: &[NodeInfo],
    ) -> Result<BTreeMap<String, (NodeRoutes, Vec<VersionSummary>)>, ControlError> {
        self.history.retain(|name, (seen, ..)| {
            nodes
                .iter()
                .any(|n| n.name == *name && n.routes_version == *seen && *seen > 0)
        });
        for node in nodes.iter().filter(|n| n.routes_version > 0) {
            if self.history.contains_key(&node.name) {
                continue;
            }
            let (routes, versions) = tokio::try_join!(
                self.control.routes(&node.name),
                self.control.versions(&node.name),
            )?;
            self.history
                .insert(node.name.clone(), (node.routes_version, routes, versions));
        }
        Ok(self
            .history
            .iter()
            .map(|(name, (_, routes, versions))| (name.clone(), (routes.clone(), versions.clone())))
            .collect())
    }

    /// What each node's deployer runs and keeps: asked again when a
    /// deployment moved or [`REFRESH`] has passed (each asking is a call
    /// to every node), never before a first deployment (a mesh that does
    /// not deploy through mesh-control may run no deployer).
    async fn deployers(
        &mut self,
        deployments: &[DeploymentView],
    ) -> Result<Vec<NodeDeploymentsView>, ControlError> {
        if deployments.is_empty() {
            self.deployers = None;
            return Ok(Vec::new());
        }
        let moved: Vec<(u64, String)> = deployments
            .iter()
            .map(|d| (d.id, d.updated_at.clone()))
            .collect();
        if let Some(last) = &self.deployers
            && last.deployments == moved
            && last.at.elapsed() < REFRESH
        {
            return Ok(last.nodes.clone());
        }
        let nodes = self.control.node_deployments("").await?;
        self.deployers = Some(DeployersRead {
            at: Instant::now(),
            deployments: moved,
            nodes: nodes.clone(),
        });
        Ok(nodes)
    }
}

impl Source for ConsulSource {
    async fn read(&mut self) -> Result<Reading, ControlError> {
        let status = self.control.status();
        let (consul, alerts) = tokio::join!(
            async {
                tokio::try_join!(
                    self.control.nodes(),
                    self.control.services(),
                    self.control.rollouts(),
                    self.control.deployments(""),
                    self.control.intentions(),
                )
            },
            self.control.alerts(),
        );
        let (nodes, services, rollouts, deployments, intentions) = consul?;
        let routes = self.histories(&nodes).await?;
        let deployers = self.deployers(&deployments).await?;
        Ok(Reading {
            status,
            nodes,
            services,
            routes,
            rollouts,
            deployments,
            deployers,
            alerts,
            intentions,
        })
    }

    async fn changed(&mut self) {
        if self.indexes.contains(&0) {
            // Without an index a query answers at once: learn them first.
            // A change between the read and here shows after REFRESH.
            self.learn_indexes().await;
        }
        let queries = watches(&self.consul, self.indexes);
        let (answer, which, _) = tokio::select! {
            done = futures::future::select_all(queries) => done,
            changed = self.leader.changed() => {
                if changed.is_err() {
                    // The leader lock's task ended: only the refresh is left.
                    tokio::time::sleep(REFRESH).await;
                }
                return;
            }
        };
        match answer {
            // An index that went backwards (Consul's state was restored)
            // starts over.
            Ok(index) => {
                let old = self.indexes[which];
                self.indexes[which] = if index < old { 0 } else { index };
            }
            Err(e) => {
                tracing::debug!(error = %e, "dashboard watch failed");
                self.indexes[which] = 0;
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

impl ConsulSource {
    /// The current index of each watched query (0 where Consul failed).
    async fn learn_indexes(&mut self) {
        let answers = futures::future::join_all(watches(&self.consul, [0; WATCHES])).await;
        for (index, answer) in self.indexes.iter_mut().zip(answers) {
            *index = answer.unwrap_or(0);
        }
        if self.indexes.contains(&0) {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
}

/// The watched queries, each past its index in `indexes` (at once for 0),
/// each answering the index it read at.
fn watches(
    consul: &Client,
    indexes: [u64; WATCHES],
) -> Vec<BoxFuture<'_, Result<u64, consul_client::Error>>> {
    let mut queries: Vec<BoxFuture<'_, Result<u64, consul_client::Error>>> = vec![
        Box::pin(async move {
            let read = consul.catalog_nodes(blocking(indexes[0])).await?;
            Ok(read.index)
        }),
        Box::pin(async move {
            let read = consul.catalog_services(blocking(indexes[1])).await?;
            Ok(read.index)
        }),
    ];
    for (k, prefix) in WATCHED_PREFIXES.into_iter().enumerate() {
        queries.push(Box::pin(async move {
            let read = consul.kv_list(prefix, blocking(indexes[2 + k])).await?;
            Ok(read.index)
        }));
    }
    queries
}

/// A blocking query past `index` that returns after [`REFRESH`] at the
/// latest (at once with index 0).
fn blocking(index: u64) -> QueryOptions {
    QueryOptions::blocking(index, REFRESH)
}
