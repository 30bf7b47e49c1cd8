//! What every Watch stream reads from: the services followed, each with
//! its last answer encoded once, and a bounded log of recent changes
//! numbered by one global sequence.
//!
//! A stream keeps only a [`Cursor`]: the sequence it has sent up to and
//! its own message version. To catch up it reads the log from its
//! sequence on, keeps the services it follows, and sends each of those
//! whole as it is now; a stream that fell behind the log's start gets a
//! fresh snapshot instead. So a change costs one encode, and each stream
//! only the filtering of what changed since it last sent.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
};

use bytes::Bytes;

use super::wire;
use crate::watch::{Endpoints, ServiceView};

/// Changes kept for streams that have not caught up; one further behind
/// gets a snapshot.
pub(crate) const LOG_LEN: usize = 4096;

/// Catalog services that are never routes: Consul registers its servers
/// as `consul`, on their RPC port, which speaks no HTTP. Asked for by name
/// they are still followed.
const NOT_ROUTES: &[&str] = &["consul"];

/// What one stream follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Follow {
    /// Every service in the catalog that is a route.
    All,
    /// These services, sorted and without duplicates.
    Named(Vec<String>),
}

/// The followed services, their answers, and the recent changes.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    services: BTreeMap<Arc<str>, Service>,
    log: VecDeque<Change>,
    /// The sequence of the last change.
    seq: u64,
    /// Every change after this one is still in the log.
    floor: u64,
    /// The catalog answered (meaningful while some stream follows all).
    catalog_answered: bool,
    /// The body of a snapshot of every route, at the sequence it was made.
    everything: Option<(u64, Bytes, usize)>,
}

/// What one stream has been sent, and what it sends next.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    version: u64,
    seq: u64,
    stale: bool,
    /// The node's config, as the `config` field of a message.
    config: Option<Bytes>,
    /// `config` changed since the stream last sent it.
    config_unsent: bool,
}

/// One message for one stream, ready to send.
#[derive(Debug)]
pub(crate) struct Update {
    /// The stream's version of this message.
    pub(crate) version: u64,
    /// A snapshot (else a delta).
    pub(crate) snapshot: bool,
    /// Sent while Consul is unreachable.
    pub(crate) stale: bool,
    /// Services carried (upserted and removed, for a delta).
    pub(crate) services: usize,
    /// The node's config rides along.
    pub(crate) config: bool,
    /// The gRPC message, in chunks.
    pub(crate) chunks: Vec<Bytes>,
}

/// Names that need, or no longer need, a Consul watch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Watching {
    /// Newly followed: the caller watches them and reports their answers.
    pub(crate) started: Vec<Arc<str>>,
    /// Followed no more: the caller lets go of their watches.
    pub(crate) stopped: Vec<Arc<str>>,
}

/// A followed service.
#[derive(Debug)]
struct Service {
    /// `None` until Consul's first answer.
    endpoints: ServiceView,
    /// The endpoints as snapshots and deltas carry them.
    piece: Bytes,
    /// In the catalog and a route: streams following all see it.
    routed: bool,
    /// Streams following it by name.
    named: usize,
}

/// A service as it was just before a change; what it is after is what
/// it is now, or in the next change of the same service.
#[derive(Debug)]
struct Change {
    seq: u64,
    name: Arc<str>,
    endpoints: ServiceView,
    routed: bool,
}

/// What changed for one stream since its sequence.
#[derive(Debug)]
enum Since {
    /// Its sequence is older than the log.
    Behind,
    /// Up to `seq`: these services changed (whole), these are gone.
    Changes {
        seq: u64,
        upserted: Vec<Bytes>,
        removed: Vec<String>,
    },
}

// === impl Follow ===

impl Follow {
    /// Whether a stream following this sees `name` when it is answered
    /// and, for `All`, `routed`.
    fn sees(&self, name: &str, endpoints: &ServiceView, routed: bool) -> bool {
        endpoints.is_some()
            && match self {
                Follow::All => routed,
                Follow::Named(names) => names.binary_search_by(|n| (**n).cmp(name)).is_ok(),
            }
    }

    fn includes(&self, name: &str) -> bool {
        match self {
            Follow::All => true,
            Follow::Named(names) => names.binary_search_by(|n| (**n).cmp(name)).is_ok(),
        }
    }
}

// === impl Ledger ===

impl Ledger {
    /// The sequence of the last change.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Changes whenever something a stream reads changed: a waiting
    /// stream has something to look at.
    pub(crate) fn mark(&self) -> (u64, bool) {
        (self.seq, self.catalog_answered)
    }

    /// One more stream follows `name`; `true` when the service is new,
    /// and the caller starts watching it.
    pub(crate) fn follow(&mut self, name: &str) -> bool {
        let created = !self.services.contains_key(name);
        self.entry(name).named += 1;
        created
    }

    /// One stream less follows `name`; `true` when nobody follows it
    /// anymore, and the caller stops watching it.
    pub(crate) fn unfollow(&mut self, name: &str) -> bool {
        let Some(service) = self.services.get_mut(name) else {
            return false;
        };
        service.named = service.named.saturating_sub(1);
        self.release(name)
    }

    /// The catalog's names: exactly these (less those that are never
    /// routes) are what streams following all see. `None` when no stream
    /// follows all anymore.
    pub(crate) fn route(&mut self, catalog: Option<&BTreeSet<String>>) -> Watching {
        let mut watching = Watching::default();
        self.catalog_answered = catalog.is_some();
        let wanted = |name: &str| catalog.is_some_and(|c| c.contains(name));
        let unrouted: Vec<Arc<str>> = self
            .services
            .iter()
            .filter(|(name, s)| s.routed && !wanted(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in unrouted {
            self.set_routed(&name, false);
            if self.release(&name) {
                watching.stopped.push(name);
            }
        }
        for name in catalog.into_iter().flatten() {
            if NOT_ROUTES.contains(&name.as_str()) {
                continue;
            }
            if !self.services.contains_key(name.as_str()) {
                watching.started.push(Arc::from(name.as_str()));
            }
            self.set_routed(name, true);
        }
        watching
    }

    /// Consul's answer for `name`, recorded as a change when it differs.
    pub(crate) fn answer(&mut self, name: &str, endpoints: ServiceView) {
        let Some(service) = self.services.get(name) else {
            return;
        };
        if same(&service.endpoints, &endpoints) {
            return;
        }
        let piece = match &endpoints {
            Some(eps) => wire::service_piece(name, eps),
            None => Bytes::new(),
        };
        let name = self.record(name);
        let service = self.services.get_mut(&name).expect("recorded above");
        service.endpoints = endpoints;
        service.piece = piece;
    }

    /// Whether every service `follow` names (and the catalog) answered.
    pub(crate) fn all_answered(&self, follow: &Follow) -> bool {
        match follow {
            Follow::All => {
                self.catalog_answered
                    && self
                        .services
                        .values()
                        .all(|s| !s.routed || s.endpoints.is_some())
            }
            Follow::Named(names) => names.iter().all(|n| self.answered(n)),
        }
    }

    /// Whether enough answered to send a snapshot that does not lie: the
    /// catalog when following all, some service otherwise.
    pub(crate) fn any_answered(&self, follow: &Follow) -> bool {
        match follow {
            Follow::All => self.catalog_answered,
            Follow::Named(names) => names.iter().any(|n| self.answered(n)),
        }
    }

    /// A snapshot body of what `follow` sees now, and its service count.
    fn snapshot(&mut self, follow: &Follow) -> (Bytes, usize) {
        match follow {
            Follow::All => {
                if let Some((seq, body, count)) = &self.everything
                    && *seq == self.seq
                {
                    return (body.clone(), *count);
                }
                let pieces: Vec<&Bytes> = self
                    .services
                    .iter()
                    .filter(|(name, s)| follow.sees(name, &s.endpoints, s.routed))
                    .map(|(_, s)| &s.piece)
                    .collect();
                let count = pieces.len();
                let body = wire::concat(pieces);
                self.everything = Some((self.seq, body.clone(), count));
                (body, count)
            }
            Follow::Named(names) => {
                let pieces: Vec<&Bytes> = names
                    .iter()
                    .filter_map(|n| self.services.get(n.as_str()))
                    .filter(|s| s.endpoints.is_some())
                    .map(|s| &s.piece)
                    .collect();
                let count = pieces.len();
                (wire::concat(pieces), count)
            }
        }
    }

    /// What changed for `follow` after `since`, each service as it is now.
    fn since(&self, follow: &Follow, since: u64) -> Since {
        if since < self.floor {
            return Since::Behind;
        }
        let start = self.log.partition_point(|c| c.seq <= since);
        // The first change after `since` tells what the stream was sent.
        let mut first: BTreeMap<&str, &Change> = BTreeMap::new();
        for change in self.log.range(start..) {
            if follow.includes(&change.name) {
                first.entry(&change.name).or_insert(change);
            }
        }
        let mut upserted = Vec::new();
        let mut removed = Vec::new();
        for (name, then) in first {
            let had = follow.sees(name, &then.endpoints, then.routed);
            let now = self
                .services
                .get(name)
                .filter(|s| follow.sees(name, &s.endpoints, s.routed));
            match now {
                Some(s) if !(had && same(&then.endpoints, &s.endpoints)) => {
                    upserted.push(s.piece.clone());
                }
                None if had => removed.push(name.to_owned()),
                _ => {}
            }
        }
        Since::Changes {
            seq: self.seq,
            upserted,
            removed,
        }
    }

    fn answered(&self, name: &str) -> bool {
        self.services
            .get(name)
            .is_some_and(|s| s.endpoints.is_some())
    }

    fn entry(&mut self, name: &str) -> &mut Service {
        if !self.services.contains_key(name) {
            let service = Service {
                endpoints: None,
                piece: Bytes::new(),
                routed: false,
                named: 0,
            };
            self.services.insert(Arc::from(name), service);
        }
        self.services.get_mut(name).expect("inserted above")
    }

    fn set_routed(&mut self, name: &str, routed: bool) {
        if self.entry(name).routed == routed {
            return;
        }
        let name = self.record(name);
        self.entry(&name).routed = routed;
    }

    /// Forgets `name` when nobody follows it; `true` if so.
    fn release(&mut self, name: &str) -> bool {
        let unused = self
            .services
            .get(name)
            .is_some_and(|s| s.named == 0 && !s.routed);
        if unused {
            self.services.remove(name);
        }
        unused
    }

    /// Logs `name` as it is, before it changes; returns its shared name.
    fn record(&mut self, name: &str) -> Arc<str> {
        let (name, service) = self
            .services
            .get_key_value(name)
            .expect("only followed services change");
        self.seq += 1;
        self.log.push_back(Change {
            seq: self.seq,
            name: name.clone(),
            endpoints: service.endpoints.clone(),
            routed: service.routed,
        });
        if self.log.len() > LOG_LEN
            && let Some(oldest) = self.log.pop_front()
        {
            self.floor = oldest.seq;
        }
        self.everything = None;
        name.clone()
    }
}

fn same(a: &ServiceView, b: &ServiceView) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Endpoints::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

// === impl Cursor ===

impl Cursor {
    /// Whether the stream sent anything yet.
    pub(crate) fn started(&self) -> bool {
        self.version > 0
    }

    /// Whether the last snapshot was sent while Consul was unreachable.
    pub(crate) fn stale(&self) -> bool {
        self.stale
    }

    /// The node's config (its encoded `config` field) as it is now: every
    /// snapshot carries it, and the next message after it changed.
    pub(crate) fn set_config(&mut self, config: Option<&Bytes>) {
        if self.config.as_ref() == config {
            return;
        }
        self.config = config.cloned();
        self.config_unsent = config.is_some();
    }

    /// A snapshot of what `follow` sees now; stale unless `reachable`.
    pub(crate) fn snapshot(
        &mut self,
        ledger: &mut Ledger,
        follow: &Follow,
        reachable: bool,
    ) -> Update {
        let (body, services) = ledger.snapshot(follow);
        self.seq = ledger.seq();
        self.stale = !reachable;
        self.config_unsent = self.config.is_some();
        self.message(true, body, services)
    }

    /// The next message after a change: a delta of what changed for
    /// `follow`, or a snapshot when the stream fell behind the log or its
    /// last snapshot was stale and Consul is back; `None` when there is
    /// nothing to send. A changed config with no service change goes as a
    /// delta without services.
    pub(crate) fn next(
        &mut self,
        ledger: &mut Ledger,
        follow: &Follow,
        reachable: bool,
    ) -> Option<Update> {
        if self.stale {
            // What the proxy got was of unknown age: once Consul answers,
            // it gets everything afresh, never a delta.
            return reachable.then(|| self.snapshot(ledger, follow, reachable));
        }
        match ledger.since(follow, self.seq) {
            Since::Behind => Some(self.snapshot(ledger, follow, reachable)),
            Since::Changes {
                seq,
                upserted,
                removed,
            } => {
                self.seq = seq;
                if upserted.is_empty() && removed.is_empty() && !self.config_unsent {
                    return None;
                }
                let services = upserted.len() + removed.len();
                let body = wire::delta_body(&upserted, &removed);
                Some(self.message(false, body, services))
            }
        }
    }

    fn message(&mut self, snapshot: bool, body: Bytes, services: usize) -> Update {
        self.version += 1;
        let config = std::mem::take(&mut self.config_unsent)
            .then_some(self.config.as_ref())
            .flatten();
        Update {
            version: self.version,
            snapshot,
            stale: self.stale,
            services,
            config: config.is_some(),
            chunks: wire::frame(self.version, snapshot, body, self.stale, config),
        }
    }
}

#[cfg(test)]
mod tests;
