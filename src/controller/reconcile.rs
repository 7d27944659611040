//! One reconcile of one import, as a pipeline: fetch what it depends on → validate (pure) →
//! plan (pure) → decide the status and effects ([`super::desired`], pure) → apply them
//! (write status, then Events, announcements, a run) → requeue at the next run time.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::{debug, warn};

use super::conflict::{self, CohortKey};
use super::context::Context;
use super::desired::{self, Desired, Effect, NotPlanned, Observed, Requeue};
use super::destinations::{Refusal, Unresolved};
use super::events::reason as event;
use super::importer::ImportError;
use super::record;
use super::runs;
use super::secrets::{self, CheckedKey, KeyError, PartnerKeys, SecretChecks};
use super::status::{self, Written, ready_reason, set_ready};
use crate::api::{
    CohortImport, CohortImportStatus, DeletionPolicy, DeliveryMethod, FINALIZER, ReadyReason, RunResult, SecretKeyRef,
};
use crate::domain::validate::{Limits, ValidSpec, validate_with};
use crate::run::RemovalError;
use crate::source::SourceContext;
use crate::source::kube::KubeObjects;

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
    // The per-import gauges come from status, on every reconcile: at start-up, after a
    // failover and after each status write (its watch event reconciles again).
    if import.metadata.deletion_timestamp.is_none() {
        ctx.metrics.observe(&import.namespace().unwrap_or_default(), &import.name_any(), import.status.as_ref());
    }
    let reference = ObjectRef::from_obj(import.as_ref());
    if ctx.runs.is_running(&reference) {
        // The run reconciles the import when it ends.
        return Ok(Action::await_change());
    }
    let namespace = import.namespace().unwrap_or_default();
    let api: Api<CohortImport> = Api::namespaced(ctx.client.clone(), &namespace);
    // A shared destination is resolved first, so that everything after — a run, a deletion —
    // sees the workspace as if it were written inline.
    let (import, refusal) = match ctx.watched.catalog.effective(&import) {
        Ok(effective) => (effective, None),
        Err(Unresolved::NotSynced) => return Ok(Action::requeue(Duration::from_secs(1))),
        Err(Unresolved::Refused(refusal)) => (import, Some(refusal)),
    };
    let result = finalize(import, refusal, &ctx, &api).await;
    if result.is_ok() {
        ctx.watched.note_reconcile(&reference, false);
    }
    result
}

/// The finalizer is added when an import's first run starts ([`execute`]): an import that
/// never ran holds no snapshot and sent nobody to Braze, so it goes at once when deleted,
/// and scheduling an import costs one status write, not a finalizer patch too. With the
/// finalizer, kube-rs's helper applies or cleans up and then lets it go.
async fn finalize(
    import: Arc<CohortImport>,
    refusal: Option<Refusal>,
    ctx: &Arc<Context>,
    api: &Api<CohortImport>,
) -> Result<Action, Error> {
    if import.metadata.deletion_timestamp.is_none() && !has_finalizer(&import) {
        return apply(import, refusal.as_ref(), ctx, api).await;
    }
    finalizer(api, FINALIZER, import, |step| async {
        match step {
            Finalizer::Apply(import) => apply(import, refusal.as_ref(), ctx, api).await,
            Finalizer::Cleanup(import) => cleanup(import, ctx, api).await,
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
    let failures = ctx.watched.note_reconcile(&ObjectRef::from_obj(import.as_ref()), true);
    Action::requeue(error_backoff(ctx.config.error_requeue, failures, rand::random::<f64>()))
}

/// Longest wait after failed reconciles, however many.
const ERROR_BACKOFF_CAP: Duration = Duration::from_secs(600);

/// The wait after the `failures`-th failed reconcile in a row: `base` doubled each time up to
/// [`ERROR_BACKOFF_CAP`], with equal jitter (`jitter` in [0, 1) picks a point in its upper
/// half), so a lasting failure — a revoked key, an API server refusing — is not retried
/// every few seconds forever, and many imports failing at once spread out. Pure.
pub fn error_backoff(base: Duration, failures: u32, jitter: f64) -> Duration {
    let doubled = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let full = doubled.min(ERROR_BACKOFF_CAP).max(base.min(ERROR_BACKOFF_CAP));
    full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// Waits from `now` until `at`.
fn requeue_at(now: Timestamp, at: Option<Timestamp>) -> Action {
    match at {
        Some(at) => {
            let wait = at.duration_since(now);
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

/// Reconciles `import` (its destination resolved, or `refusal` saying why it may not be used).
async fn apply(
    import: Arc<CohortImport>,
    refusal: Option<&Refusal>,
    ctx: &Arc<Context>,
    api: &Api<CohortImport>,
) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let reference = ObjectRef::from_obj(import.as_ref());
    let valid = validate_with(&import.spec, &ctx.config.limits);
    // One active schedule per cohort.
    let (winner, workspace) = match (&valid, refusal) {
        (Ok(_), None) => {
            let imports = ctx.watched.imports_of(&CohortKey::of(&import.spec));
            winner(&import, &imports, &ctx.client, &ctx.secret_checks, &ctx.config.limits).await
        }
        _ => (None, None),
    };
    ctx.watched.note_conflict(&reference, winner.as_ref().map(|(w, _)| w.clone()));
    let deadline = ctx.config.starting_deadline;
    let plan = match (refusal, &valid) {
        (Some(refusal), _) => Err(NotPlanned::Refused(refusal)),
        (None, Err(errors)) => Err(NotPlanned::Invalid(errors)),
        (None, Ok(v)) => Ok(desired::plan_for(&import, v, winner.is_some(), now, deadline)),
    };
    if let Ok(plan) = &plan {
        debug!(decision = ?plan.decision, next_run_at = ?plan.next_run_at, "planned");
    }
    let secrets = match &plan {
        Ok(plan) if desired::checks_secrets(&import, plan) => {
            Some(check_secrets(&ctx.secret_checks, &ctx.client, &ctx.config.partner_keys, &import).await)
        }
        _ => None,
    };
    let run_ended_here = import
        .status
        .as_ref()
        .and_then(|s| s.current_run.as_ref())
        .is_some_and(|run| ctx.runs.is_recorded(&reference, &run.id));
    // Sharded: a run that came with an import from another shard waits until it stopped there.
    if let Some(run) = import.status.as_ref().and_then(|s| s.current_run.as_ref()).filter(|_| !run_ended_here)
        && let Some(wait) = ctx.handover.handoff_wait(&import, run).await
    {
        return Ok(wait);
    }
    let seen = Observed {
        now,
        starting_deadline: deadline,
        max_run_attempts: ctx.config.max_run_attempts,
        winner: winner.as_ref().map(|(_, name)| name.as_str()),
        run_ended_here,
        workspace: workspace.as_deref(),
        secrets: secrets.as_ref(),
        source_kind: valid.as_ref().ok().map(|v| v.source.kind()),
        new_run_id: crate::run::new_run_id(now),
        runner: ctx.handover.runner(),
    };
    let wanted = desired::desired(&import, plan.as_ref().map_err(|e| *e), &seen);
    execute(ctx, api, import, valid.ok().filter(|_| refusal.is_none()), wanted).await
}

/// The import that owns `import`'s cohort, if another: its reference and how a message
/// names it ([`conflict::winner_label`]). Also `import`'s Braze workspace, when it had to be
/// read: only if another import holding the cohort has one to compare with (a Secret read
/// is not worth it otherwise; a run records it anyway).
async fn winner(
    import: &CohortImport,
    imports: &[Arc<CohortImport>],
    client: &kube::Client,
    checks: &SecretChecks,
    limits: &Limits,
) -> (Option<(ObjectRef<CohortImport>, String)>, Option<String>) {
    let contenders = conflict::contenders(import, imports.iter().map(|i| i.as_ref()), limits);
    let mut workspace = None;
    if conflict::needs_workspace(&contenders) {
        let namespace = import.namespace().unwrap_or_default();
        let workspace_of = async {
            let braze = secrets::Workspace::of(&import.spec.destination, &namespace)?;
            secrets::data_import_workspace(client, checks, braze).await
        };
        match workspace_of.await {
            Ok(w) => workspace = Some(w),
            // Unknown counts as the same workspace: when in doubt, hold.
            Err(e) => debug!(error = %e, "cannot tell the Braze workspace; assuming the other import's"),
        }
    }
    let winner = conflict::pick(contenders, workspace.as_deref())
        .map(|w| (ObjectRef::from_obj(w), conflict::winner_label(import, w)));
    (winner, workspace)
}

/// Writes the desired status, then carries out the effects in order, then requeues.
async fn execute(
    ctx: &Arc<Context>,
    api: &Api<CohortImport>,
    import: Arc<CohortImport>,
    valid: Option<ValidSpec>,
    wanted: Desired,
) -> Result<Action, Error> {
    let previous_reason = ready_reason(import.status.as_ref()).map(str::to_owned);
    // A run is about to start: from now on a deletion has something to clean up.
    let starts_run = wanted.effects.iter().any(|e| matches!(e, Effect::StartRun(_)));
    let import = if starts_run && !has_finalizer(&import) {
        match add_finalizer(api, &import).await {
            // The same spec (the patch is conditional on the copy read), with the shared
            // destination it resolved to: the run must not lose it.
            Ok(mut patched) => {
                patched.spec.destination.resolved = import.spec.destination.resolved.clone();
                Arc::new(patched)
            }
            Err(e) if status::is_stale_write(&e) => return Ok(retry_soon()),
            Err(e) => return Err(e.into()),
        }
    } else {
        import
    };
    let written = match &wanted.status {
        None => None,
        Some(status) => match write_status(api, &import, status).await? {
            None => return Ok(retry_soon()),
            Some(written) => Some(written),
        },
    };
    let reason_changed =
        written == Some(Written::Applied) && ready_reason(wanted.status.as_ref()) != previous_reason.as_deref();
    for effect in wanted.effects {
        match effect {
            Effect::WarnOnChange { reason, action, note } if reason_changed => {
                ctx.events.warning(&import, reason, action, note).await
            }
            Effect::WarnOnChange { .. } => {}
            Effect::Warn { reason, action, note } => ctx.events.warning(&import, reason, action, note).await,
            Effect::Announce(ended) => record::announce(&ctx.reporter, &import, &ended.0, &ended.1).await,
            Effect::StartRun(run) => match valid.clone() {
                Some(spec) => runs::start(ctx, import.clone(), spec, run),
                None => warn!(run_id = %run.id, "not starting a run of an invalid spec"),
            },
        }
    }
    Ok(match wanted.requeue {
        Requeue::Soon => retry_soon(),
        Requeue::At(at) => {
            let status = wanted.status.as_ref().or(import.status.as_ref());
            let at = match status {
                Some(status) => super::secret_recheck::recheck_at(&ctx.config, status, ctx.clock.now(), at),
                None => at,
            };
            requeue_at(ctx.clock.now(), at)
        }
    })
}

fn has_finalizer(import: &CohortImport) -> bool {
    import.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer to `import` as read (a copy gone stale meanwhile is refused with 409,
/// as kube-rs's helper is; the newer copy is on its way). Returns the import as written, for
/// the status write that follows to be conditioned on.
async fn add_finalizer(api: &Api<CohortImport>, import: &CohortImport) -> Result<CohortImport, kube::Error> {
    let mut finalizers = import.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": import.resource_version() } });
    api.patch(&import.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await
}

/// Every Secret key the import reads exists (values are read only at run time). A key found
/// before is not read again until the Secret watch sees its Secret change
/// ([`secrets::SecretChecks`]). The Braze keys are read where the workspace keeps them (a
/// ClusterBrazeDestination's namespace), the source's in the import's namespace.
async fn check_secrets(
    checks: &SecretChecks,
    client: &kube::Client,
    partner_keys: &PartnerKeys,
    import: &CohortImport,
) -> Result<(), KeyError> {
    let namespace = import.namespace().unwrap_or_default();
    let workspace = secrets::Workspace::of(&import.spec.destination, &namespace)?;
    let braze_objects = KubeObjects::new(client.clone(), workspace.secret_namespace);
    let keys = checked_keys(import, workspace);
    let (workspace_key, others) = keys.split_first().expect("an import always reads its workspace's key");
    check_key(checks, &braze_objects, workspace_key).await?;
    let braze = workspace.braze;
    if braze.method == DeliveryMethod::CohortImport && braze.partner_api_key_secret_ref.is_none() {
        partner_keys.key_for(&braze.rest_endpoint).await?;
    }
    let objects = KubeObjects::new(client.clone(), namespace);
    for key in others {
        let objects = if key.braze { &braze_objects } else { &objects };
        check_key(checks, objects, key).await?;
    }
    Ok(())
}

async fn check_key(checks: &SecretChecks, objects: &KubeObjects, key: &CheckedKey) -> Result<(), KeyError> {
    let namespace = objects.namespace();
    if !checks.is_present(namespace, &key.reference) {
        secrets::check_key(objects, key, checks).await?;
    }
    Ok(())
}

/// The Secret keys `import` reads: its Braze keys first (the workspace's key leading),
/// then its source's. Only the keys of its method: validation refuses the others.
fn checked_keys(import: &CohortImport, workspace: secrets::Workspace<'_>) -> Vec<CheckedKey> {
    let mut keys: Vec<CheckedKey> = workspace
        .key_refs()
        .into_iter()
        .map(|(reference, field)| CheckedKey { reference: reference.clone(), field, braze: true })
        .collect();
    for secret in conflict::source_secrets(&import.spec) {
        let reference = SecretKeyRef { name: secret.name.to_owned(), key: secret.key.to_owned() };
        keys.push(CheckedKey { reference, field: secret.field, braze: false });
    }
    keys
}

/// The import is being deleted: carry out `deletionPolicy`, then let it go.
///
/// A failure (Braze refusing a revoked key, a Secret already gone with its namespace) is
/// retried after `error_requeue` for as long as it lasts; the Event and `Ready` say first how
/// to let the import go without it, so that the advice survives their length limits.
async fn cleanup(import: Arc<CohortImport>, ctx: &Arc<Context>, api: &Api<CohortImport>) -> Result<Action, Error> {
    let reference = ObjectRef::from_obj(import.as_ref());
    let imports = ctx.watched.imports_of(&CohortKey::of(&import.spec));
    let workspace = import.status.as_ref().and_then(|s| s.braze_workspace.as_deref());
    let winner = conflict::winner(&import, workspace, imports.iter().map(|i| i.as_ref()));
    let policy = import.spec.deletion_policy;
    // When the cohort belongs to another import, its members are left alone.
    let removing = policy == DeletionPolicy::RemoveMembers && winner.is_none();
    let outcome = if removing { remove_members(ctx, &import).await } else { ctx.importer.forget(&import).await };
    if let Err(cause) = outcome {
        let message = cleanup_failed(&import, removing, &cause);
        ctx.events.warning(&import, event::CLEANUP_FAILED, "Delete", message.clone()).await;
        let mut desired = import.status.clone().unwrap_or_default();
        set_ready(&mut desired, ReadyReason::Deleting, &message, import.metadata.generation, ctx.clock.now());
        if let Err(e) = status::write(api, &import, &desired).await {
            debug!(error = %e, "could not record the failed cleanup");
        }
        return Err(Error::Cleanup(message));
    }
    ctx.forget(&reference);
    ctx.runs.forget(&reference);
    Ok(Action::await_change())
}

/// Why `deletionPolicy` could not complete, starting with the way out.
fn cleanup_failed(import: &CohortImport, removing: bool, cause: &ImportError) -> String {
    let (name, namespace) = (import.name_any(), import.namespace().unwrap_or_default());
    let way_out = if removing {
        format!(
            "To delete the import and leave its members in the Braze cohort, set spec.deletionPolicy to Retain: \
             kubectl patch cohortimport {name} -n {namespace} --type merge -p '{{\"spec\":{{\"deletionPolicy\":\"Retain\"}}}}'"
        )
    } else {
        format!(
            "Its snapshot could not be released (kept for a later import of the cohort); to let the import go \
             anyway, remove the finalizer {FINALIZER} from it"
        )
    };
    let policy = import.spec.deletion_policy;
    format!("deletionPolicy {policy:?} could not complete and is retried. {way_out}. Cause: {cause}")
}

/// `RemoveMembers`: removes from Braze every member the import sent, and says so.
async fn remove_members(ctx: &Context, import: &CohortImport) -> Result<(), ImportError> {
    let namespace = import.namespace().unwrap_or_default();
    let workspace = secrets::Workspace::of(&import.spec.destination, &namespace)?;
    let keys = secrets::braze_keys(&ctx.client, &ctx.secret_checks, workspace, &ctx.config.partner_keys).await?;
    let cohort = CohortKey::of(&import.spec);
    let note = match ctx.importer.remove_members(import, keys).await {
        Ok(removed) => format!("Removed the {removed} members this import sent from {cohort}"),
        Err(ImportError::Removal(RemovalError::NoSnapshot { what })) => {
            if let Some(evidence) = sent_members(import.status.as_ref()) {
                return Err(RemovalError::SnapshotLost { what, evidence }.into());
            }
            ctx.importer.forget(import).await?;
            format!(
                "Nothing to remove from {cohort}: this import never committed a member to Braze (no successful run \
                 in its status) and holds no snapshot"
            )
        }
        Err(e) => return Err(e),
    };
    ctx.events.normal(import, event::MEMBERS_REMOVED, "Delete", note).await;
    Ok(())
}

/// What in `status` shows that the import sent members to Braze, if anything: a recorded
/// commit, or a run that added members. Status from before commits were recorded has
/// only the runs (and of those, only the history kept).
fn sent_members(status: Option<&CohortImportStatus>) -> Option<String> {
    let status = status?;
    if let Some(committed) = &status.committed_snapshot {
        return Some(format!(
            "status records snapshot generation {} of {} members committed",
            committed.generation, committed.members
        ));
    }
    let runs = status.last_run.iter().chain(status.history.iter());
    // A dry run or a blocked run sends nothing, whatever it counted.
    let sent = runs.filter(|r| match r.result {
        RunResult::Succeeded => r.added > 0 || r.cohort_size > 0,
        RunResult::Failed => r.added > 0,
        RunResult::DryRun | RunResult::Blocked | RunResult::Missed => false,
    });
    let run = sent
        .max_by_key(|r| r.cohort_size.max(r.added))
        .map(|r| format!("status records run {} ({:?}, cohort of {}, +{})", r.id, r.result, r.cohort_size, r.added));
    // The history is bounded: a successful run may have left it, but not this time.
    run.or_else(|| status.last_successful_run_at.map(|at| format!("status records a successful run at {at}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{RunRecord, RunTrigger};

    fn run(id: &str, result: RunResult, cohort_size: u64, added: u64) -> RunRecord {
        RunRecord {
            attempt: None,
            id: id.into(),
            trigger: RunTrigger::Manual,
            started_at: "2026-03-02T06:30:00Z".parse().unwrap(),
            finished_at: None,
            result,
            cohort_size,
            added,
            removed: 0,
            message: String::new(),
            would_add: None,
            would_remove: None,
        }
    }

    #[test]
    fn members_were_sent_only_by_a_run_that_sent_them() {
        assert_eq!(sent_members(None), None);
        let nothing = CohortImportStatus {
            history: vec![
                run("dry", RunResult::DryRun, 5, 5),
                run("blocked", RunResult::Blocked, 5, 5),
                run("failed", RunResult::Failed, 0, 0),
                run("empty", RunResult::Succeeded, 0, 0),
            ],
            ..Default::default()
        };
        assert_eq!(sent_members(Some(&nothing)), None, "no run sent anyone");
        let aged_out = CohortImportStatus {
            last_successful_run_at: Some("2026-03-01T06:31:00Z".parse().unwrap()),
            ..nothing.clone()
        };
        let evidence = sent_members(Some(&aged_out)).unwrap();
        assert_eq!(evidence, "status records a successful run at 2026-03-01T06:31:00Z");
        let mut sent = nothing.clone();
        sent.history.push(run("r1", RunResult::Succeeded, 1500, 0));
        sent.last_run = Some(run("r2", RunResult::Failed, 0, 3));
        let evidence = sent_members(Some(&sent)).unwrap();
        assert_eq!(evidence, "status records run r1 (Succeeded, cohort of 1500, +0)");
        // A recorded commit says it best, whatever the history kept.
        let committed =
            crate::api::CommittedSnapshot { key: "s1-x".into(), generation: 4, members: 1500, digest: None };
        let recorded = CohortImportStatus { committed_snapshot: Some(committed), ..nothing };
        let evidence = sent_members(Some(&recorded)).unwrap();
        assert_eq!(evidence, "status records snapshot generation 4 of 1500 members committed");
    }

    #[test]
    fn reconcile_errors_back_off_exponentially_with_jitter_up_to_a_cap() {
        let base = Duration::from_secs(10);
        let waits: Vec<_> = (1..=8).map(|n| error_backoff(base, n, 0.999_999).as_secs()).collect();
        assert_eq!(waits, [9, 19, 39, 79, 159, 319, 599, 599], "doubling up to the cap, at the top of the jitter");
        assert_eq!(error_backoff(base, 1, 0.0), Duration::from_secs(5), "at least half");
        assert_eq!(error_backoff(base, 4, 0.0), Duration::from_secs(40));
        assert_eq!(error_backoff(base, u32::MAX, 0.5), Duration::from_secs(450), "no overflow");
        assert_eq!(error_backoff(Duration::from_secs(3600), 1, 0.0), Duration::from_secs(300), "the cap holds");
    }
}
