//! Log events into the book, and restored log alerts confirmed or expired.

use mesh_runtime::metrics::Registry;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::{
    alert::{Alert, Change, Severity},
    logs::{LogsConfig, config::PatternRuleConfig},
};

const KEY: &str = "log:errors:/var/log/app.log";

fn logs() -> Logs {
    LogsConfig {
        poll_interval: Some(HumanDuration(Duration::from_millis(100))),
        rescan_interval: Some(HumanDuration(Duration::from_millis(500))),
        patterns: vec![PatternRuleConfig {
            name: "errors".into(),
            files: "/var/log/app.log".into(),
            pattern: "ERROR".into(),
            regex: false,
            threshold: 3,
            window: HumanDuration(Duration::from_secs(2)),
            severity: Some(Severity::Critical),
        }],
        ..LogsConfig::default()
    }
    .validate()
    .unwrap()
}

fn feed(logs: Option<&Logs>) -> (LogAlerts, Arc<AlertBook>, UnboundedReceiver<Change>) {
    let (book, outbox) = AlertBook::new();
    let book = Arc::new(book);
    let metrics = MonitorMetrics::new(&Registry::new());
    (LogAlerts::new(book.clone(), logs, metrics), book, outbox)
}

fn fired(key: &str, summary: &str) -> LogEvent {
    LogEvent::Firing {
        key: key.into(),
        rule: key.split(':').nth(1).unwrap().into(),
        severity: Severity::Critical,
        summary: summary.into(),
        evidence: vec!["ERROR boom".into()],
    }
}

fn stored(key: &str, rule: &str) -> Alert {
    let mut a = Alert::open_log(
        &Firing {
            key: key.into(),
            rule: rule.into(),
            target: "/var/log/app.log".into(),
            service: String::new(),
            severity: Severity::Critical,
            summary: "3 lines".into(),
            lines: Vec::new(),
            node: String::new(),
        },
        5,
    );
    a.open_sent = true;
    a
}

fn drain(rx: &mut UnboundedReceiver<Change>) -> Vec<Change> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[test]
fn firing_opens_and_resolved_resolves_the_alert_of_the_key() {
    let logs = logs();
    let (mut feed, book, mut outbox) = feed(Some(&logs));
    feed.apply(fired(KEY, "3 lines"), 10);
    feed.apply(fired(KEY, "3 lines"), 11);
    let open = book.open_alerts();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].target.as_str(), open[0].service.as_str()),
        ("/var/log/app.log", ""),
        "a pattern rule names a file"
    );
    assert_eq!(open[0].severity, Severity::Critical);
    feed.apply(
        LogEvent::Resolved {
            key: KEY.into(),
            rule: "errors".into(),
            summary: "quiet".into(),
        },
        12,
    );
    assert!(book.open_alerts().is_empty());
    let changes = drain(&mut outbox);
    assert!(
        matches!(&changes[..], [Change::Opened(_), Change::Resolved(r)] if r.evidence == "quiet"),
        "{changes:?}"
    );
}

#[test]
fn a_restored_alert_fired_again_stays_open_without_being_sent() {
    let logs = logs();
    let (mut feed, book, mut outbox) = feed(Some(&logs));
    book.restore(vec![stored(KEY, "errors")]);
    let start = Instant::now();
    feed.restored(start, 100);
    feed.apply(fired(KEY, "4 lines"), 101);
    assert_eq!(feed.next_expiry(), None, "confirmed");
    feed.expire(start + Duration::from_secs(60), 102);
    assert_eq!(book.open_alerts()[0].evidence, "4 lines");
    assert!(drain(&mut outbox).is_empty(), "nothing sent again");
}

#[test]
fn a_restored_alert_not_fired_again_resolves_after_its_window() {
    let logs = logs();
    let (mut feed, book, mut outbox) = feed(Some(&logs));
    book.restore(vec![stored(KEY, "errors")]);
    let start = Instant::now();
    feed.restored(start, 100);
    // The 2s window and twice the 500ms rescan interval.
    assert_eq!(feed.next_expiry(), Some(start + Duration::from_secs(3)));
    feed.expire(start + Duration::from_millis(2999), 101);
    assert_eq!(book.open_alerts().len(), 1, "not yet");
    feed.expire(start + Duration::from_secs(3), 102);
    assert!(book.open_alerts().is_empty());
    let changes = drain(&mut outbox);
    let [Change::Resolved(r)] = &changes[..] else {
        panic!("{changes:?}")
    };
    assert_eq!(
        r.evidence,
        "not seen again within 2s after the monitor restarted"
    );
}

#[test]
fn a_restored_alert_of_a_rule_gone_resolves_at_once() {
    let (mut feed, book, mut outbox) = feed(None);
    book.restore(vec![stored("log:old:/var/log/app.log", "old")]);
    feed.restored(Instant::now(), 100);
    assert!(book.open_alerts().is_empty());
    let changes = drain(&mut outbox);
    let [Change::Resolved(r)] = &changes[..] else {
        panic!("{changes:?}")
    };
    assert_eq!(r.evidence, "log rule \"old\" is no longer configured");
}

#[test]
fn probe_alerts_are_not_the_feeds() {
    let (mut feed, book, mut outbox) = feed(None);
    let mut probe = Alert::open(
        crate::probe::Outcome::Hung,
        &crate::alert::TargetRef {
            id: "n1/w1".into(),
            service: "web".into(),
            instance_id: "w1".into(),
            node: "n1".into(),
            probe: "http://127.0.0.1:1/health".into(),
        },
        "hung",
        1,
    );
    probe.open_sent = true;
    book.restore(vec![probe]);
    feed.restored(Instant::now(), 100);
    assert_eq!(book.open_alerts().len(), 1);
    assert!(drain(&mut outbox).is_empty());
}
