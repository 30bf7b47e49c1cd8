use std::time::Duration;

use mesh_runtime::duration::HumanDuration;

use super::*;
use crate::model::Route;

fn routes(timeout_secs: u64) -> Routes {
    [(
        "orders".to_owned(),
        Route {
            timeout: Some(HumanDuration(Duration::from_secs(timeout_secs))),
            ..Route::default()
        },
    )]
    .into()
}

#[test]
fn a_first_version_is_all_added_and_the_next_shows_what_changed() {
    let first = next_version("n1", 1, None, "alice".into(), routes(2));
    assert_eq!(first.number, 1);
    assert_eq!(first.previous, Some(0));
    assert!(
        first
            .diff
            .starts_with("--- /dev/null\n+++ n1 version 1 (proxy)\n"),
        "{}",
        first.diff
    );
    assert!(first.diff.contains("+timeout = \"2s\""), "{}", first.diff);
    // Numbers are one sequence across the mesh: the next one of this node
    // need not be 2.
    let second = next_version("n1", 7, Some(&first), "bob".into(), routes(3));
    assert_eq!(second.number, 7);
    assert_eq!(second.previous_number(), 1);
    assert_eq!(second.author, "bob");
    assert!(
        second
            .diff
            .contains("--- n1 version 1 (proxy)\n+++ n1 version 7 (proxy)\n")
    );
    assert!(
        second
            .diff
            .contains("-timeout = \"2s\"\n+timeout = \"3s\"\n"),
        "{}",
        second.diff
    );
    assert!(
        second.rendered.contains("config version 7."),
        "{}",
        second.rendered
    );
}

#[test]
fn an_author_is_required_and_printable() {
    assert_eq!(check_author("  alice ").unwrap(), "alice");
    for bad in ["", "  ", "a\nb", &"x".repeat(200)] {
        let e = check_author(bad).unwrap_err();
        assert!(e.to_string().starts_with("author: "), "{e}");
    }
}

#[test]
fn an_instance_is_as_healthy_as_its_worst_check() {
    let entry = |statuses: &[&str]| {
        let json = serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": "web-1", "Service": "web", "Port": 80, "Address": ""},
            "Checks": statuses.iter().map(|s| serde_json::json!({"CheckID": "c", "Status": s})).collect::<Vec<_>>(),
        });
        serde_json::from_value::<ServiceEntry>(json).unwrap()
    };
    assert_eq!(instance_info(&entry(&[])).health, "passing");
    assert_eq!(
        instance_info(&entry(&["passing", "warning"])).health,
        "warning"
    );
    let info = instance_info(&entry(&["warning", "critical", "passing"]));
    assert_eq!(info.health, "critical");
    assert_eq!(info.address, "10.0.0.1", "the node's address stands in");
}

#[test]
fn a_bridge_answer_keeps_its_meaning() {
    let url = "http://10.0.0.2:8890";
    let e = bridge_error(
        "n2",
        url,
        &tonic::Status::invalid_argument("Name is reserved"),
    );
    assert!(matches!(e, ControlError::Invalid(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("n2's bridge refused it: Name is reserved"),
        "{e}"
    );
    let e = bridge_error("n2", url, &tonic::Status::unavailable("down"));
    assert!(
        matches!(e, ControlError::Unavailable(_)) && e.to_string().contains(url),
        "{e}"
    );
    let e = bridge_error("n2", url, &tonic::Status::internal("bug"));
    assert!(matches!(e, ControlError::Internal(_)), "{e:?}");
}

#[test]
fn errors_map_to_grpc_and_http_in_one_place() {
    let conflict = ControlError::Conflict(Conflict {
        key: "mesh/nodes/n1/routes".into(),
        expected: 7,
        actual: 9,
        current: Some((2, "bob".into())),
    });
    assert_eq!(conflict.grpc_code(), tonic::Code::Aborted);
    assert_eq!(conflict.http_status(), axum::http::StatusCode::CONFLICT);
    let text = conflict.to_string();
    assert!(
        text.contains("mesh/nodes/n1/routes")
            && text.contains("revision 7")
            && text.contains("revision 9"),
        "{text}"
    );
    assert!(text.contains("version 2 by bob"), "{text}");
    let invalid = ControlError::invalid("routes.orders.timeout", "zero");
    assert_eq!(invalid.grpc_code(), tonic::Code::InvalidArgument);
    assert_eq!(invalid.http_status(), axum::http::StatusCode::BAD_REQUEST);
    let status = tonic::Status::from(ControlError::NotFound("node \"x\"".into()));
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[test]
fn a_proxy_s_report_says_applied_refused_or_pending_against_the_newest_version() {
    use crate::store::ProxyReport;
    assert_eq!(ProxyStatus::of(3, None), ProxyStatus::unknown());
    let report = |in_effect, refused, reason: &str| ProxyReport {
        version_in_effect: in_effect,
        refused_version: refused,
        reason: reason.into(),
        at_ms: 1_764_000_000_000,
    };
    let applied = ProxyStatus::of(3, Some(&report(3, 0, "")));
    assert_eq!(
        (applied.state.as_str(), applied.version_in_effect),
        ("applied", 3)
    );
    assert_eq!(applied.last_seen, "2025-11-24T16:00:00.000Z");
    let refused = ProxyStatus::of(
        4,
        Some(&report(3, 4, "routes.web.retries: 11 is more than 10")),
    );
    assert_eq!(
        (
            refused.state.as_str(),
            refused.refused_version,
            refused.reason.as_str()
        ),
        ("refused", 4, "routes.web.retries: 11 is more than 10")
    );
    assert_eq!(
        ProxyStatus::of(5, Some(&report(3, 4, "old"))).state,
        "pending"
    );
    assert_eq!(ProxyStatus::of(0, Some(&report(2, 0, ""))).state, "pending");
}
