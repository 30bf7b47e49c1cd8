//! Picking an instance: round robin, or least-request by the power of two
//! choices (the less busy of two random instances, which is nearly as good
//! as the least busy of all and needs no scan). A retry passes the
//! instances already [`Tried`] so that it goes to another one.

use crate::{config::LoadBalancing, table::Service};

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
        } else {
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

/// The index of the instance of `service` to try next, never one in
/// `tried`; `None` when every instance was tried (or there is none).
pub fn pick(lb: LoadBalancing, service: &Service, tried: &Tried) -> Option<usize> {
    let n = service.endpoints().len();
    if n == 0 || tried.count() >= n {
        return None;
    }
    match lb {
        LoadBalancing::RoundRobin => round_robin(service, n, tried),
        LoadBalancing::LeastRequest => least_request(service, n, tried),
    }
}

fn round_robin(service: &Service, n: usize, tried: &Tried) -> Option<usize> {
    // A retry takes the instance after the one that failed without
    // moving the shared cursor: otherwise every retry would skip one turn
    // and the next request would meet the failing instance again.
    let start = match tried.last() {
        Some(last) => (last + 1) % n,
        None => service.next_index() % n,
    };
    (0..n)
        .map(|k| (start + k) % n)
        .find(|i| !tried.contains(*i))
}

fn least_request(service: &Service, n: usize, tried: &Tried) -> Option<usize> {
    let untried = n - tried.count();
    if untried == 1 {
        return (0..n).find(|i| !tried.contains(*i));
    }
    // Two distinct random positions among the untried instances.
    let a = fastrand::usize(..untried);
    let mut b = fastrand::usize(..untried - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (nth_untried(n, tried, a)?, nth_untried(n, tried, b)?);
    let load = |i: usize| service.endpoints()[i].upstream.in_flight();
    Some(if load(b) < load(a) { b } else { a })
}

fn nth_untried(n: usize, tried: &Tried, k: usize) -> Option<usize> {
    if tried.count() == 0 {
        return Some(k);
    }
    (0..n).filter(|i| !tried.contains(*i)).nth(k)
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1 as pb;
    use mesh_runtime::metrics::Registry;

    use super::*;
    use crate::{
        metrics::ProxyMetrics,
        table::{Builder, RoutingTable, Source},
    };

    fn table(n: u32) -> RoutingTable {
        let metrics = ProxyMetrics::new(&Registry::new());
        let endpoints = (1..=n)
            .map(|p| pb::Endpoint {
                id: format!("i{p}"),
                address: "127.0.0.1".into(),
                port: p,
                ..Default::default()
            })
            .collect();
        let svc = pb::ServiceEndpoints {
            name: "orders".into(),
            endpoints,
        };
        Builder::new(&RoutingTable::empty(), &metrics).snapshot(&[svc], Source::Live, 1, 0)
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let t = table(3);
        let s = t.get("orders").unwrap();
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[pick(LoadBalancing::RoundRobin, s, &Tried::default()).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn retries_go_to_another_instance_until_none_is_left() {
        for lb in [LoadBalancing::RoundRobin, LoadBalancing::LeastRequest] {
            let t = table(3);
            let s = t.get("orders").unwrap();
            let mut tried = Tried::default();
            for _ in 0..3 {
                let i = pick(lb, s, &tried).unwrap();
                assert!(!tried.contains(i), "{lb}: {i} twice");
                tried.add(i);
            }
            assert_eq!(pick(lb, s, &tried), None, "{lb}");
        }
    }

    #[test]
    fn least_request_prefers_the_idle_instance() {
        let t = table(2);
        let s = t.get("orders").unwrap();
        let _busy = s.endpoints()[0].upstream.start();
        for _ in 0..50 {
            assert_eq!(
                pick(LoadBalancing::LeastRequest, s, &Tried::default()),
                Some(1)
            );
        }
    }

    #[test]
    fn no_instance_picks_nothing() {
        let t = table(0);
        let s = t.get("orders").unwrap();
        assert_eq!(pick(LoadBalancing::RoundRobin, s, &Tried::default()), None);
    }
}
