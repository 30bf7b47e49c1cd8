//! `mesh.v1.Discovery`: every Watch stream gets a snapshot (version 1) of
//! the services it asked for, then a delta (version + 1) each time one of
//! them changes, carrying each changed service whole.
//!
//! The snapshot waits until every requested service had Consul's first
//! answer, at most [`FIRST_ANSWER_WAIT`]; then it carries what is known,
//! and services still unanswered follow as upserts. While nothing at all
//! has answered (Consul down since the bridge started) no snapshot is sent:
//! an empty one would empty the proxy's table. A service nobody registered
//! is in the snapshot with no endpoints (known, but nothing to call).
//!
//! A snapshot sent while Consul is unreachable says so (`stale`): it holds
//! the last trusted answers, of unknown age. No delta follows it; a fresh
//! snapshot does, as soon as Consul answers again.
//!
//! A stream of the bridge's own node also carries the node's config
//! version (`mesh/nodes/<node>/routes`, one blocking query while one of
//! its streams is open): in every snapshot, and in the next message after
//! it changes. The snapshot waits for it like for the services. Streams
//! naming another node get none: a bridge serves its own node's proxies,
//! and a query per foreign name would spend the agent's connections.
//!
//! The streams of the bridge's own node carry the mesh's intentions the
//! same way (`mesh/intentions`, one blocking query while one of them is
//! open): in every snapshot once they were read, and in the next message
//! after they change. The node's config and the intentions travel as one
//! piece: when either changes, both go again (the proxy applies the same
//! config version or intentions revision twice as once).
//!
//! Each change is worked out once for every stream: one hub records it,
//! encoded, in a shared ledger, and each stream only picks from the
//! ledger what it follows and changed since its last message (a stream
//! too far behind gets a fresh snapshot).
//!
//! - `ledger`: the shared services and change log, and each stream's cursor.
//! - `hub`: follows the watches for every stream and fills the ledger.
//! - `wire`: messages put together from shared, encoded pieces.
//! - `grpc`: the service on the wire.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use mesh_proto::v1::WatchRequest;
use mesh_runtime::{intentions::Action, shutdown::Shutdown};
use tokio::{sync::watch, time::Instant};
use tonic::{Request, Status};
use tracing::Instrument;

use crate::{
    metrics::BridgeMetrics,
    watch::{IntentionsEntry, IntentionsView, NodeConfigEntry, NodeConfigView, Watches},
};

mod grpc;
mod hub;
mod ledger;
mod wire;

use hub::{Hub, Registration};
use ledger::{Cursor, Follow, Update};

/// The longest a snapshot waits for Consul's first answers.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Most services one Watch may name.
pub const MAX_SERVICES: usize = 10_000;

/// The Discovery service (a tower service for tonic's router). Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct DiscoveryApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hub: Hub,
    /// The node whose streams carry its config; `None`: no stream does.
    node: Option<String>,
    /// The intentions' default while `mesh/intentions-default` is unset.
    default_intention: Action,
    watches: Watches,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
}

/// One stream's state between messages.
#[derive(Debug)]
struct Feed {
    hub: Hub,
    registration: Registration,
    cursor: Cursor,
    changes: watch::Receiver<u64>,
    /// The node's config; `None` for a stream of another node.
    config: Option<watch::Receiver<NodeConfigView>>,
    /// The mesh's intentions; `None` for a stream of another node.
    intentions: Option<watch::Receiver<IntentionsView>>,
    /// The node's config and intentions as last encoded together.
    node_piece: NodePiece,
    watches: Watches,
    reachability: watch::Receiver<bool>,
    shutdown: Shutdown,
    metrics: BridgeMetrics,
}

/// The `config` and `intentions` fields of a message, encoded together,
/// with what they were made from.
#[derive(Debug, Default)]
struct NodePiece {
    config: Option<Arc<NodeConfigEntry>>,
    intentions: Option<Arc<IntentionsEntry>>,
    bytes: Option<bytes::Bytes>,
}

/// Counts a stream in `mesh_bridge_subscribers` while it lives.
struct Counted(BridgeMetrics);

// === impl DiscoveryApi ===

impl DiscoveryApi {
    /// Streams from `watches` until `shutdown`, once [`DiscoveryApi::run`]
    /// runs.
    pub fn new(watches: Watches, metrics: BridgeMetrics, shutdown: Shutdown) -> Self {
        let inner = Inner {
            hub: Hub::new(watches.clone()),
            node: None,
            default_intention: Action::Deny,
            watches,
            metrics,
            shutdown,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The same service, with the streams of `node` carrying its config
    /// version.
    pub fn with_node_config(self, node: &str) -> Self {
        let i = &self.inner;
        let inner = Inner {
            hub: i.hub.clone(),
            node: Some(node.to_owned()),
            default_intention: i.default_intention,
            watches: i.watches.clone(),
            metrics: i.metrics.clone(),
            shutdown: i.shutdown.clone(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The same service, with `action` as the intentions' default while
    /// `mesh/intentions-default` is not set (deny unless told).
    pub fn with_default_intention(self, action: Action) -> Self {
        let i = &self.inner;
        let inner = Inner {
            hub: i.hub.clone(),
            node: i.node.clone(),
            default_intention: action,
            watches: i.watches.clone(),
            metrics: i.metrics.clone(),
            shutdown: i.shutdown.clone(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Takes every answer of the watches into the shared ledger and wakes
    /// the streams, until shutdown. The bridge runs it once, as a task.
    pub async fn run(&self) {
        self.inner.hub.run(self.inner.shutdown.clone()).await;
    }

    /// Opens a Watch stream.
    fn watch(&self, request: Request<WatchRequest>) -> Result<grpc::Messages, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let names = requested(req.services)?;
        let span = tracing::info_span!("subscriber", node = %req.node, ?peer);
        span.in_scope(|| {
            tracing::info!(services = names.len(), all = names.is_empty(), "subscribed")
        });
        let follow = match names.is_empty() {
            true => Follow::All,
            false => Follow::Named(names),
        };
        let inner = &self.inner;
        // Subscribed before registering, so that no change recorded after
        // the ledger is first read goes unnoticed.
        let changes = inner.hub.changes();
        let node = req.node.trim();
        let own = inner.node.as_deref() == Some(node);
        let config = own.then(|| inner.watches.node_config(node));
        let intentions = own.then(|| inner.watches.intentions(inner.default_intention));
        let feed = Feed {
            config,
            intentions,
            node_piece: NodePiece::default(),
            registration: inner.hub.register(follow),
            hub: inner.hub.clone(),
            cursor: Cursor::default(),
            changes,
            watches: inner.watches.clone(),
            reachability: inner.watches.reachability(),
            shutdown: inner.shutdown.clone(),
            metrics: inner.metrics.clone(),
        };
        let counted = Counted::new(inner.metrics.clone());
        // The stream owns the feed: when the proxy goes away the server
        // drops it, and with it what it followed.
        let messages = stream::unfold((feed, counted), move |(mut feed, counted)| {
            let span = span.clone();
            async move {
                let chunks = feed.next().await?;
                Some((chunks, (feed, counted)))
            }
            .instrument(span)
        });
        Ok(messages.boxed())
    }
}

/// The requested names: trimmed, without blanks or duplicates, sorted.
fn requested(services: Vec<String>) -> Result<Vec<String>, Status> {
    let mut names: Vec<String> = services
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.len() > MAX_SERVICES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_SERVICES} services per watch"
        )));
    }
    Ok(names)
}

// === impl Feed ===

impl Feed {
    /// The chunks of the next message; `None` ends the stream (shutdown).
    async fn next(&mut self) -> Option<Vec<bytes::Bytes>> {
        if !self.cursor.started() {
            self.first_answers().await?;
            self.take_config();
            let reachable = self.watches.reachable();
            let (cursor, follow) = (&mut self.cursor, self.registration.follow());
            let update = self
                .hub
                .read(|ledger| cursor.snapshot(ledger, follow, reachable));
            return Some(self.sent(update));
        }
        loop {
            self.changed().await?;
            self.take_config();
            let reachable = self.watches.reachable();
            let (cursor, follow) = (&mut self.cursor, self.registration.follow());
            if let Some(update) = self
                .hub
                .read(|ledger| cursor.next(ledger, follow, reachable))
            {
                return Some(self.sent(update));
            }
        }
    }

    /// Waits until every service answered, or the deadline passed and
    /// something did.
    async fn first_answers(&mut self) -> Option<()> {
        let deadline = Instant::now() + FIRST_ANSWER_WAIT;
        loop {
            let follow = self.registration.follow();
            let (all, any) = self
                .hub
                .read(|l| (l.all_answered(follow), l.any_answered(follow)));
            let all = all
                && self.config.as_ref().is_none_or(|c| c.borrow().answered())
                && self
                    .intentions
                    .as_ref()
                    .is_none_or(|c| c.borrow().answered());
            let late = Instant::now() >= deadline;
            if all || (late && any) {
                return Some(());
            }
            let timer = async move {
                match late {
                    false => tokio::time::sleep_until(deadline).await,
                    true => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.changed() => r?,
                _ = timer => {}
            }
        }
    }

    /// Hands the node's config and the intentions as they are now to the
    /// cursor.
    fn take_config(&mut self) {
        let config = self
            .config
            .as_mut()
            .and_then(|rx| rx.borrow_and_update().entry().cloned());
        let intentions = self
            .intentions
            .as_mut()
            .and_then(|rx| rx.borrow_and_update().entry().cloned());
        let piece = self.node_piece.update(config, intentions);
        self.cursor.set_config(piece);
    }

    fn sent(&self, update: Update) -> Vec<bytes::Bytes> {
        self.metrics.update_sent(update.snapshot);
        if update.config {
            tracing::info!(update = update.version, "node config and intentions sent");
        }
        if update.snapshot {
            tracing::info!(
                version = update.version,
                services = update.services,
                stale = update.stale,
                "snapshot sent"
            );
        }
        update.chunks
    }

    /// Waits for a change of the ledger or of the node's config, or of
    /// Consul's reachability while the last snapshot was stale; `None` on
    /// shutdown.
    async fn changed(&mut self) -> Option<()> {
        let stale = self.cursor.stale();
        tokio::select! {
            alive = self.changes.changed() => alive.is_ok().then_some(()),
            () = config_changed(&mut self.config) => Some(()),
            () = config_changed(&mut self.intentions) => Some(()),
            _ = self.reachability.changed(), if stale => Some(()),
            _ = self.shutdown.requested() => None,
        }
    }
}

/// Resolves when the node's config view (or the intentions) changes;
/// never without one.
async fn config_changed<T>(config: &mut Option<watch::Receiver<T>>) {
    let Some(rx) = config else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        // The loop outlives every receiver; no sender means shutdown.
        std::future::pending::<()>().await;
    }
}

// === impl NodePiece ===

impl NodePiece {
    /// The encoded fields for `config` and `intentions`, encoded anew only
    /// when one of them changed.
    fn update(
        &mut self,
        config: Option<Arc<NodeConfigEntry>>,
        intentions: Option<Arc<IntentionsEntry>>,
    ) -> Option<&bytes::Bytes> {
        if !same(&self.config, &config)
            || !same(&self.intentions, &intentions)
            || (self.bytes.is_none() && (config.is_some() || intentions.is_some()))
        {
            let pieces = config.iter().map(|c| &c.piece);
            let pieces = pieces.chain(intentions.iter().map(|i| &i.piece));
            let bytes = wire::concat(pieces);
            self.bytes = (!bytes.is_empty()).then_some(bytes);
            self.config = config;
            self.intentions = intentions;
        }
        self.bytes.as_ref()
    }
}

/// Whether `a` and `b` are the same entry (or both none).
fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

// === impl Counted ===

impl Counted {
    fn new(metrics: BridgeMetrics) -> Self {
        metrics.subscribers.increment(1.0);
        Self(metrics)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.subscribers.decrement(1.0);
        tracing::info!("subscriber gone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_and_the_intentions_go_as_one_piece_made_anew_on_a_change() {
        use mesh_runtime::intentions::Intentions;
        use prost::Message;

        let mut piece = NodePiece::default();
        assert_eq!(piece.update(None, None), None, "nothing to carry");
        let config = Arc::new(NodeConfigEntry::new(3, "x = 1\n".into()));
        let first = Arc::new(IntentionsEntry::new(Intentions::empty(Action::Deny), 7));
        let both = piece
            .update(Some(config.clone()), Some(first.clone()))
            .cloned()
            .expect("a piece");
        let decoded = mesh_proto::v1::RouteUpdate::decode(both.as_ref()).unwrap();
        assert_eq!(decoded.config.as_ref(), Some(&config.config));
        assert_eq!(decoded.intentions.as_ref().map(|i| i.revision), Some(7));
        let again = piece.update(Some(config.clone()), Some(first)).cloned();
        assert_eq!(again.as_ref(), Some(&both), "unchanged entries, same piece");

        let second = Arc::new(IntentionsEntry::new(Intentions::empty(Action::Allow), 8));
        let changed = piece.update(Some(config), Some(second)).cloned().unwrap();
        let decoded = mesh_proto::v1::RouteUpdate::decode(changed.as_ref()).unwrap();
        assert_eq!(
            decoded.config.map(|c| c.version),
            Some(3),
            "the config goes again"
        );
        assert_eq!(decoded.intentions.map(|i| i.revision), Some(8));
        let alone = piece.update(None, None);
        assert_eq!(alone, None);
    }

    #[test]
    fn requested_names_are_cleaned() {
        let names = requested(vec![" web".into(), "".into(), "api".into(), "web".into()]).unwrap();
        assert_eq!(names, vec!["api", "web"]);
        let too_many = (0..=MAX_SERVICES).map(|i| i.to_string()).collect();
        assert_eq!(
            requested(too_many).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
