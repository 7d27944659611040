//! Building `.status` and writing it: server-side apply with one field manager, only when
//! something changed, guarded by the resourceVersion it was computed from.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::api::{
    CohortImport, CohortImportStatus, FIELD_MANAGER, MAX_RUN_MESSAGE_CHARS, READY, ReadyReason, RunRecord, RunResult,
};
use crate::run::report::truncate;

/// Times in status have whole seconds: what the API server keeps of a `metav1.Time`, so
/// that a status read back compares equal to the one written.
pub fn seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).expect("a valid timestamp stays valid when truncated")
}

/// Sets the `Ready` condition — its status follows from `reason` — keeping its transition
/// time while its status stays the same.
pub fn set_ready(
    status: &mut CohortImportStatus,
    reason: ReadyReason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let value = reason.status().as_str();
    let last_transition_time = match status.ready() {
        Some(c) if c.status == value => c.last_transition_time.clone(),
        _ => Time(seconds(now)),
    };
    let ready = Condition {
        type_: READY.to_owned(),
        status: value.to_owned(),
        reason: reason.as_str().to_owned(),
        // Condition messages are limited to 32 KiB; ours stay far shorter.
        message: truncate(message.to_owned(), 1024),
        last_transition_time,
        observed_generation: generation,
    };
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.insert(0, ready);
}

/// The `Ready` reason currently shown.
pub fn ready_reason(status: Option<&CohortImportStatus>) -> Option<&str> {
    status?.ready().map(|c| c.reason.as_str())
}

/// Records a finished (or missed) run: newest first, at most `limit` kept.
pub fn record_run(status: &mut CohortImportStatus, mut record: RunRecord, limit: u8) {
    record.message = truncate(std::mem::take(&mut record.message), MAX_RUN_MESSAGE_CHARS);
    if record.result == RunResult::Succeeded {
        status.last_successful_run_at = record.finished_at.or(Some(record.started_at));
    }
    status.history.retain(|r| r.id != record.id);
    status.history.insert(0, record.clone());
    status.history.truncate(usize::from(limit.max(1)));
    status.last_run = Some(record);
}

/// `next run at …` or `no run scheduled`, for the end of a `Ready` message.
pub fn next_run_text(next_run_at: Option<Timestamp>) -> String {
    match next_run_at {
        Some(t) => format!("next run at {}", seconds(t)),
        None => "no run scheduled".to_owned(),
    }
}

/// The `Ready` condition for an import that is not running, from its last run.
pub fn idle_ready(status: &CohortImportStatus, next_run_at: Option<Timestamp>) -> (ReadyReason, String) {
    let next = next_run_text(next_run_at);
    match &status.last_run {
        None => (ReadyReason::Scheduled, capitalize(&next)),
        Some(run) => {
            let message = if run.message.is_empty() {
                format!("Run {} {}; {next}", run.id, verb(run.result))
            } else {
                format!("Run {} {}: {}; {next}", run.id, verb(run.result), run.message)
            };
            (ReadyReason::after(run.result), message)
        }
    }
}

fn verb(result: RunResult) -> &'static str {
    match result {
        RunResult::Succeeded => "succeeded",
        RunResult::DryRun => "completed as a dry run",
        RunResult::Failed => "failed",
        RunResult::Blocked => "was blocked",
        RunResult::Missed => "was missed",
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// What a status write did.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// The status was already as desired.
    Unchanged,
    Applied,
}

/// Writes `desired` unless the object already has it. The write carries the object's
/// resourceVersion, so a status computed from a stale copy is refused (409) instead of
/// overwriting a newer one; callers read the object again and retry.
pub async fn write(
    api: &Api<CohortImport>,
    obj: &CohortImport,
    desired: &CohortImportStatus,
) -> Result<Written, kube::Error> {
    if obj.status.as_ref() == Some(desired) || (obj.status.is_none() && *desired == CohortImportStatus::default()) {
        return Ok(Written::Unchanged);
    }
    let patch = json!({
        "apiVersion": "cohorts.dev/v1alpha1",
        "kind": "CohortImport",
        "metadata": { "name": obj.name_any(), "resourceVersion": obj.resource_version() },
        "status": desired,
    });
    api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(Written::Applied)
}

/// Whether an API error is the optimistic-concurrency refusal of a stale write.
pub fn is_stale_write(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RunTrigger;

    fn record(id: &str, result: RunResult, message: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            trigger: RunTrigger::Scheduled,
            started_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            finished_at: Some("2026-01-01T00:01:00Z".parse().unwrap()),
            result,
            cohort_size: 3,
            added: 1,
            removed: 0,
            message: message.into(),
        }
    }

    #[test]
    fn history_is_newest_first_and_capped() {
        let mut status = CohortImportStatus::default();
        for i in 0..5 {
            record_run(&mut status, record(&format!("r{i}"), RunResult::Succeeded, ""), 3);
        }
        let ids: Vec<_> = status.history.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r4", "r3", "r2"]);
        assert_eq!(status.last_run.as_ref().unwrap().id, "r4");
        assert_eq!(status.last_successful_run_at.map(|t| t.to_string()).as_deref(), Some("2026-01-01T00:01:00Z"));
    }

    #[test]
    fn a_failed_run_keeps_the_last_success() {
        let mut status = CohortImportStatus::default();
        record_run(&mut status, record("ok", RunResult::Succeeded, ""), 10);
        let mut failed = record("bad", RunResult::Failed, "boom");
        failed.finished_at = Some("2026-01-02T00:00:00Z".parse().unwrap());
        record_run(&mut status, failed, 10);
        assert_eq!(status.last_successful_run_at.map(|t| t.to_string()).as_deref(), Some("2026-01-01T00:01:00Z"));
        assert_eq!(status.last_run.as_ref().unwrap().result, RunResult::Failed);
    }

    #[test]
    fn messages_are_truncated_so_status_stays_small_at_the_maximum_history() {
        let mut status = CohortImportStatus::default();
        for i in 0..60 {
            record_run(
                &mut status,
                record(&format!("20260101-000000-{i:04x}"), RunResult::Failed, &"é".repeat(5000)),
                50,
            );
        }
        assert_eq!(status.history.len(), 50);
        assert!(status.history.iter().all(|r| r.message.chars().count() == MAX_RUN_MESSAGE_CHARS));
        let bytes = serde_json::to_vec(&status).unwrap().len();
        assert!(bytes < 48 * 1024, "status at the maximum history is {bytes} bytes");
    }

    #[test]
    fn ready_keeps_its_transition_time_while_its_status_holds() {
        let t0: Timestamp = "2026-01-01T00:00:00.75Z".parse().unwrap();
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let mut status = CohortImportStatus::default();
        set_ready(&mut status, ReadyReason::Scheduled, "Next run at …", Some(1), t0);
        assert_eq!(status.conditions[0].last_transition_time.0.to_string(), "2026-01-01T00:00:00Z");
        set_ready(&mut status, ReadyReason::Succeeded, "Run r succeeded", Some(2), t1);
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(status.conditions[0].last_transition_time.0, seconds(t0));
        assert_eq!(status.conditions[0].reason, "Succeeded");
        set_ready(&mut status, ReadyReason::Failed, "Run r failed", Some(2), t1);
        assert_eq!(status.conditions[0].last_transition_time.0, t1);
        assert_eq!(status.conditions[0].status, "False");
        set_ready(&mut status, ReadyReason::Running, "Run r2 started", Some(2), t1);
        assert_eq!(status.conditions[0].status, "Unknown");
    }

    #[test]
    fn idle_ready_follows_the_last_run() {
        let next: Timestamp = "2026-01-02T06:30:00Z".parse().unwrap();
        let mut status = CohortImportStatus::default();
        let (why, message) = idle_ready(&status, Some(next));
        assert_eq!(why, ReadyReason::Scheduled);
        assert_eq!(message, "Next run at 2026-01-02T06:30:00Z");
        record_run(&mut status, record("r1", RunResult::Blocked, "would remove 40%"), 10);
        let (why, message) = idle_ready(&status, None);
        assert_eq!(why, ReadyReason::Blocked);
        assert_eq!(message, "Run r1 was blocked: would remove 40%; no run scheduled");
    }
}
