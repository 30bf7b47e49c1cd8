//! Jittered exponential backoff for every retry loop: the delay doubles
//! from `min` up to `max`, and each wait is drawn uniformly from the upper
//! half of the current delay so that many clients do not retry in step.

use std::time::Duration;

/// Exponential backoff state for one retry loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `min`, never exceeding `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay to wait, jittered; doubles the base for the call after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// Waits for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        let capped = b.next_delay();
        assert!(capped >= Duration::from_millis(500), "{capped:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
