//! Proxy texts through the scraper into the book, and restored traffic
//! alerts confirmed, expired or resolved.

use std::collections::BTreeSet;

use consul_client::{Client, ClientConfig};
use mesh_runtime::metrics::Registry;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::alert::{Alert, Change, Firing, Severity};

const KEY: &str = "traffic:5xx_rate:n1/web";

fn feed(config: &TrafficConfig) -> (TrafficAlerts, Arc<AlertBook>, UnboundedReceiver<Change>) {
    let (book, outbox) = AlertBook::new();
    let book = Arc::new(book);
    let metrics = MonitorMetrics::new(&Registry::new());
    (
        TrafficAlerts::new(book.clone(), config, metrics),
        book,
        outbox,
    )
}

fn stored(key: &str) -> Alert {
    let mut alert = Alert::open_event(
        AlertKind::Traffic,
        &Firing {
            key: key.into(),
            rule: "5xx_rate".into(),
            target: "n1/web".into(),
            service: "web".into(),
            node: "n1".into(),
            severity: Severity::Critical,
            summary: "5xx 50.0%".into(),
            lines: Vec::new(),
        },
        1,
    );
    alert.open_sent = true;
    alert
}

fn drain(rx: &mut UnboundedReceiver<Change>) -> Vec<Change> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// A proxy's registry, rendered as its `/metrics`.
struct FakeProxy(Registry);

impl FakeProxy {
    fn serve(&self, service: &str, ok: u64, failed: u64) {
        let class = |c: &str| {
            self.0.counter(
                counters::REQUESTS,
                &[("service", service), ("code_class", c)],
            )
        };
        class("2xx").increment(ok);
        class("5xx").increment(failed);
        let h = self.0.histogram(
            "mesh_proxy_request_duration_seconds",
            &[("service", service)],
        );
        for _ in 0..ok + failed {
            h.record(0.004);
        }
    }
}

#[test]
fn a_proxy_failing_half_its_requests_opens_a_traffic_alert_and_a_restart_does_not() {
    let config = TrafficConfig::default();
    let (alerts, book, mut outbox) = feed(&config);
    let consul = Client::new(&ClientConfig::new(["http://127.0.0.1:1"])).unwrap();
    let mut scraper = Scraper::new(
        consul,
        Arc::new(crate::bridges::Bridges::new(8890, None).unwrap()),
        config,
        alerts,
    );
    let start = Instant::now();
    let at = |round: u32| start + config.interval * round;
    let proxy = FakeProxy(Registry::new());
    for round in 0..20 {
        proxy.serve("web", 1000, 2);
        scraper.ingest("n1", &proxy.0.render(), at(round));
    }
    // The proxy restarts: its counters start from zero, no anomaly.
    let proxy = FakeProxy(Registry::new());
    proxy.serve("web", 1000, 2);
    scraper.ingest("n1", &proxy.0.render(), at(20));
    assert!(book.open_alerts().is_empty(), "{:?}", book.open_alerts());
    assert!(drain(&mut outbox).is_empty());

    proxy.serve("web", 500, 500);
    scraper.ingest("n1", &proxy.0.render(), at(21));
    let open = book.open_alerts();
    assert_eq!(open.len(), 1, "{open:?}");
    let alert = &open[0];
    assert_eq!((alert.key.as_str(), alert.kind), (KEY, AlertKind::Traffic));
    assert_eq!((alert.node.as_str(), alert.service.as_str()), ("n1", "web"));
    assert_eq!(alert.target, "n1/web");
    assert!(
        alert.evidence.starts_with("5xx 50.0% (500 of 1000"),
        "{}",
        alert.evidence
    );
    assert_eq!(
        alert.kv_key(),
        "mesh/monitor/alerts/traffic:5xx_rate:n1%2Fweb"
    );
    assert!(matches!(&drain(&mut outbox)[..], [Change::Opened(_)]));

    // The node leaves the catalog: its alert resolves.
    scraper.forget_except(&BTreeSet::new());
    assert!(book.open_alerts().is_empty());
    assert!(
        matches!(&drain(&mut outbox)[..], [Change::Resolved(a)] if a.evidence.contains("left the catalog"))
    );
}

#[test]
fn a_restored_alert_is_not_sent_again_and_resolves_unless_confirmed() {
    let config = TrafficConfig::default();
    let (mut alerts, book, mut outbox) = feed(&config);
    book.restore(vec![stored(KEY), stored("traffic:p99:n1/web")]);
    let now = Instant::now();
    alerts.restored(now, 5);
    assert!(
        drain(&mut outbox).is_empty(),
        "restored alerts are not sent again"
    );
    // The detector fires one of them again: it stays open, not sent.
    let firing = match book.open_alerts().into_iter().find(|a| a.key == KEY) {
        Some(a) => Firing {
            key: a.key,
            rule: a.rule,
            target: a.target,
            service: a.service,
            node: a.node,
            severity: a.severity,
            summary: "5xx 40.0%".into(),
            lines: Vec::new(),
        },
        None => panic!("the restored alert is open"),
    };
    alerts.apply(TrafficEvent::Firing(firing), 6);
    assert!(drain(&mut outbox).is_empty());
    alerts.expire(now + Duration::from_secs(3600), 7);
    let open = book.open_alerts();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].key.as_str(), open[0].evidence.as_str()),
        (KEY, "5xx 40.0%")
    );
    assert!(
        matches!(&drain(&mut outbox)[..], [Change::Resolved(a)] if a.key == "traffic:p99:n1/web")
    );
}

#[test]
fn with_traffic_off_restored_alerts_resolve_at_once_and_others_stay() {
    let config = TrafficConfig {
        enabled: false,
        ..TrafficConfig::default()
    };
    let (mut alerts, book, mut outbox) = feed(&config);
    let mut log = stored("log:errors:web");
    log.kind = AlertKind::Log;
    book.restore(vec![stored(KEY), log]);
    alerts.restored(Instant::now(), 5);
    let open = book.open_alerts();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].kind, AlertKind::Log);
    assert!(
        matches!(&drain(&mut outbox)[..], [Change::Resolved(a)] if a.key == KEY && a.evidence.contains("turned off"))
    );
    // The probe loop's reconcile leaves traffic alerts alone.
    book.restore(vec![stored(KEY)]);
    book.reconcile(&[], true, 9);
    assert_eq!(book.open_alerts().len(), 2);
}
