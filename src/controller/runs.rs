//! Runs in progress: one task per import, never two for the same import. A run ends
//! through [`super::record`] — recorded in status, then announced — and asks for a
//! reconcile.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::task::AbortHandle;
use tracing::{Instrument, error, info, info_span, warn};

use super::admission::{Admission, Admitted};
use super::context::Context;
use super::importer::{ImportError, Importer};
use super::record::{self, Crash, Reporter, RunEnd};
use super::registry::Ticket;
use super::secrets;
use crate::api::{CohortImport, CurrentRun, RunTrigger};
use crate::braze::budget::{self, SlotHolder};
use crate::domain::validate::ValidSpec;
use crate::run::RunReport;

/// Stops every run when dropped: the controller stopped or lost its Lease, and another
/// replica will run the interrupted runs again.
pub(super) struct AbortRunsOnDrop(pub Arc<Context>);

impl Drop for AbortRunsOnDrop {
    fn drop(&mut self) {
        self.0.runs.abort_all();
    }
}

/// Starts `run` of `import` as a task; its start is already recorded in `.status`.
pub(super) fn start(ctx: &Arc<Context>, import: Arc<CohortImport>, spec: ValidSpec, run: CurrentRun) {
    let reference = ObjectRef::from_obj(import.as_ref());
    let span = info_span!(
        "run",
        run_id = %run.id,
        namespace = %import.namespace().unwrap_or_default(),
        import = %import.name_any(),
    );
    let run_id = run.id.clone();
    let due = due_at(&import, &run);
    // Made before the task, so that the run leaves the registry even when its task is
    // stopped before it first runs.
    let ticket = ctx.runs.ticket();
    let deregister = Arc::new(Deregister { ctx: ctx.clone(), import: reference.clone(), ticket });
    let task = execute(ctx.clone(), import, spec, run, due, deregister);
    if !ctx.runs.spawn(reference, ticket, task.instrument(span)) {
        // Reconciles of one import never overlap and return early while it runs, so this
        // is not expected; if it happens, the run in progress finds its status record
        // replaced and leaves it, and the next reconcile runs this one.
        warn!(%run_id, "a run of this import is already in progress here; not starting another");
    }
}

/// When `run` was due: a scheduled run's slot (the `nextRunAt` it was started for), else
/// the moment it was decided (a first or requested run).
fn due_at(import: &CohortImport, run: &CurrentRun) -> Timestamp {
    let slot = import.status.as_ref().and_then(|s| s.next_run_at);
    match slot {
        Some(slot) if run.trigger == RunTrigger::Scheduled && slot <= run.started_at => slot,
        _ => run.started_at,
    }
}

async fn execute(
    ctx: Arc<Context>,
    import: Arc<CohortImport>,
    spec: ValidSpec,
    run: CurrentRun,
    due: Timestamp,
    deregister: Arc<Deregister>,
) {
    // Busy minutes: runs take turns by namespace for the slots (admission). The slot is
    // given away while the run's Braze requests wait long for budget (a throttled workspace).
    let namespace = import.namespace().unwrap_or_default();
    let admitted = ctx.admission.admit(&namespace).await;
    let slot = Arc::new(RunSlot::new(ctx.admission.clone(), namespace, admitted));
    let release_slot = Arc::new(ReleaseOnDrop(slot.clone()));
    let waited = ctx.clock.now().duration_since(due);
    ctx.metrics.run_admitted(ctx.config.shard_name(), waited.as_secs_f64().max(0.0));
    // Sharded: the import may have moved to another shard meanwhile; that shard runs it.
    if !ctx.handover.still_runs_here(&import, &run.id).await {
        return;
    }
    let in_progress = InProgress::start(&ctx);
    // No Event: status already shows the run in progress (`currentRun`, `Ready: Running`).
    // Its end is announced — one Event, naming the run.
    info!(trigger = ?run.trigger, "run started");
    let clock_started = Instant::now();
    let namespace = import.namespace().unwrap_or_default();
    let mut workspace = None;
    let attempt = async {
        // Read unless the Secret watch sees its Secret as it was read: a key rotated in its
        // Secret (the import's, or its destination's) is used from the next run on.
        let braze = secrets::Workspace::of(&import.spec.destination, &namespace)?;
        let keys = secrets::braze_keys(&ctx.client, &ctx.secret_checks, braze, &ctx.config.partner_keys).await?;
        workspace = Some(super::conflict::workspace_of(keys.workspace_key().expose()));
        let held = (deregister.clone(), release_slot.clone());
        let outcome = supervised(ctx.importer.clone(), &import, &spec, &run, keys, slot, held).await;
        let (now, elapsed) = (ctx.clock.now(), clock_started.elapsed());
        Ok::<_, secrets::KeyError>(match outcome {
            Ok(outcome) => RunEnd::finished(&run, outcome, now, elapsed),
            Err(crash) => RunEnd::crashed(&run, &crash, now, elapsed),
        })
    };
    let (timeout, field) = run_timeout(&ctx.config, &import);
    // Stopping a run is as safe as a crash: what it sent stays in doubt until a run commits.
    let end = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(end)) => end,
        Ok(Err(e)) => RunEnd::finished(&run, Err(e.into()), ctx.clock.now(), clock_started.elapsed()),
        Err(_) => RunEnd::timed_out(&run, timeout, field, ctx.clock.now(), clock_started.elapsed()),
    };
    let end = RunEnd { workspace, ..end };
    // Recording the end is API requests only: the next run in line may start meanwhile —
    // once the importer's task has stopped too (a run that timed out may still be aborting).
    drop((in_progress, release_slot));
    if !ctx.config.fence.is_open() {
        // Stopped by the fence (or ended just as it closed): not an end. The run stays in
        // progress in status, for the leader to resume as its next attempt.
        warn!(run_id = %run.id, "this replica no longer holds its Lease; the run is left to the leader to resume");
        return;
    }
    finish(&ctx.reporter, &import, end, run.attempt).await;
}

/// Deregisters a run and wakes its import when dropped — however its task ends, even by
/// a panic outside the importer or an abort, so that the next trigger can run. The run's
/// task and its importer's task each hold it: a stopped run stays registered (and no
/// other attempt of the import starts here) until both have stopped.
struct Deregister {
    ctx: Arc<Context>,
    import: ObjectRef<CohortImport>,
    ticket: Ticket,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.ctx.runs.finished(&self.import, self.ticket);
        self.ctx.watched.wake(self.import.clone());
    }
}

/// Runs the importer in a task of its own, so that a panic or an abort in it (`Err`) ends
/// the run through [`RunEnd::crashed`] — recorded `Failed`, deregistered, the next trigger free to
/// run — instead of leaving the import `Running` until a restart. Dropping this future (the
/// controller stopping, a lost Lease) aborts the importer's task with it. The task holds
/// `held` — the run's place in the registry and its slot — until it has stopped.
async fn supervised(
    importer: Arc<dyn Importer>,
    import: &Arc<CohortImport>,
    spec: &ValidSpec,
    run: &CurrentRun,
    keys: secrets::BrazeKeys,
    slot: Arc<RunSlot>,
    held: (Arc<Deregister>, Arc<ReleaseOnDrop>),
) -> Result<Result<RunReport, ImportError>, Crash> {
    let (import, spec, current) = (import.clone(), spec.clone(), run.clone());
    // A panic message is the program's text, not ours to trust: the keys never reach status.
    let known: Vec<String> = keys.exposed().into_iter().map(str::to_owned).collect();
    let work = async move {
        let _held = held;
        importer.run(&import, &spec, &current, keys).await
    };
    let task = tokio::spawn(budget::holding(slot, work).instrument(tracing::Span::current()));
    let _abort = AbortOnDrop(task.abort_handle());
    match task.await {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            let crash = if e.is_panic() { Crash::panicked(e.into_panic(), &known) } else { Crash::Aborted };
            error!(run_id = %run.id, %crash, "the run crashed");
            Err(crash)
        }
    }
}

/// A run's admission slot: given away while its Braze requests wait long for budget
/// ([`budget::holding`]), taken back before they send, released when the run ends.
struct RunSlot {
    admission: Admission,
    namespace: String,
    held: Mutex<Option<Admitted>>,
    /// One request takes the slot back at a time; the others find it back.
    taking_back: tokio::sync::Mutex<()>,
    ended: AtomicBool,
}

impl RunSlot {
    fn new(admission: Admission, namespace: String, admitted: Admitted) -> Self {
        RunSlot {
            admission,
            namespace,
            held: Mutex::new(Some(admitted)),
            taking_back: tokio::sync::Mutex::new(()),
            ended: AtomicBool::new(false),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Admitted>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SlotHolder for RunSlot {
    fn hand_over(&self) {
        let given = self.held().take();
        drop(given); // released outside the lock: the next run in line is admitted
    }

    fn take_back(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let _one = self.taking_back.lock().await;
            if self.ended.load(Ordering::Acquire) || self.held().is_some() {
                return;
            }
            let slot = self.admission.admit(&self.namespace).await;
            *self.held() = Some(slot);
        })
    }
}

/// Releases a run's slot for good when the run ends, however it ends.
struct ReleaseOnDrop(Arc<RunSlot>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Release);
        let slot = self.0.held().take();
        drop(slot);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

/// How long a run of `import` may take, and the setting that says so.
fn run_timeout(config: &super::context::Config, import: &CohortImport) -> (Duration, &'static str) {
    match import.spec.run_timeout_seconds {
        Some(seconds) => (Duration::from_secs(seconds.into()), "spec.runTimeoutSeconds"),
        None => (config.run_timeout, "the operator's --run-timeout-seconds"),
    }
}

/// Records the end of `attempt` in status — unless another replica took the run over (a
/// later attempt of it, or another run), whose record wins — and announces it.
async fn finish(reporter: &Reporter, import: &CohortImport, end: RunEnd, attempt: u32) {
    let mut recorded = None;
    let written = reporter
        .status
        .update(import, |status| {
            if !record::is_current(status, &end.record.id, attempt) {
                return false;
            }
            recorded = Some(record::record(status, &end, import.spec.history_limits(), &import.spec.retry_policy()));
            true
        })
        .await;
    let Some(recorded) = recorded.filter(|_| written) else {
        return;
    };
    reporter.runs.record(ObjectRef::from_obj(import), end.record.id.clone());
    record::announce(reporter, import, &end, &recorded).await;
}
