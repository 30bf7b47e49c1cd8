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
//! - `subscriber`: the watches one stream follows.
//! - `diff`: snapshot and delta computation (pure).

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt, stream};
use mesh_proto::v1::{RouteUpdate, WatchRequest, discovery_server::Discovery, route_update::Kind};
use mesh_runtime::shutdown::Shutdown;
use tokio::{sync::watch, time::Instant};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{metrics::BridgeMetrics, watch::Watches};

mod diff;
mod subscriber;

use diff::State;
use subscriber::Subscriber;

/// The longest a snapshot waits for Consul's first answers.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Most services one Watch may name.
pub const MAX_SERVICES: usize = 10_000;

/// The Discovery service.
#[derive(Clone, Debug)]
pub struct DiscoveryApi {
    watches: Watches,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
}

/// The stream a Watch answers with.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<RouteUpdate, Status>> + Send>>;

/// One stream's state between messages.
#[derive(Debug)]
struct Feed {
    sub: Subscriber,
    watches: Watches,
    reachability: watch::Receiver<bool>,
    version: u64,
    sent: State,
    /// The last snapshot was sent while Consul was unreachable.
    stale: bool,
    shutdown: Shutdown,
    metrics: BridgeMetrics,
}

/// Counts a stream in `mesh_bridge_subscribers` while it lives.
struct Counted(BridgeMetrics);

// === impl DiscoveryApi ===

impl DiscoveryApi {
    /// Streams from `watches` until `shutdown`.
    pub fn new(watches: Watches, metrics: BridgeMetrics, shutdown: Shutdown) -> Self {
        Self {
            watches,
            metrics,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryApi {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let names = requested(req.services)?;
        let span = tracing::info_span!("subscriber", node = %req.node, ?peer);
        span.in_scope(|| {
            tracing::info!(services = names.len(), all = names.is_empty(), "subscribed")
        });
        let feed = Feed {
            sub: Subscriber::new(&self.watches, &names),
            watches: self.watches.clone(),
            reachability: self.watches.reachability(),
            version: 0,
            sent: State::new(),
            stale: false,
            shutdown: self.shutdown.clone(),
            metrics: self.metrics.clone(),
        };
        let counted = Counted::new(self.metrics.clone());
        // The stream owns the feed: when the proxy goes away tonic drops it,
        // and with it the watches it held.
        let updates = stream::unfold((feed, counted), move |(mut feed, counted)| {
            let span = span.clone();
            async move {
                let update = feed.next().await?;
                Some((Ok(update), (feed, counted)))
            }
            .instrument(span)
        });
        Ok(Response::new(updates.boxed()))
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
    /// The next message; `None` ends the stream (shutdown).
    async fn next(&mut self) -> Option<RouteUpdate> {
        if self.version == 0 {
            self.first_answers().await?;
            return Some(self.snapshot());
        }
        loop {
            self.changed().await?;
            self.sub.follow_catalog();
            if self.stale {
                // What the proxy got was of unknown age: once Consul
                // answers, it gets everything afresh, never a delta.
                if self.watches.reachable() {
                    return Some(self.snapshot());
                }
                continue;
            }
            let now = self.sub.state();
            if let Some(delta) = diff::delta(&self.sent, &now) {
                self.sent = now;
                return Some(self.message(Kind::Delta(delta)));
            }
        }
    }

    /// Waits until every service answered, or the deadline passed and
    /// something did.
    async fn first_answers(&mut self) -> Option<()> {
        let deadline = Instant::now() + FIRST_ANSWER_WAIT;
        loop {
            self.sub.follow_catalog();
            let late = Instant::now() >= deadline;
            if self.sub.all_answered() || (late && self.sub.any_answered()) {
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

    fn snapshot(&mut self) -> RouteUpdate {
        self.sent = self.sub.state();
        self.stale = !self.watches.reachable();
        let snapshot = diff::snapshot(&self.sent);
        tracing::info!(
            services = snapshot.services.len(),
            stale = self.stale,
            "snapshot sent"
        );
        self.message(Kind::Snapshot(snapshot))
    }

    fn message(&mut self, kind: Kind) -> RouteUpdate {
        self.version += 1;
        self.metrics.update_sent(matches!(kind, Kind::Snapshot(_)));
        RouteUpdate {
            version: self.version,
            kind: Some(kind),
            stale: self.stale,
        }
    }

    /// Waits for a change of a view, or of Consul's reachability while
    /// the last snapshot was stale; `None` on shutdown.
    async fn changed(&mut self) -> Option<()> {
        let stale = self.stale;
        tokio::select! {
            alive = self.sub.changed() => alive.then_some(()),
            _ = self.reachability.changed(), if stale => Some(()),
            _ = self.shutdown.requested() => None,
        }
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
