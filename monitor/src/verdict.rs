//! From probe outcomes to a verdict per target, with hysteresis: the
//! verdict's status turns only after `unhealthy_after` consecutive probes
//! that call for warning or critical, and back after `healthy_after`
//! consecutive good ones, so that one lost packet does not pull an instance
//! out of routing. A target seen for the first time that answers well is
//! passing at once.
//!
//! The verdict also names the condition behind it (the outcome of the last
//! probe: hung, down, slow...); alerts follow the condition, the Consul
//! check follows the status.

use crate::{
    alert::Alert,
    config::Probing,
    probe::{CheckStatus, Outcome, ProbeResult},
};

/// Judges outcomes by the configured thresholds.
#[derive(Clone, Copy, Debug)]
pub struct Judge {
    unhealthy_after: u32,
    healthy_after: u32,
    slow_status: CheckStatus,
}

/// What the monitor holds true of a target now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The check status it stands for.
    pub status: CheckStatus,
    /// The outcome behind it.
    pub condition: Outcome,
    /// What the last probe saw.
    pub evidence: String,
}

/// One target's judgement so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetState {
    /// The verdict; none until the first one is reached.
    pub verdict: Option<Verdict>,
    /// Consecutive probes calling for another status than the verdict's.
    streak: Option<(CheckStatus, u32)>,
}

// === impl Judge ===

impl Judge {
    /// A judge with the thresholds of `probing`.
    pub fn new(probing: &Probing) -> Self {
        Self {
            unhealthy_after: probing.unhealthy_after,
            healthy_after: probing.healthy_after,
            slow_status: probing.slow_status,
        }
    }

    /// The check status a slow target gets.
    pub fn slow_status(&self) -> CheckStatus {
        self.slow_status
    }

    /// Records one probe of the target; `true` when the verdict's status
    /// or condition changed.
    pub fn observe(&self, state: &mut TargetState, result: &ProbeResult) -> bool {
        let status = result.outcome.status(self.slow_status);
        if let Some(v) = state.verdict.as_mut().filter(|v| v.status == status) {
            state.streak = None;
            v.evidence.clone_from(&result.evidence);
            let changed = v.condition != result.outcome;
            v.condition = result.outcome;
            return changed;
        }
        let count = match state.streak {
            Some((s, n)) if s == status => n + 1,
            _ => 1,
        };
        let needed = match status {
            CheckStatus::Passing => self.healthy_after,
            _ => self.unhealthy_after,
        };
        let first_and_good = state.verdict.is_none() && status == CheckStatus::Passing;
        if count >= needed || first_and_good {
            state.verdict = Some(Verdict {
                status,
                condition: result.outcome,
                evidence: result.evidence.clone(),
            });
            state.streak = None;
            return true;
        }
        state.streak = Some((status, count));
        false
    }

    /// The state of a target with `alert` open when the monitor started:
    /// the verdict the last run reached, so that the alert stays open (and
    /// is not sent again) while the condition lasts. None for an alert that
    /// is not a probe's (a log alert).
    pub fn restored(&self, alert: &Alert) -> Option<TargetState> {
        let condition = alert.kind.outcome()?;
        Some(TargetState {
            verdict: Some(Verdict {
                status: condition.status(self.slow_status),
                condition,
                evidence: alert.evidence.clone(),
            }),
            streak: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn judge(unhealthy_after: u32, healthy_after: u32) -> Judge {
        Judge {
            unhealthy_after,
            healthy_after,
            slow_status: CheckStatus::Warning,
        }
    }

    fn saw(outcome: Outcome) -> ProbeResult {
        ProbeResult {
            outcome,
            latency: Duration::from_millis(1),
            evidence: format!("saw {}", outcome.as_str()),
        }
    }

    fn status(state: &TargetState) -> Option<(CheckStatus, Outcome)> {
        state.verdict.as_ref().map(|v| (v.status, v.condition))
    }

    #[test]
    fn a_new_target_that_answers_is_passing_at_once() {
        let j = judge(2, 2);
        let mut s = TargetState::default();
        assert!(j.observe(&mut s, &saw(Outcome::Up)));
        assert_eq!(status(&s), Some((CheckStatus::Passing, Outcome::Up)));
    }

    #[test]
    fn it_takes_consecutive_bad_probes_to_turn_critical_and_good_ones_to_turn_back() {
        let j = judge(2, 2);
        let mut s = TargetState::default();
        j.observe(&mut s, &saw(Outcome::Up));
        assert!(!j.observe(&mut s, &saw(Outcome::Hung)));
        assert!(
            !j.observe(&mut s, &saw(Outcome::Up)),
            "a blip resets the streak"
        );
        assert!(!j.observe(&mut s, &saw(Outcome::Hung)));
        assert!(j.observe(&mut s, &saw(Outcome::Down)));
        assert_eq!(status(&s), Some((CheckStatus::Critical, Outcome::Down)));
        // Still critical, but now hung: the condition changes, the status not.
        assert!(j.observe(&mut s, &saw(Outcome::Hung)));
        assert_eq!(status(&s), Some((CheckStatus::Critical, Outcome::Hung)));
        assert!(!j.observe(&mut s, &saw(Outcome::Up)));
        assert!(j.observe(&mut s, &saw(Outcome::Up)));
        assert_eq!(status(&s), Some((CheckStatus::Passing, Outcome::Up)));
    }

    #[test]
    fn slow_is_a_warning_unless_configured_passing() {
        let j = judge(1, 1);
        let mut s = TargetState::default();
        j.observe(&mut s, &saw(Outcome::Slow));
        assert_eq!(status(&s), Some((CheckStatus::Warning, Outcome::Slow)));
        let lenient = Judge {
            slow_status: CheckStatus::Passing,
            ..j
        };
        let mut s = TargetState::default();
        lenient.observe(&mut s, &saw(Outcome::Up));
        assert!(lenient.observe(&mut s, &saw(Outcome::Slow)));
        assert_eq!(status(&s), Some((CheckStatus::Passing, Outcome::Slow)));
    }
}
