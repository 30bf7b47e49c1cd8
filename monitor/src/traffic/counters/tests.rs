use mesh_runtime::metrics::Registry;

use super::*;

/// A proxy's registry with the proxy's series names and labels.
struct FakeProxy {
    registry: Registry,
}

impl FakeProxy {
    fn new() -> Self {
        Self {
            registry: Registry::new(),
        }
    }

    /// `n` requests of `service` answered with `class`, each taking
    /// `seconds`.
    fn serve(&self, service: &str, class: &str, n: u64, seconds: f64) {
        self.registry
            .counter(REQUESTS, &[("service", service), ("code_class", class)])
            .increment(n);
        let h = self.registry.histogram(
            "mesh_proxy_request_duration_seconds",
            &[("service", service)],
        );
        for _ in 0..n {
            h.record(seconds);
        }
    }

    fn time_out(&self, service: &str, n: u64) {
        self.registry
            .counter(
                UPSTREAM_ERRORS,
                &[("service", service), ("kind", "timeout")],
            )
            .increment(n);
        self.registry
            .counter(
                UPSTREAM_ERRORS,
                &[("service", service), ("kind", "connect")],
            )
            .increment(1);
    }

    fn snapshot(&self) -> Snapshot {
        snapshot(&self.registry.render()).unwrap()
    }
}

#[test]
fn a_proxy_text_becomes_counters_per_service() {
    let proxy = FakeProxy::new();
    proxy.serve("web", "2xx", 90, 0.003);
    proxy.serve("web", "5xx", 10, 0.003);
    proxy.time_out("web", 4);
    proxy.serve("db", "2xx", 5, 0.2);
    let s = proxy.snapshot();
    let web = &s["web"];
    assert_eq!(
        (web.requests, web.errors, web.timeouts),
        (100.0, 10.0, Some(4.0))
    );
    assert_eq!(web.buckets.last(), Some(&(f64::INFINITY, 100.0)));
    assert_eq!(s["db"].timeouts, None);
    assert_eq!(s["db"].requests, 5.0);
}

#[test]
fn a_round_is_the_difference_of_two_snapshots() {
    let proxy = FakeProxy::new();
    proxy.serve("web", "2xx", 1000, 0.003);
    let before = proxy.snapshot();
    proxy.serve("web", "2xx", 150, 0.003);
    proxy.serve("web", "5xx", 50, 0.003);
    proxy.serve("web", "2xx", 4, 0.8);
    proxy.time_out("web", 2);
    let r = &rounds(&before, &proxy.snapshot(), 10.0)["web"];
    assert!(!r.reset);
    assert_eq!((r.requests, r.errors, r.timeouts), (204.0, 50.0, Some(2.0)));
    assert_eq!(r.request_rate(), 20.4);
    assert_eq!(r.error_ratio(), Some(50.0 / 204.0));
    // 4 of 204 requests took 0.8 s: the p99 lies in the (0.5, 1] bucket,
    // though the 1000 fast requests before the round would hide it.
    let p99 = r.p99.unwrap();
    assert!((0.5..=1.0).contains(&p99), "{p99}");
}

#[test]
fn a_restarted_proxy_counts_from_zero() {
    let old = FakeProxy::new();
    old.serve("web", "2xx", 5000, 0.003);
    let before = old.snapshot();
    let restarted = FakeProxy::new();
    restarted.serve("web", "2xx", 30, 0.003);
    restarted.serve("web", "5xx", 10, 0.003);
    let r = &rounds(&before, &restarted.snapshot(), 10.0)["web"];
    assert!(r.reset);
    assert_eq!((r.requests, r.errors), (40.0, 10.0));
    assert_eq!(r.error_ratio(), Some(0.25));
    // A service the new proxy has not seen yet: no requests at all.
    let r = &rounds(&before, &Snapshot::new(), 10.0)["web"];
    assert_eq!((r.requests, r.p99, r.error_ratio()), (0.0, None, None));
}

#[test]
fn quantiles_interpolate_within_their_bucket() {
    let b = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
    assert_eq!(quantile(0.5, &b), Some(0.1));
    assert!((quantile(0.99, &b).unwrap() - 0.198).abs() < 1e-9);
    let tail = [(0.1, 50.0), (f64::INFINITY, 100.0)];
    assert_eq!(quantile(0.99, &tail), Some(0.1));
    assert_eq!(quantile(0.99, &[(f64::INFINITY, 0.0)]), None);
}
