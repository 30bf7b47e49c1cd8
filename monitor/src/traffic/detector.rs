//! The anomaly detector: per node, service and [`Signal`], a baseline
//! learned as an EWMA of the rounds, and an anomaly when a round leaves the
//! baseline past an absolute floor, so that a quiet service (a request, an
//! error) never pages.
//!
//! - 5xx rate: at least `error_ratio` of the requests and `min_errors`
//!   errors, and (once there is a baseline) `factor` times the baseline.
//!   Before the baseline, the floors alone judge: a service failing from
//!   the start pages.
//! - timeout rate: the same, with `min_errors` timeouts.
//! - p99: at least `factor` times the baseline and `p99_floor`, over at
//!   least `min_requests` requests.
//! - request-rate drop: under `drop_ratio` of the baseline while the
//!   baseline is at least `drop_min_rate`.
//!
//! A baseline exists after `warmup_rounds` rounds it could learn from; an
//! anomalous round (or one with fewer than `min_requests` requests, for
//! the ratios and the p99) does not teach it. A signal fires on its first
//! anomalous round and resolves after `resolve_after` rounds without one.

use std::collections::BTreeMap;
use std::time::Duration;

use super::counters::Round;
use crate::alert::{Firing, Severity};

/// What is watched per node and service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    /// The share of 5xx answers.
    ErrorRate,
    /// The share of requests that timed out.
    TimeoutRate,
    /// The 99th percentile latency.
    P99,
    /// Requests per second, when they fall.
    RateDrop,
}

/// The floors and the learning; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// The smallest share of 5xx (and of timeouts) that fires.
    pub error_ratio: f64,
    /// The fewest 5xx (or timeouts) in a round that fire.
    pub min_errors: f64,
    /// How many times its baseline a ratio or the p99 must be.
    pub factor: f64,
    /// The smallest p99 that fires.
    pub p99_floor: Duration,
    /// The fewest requests in a round to judge a p99 or teach a ratio.
    pub min_requests: f64,
    /// A rate under this share of its baseline has dropped.
    pub drop_ratio: f64,
    /// The smallest baseline rate (per second) whose drop fires.
    pub drop_min_rate: f64,
    /// Rounds learned before a baseline is used.
    pub warmup_rounds: u32,
    /// The EWMA's weight of a new round.
    pub alpha: f64,
    /// Rounds without an anomaly that resolve one.
    pub resolve_after: u32,
}

/// A change of a signal.
#[derive(Clone, Debug, PartialEq)]
pub enum TrafficEvent {
    /// A signal left its baseline (again: its evidence is new).
    Firing(Firing),
    /// It is back to normal.
    Resolved {
        /// The alert key.
        key: String,
        /// The round that ended it.
        evidence: String,
    },
}

/// The learned state of every node, service and signal.
#[derive(Debug)]
pub struct Detector {
    thresholds: Thresholds,
    states: BTreeMap<(String, String, Signal), State>,
}

#[derive(Clone, Debug, Default)]
struct State {
    baseline: f64,
    learned: u32,
    firing: bool,
    calm: u32,
}

/// One signal's judgement of one round.
struct Judged {
    value: f64,
    anomalous: bool,
    /// Whether the round may teach the baseline (when not anomalous).
    teaches: bool,
    summary: String,
    floor: f64,
    /// The baseline it was judged against; none before warm-up ends.
    baseline: Option<f64>,
}

// === impl Signal ===

impl Signal {
    /// Every signal.
    pub const ALL: [Self; 4] = [
        Self::ErrorRate,
        Self::TimeoutRate,
        Self::P99,
        Self::RateDrop,
    ];

    /// `5xx_rate`, `timeout_rate`, `p99` or `request_rate_drop`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorRate => "5xx_rate",
            Self::TimeoutRate => "timeout_rate",
            Self::P99 => "p99",
            Self::RateDrop => "request_rate_drop",
        }
    }

    /// The severity of its alert: failing requests are critical, slow or
    /// missing ones a warning.
    pub fn severity(self) -> Severity {
        match self {
            Self::ErrorRate | Self::TimeoutRate => Severity::Critical,
            Self::P99 | Self::RateDrop => Severity::Warning,
        }
    }

    /// The alert key: `traffic:<signal>:<node>/<service>`.
    pub fn key(self, node: &str, service: &str) -> String {
        format!("traffic:{}:{node}/{service}", self.as_str())
    }
}

// === impl Thresholds ===

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            error_ratio: 0.05,
            min_errors: 5.0,
            factor: 3.0,
            p99_floor: Duration::from_millis(250),
            min_requests: 20.0,
            drop_ratio: 0.2,
            drop_min_rate: 5.0,
            warmup_rounds: 6,
            alpha: 0.1,
            resolve_after: 2,
        }
    }
}

// === impl Detector ===

impl Detector {
    /// A detector that has learned nothing.
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            states: BTreeMap::new(),
        }
    }

    /// Judges one round of `service` on `node`; the changes it makes.
    pub fn observe(&mut self, node: &str, service: &str, round: &Round) -> Vec<TrafficEvent> {
        let mut events = Vec::new();
        for signal in Signal::ALL {
            let key = (node.to_owned(), service.to_owned(), signal);
            let state = self.states.entry(key).or_default();
            let judged = judge(&self.thresholds, signal, state, round);
            let t = &self.thresholds;
            if let Some(j) = &judged
                && !j.anomalous
                && j.teaches
            {
                state.baseline = if state.learned == 0 {
                    j.value
                } else {
                    state.baseline + t.alpha * (j.value - state.baseline)
                };
                state.learned = state.learned.saturating_add(1);
            }
            let key = signal.key(node, service);
            if let Some(j) = judged.as_ref().filter(|j| j.anomalous) {
                state.calm = 0;
                state.firing = true;
                events.push(TrafficEvent::Firing(firing(signal, node, service, key, j)));
            } else if state.firing {
                state.calm += 1;
                if state.calm >= t.resolve_after {
                    state.firing = false;
                    let evidence = judged.map_or_else(
                        || "no requests to judge".to_owned(),
                        |j| format!("back to normal: {}", j.summary),
                    );
                    events.push(TrafficEvent::Resolved { key, evidence });
                }
            }
        }
        events
    }

    /// Forgets everything learned about `node`.
    pub fn forget(&mut self, node: &str) {
        self.states.retain(|(n, _, _), _| n != node);
    }

    /// Whether `signal` of `service` on `node` fires now.
    pub fn is_firing(&self, node: &str, service: &str, signal: Signal) -> bool {
        self.states
            .get(&(node.to_owned(), service.to_owned(), signal))
            .is_some_and(|s| s.firing)
    }
}

/// The baseline, once learned.
fn baseline(t: &Thresholds, state: &State) -> Option<f64> {
    (state.learned >= t.warmup_rounds).then_some(state.baseline)
}

/// One signal's judgement of `round`; none when the round has nothing to
/// say about it (no requests, no timeout series).
fn judge(t: &Thresholds, signal: Signal, state: &State, round: &Round) -> Option<Judged> {
    let base = baseline(t, state);
    let busy = round.requests >= t.min_requests;
    match signal {
        Signal::ErrorRate | Signal::TimeoutRate => {
            let (ratio, count, what) = match signal {
                Signal::ErrorRate => (round.error_ratio()?, round.errors, "5xx"),
                _ => (round.timeout_ratio()?, round.timeouts?, "timeouts"),
            };
            let anomalous = ratio >= t.error_ratio
                && count >= t.min_errors
                && base.is_none_or(|b| ratio >= t.factor * b);
            Some(Judged {
                value: ratio,
                anomalous,
                teaches: busy,
                summary: format!(
                    "{what} {} ({count} of {} requests in {}s); baseline {}, floor {} and {} {what}",
                    percent(ratio),
                    round.requests,
                    round.seconds,
                    base.map_or("not learned yet".into(), percent),
                    percent(t.error_ratio),
                    t.min_errors,
                ),
                floor: t.error_ratio,
                baseline: base,
            })
        }
        Signal::P99 => {
            let p99 = round.p99?;
            let floor = t.p99_floor.as_secs_f64();
            let anomalous = busy && p99 >= floor && base.is_some_and(|b| p99 >= t.factor * b);
            Some(Judged {
                value: p99,
                anomalous,
                teaches: busy,
                summary: format!(
                    "p99 {} over {} requests in {}s; baseline {}, floor {}x baseline and {}",
                    millis(p99),
                    round.requests,
                    round.seconds,
                    base.map_or("not learned yet".into(), millis),
                    t.factor,
                    millis(floor),
                ),
                floor,
                baseline: base,
            })
        }
        Signal::RateDrop => {
            let rate = round.request_rate();
            let anomalous = base.is_some_and(|b| b >= t.drop_min_rate && rate < t.drop_ratio * b);
            Some(Judged {
                value: rate,
                anomalous,
                teaches: true,
                summary: format!(
                    "{rate:.1} requests/s; baseline {}, floor under {} of a baseline of at least {}/s",
                    base.map_or("not learned yet".into(), |b| format!("{b:.1}/s")),
                    percent(t.drop_ratio),
                    t.drop_min_rate,
                ),
                floor: t.drop_ratio * base.unwrap_or(0.0),
                baseline: base,
            })
        }
    }
}

fn firing(signal: Signal, node: &str, service: &str, key: String, j: &Judged) -> Firing {
    Firing {
        key,
        rule: signal.as_str().to_owned(),
        target: format!("{node}/{service}"),
        service: service.to_owned(),
        node: node.to_owned(),
        severity: signal.severity(),
        summary: j.summary.clone(),
        lines: vec![
            format!("value={}", j.value),
            j.baseline
                .map_or_else(|| "baseline=none".to_owned(), |b| format!("baseline={b}")),
            format!("floor={}", j.floor),
        ],
    }
}

fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

fn millis(seconds: f64) -> String {
    format!("{:.0}ms", seconds * 1000.0)
}

#[cfg(test)]
mod tests;
