//! The pure parts of deployments: the checks of a deploy, the node and
//! deployment states, chunking, pruning and the soak's verdict.

use std::collections::BTreeSet;

use mesh_proto::v1 as pb;

use super::{
    driver::{Soak, is_away, running_version, soak_verdict},
    *,
};
use crate::store::Store;

fn spec() -> DeploySpec {
    DeploySpec {
        service: "orders".into(),
        version: "2.4.1".into(),
        file_name: "orders.jar".into(),
        size: 1000,
        sha256: "AB".repeat(32),
        nodes: vec!["n1".into(), "n2".into(), "n3".into()],
        command: DEFAULT_COMMAND.into(),
        author: "ops".into(),
        ..DeploySpec::default()
    }
}

#[test]
fn a_good_deploy_gets_its_defaults_and_a_lowercase_sha() {
    let s = spec().check().unwrap();
    assert_eq!(s.sha256, "ab".repeat(32));
    assert_eq!(s.strategy, "rolling");
    assert_eq!(
        (s.health_timeout_ms, s.drain_ms, s.soak_ms),
        (60_000, 5_000, 10_000)
    );
    let kept = DeploySpec {
        soak_ms: 1,
        strategy: "rolling".into(),
        ..spec()
    }
    .check()
    .unwrap();
    assert_eq!(kept.soak_ms, 1);
}

#[test]
fn every_bad_field_is_refused_by_name() {
    let cases: Vec<(&str, DeploySpec)> = vec![
        (
            "service",
            DeploySpec {
                service: "Bad Name".into(),
                ..spec()
            },
        ),
        (
            "service",
            DeploySpec {
                service: String::new(),
                ..spec()
            },
        ),
        (
            "version",
            DeploySpec {
                version: "1/2".into(),
                ..spec()
            },
        ),
        (
            "version",
            DeploySpec {
                version: "..".into(),
                ..spec()
            },
        ),
        (
            "version",
            DeploySpec {
                version: String::new(),
                ..spec()
            },
        ),
        (
            "file_name",
            DeploySpec {
                file_name: "lib/a.jar".into(),
                ..spec()
            },
        ),
        (
            "file_name",
            DeploySpec {
                file_name: ".hidden".into(),
                ..spec()
            },
        ),
        ("size", DeploySpec { size: 0, ..spec() }),
        (
            "size",
            DeploySpec {
                size: MAX_ARTIFACT_SIZE + 1,
                ..spec()
            },
        ),
        (
            "sha256",
            DeploySpec {
                sha256: "abc".into(),
                ..spec()
            },
        ),
        (
            "sha256",
            DeploySpec {
                sha256: "zz".repeat(32),
                ..spec()
            },
        ),
        (
            "strategy",
            DeploySpec {
                strategy: "canary".into(),
                ..spec()
            },
        ),
        (
            "command",
            DeploySpec {
                command: "  ".into(),
                ..spec()
            },
        ),
        (
            "health_path",
            DeploySpec {
                health_path: "health".into(),
                ..spec()
            },
        ),
        (
            "soak_ms",
            DeploySpec {
                soak_ms: 86_400_001,
                ..spec()
            },
        ),
        (
            "nodes",
            DeploySpec {
                nodes: vec!["n1".into(), "n1".into()],
                ..spec()
            },
        ),
        (
            "nodes",
            DeploySpec {
                nodes: vec!["a/b".into()],
                ..spec()
            },
        ),
        (
            "env",
            DeploySpec {
                env: [("A=B".to_owned(), "x".to_owned())].into(),
                ..spec()
            },
        ),
    ];
    for (field, s) in cases {
        let (named, message) = s.clone().check().unwrap_err();
        assert_eq!(named, field, "{s:?}: {message}");
        assert!(!message.is_empty());
    }
    let (_, message) = DeploySpec {
        nodes: vec!["n1".into(), "n1".into()],
        ..spec()
    }
    .check()
    .unwrap_err();
    assert!(
        message.contains("n1") && message.contains("twice"),
        "{message}"
    );
}

#[test]
fn artifacts_take_one_key_per_256_kib_and_the_keys_sort_in_order() {
    assert_eq!(chunk_count(1), 1);
    assert_eq!(chunk_count(CHUNK_SIZE as u64), 1);
    assert_eq!(chunk_count(CHUNK_SIZE as u64 + 1), 2);
    assert_eq!(chunk_count(MAX_ARTIFACT_SIZE), 1024);
    assert_eq!(
        Store::chunk_key("orders", "2.4.1", 7),
        "mesh/artifacts/orders/2.4.1/chunks/000007"
    );
    assert!(Store::chunk_key("a", "1", 9) < Store::chunk_key("a", "1", 10));
    assert_eq!(
        Store::artifact_key("orders", "2.4.1"),
        "mesh/artifacts/orders/2.4.1"
    );
}

#[test]
fn pruning_keeps_the_newest_and_those_in_use() {
    let stored: Vec<(String, u64)> = (1..=7).map(|k| (format!("1.{k}"), k * 100)).collect();
    let none = BTreeSet::new();
    let mut gone = prune(&stored, &none, 5);
    gone.sort();
    assert_eq!(gone, ["1.1", "1.2"]);
    let in_use = BTreeSet::from(["1.1".to_owned()]);
    assert_eq!(prune(&stored, &in_use, 5), ["1.2"]);
    assert!(prune(&stored[..5], &none, 5).is_empty());
}

#[test]
fn nodes_go_one_at_a_time_and_a_halt_skips_the_rest() {
    let mut d = Deployment::new(4, spec().check().unwrap(), 1_000);
    assert_eq!(d.state, DeploymentState::Running);
    assert_eq!(d.current(), Some(0));
    assert!(
        d.events[0].text.contains("started by ops"),
        "{:?}",
        d.events
    );
    d.set_node(0, NodeState::Uploading, "sending", 2_000);
    assert_eq!(d.nodes[0].started_at_ms, 2_000);
    d.set_node(0, NodeState::Done, "healthy", 3_000);
    assert_eq!(d.nodes[0].finished_at_ms, 3_000);
    assert_eq!(d.current(), Some(1));
    assert!(!d.finish_if_done(3_000));
    d.set_node(1, NodeState::RolledBack, "health gate failed", 4_000);
    d.halt("n2: health gate failed", 4_000);
    assert_eq!(d.state, DeploymentState::Halted);
    assert_eq!(d.reason, "n2: health gate failed");
    assert_eq!(d.nodes[2].state, NodeState::Skipped);
    assert!(d.is_settled());
    assert_eq!(d.current(), None);
}

#[test]
fn every_node_done_is_success() {
    let mut d = Deployment::new(1, spec().check().unwrap(), 1_000);
    for k in 0..3 {
        d.set_node(k, NodeState::Done, "", 2_000);
    }
    assert!(d.finish_if_done(2_000));
    assert_eq!(d.state, DeploymentState::Succeeded);
    assert!(d.is_settled());
    assert!(!d.finish_if_done(2_000), "only once");
}

#[test]
fn an_abort_skips_the_nodes_not_reached_and_waits_for_the_one_under_way() {
    let mut d = Deployment::new(1, spec().check().unwrap(), 1_000);
    d.set_node(0, NodeState::Done, "", 2_000);
    d.set_node(1, NodeState::Deploying, "", 2_000);
    assert!(d.abort("ops", 3_000));
    assert_eq!(d.state, DeploymentState::Aborted);
    assert_eq!(d.reason, "aborted by ops");
    assert_eq!(d.nodes[0].state, NodeState::Done);
    assert_eq!(d.nodes[1].state, NodeState::Deploying);
    assert_eq!(d.nodes[2].state, NodeState::Skipped);
    assert!(!d.is_settled(), "node 2 is still deploying");
    d.set_node(1, NodeState::Done, "", 4_000);
    assert!(d.is_settled());
    assert!(!d.abort("ops", 5_000), "an ended deployment stays as it is");
}

#[test]
fn states_have_the_api_s_names() {
    assert_eq!(NodeState::RollingBack.as_str(), "rolling-back");
    assert_eq!(NodeState::RolledBack.as_str(), "rolled-back");
    assert_eq!(DeploymentState::Halted.as_str(), "halted");
    let json = serde_json::to_string(&NodeState::RolledBack).unwrap();
    assert_eq!(json, "\"rolled-back\"");
}

fn instance(version: &str, state: &str, restarts: u32) -> pb::Instance {
    pb::Instance {
        service: "orders".into(),
        version: version.into(),
        instance_id: format!("orders-{version}-9000"),
        port: 9000,
        pid: 42,
        state: state.into(),
        restarts,
    }
}

#[test]
fn a_soak_passes_only_when_the_instance_ran_healthy_throughout() {
    let i = instance("2", "running", 0);
    let passing = Some(("passing", ""));
    assert!(matches!(
        soak_verdict(Some(&i), passing, 0, 4_000, 10_000),
        Soak::Wait(w) if w.contains("6 s left")
    ));
    assert_eq!(
        soak_verdict(Some(&i), passing, 0, 10_000, 10_000),
        Soak::Pass
    );
    // Not yet passing in Consul at the end: a grace, then a failure.
    assert!(matches!(
        soak_verdict(Some(&i), None, 0, 10_000, 10_000),
        Soak::Wait(_)
    ));
    assert!(matches!(
        soak_verdict(Some(&i), None, 0, 50_000, 10_000),
        Soak::Fail(f) if f.contains("not registered")
    ));
    assert!(matches!(
        soak_verdict(Some(&i), Some(("critical", "HTTP 500")), 0, 1_000, 10_000),
        Soak::Fail(f) if f.contains("critical") && f.contains("HTTP 500")
    ));
    let restarted = instance("2", "running", 1);
    assert!(matches!(
        soak_verdict(Some(&restarted), passing, 0, 1_000, 10_000),
        Soak::Fail(f) if f.contains("restarted")
    ));
    let crashed = instance("2", "crashed", 0);
    assert!(matches!(
        soak_verdict(Some(&crashed), passing, 0, 1_000, 10_000),
        Soak::Fail(f) if f.contains("crashed")
    ));
    assert!(matches!(
        soak_verdict(None, passing, 0, 1_000, 10_000),
        Soak::Fail(_)
    ));
}

#[test]
fn the_version_a_node_ran_is_the_running_instance_s() {
    assert_eq!(running_version(&[]), None);
    let both = [instance("1", "stopped", 0), instance("2", "running", 0)];
    assert_eq!(running_version(&both).as_deref(), Some("2"));
}

#[test]
fn a_busy_or_unreachable_deployer_is_not_a_failure() {
    for code in [
        tonic::Code::Unavailable,
        tonic::Code::Aborted,
        tonic::Code::DeadlineExceeded,
        tonic::Code::Unknown,
    ] {
        assert!(is_away(code), "{code:?}");
    }
    for code in [
        tonic::Code::FailedPrecondition,
        tonic::Code::NotFound,
        tonic::Code::InvalidArgument,
        tonic::Code::Unauthenticated,
    ] {
        assert!(!is_away(code), "{code:?}");
    }
}
