//! Rollout steps of nodes that serve their routes with nginx: the
//! version's nginx.conf, rendered here, applied by the node's mesh-deployer
//! (`ApplyConfig`), and the gate that judges what the apply came to.
//!
//! The deployer writes the file, runs `nginx -t`, reloads, and asks nginx
//! a URL that answers only once the version is in effect; when a step
//! fails it puts the previous file back. So a refused apply leaves nginx
//! serving what it served, and the rollout aborts with the deployer's
//! words. A deployer out of reach is asked again until the ack timeout.

use std::time::Duration;

use mesh_proto::v1 as pb;

use super::{NodeProgress, RolloutOptions, Verdict};
use crate::{
    control::{Control, error_chain},
    error::ControlError,
};

/// The shortest time one ApplyConfig call is given, even when the ack
/// timeout is nearly spent (a slow `nginx -t` should not be cut short).
pub const MIN_APPLY_CALL: Duration = Duration::from_secs(5);

/// The longest one ApplyConfig call is given: the deployer's validate and
/// reload (30 s each), its verify (10 s) and a restore.
pub const MAX_APPLY_CALL: Duration = Duration::from_secs(100);

/// What an ApplyConfig of a node's nginx.conf came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Apply {
    /// The file is in place, checked, loaded and answering.
    Done {
        /// SHA-256 of the file, lowercase hex.
        sha256: String,
        /// False when the node had this file already.
        changed: bool,
    },
    /// The file cannot be rendered, or the deployer refused it or failed a
    /// step (and put the previous file back): why. Asking again would not
    /// help.
    Refused(String),
    /// The deployer (or Consul, for the render) could not be asked: why.
    /// Worth trying again.
    Unreachable(String),
}

/// Renders `node`'s nginx.conf at `version` and has its deployer apply
/// it, the call bounded by `timeout`.
pub async fn apply(control: &Control, node: &str, version: u64, timeout: Duration) -> Apply {
    let text = match control.nginx_conf(node, version).await {
        Ok(text) => text,
        Err(ControlError::Unavailable(why)) => return Apply::Unreachable(why),
        Err(e) => {
            return Apply::Refused(format!(
                "cannot render its nginx.conf of version {version}: {e}"
            ));
        }
    };
    let settings = &control.nginx_settings().apply;
    let (mut client, url) = match control.deployer(node).await {
        Ok(c) => c,
        Err(e) => return Apply::Unreachable(e.to_string()),
    };
    let request = pb::ApplyConfigRequest {
        path: settings.conf_path.clone(),
        content: text.into_bytes(),
        validate: Some(pb::Argv {
            args: settings.validate.clone(),
        }),
        reload: Some(pb::Argv {
            args: settings.reload.clone(),
        }),
        verify_url: settings.verify_url_of(version).unwrap_or_default(),
        verify_timeout_ms: 0,
    };
    match tokio::time::timeout(timeout, client.apply_config(request)).await {
        Err(_) => Apply::Unreachable(format!(
            "node {node}'s deployer at {url} did not answer within {} s",
            timeout.as_secs()
        )),
        Ok(Ok(answer)) => {
            let answer = answer.into_inner();
            Apply::Done {
                sha256: answer.sha256,
                changed: answer.changed,
            }
        }
        Ok(Err(status)) => outcome_of(node, &url, &status),
    }
}

/// What a failed ApplyConfig call means for the rollout.
pub fn outcome_of(node: &str, url: &str, status: &tonic::Status) -> Apply {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        // The transport, not the deployer, said no: ask again.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            let why =
                std::error::Error::source(status).map_or_else(|| message.to_owned(), error_chain);
            Apply::Unreachable(format!(
                "node {node}'s deployer at {url} did not answer: {why}"
            ))
        }
        Code::FailedPrecondition => Apply::Refused(message.to_owned()),
        code => Apply::Refused(format!(
            "node {node}'s deployer at {url} answered {code:?}: {message}"
        )),
    }
}

/// How long the next ApplyConfig call of a node pushed at `pushed_at_ms`
/// may take: what is left of the ack timeout, within
/// [`MIN_APPLY_CALL`]..=[`MAX_APPLY_CALL`].
pub fn call_timeout(options: &RolloutOptions, pushed_at_ms: u64, now_ms: u64) -> Duration {
    let spent = now_ms.saturating_sub(pushed_at_ms);
    let left = Duration::from_millis(options.ack_timeout_ms.saturating_sub(spent));
    left.clamp(MIN_APPLY_CALL, MAX_APPLY_CALL)
}

/// The gate of an nginx node pushed `version`: `apply` is what this pass's
/// ApplyConfig came to (`None` once acknowledged: no call is made). Sets
/// `acked_at_ms` when the apply succeeds; then only the soak is waited
/// out, as the apply's verify was the node's health check.
pub fn gate(
    progress: &mut NodeProgress,
    version: u64,
    apply: Option<&Apply>,
    options: &RolloutOptions,
    now_ms: u64,
) -> Verdict {
    let node = progress.node.clone();
    if progress.acked_at_ms == 0 {
        match apply {
            Some(Apply::Done { .. }) => progress.acked_at_ms = now_ms,
            Some(Apply::Refused(why)) => {
                return Verdict::Fail(format!(
                    "node {node} refused the nginx.conf of version {version}: {why}"
                ));
            }
            Some(Apply::Unreachable(why)) => {
                let waited = now_ms.saturating_sub(progress.pushed_at_ms);
                if waited > options.ack_timeout_ms {
                    return Verdict::Fail(format!(
                        "node {node} did not apply the nginx.conf of version {version} within {} s: {why}",
                        options.ack_timeout_ms / 1000
                    ));
                }
                return Verdict::Wait(format!(
                    "applying the nginx.conf of version {version} to node {node}: {why}; trying again"
                ));
            }
            None => {
                return Verdict::Wait(format!(
                    "applying the nginx.conf of version {version} to node {node}"
                ));
            }
        }
    }
    let since_ack = now_ms.saturating_sub(progress.acked_at_ms);
    if since_ack < options.soak_ms {
        let left = (options.soak_ms - since_ack).div_ceil(1000);
        return Verdict::Wait(format!("node {node} soaking, {left} s left"));
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Frontend, NodeState};

    fn pushed(at: u64) -> NodeProgress {
        NodeProgress {
            node: "n2".into(),
            from: 3,
            state: NodeState::Gating,
            frontend: Frontend::Nginx,
            baseline: None,
            pushed_at_ms: at,
            acked_at_ms: 0,
            reverted_at_ms: 0,
            detail: String::new(),
        }
    }

    fn options() -> RolloutOptions {
        RolloutOptions {
            soak_ms: 2_000,
            ack_timeout_ms: 10_000,
            ..RolloutOptions::default()
        }
    }

    #[test]
    fn a_successful_apply_acknowledges_then_the_soak_is_waited_out() {
        let mut p = pushed(1_000);
        let done = Apply::Done {
            sha256: "ab".into(),
            changed: true,
        };
        let v = gate(&mut p, 4, Some(&done), &options(), 1_500);
        assert_eq!(p.acked_at_ms, 1_500);
        assert_eq!(v, Verdict::Wait("node n2 soaking, 2 s left".into()));
        // Acknowledged: no apply is made, the soak alone decides.
        assert!(matches!(
            gate(&mut p, 4, None, &options(), 3_000),
            Verdict::Wait(_)
        ));
        assert_eq!(gate(&mut p, 4, None, &options(), 3_500), Verdict::Pass);
    }

    #[test]
    fn a_refused_apply_fails_the_gate_with_the_deployers_words() {
        let mut p = pushed(1_000);
        let why = "validate failed: nginx -t (exit status: 1): \"upstream\" directive is not allowed here; the previous file was restored";
        let v = gate(
            &mut p,
            4,
            Some(&Apply::Refused(why.into())),
            &options(),
            1_200,
        );
        let Verdict::Fail(reason) = v else {
            panic!("{v:?}")
        };
        assert!(
            reason.starts_with("node n2 refused the nginx.conf of version 4: validate failed"),
            "{reason}"
        );
        assert!(
            reason.contains("the previous file was restored"),
            "{reason}"
        );
        assert_eq!(p.acked_at_ms, 0);
    }

    #[test]
    fn an_unreachable_deployer_is_asked_again_until_the_ack_timeout() {
        let mut p = pushed(1_000);
        let down = Apply::Unreachable("connection refused".into());
        let v = gate(&mut p, 4, Some(&down), &options(), 10_000);
        assert!(
            matches!(&v, Verdict::Wait(w) if w.contains("connection refused; trying again")),
            "{v:?}"
        );
        let v = gate(&mut p, 4, Some(&down), &options(), 11_001);
        assert!(
            matches!(&v, Verdict::Fail(f) if f.contains("within 10 s: connection refused")),
            "{v:?}"
        );
    }

    #[test]
    fn failed_calls_are_sorted_into_retry_and_refusal() {
        let refused = tonic::Status::failed_precondition(
            "validate failed: nginx -t: bad; the previous file was restored",
        );
        assert_eq!(
            outcome_of("n2", "http://10.0.0.2:8894", &refused),
            Apply::Refused("validate failed: nginx -t: bad; the previous file was restored".into())
        );
        let token = tonic::Status::unauthenticated("bad token");
        assert!(matches!(
            outcome_of("n2", "u", &token),
            Apply::Refused(m) if m.contains("Unauthenticated") && m.contains("bad token")
        ));
        for status in [
            tonic::Status::unavailable("connection refused"),
            tonic::Status::deadline_exceeded("slow"),
        ] {
            assert!(
                matches!(outcome_of("n2", "u", &status), Apply::Unreachable(_)),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_call_gets_what_is_left_of_the_ack_timeout_within_bounds() {
        let o = options();
        assert_eq!(call_timeout(&o, 0, 2_000), Duration::from_secs(8));
        assert_eq!(call_timeout(&o, 0, 9_000), MIN_APPLY_CALL);
        let long = RolloutOptions {
            ack_timeout_ms: 3_600_000,
            ..o
        };
        assert_eq!(call_timeout(&long, 0, 0), MAX_APPLY_CALL);
    }
}
