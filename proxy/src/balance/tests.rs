use std::{collections::BTreeMap, time::Duration};

use mesh_proto::v1 as pb;
use mesh_runtime::metrics::Registry;

use super::*;
use crate::{
    metrics::ProxyMetrics,
    policy::RouteSpec,
    table::{Builder, RoutingTable, Source},
};

fn endpoint(port: u32, version: Option<&str>, tags: &[&str]) -> pb::Endpoint {
    pb::Endpoint {
        id: format!("i{port}"),
        address: "127.0.0.1".into(),
        port,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        meta: version
            .map(|v| ("version".to_owned(), v.to_owned()))
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn table_of(endpoints: Vec<pb::Endpoint>) -> RoutingTable {
    let metrics = ProxyMetrics::new(&Registry::new());
    let svc = pb::ServiceEndpoints {
        name: "orders".into(),
        endpoints,
    };
    Builder::new(&RoutingTable::empty(), &metrics).snapshot(&[svc], Source::Live, 1, 0)
}

fn table(n: u32) -> RoutingTable {
    table_of((1..=n).map(|p| endpoint(p, None, &[])).collect())
}

fn policy(lb: LoadBalancing) -> RoutePolicy {
    let hash_header = (lb == LoadBalancing::ConsistentHash).then(|| "x-user".to_owned());
    RouteSpec {
        lb: Some(lb),
        hash_header,
        ..RouteSpec::default()
    }
    .resolve("test")
    .unwrap()
}

const ALL: [LoadBalancing; 4] = [
    LoadBalancing::P2cEwma,
    LoadBalancing::RoundRobin,
    LoadBalancing::LeastRequest,
    LoadBalancing::ConsistentHash,
];

fn pick_now(s: &Service, p: &RoutePolicy, tried: &Tried, hash: Option<u64>) -> Option<usize> {
    pick(s, p, tried, hash, Instant::now())
}

#[test]
fn round_robin_spreads_evenly() {
    let t = table(3);
    let s = t.get("orders").unwrap();
    let p = policy(LoadBalancing::RoundRobin);
    let mut counts = [0; 3];
    for _ in 0..300 {
        counts[pick_now(s, &p, &Tried::default(), None).unwrap()] += 1;
    }
    assert_eq!(counts, [100, 100, 100]);
}

#[test]
fn retries_go_to_another_instance_until_none_is_left() {
    for lb in ALL {
        let t = table(3);
        let s = t.get("orders").unwrap();
        let p = policy(lb);
        let mut tried = Tried::default();
        for _ in 0..3 {
            let i = pick_now(s, &p, &tried, Some(42)).unwrap();
            assert!(!tried.contains(i), "{lb}: {i} twice");
            tried.add(i);
        }
        assert_eq!(pick_now(s, &p, &tried, Some(42)), None, "{lb}");
    }
}

#[test]
fn least_request_prefers_the_idle_instance() {
    let t = table(2);
    let s = t.get("orders").unwrap();
    let _busy = s.endpoints()[0].upstream.start();
    for lb in [LoadBalancing::LeastRequest, LoadBalancing::P2cEwma] {
        for _ in 0..50 {
            assert_eq!(
                pick_now(s, &policy(lb), &Tried::default(), None),
                Some(1),
                "{lb}"
            );
        }
    }
}

#[test]
fn no_instance_picks_nothing() {
    let t = table(0);
    let s = t.get("orders").unwrap();
    for lb in ALL {
        assert_eq!(pick_now(s, &policy(lb), &Tried::default(), Some(1)), None);
    }
}

/// Sequential requests, each answered in its instance's latency.
async fn simulate(
    s: &Service,
    p: &RoutePolicy,
    latency: &[Duration],
    requests: usize,
) -> Vec<usize> {
    let mut counts = vec![0; latency.len()];
    for _ in 0..requests {
        let i = pick(s, p, &Tried::default(), None, Instant::now()).unwrap();
        counts[i] += 1;
        tokio::time::advance(latency[i]).await;
        s.endpoints()[i]
            .state
            .ewma
            .observe(latency[i], Instant::now());
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn p2c_ewma_sends_most_requests_to_the_fast_instances() {
    let t = table(3);
    let s = t.get("orders").unwrap();
    let p = policy(LoadBalancing::P2cEwma);
    let ms = Duration::from_millis;
    let latency = [ms(1), ms(1), ms(50)];
    let counts = simulate(s, &p, &latency, 5000).await;
    let slow = counts[2] as f64 / 5000.0;
    assert!(slow < 0.01, "slow instance got {counts:?}");
    // The two fast ones share the rest about evenly.
    let (a, b) = (counts[0] as f64, counts[1] as f64);
    assert!((a / b - 1.0).abs() < 0.5, "{counts:?}");

    // Once the slow one is fast again, its estimate decays and it is
    // picked again, then keeps its share.
    let fast = [ms(1), ms(1), ms(1)];
    let counts = simulate(s, &p, &fast, 60_000).await;
    assert!(counts[2] > 5000, "recovered instance got {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn p2c_ewma_avoids_an_instance_with_requests_piling_up() {
    let t = table(3);
    let s = t.get("orders").unwrap();
    let p = policy(LoadBalancing::P2cEwma);
    // Instance 2 is hung: requests to it never end.
    let mut hung = Vec::new();
    let mut counts = [0; 3];
    for _ in 0..3000 {
        let i = pick(s, &p, &Tried::default(), None, Instant::now()).unwrap();
        counts[i] += 1;
        if i == 2 {
            hung.push(s.endpoints()[2].upstream.start());
        } else {
            tokio::time::advance(Duration::from_millis(1)).await;
            s.endpoints()[i]
                .state
                .ewma
                .observe(Duration::from_millis(1), Instant::now());
        }
    }
    assert!(counts[2] < 30, "hung instance got {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn ejected_instances_are_left_out_unless_nothing_else_is_left() {
    let t = table(3);
    let s = t.get("orders").unwrap();
    let outlier = crate::outlier::OutlierPolicy {
        consecutive_failures: 1,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(30),
        max_ejected_percent: 100,
    };
    let now = Instant::now();
    for i in [0, 1] {
        let ejected = s.endpoints()[i]
            .state
            .health
            .record_failure(&outlier, now, || true);
        assert!(ejected.is_some());
    }
    for lb in ALL {
        let p = policy(lb);
        for _ in 0..50 {
            assert_eq!(pick_now(s, &p, &Tried::default(), Some(7)), Some(2), "{lb}");
        }
        // Instance 2 tried: an ejected instance beats none.
        let mut tried = Tried::default();
        tried.add(2);
        assert!(
            pick_now(s, &p, &tried, Some(7)).is_some_and(|i| i < 2),
            "{lb}"
        );
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    let p = policy(LoadBalancing::RoundRobin);
    let mut seen = [false; 3];
    for _ in 0..6 {
        seen[pick_now(s, &p, &Tried::default(), None).unwrap()] = true;
    }
    assert_eq!(seen, [true; 3], "back from ejection");
}

#[test]
fn weights_split_traffic_by_version_or_tag_within_tolerance() {
    // v1 by Meta version, v2 by tag; one instance in no group.
    let t = table_of(vec![
        endpoint(1, Some("v1"), &[]),
        endpoint(2, Some("v1"), &["blue"]),
        endpoint(3, Some("v1"), &[]),
        endpoint(4, None, &["v2"]),
        endpoint(5, None, &["other"]),
    ]);
    let s = t.get("orders").unwrap();
    let weights: BTreeMap<String, u32> = [("v2".to_owned(), 10), ("v1".to_owned(), 90)].into();
    for lb in [LoadBalancing::P2cEwma, LoadBalancing::RoundRobin] {
        let p = RouteSpec {
            lb: Some(lb),
            weights: Some(weights.clone()),
            ..RouteSpec::default()
        }
        .resolve("test")
        .unwrap();
        let mut counts = [0usize; 5];
        let total = 20_000;
        for _ in 0..total {
            counts[pick_now(s, &p, &Tried::default(), None).unwrap()] += 1;
        }
        let v2 = counts[3] as f64 / total as f64;
        assert!(
            (0.085..=0.115).contains(&v2),
            "{lb}: v2 share {v2} ({counts:?})"
        );
        assert_eq!(counts[4], 0, "{lb}: instance without a weight got traffic");
        assert!(
            counts[..3].iter().all(|c| *c > total / 5),
            "{lb}: {counts:?}"
        );
    }
}

#[test]
fn a_weight_group_without_instances_leaves_its_share_to_the_others() {
    let t = table_of(vec![
        endpoint(1, Some("v1"), &[]),
        endpoint(2, Some("v1"), &[]),
    ]);
    let s = t.get("orders").unwrap();
    let p = RouteSpec {
        weights: Some([("v2".to_owned(), 50), ("v1".to_owned(), 50)].into()),
        ..RouteSpec::default()
    }
    .resolve("test")
    .unwrap();
    for _ in 0..100 {
        assert!(pick_now(s, &p, &Tried::default(), None).is_some());
    }
}

#[test]
fn consistent_hash_is_sticky_per_key_and_balances_without_one() {
    let t = table(5);
    let s = t.get("orders").unwrap();
    let p = policy(LoadBalancing::ConsistentHash);
    let mut owners = std::collections::HashSet::new();
    for key in 0..200u64 {
        let h = ring::hash64(&key.to_le_bytes());
        let first = pick_now(s, &p, &Tried::default(), Some(h)).unwrap();
        for _ in 0..5 {
            assert_eq!(pick_now(s, &p, &Tried::default(), Some(h)), Some(first));
        }
        owners.insert(first);
    }
    assert_eq!(owners.len(), 5, "keys spread over every instance");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        seen.insert(pick_now(s, &p, &Tried::default(), None).unwrap());
    }
    assert_eq!(seen.len(), 5, "without a key: p2c-ewma");
}
