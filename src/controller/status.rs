//! Building `.status` and writing it: server-side apply with one field manager, only when
//! something changed, guarded by the resourceVersion it was computed from.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tracing::{error, warn};

use crate::api::{
    CohortImport, CohortImportStatus, ConditionStatus, FIELD_MANAGER, HistoryLimits, MAX_RUN_MESSAGE_CHARS, READY,
    RECONCILING, ReadyReason, RunRecord, RunResult, STALLED,
};
use crate::run::report::truncate;

/// Times in status have whole seconds: what the API server keeps of a `metav1.Time`, so
/// that a status read back compares equal to the one written.
pub fn seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).expect("a valid timestamp stays valid when truncated")
}

/// Sets the `Ready` condition — its status follows from `reason` — and with it kstatus's
/// `Reconciling` and `Stalled`, each keeping its transition time while its status stays the
/// same. Every condition the operator writes is set here, so the three always agree.
pub fn set_ready(
    status: &mut CohortImportStatus,
    reason: ReadyReason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    // Condition messages are limited to 32 KiB; ours stay far shorter.
    let message = truncate(message.to_owned(), 1024);
    let ready = condition(status, READY, reason.status(), reason, &message, generation, now);
    let reconciling = ConditionStatus::from(reason == ReadyReason::Running);
    let reconciling = condition(status, RECONCILING, reconciling, reason, &message, generation, now);
    let stalled =
        condition(status, STALLED, ConditionStatus::from(reason.stalled()), reason, &message, generation, now);
    status.conditions.retain(|c| ![READY, RECONCILING, STALLED].contains(&c.type_.as_str()));
    status.conditions.splice(0..0, [ready, reconciling, stalled]);
}

/// The condition `type_` with `value`, keeping the transition time of the one in `status`
/// while its status stays the same. Its reason is `Ready`'s, which says why for all three.
fn condition(
    status: &CohortImportStatus,
    type_: &str,
    value: ConditionStatus,
    reason: ReadyReason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let last_transition_time = match status.conditions.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == value.as_str() => c.last_transition_time.clone(),
        _ => Time(seconds(now)),
    };
    Condition {
        type_: type_.to_owned(),
        status: value.as_str().to_owned(),
        reason: reason.as_str().to_owned(),
        message: message.to_owned(),
        last_transition_time,
        observed_generation: generation,
    }
}

/// The `Ready` reason currently shown.
pub fn ready_reason(status: Option<&CohortImportStatus>) -> Option<&str> {
    status?.ready().map(|c| c.reason.as_str())
}

/// Records a finished (or missed) run: newest first, as many as `limits` keep.
pub fn record_run(status: &mut CohortImportStatus, mut record: RunRecord, limits: HistoryLimits) {
    record.message = truncate(std::mem::take(&mut record.message), MAX_RUN_MESSAGE_CHARS);
    if record.result == RunResult::Succeeded {
        status.last_successful_run_at = record.finished_at.or(Some(record.started_at));
        status.members = Some(record.cohort_size);
    }
    status.history.retain(|r| r.id != record.id);
    status.history.insert(0, record.clone());
    trim_history(&mut status.history, limits);
    status.last_run = Some(record);
}

/// Drops the oldest runs past `limits`.
fn trim_history(history: &mut Vec<RunRecord>, limits: HistoryLimits) {
    let (succeeded, failed) = match limits {
        HistoryLimits::Newest(limit) => return history.truncate(usize::from(limit.max(1))),
        HistoryLimits::ByResult { succeeded, failed } => (succeeded, failed),
    };
    let (mut kept_succeeded, mut kept_failed) = (0, 0);
    history.retain(|r| {
        let (kept, limit) = match r.result {
            RunResult::Succeeded | RunResult::DryRun => (&mut kept_succeeded, succeeded),
            RunResult::Failed | RunResult::Blocked | RunResult::Missed => (&mut kept_failed, failed),
        };
        *kept += 1;
        *kept <= limit
    });
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
            // A precise reason the run's end set (`SourceFailed`) stays until the next run ends.
            let kept = status.ready().and_then(|c| ReadyReason::parse(&c.reason)).filter(|r| r.refines(run.result));
            let reason = match run.result {
                RunResult::Blocked if status.snapshot_missing_run.as_deref() == Some(run.id.as_str()) => {
                    ReadyReason::SnapshotMissing
                }
                result => kept.unwrap_or(ReadyReason::after(result)),
            };
            (reason, message)
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

/// Writes imports' status ([`update`]), starting from the copy the controller's watch last
/// delivered: the part of the controller that the run's end, its report and a hand-over
/// write through.
#[derive(Clone)]
pub struct StatusWriter {
    pub(super) client: kube::Client,
    /// The imports each controller sees.
    pub(super) stores: Vec<Store<CohortImport>>,
}

impl StatusWriter {
    /// The controller's copy of `import`, as its watch last delivered it.
    fn cached(&self, import: &CohortImport) -> Option<Arc<CohortImport>> {
        let reference = ObjectRef::from_obj(import);
        self.stores.iter().find_map(|store| store.get(&reference))
    }

    /// Lets `change` edit `import`'s status and writes it ([`update`]).
    pub async fn update(&self, import: &CohortImport, change: impl FnMut(&mut CohortImportStatus) -> bool) -> bool {
        let api = Api::namespaced(self.client.clone(), &import.namespace().unwrap_or_default());
        update(&api, self.cached(import), import, change).await
    }
}

/// Lets `change` edit `import`'s status (returning whether it changed anything) and
/// writes it; retried while the write is refused as stale or the API server is unavailable.
/// Returns whether the change is recorded. The first try starts from `cached`, the controller's copy
/// (the watch has almost always delivered the run's start by its end), every later one from
/// the import read afresh; the write is conditioned on the copy's `resourceVersion`, so a
/// stale copy costs one refused write, and only a fresh copy can refuse the change.
pub async fn update(
    api: &Api<CohortImport>,
    cached: Option<Arc<CohortImport>>,
    import: &CohortImport,
    mut change: impl FnMut(&mut CohortImportStatus) -> bool,
) -> bool {
    let mut delay = Duration::from_millis(100);
    let mut cached = cached.filter(|c| c.uid() == import.uid());
    for _ in 0..30 {
        let (fresh, from_cache) = match cached.take() {
            Some(copy) => (copy.as_ref().clone(), true),
            None => match api.get_opt(&import.name_any()).await {
                Ok(Some(fresh)) if fresh.uid() == import.uid() => (fresh, false),
                Ok(_) => return false, // deleted (or deleted and created again)
                Err(e) => {
                    warn!(error = %e, "cannot read the import to record the run; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        let mut desired = fresh.status.clone().unwrap_or_default();
        if !change(&mut desired) {
            if from_cache {
                continue;
            }
            return false;
        }
        match write(api, &fresh, &desired).await {
            Ok(Written::Applied | Written::Unchanged) => return true,
            Err(e) if is_stale_write(&e) => continue,
            Err(e) => {
                warn!(error = %e, "cannot write status; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    error!("gave up recording in status; the next reconcile finds the run interrupted and runs it again");
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RunTrigger;

    fn record(id: &str, result: RunResult, message: &str) -> RunRecord {
        RunRecord {
            attempt: None,
            id: id.into(),
            trigger: RunTrigger::Scheduled,
            started_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            finished_at: Some("2026-01-01T00:01:00Z".parse().unwrap()),
            result,
            cohort_size: 3,
            added: 1,
            removed: 0,
            would_add: None,
            would_remove: None,
            message: message.into(),
        }
    }

    #[test]
    fn history_is_newest_first_and_capped() {
        let mut status = CohortImportStatus::default();
        for i in 0..5 {
            record_run(&mut status, record(&format!("r{i}"), RunResult::Succeeded, ""), HistoryLimits::Newest(3));
        }
        let ids: Vec<_> = status.history.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r4", "r3", "r2"]);
        assert_eq!(status.last_run.as_ref().unwrap().id, "r4");
        assert_eq!(status.last_successful_run_at.map(|t| t.to_string()).as_deref(), Some("2026-01-01T00:01:00Z"));
    }

    #[test]
    fn per_result_limits_keep_the_last_failure_in_sight() {
        let limits = HistoryLimits::ByResult { succeeded: 3, failed: 1 };
        let mut status = CohortImportStatus::default();
        record_run(&mut status, record("f0", RunResult::Failed, "old"), limits);
        record_run(&mut status, record("f1", RunResult::Blocked, "blocked"), limits);
        for i in 0..10 {
            record_run(&mut status, record(&format!("s{i}"), RunResult::Succeeded, ""), limits);
        }
        let ids: Vec<_> = status.history.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["s9", "s8", "s7", "f1"], "newest first; the last failure stays");
        // Zero keeps none of that kind; lastRun still shows the newest run.
        let limits = HistoryLimits::ByResult { succeeded: 0, failed: 2 };
        record_run(&mut status, record("s10", RunResult::Succeeded, ""), limits);
        let ids: Vec<_> = status.history.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["f1"]);
        assert_eq!(status.last_run.as_ref().unwrap().id, "s10");
        // The largest history the limits allow stays small.
        let limits = HistoryLimits::ByResult { succeeded: 50, failed: 50 };
        for i in 0..120 {
            let result = if i % 2 == 0 { RunResult::Failed } else { RunResult::DryRun };
            record_run(&mut status, record(&format!("20260101-000000-{i:04x}"), result, &"é".repeat(500)), limits);
        }
        assert_eq!(status.history.len(), 100);
        let bytes = serde_json::to_vec(&status).unwrap().len();
        assert!(bytes < 96 * 1024, "status at the maximum history is {bytes} bytes");
    }

    #[test]
    fn the_spec_decides_the_limits_and_history_limit_alone_keeps_its_meaning() {
        let mut spec: crate::api::CohortImportSpec = serde_json::from_value(serde_json::json!({
            "cohort": { "id": "vip", "name": "VIP" },
            "source": { "configMap": { "name": "members", "key": "ids" } },
            "identifiers": { "externalId": "id" },
            "destination": { "braze": {
                "restEndpoint": "https://rest.iad-01.braze.com",
                "partner": "kubit",
                "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
            } },
            "schedule": { "cadence": "Daily", "at": "06:30" }
        }))
        .unwrap();
        assert_eq!(spec.history_limits(), HistoryLimits::Newest(10), "the default");
        spec.history_limit = 7;
        assert_eq!(spec.history_limits(), HistoryLimits::Newest(7));
        spec.failed_runs_history_limit = Some(2);
        assert_eq!(spec.history_limits(), HistoryLimits::ByResult { succeeded: 7, failed: 2 });
        spec.successful_runs_history_limit = Some(0);
        assert_eq!(spec.history_limits(), HistoryLimits::ByResult { succeeded: 0, failed: 2 });
    }

    #[test]
    fn a_failed_run_keeps_the_last_success() {
        let mut status = CohortImportStatus::default();
        record_run(&mut status, record("ok", RunResult::Succeeded, ""), HistoryLimits::Newest(10));
        let mut failed = record("bad", RunResult::Failed, "boom");
        failed.finished_at = Some("2026-01-02T00:00:00Z".parse().unwrap());
        record_run(&mut status, failed, HistoryLimits::Newest(10));
        assert_eq!(status.last_successful_run_at.map(|t| t.to_string()).as_deref(), Some("2026-01-01T00:01:00Z"));
        assert_eq!(status.last_run.as_ref().unwrap().result, RunResult::Failed);
        assert_eq!(status.members, Some(3), "the Members column: the source at the last success");
    }

    #[test]
    fn messages_are_truncated_so_status_stays_small_at_the_maximum_history() {
        let mut status = CohortImportStatus::default();
        for i in 0..60 {
            record_run(
                &mut status,
                record(&format!("20260101-000000-{i:04x}"), RunResult::Failed, &"é".repeat(5000)),
                HistoryLimits::Newest(50),
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
        assert_eq!(status.conditions.len(), 3);
        assert_eq!(status.conditions[0].last_transition_time.0, seconds(t0));
        assert_eq!(status.conditions[0].reason, "Succeeded");
        set_ready(&mut status, ReadyReason::Failed, "Run r failed", Some(2), t1);
        assert_eq!(status.conditions[0].last_transition_time.0, t1);
        assert_eq!(status.conditions[0].status, "False");
        set_ready(&mut status, ReadyReason::Running, "Run r2 started", Some(2), t1);
        assert_eq!(status.conditions[0].status, "Unknown");
    }

    /// kstatus's verdict on `status` (cli-utils' generic rules, in their order).
    fn kstatus(status: &CohortImportStatus, generation: i64) -> &'static str {
        let is = |type_: &str, value: &str| status.conditions.iter().any(|c| c.type_ == type_ && c.status == value);
        // A newer generation not yet observed, or a run in progress.
        if status.observed_generation != Some(generation) || is(RECONCILING, "True") {
            "InProgress"
        } else if is(STALLED, "True") {
            "Failed"
        } else if is(READY, "False") {
            "InProgress"
        } else {
            "Current"
        }
    }

    #[test]
    fn each_ready_reason_sets_reconciling_and_stalled() {
        use ReadyReason::*;
        // (reason, Ready, Reconciling, Stalled, kstatus)
        let cases = [
            (Scheduled, "True", "False", "False", "Current"),
            (Succeeded, "True", "False", "False", "Current"),
            (DryRun, "True", "False", "False", "Current"),
            (Running, "Unknown", "True", "False", "InProgress"),
            (Suspended, "False", "False", "False", "InProgress"),
            (Missed, "False", "False", "False", "InProgress"),
            (Failed, "False", "False", "True", "Failed"),
            (Blocked, "False", "False", "True", "Failed"),
            (Conflict, "False", "False", "True", "Failed"),
            (InvalidSpec, "False", "False", "True", "Failed"),
            (SecretNotFound, "False", "False", "True", "Failed"),
            (SecretReadFailed, "False", "False", "True", "Failed"),
            (ConfigMapNotFound, "False", "False", "True", "Failed"),
            (SourceFailed, "False", "False", "True", "Failed"),
            (EgressDenied, "False", "False", "True", "Failed"),
            (SnapshotFailed, "False", "False", "True", "Failed"),
            (SnapshotMissing, "False", "False", "True", "Failed"),
            (Deleting, "False", "False", "True", "Failed"),
        ];
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        for (reason, ready, reconciling, stalled, verdict) in cases {
            let mut status = CohortImportStatus { observed_generation: Some(7), ..Default::default() };
            set_ready(&mut status, reason, "why", Some(7), now);
            let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
            assert_eq!(types, [READY, RECONCILING, STALLED], "{reason}");
            let values: Vec<_> = status.conditions.iter().map(|c| c.status.as_str()).collect();
            assert_eq!(values, [ready, reconciling, stalled], "{reason}");
            for c in &status.conditions {
                assert_eq!(
                    (c.reason.as_str(), c.message.as_str(), c.observed_generation),
                    (reason.as_str(), "why", Some(7))
                );
            }
            assert_eq!(kstatus(&status, 7), verdict, "{reason}");
            assert_eq!(kstatus(&status, 8), "InProgress", "{reason}: a newer generation is not observed yet");
        }
    }

    #[test]
    fn each_condition_keeps_its_own_transition_time() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let mut status = CohortImportStatus::default();
        set_ready(&mut status, ReadyReason::Failed, "Run r failed", Some(1), t0);
        set_ready(&mut status, ReadyReason::Running, "Run r2 started", Some(1), t1);
        let times: Vec<_> = status.conditions.iter().map(|c| c.last_transition_time.0).collect();
        assert_eq!(times, [t1, t1, t1], "Ready False→Unknown, Reconciling False→True, Stalled True→False");
        set_ready(&mut status, ReadyReason::SourceFailed, "Run r2 failed", Some(1), t0);
        set_ready(&mut status, ReadyReason::Failed, "Run r3 failed", Some(1), t1);
        assert_eq!(status.conditions[2].last_transition_time.0, t0, "Stalled stayed True");
    }

    #[test]
    fn idle_ready_follows_the_last_run() {
        let next: Timestamp = "2026-01-02T06:30:00Z".parse().unwrap();
        let mut status = CohortImportStatus::default();
        let (why, message) = idle_ready(&status, Some(next));
        assert_eq!(why, ReadyReason::Scheduled);
        assert_eq!(message, "Next run at 2026-01-02T06:30:00Z");
        record_run(&mut status, record("r1", RunResult::Blocked, "would remove 40%"), HistoryLimits::Newest(10));
        let (why, message) = idle_ready(&status, None);
        assert_eq!(why, ReadyReason::Blocked);
        assert_eq!(message, "Run r1 was blocked: would remove 40%; no run scheduled");
    }

    #[test]
    fn an_idle_import_keeps_the_precise_reason_its_failed_run_ended_with() {
        let mut status = CohortImportStatus::default();
        record_run(&mut status, record("r1", RunResult::Failed, "HTTP 503"), HistoryLimits::Newest(10));
        set_ready(
            &mut status,
            ReadyReason::SourceFailed,
            "Run r1 failed",
            Some(1),
            "2026-01-02T00:00:00Z".parse().unwrap(),
        );
        assert_eq!(idle_ready(&status, None).0, ReadyReason::SourceFailed);
        // A reason that does not describe a failed run is not kept, nor a missing Secret,
        // which every reconcile checks afresh (it may be back).
        for reason in [ReadyReason::Conflict, ReadyReason::SecretNotFound] {
            set_ready(&mut status, reason, "held", Some(1), "2026-01-02T00:00:00Z".parse().unwrap());
            assert_eq!(idle_ready(&status, None).0, ReadyReason::Failed, "{reason}");
        }
        // Nor after a run that succeeded.
        record_run(&mut status, record("r2", RunResult::Succeeded, ""), HistoryLimits::Newest(10));
        set_ready(&mut status, ReadyReason::SourceFailed, "stale", Some(1), "2026-01-02T00:00:00Z".parse().unwrap());
        assert_eq!(idle_ready(&status, None).0, ReadyReason::Succeeded);
    }

    #[test]
    fn every_reason_reads_back_from_its_text() {
        for reason in
            [ReadyReason::Scheduled, ReadyReason::SourceFailed, ReadyReason::EgressDenied, ReadyReason::Deleting]
        {
            assert_eq!(ReadyReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(ReadyReason::parse("NotAReason"), None);
    }
}
