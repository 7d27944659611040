//! Runs in progress: one task per import, never two for the same import. A run records
//! itself when it ends — history, `Ready`, Events, metrics — hands the report to the
//! notifier without waiting for it, and asks for a reconcile.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use tokio::task::AbortHandle;
use tracing::{Instrument, error, info, info_span, warn};

use super::Context;
use super::events::reason as event;
use super::importer::{RunJob, RunOutcome};
use super::secrets;
use super::status::{self, Written, idle_ready, record_run, rfc3339, set_ready};
use crate::api::{CohortImport, CohortImportStatus, RunRecord, RunResult};
use crate::notify::{RunNotice, is_recovery, should_notify};

/// The runs this replica has in progress.
#[derive(Default)]
pub struct RunRegistry {
    runs: Mutex<HashMap<ObjectRef<CohortImport>, (String, AbortHandle)>>,
    /// The last run of each import whose end is recorded in status: a copy of the import
    /// still showing it as current is stale, not an interrupted run.
    recorded: Mutex<HashMap<ObjectRef<CohortImport>, String>>,
}

impl RunRegistry {
    /// Whether `run_id` of `import` ended here and its end is already in status.
    pub fn is_recorded(&self, import: &ObjectRef<CohortImport>, run_id: &str) -> bool {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).get(import).is_some_and(|id| id == run_id)
    }

    fn record(&self, import: ObjectRef<CohortImport>, run_id: String) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).insert(import, run_id);
    }

    pub(super) fn forget(&self, import: &ObjectRef<CohortImport>) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).remove(import);
    }

    pub fn is_running(&self, import: &ObjectRef<CohortImport>) -> bool {
        self.lock().contains_key(import)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<CohortImport>, (String, AbortHandle)>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `run` for `import` unless one is already in progress. The registry is
    /// locked while spawning, so the run cannot finish (and deregister) before it is
    /// registered.
    fn spawn(&self, import: ObjectRef<CohortImport>, run_id: String, run: impl Future<Output = ()> + Send + 'static) -> bool {
        let mut runs = self.lock();
        if runs.contains_key(&import) {
            return false;
        }
        let handle = tokio::spawn(run);
        runs.insert(import, (run_id, handle.abort_handle()));
        true
    }

    fn finished(&self, import: &ObjectRef<CohortImport>, run_id: &str) {
        let mut runs = self.lock();
        if runs.get(import).is_some_and(|(id, _)| id == run_id) {
            runs.remove(import);
        }
    }

    /// Stops the run of `import` in progress here, if any; returns its task's handle, to
    /// see when it has stopped.
    pub(super) fn abort(&self, import: &ObjectRef<CohortImport>) -> Option<AbortHandle> {
        let (_, handle) = self.lock().remove(import)?;
        handle.abort();
        Some(handle)
    }

    fn abort_all(&self) {
        for (_, (_, handle)) in self.lock().drain() {
            handle.abort();
        }
    }
}

/// Stops every run when dropped: the controller stopped or lost its Lease, and another
/// replica will run the interrupted runs again.
pub(super) struct AbortRunsOnDrop(pub Arc<Context>);

impl Drop for AbortRunsOnDrop {
    fn drop(&mut self) {
        self.0.runs.abort_all();
    }
}

/// Starts `job` for `import` as a task; its start is already recorded in `.status`.
pub(super) fn start(ctx: &Arc<Context>, import: Arc<CohortImport>, job: RunJob) {
    let reference = ObjectRef::from_obj(import.as_ref());
    let span = info_span!(
        "run",
        run_id = %job.run_id,
        namespace = %import.namespace().unwrap_or_default(),
        import = %import.name_any(),
    );
    let task = execute(ctx.clone(), import, job.clone());
    if !ctx.runs.spawn(reference, job.run_id.clone(), task.instrument(span)) {
        // Reconciles of one import never overlap and return early while it runs, so this
        // is not expected; if it happens, the run in progress finds its status record
        // replaced and leaves it, and the next reconcile runs this one.
        warn!(run_id = %job.run_id, "a run of this import is already in progress here; not starting another");
    }
}

async fn execute(ctx: Arc<Context>, import: Arc<CohortImport>, job: RunJob) {
    let reference = ObjectRef::from_obj(import.as_ref());
    let _slot = ctx.run_slots.acquire().await;
    // Sharded: the import may have moved to another shard meanwhile; that shard runs it.
    if !ctx.still_runs_here(&import, &job.run_id).await {
        ctx.runs.finished(&reference, &job.run_id);
        ctx.wake(reference);
        return;
    }
    let in_progress = InProgress::start(&ctx);
    info!(trigger = ?job.trigger, "run started");
    ctx.events
        .normal(&import, event::RUN_STARTED, "Run", format!("Run {} ({:?}) started", job.run_id, job.trigger))
        .await;
    let clock_started = Instant::now();
    let namespace = import.namespace().unwrap_or_default();
    let outcome = match secrets::braze_keys(&ctx.client, &namespace, &import.spec.destination.braze, &ctx.config.partner_keys)
        .await
    {
        Ok(keys) => ctx.importer.run(&import, &job, keys).await,
        Err(e) => RunOutcome::failed(&job, e.reason(), e.to_string()),
    };
    let elapsed = clock_started.elapsed();
    drop(in_progress);
    finish(&ctx, &import, &job, outcome, elapsed).await;
    ctx.runs.finished(&reference, &job.run_id);
    ctx.wake(reference);
}

/// Counts a run in `runs_in_progress` until dropped — also when its task is aborted.
struct InProgress(Arc<Context>);

impl InProgress {
    fn start(ctx: &Arc<Context>) -> Self {
        ctx.metrics.runs_in_progress.inc();
        InProgress(ctx.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.metrics.runs_in_progress.dec();
    }
}

/// Records the outcome, tells people, and sends the report email.
async fn finish(ctx: &Arc<Context>, import: &CohortImport, job: &RunJob, mut outcome: RunOutcome, elapsed: Duration) {
    let finished_at = ctx.clock.now();
    outcome.record.id = job.run_id.clone();
    outcome.record.trigger = job.trigger;
    outcome.record.started_at = rfc3339(job.started_at);
    outcome.record.finished_at = Some(rfc3339(finished_at));
    let record = outcome.record.clone();
    let result = record.result;
    match result {
        RunResult::Failed => error!(message = %record.message, "run failed"),
        RunResult::Blocked => warn!(message = %record.message, "run blocked"),
        _ => info!(result = ?result, size = record.cohort_size, added = record.added, removed = record.removed, "run finished"),
    }

    let mut previous_history = Vec::new();
    let mut next_run_at = None;
    let recorded = update_status(ctx, import, |status| {
        if status.current_run.as_ref().is_none_or(|run| run.id != job.run_id) {
            // Another replica took over this run; its record wins.
            return false;
        }
        previous_history = status.history.clone();
        next_run_at = status.next_run_at.clone();
        status.current_run = None;
        record_run(status, record.clone(), import.spec.history_limit);
        let next = status.next_run_at.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
        let (value, why, message) = idle_ready(status, next);
        let why = match (&outcome.reason, result) {
            (Some(reason), RunResult::Failed) => reason.as_str(),
            _ => why,
        };
        set_ready(status, value, why, &message, status.observed_generation, finished_at);
        true
    })
    .await;
    if !recorded {
        return;
    }
    ctx.runs.record(ObjectRef::from_obj(import), job.run_id.clone());

    ctx.metrics.run_finished(result, elapsed.as_secs_f64(), record.added, record.removed);
    for (status, count) in &outcome.braze_responses {
        ctx.metrics.braze_responses(*status, *count);
    }
    if result == RunResult::Succeeded {
        ctx.metrics.succeeded_at(
            &import.namespace().unwrap_or_default(),
            &import.name_any(),
            finished_at.as_second() as f64,
        );
    }
    let note = format!("Run {}: {}", record.id, record.message);
    match result {
        RunResult::Succeeded => ctx.events.normal(import, event::RUN_SUCCEEDED, "Run", note).await,
        RunResult::DryRun => ctx.events.normal(import, event::RUN_DRY_RUN, "Run", note).await,
        RunResult::Failed => ctx.events.warning(import, event::RUN_FAILED, "Run", note).await,
        RunResult::Blocked => ctx.events.warning(import, event::RUN_BLOCKED, "Run", note).await,
        RunResult::Missed => ctx.events.warning(import, event::RUN_MISSED, "Run", note).await,
    }
    let next = next_run_at.as_deref().and_then(|t| t.parse().ok());
    notify(ctx, import, &record, &previous_history, next, outcome.hint.clone());
}

/// Sends the run report if the import asks for one, in a task of its own, bounded in time;
/// a failure becomes an Event and `.status.lastNotificationError`, never the run's result.
pub(super) fn notify(
    ctx: &Arc<Context>,
    import: &CohortImport,
    record: &RunRecord,
    previous_history: &[RunRecord],
    next_run_at: Option<Timestamp>,
    hint: Option<String>,
) {
    let Some(email) = import.spec.notifications.as_ref().and_then(|n| n.email.clone()) else {
        return;
    };
    let recovered = is_recovery(record.result, previous_history);
    if !should_notify(&email, record.result, recovered) {
        return;
    }
    let notice = RunNotice {
        namespace: import.namespace().unwrap_or_default(),
        import_name: import.name_any(),
        cohort_name: import.spec.cohort.name.clone(),
        cohort_id: import.spec.cohort.id.clone(),
        run_id: record.id.clone(),
        result: record.result,
        trigger: record.trigger,
        started_at: record.started_at.parse().unwrap_or_else(|_| ctx.clock.now()),
        finished_at: record.finished_at.as_deref().and_then(|t| t.parse().ok()).unwrap_or_else(|| ctx.clock.now()),
        time_zone: jiff::tz::TimeZone::get(&import.spec.schedule.time_zone).unwrap_or(jiff::tz::TimeZone::UTC),
        cohort_size: record.cohort_size,
        added: record.added,
        removed: record.removed,
        next_run_at,
        reason: matches!(record.result, RunResult::Failed | RunResult::Blocked | RunResult::Missed)
            .then(|| record.message.clone())
            .filter(|m| !m.is_empty()),
        hint,
        recovered,
        dry_run: import.spec.dry_run,
    };
    let ctx = ctx.clone();
    let import = import.clone();
    let span = info_span!("notify", run_id = %record.id);
    tokio::spawn(
        async move {
            let sent = match &ctx.notifier {
                None => Err(
                    "spec.notifications.email is set, but the operator has no SMTP server configured (--smtp-host)"
                        .to_owned(),
                ),
                Some(notifier) => {
                    match tokio::time::timeout(ctx.config.notification_timeout, notifier.notify(&notice, &email.to)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!(
                            "the run report email was not sent within {} s",
                            ctx.config.notification_timeout.as_secs()
                        )),
                    }
                }
            };
            let note = match &sent {
                Ok(()) => None,
                Err(message) => {
                    warn!(error = %message, "run report email not sent");
                    ctx.metrics.notification_failures.inc();
                    ctx.events
                        .warning(
                            &import,
                            event::NOTIFICATION_FAILED,
                            "Notify",
                            format!("Run {}: report email not sent: {message}", notice.run_id),
                        )
                        .await;
                    Some(crate::run::report::truncate(format!("run {}: {message}", notice.run_id), 512))
                }
            };
            update_status(&ctx, &import, |status| {
                if status.last_notification_error == note {
                    return false;
                }
                status.last_notification_error = note.clone();
                true
            })
            .await;
        }
        .instrument(span),
    );
}

/// Reads the import afresh, lets `change` edit its status (returning whether it changed
/// anything), and writes it; retried while the write is refused as stale or the API server
/// is unavailable. Returns whether the change is recorded.
pub(super) async fn update_status(
    ctx: &Context,
    import: &CohortImport,
    mut change: impl FnMut(&mut CohortImportStatus) -> bool,
) -> bool {
    let namespace = import.namespace().unwrap_or_default();
    let api: Api<CohortImport> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut delay = Duration::from_millis(100);
    for _ in 0..30 {
        let fresh = match api.get_opt(&import.name_any()).await {
            Ok(Some(fresh)) if fresh.uid() == import.uid() => fresh,
            Ok(_) => return false, // deleted (or deleted and created again)
            Err(e) => {
                warn!(error = %e, "cannot read the import to record the run; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let mut desired = fresh.status.clone().unwrap_or_default();
        if !change(&mut desired) {
            return false;
        }
        match status::write(&api, &fresh, &desired).await {
            Ok(Written::Applied | Written::Unchanged) => return true,
            Err(e) if status::is_stale_write(&e) => continue,
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
