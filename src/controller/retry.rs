//! Retries of failed runs (`spec.retry`) in status: which failures may pass on their own,
//! and the retry a run's end leaves in `status.nextRetryAt` / `status.retryAttempt`. When
//! and how often is [`crate::domain::retry`]'s (pure) decision; [`super::record::record`]
//! calls [`schedule`] for every run that ends, and [`super::desired`] starts the retry.

use jiff::Timestamp;

use super::importer::ImportError;
use super::secrets::KeyError;
use crate::api::{CohortImportStatus, RetrySpec, RunRecord, RunResult, RunTrigger};
use crate::braze::BrazeError;
use crate::domain::retry::{Failure, Retry, next_retry, still_pending};
use crate::run::{RunError, RunReport};
use crate::snapshot::SnapshotError;
use crate::source::SourceError;

/// What the retry of a run's end depends on.
pub struct Ended<'a> {
    /// Its history entry.
    pub record: &'a RunRecord,
    /// When it ended.
    pub at: Timestamp,
    /// Whether its failure can pass on its own ([`transient`]).
    pub transient: bool,
}

/// Records in `status` the retry `end` gets under `policy` — or that none is pending. The
/// retries of one failed run are counted in `status.retryAttempt`, which a retry's own end
/// carries on from; any other run's end starts the count again. `status.nextRunAt` (what
/// `kubectl get` shows as NEXT RUN) becomes the retry's time, which comes before the slot.
pub fn schedule(status: &mut CohortImportStatus, end: &Ended, policy: &RetrySpec) {
    let record = end.record;
    let retries_done = match record.trigger {
        RunTrigger::Retry => status.retry_attempt.unwrap_or(1),
        RunTrigger::Initial | RunTrigger::Scheduled | RunTrigger::Manual => 0,
    };
    let failure = Failure {
        run_id: &record.id,
        finished_at: end.at,
        retries_done,
        transient: record.result == RunResult::Failed && end.transient,
        next_slot: status.next_run_at,
    };
    set(status, next_retry(policy, &failure));
}

/// The retry recorded in `status`, if it still holds under `policy` before `next_slot`.
pub fn pending(status: &CohortImportStatus, policy: &RetrySpec, next_slot: Option<Timestamp>) -> Option<Retry> {
    let retry = Retry { attempt: status.retry_attempt?, at: status.next_retry_at? };
    still_pending(policy, retry, next_slot)
}

/// Records `retry` as pending, or none.
pub fn set(status: &mut CohortImportStatus, retry: Option<Retry>) {
    status.next_retry_at = retry.map(|r| r.at);
    status.retry_attempt = retry.map(|r| r.attempt);
    if let Some(retry) = retry {
        status.next_run_at = Some(status.next_run_at.map_or(retry.at, |slot| slot.min(retry.at)));
    }
}

/// Whether a run that ended with `outcome` failed in a way that can pass on its own.
pub fn transient(outcome: &Result<RunReport, ImportError>) -> bool {
    match outcome {
        Ok(report) => report.error.as_ref().is_some_and(run_error),
        Err(ImportError::Keys(e)) => matches!(e, KeyError::Read { .. }),
        Err(ImportError::Source(e)) => source(e),
        Err(ImportError::Snapshot(e)) => snapshot(e),
        // Only a deletion policy removes members; never a run.
        Err(ImportError::Removal(_)) => false,
    }
}

fn run_error(error: &RunError) -> bool {
    match error {
        RunError::Source(e) => source(e),
        RunError::Snapshot(e) => snapshot(e),
        // Local disk space or I/O; another attempt may find room.
        RunError::Scratch { .. } => true,
        // A damaged snapshot stays damaged.
        RunError::SnapshotCount { .. } => false,
        RunError::Naming(e) | RunError::Changes { error: e, .. } => braze(e),
        // What Braze said it accepted does not add up; the next run converges.
        RunError::Incomplete { .. } => true,
    }
}

fn source(error: &SourceError) -> bool {
    match error {
        SourceError::ObjectRead { .. }
        | SourceError::Connect { .. }
        | SourceError::Timeout { .. }
        | SourceError::Transport { .. }
        | SourceError::Unavailable { .. } => true,
        SourceError::HttpStatus { status, .. } => *status >= 500 || matches!(status, 408 | 429),
        // A missing object, a wrong spec, refused credentials or permissions, a denied
        // destination, input over a limit, malformed data, a failing query: a person's to fix.
        SourceError::ObjectNotFound { .. }
        | SourceError::KeyNotFound { .. }
        | SourceError::KeyNotText { .. }
        | SourceError::Config { .. }
        | SourceError::EgressDenied { .. }
        | SourceError::AmbientIdentityRefused { .. }
        | SourceError::Query { .. }
        | SourceError::Malformed { .. }
        | SourceError::TooLarge { .. }
        | SourceError::RowTooLarge { .. }
        | SourceError::PageTooLarge { .. }
        | SourceError::PageOverCeiling { .. }
        | SourceError::Auth { .. }
        | SourceError::Permission { .. } => false,
    }
}

fn snapshot(error: &SnapshotError) -> bool {
    match error {
        SnapshotError::Io { .. } | SnapshotError::Kube { .. } | SnapshotError::Conflict { .. } => true,
        SnapshotError::Corrupt { .. } | SnapshotError::NewerFormat { .. } => false,
        // This process lost its Lease: the run is not recorded here; the new leader resumes it.
        SnapshotError::Fenced { .. } => false,
        // Another attempt of the run is sending: it, not a new one, finishes the run.
        SnapshotError::Overtaken { .. } => false,
        // Another import holds the cohort's snapshot: a person decides which import it is.
        SnapshotError::Held { .. } => false,
    }
}

fn braze(error: &BrazeError) -> bool {
    match error {
        BrazeError::RetryBudgetExhausted { .. }
        | BrazeError::AttemptsExhausted { .. }
        | BrazeError::RateLimited { .. } => true,
        BrazeError::Unauthorized { .. }
        | BrazeError::Forbidden { .. }
        | BrazeError::BadRequest { .. }
        | BrazeError::Rejected { .. }
        | BrazeError::InvalidRequest(_)
        | BrazeError::EgressDenied(_)
        | BrazeError::Abandoned => false,
        // As for the snapshot: the new leader resumes the run.
        BrazeError::Fenced(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CurrentRun, ReadyReason};
    use crate::braze::TransientFailure;
    use crate::controller::record::RunEnd;
    use std::time::Duration;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn run(id: &str, trigger: RunTrigger) -> CurrentRun {
        CurrentRun {
            id: id.into(),
            trigger,
            started_at: ts("2026-03-02T06:30:00Z"),
            approved_removals: None,
            approved_resync: None,
            runner_shard: None,
            runner_lease: None,
            runner_identity: None,
            attempt: 1,
        }
    }

    fn source_failure(error: SourceError) -> Result<RunReport, ImportError> {
        Err(ImportError::Source(error))
    }

    fn ended(trigger: RunTrigger, outcome: Result<RunReport, ImportError>) -> RunEnd {
        RunEnd::finished(&run("r1", trigger), outcome, ts("2026-03-02T06:31:00Z"), Duration::from_secs(60))
    }

    fn unavailable() -> SourceError {
        SourceError::Unavailable { what: "warehouse".into(), attempts: 5, detail: "503".into() }
    }

    fn idle(next_run_at: &str) -> CohortImportStatus {
        CohortImportStatus { next_run_at: Some(ts(next_run_at)), ..Default::default() }
    }

    #[test]
    fn failures_that_can_pass_on_their_own_are_transient_the_others_are_not() {
        let http = |status| SourceError::HttpStatus {
            what: "export".into(),
            url: "https://x".into(),
            page: 1,
            status,
            detail: String::new(),
        };
        assert!(transient(&source_failure(unavailable())));
        assert!(transient(&source_failure(http(503))));
        assert!(transient(&source_failure(http(429))));
        assert!(!transient(&source_failure(http(404))));
        assert!(!transient(&source_failure(SourceError::Config { what: "x".into(), message: "bad".into() })));
        let denied = Err(ImportError::Keys(KeyError::SecretNotFound {
            namespace: "growth".into(),
            name: "braze".into(),
            field: "spec.destination.braze.dataImportKeySecretRef",
        }));
        assert!(!transient(&denied), "a missing Secret needs a person");
        let unreadable =
            Err(ImportError::Keys(KeyError::Read { namespace: "g".into(), name: "b".into(), message: "503".into() }));
        assert!(transient(&unreadable), "the API server was unavailable");
        let exhausted = BrazeError::AttemptsExhausted {
            attempts: 5,
            last: TransientFailure::Status { status: 500, message: "oops".into() },
        };
        assert!(braze(&exhausted));
        assert!(!braze(&BrazeError::BadRequest { message: "bad".into() }));
    }

    #[test]
    fn a_transient_failure_gets_its_first_retry_and_nextrunat_shows_it() {
        let end = ended(RunTrigger::Scheduled, source_failure(unavailable()));
        assert!(end.transient && end.reason() == ReadyReason::SourceFailed);
        let mut status = idle("2026-03-03T06:30:00Z");
        schedule(&mut status, &end.for_retry(), &RetrySpec::default());
        assert_eq!(status.retry_attempt, Some(1));
        let at = status.next_retry_at.unwrap();
        assert!(at > ts("2026-03-02T06:31:44Z") && at <= ts("2026-03-02T06:32:00Z"), "{at}");
        assert_eq!(status.next_run_at, Some(at), "NEXT RUN is the retry");
        assert_eq!(pending(&status, &RetrySpec::default(), Some(ts("2026-03-03T06:30:00Z"))).unwrap().at, at);
    }

    #[test]
    fn a_failed_retry_counts_on_and_the_last_one_leaves_none() {
        let policy = RetrySpec { limit: 2, ..RetrySpec::default() };
        let mut status = idle("2026-03-03T06:30:00Z");
        status.retry_attempt = Some(1);
        schedule(&mut status, &ended(RunTrigger::Retry, source_failure(unavailable())).for_retry(), &policy);
        assert_eq!(status.retry_attempt, Some(2));
        status.next_run_at = Some(ts("2026-03-03T06:30:00Z"));
        schedule(&mut status, &ended(RunTrigger::Retry, source_failure(unavailable())).for_retry(), &policy);
        assert_eq!((status.retry_attempt, status.next_retry_at), (None, None), "limit 2 used up");
        assert_eq!(status.next_run_at, Some(ts("2026-03-03T06:30:00Z")), "the schedule goes on");
    }

    #[test]
    fn a_scheduled_runs_failure_starts_counting_again_and_a_success_clears_the_retry() {
        let mut status = idle("2026-03-03T06:30:00Z");
        status.retry_attempt = Some(3);
        schedule(
            &mut status,
            &ended(RunTrigger::Manual, source_failure(unavailable())).for_retry(),
            &RetrySpec::default(),
        );
        assert_eq!(status.retry_attempt, Some(1));
        let not_transient =
            ended(RunTrigger::Retry, source_failure(SourceError::Config { what: "x".into(), message: "bad".into() }));
        schedule(&mut status, &not_transient.for_retry(), &RetrySpec::default());
        assert_eq!((status.retry_attempt, status.next_retry_at), (None, None));
    }

    #[test]
    fn the_run_end_records_the_retry_and_the_report_names_it_as_the_next_run() {
        let mut status =
            CohortImportStatus { current_run: Some(run("r1", RunTrigger::Scheduled)), ..idle("2026-03-03T06:30:00Z") };
        let end = ended(RunTrigger::Scheduled, source_failure(unavailable()));
        let limits = crate::api::HistoryLimits::Newest(10);
        let recorded = super::super::record::record(&mut status, &end, limits, &RetrySpec::default());
        assert_eq!(status.current_run, None);
        assert!(status.next_retry_at.is_some());
        assert_eq!(recorded.next_run_at, status.next_retry_at, "the report's next run is the retry");
        assert_eq!(status.ready().unwrap().reason, "SourceFailed", "the run end's own reason, until the reconcile");
    }
}
