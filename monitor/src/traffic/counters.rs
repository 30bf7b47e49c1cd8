//! From a proxy's `/metrics` text to cumulative counters per service
//! ([`Snapshot`]), and from two snapshots to what happened in between
//! ([`Round`]): requests, 5xx, timeouts and the p99 latency of the
//! requests of the interval (from the histogram buckets' differences).
//!
//! Counters only grow while the proxy runs; a smaller value than before
//! means it restarted, and the round then counts from zero (what the new
//! proxy counted since it started, a slight undercount).

use std::collections::BTreeMap;

use super::prom::{self, ParseError, Sample};

/// Requests proxied, by `service` and `code_class`.
pub const REQUESTS: &str = "mesh_proxy_requests_total";
/// Failed attempts to reach an instance, by `service` and `kind`.
pub const UPSTREAM_ERRORS: &str = "mesh_proxy_upstream_errors_total";
/// The latency histogram's buckets, by `service` and `le`.
pub const DURATION_BUCKET: &str = "mesh_proxy_request_duration_seconds_bucket";

/// One service's cumulative counters, as a proxy's `/metrics` shows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Requests, every status class.
    pub requests: f64,
    /// Requests answered 5xx.
    pub errors: f64,
    /// Requests that ran out of time; none when the proxy has no such
    /// series.
    pub timeouts: Option<f64>,
    /// The latency buckets: upper bound (seconds) and cumulative count,
    /// by bound, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
}

/// A proxy's counters by service.
pub type Snapshot = BTreeMap<String, Counters>;

/// What one service did between two snapshots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Round {
    /// The interval, in seconds.
    pub seconds: f64,
    /// Requests.
    pub requests: f64,
    /// Of those, answered 5xx.
    pub errors: f64,
    /// Of those, timed out; none without a timeout series.
    pub timeouts: Option<f64>,
    /// The p99 latency of the interval's requests, in seconds; none
    /// without requests.
    pub p99: Option<f64>,
    /// The proxy restarted in between.
    pub reset: bool,
}

// === impl Round ===

impl Round {
    /// Requests per second.
    pub fn request_rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests / self.seconds
        } else {
            0.0
        }
    }

    /// The share of 5xx; none without requests.
    pub fn error_ratio(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.errors / self.requests)
    }

    /// The share of timeouts; none without requests or a timeout series.
    pub fn timeout_ratio(&self) -> Option<f64> {
        let timeouts = self.timeouts?;
        (self.requests > 0.0).then(|| (timeouts / self.requests).min(1.0))
    }
}

/// The counters per service in a proxy's `/metrics` text.
pub fn snapshot(text: &str) -> Result<Snapshot, ParseError> {
    let wanted = |n: &str| n == REQUESTS || n == UPSTREAM_ERRORS || n == DURATION_BUCKET;
    let mut services = Snapshot::new();
    for sample in prom::parse(text, wanted)? {
        let Some(service) = sample.label("service") else {
            continue;
        };
        let c = services.entry(service.to_owned()).or_default();
        add(c, &sample);
    }
    for c in services.values_mut() {
        c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(services)
}

fn add(c: &mut Counters, sample: &Sample) {
    let value = if sample.value.is_finite() {
        sample.value.max(0.0)
    } else {
        0.0
    };
    match sample.name.as_str() {
        REQUESTS => {
            c.requests += value;
            if sample.label("code_class") == Some("5xx") {
                c.errors += value;
            }
        }
        UPSTREAM_ERRORS if sample.label("kind") == Some("timeout") => {
            *c.timeouts.get_or_insert(0.0) += value;
        }
        DURATION_BUCKET => {
            let le = sample.label("le").and_then(|le| match le {
                "+Inf" | "Inf" => Some(f64::INFINITY),
                le => le.parse::<f64>().ok(),
            });
            if let Some(le) = le.filter(|le| !le.is_nan()) {
                c.buckets.push((le, sample.value));
            }
        }
        _ => {}
    }
}

/// What each service of `now` did since `before`, `seconds` earlier. A
/// service new in `now` is left out (its counters may predate `before`);
/// one gone from `now` counts as a restarted proxy with no requests.
pub fn rounds(before: &Snapshot, now: &Snapshot, seconds: f64) -> BTreeMap<String, Round> {
    let empty = Counters::default();
    before
        .iter()
        .map(|(service, b)| {
            let n = now.get(service).unwrap_or(&empty);
            (service.clone(), round(b, n, seconds))
        })
        .collect()
}

/// The round between `b` and `n`.
fn round(b: &Counters, n: &Counters, seconds: f64) -> Round {
    let reset = n.requests < b.requests
        || n.errors < b.errors
        || n.timeouts.unwrap_or(0.0) < b.timeouts.unwrap_or(0.0)
        || n.buckets.len() != b.buckets.len()
        || n.buckets.iter().zip(&b.buckets).any(|(n, b)| n.1 < b.1);
    let zero = Counters::default();
    let from = if reset { &zero } else { b };
    let buckets: Vec<(f64, f64)> = if reset {
        n.buckets.clone()
    } else {
        n.buckets
            .iter()
            .zip(&b.buckets)
            .map(|(n, b)| (n.0, n.1 - b.1))
            .collect()
    };
    Round {
        seconds,
        requests: n.requests - from.requests,
        errors: n.errors - from.errors,
        timeouts: n.timeouts.map(|t| t - from.timeouts.unwrap_or(0.0)),
        p99: quantile(0.99, &buckets),
        reset,
    }
}

/// The `q` quantile of cumulative `buckets` (bound, count), interpolated
/// within its bucket as Prometheus' `histogram_quantile` does; in the
/// `+Inf` bucket, the largest finite bound. None without counts.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let share = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests;
