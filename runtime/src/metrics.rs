//! A Prometheus metrics registry that is passed down to whoever records,
//! instead of a global recorder: tests build their own and assert values.
//! Handles ([`Counter`], [`Gauge`], [`Histogram`]) are registered once and
//! kept, so the hot path records with no lookup.

use std::sync::Arc;

pub use metrics::{Counter, Gauge, Histogram};
use metrics::{Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Latency buckets in seconds, from 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A cheaply cloned handle to one Prometheus registry.
#[derive(Clone)]
pub struct Registry {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry; histograms use [`LATENCY_BUCKETS`].
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("the bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        Self {
            recorder: Arc::new(recorder),
            handle,
        }
    }

    /// Describes a counter (its `# HELP` line).
    pub fn describe_counter(&self, name: &'static str, help: &'static str) {
        self.recorder
            .describe_counter(name.into(), None, help.into());
    }

    /// Describes a gauge (its `# HELP` line).
    pub fn describe_gauge(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_gauge(name.into(), None, help.into());
    }

    /// Describes a histogram of seconds (its `# HELP` line).
    pub fn describe_histogram(&self, name: &'static str, help: &'static str) {
        self.recorder
            .describe_histogram(name.into(), Some(Unit::Seconds), help.into());
    }

    /// The counter `name` with `labels`, registered on first use.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }

    /// The gauge `name` with `labels`, registered on first use.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &META)
    }

    /// The histogram `name` with `labels`, registered on first use.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder.register_histogram(&key(name, labels), &META)
    }

    /// Folds recorded histogram samples into their buckets. The exporter
    /// keeps every raw sample until a render or an upkeep, so a process
    /// that records on a hot path calls this periodically (once a second)
    /// to keep its memory flat between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The registry in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, (*v).to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let r = Registry::new();
        r.describe_counter("mesh_test_total", "A test counter.");
        let c = r.counter("mesh_test_total", &[("service", "orders")]);
        c.increment(3);
        r.histogram("mesh_test_seconds", &[]).record(0.002);
        let text = r.render();
        assert!(
            text.contains("mesh_test_total{service=\"orders\"} 3"),
            "{text}"
        );
        assert!(text.contains("mesh_test_seconds_bucket"), "{text}");
    }
}
