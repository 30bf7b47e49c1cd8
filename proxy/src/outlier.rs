//! Passive outlier detection: an instance that fails `consecutive_failures`
//! times in a row (a 5xx answer, a failed connect, a reset, a timeout) is
//! ejected, left out of balancing, for `base_ejection`, doubled at each
//! re-ejection up to `max_ejection` (Envoy's consecutive-5xx detector with
//! Linkerd's back-off). Back from an ejection it is on probation: its first
//! failure ejects it again at once, its first success clears its record.
//!
//! Never more than `max_ejected_percent` of a service's instances are out at
//! once: at least one of two or more may go, the last one never does (with
//! nowhere else to send a request, a failing instance beats none).
//!
//! The state is a few atomics per instance, read on every pick and written
//! on every answer; nothing runs in the background: an ejection simply ends
//! when its time has passed. It lives with the instance's connection state,
//! keyed by address, so it survives routing-table swaps.

use std::{
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use crate::table::{RoutingTable, Service};

/// Outlier detection settings of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive failures that eject; 0 turns detection off.
    pub consecutive_failures: u32,
    /// First ejection's length.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most instances of a service out at once, in percent.
    pub max_ejected_percent: u32,
}

/// One instance's failure record and ejection.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    consecutive: AtomicU32,
    /// End of the current or last ejection, in ns since `epoch`; 0: never.
    ejected_until: AtomicU64,
    /// Ejections since the last success on probation (the back-off's exponent).
    ejections: AtomicU32,
    probation: AtomicBool,
}

// === impl OutlierPolicy ===

impl OutlierPolicy {
    /// Checks the values; the error names the key.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.base_ejection.is_zero() {
            return Err(("outlier_base_ejection", "must be more than 0"));
        }
        if self.max_ejection < self.base_ejection {
            return Err((
                "outlier_max_ejection",
                "must be at least outlier_base_ejection",
            ));
        }
        if self.max_ejected_percent > 100 {
            return Err(("outlier_max_ejected_percent", "must be 0..=100"));
        }
        Ok(())
    }

    /// How long the ejection number `k` (0 for the first) lasts.
    pub fn ejection_time(&self, k: u32) -> Duration {
        let factor = 1u32.checked_shl(k.min(31)).unwrap_or(u32::MAX);
        self.base_ejection
            .checked_mul(factor)
            .unwrap_or(self.max_ejection)
            .min(self.max_ejection)
    }

    /// How many of `n` instances may be out at once.
    pub fn max_ejected(&self, n: usize) -> usize {
        if n < 2 || self.max_ejected_percent == 0 {
            return 0;
        }
        (n * self.max_ejected_percent as usize / 100)
            .max(1)
            .min(n - 1)
    }
}

// === impl Health ===

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A record without failures.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            consecutive: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            probation: AtomicBool::new(false),
        }
    }

    /// Whether the instance is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.nanos(now) < until
    }

    /// When the current ejection ends, if the instance is ejected.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0 && self.nanos(now) < until).then(|| self.epoch + Duration::from_nanos(until))
    }

    /// Failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// An answer that is not a failure: the streak ends, and on probation
    /// the record is cleared.
    pub fn record_success(&self, now: Instant) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.probation.load(Ordering::Relaxed) && !self.is_ejected(now) {
            self.probation.store(false, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A failure. Ejects the instance when it ends a streak of
    /// `consecutive_failures` (or comes on probation) and `may_eject` says
    /// the service can spare it; returns the ejection's length then.
    pub fn record_failure(
        &self,
        policy: &OutlierPolicy,
        now: Instant,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if policy.consecutive_failures == 0 {
            return None;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        let at = self.nanos(now);
        if until != 0 && at < until {
            // An answer to a request sent before the ejection.
            return None;
        }
        let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let probation = self.probation.load(Ordering::Relaxed);
        if (!probation && streak < policy.consecutive_failures) || !may_eject() {
            return None;
        }
        let k = self.ejections.load(Ordering::Relaxed);
        let length = policy.ejection_time(k);
        // Never 0 ("never ejected"): the length is more than 0.
        let end = at.saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX / 2));
        // One failure among concurrent ones ejects; the others see it done.
        self.ejected_until
            .compare_exchange(until, end, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        self.ejections.store(k.saturating_add(1), Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        Some(length)
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX / 2)
    }
}

/// Sets every service's `mesh_proxy_endpoints_ejected` gauge to its
/// instances ejected at `now`.
pub fn update_gauges(table: &RoutingTable, now: Instant) {
    for service in table.services() {
        service
            .metrics
            .ejected
            .set(ejected_count(service, now) as f64);
    }
}

/// Instances of `service` ejected at `now`.
pub fn ejected_count(service: &Service, now: Instant) -> usize {
    service
        .endpoints()
        .iter()
        .filter(|e| e.state.health.is_ejected(now))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: OutlierPolicy = OutlierPolicy {
        consecutive_failures: 5,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
        max_ejected_percent: 50,
    };

    fn fail_times(h: &Health, n: u32) -> Option<Duration> {
        let mut last = None;
        for _ in 0..n {
            last = h.record_failure(&POLICY, Instant::now(), || true);
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_eject_and_a_success_breaks_the_streak() {
        let h = Health::new();
        assert_eq!(fail_times(&h, 4), None);
        h.record_success(Instant::now());
        assert_eq!(fail_times(&h, 4), None);
        assert!(!h.is_ejected(Instant::now()));
        assert_eq!(fail_times(&h, 1), Some(Duration::from_secs(30)));
        assert!(h.is_ejected(Instant::now()));
        let until = h.ejected_until(Instant::now()).unwrap();
        assert_eq!(until - Instant::now(), Duration::from_secs(30));
        // Failures of requests sent before the ejection change nothing.
        assert_eq!(fail_times(&h, 10), None);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!h.is_ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_doubles_on_probation_failures_up_to_the_cap() {
        let h = Health::new();
        let mut lengths = vec![fail_times(&h, 5).unwrap()];
        for _ in 0..5 {
            let length = *lengths.last().unwrap();
            tokio::time::advance(length).await;
            assert!(!h.is_ejected(Instant::now()));
            // On probation: one failure is enough.
            lengths.push(fail_times(&h, 1).unwrap());
        }
        let secs: Vec<u64> = lengths.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [30, 60, 120, 240, 300, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_on_probation_clears_the_record() {
        let h = Health::new();
        fail_times(&h, 5).unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        h.record_success(Instant::now());
        // Back to a full streak, and the back-off starts over.
        assert_eq!(fail_times(&h, 4), None);
        assert_eq!(fail_times(&h, 1), Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_while_ejected_does_not_end_probation_early() {
        let h = Health::new();
        fail_times(&h, 5).unwrap();
        h.record_success(Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(fail_times(&h, 1), Some(Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_ejection_when_the_service_cannot_spare_the_instance() {
        let h = Health::new();
        for _ in 0..10 {
            assert_eq!(h.record_failure(&POLICY, Instant::now(), || false), None);
        }
        assert!(!h.is_ejected(Instant::now()));
        // Once it can, the next failure ejects.
        assert!(h.record_failure(&POLICY, Instant::now(), || true).is_some());
    }

    #[test]
    fn max_share_keeps_at_least_one_instance_and_ejects_at_least_one() {
        let at = |pct, n| {
            OutlierPolicy {
                max_ejected_percent: pct,
                ..POLICY
            }
            .max_ejected(n)
        };
        assert_eq!(at(50, 1), 0);
        assert_eq!(at(50, 2), 1);
        assert_eq!(at(50, 3), 1);
        assert_eq!(at(50, 10), 5);
        assert_eq!(at(10, 3), 1);
        assert_eq!(at(10, 30), 3);
        assert_eq!(at(100, 4), 3);
        assert_eq!(at(0, 10), 0);
    }

    #[test]
    fn detection_can_be_turned_off() {
        let h = Health::new();
        let off = OutlierPolicy {
            consecutive_failures: 0,
            ..POLICY
        };
        for _ in 0..100 {
            assert_eq!(h.record_failure(&off, Instant::now(), || true), None);
        }
    }
}
