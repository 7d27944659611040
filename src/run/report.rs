//! What a run did, for `.status`, the run report email and logs.

use std::time::Duration;

use jiff::Timestamp;

use crate::api::{
    CommittedSnapshot, DryRunSample, MAX_DRY_RUN_SAMPLE, MAX_RUN_MESSAGE_CHARS, RunRecord, RunResult, RunTrigger,
};
use crate::braze::{BrazeError, Rejected};
use crate::domain::guard::Blocked;
use crate::domain::identifiers::SkipCounts;
use crate::snapshot::{Missing, SnapshotError};
use crate::source::SourceError;

/// Members listed by id in a report, per direction.
pub const SAMPLE_SIZE: usize = 10;

/// One finished run.
#[derive(Debug)]
pub struct RunReport {
    pub run_id: String,
    pub trigger: RunTrigger,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub duration: Duration,
    pub result: RunResult,
    /// Members in the source after normalisation and de-duplication.
    pub cohort_size: u64,
    /// Members Braze held from the last successful run (0 on a first run).
    pub previous_size: u64,
    /// Changes the diff found. On a failed run, see `accepted_*` for what Braze took.
    pub added: u64,
    pub removed: u64,
    pub unchanged: u64,
    /// Requests beyond the changes, for keys an interrupted run left in doubt: unchanged
    /// members added again and absent ones removed again.
    pub resent: u64,
    /// Changes an interrupted run's checkpoint shows Braze already accepted: not sent
    /// again (in `added` and `removed` all the same).
    pub already_sent: u64,
    /// Rows the source yielded, and those that gave no member, by reason.
    pub rows: u64,
    pub skipped: SkipCounts,
    /// Rows that repeated a member.
    pub duplicates: u64,
    /// Requests sent to Braze (naming included), each counted once; retries apart.
    pub requests: u32,
    pub retries: u32,
    /// Identifiers Braze accepted this run.
    pub accepted_adds: u64,
    pub accepted_removes: u64,
    /// Changes not accepted (failed, or never sent because the run stopped).
    pub unsent: u64,
    /// The cohort was (re)named in Braze this run.
    pub cohort_named: bool,
    /// The snapshot generation this run committed.
    pub committed_generation: Option<u64>,
    /// What the store holds after a successful run (committed now or before), for
    /// `status.committedSnapshot`.
    pub committed: Option<CommittedSnapshot>,
    /// Why the run was blocked without sending anything: the store does not hold what
    /// status says Braze holds.
    pub snapshot_missing: Option<SnapshotMissing>,
    /// The blocked run whose resync approval this run carried out.
    pub resynced: Option<String>,
    /// Why the removal guard stopped the run (or, on a dry run, would have).
    pub blocked: Option<Blocked>,
    /// The blocked run whose approval let this run's removals through.
    pub approved_run: Option<String>,
    /// First members, in key order, of each direction (`external_id:…`, `alias:…@…`).
    pub sample_added: Vec<String>,
    pub sample_removed: Vec<String>,
    /// Things a person should know that did not fail the run.
    pub notes: Vec<String>,
    pub error: Option<RunError>,
    /// What to do next, for failed and blocked runs.
    pub hint: Option<String>,
    /// Keys spilled to disk while sorting (0 for cohorts that fit in memory).
    pub spilled_runs: u32,
    /// Braze answers by HTTP status (`None`: no answer — timeout or connection error):
    /// every attempt of the membership requests, and the naming request's last answer.
    pub braze_responses: std::collections::BTreeMap<Option<u16>, u64>,
    /// Time the run's Braze requests waited for their destination's shared budget
    /// (`--braze-requests-per-hour`): the naming, then the membership changes.
    pub braze_budget_wait: Duration,
    /// `/users/track` objects Braze answered for by rejecting them, by its reason: not
    /// added (nor removed), and not sent again unless the member changes.
    pub rejected: Rejected,
}

/// A run blocked because the store does not hold what status says Braze holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMissing {
    pub missing: Missing,
    /// The command that approves a resync of this run.
    pub resync_command: String,
}

impl SnapshotMissing {
    /// The ways forward first, then the cause: status keeps the first 256 characters.
    pub fn summary(&self) -> String {
        format!(
            "snapshot missing, nothing sent. To proceed: {} (sends every member; who left meanwhile stays in \
             Braze) or set a new spec.cohort.id. Cause: {}",
            self.resync_command, self.missing
        )
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading the source failed: {0}")]
    Source(#[from] SourceError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("local scratch space {dir}: {action} failed: {source}")]
    Scratch { dir: String, action: &'static str, source: std::io::Error },
    #[error("the previous snapshot does not hold the {expected} members its metadata says (read {found})")]
    SnapshotCount { expected: u64, found: u64 },
    #[error("naming the cohort in Braze failed: {0}")]
    Naming(BrazeError),
    #[error("Braze did not accept every change ({accepted} of {planned} accepted): {error}")]
    Changes { error: BrazeError, accepted: u64, planned: u64 },
    #[error("Braze accepted {accepted} changes of {planned}, with no error reported; not trusting the run")]
    Incomplete { accepted: u64, planned: u64 },
}

impl RunError {
    /// What a person (or the next run) does about it.
    pub fn hint(&self) -> String {
        match self {
            RunError::Source(_) => "fix the source; nothing was sent to Braze and the next run starts from the same \
                 snapshot"
                .into(),
            RunError::Snapshot(SnapshotError::Conflict { .. }) => {
                "another run of this import committed meanwhile; the next run diffs against it and \
                 sends whatever is still missing"
                    .into()
            }
            RunError::Snapshot(SnapshotError::Corrupt { .. }) | RunError::SnapshotCount { .. } => {
                "the snapshot is damaged: delete it (the next run then re-sends every member, \
                 which is harmless but costs data points) or restore it"
                    .into()
            }
            RunError::Snapshot(_) => "check the operator's access to its snapshot store; Braze may already hold this \
                 run's changes, and the next run re-sends them (membership changes are idempotent)"
                .into(),
            RunError::Scratch { .. } => {
                "give the operator writable scratch space (an emptyDir); nothing was sent".into()
            }
            RunError::Naming(e) | RunError::Changes { error: e, .. } if e.is_permanent() => {
                "fix the Braze settings named above; the snapshot did not advance, so the next run \
                 re-sends every change Braze has not acknowledged"
                    .into()
            }
            RunError::Naming(_) | RunError::Changes { .. } | RunError::Incomplete { .. } => {
                "Braze was unavailable or slow; the snapshot did not advance, so the next run \
                 re-sends every change Braze has not acknowledged"
                    .into()
            }
        }
    }
}

impl RunReport {
    /// One line for `.status` and logs, at most [`MAX_RUN_MESSAGE_CHARS`] characters.
    pub fn message(&self) -> String {
        let mut text = match self.result {
            RunResult::Succeeded => format!(
                "{} members: +{} −{} ={}{}",
                self.cohort_size,
                self.added,
                self.removed,
                self.unchanged,
                if self.cohort_named { ", cohort named in Braze" } else { "" }
            ),
            RunResult::DryRun => format!(
                "dry run, nothing sent: would add {} and remove {} ({} members){}",
                self.added,
                self.removed,
                self.cohort_size,
                self.blocked.as_ref().map(|_| "; the removal guard would block it").unwrap_or("")
            ),
            RunResult::Blocked if self.snapshot_missing.is_some() => {
                self.snapshot_missing.as_ref().map(SnapshotMissing::summary).unwrap_or_default()
            }
            RunResult::Blocked => match (&self.blocked, &self.hint) {
                (Some(b), Some(hint)) => format!("{}. To proceed: {hint}", b.summary()),
                (Some(b), None) => b.summary(),
                _ => "blocked".into(),
            },
            RunResult::Failed => match (&self.error, &self.hint) {
                (Some(e), Some(hint)) => format!("{e}. {hint}"),
                (Some(e), None) => e.to_string(),
                _ => "failed".into(),
            },
            RunResult::Missed => "missed".into(),
        };
        if self.resynced.is_some() && self.result == RunResult::Succeeded {
            text.push_str("; resync: members who left while the snapshot was lost could not be removed");
        }
        if self.braze_budget_wait >= Duration::from_secs(1) && self.result == RunResult::Succeeded {
            text.push_str(&format!("; waited {} s for the Braze rate budget", self.braze_budget_wait.as_secs()));
        }
        if self.rejected.total() > 0 {
            let reasons: Vec<String> = self.rejected.by_reason.iter().map(|(r, n)| format!("{n}× {r}")).collect();
            text.push_str(&format!("; Braze rejected {} users: {}", self.rejected.total(), reasons.join(", ")));
        }
        let skipped = self.skipped.total();
        if skipped > 0 && matches!(self.result, RunResult::Succeeded | RunResult::DryRun) {
            text.push_str(&format!("; {skipped} rows skipped ({})", self.skipped));
        }
        truncate(text, MAX_RUN_MESSAGE_CHARS)
    }

    /// The history entry the controller writes to `.status`. `added`/`removed` are what Braze
    /// accepted; a run that did not send everything (failed, blocked, dry run) also records
    /// what it found in `wouldAdd`/`wouldRemove` — for a blocked run, what an approval covers.
    pub fn to_record(&self) -> RunRecord {
        let complete = self.result == RunResult::Succeeded;
        // Rejected objects are counted apart, never as added or removed.
        let (added, removed) = if complete {
            (self.added.saturating_sub(self.rejected.adds), self.removed.saturating_sub(self.rejected.removes))
        } else {
            (self.accepted_adds, self.accepted_removes)
        };
        RunRecord {
            attempt: None,
            id: self.run_id.clone(),
            trigger: self.trigger,
            started_at: self.started_at,
            finished_at: Some(self.finished_at),
            result: self.result,
            cohort_size: self.cohort_size,
            added,
            removed,
            would_add: (!complete).then_some(self.added),
            would_remove: (!complete).then_some(self.removed),
            message: self.message(),
        }
    }
}

impl RunReport {
    /// For a dry run, what `status.lastDryRun` shows: counts, the guard's verdict and at
    /// most [`MAX_DRY_RUN_SAMPLE`] ids each way. `None` for any other result.
    pub fn dry_run_sample(&self) -> Option<DryRunSample> {
        let first = |ids: &[String]| ids.iter().take(MAX_DRY_RUN_SAMPLE).cloned().collect();
        (self.result == RunResult::DryRun).then(|| DryRunSample {
            run_id: self.run_id.clone(),
            finished_at: self.finished_at,
            cohort_size: self.cohort_size,
            would_add: self.added,
            would_remove: self.removed,
            would_block: self.blocked.is_some(),
            sample_added: first(&self.sample_added),
            sample_removed: first(&self.sample_removed),
        })
    }
}

/// `text` cut to at most `max` characters, the last one `…` when cut.
pub(crate) fn truncate(mut text: String, max: usize) -> String {
    if text.chars().count() > max {
        let cut = text.char_indices().nth(max.saturating_sub(1)).map_or(text.len(), |(i, _)| i);
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// A run id: UTC start time and four random hex digits, e.g. `20261128-063000-a1b2`.
pub fn new_run_id(started_at: Timestamp) -> String {
    format!("{}-{:04x}", started_at.strftime("%Y%m%d-%H%M%S"), rand::random::<u16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_time_and_are_short() {
        let t: Timestamp = "2026-11-28T06:30:00Z".parse().unwrap();
        let id = new_run_id(t);
        assert!(id.starts_with("20261128-063000-"), "{id}");
        assert_eq!(id.len(), 20);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let text = truncate("é".repeat(300), MAX_RUN_MESSAGE_CHARS);
        assert_eq!(text.chars().count(), MAX_RUN_MESSAGE_CHARS);
        assert!(text.ends_with('…'));
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
