//! One reconcile of one import: fetch what it refers to → validate (pure) → plan (pure) →
//! apply (write status, start a run) → requeue at the next run time.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use tracing::{debug, info, warn};

use super::Context;
use super::conflict::{self, CohortKey};
use super::events::reason as event;
use super::importer::RunJob;
use super::runs;
use super::secrets::{self, KeyError};
use super::status::{self, Written, idle_ready, reason, record_run, rfc3339, set_ready};
use crate::api::{
    APPROVE_REMOVALS_ANNOTATION, CohortImport, CohortImportStatus, CurrentRun, DeletionPolicy, FINALIZER,
    RUN_REQUESTED_ANNOTATION, RunRecord, RunResult, RunTrigger, ScheduleStatus, SecretKeyRef,
};
use crate::domain::plan::{Decision, Hold, PlanInput, ScheduleCursor, plan};
use crate::domain::validate::validate;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("deleting: {0}")]
    Cleanup(String),
}

impl Error {
    /// Label for the reconcile error metric.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "Kube",
            Error::Finalizer(_) => "Finalizer",
            Error::Cleanup(_) => "Cleanup",
        }
    }
}

/// Entry point for the controller.
pub async fn reconcile(import: Arc<CohortImport>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let reference = ObjectRef::from_obj(import.as_ref());
    if ctx.runs.is_running(&reference) {
        // The run reconciles the import when it ends.
        return Ok(Action::await_change());
    }
    let namespace = import.namespace().unwrap_or_default();
    let api: Api<CohortImport> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, import, |step| async {
        match step {
            Finalizer::Apply(import) => apply(import, &ctx, &api).await,
            Finalizer::Cleanup(import) => cleanup(import, &ctx, &api).await,
        }
    })
    .await
    .or_else(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => Err(e),
        // The finalizer patch tests the list it read; a stale copy fails the test (422/409)
        // and the newer copy is on its way.
        kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
        | kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s))
            if s.code == 422 || s.code == 409 =>
        {
            Ok(retry_soon())
        }
        other => Err(Error::Finalizer(Box::new(other))),
    })
}

pub fn error_policy(import: Arc<CohortImport>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(namespace = %import.namespace().unwrap_or_default(), import = %import.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_error(error.metric_reason());
    Action::requeue(ctx.config.error_requeue)
}

/// Waits until `at` by the controller's clock.
fn requeue_at(ctx: &Context, at: Option<Timestamp>) -> Action {
    match at {
        Some(at) => {
            let wait = at.duration_since(ctx.clock.now());
            let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
            Action::requeue(wait)
        }
        None => Action::await_change(),
    }
}

/// A status computed from a stale copy was refused; the newer copy is on its way.
fn retry_soon() -> Action {
    Action::requeue(Duration::from_millis(200))
}

/// [`status::write`]; `None` when it was refused as computed from a stale copy (the caller
/// then returns [`retry_soon`]).
async fn write_status(
    api: &Api<CohortImport>,
    import: &CohortImport,
    desired: &CohortImportStatus,
) -> Result<Option<Written>, Error> {
    match status::write(api, import, desired).await {
        Ok(written) => Ok(Some(written)),
        Err(e) if status::is_stale_write(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The API server always sets the creation time; `now` stands in for an object without one.
fn created(import: &CohortImport, now: Timestamp) -> Timestamp {
    import.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0)
}

fn to_cursor(status: &ScheduleStatus) -> ScheduleCursor {
    ScheduleCursor {
        description: status.description.clone(),
        handled_through: status.handled_through.as_deref().and_then(|t| t.parse().ok()),
    }
}

fn from_cursor(cursor: &ScheduleCursor) -> ScheduleStatus {
    ScheduleStatus {
        description: cursor.description.clone(),
        handled_through: cursor.handled_through.map(rfc3339),
    }
}

async fn apply(import: Arc<CohortImport>, ctx: &Arc<Context>, api: &Api<CohortImport>) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let reference = ObjectRef::from_obj(import.as_ref());
    let generation = import.metadata.generation;
    let current = import.status.clone().unwrap_or_default();
    let mut desired = current.clone();
    desired.observed_generation = generation;
    let previous_reason = status::ready_reason(import.status.as_ref()).map(str::to_owned);

    // Validate (pure).
    let valid = match validate(&import.spec) {
        Ok(valid) => valid,
        Err(errors) => {
            ctx.note_conflict(&reference, None);
            if let Some(run) = desired.current_run.take() {
                record_interrupted(&mut desired, &import, run, now, "the spec became invalid");
            }
            desired.next_run_at = None;
            let message = format!("Invalid spec: {errors}");
            set_ready(&mut desired, "False", reason::INVALID_SPEC, &message, generation, now);
            let event = Some((event::INVALID_SPEC, "Validate", message));
            return write_then(api, &import, &desired, previous_reason.as_deref(), ctx, None, event).await;
        }
    };

    // One active schedule per cohort.
    let imports = ctx.imports();
    let winner = conflict::winner(&import, imports.iter().map(|i| i.as_ref())).map(|w| {
        (ObjectRef::from_obj(w), format!("{}/{}", w.namespace().unwrap_or_default(), w.name_any()))
    });
    ctx.note_conflict(&reference, winner.as_ref().map(|(r, _)| r.clone()));

    // A run recorded as started but not running here was cut short (restart, failover) —
    // unless it ended here a moment ago and this copy of the import predates its record.
    if let Some(run) = desired.current_run.clone() {
        if ctx.runs.is_recorded(&reference, &run.id) {
            return Ok(retry_soon());
        }
        // Sharded: a run that came with an import from another shard waits until it stopped there.
        if let Some(wait) = ctx.handoff_wait(&import, &run).await {
            return Ok(wait);
        }
        if winner.is_none() {
            let job = RunJob {
                run_id: run.id.clone(),
                trigger: run.trigger,
                started_at: now,
                approved_removals: run.approved_removals.clone(),
            };
            return start_run(ctx, api, import, desired, job, true).await;
        }
        desired.current_run = None;
        record_interrupted(&mut desired, &import, run, now, "another import owns the cohort now");
    }

    let hold = if winner.is_some() {
        Some(Hold::Conflict)
    } else if import.spec.suspend {
        Some(Hold::Suspended)
    } else {
        None
    };
    let annotations = import.annotations();
    let approved_blocked_run = annotations.get(APPROVE_REMOVALS_ANNOTATION).map(String::as_str).filter(|approved| {
        current.last_run.as_ref().is_some_and(|run| run.result == RunResult::Blocked && run.id == *approved)
    });
    let cursor = current.schedule.as_ref().map(to_cursor);
    let input = PlanInput {
        now,
        created: created(&import, now),
        schedule: &valid.schedule,
        hold,
        starting_deadline: ctx.config.starting_deadline,
        run_request: annotations.get(RUN_REQUESTED_ANNOTATION).map(String::as_str),
        last_handled_run_request: current.last_handled_run_request.as_deref(),
        approved_blocked_run,
        cursor: cursor.as_ref(),
        has_run_before: current.last_run.is_some() || !current.history.is_empty(),
    };
    let plan = plan(&input);
    debug!(decision = ?plan.decision, next_run_at = ?plan.next_run_at, "planned");
    desired.schedule = Some(from_cursor(&plan.cursor));
    desired.next_run_at = plan.next_run_at.map(rfc3339);

    match plan.decision {
        Decision::Run { trigger, run_request, approved_removals } => {
            if let Some(request) = run_request {
                desired.last_handled_run_request = Some(request);
            }
            let job = RunJob { run_id: crate::run::report::new_run_id(now), trigger, started_at: now, approved_removals };
            start_run(ctx, api, import, desired, job, false).await
        }
        Decision::RecordMissed { slot } => {
            let record = RunRecord {
                id: crate::run::report::new_run_id(slot),
                trigger: RunTrigger::Scheduled,
                started_at: rfc3339(slot),
                finished_at: None,
                result: RunResult::Missed,
                cohort_size: 0,
                added: 0,
                removed: 0,
                message: format!(
                    "not run: the operator was not running at {}, and by the time it was, the starting deadline ({}) had passed",
                    rfc3339(slot),
                    humanize(ctx.config.starting_deadline)
                ),
            };
            let previous_history = current.history.clone();
            record_run(&mut desired, record.clone(), import.spec.history_limit);
            let (value, why, message) = idle_ready(&desired, plan.next_run_at);
            set_ready(&mut desired, value, why, &message, generation, now);
            if write_status(api, &import, &desired).await?.is_none() {
                return Ok(retry_soon());
            }
            warn!(run_id = %record.id, "scheduled run missed");
            ctx.metrics.run_finished(RunResult::Missed, 0.0, 0, 0);
            ctx.events
                .warning(&import, event::RUN_MISSED, "Run", format!("Run {}: {}", record.id, record.message))
                .await;
            runs::notify(ctx, &import, &record, &previous_history, plan.next_run_at, None);
            Ok(requeue_at(ctx, plan.next_run_at))
        }
        Decision::Wait => {
            let event = match check_secrets(ctx, &import).await {
                Err(e) => {
                    let message = format!("{e}; {}", status::next_run_text(plan.next_run_at));
                    set_ready(&mut desired, "False", e.reason(), &message, generation, now);
                    // A missing Secret is the user's to fix; a failed API read is not.
                    (e.reason() == reason::SECRET_NOT_FOUND).then_some((event::SECRET_NOT_FOUND, "Check", message))
                }
                Ok(()) => {
                    let (value, why, message) = idle_ready(&desired, plan.next_run_at);
                    set_ready(&mut desired, value, why, &message, generation, now);
                    None
                }
            };
            write_then(api, &import, &desired, previous_reason.as_deref(), ctx, plan.next_run_at, event).await
        }
        Decision::Held { hold: Hold::Suspended, pending_request } => {
            let mut message = "Suspended: no runs until spec.suspend is false".to_owned();
            if pending_request {
                message.push_str("; the requested run waits until then");
            }
            set_ready(&mut desired, "False", reason::SUSPENDED, &message, generation, now);
            write_then(api, &import, &desired, previous_reason.as_deref(), ctx, None, None).await
        }
        Decision::Held { hold: Hold::Conflict, pending_request } => {
            let (_, winner_name) = winner.expect("a conflict has a winner");
            let mut message = format!(
                "Conflict: {} is already imported by {winner_name}, which is older; this import does not run while both exist",
                CohortKey::of(&import.spec)
            );
            if pending_request {
                message.push_str("; the requested run waits until then");
            }
            set_ready(&mut desired, "False", reason::CONFLICT, &message, generation, now);
            let event = Some((event::CONFLICT, "Schedule", message));
            write_then(api, &import, &desired, previous_reason.as_deref(), ctx, None, event).await
        }
    }
}

/// A warning Event: reason, action, note.
type TransitionEvent = Option<(&'static str, &'static str, String)>;

/// Writes `desired` if it differs; when the `Ready` reason changed, publishes `event`.
/// Requeues at `next`.
async fn write_then(
    api: &Api<CohortImport>,
    import: &CohortImport,
    desired: &CohortImportStatus,
    previous_reason: Option<&str>,
    ctx: &Arc<Context>,
    next: Option<Timestamp>,
    event: TransitionEvent,
) -> Result<Action, Error> {
    match write_status(api, import, desired).await? {
        None => return Ok(retry_soon()),
        Some(Written::Applied) => {
            if let Some((why, action, note)) = event
                && status::ready_reason(Some(desired)) != previous_reason
            {
                ctx.events.warning(import, why, action, note).await;
            }
        }
        Some(Written::Unchanged) => {}
    }
    Ok(requeue_at(ctx, next))
}

/// Records the run in progress in status first, then starts it: an operator that stops
/// in the middle finds it there and runs it again (`resumed`).
async fn start_run(
    ctx: &Arc<Context>,
    api: &Api<CohortImport>,
    import: Arc<CohortImport>,
    mut desired: CohortImportStatus,
    job: RunJob,
    resumed: bool,
) -> Result<Action, Error> {
    let mut run = CurrentRun {
        id: job.run_id.clone(),
        trigger: job.trigger,
        started_at: rfc3339(job.started_at),
        approved_removals: job.approved_removals.clone(),
        runner_shard: None,
        runner_lease: None,
        runner_identity: None,
    };
    run.set_runner(ctx.runner());
    desired.current_run = Some(run);
    let message = format!("Run {} ({:?}) started at {}", job.run_id, job.trigger, rfc3339(job.started_at));
    set_ready(&mut desired, "Unknown", reason::RUNNING, &message, import.metadata.generation, job.started_at);
    if write_status(api, &import, &desired).await?.is_none() {
        return Ok(retry_soon());
    }
    if resumed {
        info!(run_id = %job.run_id, "run was interrupted; running it again");
        let note = format!("Run {} was interrupted (operator restart or failover); running it again", job.run_id);
        ctx.events.warning(&import, event::RUN_INTERRUPTED, "Run", note).await;
    }
    runs::start(ctx, import, job);
    Ok(Action::await_change())
}

fn record_interrupted(
    status: &mut CohortImportStatus,
    import: &CohortImport,
    run: CurrentRun,
    now: Timestamp,
    why: &str,
) {
    let record = RunRecord {
        id: run.id,
        trigger: run.trigger,
        started_at: run.started_at,
        finished_at: Some(rfc3339(now)),
        result: RunResult::Failed,
        cohort_size: 0,
        added: 0,
        removed: 0,
        message: format!("interrupted by an operator restart and not run again: {why}"),
    };
    record_run(status, record, import.spec.history_limit);
}

fn humanize(d: jiff::SignedDuration) -> String {
    let secs = d.as_secs();
    if secs % 3600 == 0 {
        format!("{} h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// Every Secret key the import reads exists (values are read only at run time).
async fn check_secrets(ctx: &Context, import: &CohortImport) -> Result<(), KeyError> {
    let namespace = import.namespace().unwrap_or_default();
    secrets::braze_keys(&ctx.client, &namespace, &import.spec.destination.braze, &ctx.config.partner_keys).await?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    for secret in conflict::source_secrets(&import.spec) {
        let reference = SecretKeyRef { name: secret.name.to_owned(), key: secret.key.to_owned() };
        secrets::secret_value(&api, &namespace, &reference, secret.field).await?;
    }
    Ok(())
}

/// The import is being deleted: carry out `deletionPolicy`, then let it go.
///
/// A failure (Braze refusing a revoked key, a Secret already gone with its namespace) is
/// retried after `error_requeue` for as long as it lasts; the Event and `Ready` say first how
/// to let the import go without it, so that the advice survives their length limits.
async fn cleanup(import: Arc<CohortImport>, ctx: &Arc<Context>, api: &Api<CohortImport>) -> Result<Action, Error> {
    let reference = ObjectRef::from_obj(import.as_ref());
    let namespace = import.namespace().unwrap_or_default();
    let imports = ctx.imports();
    let winner = conflict::winner(&import, imports.iter().map(|i| i.as_ref()));
    let policy = import.spec.deletion_policy;
    // When the cohort belongs to another import, its members are left alone.
    let removing = policy == DeletionPolicy::RemoveMembers && winner.is_none();
    let outcome = if removing { remove_members(ctx, &import).await } else { ctx.importer.forget(&import).await };
    if let Err(cause) = outcome {
        let name = import.name_any();
        let way_out = if removing {
            format!(
                "To delete the import and leave its members in the Braze cohort, set spec.deletionPolicy to Retain: \
                 kubectl patch cohortimport {name} -n {namespace} --type merge -p '{{\"spec\":{{\"deletionPolicy\":\"Retain\"}}}}'"
            )
        } else {
            format!(
                "Its snapshot could not be deleted; to let the import go anyway and leave the snapshot behind, \
                 remove the finalizer {FINALIZER} from it"
            )
        };
        let message = format!("deletionPolicy {policy:?} could not complete and is retried. {way_out}. Cause: {cause}");
        ctx.events.warning(&import, event::CLEANUP_FAILED, "Delete", message.clone()).await;
        let mut desired = import.status.clone().unwrap_or_default();
        set_ready(&mut desired, "False", reason::DELETING, &message, import.metadata.generation, ctx.clock.now());
        if let Err(e) = status::write(api, &import, &desired).await {
            debug!(error = %e, "could not record the failed cleanup");
        }
        return Err(Error::Cleanup(message));
    }
    ctx.note_conflict(&reference, None);
    ctx.runs.forget(&reference);
    ctx.metrics.forget(&namespace, &import.name_any());
    Ok(Action::await_change())
}

/// `RemoveMembers`: removes from Braze every member the import sent, and says so.
async fn remove_members(ctx: &Context, import: &CohortImport) -> Result<(), String> {
    let namespace = import.namespace().unwrap_or_default();
    let keys = secrets::braze_keys(&ctx.client, &namespace, &import.spec.destination.braze, &ctx.config.partner_keys)
        .await
        .map_err(|e| e.to_string())?;
    let removed = ctx.importer.remove_members(import, keys).await?;
    let note = format!("Removed the {removed} members this import sent from {}", CohortKey::of(&import.spec));
    ctx.events.normal(import, event::MEMBERS_REMOVED, "Delete", note).await;
    Ok(())
}
