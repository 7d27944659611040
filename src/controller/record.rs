//! How a run ends. Every run that ends — finished by the importer, missed while the
//! operator was down, abandoned after an interruption — ends through here and nowhere else:
//!
//! 1. a [`RunEnd`] constructor builds its history entry, `Ready` reason and report hint;
//! 2. [`record`] (pure) puts it in status: history, no run in progress, `Ready`;
//! 3. the caller writes that status ([`super::runs`] for a finished run, the reconcile's
//!    executor for the others); once it is written,
//! 4. [`announce`] tells people, once each: a log line, the metrics, an Event and the run
//!    report (sent in a task of its own, bounded in time).
//!
//! A new way for a run to end (an attempt limit, a deadline) is a new constructor here; a
//! new way to tell people (another notification channel) goes into [`announce`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use tracing::{Instrument, error, info, info_span, warn};

use super::events::{Events, reason as event};
use super::importer::ImportError;
use super::metrics::Metrics;
use super::registry::RunRegistry;
use super::status::{StatusWriter, idle_ready, record_run, seconds, set_ready};
use crate::api::{
    CohortImport, CohortImportStatus, CommittedSnapshot, CurrentRun, DryRunSample, HistoryLimits, ReadyReason,
    RetrySpec, RunRecord, RunResult, RunTrigger,
};
use crate::domain::retry::Retry;
use crate::fence::Fence;
use crate::notify::{Notify, RunNotice, any_channel_wants, is_recovery, result_changed};
use crate::run::{RunError, RunReport, new_run_id};

/// A run that ended, however it ended.
#[derive(Clone, Debug)]
pub struct RunEnd {
    /// Its history entry, times in whole seconds.
    pub record: RunRecord,
    /// When the end was found: the finish of a run that ran, else when it was recorded.
    pub ended_at: Timestamp,
    /// The `Ready` reason for a failure more precise than `Failed` (`SecretNotFound`, …).
    pub failure_reason: Option<ReadyReason>,
    /// What a person should do next (failed and blocked runs).
    pub hint: Option<String>,
    /// Braze answers by HTTP status (`None`: no answer), every attempt counted.
    pub braze_responses: BTreeMap<Option<u16>, u64>,
    /// How long it ran; zero for a run that never did.
    pub elapsed: Duration,
    /// The Braze workspace the run imported into, when it read its key
    /// ([`super::conflict::workspace_of`]): recorded in `status.brazeWorkspace`.
    pub workspace: Option<String>,
    /// A dry run's findings, for `status.lastDryRun`.
    pub dry_run: Option<DryRunSample>,
    /// A failure that can pass on its own, so `spec.retry` tries the run again
    /// ([`super::retry`]); false for a run that did not fail.
    pub transient: bool,
    /// What the store holds after a successful run: recorded in `status.committedSnapshot`.
    pub committed: Option<CommittedSnapshot>,
}

impl RunEnd {
    /// What its retry depends on ([`super::retry::schedule`]).
    pub fn for_retry(&self) -> super::retry::Ended<'_> {
        super::retry::Ended { record: &self.record, at: self.ended_at, transient: self.transient }
    }

    /// `run` ran to the end: its report, or why the importer could not start it.
    pub fn finished(
        run: &CurrentRun,
        outcome: Result<RunReport, ImportError>,
        finished_at: Timestamp,
        elapsed: Duration,
    ) -> Self {
        let finished_at = seconds(finished_at);
        let transient = super::retry::transient(&outcome);
        let mut committed = None;
        let (mut record, failure_reason, hint, braze_responses, mut dry_run) = match outcome {
            Ok(report) => {
                let reason = match &report.error {
                    Some(RunError::Source(e)) => Some(e.reason()),
                    _ if report.snapshot_missing.is_some() => Some(ReadyReason::SnapshotMissing),
                    _ => None,
                };
                let sample = report.dry_run_sample();
                committed = report.committed.clone();
                (report.to_record(), reason, report.hint, report.braze_responses, sample)
            }
            Err(e) => (failed_record(run, e.to_string()), Some(e.reason()), None, BTreeMap::new(), None),
        };
        record.id = run.id.clone();
        record.attempt = Some(run.attempt);
        record.trigger = run.trigger;
        record.started_at = seconds(run.started_at);
        record.finished_at = Some(finished_at);
        if let Some(sample) = &mut dry_run {
            sample.run_id = run.id.clone();
            sample.finished_at = finished_at;
        }
        RunEnd {
            record,
            ended_at: finished_at,
            failure_reason,
            hint,
            braze_responses,
            elapsed,
            workspace: None,
            dry_run,
            transient,
            committed,
        }
    }

    /// `run` was still going when its deadline (`timeout`, from `field`) passed, and was
    /// stopped; what it sent is in doubt, and the next run converges.
    pub fn timed_out(run: &CurrentRun, timeout: Duration, field: &str, now: Timestamp, elapsed: Duration) -> Self {
        let message = format!(
            "deadline exceeded: the run was still going after {} ({field}) and was stopped; raise {field} if \
             the import needs longer",
            humanize(SignedDuration::from_secs(timeout.as_secs() as i64))
        );
        let mut record = failed_record(run, message);
        record.finished_at = Some(seconds(now));
        // A run that took too long this time may not next time (a slow source, Braze's limits).
        RunEnd { elapsed, failure_reason: Some(ReadyReason::Failed), transient: true, ..Self::never_ran(record, now) }
    }

    /// The scheduled run at `slot` was found past its starting deadline at `now`.
    pub fn missed(slot: Timestamp, starting_deadline: SignedDuration, now: Timestamp) -> Self {
        let slot = seconds(slot);
        let message = format!(
            "not run: the operator was not running at {slot}, and by the time it was, the starting deadline ({}) \
             had passed",
            humanize(starting_deadline)
        );
        let record = RunRecord {
            attempt: None,
            id: new_run_id(slot),
            trigger: RunTrigger::Scheduled,
            started_at: slot,
            finished_at: None,
            result: RunResult::Missed,
            cohort_size: 0,
            added: 0,
            removed: 0,
            would_add: None,
            would_remove: None,
            message,
        };
        Self::never_ran(record, now)
    }

    /// `run` was cut short (an operator restart, a failover) and is not run again: `why`.
    pub fn abandoned(run: &CurrentRun, now: Timestamp, why: &str) -> Self {
        let mut record = failed_record(run, format!("interrupted by an operator restart and not run again: {why}"));
        record.finished_at = Some(seconds(now));
        Self::never_ran(record, now)
    }

    /// `run` crashed: its task panicked or was aborted before the importer returned. What
    /// it sent before is in its snapshot's keys in doubt, reconciled by the next run.
    pub fn crashed(run: &CurrentRun, crash: &Crash, finished_at: Timestamp, elapsed: Duration) -> Self {
        let message = format!(
            "{crash}; this is a bug in cohort-operator (please report it with the operator's log); the next run \
             starts afresh"
        );
        let mut record = failed_record(run, crate::run::report::truncate(message, 1024));
        record.finished_at = Some(seconds(finished_at));
        // A panic is a bug that the same input meets again; an abort is not.
        let transient = *crash == Crash::Aborted;
        RunEnd { elapsed, transient, ..Self::never_ran(record, finished_at) }
    }

    fn never_ran(record: RunRecord, now: Timestamp) -> Self {
        RunEnd {
            record,
            ended_at: seconds(now),
            failure_reason: None,
            hint: None,
            braze_responses: BTreeMap::new(),
            elapsed: Duration::ZERO,
            workspace: None,
            dry_run: None,
            transient: false,
            committed: None,
        }
    }

    /// The `Ready` reason once it is recorded.
    pub fn reason(&self) -> ReadyReason {
        match (self.record.result, self.failure_reason) {
            (RunResult::Failed, Some(reason)) => reason,
            (RunResult::Blocked, Some(ReadyReason::SnapshotMissing)) => ReadyReason::SnapshotMissing,
            (result, _) => ReadyReason::after(result),
        }
    }
}

/// Whether `attempt` of run `run_id` is the run in progress in `status`. A run resumed by
/// another replica (a failover) is a later attempt of the same run: the late end of an
/// earlier attempt — an old leader cut off from the API server — must not overwrite it.
pub fn is_current(status: &CohortImportStatus, run_id: &str, attempt: u32) -> bool {
    status.current_run.as_ref().is_some_and(|run| run.id == run_id && run.attempt == attempt)
}

/// How a run's task ended without the importer returning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Crash {
    /// It panicked, with this message (secrets redacted, bounded).
    Panicked(String),
    /// It was aborted (cancelled) without a panic.
    Aborted,
}

impl Crash {
    /// From a panic's payload; `secrets` are redacted from its message.
    pub fn panicked(payload: Box<dyn std::any::Any + Send>, secrets: &[String]) -> Self {
        let message = match payload.downcast::<String>() {
            Ok(message) => *message,
            Err(payload) => payload.downcast_ref::<&str>().map_or("(no message)", |m| m).to_owned(),
        };
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let message = crate::secret::redact(&message, &secrets, 4);
        Crash::Panicked(crate::run::report::truncate(message, 512))
    }
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Crash::Panicked(message) => write!(f, "the run panicked: {message}"),
            Crash::Aborted => f.write_str("the run was aborted before it finished"),
        }
    }
}

fn failed_record(run: &CurrentRun, message: String) -> RunRecord {
    RunRecord {
        attempt: Some(run.attempt),
        id: run.id.clone(),
        trigger: run.trigger,
        started_at: seconds(run.started_at),
        finished_at: None,
        result: RunResult::Failed,
        cohort_size: 0,
        added: 0,
        removed: 0,
        would_add: None,
        would_remove: None,
        message,
    }
}

/// `1 h`, `30 min`, `90 s`.
fn humanize(d: SignedDuration) -> String {
    let secs = d.as_secs();
    if secs % 3600 == 0 {
        format!("{} h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// What status said before the end was recorded, for the report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    /// `.status.history` before this run was added, newest first.
    pub previous_history: Vec<RunRecord>,
    /// The next run once the end is recorded: a pending retry when it comes before the slot.
    pub next_run_at: Option<Timestamp>,
    /// The retry this end left pending (`spec.retry`), if any.
    pub retry: Option<Retry>,
}

/// Puts `end` in `status`: the history entry (newest first, as many as `history_limits` keep), no
/// run in progress if it was this one, `Ready` from it, and its retry under `retry`
/// (`spec.retry`, [`super::retry::schedule`]). Pure.
pub fn record(
    status: &mut CohortImportStatus,
    end: &RunEnd,
    history_limits: HistoryLimits,
    retry: &RetrySpec,
) -> Recorded {
    let mut recorded =
        Recorded { previous_history: status.history.clone(), next_run_at: status.next_run_at, retry: None };
    if status.current_run.as_ref().is_some_and(|run| run.id == end.record.id) {
        status.current_run = None;
    }
    record_run(status, end.record.clone(), history_limits);
    if let Some(workspace) = &end.workspace {
        status.braze_workspace = Some(workspace.clone());
    }
    if let Some(committed) = &end.committed {
        status.committed_snapshot = Some(committed.clone());
    }
    if end.reason() == ReadyReason::SnapshotMissing {
        status.snapshot_missing_run = Some(end.record.id.clone());
    }
    if let Some(sample) = &end.dry_run {
        status.last_dry_run = Some(sample.clone());
    }
    super::retry::schedule(status, &end.for_retry(), retry);
    // The report's next run: a retry comes before the slot.
    recorded.next_run_at = status.next_run_at;
    recorded.retry = status.retry_attempt.zip(status.next_retry_at).map(|(attempt, at)| Retry { attempt, at });
    let (_, message) = idle_ready(status, status.next_run_at);
    set_ready(status, end.reason(), &message, status.observed_generation, end.ended_at);
    recorded
}

/// What telling people about a run's end takes: metrics, Events, the notifier and its time
/// limit, the status writer (for `.status.lastNotificationError`), and the leadership's side
/// tasks and fence, which bound the report's task.
#[derive(Clone)]
pub struct Reporter {
    pub metrics: Arc<Metrics>,
    pub events: Events,
    /// `None`: no SMTP server configured; imports asking for email get a status note.
    pub notifier: Option<Arc<dyn Notify>>,
    pub notification_timeout: Duration,
    pub status: StatusWriter,
    pub runs: Arc<RunRegistry>,
    pub fence: Fence,
}

/// Tells people that `end` happened, once it is in status: log, metrics, Event, report.
pub async fn announce(reporter: &Reporter, import: &CohortImport, end: &RunEnd, recorded: &Recorded) {
    let record = &end.record;
    let result = record.result;
    match result {
        RunResult::Failed => error!(run_id = %record.id, message = %record.message, "run failed"),
        RunResult::Blocked | RunResult::Missed => {
            warn!(run_id = %record.id, ?result, message = %record.message, "run did not complete")
        }
        _ => info!(
            run_id = %record.id, ?result, size = record.cohort_size, added = record.added, removed = record.removed,
            "run finished"
        ),
    }
    reporter.metrics.run_finished(result, end.elapsed.as_secs_f64(), record.added, record.removed);
    for (status, count) in &end.braze_responses {
        reporter.metrics.braze_responses(*status, *count);
    }
    if result == RunResult::Succeeded {
        let (namespace, name) = (import.namespace().unwrap_or_default(), import.name_any());
        reporter.metrics.succeeded_at(&namespace, &name, end.ended_at.as_second() as f64);
    }
    let note = format!("Run {}: {}", record.id, record.message);
    match result {
        RunResult::Succeeded => reporter.events.normal(import, event::RUN_SUCCEEDED, "Run", note).await,
        RunResult::DryRun => reporter.events.normal(import, event::RUN_DRY_RUN, "Run", note).await,
        RunResult::Failed => reporter.events.warning(import, event::RUN_FAILED, "Run", note).await,
        RunResult::Blocked => reporter.events.warning(import, event::RUN_BLOCKED, "Run", note).await,
        RunResult::Missed => reporter.events.warning(import, event::RUN_MISSED, "Run", note).await,
    }
    if let Some(retry) = &recorded.retry {
        let limit = import.spec.retry_policy().limit;
        let note = format!("Run {} failed; retry {} of {limit} at {} (spec.retry)", record.id, retry.attempt, retry.at);
        reporter.events.normal(import, event::RETRY_SCHEDULED, "Retry", note).await;
    }
    send_report(reporter, import, end, recorded);
}

/// The run report for `end`, if the import asks for one.
fn notice(import: &CohortImport, end: &RunEnd, recorded: &Recorded) -> Option<RunNotice> {
    let notifications = import.spec.notifications.as_ref()?;
    let record = &end.record;
    let recovered = is_recovery(record.result, &recorded.previous_history);
    let changed = result_changed(record.result, &recorded.previous_history);
    if !any_channel_wants(notifications, record.result, recovered, changed) {
        return None;
    }
    Some(RunNotice {
        namespace: import.namespace().unwrap_or_default(),
        import_name: import.name_any(),
        cohort_name: import.spec.cohort.name.clone(),
        cohort_id: import.spec.cohort.id.clone(),
        run_id: record.id.clone(),
        result: record.result,
        trigger: record.trigger,
        started_at: record.started_at,
        finished_at: record.finished_at.unwrap_or(end.ended_at),
        time_zone: jiff::tz::TimeZone::get(&import.spec.schedule.time_zone).unwrap_or(jiff::tz::TimeZone::UTC),
        cohort_size: record.cohort_size,
        // The report names what the run found ("Would add", the removals to approve).
        added: record.would_add.unwrap_or(record.added),
        removed: record.planned_removals(),
        next_run_at: recorded.next_run_at,
        reason: matches!(record.result, RunResult::Failed | RunResult::Blocked | RunResult::Missed)
            .then(|| record.message.clone())
            .filter(|m| !m.is_empty()),
        hint: end.hint.clone(),
        recovered,
        changed,
        dry_run: import.spec.dry_run,
    })
}

/// Sends the run report in a task of its own, bounded in time; a failure becomes an Event
/// and `.status.lastNotificationError`, never the run's result. The task is one of this
/// leadership's: stopped when the Lease is lost, and dropped at the fence's deadline.
fn send_report(reporter: &Reporter, import: &CohortImport, end: &RunEnd, recorded: &Recorded) {
    let Some(notice) = notice(import, end, recorded) else {
        return;
    };
    let span = info_span!("notify", run_id = %notice.run_id);
    let fence = reporter.fence.clone();
    let report = report_task(reporter.clone(), import.clone(), notice);
    let fenced = async move {
        if fence.bounded(report).await.is_err() {
            warn!("run report dropped: this replica no longer holds its Lease (no other replica sends it)");
        }
    };
    reporter.runs.spawn_side(fenced.instrument(span));
}

/// Delivers `notice` and records how it went in status.
async fn report_task(reporter: Reporter, import: CohortImport, notice: RunNotice) {
    let note = match deliver(&reporter, &import, &notice).await {
        Ok(()) => None,
        Err(message) => {
            warn!(error = %message, "run report not sent");
            reporter.metrics.notification_failures.inc();
            let note = format!("Run {}: {message}", notice.run_id);
            reporter.events.warning(&import, event::NOTIFICATION_FAILED, "Notify", note).await;
            Some(crate::run::report::truncate(format!("run {}: {message}", notice.run_id), 512))
        }
    };
    reporter
        .status
        .update(&import, |status| {
            if status.last_notification_error == note {
                return false;
            }
            status.last_notification_error = note.clone();
            true
        })
        .await;
}

/// Sends `notice` to every channel the import names, within the configured time.
async fn deliver(reporter: &Reporter, import: &CohortImport, notice: &RunNotice) -> Result<(), String> {
    let Some(notifier) = &reporter.notifier else {
        return Err("the operator has no notifier configured (--smtp-host for email)".to_owned());
    };
    let Some(notifications) = import.spec.notifications.as_ref() else { return Ok(()) };
    match tokio::time::timeout(reporter.notification_timeout, notifier.notify(notice, notifications)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the run report was not sent within {} s", reporter.notification_timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn current(id: &str) -> CurrentRun {
        CurrentRun {
            id: id.into(),
            trigger: RunTrigger::Manual,
            started_at: ts("2026-03-02T06:30:00.5Z"),
            approved_removals: None,
            approved_resync: None,
            runner_shard: None,
            runner_lease: None,
            runner_identity: None,
            attempt: 1,
        }
    }

    #[test]
    fn only_the_attempt_in_progress_may_record_its_end() {
        let mut status =
            CohortImportStatus { current_run: Some(CurrentRun { attempt: 2, ..current("r1") }), ..Default::default() };
        assert!(is_current(&status, "r1", 2));
        assert!(!is_current(&status, "r1", 1), "an old leader's late end of attempt 1 is refused");
        assert!(!is_current(&status, "r0", 2), "another run");
        status.current_run = None;
        assert!(!is_current(&status, "r1", 2), "already recorded");
    }

    #[test]
    fn a_resumed_runs_record_names_the_attempt_that_ended_it() {
        let resumed = CurrentRun { attempt: 2, ..current("r1") };
        let missing = super::super::secrets::KeyError::SecretNotFound {
            namespace: "ns".into(),
            name: "braze".into(),
            field: "spec.destination.braze.dataImportKeySecretRef",
        };
        let end =
            RunEnd::finished(&resumed, Err(ImportError::Keys(missing)), ts("2026-03-02T06:31:00Z"), Duration::ZERO);
        assert_eq!(end.record.attempt, Some(2));
    }

    #[test]
    fn a_run_the_importer_could_not_start_fails_with_the_precise_reason() {
        let missing = super::super::secrets::KeyError::SecretNotFound {
            namespace: "ns".into(),
            name: "braze".into(),
            field: "spec.destination.braze.dataImportKeySecretRef",
        };
        let end = RunEnd::finished(
            &current("r1"),
            Err(ImportError::Keys(missing)),
            ts("2026-03-02T06:30:02.9Z"),
            Duration::from_secs(2),
        );
        assert_eq!(end.record.result, RunResult::Failed);
        assert_eq!(end.reason(), ReadyReason::SecretNotFound);
        assert_eq!(end.record.started_at, ts("2026-03-02T06:30:00Z"), "whole seconds");
        assert_eq!(end.record.finished_at, Some(ts("2026-03-02T06:30:02Z")));
        assert!(end.record.message.starts_with("Secret ns/braze not found"), "{}", end.record.message);
    }

    #[test]
    fn a_run_past_its_deadline_fails_naming_the_field() {
        let end = RunEnd::timed_out(
            &current("r1"),
            Duration::from_secs(90),
            "spec.runTimeoutSeconds",
            ts("2026-03-02T06:32:00.7Z"),
            Duration::from_secs(91),
        );
        assert_eq!((end.record.result, end.reason()), (RunResult::Failed, ReadyReason::Failed));
        assert!(end.record.message.starts_with("deadline exceeded: "), "{}", end.record.message);
        assert!(end.record.message.contains("after 90 s (spec.runTimeoutSeconds)"), "{}", end.record.message);
        assert_eq!(end.record.finished_at, Some(ts("2026-03-02T06:32:00Z")));
        assert_eq!(end.elapsed, Duration::from_secs(91));
    }

    #[test]
    fn a_crashed_run_fails_naming_the_panic_without_the_keys() {
        let payload: Box<dyn std::any::Any + Send> = Box::new("chunk 3 is damaged near key-abcdef".to_owned());
        let crash = Crash::panicked(payload, &["key-abcdef".to_owned()]);
        assert_eq!(crash, Crash::Panicked("chunk 3 is damaged near <redacted>".into()));
        let end = RunEnd::crashed(&current("r1"), &crash, ts("2026-03-02T06:30:07.2Z"), Duration::from_secs(7));
        assert_eq!((end.record.result, end.reason()), (RunResult::Failed, ReadyReason::Failed));
        assert!(end.record.message.starts_with("the run panicked: chunk 3 is damaged"), "{}", end.record.message);
        assert_eq!(end.record.finished_at, Some(ts("2026-03-02T06:30:07Z")));
        assert_eq!(end.elapsed, Duration::from_secs(7));
        let static_payload: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        assert_eq!(Crash::panicked(static_payload, &[]), Crash::Panicked("index out of bounds".into()));
        assert_eq!(Crash::Aborted.to_string(), "the run was aborted before it finished");
    }

    #[test]
    fn recording_clears_this_run_and_sets_ready_from_it() {
        let mut status = CohortImportStatus {
            current_run: Some(current("r1")),
            next_run_at: Some(ts("2026-03-03T06:30:00Z")),
            observed_generation: Some(4),
            ..Default::default()
        };
        let before = RunEnd::abandoned(&current("r0"), ts("2026-03-01T00:00:00Z"), "x");
        record(&mut status, &before, HistoryLimits::Newest(10), &RetrySpec::default());
        let end = RunEnd::abandoned(&current("r1"), ts("2026-03-02T07:00:00Z"), "the spec became invalid");
        let recorded = record(&mut status, &end, HistoryLimits::Newest(10), &RetrySpec::default());
        assert_eq!(recorded.previous_history.len(), 1);
        assert_eq!(recorded.next_run_at, Some(ts("2026-03-03T06:30:00Z")));
        assert_eq!(status.current_run, None);
        assert_eq!(status.history[0].id, "r1");
        let ready = status.ready().unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Failed"));
        assert_eq!(ready.observed_generation, Some(4));
        assert!(ready.message.contains("not run again: the spec became invalid; next run at"), "{}", ready.message);
    }

    #[test]
    fn another_runs_end_leaves_the_run_in_progress() {
        let mut status = CohortImportStatus { current_run: Some(current("r2")), ..Default::default() };
        record(
            &mut status,
            &RunEnd::missed(ts("2026-03-02T06:30:00Z"), SignedDuration::from_mins(90), ts("2026-03-02T09:00:00Z")),
            HistoryLimits::Newest(10),
            &RetrySpec::default(),
        );
        assert_eq!(status.current_run.as_ref().map(|r| r.id.as_str()), Some("r2"));
        assert_eq!(status.last_run.as_ref().unwrap().result, RunResult::Missed);
        assert!(status.last_run.as_ref().unwrap().message.contains("starting deadline (90 min)"));
        assert_eq!(status.ready().unwrap().reason, "Missed");
    }

    #[test]
    fn each_failure_has_its_ready_reason() {
        use crate::source::{ObjectKind, SourceError};
        let source = |e: SourceError| ImportError::Source(e);
        let cases = [
            (
                source(SourceError::ObjectNotFound {
                    kind: ObjectKind::ConfigMap,
                    namespace: "ns".into(),
                    name: "m".into(),
                }),
                ReadyReason::ConfigMapNotFound,
            ),
            (
                source(SourceError::ObjectNotFound {
                    kind: ObjectKind::Secret,
                    namespace: "ns".into(),
                    name: "s".into(),
                }),
                ReadyReason::SecretNotFound,
            ),
            (source(SourceError::Config { what: "w".into(), message: "m".into() }), ReadyReason::InvalidSpec),
            (source(SourceError::Connect { what: "w".into(), message: "refused".into() }), ReadyReason::SourceFailed),
            (
                ImportError::Snapshot(crate::snapshot::SnapshotError::Corrupt {
                    what: "w".into(),
                    message: "m".into(),
                }),
                ReadyReason::SnapshotFailed,
            ),
        ];
        for (error, reason) in cases {
            let message = error.to_string();
            let end = RunEnd::finished(&current("r1"), Err(error), ts("2026-03-02T06:31:00Z"), Duration::ZERO);
            assert_eq!(end.reason(), reason, "{message}");
            assert_eq!(end.reason().status(), crate::api::ConditionStatus::False);
            assert_eq!(end.record.message, message);
        }
        // A run that succeeded shows its result, whatever it was given.
        let ok = RunEnd {
            failure_reason: Some(ReadyReason::SourceFailed),
            ..RunEnd::missed(ts("2026-03-02T06:30:00Z"), SignedDuration::from_hours(1), ts("2026-03-02T09:00:00Z"))
        };
        assert_eq!(ok.reason(), ReadyReason::Missed);
    }
}
