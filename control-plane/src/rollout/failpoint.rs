//! Named points in the rollout driver where a test can have mesh-control
//! killed, to prove that the next leader carries on from the record:
//! `MESH_CONTROL_FAILPOINTS=rollout.after-push` (a comma-separated list)
//! makes the process send itself SIGKILL the first time it gets there: no
//! cleanup runs, no lock is released, as when an operator or the kernel
//! kills it. Points:
//! `rollout.after-plan` (the rollout is stored, nothing pushed),
//! `rollout.after-push` (a node's routes changed, the record not yet
//! updated), `rollout.during-gate` (a node acknowledged, its gate under
//! way), `rollout.before-revert` (reverts decided, not made).
//!
//! Unset, which is how mesh-control runs outside tests, a point costs one
//! read of a value set once.

use std::sync::OnceLock;

/// The environment variable naming the points.
pub const ENV: &str = "MESH_CONTROL_FAILPOINTS";

static POINTS: OnceLock<Vec<String>> = OnceLock::new();

/// Kills the process when `name` is one of the configured points.
pub fn hit(name: &str) {
    let points = POINTS.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    });
    if points.iter().any(|p| p == name) {
        tracing::error!(failpoint = name, "failpoint reached: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; should raise fail, go no further.
        std::process::abort();
    }
}
