use super::*;

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|k| format!("n{k}")).collect()
}

fn stats(requests: u64, errors: u64, counts: [u64; 4]) -> Stats {
    Stats {
        ready: true,
        requests,
        errors,
        latency_bounds: vec![0.001, 0.01, 0.1],
        latency_counts: counts.to_vec(),
    }
}

fn gating(pushed_at_ms: u64, baseline: Stats) -> NodeProgress {
    NodeProgress {
        node: "n1".into(),
        from: 3,
        state: NodeState::Gating,
        frontend: Frontend::Proxy,
        baseline: Some(baseline),
        pushed_at_ms,
        acked_at_ms: 0,
        reverted_at_ms: 0,
        detail: String::new(),
    }
}

fn report(in_effect: u64, refused: u64, reason: &str) -> ProxyReport {
    ProxyReport {
        version_in_effect: in_effect,
        refused_version: refused,
        reason: reason.into(),
        at_ms: 0,
    }
}

fn options(soak_ms: u64) -> RolloutOptions {
    RolloutOptions {
        soak_ms,
        ack_timeout_ms: 10_000,
        ..RolloutOptions::default()
    }
}

#[test]
fn plans_the_canary_then_batches() {
    let steps = plan(&names(6), 1, 2);
    assert_eq!(
        steps,
        vec![
            vec!["n1".to_owned()],
            vec!["n2".into(), "n3".into()],
            vec!["n4".into(), "n5".into()],
            vec!["n6".into()],
        ]
    );
    assert_eq!(plan(&names(3), 0, 5), vec![names(3)]);
    assert_eq!(
        plan(&names(2), 5, 1),
        vec![names(2)],
        "a canary of more nodes than there are takes them all"
    );
    assert!(plan(&[], 1, 1).is_empty());
}

#[test]
fn options_name_the_bad_field() {
    let bad = |o: RolloutOptions| o.check().unwrap_err().0;
    assert_eq!(
        bad(RolloutOptions {
            batch: 0,
            ..Default::default()
        }),
        "batch"
    );
    assert_eq!(
        bad(RolloutOptions {
            ack_timeout_ms: 0,
            ..Default::default()
        }),
        "ack_timeout"
    );
    assert_eq!(
        bad(RolloutOptions {
            soak_ms: 100 * 86_400_000,
            ..Default::default()
        }),
        "soak"
    );
    assert_eq!(
        bad(RolloutOptions {
            max_error_rate_increase: 1.5,
            ..Default::default()
        }),
        "max_error_rate_increase"
    );
    assert_eq!(
        bad(RolloutOptions {
            max_latency_ratio: 0.5,
            ..Default::default()
        }),
        "max_latency_ratio"
    );
    assert!(RolloutOptions::default().check().is_ok());
}

#[test]
fn a_refusal_fails_the_gate_with_the_proxys_reason() {
    let mut p = gating(1_000, stats(0, 0, [0; 4]));
    let r = report(3, 7, "routes.web.retries: 11 is over the limit of 10");
    let verdict = gate(
        &mut p,
        7,
        Some(&r),
        Ok(&stats(0, 0, [0; 4])),
        &options(0),
        2_000,
    );
    assert_eq!(
        verdict,
        Verdict::Fail(
            "node n1 refused version 7: routes.web.retries: 11 is over the limit of 10".into()
        )
    );
}

#[test]
fn no_acknowledgement_before_the_deadline_fails_the_gate() {
    let mut p = gating(1_000, stats(0, 0, [0; 4]));
    let r = report(3, 0, "");
    let ok = stats(0, 0, [0; 4]);
    assert!(matches!(
        gate(&mut p, 7, Some(&r), Ok(&ok), &options(0), 5_000),
        Verdict::Wait(_)
    ));
    match gate(&mut p, 7, Some(&r), Ok(&ok), &options(0), 11_001) {
        Verdict::Fail(why) => assert!(
            why.contains("did not acknowledge version 7 within 10 s (in effect: version 3)"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_acknowledged_healthy_node_passes_after_the_soak() {
    let base = stats(100, 1, [90, 9, 1, 0]);
    let mut p = gating(1_000, base.clone());
    let r = report(7, 0, "");
    let later = stats(200, 2, [180, 18, 2, 0]);
    assert!(matches!(
        gate(&mut p, 7, Some(&r), Ok(&later), &options(3_000), 2_000),
        Verdict::Wait(_)
    ));
    assert_eq!(p.acked_at_ms, 2_000);
    assert!(matches!(
        gate(&mut p, 7, Some(&r), Ok(&later), &options(3_000), 4_000),
        Verdict::Wait(_)
    ));
    assert_eq!(
        gate(&mut p, 7, Some(&r), Ok(&later), &options(3_000), 5_000),
        Verdict::Pass
    );
}

#[test]
fn more_5xx_than_before_fails_the_gate() {
    let base = stats(1_000, 10, [900, 90, 10, 0]);
    let mut p = gating(1_000, base);
    let r = report(7, 0, "");
    // 50 more answers, 20 of them 5xx: 40 % against 1 %.
    let now = stats(1_050, 30, [945, 95, 10, 0]);
    match gate(&mut p, 7, Some(&r), Ok(&now), &options(30_000), 2_000) {
        Verdict::Fail(why) => assert!(
            why.contains("error rate 40.0% (20 of 50 answers were 5xx) against 1.0% before"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_few_errors_or_the_same_rate_pass() {
    let base = stats(1_000, 100, [900, 90, 10, 0]);
    let opts = options(0);
    // 10 % before, 10 % after.
    assert!(health(&base, &stats(2_000, 200, [1800, 180, 20, 0]), &opts).is_ok());
    // Fewer than MIN_ERRORS errors are not judged.
    let quiet = stats(0, 0, [0; 4]);
    assert!(health(&quiet, &stats(4, 4, [4, 0, 0, 0]), &opts).is_ok());
}

#[test]
fn slower_answers_fail_the_gate() {
    let base = stats(1_000, 0, [1_000, 0, 0, 0]);
    let opts = options(0);
    let slow = stats(1_100, 0, [1_000, 0, 0, 100]);
    let why = health(&base, &slow, &opts).unwrap_err();
    assert!(
        why.contains("p99 latency over the largest bucket against ≤ 1 ms before"),
        "{why}"
    );
    // Within the floor: from 1 ms to 10 ms is not harm.
    let bit_slower = stats(1_100, 0, [1_000, 100, 0, 0]);
    assert!(health(&base, &bit_slower, &opts).is_ok());
}

/// Answers counted in the proxy's own histogram, `(bucket bound, count)`
/// each; a bound of infinity counts past the last bucket.
fn answers(per_bucket: &[(f64, u64)]) -> Stats {
    let bounds = mesh_runtime::metrics::LATENCY_BUCKETS.to_vec();
    let mut counts = vec![0; bounds.len() + 1];
    for &(bound, n) in per_bucket {
        let k = bounds
            .iter()
            .position(|b| *b == bound)
            .unwrap_or(bounds.len());
        counts[k] += n;
    }
    Stats {
        ready: true,
        requests: counts.iter().sum(),
        errors: 0,
        latency_bounds: bounds,
        latency_counts: counts,
    }
}

#[test]
fn one_slow_answer_among_the_fewest_judged_passes_but_a_slower_p99_fails() {
    let opts = options(0);
    let base = answers(&[(0.025, 1_000)]);
    let fast = 1_000 + MIN_LATENCY_SAMPLES - 1;
    // One answer past the largest bucket among exactly the fewest judged:
    // the p99 is the next slowest, ≤ 25 ms.
    let one_slow = answers(&[(0.025, fast), (f64::INFINITY, 1)]);
    assert_eq!(health(&base, &one_slow, &opts), Ok(()));
    // The same without a baseline (a proxy with no answers before).
    let one_slow_since_nothing = answers(&[(0.025, MIN_LATENCY_SAMPLES - 1), (f64::INFINITY, 1)]);
    assert_eq!(
        health(&answers(&[]), &one_slow_since_nothing, &opts),
        Ok(())
    );
    // Two of them (2 %) are the p99.
    let two_slow = answers(&[(0.025, fast - 1), (f64::INFINITY, 2)]);
    let why = health(&base, &two_slow, &opts).unwrap_err();
    assert_eq!(
        why,
        "p99 latency over the largest bucket against ≤ 25 ms before"
    );
    // Fewer answers than that are not judged, however slow.
    let too_few = answers(&[(0.025, 1_000), (f64::INFINITY, MIN_LATENCY_SAMPLES - 1)]);
    assert_eq!(health(&base, &too_few, &opts), Ok(()));
}

#[test]
fn a_p99_fails_the_floor_only_in_a_bucket_above_it() {
    let opts = options(0);
    let base = answers(&[(0.025, 1_000)]);
    // The bucket of the floor itself: from ≤ 25 ms to ≤ 100 ms passes.
    let floor_bucket = answers(&[(0.025, 1_000), (0.1, MIN_LATENCY_SAMPLES)]);
    assert_eq!(health(&base, &floor_bucket, &opts), Ok(()));
    // The next bucket up fails.
    let above = answers(&[(0.025, 1_000), (0.25, MIN_LATENCY_SAMPLES)]);
    let why = health(&base, &above, &opts).unwrap_err();
    assert_eq!(why, "p99 latency ≤ 250 ms against ≤ 25 ms before");
}

#[test]
fn the_latency_floor_is_a_bucket_bound() {
    assert!(mesh_runtime::metrics::LATENCY_BUCKETS.contains(&LATENCY_FLOOR_SECONDS));
    // The fewest judged put the p99 below the slowest answer.
    let rank = (0.99 * MIN_LATENCY_SAMPLES as f64).ceil() as u64;
    assert!(rank < MIN_LATENCY_SAMPLES, "rank {rank}");
}

#[test]
fn a_proxy_restart_counts_everything_since() {
    let base = stats(1_000, 10, [900, 90, 10, 0]);
    let restarted = stats(50, 40, [50, 0, 0, 0]);
    let after = restarted.since(&base);
    assert_eq!((after.requests, after.errors), (50, 40));
}

#[test]
fn a_not_ready_proxy_waits_then_fails() {
    let mut p = gating(1_000, stats(0, 0, [0; 4]));
    let r = report(7, 0, "");
    let mut down = stats(0, 0, [0; 4]);
    down.ready = false;
    assert!(matches!(
        gate(&mut p, 7, Some(&r), Ok(&down), &options(0), 2_000),
        Verdict::Wait(_)
    ));
    match gate(&mut p, 7, Some(&r), Ok(&down), &options(0), 12_001) {
        Verdict::Fail(why) => assert!(why.contains("the proxy is not ready"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_record_keeps_its_history_bounded() {
    let from: Vec<(String, u64)> = names(3).into_iter().map(|n| (n, 1)).collect();
    let mut r = Rollout::new(2, "alice".into(), RolloutOptions::default(), &from, 10);
    assert_eq!(
        r.events[0].text,
        "started by alice to version 2: step 1 [n1], step 2 [n2], step 3 [n3]"
    );
    for k in 0..(MAX_EVENTS + 10) {
        r.event(20 + k as u64, format!("e{k}"));
    }
    assert_eq!(r.events.len(), MAX_EVENTS);
    assert!(r.abort(5_000, "aborted by bob"));
    assert!(
        !r.abort(6_000, "again"),
        "an abort under way is not started twice"
    );
    assert_eq!(r.state, RolloutState::Aborting);
    let json = serde_json::to_string(&r).unwrap();
    let back: Rollout = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn node_metadata_names_the_frontend() {
    let meta = |v: Option<&str>| -> BTreeMap<String, String> {
        v.map(|v| [(FRONTEND_META.to_owned(), v.to_owned())].into())
            .unwrap_or_default()
    };
    assert_eq!(Frontend::of_meta(&meta(None)), Ok(Frontend::Proxy));
    assert_eq!(Frontend::of_meta(&meta(Some("proxy"))), Ok(Frontend::Proxy));
    assert_eq!(Frontend::of_meta(&meta(Some("nginx"))), Ok(Frontend::Nginx));
    let e = Frontend::of_meta(&meta(Some("envoy"))).unwrap_err();
    assert!(
        e.contains("mesh-frontend") && e.contains("\"envoy\""),
        "{e}"
    );
    // Records written before nodes had a frontend read as proxy nodes.
    let mut old = serde_json::to_value(gating(0, Stats::default())).unwrap();
    old.as_object_mut().unwrap().remove("frontend");
    let back: NodeProgress = serde_json::from_value(old).unwrap();
    assert_eq!(back.frontend, Frontend::Proxy);
}

fn monitor_verdict(healthy: bool, reasons: &[&str]) -> MonitorSays {
    MonitorSays::Verdict {
        healthy,
        reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
    }
}

#[test]
fn an_unhealthy_monitor_verdict_fails_an_acknowledged_node() {
    let says = monitor_verdict(
        false,
        &[
            "hung n1/orders-1: no response within 2s",
            "slow n1/web-1: answered in 400ms",
        ],
    );
    for waiting in [Verdict::Wait("n1 soaking, 3 s left".into()), Verdict::Pass] {
        assert_eq!(
            monitor_gate("n1", waiting, true, Some(&says)),
            Verdict::Fail(
                "mesh-monitor: node n1 is unhealthy: hung n1/orders-1: no response within 2s; \
                 slow n1/web-1: answered in 400ms"
                    .into()
            )
        );
    }
    assert_eq!(
        monitor_gate(
            "n1",
            Verdict::Pass,
            true,
            Some(&monitor_verdict(false, &[]))
        ),
        Verdict::Fail("mesh-monitor: node n1 is unhealthy: no reason given".into())
    );
}

#[test]
fn the_monitor_does_not_judge_before_the_acknowledgement() {
    let says = monitor_verdict(false, &["down n1/orders-1: connection refused"]);
    let wait = Verdict::Wait("waiting for node n1 to acknowledge".into());
    assert_eq!(monitor_gate("n1", wait.clone(), false, Some(&says)), wait);
}

#[test]
fn another_gate_failing_keeps_its_own_reason() {
    let says = monitor_verdict(false, &["down n1/orders-1: connection refused"]);
    let fail = Verdict::Fail("node n1 refused version 4: bad".into());
    assert_eq!(monitor_gate("n1", fail.clone(), true, Some(&says)), fail);
}

#[test]
fn a_healthy_silent_or_absent_monitor_leaves_the_other_gates() {
    let healthy = monitor_verdict(true, &["slow n1/web-1: answered in 400ms"]);
    let silent = MonitorSays::Silent("mesh-monitor at http://10.0.0.1:8896 is unreachable".into());
    let wait = Verdict::Wait("node n1 soaking, 3 s left".into());
    for says in [
        Some(&healthy),
        Some(&silent),
        Some(&MonitorSays::NothingProbed),
        None,
    ] {
        assert_eq!(monitor_gate("n1", Verdict::Pass, true, says), Verdict::Pass);
        assert_eq!(monitor_gate("n1", wait.clone(), true, says), wait);
    }
}
