//! Peak EWMA of an instance's latency (Finagle's and Linkerd's balancer
//! metric): the estimate decays toward zero with a time constant of
//! [`DECAY`], a slower answer than the (decayed) estimate becomes the
//! estimate at once (the peak), and a faster one is blended in with the
//! weight of its own duration. So a slow instance loses its traffic at its
//! first slow answer, and is tried again once its estimate has decayed to
//! the others' level, instead of never.
//!
//! Two atomics per instance, no lock: concurrent updates may lose one
//! sample, which an average does not notice.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// The time constant of the average and of the decay (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);

/// The estimate of an instance that has not answered yet: about what a
/// healthy instance on a local network answers in, so that a new instance
/// gets its share at once without being flooded before its first answer.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// What a failed attempt (a failed connect, a reset, a timeout, a 5xx)
/// counts as, when it took less: a fast failure must not look like a fast
/// answer.
pub const FAILURE_RTT: Duration = Duration::from_millis(100);

/// An instance's latency estimate.
#[derive(Debug)]
pub struct Ewma {
    epoch: Instant,
    /// The estimate in ns, as `f64` bits.
    rtt: AtomicU64,
    /// When it was last updated, in ns since `epoch`; 0: never.
    stamp: AtomicU64,
}

// === impl Ewma ===

impl Default for Ewma {
    fn default() -> Self {
        Self::new()
    }
}

impl Ewma {
    /// An estimate without samples.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            rtt: AtomicU64::new(0f64.to_bits()),
            stamp: AtomicU64::new(0),
        }
    }

    /// The estimate at `now`, in ns, decayed since the last sample.
    pub fn estimate(&self, now: Instant) -> f64 {
        let stamp = self.stamp.load(Ordering::Relaxed);
        if stamp == 0 {
            return DEFAULT_RTT.as_nanos() as f64;
        }
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let idle = self.nanos(now).saturating_sub(stamp) as f64;
        rtt * (-idle / DECAY.as_nanos() as f64).exp()
    }

    /// Takes in one latency sample measured at `now`.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let at = self.nanos(now).max(1);
        let current = self.estimate(now);
        let next = if self.stamp.load(Ordering::Relaxed) == 0 || sample > current {
            sample
        } else {
            let w = (-sample / DECAY.as_nanos() as f64).exp();
            current * w + sample * (1.0 - w)
        };
        self.rtt.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(at, Ordering::Relaxed);
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(e: &Ewma) -> f64 {
        e.estimate(Instant::now()) / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn a_peak_is_taken_at_once_and_decays_with_time() {
        let e = Ewma::new();
        assert_eq!(ms(&e), 1.0);
        e.observe(Duration::from_millis(2), Instant::now());
        assert_eq!(ms(&e), 2.0);
        e.observe(Duration::from_millis(500), Instant::now());
        assert_eq!(ms(&e), 500.0);
        // Idle, it decays by e every DECAY.
        tokio::time::advance(DECAY).await;
        assert!(
            (ms(&e) - 500.0 / std::f64::consts::E).abs() < 0.01,
            "{}",
            ms(&e)
        );
        tokio::time::advance(DECAY * 5).await;
        assert!(ms(&e) < 2.0, "{}", ms(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn faster_samples_do_not_hide_a_peak_before_it_decays() {
        let e = Ewma::new();
        e.observe(Duration::from_millis(100), Instant::now());
        // One fast sample right after barely moves it...
        tokio::time::advance(Duration::from_millis(1)).await;
        e.observe(Duration::from_millis(1), Instant::now());
        assert!(ms(&e) > 99.0, "{}", ms(&e));
        // ...with a steady stream of them it is down at their level in a
        // few DECAYs, and stays there.
        for _ in 0..5000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            e.observe(Duration::from_millis(1), Instant::now());
        }
        assert!((ms(&e) - 1.0).abs() < 0.01, "{}", ms(&e));
    }
}
