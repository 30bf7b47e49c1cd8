//! What a retry needs: whether a request may be sent again, a copy of its
//! body to send, and a budget that keeps retries from multiplying the load
//! on a service that is already failing.
//!
//! **Which requests.** One that never left the proxy (a failed connect, a
//! pooled connection found closed) always may: nothing acted on it. One
//! that was sent only when its method is idempotent (GET, HEAD, OPTIONS,
//! PUT, DELETE, TRACE) or its route allows it (`retry_non_idempotent`), and
//! when its body was kept whole: the body is copied as it streams to the
//! first instance, up to [`REPLAY_LIMIT`]; past that the copy is dropped
//! and the request is no longer replayable (Linkerd's rule).
//!
//! **The budget** (Finagle's and Linkerd's): every request deposits
//! `percent` % of a retry, every retry withdraws one, and `min_per_second`
//! retries a second are allowed on top, all over a sliding window of `ttl`
//! (ten slots of atomics). A retry over budget is not sent.

use std::{
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

/// Largest request body kept for a replay.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Slots of the budget's sliding window.
const SLOTS: usize = 10;

/// One retry, in the budget's units (a deposit of 20 % is 200).
const UNIT: i64 = 1000;

/// A route's retry budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetPolicy {
    /// Retries allowed as a percentage of requests.
    pub percent: f64,
    /// Retries allowed per second on top.
    pub min_per_second: u32,
    /// The window requests and retries count in.
    pub ttl: Duration,
}

/// A service's retry budget: deposits and withdrawals over a sliding window.
#[derive(Debug)]
pub struct Budget {
    epoch: Instant,
    /// The window's slot generation last seen (time / slot length).
    generation: AtomicU64,
    slots: [AtomicI64; SLOTS],
}

/// A copy of a request body kept for replays, published once the body has
/// been read whole within [`REPLAY_LIMIT`].
#[derive(Debug, Default)]
pub struct Captured {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

/// A request body that may be sent again.
#[derive(Debug)]
pub enum RetryBody {
    /// The client's body, copied as it streams.
    Tee(Tee),
    /// A copy, sent again.
    Replay(Replay),
}

/// The client's body, copied while it streams to the first instance.
#[derive(Debug)]
pub struct Tee {
    inner: Incoming,
    copy: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    overflow: bool,
    out: Arc<OnceLock<Captured>>,
}

/// A captured body, replayed frame by frame.
#[derive(Debug)]
pub struct Replay {
    captured: Arc<OnceLock<Captured>>,
    next: usize,
    trailers_sent: bool,
}

/// Whether `method` may be sent twice with the same effect (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

// === impl BudgetPolicy ===

impl BudgetPolicy {
    /// Checks the values; the error names the key.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if !(0.0..=1000.0).contains(&self.percent) {
            return Err(("retry_budget_percent", "must be 0..=1000"));
        }
        if self.min_per_second > 1_000_000 {
            return Err(("retry_budget_min_per_second", "must be at most 1000000"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.ttl) {
            return Err(("retry_budget_ttl", "must be 1s..=1h"));
        }
        Ok(())
    }

    fn deposit(&self) -> i64 {
        (self.percent * UNIT as f64 / 100.0).round() as i64
    }

    /// The retries allowed in a window on top of the deposits.
    fn reserve(&self) -> i64 {
        (i64::from(self.min_per_second) * UNIT).saturating_mul(self.ttl.as_secs() as i64)
    }
}

// === impl Budget ===

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl Budget {
    /// An empty budget (only the per-second reserve is available).
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            slots: Default::default(),
        }
    }

    /// Counts a request.
    pub fn deposit(&self, policy: &BudgetPolicy, now: Instant) {
        let amount = policy.deposit();
        if amount > 0 {
            self.slot(policy, now).fetch_add(amount, Ordering::Relaxed);
        }
    }

    /// Takes one retry if the budget has it.
    pub fn withdraw(&self, policy: &BudgetPolicy, now: Instant) -> bool {
        let slot = self.slot(policy, now);
        let balance: i64 = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum::<i64>()
            .saturating_add(policy.reserve());
        if balance < UNIT {
            return false;
        }
        slot.fetch_sub(UNIT, Ordering::Relaxed);
        true
    }

    /// The current slot, after clearing the slots that aged out of the window.
    fn slot(&self, policy: &BudgetPolicy, now: Instant) -> &AtomicI64 {
        let slot_ns = (policy.ttl.as_nanos() / SLOTS as u128).max(1);
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        // Generation 0 is "never used": the first one is 1.
        let generation = u64::try_from(elapsed / slot_ns).unwrap_or(u64::MAX - 1) + 1;
        let mut seen = self.generation.load(Ordering::Relaxed);
        while generation > seen {
            match self.generation.compare_exchange_weak(
                seen,
                generation,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // This caller moved the window: it clears what left it.
                    let stale = (generation - seen).min(SLOTS as u64);
                    for g in (generation + 1 - stale)..=generation {
                        self.slots[(g % SLOTS as u64) as usize].store(0, Ordering::Relaxed);
                    }
                    break;
                }
                Err(actual) => seen = actual,
            }
        }
        &self.slots[(generation % SLOTS as u64) as usize]
    }
}

// === impl RetryBody ===

impl RetryBody {
    /// The client's `body`, copied for replays; the copy's handle.
    pub fn tee(body: Incoming) -> (Self, Arc<OnceLock<Captured>>) {
        let out = Arc::new(OnceLock::new());
        let tee = Tee {
            inner: body,
            copy: Vec::new(),
            trailers: None,
            len: 0,
            overflow: false,
            out: out.clone(),
        };
        (Self::Tee(tee), out)
    }

    /// A replay of `captured`, if the body was captured whole.
    pub fn replay(captured: &Arc<OnceLock<Captured>>) -> Option<Self> {
        captured.get()?;
        Some(Self::Replay(Replay {
            captured: captured.clone(),
            next: 0,
            trailers_sent: false,
        }))
    }
}

impl Body for RetryBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Tee(tee) => tee.poll(cx),
            Self::Replay(replay) => Poll::Ready(replay.next_frame().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Tee(tee) => tee.inner.is_end_stream(),
            Self::Replay(replay) => replay.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Tee(tee) => tee.inner.size_hint(),
            Self::Replay(replay) => {
                let len = replay
                    .captured
                    .get()
                    .map_or(0, |c| c.data.iter().map(|b| b.len() as u64).sum());
                SizeHint::with_exact(len)
            }
        }
    }
}

// === impl Tee ===

impl Tee {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    self.keep(data);
                } else if let Some(trailers) = f.trailers_ref() {
                    self.trailers = Some(trailers.clone());
                }
                if self.inner.is_end_stream() {
                    self.publish();
                }
            }
            None => self.publish(),
            Some(Err(_)) => self.overflow = true,
        }
        Poll::Ready(frame)
    }

    fn keep(&mut self, data: &Bytes) {
        if self.overflow {
            return;
        }
        self.len += data.len();
        if self.len > REPLAY_LIMIT {
            // Too big to replay: stop copying and free the copy.
            self.overflow = true;
            self.copy = Vec::new();
        } else if !data.is_empty() {
            self.copy.push(data.clone());
        }
    }

    fn publish(&mut self) {
        if !self.overflow && self.out.get().is_none() {
            let _ = self.out.set(Captured {
                data: std::mem::take(&mut self.copy),
                trailers: self.trailers.take(),
            });
        }
    }
}

// === impl Replay ===

impl Replay {
    fn next_frame(&mut self) -> Option<Frame<Bytes>> {
        let captured = self.captured.get()?;
        if let Some(data) = captured.data.get(self.next) {
            self.next += 1;
            return Some(Frame::data(data.clone()));
        }
        if self.trailers_sent {
            return None;
        }
        self.trailers_sent = true;
        captured.trailers.clone().map(Frame::trailers)
    }

    fn is_done(&self) -> bool {
        self.captured.get().is_none_or(|c| {
            self.next >= c.data.len() && (self.trailers_sent || c.trailers.is_none())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(percent: f64, min_per_second: u32) -> BudgetPolicy {
        BudgetPolicy {
            percent,
            min_per_second,
            ttl: Duration::from_secs(10),
        }
    }

    fn withdrawals(b: &Budget, p: &BudgetPolicy) -> usize {
        (0..100_000)
            .take_while(|_| b.withdraw(p, Instant::now()))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_fifth_of_the_requests_may_be_retried() {
        let b = Budget::new();
        let p = policy(20.0, 0);
        assert_eq!(withdrawals(&b, &p), 0);
        for _ in 0..100 {
            b.deposit(&p, Instant::now());
        }
        assert_eq!(withdrawals(&b, &p), 20);
        // Five more requests earn one more retry.
        for _ in 0..5 {
            b.deposit(&p, Instant::now());
        }
        assert_eq!(withdrawals(&b, &p), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_min_per_second_over_the_window() {
        let b = Budget::new();
        let p = policy(20.0, 10);
        // 10 per second over a 10 s window, without a single request.
        assert_eq!(withdrawals(&b, &p), 100);
        // Retries age out of the window like deposits do.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(withdrawals(&b, &p), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_ttl() {
        let b = Budget::new();
        let p = policy(20.0, 0);
        for _ in 0..100 {
            b.deposit(&p, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..50 {
            b.deposit(&p, Instant::now());
        }
        // At 10.5 s the first 100 left the window, the last 50 did not.
        tokio::time::advance(Duration::from_millis(5500)).await;
        assert_eq!(withdrawals(&b, &p), 10);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(withdrawals(&b, &p), 0);
    }

    #[test]
    fn budget_values_are_checked() {
        assert!(policy(20.0, 10).check().is_ok());
        assert_eq!(
            policy(-1.0, 10).check().unwrap_err().0,
            "retry_budget_percent"
        );
        let short = BudgetPolicy {
            ttl: Duration::from_millis(10),
            ..policy(20.0, 10)
        };
        assert_eq!(short.check().unwrap_err().0, "retry_budget_ttl");
    }

    #[test]
    fn idempotent_methods() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(is_idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT"] {
            assert!(!is_idempotent(&m.parse().unwrap()), "{m}");
        }
    }
}
