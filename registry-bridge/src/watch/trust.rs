//! Which answers may replace what is known. An answer from a server that
//! knows no leader (a `?stale` read during an election, or a partitioned
//! server) may be behind: it may add, but it never removes. Errors never
//! reach here; they keep the last set by not changing it at all.

/// What to do with an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Publish it.
    Apply,
    /// Same as what is known: nothing to publish.
    Unchanged,
    /// It would shrink the set without a known leader: ignore it.
    Untrusted,
}

/// Judges `new` against `current` (`None` before the first answer);
/// `shrinks(old, new)` says whether `new` drops anything `old` has.
pub(crate) fn judge<T: PartialEq + ?Sized>(
    current: Option<&T>,
    new: &T,
    known_leader: bool,
    shrinks: impl FnOnce(&T, &T) -> bool,
) -> Decision {
    match current {
        None => Decision::Apply,
        Some(old) if old == new => Decision::Unchanged,
        Some(old) if !known_leader && shrinks(old, new) => Decision::Untrusted,
        Some(_) => Decision::Apply,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn judge_sets(old: Option<&[&str]>, new: &[&str], leader: bool) -> Decision {
        let old = old.map(set);
        judge(old.as_ref(), &set(new), leader, |o, n| !o.is_subset(n))
    }

    #[test]
    fn a_first_answer_applies_even_without_a_leader() {
        assert_eq!(judge_sets(None, &[], false), Decision::Apply);
    }

    #[test]
    fn without_a_leader_a_shrinking_answer_is_refused() {
        assert_eq!(
            judge_sets(Some(&["a", "b"]), &["a"], false),
            Decision::Untrusted
        );
        assert_eq!(judge_sets(Some(&["a"]), &[], false), Decision::Untrusted);
        // Replacing one member also drops one.
        assert_eq!(judge_sets(Some(&["a"]), &["b"], false), Decision::Untrusted);
    }

    #[test]
    fn without_a_leader_growth_applies() {
        assert_eq!(
            judge_sets(Some(&["a"]), &["a", "b"], false),
            Decision::Apply
        );
    }

    #[test]
    fn with_a_leader_anything_applies() {
        assert_eq!(judge_sets(Some(&["a", "b"]), &[], true), Decision::Apply);
    }

    #[test]
    fn the_same_answer_is_unchanged() {
        assert_eq!(judge_sets(Some(&["a"]), &["a"], false), Decision::Unchanged);
        assert_eq!(judge_sets(Some(&["a"]), &["a"], true), Decision::Unchanged);
    }
}
