//! `/stats` on the admin listener: whether the proxy is ready, the node
//! config version in effect, and a cumulative snapshot, since the proxy
//! started, of the outbound requests it answered (all services summed):
//! responses, errors (status 500 or more) and a latency histogram.
//! mesh-control reads it through the node's bridge (`Registry.ProxyStats`)
//! before and after a rollout step and compares the differences.
//!
//! The numbers come from the metrics the request path records anyway
//! (`mesh_proxy_requests_total`, `mesh_proxy_request_duration_seconds`,
//! and the listener's sheds in `mesh_proxy_overloaded_total`): `/stats`
//! renders the registry and sums the proxy's series, so it adds nothing to
//! a request. Rendering folds the histogram samples recorded since the last
//! upkeep into their buckets first, so a snapshot counts every request
//! answered before it.
//!
//! ```json
//! {"node": "n1", "ready": true, "config_version": 3,
//!  "requests": 1200, "errors": 4,
//!  "latency": {"bounds_seconds": [0.0001, 0.00025, ..., 10.0],
//!              "counts": [0, 12, ..., 0], "count": 1198, "sum_seconds": 3.2}}
//! ```
//!
//! `latency.counts` are per bucket, not cumulative, one per bound:
//! `counts[i]` took more than `bounds_seconds[i - 1]` and at most
//! `bounds_seconds[i]`; requests slower than the last bound are `count`
//! minus the sum of `counts`. Responses the listener sheds before looking
//! at them (503) count in `requests` and `errors` but have no latency.

use mesh_runtime::{
    admin::Admin,
    metrics::{LATENCY_BUCKETS, Registry},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{metrics, node_config};

/// `/stats` as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The proxy's node.
    pub node: String,
    /// Whether the proxy is ready (its `/ready`).
    pub ready: bool,
    /// The node config version from mesh-control in effect; 0: none.
    pub config_version: u64,
    /// Responses to outbound requests, whatever their status, the proxy's
    /// own included.
    pub requests: u64,
    /// Of those, the ones with a status of 500 or more: the instances' and
    /// the proxy's own (502, 503, 504).
    pub errors: u64,
    /// Time from request to response headers.
    pub latency: Latency,
}

/// A latency histogram, summed over every service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Upper bounds of the buckets in seconds, ascending, finite.
    pub bounds_seconds: Vec<f64>,
    /// Requests per bucket (not cumulative), one per bound; those above
    /// the last bound are `count` minus their sum.
    pub counts: Vec<u64>,
    /// Requests measured.
    pub count: u64,
    /// The sum of their latencies, in seconds.
    pub sum_seconds: f64,
}

/// What `/stats` is made from: the proxy's readiness, metrics and node
/// config status. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StatsSource {
    node: String,
    admin: Admin,
    registry: Registry,
    config: watch::Receiver<node_config::Status>,
}

/// The traffic part of [`Stats`], summed from the rendered metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Traffic {
    /// Responses.
    pub requests: u64,
    /// Responses with a status of 500 or more.
    pub errors: u64,
    /// The latency histogram.
    pub latency: Latency,
}

/// One sample line of the Prometheus text format.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: &'a str,
}

// === impl StatsSource ===

impl StatsSource {
    /// Stats of the proxy of `node`, whose readiness is `admin`'s, metrics
    /// are in `registry` and node config status comes on `config`.
    pub fn new(
        node: String,
        admin: Admin,
        registry: Registry,
        config: watch::Receiver<node_config::Status>,
    ) -> Self {
        Self {
            node,
            admin,
            registry,
            config,
        }
    }

    /// The stats now.
    pub fn snapshot(&self) -> Stats {
        let Traffic {
            requests,
            errors,
            latency,
        } = Traffic::from_prometheus(&self.registry.render());
        Stats {
            node: self.node.clone(),
            ready: self.admin.is_ready(),
            config_version: self.config.borrow().version,
            requests,
            errors,
            latency,
        }
    }
}

// === impl Traffic ===

impl Traffic {
    /// Sums the proxy's outbound request series in `text`, a registry
    /// rendered in the Prometheus text format.
    pub fn from_prometheus(text: &str) -> Self {
        let bucket = format!("{}_bucket", metrics::DURATION);
        let (sum, count) = (
            format!("{}_sum", metrics::DURATION),
            format!("{}_count", metrics::DURATION),
        );
        let mut traffic = Self {
            requests: 0,
            errors: 0,
            latency: Latency {
                bounds_seconds: Vec::new(),
                counts: Vec::new(),
                count: 0,
                sum_seconds: 0.0,
            },
        };
        // Cumulative counts by upper bound, summed over the services.
        let mut cumulative: Vec<(f64, u64)> = Vec::new();
        for sample in text.lines().filter_map(Sample::parse) {
            match sample.name {
                metrics::REQUESTS => {
                    let n = sample.count();
                    traffic.requests += n;
                    if sample.label("code_class") == Some("5xx") {
                        traffic.errors += n;
                    }
                }
                // Requests and connections the listener shed with a 503.
                metrics::OVERLOADED if sample.label("service") == Some(metrics::LISTENER) => {
                    let n = sample.count();
                    traffic.requests += n;
                    traffic.errors += n;
                }
                name if name == bucket => {
                    let Some(le) = sample.label("le").and_then(|le| le.parse::<f64>().ok()) else {
                        continue;
                    };
                    // `+Inf` is `_count`.
                    if !le.is_finite() {
                        continue;
                    }
                    let n = sample.count();
                    match cumulative.iter_mut().find(|(bound, _)| *bound == le) {
                        Some((_, total)) => *total += n,
                        None => cumulative.push((le, n)),
                    }
                }
                name if name == sum => {
                    traffic.latency.sum_seconds += sample.value.parse::<f64>().unwrap_or(0.0)
                }
                name if name == count => traffic.latency.count += sample.count(),
                _ => {}
            }
        }
        traffic.latency.set_buckets(cumulative);
        traffic
    }
}

// === impl Latency ===

impl Latency {
    /// Sets the buckets from cumulative counts by bound; no buckets at all
    /// (nothing registered yet) are the registry's buckets, empty.
    fn set_buckets(&mut self, mut cumulative: Vec<(f64, u64)>) {
        if cumulative.is_empty() {
            self.bounds_seconds = LATENCY_BUCKETS.to_vec();
            self.counts = vec![0; LATENCY_BUCKETS.len()];
            return;
        }
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut below = 0;
        for (bound, total) in cumulative {
            self.bounds_seconds.push(bound);
            self.counts.push(total.saturating_sub(below));
            below = below.max(total);
        }
    }
}

// === impl Sample ===

impl<'a> Sample<'a> {
    /// `name{label="value",...} value`; `None` for comments, blank lines
    /// and anything else.
    fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let end = line.find(['{', ' '])?;
        let name = &line[..end];
        let (labels, rest) = match line[end..].strip_prefix('{') {
            Some(rest) => parse_labels(rest)?,
            None => (Vec::new(), &line[end..]),
        };
        let value = rest.split_whitespace().next()?;
        Some(Self {
            name,
            labels,
            value,
        })
    }

    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value as a count: counters and buckets are integers.
    fn count(&self) -> u64 {
        self.value
            .parse::<u64>()
            .or_else(|_| self.value.parse::<f64>().map(|v| v.max(0.0) as u64))
            .unwrap_or(0)
    }
}

/// The labels after a `{`, up to the closing `}`, and the rest of the
/// line. Values are unescaped (`\\`, `\"`, `\n`).
fn parse_labels(mut rest: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name, value));
        rest = &rest[close + 1..];
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;
    use crate::{limits::Limit, metrics::ProxyMetrics};

    #[test]
    fn traffic_sums_services_and_counts_5xx_and_sheds_as_errors() {
        let registry = Registry::new();
        let m = ProxyMetrics::new(&registry);
        let (orders, users) = (m.service("orders"), m.service("we\"ird"));
        orders.record(StatusCode::OK, Duration::from_millis(3));
        orders.record(StatusCode::OK, Duration::from_millis(30));
        orders.record(StatusCode::BAD_GATEWAY, Duration::from_micros(50));
        users.record(StatusCode::NOT_FOUND, Duration::from_millis(3));
        users.record(StatusCode::INTERNAL_SERVER_ERROR, Duration::from_secs(20));
        m.unrouted()
            .record(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(3));
        m.listener_overloaded.increment(2);
        orders.overloaded(Limit::Requests).increment(7);

        let t = Traffic::from_prometheus(&registry.render());
        // 6 recorded and 2 shed; the service's limit answers are recorded.
        assert_eq!(t.requests, 8);
        assert_eq!(t.errors, 5);
        assert_eq!(t.latency.bounds_seconds, LATENCY_BUCKETS);
        assert_eq!(t.latency.count, 6);
        let at = |bound: f64| {
            let i = LATENCY_BUCKETS.iter().position(|b| *b == bound).unwrap();
            t.latency.counts[i]
        };
        assert_eq!(at(0.0001), 1, "{:?}", t.latency.counts);
        assert_eq!(at(0.005), 3, "{:?}", t.latency.counts);
        assert_eq!(at(0.05), 1, "{:?}", t.latency.counts);
        // 20 s is above the last bound: count minus the buckets.
        assert_eq!(t.latency.counts.iter().sum::<u64>(), 5);
        assert!((t.latency.sum_seconds - 20.03905).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn traffic_of_a_fresh_registry_is_zero_with_the_buckets() {
        let t = Traffic::from_prometheus("");
        assert_eq!((t.requests, t.errors, t.latency.count), (0, 0, 0));
        assert_eq!(t.latency.bounds_seconds, LATENCY_BUCKETS);
        assert_eq!(t.latency.counts, vec![0; LATENCY_BUCKETS.len()]);
    }

    #[test]
    fn samples_parse_with_escaped_labels() {
        let s = Sample::parse(r#"m_total{a="x\"}y",b="1\\2\n"} 42"#).unwrap();
        assert_eq!(s.name, "m_total");
        assert_eq!(s.label("a"), Some("x\"}y"));
        assert_eq!(s.label("b"), Some("1\\2\n"));
        assert_eq!(s.count(), 42);
        let s = Sample::parse("plain 1.5").unwrap();
        assert_eq!((s.name, s.value), ("plain", "1.5"));
        assert!(Sample::parse("# HELP plain A thing.").is_none());
        assert!(Sample::parse(r#"broken{a="x} 1"#).is_none());
    }
}
