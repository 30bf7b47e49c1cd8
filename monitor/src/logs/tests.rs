use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use mesh_runtime::duration::HumanDuration;

use super::{
    LogEvent,
    config::{ErrorRateRuleConfig, LogsConfig, PatternRuleConfig},
    glob::{Glob, name_matches},
    rules::Evaluator,
    tail::{StartAt, TailOptions, Tailer},
    watcher::LogWatcher,
};
use crate::alert::Severity;

fn opts(start_at: StartAt) -> TailOptions {
    TailOptions {
        start_at,
        ..TailOptions::default()
    }
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn write_numbers(f: &mut File, range: std::ops::Range<u32>) {
    for n in range {
        writeln!(f, "line {n}").unwrap();
    }
}

/// Counts how often each number was seen.
fn tally(seen: &mut BTreeMap<u32, u32>, lines: Vec<String>) {
    for line in lines {
        let n = line
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        *seen.entry(n).or_default() += 1;
    }
}

/// Asserts that exactly the numbers of `expected` were seen, each once.
fn assert_each_once(seen: &BTreeMap<u32, u32>, expected: std::ops::Range<u32>) {
    let missing: Vec<_> = expected.clone().filter(|n| !seen.contains_key(n)).collect();
    let doubled: Vec<_> = seen.iter().filter(|(_, c)| **c != 1).collect();
    let unexpected: Vec<_> = seen.keys().filter(|n| !expected.contains(n)).collect();
    assert!(missing.is_empty(), "lines never seen: {missing:?}");
    assert!(doubled.is_empty(), "lines seen more than once: {doubled:?}");
    assert!(unexpected.is_empty(), "lines not expected: {unexpected:?}");
}

// === tail ===

#[test]
fn every_line_once_across_rename_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut log = append(&path);
    write_numbers(&mut log, 0..5); // before the tailer: skipped (start at end)
    let mut tailer = Tailer::new(&path, opts(StartAt::End));
    assert_eq!(tailer.poll_once().unwrap(), Vec::<String>::new());

    let mut seen = BTreeMap::new();
    write_numbers(&mut log, 5..100);
    tally(&mut seen, tailer.poll_once().unwrap());
    write_numbers(&mut log, 100..150);

    // Rotation by rename; the logger keeps writing to its old descriptor
    // for a while, across polls, before it reopens.
    fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    write_numbers(&mut log, 150..160);
    tally(&mut seen, tailer.poll_once().unwrap());
    write_numbers(&mut log, 160..170);
    let mut new = append(&path);
    write_numbers(&mut log, 170..180); // still the old one, after the new file exists
    tally(&mut seen, tailer.poll_once().unwrap());
    write_numbers(&mut log, 180..190);
    drop(log);
    write_numbers(&mut new, 190..300);
    tally(&mut seen, tailer.poll_once().unwrap());

    // Rotation by truncation (copytruncate), after the tailer read to the
    // end: the copy has everything, nothing is lost.
    write_numbers(&mut new, 300..320);
    tally(&mut seen, tailer.poll_once().unwrap());
    fs::copy(&path, dir.path().join("app.log.2")).unwrap();
    new.set_len(0).unwrap();
    write_numbers(&mut new, 320..330);
    tally(&mut seen, tailer.poll_once().unwrap());
    write_numbers(&mut new, 330..400);
    tally(&mut seen, tailer.poll_once().unwrap());

    assert_each_once(&seen, 5..400);
}

#[test]
fn truncated_file_is_read_again_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut log = append(&path);
    let mut tailer = Tailer::new(&path, opts(StartAt::Beginning));
    write_numbers(&mut log, 0..10);
    assert_eq!(tailer.poll_once().unwrap().len(), 10);
    // Lines written after our last read and before the truncate are the
    // copytruncate window: they are only in the copy, never in the file we
    // follow.
    write_numbers(&mut log, 10..12);
    log.set_len(0).unwrap();
    writeln!(log, "after").unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["after"]);
}

#[test]
fn partial_line_waits_for_its_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut log = append(&path);
    let mut tailer = Tailer::new(&path, opts(StartAt::Beginning));
    write!(log, "first\nsec").unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["first"]);
    let position = tailer.position().unwrap();
    assert_eq!(
        position.offset, 6,
        "the partial line is not counted as read"
    );
    write!(log, "ond\r\n\nthi").unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["second", ""]);
    log.write_all(b"rd\n").unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["third"]);
}

#[test]
fn long_line_is_cut_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut log = append(&path);
    let mut tailer = Tailer::new(
        &path,
        TailOptions {
            max_line: 10,
            ..opts(StartAt::Beginning)
        },
    );
    write!(log, "{}", "x".repeat(25)).unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["x".repeat(10)]);
    write!(log, "{}\nshort\n{}\n", "y".repeat(30), "z".repeat(12)).unwrap();
    assert_eq!(
        tailer.poll_once().unwrap(),
        vec!["short".to_owned(), "z".repeat(10)]
    );
    writeln!(log, "{}", "w".repeat(10)).unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["w".repeat(10)]);
}

#[test]
fn missing_file_is_waited_for_and_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.log");
    let mut tailer = Tailer::new(&path, opts(StartAt::End));
    assert!(tailer.poll_once().unwrap().is_empty());
    assert!(tailer.position().is_none());
    let mut log = append(&path);
    write_numbers(&mut log, 0..3);
    assert_eq!(
        tailer.poll_once().unwrap(),
        vec!["line 0", "line 1", "line 2"]
    );
}

#[test]
fn start_at_beginning_reads_what_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    write_numbers(&mut append(&path), 0..3);
    let mut tailer = Tailer::new(&path, opts(StartAt::Beginning));
    assert_eq!(tailer.poll_once().unwrap().len(), 3);
}

#[test]
fn resume_neither_rereads_nor_skips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut log = append(&path);
    let mut tailer = Tailer::new(&path, opts(StartAt::Beginning));
    write!(log, "line 0\nline 1\nli").unwrap();
    assert_eq!(tailer.poll_once().unwrap().len(), 2);
    let position = tailer.position().unwrap();
    drop(tailer);

    write!(log, "ne 2\nline 3\n").unwrap();
    let mut tailer = Tailer::resume(&path, opts(StartAt::End), position);
    assert_eq!(tailer.poll_once().unwrap(), vec!["line 2", "line 3"]);

    // Rotated while not running: the new file is read whole.
    let position = tailer.position().unwrap();
    fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    write_numbers(&mut append(&path), 4..6);
    let mut tailer = Tailer::resume(&path, opts(StartAt::End), position);
    assert_eq!(tailer.poll_once().unwrap(), vec!["line 4", "line 5"]);
}

#[test]
fn rotated_file_is_dropped_once_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut log = append(&path);
    let mut tailer = Tailer::new(
        &path,
        TailOptions {
            rotate_wait: Duration::ZERO,
            ..opts(StartAt::Beginning)
        },
    );
    write!(log, "done\nunfinished").unwrap();
    assert_eq!(tailer.poll_once().unwrap(), vec!["done"]);
    fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    writeln!(append(&path), "new").unwrap();
    // The old file's unfinished line is given as it is when it is dropped.
    assert_eq!(tailer.poll_once().unwrap(), vec!["unfinished", "new"]);
    writeln!(log, " late").unwrap();
    assert!(tailer.poll_once().unwrap().is_empty());
}

// === glob ===

#[test]
fn glob_matches_within_one_component() {
    assert!(name_matches("orders-*.log", "orders-a.log"));
    assert!(name_matches("orders-*.log", "orders-.log"));
    assert!(!name_matches("orders-*.log", "orders-a.log.1"));
    assert!(name_matches("a?c", "abc"));
    assert!(!name_matches("a?c", "ac"));
    assert!(name_matches("*a*b*", "xxaxxbxx"));
    assert!(!name_matches("*", ".hidden"));
    let g = Glob::new("/var/log/svc/*/app.log").unwrap();
    assert!(g.matches(Path::new("/var/log/svc/orders/app.log")));
    assert!(!g.matches(Path::new("/var/log/svc/a/b/app.log")));
    assert!(!g.matches(Path::new("/var/log/svc/app.log")));
    assert!(!g.is_literal());
    assert!(Glob::new("/var/log/x.log").unwrap().is_literal());
    assert!(Glob::new("/var/**/x.log").is_err());
}

#[test]
fn glob_expands_to_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    for svc in ["a", "b"] {
        fs::create_dir(dir.path().join(svc)).unwrap();
        File::create(dir.path().join(svc).join("app.log")).unwrap();
    }
    fs::create_dir(dir.path().join("c")).unwrap();
    File::create(dir.path().join("a").join("other.log")).unwrap();
    let g = Glob::new(&format!("{}/*/app.log", dir.path().display())).unwrap();
    assert_eq!(
        g.expand(),
        vec![
            dir.path().join("a").join("app.log"),
            dir.path().join("b").join("app.log"),
        ]
    );
}

// === config ===

fn pattern_rule(
    name: &str,
    files: &str,
    pattern: &str,
    threshold: u32,
    window: u64,
) -> PatternRuleConfig {
    PatternRuleConfig {
        name: name.into(),
        files: files.into(),
        pattern: pattern.into(),
        regex: false,
        threshold,
        window: HumanDuration(Duration::from_secs(window)),
        severity: None,
    }
}

fn rate_rule(files: &str, threshold: f64, min_requests: u32) -> ErrorRateRuleConfig {
    ErrorRateRuleConfig {
        name: "5xx".into(),
        files: files.into(),
        window: HumanDuration(Duration::from_secs(60)),
        threshold,
        min_requests,
        direction: None,
        severity: None,
    }
}

#[test]
fn config_errors_name_the_rule_and_field() {
    let err = |config: LogsConfig| config.validate().unwrap_err().to_string();
    let with_patterns = |patterns| LogsConfig {
        patterns,
        ..LogsConfig::default()
    };
    assert_eq!(
        err(with_patterns(vec![pattern_rule(
            "boom", "/x.log", "e", 0, 10
        )])),
        r#"logs rule "boom": threshold: 0 must be from 1 to 1000000"#
    );
    let mut bad_regex = pattern_rule("re", "/x.log", "(", 1, 10);
    bad_regex.regex = true;
    assert!(
        err(with_patterns(vec![bad_regex]))
            .starts_with(r#"logs rule "re": pattern: "(" is not a valid regular expression"#)
    );
    assert_eq!(
        err(with_patterns(vec![pattern_rule("", "/x.log", "e", 1, 10)])),
        r#"logs rule "patterns[0]": name: "" must be non-empty letters, digits, '-', '_' or '.'"#
    );
    assert_eq!(
        err(with_patterns(vec![pattern_rule("w", "/x.log", "e", 1, 0)])),
        r#"logs rule "w": window: 0s must be above 0 and at most 24h"#
    );
    assert_eq!(
        err(with_patterns(vec![
            pattern_rule("same", "/x.log", "e", 1, 10),
            pattern_rule("same", "/y.log", "e", 1, 10),
        ])),
        r#"logs rule "same": name: another rule has the same name"#
    );
    let rates = |r| LogsConfig {
        error_rates: vec![r],
        ..LogsConfig::default()
    };
    assert_eq!(
        err(rates(rate_rule("/a.log", 1.5, 10))),
        r#"logs rule "5xx": threshold: 1.5 must be above 0 and at most 1 (0.05 is 5%)"#
    );
    assert_eq!(
        err(rates(rate_rule("/a.log", 0.1, 0))),
        r#"logs rule "5xx": min_requests: 0 must be at least 1"#
    );
    let mut sideways = rate_rule("/a.log", 0.1, 1);
    sideways.direction = Some("sideways".into());
    assert_eq!(
        err(rates(sideways)),
        r#"logs rule "5xx": direction: "sideways" must be inbound or outbound"#
    );
    assert_eq!(
        err(rates(rate_rule("", 0.1, 1))),
        r#"logs rule "5xx": files: empty file glob"#
    );
    assert_eq!(
        err(LogsConfig {
            max_line_bytes: Some(1),
            ..LogsConfig::default()
        }),
        "logs: max_line_bytes = 1: must be from 256 to 16777216"
    );
}

#[test]
fn config_reads_from_json_with_defaults() {
    let config: LogsConfig = serde_json::from_value(serde_json::json!({
        "patterns": [{"name": "panics", "files": "/var/log/p.log", "pattern": "panicked",
                      "threshold": 1, "window": "5m", "severity": "critical"}],
        "error_rates": [{"name": "5xx", "files": "/var/log/access*.log", "window": "1m",
                         "threshold": 0.05, "min_requests": 20}],
    }))
    .unwrap();
    let logs = config.validate().unwrap();
    assert_eq!(logs.poll_interval, Duration::from_millis(250));
    assert_eq!(logs.tail, TailOptions::default());
    assert_eq!(logs.rules.len(), 2);
    let unknown = serde_json::from_value::<LogsConfig>(serde_json::json!({"patterns": [
        {"name": "x", "files": "/x", "pattern": "p", "threshold": 1, "window": "1s", "treshold": 2}
    ]}));
    assert!(
        unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `treshold`")
    );
}

// === rules ===

fn evaluator(
    patterns: Vec<PatternRuleConfig>,
    rates: Vec<ErrorRateRuleConfig>,
    t0: Instant,
) -> Evaluator {
    let logs = LogsConfig {
        patterns,
        error_rates: rates,
        ..LogsConfig::default()
    }
    .validate()
    .unwrap();
    Evaluator::new(logs.rules, t0)
}

#[test]
fn pattern_rule_fires_at_threshold_within_window_and_resolves() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut rules = evaluator(
        vec![pattern_rule("timeouts", "/log/*.log", "timeout", 3, 10)],
        vec![],
        t0,
    );
    let file = Path::new("/log/a.log");

    // Three matches, but never three within 10s: silent.
    rules.observe(file, "upstream timeout 1", at(0));
    rules.observe(file, "all fine", at(1));
    rules.observe(file, "upstream timeout 2", at(5));
    assert!(rules.evaluate(at(5)).is_empty());
    rules.observe(file, "upstream timeout 3", at(10));
    rules.observe(Path::new("/log/b.log"), "timeout elsewhere", at(10));
    rules.observe(Path::new("/other/a.log"), "timeout unwatched", at(10));
    assert!(
        rules.evaluate(at(10)).is_empty(),
        "the first match left the window"
    );

    rules.observe(file, "upstream timeout 4", at(12));
    let events = rules.evaluate(at(12));
    assert_eq!(
        events,
        vec![LogEvent::Firing {
            key: "log:timeouts:/log/a.log".into(),
            rule: "timeouts".into(),
            severity: Severity::Warning,
            summary: r#"3 lines matching "timeout" within 10s in /log/a.log (threshold 3)"#.into(),
            evidence: vec![
                "upstream timeout 2".into(),
                "upstream timeout 3".into(),
                "upstream timeout 4".into()
            ],
        }]
    );
    rules.observe(file, "upstream timeout 5", at(13));
    assert!(rules.evaluate(at(13)).is_empty(), "fires once");
    assert!(rules.evaluate(at(22)).is_empty(), "a match 9s ago");
    let events = rules.evaluate(at(23));
    assert_eq!(events.len(), 1);
    assert!(!events[0].is_firing());
    assert_eq!(events[0].key(), "log:timeouts:/log/a.log");
}

fn access(service: &str, status: u16) -> String {
    serde_json::json!({"ts": "2026-11-27T00:00:00Z", "service": service, "status": status,
        "duration_ms": 1.2, "method": "GET", "path": "/x", "upstream": "10.0.0.1:80",
        "node": "n1", "extra": {"added": "later"}})
    .to_string()
}

#[test]
fn error_rate_rule_respects_its_floor_and_resolves() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut rules = evaluator(vec![], vec![rate_rule("/log/access.log", 0.5, 10)], t0);
    let file = Path::new("/log/access.log");

    // A quiet service failing every request is below the floor.
    for _ in 0..9 {
        rules.observe(file, &access("quiet", 503), at(1));
    }
    rules.observe(file, "not json", at(1));
    rules.observe(file, r#"{"service": "no status"}"#, at(1));
    // A busy one at 40%: below the threshold.
    for i in 0..10 {
        rules.observe(file, &access("busy", if i < 4 { 500 } else { 200 }), at(1));
    }
    assert!(rules.evaluate(at(1)).is_empty());
    assert_eq!(rules.unparsable("5xx"), Some(2));

    rules.observe(file, &access("quiet", 502), at(2));
    for _ in 0..2 {
        rules.observe(file, &access("busy", 504), at(2));
    }
    let events = rules.evaluate(at(2));
    let keys: Vec<_> = events.iter().map(|e| (e.key(), e.is_firing())).collect();
    assert_eq!(keys, vec![("log:5xx:busy", true), ("log:5xx:quiet", true)]);
    let LogEvent::Firing {
        summary,
        evidence,
        severity,
        ..
    } = &events[0]
    else {
        unreachable!()
    };
    assert_eq!(
        summary,
        "busy: 50.0% of requests failed with 5xx within 60s (threshold 50.0%)"
    );
    assert_eq!(evidence, &vec!["6 of 12 requests answered 5xx".to_owned()]);
    assert_eq!(*severity, Severity::Critical);

    // Healthy traffic brings busy below the threshold.
    for _ in 0..10 {
        rules.observe(file, &access("busy", 200), at(3));
    }
    let events = rules.evaluate(at(3));
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].key(), events[0].is_firing()),
        ("log:5xx:busy", false)
    );
    // quiet's requests leave the window: it resolves too.
    let events = rules.evaluate(at(63));
    assert_eq!(
        events.iter().map(LogEvent::key).collect::<Vec<_>>(),
        vec!["log:5xx:quiet"]
    );
}

// === watcher ===

fn watcher_config(dir: &Path, files: &str) -> LogsConfig {
    LogsConfig {
        poll_interval: Some(HumanDuration(Duration::from_millis(20))),
        rescan_interval: Some(HumanDuration(Duration::from_secs(1))),
        state_file: Some(dir.join("state.json")),
        patterns: vec![pattern_rule("errors", files, "ERROR", 2, 60)],
        ..LogsConfig::default()
    }
}

#[test]
fn watcher_follows_files_that_appear_and_drops_vanished_ones() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("orders-a.log");
    writeln!(append(&existing), "ERROR old, before start").unwrap();
    let glob = format!("{}/orders-*.log", dir.path().display());
    let mut watcher = LogWatcher::new(watcher_config(dir.path(), &glob).validate().unwrap());
    let t0 = Instant::now();
    assert!(
        watcher.poll(t0).is_empty(),
        "existing files are read from their end"
    );
    assert_eq!(watcher.files(), vec![existing.clone()]);

    let later = dir.path().join("orders-b.log");
    let mut log = append(&later);
    writeln!(log, "ERROR one").unwrap();
    writeln!(append(&dir.path().join("other.log")), "ERROR x").unwrap();
    assert!(
        watcher.poll(t0 + Duration::from_millis(500)).is_empty(),
        "not rescanned yet"
    );
    writeln!(log, "ERROR two").unwrap();
    let events = watcher.poll(t0 + Duration::from_secs(1));
    let keys: Vec<_> = events.iter().map(LogEvent::key).collect();
    assert_eq!(keys, vec![format!("log:errors:{}", later.display())]);
    assert_eq!(watcher.files(), vec![existing.clone(), later.clone()]);

    fs::remove_file(&existing).unwrap();
    watcher.poll(Instant::now() + Duration::from_secs(10));
    assert_eq!(watcher.files(), vec![later]);
}

#[tokio::test]
async fn watcher_runs_until_shutdown_and_keeps_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let path_str = path.display().to_string();
    // Read from the beginning: without the kept offsets, a second run
    // would read every line again.
    let config = || {
        LogsConfig {
            start_at: Some(StartAt::Beginning),
            ..watcher_config(dir.path(), &path_str)
        }
        .validate()
        .unwrap()
    };
    let mut log = append(&path);
    writeln!(log, "ERROR a\nfine").unwrap();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(16);
    let (trigger, shutdown) = mesh_runtime::shutdown::channel();
    let task = tokio::spawn(LogWatcher::new(config()).run(events_tx, shutdown));
    writeln!(log, "ERROR b").unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("a firing within 10s")
        .unwrap();
    assert_eq!(event.key(), format!("log:errors:{path_str}"));
    assert!(event.is_firing());
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops on shutdown")
        .unwrap();

    // Lines written while stopped are read by the next run, once; the
    // earlier ones are not read again.
    writeln!(log, "ERROR c").unwrap();
    let mut watcher = LogWatcher::new(config());
    assert!(
        watcher.poll(Instant::now()).is_empty(),
        "ERROR c alone is below 2"
    );
    writeln!(log, "ERROR d").unwrap();
    assert_eq!(watcher.poll(Instant::now()).len(), 1);
}

#[test]
fn error_rate_rule_counts_only_its_direction() {
    let t0 = Instant::now();
    let mut rule = rate_rule("/log/access.log", 0.5, 5);
    rule.direction = Some("inbound".into());
    let mut rules = evaluator(vec![], vec![rule], t0);
    let file = Path::new("/log/access.log");
    let line = |direction: &str, status: u16| {
        serde_json::json!({"service": "orders", "status": status, "direction": direction})
            .to_string()
    };
    for _ in 0..10 {
        rules.observe(file, &line("outbound", 503), t0);
        rules.observe(file, &line("inbound", 200), t0);
    }
    assert!(
        rules.evaluate(t0).is_empty(),
        "outbound failures are not counted"
    );
    for _ in 0..10 {
        rules.observe(file, &line("inbound", 500), t0);
    }
    let events = rules.evaluate(t0);
    assert_eq!(events.len(), 1);
    let LogEvent::Firing { evidence, .. } = &events[0] else {
        unreachable!()
    };
    assert_eq!(evidence, &vec!["10 of 20 requests answered 5xx".to_owned()]);
    assert_eq!(rules.unparsable("5xx"), Some(0));
}
