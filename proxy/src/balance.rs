//! Picking an instance for one attempt, as the route's policy says:
//!
//! - `p2c-ewma` (the default): the cheaper of two random instances, where
//!   the cost is the peak-EWMA latency times the requests in flight plus
//!   one (Finagle's and Linkerd's balancer): slow or busy instances get
//!   less, without a scan.
//! - `least-request`: the less busy of two random instances.
//! - `round-robin`: each instance in turn.
//! - `consistent-hash`: the instance owning the request's key on a hash
//!   ring ([`ring`]); without a key, as `p2c-ewma`.
//!
//! `weights` split traffic first among groups of instances, by version
//! (Meta `version`) or else tag: `{ v2 = 10, v1 = 90 }` sends about 10 % to
//! the `v2` instances, then the algorithm picks within the group (with a
//! hash key, the group too is chosen by the key, so a user stays on it).
//!
//! Ejected instances ([`crate::outlier`]) and those a request was already
//! [`Tried`] on are left out; when only ejected ones remain, they are used
//! rather than none. Nothing here locks or allocates: random positions are
//! drawn until one is usable (a few draws, since at most half are ejected)
//! before falling back to counting.

pub mod ewma;
pub mod ring;

use tokio::time::Instant;

pub use self::{
    ewma::Ewma,
    ring::{HashOn, Ring},
};
use crate::{
    config::LoadBalancing,
    outlier::Health,
    policy::RoutePolicy,
    table::{Endpoint, Service},
};

/// Draws of a random usable instance before counting them instead.
const DRAWS: usize = 8;

/// An instance's state that outlives routing tables: its latency estimate
/// and its failure record.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Peak-EWMA latency.
    pub ewma: Ewma,
    /// Consecutive failures and ejection.
    pub health: Health,
}

/// Instances a request has been tried on, by index in the service's list.
/// Allocates only past the first retry.
#[derive(Debug, Default)]
pub struct Tried {
    first: Option<usize>,
    more: Vec<usize>,
}

// === impl Tried ===

impl Tried {
    /// Records instance `i`.
    pub fn add(&mut self, i: usize) {
        if self.first.is_none() {
            self.first = Some(i);
        } else if !self.contains(i) {
            self.more.push(i);
        }
    }

    /// Whether instance `i` was tried.
    pub fn contains(&self, i: usize) -> bool {
        self.first == Some(i) || self.more.contains(&i)
    }

    fn last(&self) -> Option<usize> {
        self.more.last().copied().or(self.first)
    }

    fn count(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }
}

/// The index of the instance of `service` to try next under `policy`,
/// never one in `tried`; `None` when every instance was tried (or there is
/// none). `hash` is the request's key for `consistent-hash`.
pub fn pick(
    service: &Service,
    policy: &RoutePolicy,
    tried: &Tried,
    hash: Option<u64>,
    now: Instant,
) -> Option<usize> {
    let endpoints = service.endpoints();
    let n = endpoints.len();
    if n == 0 || tried.count() >= n {
        return None;
    }
    let untried = |i: usize| !tried.contains(i);
    let healthy = |i: usize| !endpoints[i].state.health.is_ejected(now);
    let group = choose_group(endpoints, &policy.weights, tried, hash, now);
    let in_group =
        |i: usize| group.is_none_or(|g| group_of(&endpoints[i], &policy.weights) == Some(g));
    let pick =
        |usable: &dyn Fn(usize) -> bool| by_policy(service, policy, tried, hash, now, usable);
    pick(&|i| untried(i) && in_group(i) && healthy(i))
        // Only ejected instances left (in the group): better than none.
        .or_else(|| pick(&|i| untried(i) && in_group(i)))
        .or_else(|| group.and_then(|_| pick(&untried)))
}

fn by_policy(
    service: &Service,
    policy: &RoutePolicy,
    tried: &Tried,
    hash: Option<u64>,
    now: Instant,
    usable: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let endpoints = service.endpoints();
    match (policy.lb, hash) {
        (LoadBalancing::RoundRobin, _) => round_robin(service, tried, usable),
        (LoadBalancing::LeastRequest, _) => {
            let (a, b) = two(endpoints.len(), usable)?;
            let load = |i: usize| endpoints[i].upstream.in_flight();
            Some(b.filter(|b| load(*b) < load(a)).unwrap_or(a))
        }
        (LoadBalancing::ConsistentHash, Some(hash)) => service.ring().find(hash, usable),
        (LoadBalancing::P2cEwma | LoadBalancing::ConsistentHash, _) => {
            let (a, b) = two(endpoints.len(), usable)?;
            let cost = |i: usize| {
                let e = &endpoints[i];
                e.state.ewma.estimate(now) * (e.upstream.in_flight() + 1) as f64
            };
            Some(b.filter(|b| cost(*b) < cost(a)).unwrap_or(a))
        }
    }
}

fn round_robin(service: &Service, tried: &Tried, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    let n = service.endpoints().len();
    // A retry takes the instance after the one that failed without
    // moving the shared cursor: otherwise every retry would skip one turn
    // and the next request would meet the failing instance again.
    if let Some(last) = tried.last() {
        return (1..=n).map(|k| (last + k) % n).find(|i| usable(*i));
    }
    let turn = service.next_index();
    if usable(turn % n) {
        return Some(turn % n);
    }
    // Some are left out (ejected, another weight group): the turn goes
    // round the usable ones, so that each still gets an even share.
    let count = (0..n).filter(|i| usable(*i)).count();
    (count > 0)
        .then(|| (0..n).filter(|i| usable(*i)).nth(turn % count))
        .flatten()
}

/// Two distinct random usable positions out of `n` (the second is `None`
/// when only one is usable).
fn two(n: usize, usable: &dyn Fn(usize) -> bool) -> Option<(usize, Option<usize>)> {
    let a = random_usable(n, &|i| usable(i))?;
    let b = random_usable(n, &|i| i != a && usable(i));
    Some((a, b))
}

/// A uniformly random usable position: a few draws, then counting.
fn random_usable(n: usize, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    for _ in 0..DRAWS {
        let i = fastrand::usize(..n);
        if usable(i) {
            return Some(i);
        }
    }
    let count = (0..n).filter(|i| usable(*i)).count();
    if count == 0 {
        return None;
    }
    (0..n).filter(|i| usable(*i)).nth(fastrand::usize(..count))
}

/// The weight group of an instance: the position in `weights` of its Meta
/// `version`, or else of its first tag that has a weight.
fn group_of(e: &Endpoint, weights: &[(Box<str>, u32)]) -> Option<usize> {
    let position = |key: &str| weights.iter().position(|(k, _)| &**k == key);
    if let Some(g) = e.meta.get("version").and_then(|v| position(v)) {
        return Some(g);
    }
    e.tags.iter().find_map(|t| position(t))
}

/// The group this attempt goes to: drawn by weight (or by the key's hash)
/// among the groups that have an untried instance, preferring groups with
/// a healthy one. `None`: no weights, or no instance in any group.
fn choose_group(
    endpoints: &[Endpoint],
    weights: &[(Box<str>, u32)],
    tried: &Tried,
    hash: Option<u64>,
    now: Instant,
) -> Option<usize> {
    if weights.is_empty() {
        return None;
    }
    // Bit g: group g has an untried instance; healthy ones apart.
    let (mut healthy, mut any) = (0u32, 0u32);
    for (i, e) in endpoints.iter().enumerate() {
        if tried.contains(i) {
            continue;
        }
        if let Some(g) = group_of(e, weights) {
            any |= 1 << g;
            if !e.state.health.is_ejected(now) {
                healthy |= 1 << g;
            }
        }
    }
    let present = if healthy != 0 { healthy } else { any };
    let total: u64 = weights
        .iter()
        .enumerate()
        .filter(|(g, _)| present & (1 << g) != 0)
        .map(|(_, (_, w))| u64::from(*w))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = hash.map_or_else(|| fastrand::u64(..total), |h| h % total);
    for (g, (_, w)) in weights.iter().enumerate() {
        if present & (1 << g) == 0 {
            continue;
        }
        if r < u64::from(*w) {
            return Some(g);
        }
        r -= u64::from(*w);
    }
    None
}

#[cfg(test)]
mod tests;
