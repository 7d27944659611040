//! The removal guard: whether a run may send its removals.
//!
//! A source that failed quietly and a source that returned far fewer rows both look, to a
//! diff, like members leaving. The guard stops such a run before anything is sent — it
//! ends `Blocked` — until a person approves it.
//!
//! Approval names a blocked run: the controller sets `cohorts.dev/approve-removals` to the
//! id of the most recent blocked run, and the next run carries a [`RemovalApproval`] with
//! that id and the number of removals the person saw. The approval covers a run that
//! removes at most that many members; if the source moved further since, the run is blocked
//! again, under its own id, so nobody approves numbers they have not seen.

use crate::api::RemovalGuard;

/// A person's approval of one blocked run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovalApproval {
    /// Id of the blocked run that was approved.
    pub run_id: String,
    /// Removals that run would have made: the most this approval lets through.
    pub removals: u64,
}

/// The numbers the guard looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardInput {
    /// Members Braze holds from the last successful run.
    pub previous_size: u64,
    /// Members in the source now.
    pub new_size: u64,
    /// Members the run would remove.
    pub removals: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardDecision {
    /// Within limits, or the guard is off.
    Proceed,
    /// Past the limits, but approved.
    Approved {
        run_id: String,
    },
    Blocked(Blocked),
}

/// Why and by how much a run was stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: BlockReason,
    pub input: GuardInput,
    pub max_removal_percent: u8,
    /// An approval that was present but does not cover this run.
    pub insufficient_approval: Option<RemovalApproval>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// The source yielded no member while Braze holds some.
    EmptySource,
    /// More than `max_removal_percent` of the previous cohort would leave.
    TooManyRemovals,
}

/// Decides whether a run may send its removals.
pub fn decide(guard: Option<&RemovalGuard>, input: GuardInput, approval: Option<&RemovalApproval>) -> GuardDecision {
    let default = RemovalGuard::default();
    let guard = guard.unwrap_or(&default);
    if guard.disabled || input.removals == 0 {
        return GuardDecision::Proceed;
    }
    let max = guard.max_removal_percent.min(100);
    let reason = if input.new_size == 0 && input.previous_size > 0 {
        BlockReason::EmptySource
    } else if u128::from(input.removals) * 100 > u128::from(max) * u128::from(input.previous_size) {
        BlockReason::TooManyRemovals
    } else {
        return GuardDecision::Proceed;
    };
    match approval {
        Some(a) if input.removals <= a.removals => GuardDecision::Approved { run_id: a.run_id.clone() },
        _ => GuardDecision::Blocked(Blocked {
            reason,
            input,
            max_removal_percent: max,
            insufficient_approval: approval.cloned(),
        }),
    }
}

impl Blocked {
    /// What happened, in a sentence, with the numbers.
    pub fn summary(&self) -> String {
        let GuardInput { previous_size, new_size: _, removals } = self.input;
        let mut text = match self.reason {
            BlockReason::EmptySource => {
                format!("the source returned no member while Braze holds {previous_size}; nothing sent")
            }
            BlockReason::TooManyRemovals => format!(
                "would remove {removals} of {previous_size} members ({:.1}%), over the {}% allowed; \
                 nothing sent",
                percent(removals, previous_size),
                self.max_removal_percent
            ),
        };
        if let Some(a) = &self.insufficient_approval {
            text.push_str(&format!(
                "; the approval of run {} covers {} removals, not {removals}",
                a.run_id, a.removals
            ));
        }
        text
    }

    /// How a person lets this run through (or changes the guard).
    pub fn how_to_approve(&self, import_name: &str, namespace: &str, run_id: &str) -> String {
        format!(
            "if intended, approve: kubectl -n {namespace} annotate cohortimport {import_name} \
             {}={run_id} --overwrite (or change spec.removalGuard)",
            crate::api::APPROVE_REMOVALS_ANNOTATION
        )
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 100.0 } else { part as f64 * 100.0 / whole as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(previous_size: u64, new_size: u64, removals: u64) -> GuardInput {
        GuardInput { previous_size, new_size, removals }
    }

    fn guard(max: u8) -> RemovalGuard {
        RemovalGuard { max_removal_percent: max, disabled: false }
    }

    #[test]
    fn empty_source_with_a_non_empty_snapshot_is_blocked() {
        let d = decide(None, input(10, 0, 10), None);
        let GuardDecision::Blocked(b) = d else { panic!("{d:?}") };
        assert_eq!(b.reason, BlockReason::EmptySource);
        assert!(b.summary().contains("no member"), "{}", b.summary());
        // Even when the share allows everything.
        assert!(matches!(
            decide(Some(&guard(100)), input(10, 0, 10), None),
            GuardDecision::Blocked(Blocked { reason: BlockReason::EmptySource, .. })
        ));
    }

    #[test]
    fn removals_past_the_share_are_blocked_at_the_default_of_20_percent() {
        assert_eq!(decide(None, input(100, 80, 20), None), GuardDecision::Proceed);
        let d = decide(None, input(100, 79, 21), None);
        let GuardDecision::Blocked(b) = d else { panic!("{d:?}") };
        assert_eq!(b.reason, BlockReason::TooManyRemovals);
        assert_eq!(b.max_removal_percent, 20);
        let s = b.summary();
        assert!(s.contains("remove 21 of 100") && s.contains("21.0%") && s.contains("20%"), "{s}");
    }

    #[test]
    fn zero_percent_blocks_any_removal_and_first_runs_are_never_blocked() {
        assert!(matches!(decide(Some(&guard(0)), input(1000, 1000, 1), None), GuardDecision::Blocked(_)));
        assert_eq!(decide(Some(&guard(0)), input(0, 5, 0), None), GuardDecision::Proceed);
        assert_eq!(decide(None, input(0, 0, 0), None), GuardDecision::Proceed);
    }

    #[test]
    fn disabled_guard_lets_everything_through() {
        let off = RemovalGuard { max_removal_percent: 0, disabled: true };
        assert_eq!(decide(Some(&off), input(10, 0, 10), None), GuardDecision::Proceed);
    }

    #[test]
    fn approval_covers_at_most_the_removals_it_saw() {
        let approval = RemovalApproval { run_id: "r1".into(), removals: 50 };
        assert_eq!(decide(None, input(100, 50, 50), Some(&approval)), GuardDecision::Approved { run_id: "r1".into() });
        let d = decide(None, input(100, 40, 60), Some(&approval));
        let GuardDecision::Blocked(b) = d else { panic!("{d:?}") };
        assert!(b.summary().contains("approval of run r1 covers 50 removals, not 60"), "{}", b.summary());
        // An approval is not needed within limits.
        assert_eq!(decide(None, input(100, 95, 5), Some(&approval)), GuardDecision::Proceed);
    }

    #[test]
    fn the_hint_names_the_annotation_and_the_run() {
        let GuardDecision::Blocked(b) = decide(None, input(10, 0, 10), None) else { panic!() };
        let hint = b.how_to_approve("vip", "growth", "20261128-063000-a1b2");
        assert!(hint.contains("cohorts.dev/approve-removals=20261128-063000-a1b2"), "{hint}");
        assert!(hint.contains("-n growth") && hint.contains("cohortimport vip"), "{hint}");
    }

    #[test]
    fn huge_cohorts_do_not_overflow() {
        assert_eq!(decide(Some(&guard(100)), input(u64::MAX, 1, u64::MAX - 1), None), GuardDecision::Proceed);
    }
}
