//! A load generator: K concurrent keep-alive workers sending GETs through a
//! node's proxy until stopped, recording every outcome (status, the
//! `x-instance` that answered, the error, when). Bounded in requests and time.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use bytes::Bytes;
use hyper::Method;
use tokio::{task::JoinHandle, time::MissedTickBehavior};

use crate::{http::HttpClient, netns::Netns};

/// How a load runs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Concurrent workers, each with its own keep-alive connection.
    pub workers: usize,
    /// Pause between two requests of one worker (zero: back to back).
    pub interval: Duration,
    /// Stop after this many requests in all.
    pub max_requests: usize,
    /// Stop after this long.
    pub max_duration: Duration,
    /// Bound on each request; a timeout counts as a failure.
    pub request_timeout: Duration,
    /// Extra request headers (e.g. `Host`).
    pub headers: Vec<(String, String)>,
}

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When the response (or error) arrived.
    pub at: Instant,
    /// How long the request took.
    pub latency: Duration,
    /// Status, when a response arrived.
    pub status: Option<u16>,
    /// The `x-instance` header of the response.
    pub instance: Option<String>,
    /// The error, when no response arrived (connection errors, timeouts).
    pub error: Option<String>,
}

/// A running load. Dropping it stops the workers.
#[derive(Debug)]
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Every outcome of a load.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// When the load started.
    pub started: Instant,
    /// Outcomes in arrival order.
    pub samples: Vec<Sample>,
}

// === impl LoadOptions ===

impl Default for LoadOptions {
    /// 4 workers at one request per 5 ms each (≈ 800/s), at most 200,000
    /// requests or 3 minutes.
    fn default() -> Self {
        Self {
            workers: 4,
            interval: Duration::from_millis(5),
            max_requests: 200_000,
            max_duration: Duration::from_secs(180),
            request_timeout: Duration::from_secs(20),
            headers: Vec::new(),
        }
    }
}

// === impl Sample ===

impl Sample {
    /// A 200 response.
    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

// === impl Load ===

impl Load {
    /// Starts `opts.workers` workers sending `GET path` to `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, path: &str, opts: LoadOptions) -> Self {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let tasks = (0..opts.workers.max(1))
            .map(|_| {
                let worker = Worker {
                    client: HttpClient::new(ns, addr).with_timeout(opts.request_timeout),
                    path: path.to_owned(),
                    opts: opts.clone(),
                    started,
                    stop: stop.clone(),
                    samples: samples.clone(),
                    count: count.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Self {
            started,
            stop,
            samples,
            tasks,
        }
    }

    /// Outcomes so far.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            started: self.started,
            samples: self.lock().clone(),
        }
    }

    /// Number of outcomes so far.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Waits until at least `more` further outcomes have arrived.
    pub async fn wait_more(&self, more: usize, timeout: Duration) -> Result<()> {
        let target = self.count() + more;
        let deadline = Instant::now() + timeout;
        while self.count() < target {
            if Instant::now() >= deadline {
                bail!(
                    "load: {} outcomes after {timeout:?}, wanted {target}",
                    self.count()
                );
            }
            if self.tasks.iter().all(JoinHandle::is_finished) {
                bail!("load: workers stopped (limits reached) at {}", self.count());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops the workers (each finishes its request in flight) and returns every outcome.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.report()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sample>> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Worker {
    client: HttpClient,
    path: String,
    opts: LoadOptions,
    started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    count: Arc<AtomicUsize>,
}

impl Worker {
    async fn run(mut self) {
        let headers: Vec<(&str, &str)> = self
            .opts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut tick = tokio::time::interval(self.opts.interval.max(Duration::from_micros(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while !self.stop.load(Ordering::Relaxed)
            && self.started.elapsed() < self.opts.max_duration
            && self.count.fetch_add(1, Ordering::Relaxed) < self.opts.max_requests
        {
            if !self.opts.interval.is_zero() {
                tick.tick().await;
            }
            let begin = Instant::now();
            let result = self
                .client
                .request(Method::GET, &self.path, &headers, Bytes::new())
                .await;
            let at = Instant::now();
            let sample = match result {
                Ok(resp) => Sample {
                    at,
                    latency: at - begin,
                    status: Some(resp.status.as_u16()),
                    instance: resp.header("x-instance").map(str::to_owned),
                    error: None,
                },
                Err(e) => Sample {
                    at,
                    latency: at - begin,
                    status: None,
                    instance: None,
                    error: Some(format!("{e:#}")),
                },
            };
            self.samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(sample);
        }
    }
}

// === impl LoadReport ===

impl LoadReport {
    /// Number of requests.
    pub fn total(&self) -> usize {
        self.samples.len()
    }

    /// Requests that did not get a 200 (errors and other statuses).
    pub fn failures(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| !s.ok()).collect()
    }

    /// 200 responses per `x-instance`.
    pub fn by_instance(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.ok()) {
            let key = s.instance.clone().unwrap_or_else(|| "<none>".into());
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }

    /// When `instance` last answered, if ever.
    pub fn last_from(&self, instance: &str) -> Option<Instant> {
        self.samples
            .iter()
            .filter(|s| s.instance.as_deref() == Some(instance))
            .map(|s| s.at)
            .max()
    }

    /// Outcomes that arrived after `t`.
    pub fn after(&self, t: Instant) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.at > t)
    }

    /// Latency quantile (0.0..=1.0) of all requests.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut l: Vec<Duration> = self.samples.iter().map(|s| s.latency).collect();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort();
        let i = ((l.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        l[i]
    }

    /// One line: totals, failures, per instance, latency p50/p99, and the first failures.
    pub fn summary(&self) -> String {
        let failures = self.failures();
        let mut first: Vec<String> = failures
            .iter()
            .take(5)
            .map(|s| {
                format!(
                    "[+{:?}] {}",
                    s.at.duration_since(self.started),
                    s.error
                        .clone()
                        .unwrap_or_else(|| format!("status {:?}", s.status))
                )
            })
            .collect();
        if failures.len() > first.len() {
            first.push(format!("... {} more", failures.len() - first.len()));
        }
        format!(
            "{} requests, {} failed, by instance {:?}, p50 {:?}, p99 {:?}{}",
            self.total(),
            failures.len(),
            self.by_instance(),
            self.latency_quantile(0.5),
            self.latency_quantile(0.99),
            if first.is_empty() {
                String::new()
            } else {
                format!("; failures: {}", first.join("; "))
            }
        )
    }
}

/// The median and the maximum of `values` (zero for none).
pub fn median_max(values: &[Duration]) -> (Duration, Duration) {
    let mut v = values.to_vec();
    v.sort();
    match v.len() {
        0 => (Duration::ZERO, Duration::ZERO),
        n if n % 2 == 1 => (v[n / 2], v[n - 1]),
        n => ((v[n / 2 - 1] + v[n / 2]) / 2, v[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_max_of_odd_even_and_empty() {
        let ms = Duration::from_millis;
        assert_eq!(median_max(&[ms(3), ms(1), ms(2)]), (ms(2), ms(3)));
        assert_eq!(
            median_max(&[ms(4), ms(1), ms(2), ms(3)]),
            (Duration::from_micros(2500), ms(4))
        );
        assert_eq!(median_max(&[]), (Duration::ZERO, Duration::ZERO));
    }
}
