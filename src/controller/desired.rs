//! What one reconcile wants, decided without I/O: from the import, its plan (or why its spec
//! is invalid) and what the reconcile fetched, the status to write and the effects to carry
//! out once it is written. [`super::reconcile`] fetches, calls [`plan_for`] and [`desired`],
//! and executes the result; every decision a reconcile makes is here, tested below.

use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::conflict::CohortKey;
use super::destinations::Refusal;
use super::events::reason as event;
use super::record::{self, Recorded, RunEnd};
use super::retry;
use super::secrets::KeyError;
use super::status::{idle_ready, next_run_text, seconds, set_ready};
use crate::api::{
    APPROVE_REMOVALS_ANNOTATION, APPROVE_RESYNC_ANNOTATION, CohortImport, CohortImportStatus, CurrentRun,
    FLUX_RECONCILE_ANNOTATION, RUN_REQUESTED_ANNOTATION, ReadyReason, RunResult, RunRunner, RunTrigger,
};
use crate::domain::plan::{Decision, Hold, Plan, PlanInput, ScheduleCursor, plan};
use crate::domain::retry::Retry;
use crate::domain::validate::{SourceKind, SpecErrors, ValidSpec};

/// What the reconcile found out before deciding.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub now: Timestamp,
    /// The operator's `--starting-deadline-seconds`, which a missed run's record names.
    pub starting_deadline: SignedDuration,
    /// The older import that owns this import's cohort, as a message names it: `namespace/name`
    /// in the same namespace, else not by name ([`super::conflict::winner_label`]).
    pub winner: Option<&'a str>,
    /// The operator's `--max-run-attempts`: an interrupted run on its last attempt ends.
    pub max_run_attempts: u32,
    /// The run status shows in progress ended on this replica and its end is recorded:
    /// this copy of the import predates that record.
    pub run_ended_here: bool,
    /// The import's Braze workspace, when the reconcile read it ([`super::conflict`]).
    pub workspace: Option<&'a str>,
    /// Whether every Secret key the import reads exists; fetched only when
    /// [`checks_secrets`] says so.
    pub secrets: Option<&'a Result<(), KeyError>>,
    /// The kind of source a valid spec names, shown by `kubectl get -o wide`.
    pub source_kind: Option<SourceKind>,
    /// The id a run started by this reconcile gets ([`crate::run::new_run_id`]).
    pub new_run_id: String,
    /// Sharded: who signs a run this reconcile starts ([`super::shard`]); `None` unsharded.
    pub runner: Option<RunRunner>,
}

/// Something to do once the status is written.
#[derive(Clone, Debug)]
pub enum Effect {
    /// A warning Event, published only if this write changed `Ready`'s reason.
    WarnOnChange { reason: &'static str, action: &'static str, note: String },
    /// A warning Event.
    Warn { reason: &'static str, action: &'static str, note: String },
    /// A run ended without running (missed, abandoned): announce it ([`record::announce`]).
    Announce(Box<(RunEnd, Recorded)>),
    /// Start the run the written status shows in progress.
    StartRun(CurrentRun),
}

/// When to reconcile again, if nothing changes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// At this time (the next run), or only on a change when `None`.
    At(Option<Timestamp>),
    /// Shortly: this copy of the import is stale and a newer one is on its way.
    Soon,
}

/// Why an import has no plan: its spec is invalid, or its shared destination may not be used.
#[derive(Clone, Copy, Debug)]
pub enum NotPlanned<'a> {
    Invalid(&'a SpecErrors),
    Refused(&'a Refusal),
}

/// The outcome of [`desired`].
#[derive(Clone, Debug)]
pub struct Desired {
    /// The status to write; `None`: leave it alone.
    pub status: Option<CohortImportStatus>,
    pub effects: Vec<Effect>,
    pub requeue: Requeue,
}

/// The plan for an import whose spec is `valid`; `owned_elsewhere` when an older import owns
/// its cohort.
pub fn plan_for(
    import: &CohortImport,
    valid: &ValidSpec,
    owned_elsewhere: bool,
    now: Timestamp,
    starting_deadline: SignedDuration,
) -> Plan {
    let status = import.status.as_ref();
    let hold = if owned_elsewhere {
        Some(Hold::Conflict)
    } else if import.spec.suspend {
        Some(Hold::Suspended)
    } else {
        None
    };
    let approved_blocked_run = approved_blocked_run(import);
    let cursor = status.and_then(|s| s.schedule.as_ref()).map(|s| ScheduleCursor::stored(s, &valid.schedule));
    // Our annotation and Flux's are independent: each new value of either runs once. The
    // plan sees the first one pending (one run serves both when both are).
    let ours = pending(import, RUN_REQUESTED_ANNOTATION, status.and_then(|s| s.last_handled_run_request.as_deref()));
    let flux = pending(import, FLUX_RECONCILE_ANNOTATION, status.and_then(|s| s.last_handled_reconcile_at.as_deref()));
    plan(&PlanInput {
        now,
        // The API server always sets it; `now` stands in for an object without one.
        created: import.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0),
        schedule: &valid.schedule,
        hold,
        starting_deadline,
        run_request: ours.or(flux),
        last_handled_run_request: None,
        approved_blocked_run,
        cursor: cursor.as_ref(),
        has_run_before: status.is_some_and(|s| s.last_run.is_some() || !s.history.is_empty()),
    })
}

/// An approval the import carries for its last run, blocked: the removal guard's
/// (`cohorts.dev/approve-removals`) or, for a run blocked because the snapshot was missing,
/// a resync (`cohorts.dev/approve-resync`). Each annotation approves only its kind of block.
fn approval(import: &CohortImport) -> Option<Approval<'_>> {
    let status = import.status.as_ref()?;
    let run = status.last_run.as_ref().filter(|run| run.result == RunResult::Blocked)?;
    let missing = status.snapshot_missing_run.as_deref() == Some(run.id.as_str());
    let annotation = if missing { APPROVE_RESYNC_ANNOTATION } else { APPROVE_REMOVALS_ANNOTATION };
    let id = import.annotations().get(annotation).filter(|approved| **approved == run.id)?.as_str();
    Some(if missing { Approval::Resync(id) } else { Approval::Removals(id) })
}

/// What an approval lets a blocked run do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Approval<'a> {
    /// Remove members past the removal guard.
    Removals(&'a str),
    /// Send the whole source again: the snapshot was missing.
    Resync(&'a str),
}

/// The blocked run an approval names, of either kind.
fn approved_blocked_run(import: &CohortImport) -> Option<&str> {
    approval(import).map(|a| match a {
        Approval::Removals(id) | Approval::Resync(id) => id,
    })
}

/// The value of the run request `annotation` unless it is empty or already `handled`.
fn pending<'a>(import: &'a CohortImport, annotation: &str, handled: Option<&str>) -> Option<&'a str> {
    let value = import.annotations().get(annotation)?.as_str();
    (!value.is_empty() && Some(value) != handled).then_some(value)
}

/// Records every run request `import` carries as handled: the run about to start serves them.
fn handle_requests(import: &CohortImport, status: &mut CohortImportStatus) {
    let annotations = import.annotations();
    let value = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();
    if let Some(ours) = value(RUN_REQUESTED_ANNOTATION) {
        status.last_handled_run_request = Some(ours);
    }
    if let Some(flux) = value(FLUX_RECONCILE_ANNOTATION) {
        status.last_handled_reconcile_at = Some(flux);
    }
}

/// Whether [`desired`] needs [`Observed::secrets`]: only an import that waits says whether
/// its Secrets are there (a run reads them anyway).
pub fn checks_secrets(import: &CohortImport, plan: &Plan) -> bool {
    plan.decision == Decision::Wait && import.status.as_ref().is_none_or(|s| s.current_run.is_none())
}

/// The status `import` should have and what to do once it has it.
pub fn desired(import: &CohortImport, plan: Result<&Plan, NotPlanned<'_>>, seen: &Observed<'_>) -> Desired {
    let mut status = import.status.clone().unwrap_or_default();
    status.observed_generation = import.metadata.generation;
    if let Some(workspace) = seen.workspace {
        status.braze_workspace = Some(workspace.to_owned());
    }
    let plan = match plan {
        Ok(plan) => plan,
        Err(why) => return not_planned(import, status, why, seen),
    };
    if let Some(run) = status.current_run.clone()
        && let Some(resumed) = resume_interrupted(import, &status, run, seen)
    {
        return resumed;
    }
    status.schedule = Some(plan.cursor.to_status());
    status.source_kind = seen.source_kind.map(|kind| format!("{kind:?}"));
    status.next_run_at = plan.next_run_at.map(seconds);
    let mut effects = Vec::new();
    if let Some(run) = status.current_run.take() {
        effects.extend(abandon_interrupted(import, &mut status, &run, seen));
    }
    follow_plan(import, status, plan, seen, effects)
}

/// Status shows `run`, which is not running here (a reconcile never overlaps one): it ended
/// here a moment ago and this copy predates its record (nothing to do yet), or it was cut
/// short by a restart or failover — then it runs again, unless another import owns the
/// cohort now or it has used its attempts (`None`: [`abandon_interrupted`]).
fn resume_interrupted(
    import: &CohortImport,
    status: &CohortImportStatus,
    run: CurrentRun,
    seen: &Observed<'_>,
) -> Option<Desired> {
    if seen.run_ended_here {
        return Some(Desired { status: None, effects: Vec::new(), requeue: Requeue::Soon });
    }
    if seen.winner.is_some() || run.attempt >= seen.max_run_attempts {
        return None;
    }
    let attempt = run.attempt + 1;
    let mut run = CurrentRun { started_at: seconds(seen.now), attempt, ..run };
    run.set_runner(seen.runner.clone());
    let note = format!(
        "Run {} was interrupted (operator restart or failover); running it again (attempt {attempt} of {})",
        run.id, seen.max_run_attempts
    );
    let effects = vec![Effect::Warn { reason: event::RUN_INTERRUPTED, action: "Run", note }];
    Some(start(import, status.clone(), run, effects))
}

/// Ends interrupted `run` for good: another import owns the cohort now, or it was
/// interrupted on each of its attempts. Not retried (`spec.retry`): each attempt took the
/// operator down with it, stopping every import in the cluster; a person must look first.
fn abandon_interrupted(
    import: &CohortImport,
    status: &mut CohortImportStatus,
    run: &CurrentRun,
    seen: &Observed<'_>,
) -> [Effect; 1] {
    let why = if seen.winner.is_some() {
        "another import owns the cohort now".to_owned()
    } else {
        format!(
            "interrupted on each of its {} attempts, the limit (the operator's --max-run-attempts); a crash \
             loop is likely: see the operator's logs and memory limit",
            run.attempt
        )
    };
    abandon(import, status, run, seen.now, &why)
}

/// Carries out `plan`'s decision on `status`, after `effects`.
fn follow_plan(
    import: &CohortImport,
    mut status: CohortImportStatus,
    plan: &Plan,
    seen: &Observed<'_>,
    mut effects: Vec<Effect>,
) -> Desired {
    let requeue = Requeue::At(plan.next_run_at);
    match &plan.decision {
        Decision::Run { trigger, run_request, approved_removals } => {
            // A scheduled or requested run replaces a pending retry.
            retry::set(&mut status, None);
            if run_request.is_some() {
                handle_requests(import, &mut status);
            }
            // The plan approves the blocked run; which kind of approval is ours to say.
            let resync = match approval(import) {
                Some(Approval::Resync(id)) if approved_removals.as_deref() == Some(id) => Some(id.to_owned()),
                _ => None,
            };
            let mut run = new_run(seen, *trigger);
            run.approved_removals = approved_removals.clone().filter(|_| resync.is_none());
            run.approved_resync = resync;
            start(import, status, run, effects)
        }
        Decision::RecordMissed { slot } => {
            let end = RunEnd::missed(*slot, seen.starting_deadline, seen.now);
            let recorded = record::record(&mut status, &end, import.spec.history_limits(), &import.spec.retry_policy());
            effects.push(Effect::Announce(Box::new((end, recorded))));
            Desired { status: Some(status), effects, requeue }
        }
        Decision::Wait => match retry::pending(&status, &import.spec.retry_policy(), plan.next_run_at) {
            Some(due) if due.at <= seen.now => start_retry(import, status, due, seen, effects),
            pending => {
                retry::set(&mut status, pending);
                effects.extend(wait(import, &mut status, plan.next_run_at, pending, seen));
                let requeue = Requeue::At(status.next_run_at);
                Desired { status: Some(status), effects, requeue }
            }
        },
        Decision::Held { hold, pending_request } => {
            // Suspended or in conflict: no runs, retries included; resuming does not catch up.
            retry::set(&mut status, None);
            held(import, &mut status, *hold, *pending_request, seen, &mut effects);
            Desired { status: Some(status), effects, requeue: Requeue::At(None) }
        }
    }
}

/// Starts retry `due` of the last run, which failed: a run of its own, `Retry`, counted in
/// `status.retryAttempt` until it ends ([`retry::schedule`]).
fn start_retry(
    import: &CohortImport,
    mut status: CohortImportStatus,
    due: Retry,
    seen: &Observed<'_>,
    effects: Vec<Effect>,
) -> Desired {
    status.next_retry_at = None;
    status.retry_attempt = Some(due.attempt);
    start(import, status, new_run(seen, RunTrigger::Retry), effects)
}

/// A run starting now, its first attempt, signed by this operator, with no approval.
fn new_run(seen: &Observed<'_>, trigger: RunTrigger) -> CurrentRun {
    let mut run = CurrentRun {
        id: seen.new_run_id.clone(),
        trigger,
        started_at: seconds(seen.now),
        approved_removals: None,
        approved_resync: None,
        runner_shard: None,
        runner_lease: None,
        runner_identity: None,
        attempt: 1,
    };
    run.set_runner(seen.runner.clone());
    run
}

/// Nothing to do until the next run (or the `retry` of a failed one): `Ready` from the last
/// run, unless a Secret is missing.
fn wait(
    import: &CohortImport,
    status: &mut CohortImportStatus,
    next_run_at: Option<Timestamp>,
    retry: Option<Retry>,
    seen: &Observed<'_>,
) -> Option<Effect> {
    let generation = import.metadata.generation;
    let Some(Err(e)) = seen.secrets else {
        let (reason, message) = idle_ready(status, next_run_at);
        let Some(retry) = retry else {
            set_ready(status, reason, &message, generation, seen.now);
            return None;
        };
        let message = format!(
            "{message}; retry {} of {} at {} first (spec.retry)",
            retry.attempt,
            import.spec.retry_policy().limit,
            retry.at
        );
        set_ready(status, ReadyReason::RetryScheduled, &message, generation, seen.now);
        return None;
    };
    let message = format!("{e}; {}", next_run_text(next_run_at));
    set_ready(status, e.reason(), &message, generation, seen.now);
    // A missing Secret is the user's to fix; a failed API read is not.
    (e.reason() == ReadyReason::SecretNotFound).then_some(Effect::WarnOnChange {
        reason: event::SECRET_NOT_FOUND,
        action: "Check",
        note: message,
    })
}

/// `Ready=False`, reason `InvalidSpec` or the refused destination's; a run in progress is
/// abandoned, nothing is scheduled, nothing is sent.
fn not_planned(
    import: &CohortImport,
    mut status: CohortImportStatus,
    why: NotPlanned<'_>,
    seen: &Observed<'_>,
) -> Desired {
    let (reason, message, abandoned) = match why {
        NotPlanned::Invalid(errors) => {
            (ReadyReason::InvalidSpec, format!("Invalid spec: {errors}"), "the spec became invalid".to_owned())
        }
        NotPlanned::Refused(refusal) => {
            (refusal.reason(), refusal.to_string(), format!("its destination cannot be used: {refusal}"))
        }
    };
    let mut effects = Vec::new();
    if let Some(run) = status.current_run.take() {
        effects.extend(abandon(import, &mut status, &run, seen.now, &abandoned));
    }
    status.next_run_at = None;
    retry::set(&mut status, None);
    set_ready(&mut status, reason, &message, import.metadata.generation, seen.now);
    let action = if reason == ReadyReason::InvalidSpec { "Validate" } else { "Resolve" };
    let reason = if reason == ReadyReason::InvalidSpec { event::INVALID_SPEC } else { reason.as_str() };
    effects.push(Effect::WarnOnChange { reason, action, note: message });
    Desired { status: Some(status), effects, requeue: Requeue::At(None) }
}

/// Records `run` as ended without running again, through the one run-end path. It is not
/// retried: why it ended (an invalid spec, a conflict, a crash loop) needs a person.
fn abandon(
    import: &CohortImport,
    status: &mut CohortImportStatus,
    run: &CurrentRun,
    now: Timestamp,
    why: &str,
) -> [Effect; 1] {
    let end = RunEnd::abandoned(run, now, why);
    let recorded = record::record(status, &end, import.spec.history_limits(), &import.spec.retry_policy());
    [Effect::Announce(Box::new((end, recorded)))]
}

/// Records `run` in progress — first, so that an operator stopping in the middle finds it
/// and runs it again — then starts it.
fn start(import: &CohortImport, mut status: CohortImportStatus, run: CurrentRun, mut effects: Vec<Effect>) -> Desired {
    let message = format!("Run {} ({:?}) started at {}", run.id, run.trigger, run.started_at);
    set_ready(&mut status, ReadyReason::Running, &message, import.metadata.generation, run.started_at);
    status.current_run = Some(run.clone());
    effects.push(Effect::StartRun(run));
    Desired { status: Some(status), effects, requeue: Requeue::At(None) }
}

/// `Suspended` or `Conflict`: no runs; a requested run waits.
fn held(
    import: &CohortImport,
    status: &mut CohortImportStatus,
    hold: Hold,
    pending_request: bool,
    seen: &Observed<'_>,
    effects: &mut Vec<Effect>,
) {
    let (reason, mut message) = match hold {
        Hold::Suspended => (ReadyReason::Suspended, "Suspended: no runs until spec.suspend is false".to_owned()),
        Hold::Conflict => (
            ReadyReason::Conflict,
            format!(
                "Conflict: {} is already imported by {}, which is older; this import does not run while both exist",
                CohortKey::of(&import.spec),
                seen.winner.unwrap_or("another import")
            ),
        ),
    };
    if pending_request {
        message.push_str("; the requested run waits until then");
    }
    set_ready(status, reason, &message, import.metadata.generation, seen.now);
    if hold == Hold::Conflict {
        effects.push(Effect::WarnOnChange { reason: event::CONFLICT, action: "Schedule", note: message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{RunRecord, RunTrigger, ScheduleStatus};
    use crate::domain::plan::identity;
    use serde_json::json;

    const CREATED: &str = "2026-03-01T10:00:00Z";

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// A Daily 06:30 (UTC) import created at [`CREATED`], with `status` and `annotations`.
    fn import(status: Option<CohortImportStatus>, annotations: serde_json::Value) -> CohortImport {
        let mut import: CohortImport = serde_json::from_value(json!({
            "apiVersion": "cohorts.dev/v1alpha1",
            "kind": "CohortImport",
            "metadata": {
                "name": "vip", "namespace": "growth", "uid": "u1", "generation": 3,
                "creationTimestamp": CREATED, "annotations": annotations
            },
            "spec": {
                "cohort": { "id": "vip", "name": "VIP" },
                "source": { "configMap": { "name": "members", "key": "ids" } },
                "identifiers": { "externalId": "id" },
                "destination": { "braze": {
                    "restEndpoint": "https://rest.iad-01.braze.com",
                    "partner": "kubit",
                    "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
                } },
                "schedule": { "cadence": "Daily", "at": "06:30" }
            }
        }))
        .unwrap();
        import.status = status;
        import
    }

    fn seen(now: &str) -> Observed<'static> {
        Observed {
            now: ts(now),
            starting_deadline: SignedDuration::from_hours(1),
            winner: None,
            max_run_attempts: 3,
            run_ended_here: false,
            workspace: None,
            secrets: Some(&Ok(())),
            source_kind: Some(SourceKind::ConfigMap),
            new_run_id: "20260302-063000-abcd".into(),
            runner: None,
        }
    }

    /// Plans with `seen` and decides.
    fn decide(import: &CohortImport, seen: &Observed<'_>) -> Desired {
        let valid = crate::domain::validate::validate(&import.spec).unwrap();
        let plan = plan_for(import, &valid, seen.winner.is_some(), seen.now, seen.starting_deadline);
        desired(import, Ok(&plan), seen)
    }

    /// Status after a handled 06:30 run on 2 March that ended with `result`.
    fn after_run(result: RunResult) -> CohortImportStatus {
        let schedule = crate::domain::validate::validate(&import(None, json!({})).spec).unwrap().schedule;
        let record = RunRecord {
            attempt: None,
            id: "20260302-063000-0001".into(),
            trigger: RunTrigger::Scheduled,
            started_at: ts("2026-03-02T06:30:00Z"),
            finished_at: Some(ts("2026-03-02T06:31:00Z")),
            result,
            cohort_size: 10,
            added: 1,
            removed: 4,
            would_add: None,
            would_remove: None,
            message: "m".into(),
        };
        CohortImportStatus {
            last_run: Some(record.clone()),
            history: vec![record],
            schedule: Some(ScheduleStatus {
                description: "Daily at 06:30 (UTC)".into(),
                identity: Some(identity(&schedule)),
                handled_through: Some(ts("2026-03-02T06:30:00Z")),
            }),
            next_run_at: Some(ts("2026-03-03T06:30:00Z")),
            ..Default::default()
        }
    }

    fn ready(d: &Desired) -> (String, String, String) {
        let c = d.status.as_ref().unwrap().ready().unwrap().clone();
        (c.status, c.reason, c.message)
    }

    fn running(status: &CohortImportStatus, id: &str) -> CohortImportStatus {
        let run = CurrentRun {
            id: id.into(),
            trigger: RunTrigger::Scheduled,
            started_at: ts(CREATED),
            approved_removals: None,
            approved_resync: None,
            runner_shard: None,
            runner_lease: None,
            runner_identity: None,
            attempt: 1,
        };
        CohortImportStatus { current_run: Some(run), ..status.clone() }
    }

    #[test]
    fn a_new_import_is_scheduled_for_its_first_run_time() {
        let d = decide(&import(None, json!({})), &seen("2026-03-01T10:00:05Z"));
        assert_eq!(ready(&d), ("True".into(), "Scheduled".into(), "Next run at 2026-03-02T06:30:00Z".into()));
        let status = d.status.unwrap();
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.source_kind.as_deref(), Some("ConfigMap"), "for kubectl get -o wide");
        assert_eq!(status.next_run_at, Some(ts("2026-03-02T06:30:00Z")));
        assert!(d.effects.is_empty());
        assert_eq!(d.requeue, Requeue::At(Some(ts("2026-03-02T06:30:00Z"))));
    }

    #[test]
    fn a_due_run_is_recorded_as_running_before_it_starts() {
        let d = decide(&import(None, json!({})), &seen("2026-03-02T06:30:00.4Z"));
        assert_eq!(ready(&d).0, "Unknown");
        assert_eq!(ready(&d).1, "Running");
        let status = d.status.as_ref().unwrap();
        let run = status.current_run.clone().unwrap();
        assert_eq!((run.id.as_str(), run.trigger), ("20260302-063000-abcd", RunTrigger::Initial));
        assert_eq!(run.started_at, ts("2026-03-02T06:30:00Z"), "whole seconds");
        assert_eq!(status.schedule.as_ref().unwrap().handled_through, Some(ts("2026-03-02T06:30:00Z")));
        assert!(matches!(d.effects.as_slice(), [Effect::StartRun(r)] if *r == run));
        assert_eq!(d.requeue, Requeue::At(None), "the run wakes the import when it ends");
    }

    #[test]
    fn a_run_request_is_handled_once() {
        let annotations = json!({ RUN_REQUESTED_ANNOTATION: "now-1" });
        let d =
            decide(&import(Some(after_run(RunResult::Succeeded)), annotations.clone()), &seen("2026-03-02T12:00:00Z"));
        let status = d.status.unwrap();
        assert_eq!(status.last_handled_run_request.as_deref(), Some("now-1"));
        assert_eq!(status.current_run.unwrap().trigger, RunTrigger::Manual);
        let handled =
            CohortImportStatus { last_handled_run_request: Some("now-1".into()), ..after_run(RunResult::Succeeded) };
        let d = decide(&import(Some(handled), annotations), &seen("2026-03-02T12:00:01Z"));
        assert!(d.status.unwrap().current_run.is_none());
    }

    #[test]
    fn each_value_of_each_run_request_annotation_runs_once() {
        let at = |status: CohortImportStatus, ours: &str, flux: &str| {
            let annotations = json!({ RUN_REQUESTED_ANNOTATION: ours, FLUX_RECONCILE_ANNOTATION: flux });
            decide(&import(Some(status), annotations), &seen("2026-03-02T12:00:00Z")).status.unwrap()
        };
        // Both new: one run serves both.
        let status = at(after_run(RunResult::Succeeded), "a", "f1");
        assert_eq!(status.current_run.as_ref().unwrap().trigger, RunTrigger::Manual);
        assert_eq!(
            (status.last_handled_run_request.as_deref(), status.last_handled_reconcile_at.as_deref()),
            (Some("a"), Some("f1"))
        );
        let idle = CohortImportStatus { current_run: None, ..status };
        assert!(at(idle.clone(), "a", "f1").current_run.is_none(), "both handled");
        // A new Flux value alone runs, whatever ours says; and the other way round.
        let status = at(idle.clone(), "a", "f2");
        assert!(status.current_run.is_some());
        assert_eq!(status.last_handled_reconcile_at.as_deref(), Some("f2"));
        let status = at(idle.clone(), "b", "f1");
        assert!(status.current_run.is_some());
        assert_eq!(
            (status.last_handled_run_request.as_deref(), status.last_handled_reconcile_at.as_deref()),
            (Some("b"), Some("f1"))
        );
        // An empty value is no request.
        assert!(at(idle, "a", "").current_run.is_none());
    }

    #[test]
    fn an_approval_runs_the_blocked_run_again_with_its_removals() {
        let approve = json!({ APPROVE_REMOVALS_ANNOTATION: "20260302-063000-0001" });
        let d = decide(&import(Some(after_run(RunResult::Blocked)), approve.clone()), &seen("2026-03-02T12:00:00Z"));
        let run = d.status.unwrap().current_run.unwrap();
        assert_eq!(run.approved_removals.as_deref(), Some("20260302-063000-0001"));
        // Naming a run that was not blocked approves nothing.
        let d = decide(&import(Some(after_run(RunResult::Failed)), approve), &seen("2026-03-02T12:00:00Z"));
        assert!(d.status.unwrap().current_run.is_none());
    }

    /// Status after a run blocked because the snapshot was missing.
    fn after_snapshot_missing() -> CohortImportStatus {
        let mut status = after_run(RunResult::Blocked);
        status.snapshot_missing_run = Some("20260302-063000-0001".into());
        status
    }

    #[test]
    fn a_resync_approval_runs_a_run_blocked_for_a_missing_snapshot_as_a_resync() {
        let resync = json!({ APPROVE_RESYNC_ANNOTATION: "20260302-063000-0001" });
        let d = decide(&import(Some(after_snapshot_missing()), resync.clone()), &seen("2026-03-02T12:00:00Z"));
        let run = d.status.unwrap().current_run.unwrap();
        assert_eq!(run.approved_resync.as_deref(), Some("20260302-063000-0001"));
        assert_eq!(run.approved_removals, None, "a resync approves no removal");
        // Not for a run the removal guard blocked, nor for another run.
        let d = decide(&import(Some(after_run(RunResult::Blocked)), resync), &seen("2026-03-02T12:00:00Z"));
        assert!(d.status.unwrap().current_run.is_none());
        let other = json!({ APPROVE_RESYNC_ANNOTATION: "20260301-063000-0001" });
        let d = decide(&import(Some(after_snapshot_missing()), other), &seen("2026-03-02T12:00:00Z"));
        assert!(d.status.unwrap().current_run.is_none());
    }

    #[test]
    fn approving_removals_does_not_resync_a_missing_snapshot() {
        let approve = json!({ APPROVE_REMOVALS_ANNOTATION: "20260302-063000-0001" });
        let d = decide(&import(Some(after_snapshot_missing()), approve), &seen("2026-03-02T12:00:00Z"));
        let status = d.status.unwrap();
        assert!(status.current_run.is_none(), "the snapshot is still missing; only a resync helps");
        let ready = status.ready().unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "SnapshotMissing"));
        let stalled = status.conditions.iter().find(|c| c.type_ == crate::api::STALLED).unwrap();
        assert_eq!(stalled.status, "True");
        // A scheduled run still runs (and, finding the snapshot missing, is blocked again).
        let d = decide(&import(Some(after_snapshot_missing()), json!({})), &seen("2026-03-03T06:30:00Z"));
        let run = d.status.unwrap().current_run.unwrap();
        assert_eq!((run.approved_removals, run.approved_resync), (None, None));
    }

    #[test]
    fn an_idle_import_shows_its_last_runs_result() {
        for (result, value, reason) in [
            (RunResult::Succeeded, "True", "Succeeded"),
            (RunResult::DryRun, "True", "DryRun"),
            (RunResult::Failed, "False", "Failed"),
            (RunResult::Blocked, "False", "Blocked"),
            (RunResult::Missed, "False", "Missed"),
        ] {
            let d = decide(&import(Some(after_run(result)), json!({})), &seen("2026-03-02T12:00:00Z"));
            let (v, r, message) = ready(&d);
            assert_eq!((v.as_str(), r.as_str()), (value, reason), "{result:?}");
            assert!(
                message.starts_with("Run 20260302-063000-0001 ")
                    && message.ends_with("next run at 2026-03-03T06:30:00Z")
            );
            assert!(d.effects.is_empty());
            assert_eq!(d.status.unwrap().schedule, after_run(result).schedule, "the cursor stays while idle");
        }
    }

    #[test]
    fn a_missing_secret_says_which_and_warns_once() {
        let missing = Err(KeyError::SecretNotFound { namespace: "growth".into(), name: "braze".into(), field: "f" });
        let seen = Observed { secrets: Some(&missing), ..seen("2026-03-01T10:00:05Z") };
        let d = decide(&import(None, json!({})), &seen);
        let (value, reason, message) = ready(&d);
        assert_eq!((value.as_str(), reason.as_str()), ("False", "SecretNotFound"));
        assert!(
            message.starts_with("Secret growth/braze not found")
                && message.ends_with("next run at 2026-03-02T06:30:00Z")
        );
        assert!(matches!(&d.effects[..], [Effect::WarnOnChange { reason: "SecretNotFound", .. }]));

        // A failed read is not the user's to fix: no Event.
        let unreadable =
            Err(KeyError::Read { namespace: "growth".into(), name: "braze".into(), message: "Forbidden".into() });
        let d = decide(&import(None, json!({})), &Observed { secrets: Some(&unreadable), ..seen.clone() });
        assert_eq!(ready(&d).1, "SecretReadFailed");
        assert!(d.effects.is_empty());
    }

    #[test]
    fn a_run_past_its_starting_deadline_is_recorded_as_missed_and_announced() {
        let d = decide(&import(Some(after_run(RunResult::Succeeded)), json!({})), &seen("2026-03-03T09:00:00Z"));
        let status = d.status.as_ref().unwrap();
        let missed = status.last_run.clone().unwrap();
        assert_eq!((missed.result, missed.started_at), (RunResult::Missed, ts("2026-03-03T06:30:00Z")));
        assert!(missed.message.contains("starting deadline (1 h)"), "{}", missed.message);
        assert_eq!(status.history.len(), 2);
        assert_eq!(ready(&d).1, "Missed");
        let [Effect::Announce(ended)] = &d.effects[..] else { panic!("{:?}", d.effects) };
        assert_eq!(ended.0.record, missed);
        assert_eq!(ended.1.previous_history, after_run(RunResult::Succeeded).history);
        assert_eq!(d.requeue, Requeue::At(Some(ts("2026-03-04T06:30:00Z"))));
    }

    #[test]
    fn suspended_and_conflicting_imports_hold_and_say_why() {
        let mut suspended = import(Some(after_run(RunResult::Succeeded)), json!({ RUN_REQUESTED_ANNOTATION: "x" }));
        suspended.spec.suspend = true;
        let d = decide(&suspended, &seen("2026-03-02T12:00:00Z"));
        assert_eq!(
            ready(&d),
            (
                "False".into(),
                "Suspended".into(),
                "Suspended: no runs until spec.suspend is false; the requested run waits until then".into()
            )
        );
        assert_eq!(d.status.as_ref().unwrap().next_run_at, None);
        assert!(d.effects.is_empty());
        assert_eq!(d.requeue, Requeue::At(None));

        let seen = Observed { winner: Some("growth/older"), ..seen("2026-03-02T12:00:00Z") };
        let d = decide(&import(Some(after_run(RunResult::Succeeded)), json!({})), &seen);
        let (value, reason, message) = ready(&d);
        assert_eq!((value.as_str(), reason.as_str()), ("False", "Conflict"));
        assert!(message.contains("already imported by growth/older"), "{message}");
        assert!(matches!(&d.effects[..], [Effect::WarnOnChange { reason: "Conflict", .. }]));
    }

    #[test]
    fn an_interrupted_run_is_run_again_with_a_warning() {
        let status = running(&after_run(RunResult::Succeeded), "r9");
        let d = decide(&import(Some(status), json!({})), &seen("2026-03-02T12:00:00Z"));
        let run = d.status.as_ref().unwrap().current_run.clone().unwrap();
        assert_eq!((run.id.as_str(), run.started_at, run.attempt), ("r9", ts("2026-03-02T12:00:00Z"), 2));
        assert_eq!(ready(&d).1, "Running");
        assert!(matches!(&d.effects[..], [Effect::Warn { reason: "RunInterrupted", note, .. }, Effect::StartRun(r)]
                if r.id == "r9" && note.ends_with("(attempt 2 of 3)")));
    }

    #[test]
    fn a_run_interrupted_on_its_last_attempt_ends_failed_through_the_run_end() {
        let mut status = running(&after_run(RunResult::Succeeded), "r9");
        status.current_run.as_mut().unwrap().attempt = 3;
        let d = decide(&import(Some(status), json!({})), &seen("2026-03-02T12:00:00Z"));
        let status = d.status.as_ref().unwrap();
        assert_eq!(status.current_run, None, "not run again");
        let last = status.last_run.clone().unwrap();
        assert_eq!((last.id.as_str(), last.result), ("r9", RunResult::Failed));
        assert!(last.message.contains("interrupted on each of its 3 attempts"), "{}", last.message);
        assert!(last.message.contains("--max-run-attempts"), "{}", last.message);
        assert_eq!(ready(&d).1, "Failed");
        assert!(matches!(&d.effects[..], [Effect::Announce(e)] if e.0.record == last), "{:?}", d.effects);
        assert_eq!(d.requeue, Requeue::At(Some(ts("2026-03-03T06:30:00Z"))), "the schedule goes on");

        // A higher limit runs it again.
        let mut status = running(&after_run(RunResult::Succeeded), "r9");
        status.current_run.as_mut().unwrap().attempt = 3;
        let seen = Observed { max_run_attempts: 4, ..seen("2026-03-02T12:00:00Z") };
        let d = decide(&import(Some(status), json!({})), &seen);
        assert_eq!(d.status.unwrap().current_run.map(|r| r.attempt), Some(4));
    }

    #[test]
    fn a_run_recorded_before_attempts_were_counted_is_on_its_first() {
        let run: CurrentRun =
            serde_json::from_value(json!({ "id": "r1", "trigger": "Scheduled", "startedAt": CREATED })).unwrap();
        assert_eq!(run.attempt, 1);
    }

    #[test]
    fn a_stale_copy_of_a_run_that_ended_here_waits_for_the_fresh_one() {
        let status = running(&after_run(RunResult::Succeeded), "r9");
        let d = decide(
            &import(Some(status), json!({})),
            &Observed { run_ended_here: true, ..seen("2026-03-02T12:00:00Z") },
        );
        assert!(d.status.is_none() && d.effects.is_empty());
        assert_eq!(d.requeue, Requeue::Soon);
    }

    #[test]
    fn a_run_cut_short_under_a_conflict_is_abandoned_through_the_run_end() {
        let status = running(&after_run(RunResult::Succeeded), "r9");
        let seen = Observed { winner: Some("growth/older"), ..seen("2026-03-02T12:00:00Z") };
        let d = decide(&import(Some(status), json!({})), &seen);
        let status = d.status.as_ref().unwrap();
        assert_eq!(status.current_run, None);
        let last = status.last_run.clone().unwrap();
        assert_eq!((last.id.as_str(), last.result), ("r9", RunResult::Failed));
        assert!(last.message.ends_with("not run again: another import owns the cohort now"), "{}", last.message);
        assert_eq!(ready(&d).1, "Conflict");
        assert!(
            matches!(&d.effects[..], [Effect::Announce(e), Effect::WarnOnChange { reason: "Conflict", .. }] if e.0.record == last)
        );
    }

    #[test]
    fn an_invalid_spec_stops_the_schedule_and_abandons_a_run() {
        let mut bad = import(Some(running(&after_run(RunResult::Succeeded), "r9")), json!({}));
        bad.spec.schedule.day_of_week = Some(crate::api::DayOfWeek::Monday);
        let errors = crate::domain::validate::validate(&bad.spec).unwrap_err();
        let d = desired(&bad, Err(NotPlanned::Invalid(&errors)), &seen("2026-03-02T12:00:00Z"));
        let (value, reason, message) = ready(&d);
        assert_eq!((value.as_str(), reason.as_str()), ("False", "InvalidSpec"));
        assert!(message.starts_with("Invalid spec: spec.schedule.dayOfWeek"), "{message}");
        let status = d.status.as_ref().unwrap();
        assert_eq!((status.next_run_at, status.current_run.as_ref()), (None, None));
        assert_eq!(status.last_run.as_ref().unwrap().result, RunResult::Failed);
        assert!(matches!(&d.effects[..], [Effect::Announce(_), Effect::WarnOnChange { reason: "InvalidSpec", .. }]));
        assert_eq!(d.requeue, Requeue::At(None));
    }

    #[test]
    fn secrets_are_checked_only_by_an_import_that_waits() {
        let idle = import(Some(after_run(RunResult::Succeeded)), json!({}));
        let valid = crate::domain::validate::validate(&idle.spec).unwrap();
        let d = SignedDuration::from_hours(1);
        assert!(checks_secrets(&idle, &plan_for(&idle, &valid, false, ts("2026-03-02T12:00:00Z"), d)));
        assert!(!checks_secrets(&idle, &plan_for(&idle, &valid, false, ts("2026-03-03T06:30:00Z"), d)), "runs");
        assert!(!checks_secrets(&idle, &plan_for(&idle, &valid, true, ts("2026-03-02T12:00:00Z"), d)), "held");
    }

    /// [`after_run`] of a run that failed and waits for its first retry at `at`.
    fn retry_pending(at: &str) -> CohortImportStatus {
        CohortImportStatus {
            next_retry_at: Some(ts(at)),
            retry_attempt: Some(1),
            next_run_at: Some(ts(at)),
            ..after_run(RunResult::Failed)
        }
    }

    fn stalled(d: &Desired) -> String {
        let status = d.status.as_ref().unwrap();
        status.conditions.iter().find(|c| c.type_ == crate::api::STALLED).unwrap().status.clone()
    }

    #[test]
    fn a_pending_retry_is_shown_as_the_next_run_and_waited_for() {
        let d = decide(&import(Some(retry_pending("2026-03-02T06:32:00Z")), json!({})), &seen("2026-03-02T06:31:05Z"));
        let (value, reason, message) = ready(&d);
        assert_eq!((value.as_str(), reason.as_str()), ("False", "RetryScheduled"));
        assert!(message.ends_with("retry 1 of 3 at 2026-03-02T06:32:00Z first (spec.retry)"), "{message}");
        assert_eq!(stalled(&d), "False", "the import gets better by itself");
        let status = d.status.as_ref().unwrap();
        assert_eq!(status.next_run_at, Some(ts("2026-03-02T06:32:00Z")), "kubectl get's NEXT RUN");
        assert_eq!((status.next_retry_at, status.retry_attempt), (Some(ts("2026-03-02T06:32:00Z")), Some(1)));
        assert_eq!(d.requeue, Requeue::At(Some(ts("2026-03-02T06:32:00Z"))));
        assert!(d.effects.is_empty());
    }

    #[test]
    fn a_due_retry_starts_a_run_of_its_own() {
        let d = decide(&import(Some(retry_pending("2026-03-02T06:32:00Z")), json!({})), &seen("2026-03-02T06:32:00Z"));
        let status = d.status.as_ref().unwrap();
        let run = status.current_run.clone().unwrap();
        assert_eq!((run.id.as_str(), run.trigger, run.attempt), ("20260302-063000-abcd", RunTrigger::Retry, 1));
        assert_eq!((status.next_retry_at, status.retry_attempt), (None, Some(1)), "counted until it ends");
        assert_eq!(status.next_run_at, Some(ts("2026-03-03T06:30:00Z")), "the slot again");
        assert_eq!(status.schedule, after_run(RunResult::Failed).schedule, "the schedule's cursor does not move");
        assert_eq!(ready(&d).1, "Running");
        assert!(matches!(&d.effects[..], [Effect::StartRun(r)] if *r == run));
    }

    #[test]
    fn a_requested_run_or_a_hold_replaces_a_pending_retry() {
        let request = json!({ RUN_REQUESTED_ANNOTATION: "now-1" });
        let d = decide(&import(Some(retry_pending("2026-03-02T06:40:00Z")), request), &seen("2026-03-02T06:35:00Z"));
        let status = d.status.unwrap();
        assert_eq!(status.current_run.unwrap().trigger, RunTrigger::Manual);
        assert_eq!((status.next_retry_at, status.retry_attempt), (None, None));

        let mut suspended = import(Some(retry_pending("2026-03-02T06:40:00Z")), json!({}));
        suspended.spec.suspend = true;
        let status = decide(&suspended, &seen("2026-03-02T06:35:00Z")).status.unwrap();
        assert_eq!((status.next_retry_at, status.retry_attempt, status.next_run_at), (None, None, None));
    }

    #[test]
    fn a_retry_lapses_when_spec_retry_no_longer_allows_it() {
        let mut off = import(Some(retry_pending("2026-03-02T06:40:00Z")), json!({}));
        off.spec.retry = Some(crate::api::RetrySpec { limit: 0, ..Default::default() });
        let d = decide(&off, &seen("2026-03-02T06:41:00Z"));
        let status = d.status.as_ref().unwrap();
        assert_eq!((status.current_run.as_ref(), status.next_retry_at), (None, None));
        assert_eq!(status.next_run_at, Some(ts("2026-03-03T06:30:00Z")));
        assert_eq!(ready(&d).1, "Failed");
        assert_eq!(stalled(&d), "True");
    }

    #[test]
    fn an_invalid_spec_drops_a_pending_retry() {
        let mut bad = import(Some(retry_pending("2026-03-02T06:40:00Z")), json!({}));
        bad.spec.schedule.day_of_week = Some(crate::api::DayOfWeek::Monday);
        let errors = crate::domain::validate::validate(&bad.spec).unwrap_err();
        let status = desired(&bad, Err(NotPlanned::Invalid(&errors)), &seen("2026-03-02T06:35:00Z")).status.unwrap();
        assert_eq!((status.next_retry_at, status.retry_attempt), (None, None));
    }

    #[test]
    fn a_run_abandoned_after_its_attempts_or_by_a_conflict_is_not_retried() {
        let mut status = running(&after_run(RunResult::Succeeded), "r9");
        status.current_run.as_mut().unwrap().attempt = 3;
        let d = decide(&import(Some(status.clone()), json!({})), &seen("2026-03-02T12:00:00Z"));
        let written = d.status.as_ref().unwrap();
        assert_eq!(written.last_run.as_ref().unwrap().result, RunResult::Failed);
        assert_eq!((written.next_retry_at, written.retry_attempt), (None, None), "a crash loop needs a person");
        assert_eq!(ready(&d).1, "Failed");

        let conflict = Observed { winner: Some("growth/older"), ..seen("2026-03-02T12:00:00Z") };
        let written = decide(&import(Some(status), json!({})), &conflict).status.unwrap();
        assert_eq!((written.next_retry_at, written.retry_attempt), (None, None));
    }
}
