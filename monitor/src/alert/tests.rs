//! Dedup, resolve and restore, without Consul.

use super::*;

fn target(id: &str) -> TargetRef {
    TargetRef {
        id: format!("n1/{id}"),
        service: "web".into(),
        instance_id: id.into(),
        node: "n1".into(),
        probe: "http://127.0.0.1:1/health".into(),
    }
}

fn bad(id: &str, kind: Outcome) -> Observed {
    Observed {
        target: target(id),
        condition: Some(kind),
        evidence: format!("{} seen", kind.as_str()),
    }
}

fn good(id: &str) -> Observed {
    Observed {
        target: target(id),
        condition: None,
        evidence: "answered 200 in 1ms".into(),
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Change>) -> Vec<Change> {
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(c);
    }
    out
}

#[test]
fn a_lasting_condition_opens_one_alert_and_its_end_resolves_it() {
    let (book, mut outbox) = AlertBook::new();
    let r = book.reconcile(&[bad("w1", Outcome::Hung), good("w2")], true, 10);
    assert_eq!(r.opened, vec!["hung/n1/w1"]);
    for t in 11..15 {
        let r = book.reconcile(&[bad("w1", Outcome::Hung), good("w2")], true, t);
        assert_eq!(r, Reconciled::default(), "no second alert while it lasts");
    }
    let open = book.open_alerts();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].started_at_ms, open[0].severity),
        (10, Severity::Critical)
    );
    let r = book.reconcile(&[good("w1"), good("w2")], true, 20);
    assert_eq!(r.resolved, vec!["hung/n1/w1"]);
    let changes = drain(&mut outbox);
    assert_eq!(changes.len(), 2, "{changes:?}");
    let Change::Resolved(resolved) = &changes[1] else {
        panic!("{changes:?}")
    };
    assert_eq!(resolved.resolved_at_ms, Some(20));
    assert_eq!(resolved.evidence, "answered 200 in 1ms");
    assert!(book.open_alerts().is_empty());
}

#[test]
fn another_kind_on_the_same_target_is_another_alert() {
    let (book, mut outbox) = AlertBook::new();
    book.reconcile(&[bad("w1", Outcome::Hung)], true, 1);
    let r = book.reconcile(&[bad("w1", Outcome::Down)], true, 2);
    assert_eq!(r.opened, vec!["down/n1/w1"]);
    assert_eq!(r.resolved, vec!["hung/n1/w1"]);
    assert_eq!(drain(&mut outbox).len(), 3);
}

#[test]
fn targets_missing_from_an_incomplete_round_keep_their_alerts() {
    let (book, _outbox) = AlertBook::new();
    book.reconcile(
        &[bad("w1", Outcome::Down), bad("w2", Outcome::Slow)],
        true,
        1,
    );
    let r = book.reconcile(&[bad("w2", Outcome::Slow)], false, 2);
    assert!(r.resolved.is_empty(), "{r:?}");
    let r = book.reconcile(&[bad("w2", Outcome::Slow)], true, 3);
    assert_eq!(r.resolved, vec!["down/n1/w1"]);
}

#[test]
fn a_restored_open_alert_is_not_sent_again_but_an_unsent_one_is() {
    let (book, mut outbox) = AlertBook::new();
    let mut sent = Alert::open(Outcome::Hung, &target("w1"), "hung", 5);
    sent.open_sent = true;
    let unsent = Alert::open(Outcome::Down, &target("w2"), "down", 6);
    let mut resolving = Alert::open(Outcome::Slow, &target("w3"), "slow", 7);
    resolving.open_sent = true;
    resolving.resolved_at_ms = Some(8);
    let restored = book.restore(vec![sent.clone(), unsent.clone(), resolving.clone()]);
    assert_eq!(restored.len(), 2);
    assert_eq!(
        drain(&mut outbox),
        vec![Change::Opened(unsent), Change::Resolved(resolving)]
    );
    // The hung target still hangs: nothing new.
    let r = book.reconcile(
        &[bad("w1", Outcome::Hung), bad("w2", Outcome::Down)],
        true,
        9,
    );
    assert_eq!(r, Reconciled::default());
    assert!(drain(&mut outbox).is_empty());
    let still = &book.open_alerts()[0];
    assert_eq!((&still.key, still.started_at_ms), (&sent.key, 5));
    assert_eq!(
        still.evidence, "hung seen",
        "the evidence follows the probes"
    );
}

#[test]
fn watchers_get_the_open_alerts_then_the_changes() {
    let (book, _outbox) = AlertBook::new();
    book.reconcile(&[bad("w1", Outcome::Hung)], true, 1);
    let (open, mut rx) = book.subscribe();
    assert_eq!(open.len(), 1);
    book.reconcile(&[good("w1")], true, 2);
    assert!(matches!(rx.try_recv(), Ok(Change::Resolved(a)) if a.key == "hung/n1/w1"));
}

#[test]
fn an_alert_is_stored_as_json_under_its_key() {
    let a = Alert::open(Outcome::Hung, &target("w1"), "no response", 42);
    assert_eq!(a.kv_key(), "mesh/monitor/alerts/hung/n1/w1");
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["kind"], "hung");
    assert_eq!(json["severity"], "critical");
    assert!(json.get("resolved_at_ms").is_none());
    let back: Alert = serde_json::from_value(json).unwrap();
    assert_eq!(back, a);
}

fn firing(file: &str, summary: &str) -> Firing {
    Firing {
        key: format!("log:errors:{file}"),
        rule: "errors".into(),
        target: file.into(),
        service: String::new(),
        severity: Severity::Warning,
        summary: summary.into(),
        lines: vec!["ERROR one".into(), "ERROR two".into()],
        node: String::new(),
    }
}

#[test]
fn a_log_alert_opens_once_by_key_and_resolves_by_key() {
    let (book, mut outbox) = AlertBook::new();
    assert!(book.open_log(&firing("/var/log/a.log", "3 lines"), 10));
    assert!(
        !book.open_log(&firing("/var/log/a.log", "5 lines"), 11),
        "open already: not again"
    );
    assert!(book.open_log(&firing("/var/log/b.log", "3 lines"), 12));
    let open = book.open_alerts();
    assert_eq!(open.len(), 2);
    assert_eq!(
        (
            open[0].kind,
            open[0].started_at_ms,
            open[0].evidence.as_str()
        ),
        (AlertKind::Log, 10, "5 lines"),
        "the evidence follows the watcher"
    );
    assert_eq!((open[0].rule.as_str(), open[0].lines.len()), ("errors", 2));
    assert!(book.resolve_log("log:errors:/var/log/a.log", "quiet", 20));
    assert!(!book.resolve_log("log:errors:/var/log/a.log", "quiet", 21));
    assert!(!book.resolve_log("log:errors:/nope", "quiet", 21));
    let changes = drain(&mut outbox);
    assert_eq!(changes.len(), 3, "{changes:?}");
    let Change::Resolved(resolved) = &changes[2] else {
        panic!("{changes:?}")
    };
    assert_eq!(
        (
            resolved.key.as_str(),
            resolved.resolved_at_ms,
            resolved.evidence.as_str()
        ),
        ("log:errors:/var/log/a.log", Some(20), "quiet")
    );
}

#[test]
fn the_probes_never_resolve_log_alerts_nor_the_logs_probe_alerts() {
    let (book, mut outbox) = AlertBook::new();
    book.reconcile(&[bad("w1", Outcome::Hung)], true, 1);
    book.open_log(&firing("/var/log/a.log", "3 lines"), 2);
    drain(&mut outbox);
    // A complete round of good targets: only the probe alert ends, also
    // when the log alert's target looks like a probed one.
    let mut same_target = firing("n1/w1", "3 lines");
    same_target.key = "log:errors:n1/w1".into();
    book.open_log(&same_target, 3);
    drain(&mut outbox);
    let r = book.reconcile(&[good("w1")], true, 4);
    assert_eq!(r.resolved, vec!["hung/n1/w1"]);
    let r = book.reconcile(&[], true, 5);
    assert_eq!(r, Reconciled::default());
    let left: Vec<String> = book.open_alerts().into_iter().map(|a| a.key).collect();
    assert_eq!(left, vec!["log:errors:/var/log/a.log", "log:errors:n1/w1"]);
    book.reconcile(&[bad("w1", Outcome::Down)], true, 6);
    assert!(!book.resolve_log("down/n1/w1", "quiet", 7));
    assert_eq!(book.open_alerts().len(), 3);
}

#[test]
fn a_restored_log_alert_stays_open_and_is_not_sent_again() {
    let (book, mut outbox) = AlertBook::new();
    let mut sent = Alert::open_log(&firing("/var/log/a.log", "3 lines"), 5);
    sent.open_sent = true;
    let unsent = Alert::open_log(&firing("/var/log/b.log", "4 lines"), 6);
    let restored = book.restore(vec![sent.clone(), unsent.clone()]);
    assert_eq!(restored.len(), 2);
    assert_eq!(drain(&mut outbox), vec![Change::Opened(unsent)]);
    // The watcher fires again after the restart: still the same alert.
    assert!(!book.open_log(&firing("/var/log/a.log", "6 lines"), 9));
    assert!(drain(&mut outbox).is_empty());
    assert_eq!(book.open_alerts()[0].started_at_ms, 5);
    // A probe round does not touch it either.
    assert_eq!(book.reconcile(&[], true, 10), Reconciled::default());
    assert_eq!(book.open_alerts().len(), 2);
}

#[test]
fn probe_alerts_stored_before_log_alerts_read_back() {
    // As stored by a monitor without log alerts.
    let stored = serde_json::json!({
        "key": "hung/n1/w1", "kind": "hung", "severity": "critical",
        "target": "n1/w1", "service": "web", "instance_id": "w1", "node": "n1",
        "probe": "http://127.0.0.1:1/health", "evidence": "no response",
        "started_at_ms": 42, "open_sent": true
    });
    let a: Alert = serde_json::from_value(stored.clone()).unwrap();
    assert_eq!(a.kind, AlertKind::Probe(Outcome::Hung));
    assert!(a.rule.is_empty() && a.lines.is_empty());
    assert_eq!(
        serde_json::to_value(&a).unwrap(),
        stored,
        "written the same"
    );
}

#[test]
fn a_log_alert_is_stored_as_one_kv_entry() {
    let a = Alert::open_log(&firing("/var/log/100%/a.log", "3 lines"), 42);
    assert_eq!(
        a.kv_key(),
        "mesh/monitor/alerts/log:errors:%2Fvar%2Flog%2F100%25%2Fa.log"
    );
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["kind"], "log");
    assert_eq!(json["rule"], "errors");
    assert_eq!(json["lines"][1], "ERROR two");
    let back: Alert = serde_json::from_value(json).unwrap();
    assert_eq!(back, a);
    let unknown = serde_json::from_value::<AlertKind>(serde_json::json!("sideways"));
    assert!(unknown.unwrap_err().to_string().contains("sideways"));
}
