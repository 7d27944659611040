//! Import runs: source → sort → diff against the snapshot → guard → Braze → new snapshot.
//!
//! [`run_import`] is the one entry point of a run; [`preview_import`] (`kubectl cohort
//! preview`) shares its steps 1–4 — one `plan` function, so a preview's counts and guard
//! verdict are the run's — and stops after them. A run:
//! 1. opens the last snapshot (what Braze received in the last successful run);
//! 2. streams the source into an external sorter ([`sort`]), counting skipped rows; a
//!    source error fails the run before anything is sent;
//! 3. merges the sorted new cohort with the snapshot ([`crate::domain::diff`]), writing the
//!    new snapshot body and the additions and removals to scratch files as it goes;
//! 4. asks the removal guard ([`crate::domain::guard`]); a blocked run sends nothing;
//! 5. stops there on a dry run;
//! 6. records the keys it is about to send as *in doubt* in the snapshot store — a large
//!    run with its plan, so that it can checkpoint what Braze accepted ([`checkpoint`]);
//! 7. names the cohort in Braze on the first run and when the display name changed;
//! 8. sends removals, then additions;
//! 9. commits the new snapshot (settling the keys in doubt) only if Braze accepted every
//!    change.
//!
//! Nothing holds the cohort in memory: keys are sorted within a budget and spilled, and
//! every later step streams. A run stopped anywhere (a crash, an abort, Braze failing)
//! leaves the previous snapshot and the keys in doubt in place, so the next run re-sends
//! those keys the way its own source says, even if the source changed meanwhile; Braze
//! membership changes are idempotent, so re-sending is harmless — but each costs a data
//! point, so a large run's last checkpoint settles the keys Braze had accepted, and the
//! next run sends those only where its source differs ([`crate::snapshot::plan`]).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use jiff::Timestamp;
use tempfile::SpooledTempFile;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::{CommittedSnapshot, IdentifierMapping, RemovalGuard, RunResult, RunTrigger};
use crate::braze::{BrazeClient, Change, ChangesReport, CohortTarget, Delivery};
use crate::domain::diff::{self, DiffCounts, DiffError, KeyCursor, Known};
use crate::domain::guard::{self, GuardDecision, GuardInput, RemovalApproval};
use crate::domain::identifiers::SkipCounts;
use crate::domain::member::Member;
use crate::snapshot::format::{BodyReader, BodyWriter, FrontCodedReader, FrontCodedWriter, read_body};
use crate::snapshot::plan::{PlanMeta, PlanWriter, Progress, Resolved, Section, SettledKeys};
use crate::snapshot::{
    DoubtMeta, FORMAT_VERSION, MemberDigest, Missing, SnapshotError, SnapshotMeta, SnapshotStore, verify,
};
use crate::source::MemberStream;

pub mod budget;
pub mod checkpoint;
pub mod remove;
pub mod report;
pub mod sort;

pub use remove::{RemovalError, remove_all_members};
pub use report::{RunError, RunReport, SAMPLE_SIZE, SnapshotMissing, new_run_id};

/// Changes kept in memory before a change list moves to a scratch file.
const CHANGES_IN_MEMORY: usize = 4 << 20;
/// Bytes of change-list records gathered before they are written.
const CHANGE_LIST_BUFFER: usize = 64 * 1024;
/// Batches of members in flight from the source to the sorter thread.
const SORT_QUEUE: usize = 4;
/// Changes per message from the reader thread to the Braze sender.
const SEND_CHUNK: usize = 1000;

/// What to run: one import's settings, taken from its spec by the caller.
#[derive(Clone, Debug)]
pub struct ImportRun {
    /// Shown in status and in the approval hint; [`new_run_id`] makes one.
    pub run_id: String,
    pub trigger: RunTrigger,
    /// The import, for messages: `namespace/name`.
    pub namespace: String,
    pub import_name: String,
    /// `spec.cohort.name`: the display name in Braze. (`spec.cohort.id` is in the target.)
    pub cohort_name: String,
    /// [`identifier_fingerprint`] of `spec.identifiers`.
    pub identifier_fingerprint: String,
    /// `spec.removalGuard`; `None` means the default guard.
    pub removal_guard: Option<RemovalGuard>,
    /// Set when `cohorts.dev/approve-removals` names the most recent blocked run: that run's
    /// id and the removals it reported (its `RunRecord.removed`).
    pub approval: Option<RemovalApproval>,
    /// `spec.dryRun`: compute and report, send nothing, keep the snapshot.
    pub dry_run: bool,
    /// Members listed by id in the report's samples, per direction ([`SAMPLE_SIZE`] for runs;
    /// a preview may ask for more or fewer).
    pub sample_size: usize,
    /// The cohort's snapshot key ([`crate::snapshot::snapshot_key`]), recorded with what
    /// the run commits.
    pub snapshot_key: String,
    /// `status.committedSnapshot`, when it is for this snapshot key: a store that no longer
    /// holds it blocks the run ([`crate::snapshot::verify`]).
    pub expected_snapshot: Option<CommittedSnapshot>,
    /// Set when `cohorts.dev/approve-resync` names the run blocked for a missing snapshot:
    /// that run's id. The run forgets the store and sends the whole source as additions.
    pub resync: Option<String>,
    /// Scratch space for sort spills and the new snapshot (an emptyDir in the pod).
    pub scratch_dir: PathBuf,
    /// Bytes of member keys the sorter buffers before spilling.
    pub sort_memory_budget: usize,
    /// When the run started by the caller's clock (the controller's, which tests set). The
    /// times a run records — in its report and the snapshot's metadata — are this plus the
    /// time elapsed, so they never mix that clock with the system's.
    pub started_at: Timestamp,
    /// Least time between two checkpoints of a large run ([`checkpoint::MIN_INTERVAL`]; tests
    /// that measure the cadence in keys alone set zero).
    pub checkpoint_interval: std::time::Duration,
}

impl ImportRun {
    /// A run with the default guard, no approval, not a dry run, scratch in the system
    /// temporary directory, starting now by the system clock.
    pub fn new(
        run_id: impl Into<String>,
        trigger: RunTrigger,
        namespace: &str,
        import_name: &str,
        cohort_name: &str,
    ) -> Self {
        Self {
            run_id: run_id.into(),
            trigger,
            namespace: namespace.to_owned(),
            import_name: import_name.to_owned(),
            cohort_name: cohort_name.to_owned(),
            identifier_fingerprint: String::new(),
            removal_guard: None,
            approval: None,
            dry_run: false,
            sample_size: SAMPLE_SIZE,
            snapshot_key: String::new(),
            expected_snapshot: None,
            resync: None,
            scratch_dir: std::env::temp_dir(),
            sort_memory_budget: budget::sort_bytes(),
            started_at: Timestamp::now(),
            checkpoint_interval: checkpoint::MIN_INTERVAL,
        }
    }
}

/// What a run reads from and writes to.
pub struct RunDeps<'a> {
    /// The source, opened: [`crate::source::MemberSource::members`].
    pub members: MemberStream<'a>,
    pub snapshots: &'a dyn SnapshotStore,
    pub braze: &'a BrazeClient,
    /// Endpoint, keys and `cohort_id` (= `spec.cohort.id`).
    pub target: &'a CohortTarget,
}

/// What a run reads its snapshot from: the store, the cohort, and the Lease whose fence the
/// run sends under (an interrupted attempt under the same one is then quiet,
/// [`crate::snapshot::plan::is_quiet`]; a preview, which sends nothing, says none).
#[derive(Clone, Copy)]
struct Reading<'a> {
    snapshots: &'a dyn SnapshotStore,
    cohort_id: &'a str,
    lease: Option<&'a str>,
}

/// Where a run's writes go: [`RunDeps`] without the source.
#[derive(Clone, Copy)]
struct Writes<'a> {
    snapshots: &'a dyn SnapshotStore,
    braze: &'a BrazeClient,
    target: &'a CohortTarget,
}

/// A stable text of the identifier mapping; when it changes between runs, the members sent
/// before were sent under other identifiers, and the run report says so.
pub fn identifier_fingerprint(mapping: &IdentifierMapping) -> String {
    let mut parts = Vec::new();
    if let Some(f) = &mapping.external_id {
        parts.push(format!("externalId={f}"));
    }
    if let Some(a) = &mapping.alias {
        let label = match (&a.label, &a.label_field) {
            (Some(l), _) => format!("label={l}"),
            (None, Some(f)) => format!("labelField={f}"),
            (None, None) => String::new(),
        };
        parts.push(format!("alias={}/{label}", a.name_field));
    }
    if let Some(f) = &mapping.device_id {
        parts.push(format!("deviceId={f}"));
    }
    parts.join(";")
}

/// Runs one import to the end and reports it. Never panics on bad input or failing
/// services: every failure is in the report (`result == Failed`, `error`, `hint`).
///
/// Cancelling the future (dropping it, aborting its task) at any point is safe: the
/// snapshot is only replaced, atomically, after Braze accepted every change.
pub async fn run_import(run: &ImportRun, deps: RunDeps<'_>) -> RunReport {
    let clock = RunClock { started_at: run.started_at, started: Instant::now() };
    let mut report = new_report(run);
    let outcome = execute(run, deps, clock, &mut report).await;
    settle(&mut report, outcome, clock);
    let message = report.message();
    match report.result {
        RunResult::Failed => warn!(
            namespace = %run.namespace, import = %run.import_name, run = %run.run_id,
            cohort_size = report.cohort_size, added = report.added, removed = report.removed,
            %message, "import run failed"
        ),
        result => info!(
            namespace = %run.namespace, import = %run.import_name, run = %run.run_id,
            ?result, cohort_size = report.cohort_size, added = report.added,
            removed = report.removed, requests = report.requests, seconds = report.duration.as_secs_f64(),
            "import run finished"
        ),
    }
    report
}

/// [`ImportRun::started_at`], advanced by the monotonic clock.
#[derive(Clone, Copy)]
struct RunClock {
    started_at: Timestamp,
    started: Instant,
}

impl RunClock {
    fn now(&self) -> Timestamp {
        self.started_at.checked_add(self.started.elapsed()).unwrap_or(self.started_at)
    }
}

/// Reads the source and the snapshot, diffs them and asks the removal guard, exactly as a
/// run does (steps 1–4), and stops there: nothing is sent to Braze and nothing is written
/// to the snapshot store. The report is a dry run's (`result == DryRun`, `blocked` set when
/// the guard would stop the run), or `Failed` with the error. `kubectl cohort preview` is
/// this; the next run's changes are these, as long as the source and snapshot stay put.
pub async fn preview_import(
    run: &ImportRun,
    members: MemberStream<'_>,
    snapshots: &dyn SnapshotStore,
    cohort_id: &str,
) -> RunReport {
    let clock = RunClock { started_at: run.started_at, started: Instant::now() };
    let mut report = new_report(run);
    let outcome = async {
        let scratch = run_scratch(run)?;
        let reading = Reading { snapshots, cohort_id, lease: None };
        match plan(run, members, reading, scratch.path(), None, &mut report).await? {
            Ok(_) => Ok(RunResult::DryRun),
            Err(missing) => Ok(snapshot_missing(run, &mut report, missing)),
        }
    }
    .await;
    settle(&mut report, outcome, clock);
    report
}

/// A report with nothing done yet.
fn new_report(run: &ImportRun) -> RunReport {
    RunReport {
        run_id: run.run_id.clone(),
        trigger: run.trigger,
        started_at: run.started_at,
        finished_at: run.started_at,
        duration: Default::default(),
        result: RunResult::Failed,
        cohort_size: 0,
        previous_size: 0,
        added: 0,
        removed: 0,
        unchanged: 0,
        rows: 0,
        skipped: SkipCounts::default(),
        duplicates: 0,
        requests: 0,
        retries: 0,
        accepted_adds: 0,
        accepted_removes: 0,
        resent: 0,
        already_sent: 0,
        unsent: 0,
        cohort_named: false,
        committed_generation: None,
        committed: None,
        snapshot_missing: None,
        resynced: None,
        blocked: None,
        approved_run: None,
        sample_added: Vec::new(),
        sample_removed: Vec::new(),
        notes: Vec::new(),
        error: None,
        hint: None,
        spilled_runs: 0,
        braze_responses: Default::default(),
        braze_budget_wait: std::time::Duration::ZERO,
        rejected: Default::default(),
    }
}

/// Puts how the run ended in its report.
fn settle(report: &mut RunReport, outcome: Result<RunResult, RunError>, clock: RunClock) {
    match outcome {
        Ok(result) => report.result = result,
        Err(error) => {
            report.result = RunResult::Failed;
            report.hint = Some(error.hint());
            report.error = Some(error);
            report.unsent = (report.added + report.removed + report.resent)
                .saturating_sub(report.already_sent + report.accepted_adds + report.accepted_removes);
        }
    }
    report.finished_at = clock.now();
    report.duration = clock.started.elapsed();
}

async fn execute(
    run: &ImportRun,
    deps: RunDeps<'_>,
    clock: RunClock,
    report: &mut RunReport,
) -> Result<RunResult, RunError> {
    let scratch = run_scratch(run)?;
    let cohort_id = &deps.target.cohort_id;
    let writes = Writes { snapshots: deps.snapshots, braze: deps.braze, target: deps.target };

    resync(run, deps.snapshots, report).await?;
    let outputs = (!run.dry_run).then(|| DiffOutputs {
        snapshot: scratch.path().join("snapshot.new"),
        sends: scratch.path().join("doubt.new"),
        plan: scratch.path().join("plan.new"),
    });
    // 1–4. Snapshot, source, diff, guard: the plan a preview shows. A run that finds the
    // store without what status says Braze holds, or blocked by the guard, sends nothing.
    let reading = Reading { snapshots: deps.snapshots, cohort_id, lease: deps.braze.fenced_by() };
    let planned = plan(run, deps.members, reading, scratch.path(), outputs.clone(), report).await?;
    let Planned { diffed, previous_meta, stored_generation, remapped, decision } = match planned {
        Ok(planned) => planned,
        Err(missing) => return Ok(snapshot_missing(run, report, missing)),
    };
    let counts = diffed.counts;
    if matches!(decision, GuardDecision::Blocked(_)) && !run.dry_run {
        return Ok(RunResult::Blocked);
    }

    // 5. A dry run ends here.
    let Some(outputs) = outputs else {
        return Ok(RunResult::DryRun);
    };

    // 6. The keys about to be sent are in doubt until the new snapshot is committed; a
    // large run's plan is recorded with them.
    let sends = counts.sends();
    let planned = if sends > 0 {
        let meta = DoubtMeta::of(run, cohort_id, stored_generation, sends, clock.now());
        record_doubt(writes, &meta, &outputs, diffed.plan, report).await?
    } else {
        None
    };

    // 7. The cohort's name (the partner path's; an attribute has no cohort to name).
    let created_at = previous_meta.as_ref().map_or_else(|| clock.now(), |m| m.cohort_created_at);
    let renamed = name_cohort(run, writes, previous_meta.as_ref(), created_at, report).await?;

    // 8. Removals, then additions.
    if sends > 0 {
        send(run, writes, (diffed.removes, diffed.adds), planned, report).await?;
    }

    // 9. Braze has it all: the new snapshot (which also settles the keys in doubt). A new
    // identifier mapping alone is committed too, so its note is not repeated every run.
    if renamed || sends > 0 || remapped {
        let meta = SnapshotMeta {
            cohort_created_at: created_at,
            members: counts.new,
            digest: Some(diffed.digest.clone()),
            ..SnapshotMeta::of(run, cohort_id, stored_generation + 1, clock.now())
        };
        deps.snapshots.commit(&meta, &outputs.snapshot).await?;
        report.committed_generation = Some(meta.generation);
    }
    // What the store holds now: this run's commit, or the snapshot it diffed against, whose
    // members are this run's (nothing was sent, so nothing changed).
    report.committed = Some(CommittedSnapshot {
        key: deps.snapshots.key().unwrap_or_else(|| run.snapshot_key.clone()),
        generation: report.committed_generation.unwrap_or(stored_generation),
        members: counts.new,
        digest: Some(diffed.digest),
    });
    Ok(RunResult::Succeeded)
}

impl SnapshotMeta {
    /// What `run` commits as `generation` of `cohort_id` at `now`: an empty cohort created
    /// then, until the caller says otherwise.
    fn of(run: &ImportRun, cohort_id: &str, generation: u64, now: Timestamp) -> Self {
        SnapshotMeta {
            format: FORMAT_VERSION,
            generation,
            cohort_id: cohort_id.to_owned(),
            cohort_name: run.cohort_name.clone(),
            cohort_created_at: now,
            members: 0,
            identifier_fingerprint: run.identifier_fingerprint.clone(),
            run_id: run.run_id.clone(),
            committed_at: now,
            digest: None,
        }
    }
}

impl DoubtMeta {
    /// The keys `run` is about to send, `keys` of them, on top of generation `base`.
    fn of(run: &ImportRun, cohort_id: &str, base: u64, keys: u64, now: Timestamp) -> Self {
        DoubtMeta {
            format: FORMAT_VERSION,
            base_generation: base,
            cohort_id: cohort_id.to_owned(),
            keys,
            run_id: run.run_id.clone(),
            recorded_at: now,
        }
    }
}

/// A resync a person approved starts afresh: the store is forgotten before anything else.
async fn resync(run: &ImportRun, snapshots: &dyn SnapshotStore, report: &mut RunReport) -> Result<(), RunError> {
    let Some(approved) = &run.resync else { return Ok(()) };
    snapshots.delete().await?;
    report.resynced = Some(approved.clone());
    report.notes.push(format!(
        "resync approved (run {approved}): every member is sent as an addition; members who left the source \
         while the snapshot was lost could not be removed from the Braze cohort"
    ));
    Ok(())
}

/// Step 7: names the cohort in Braze when it is new or its name changed (the partner
/// path's; an attribute has no cohort to name). Whether it did.
async fn name_cohort(
    run: &ImportRun,
    deps: Writes<'_>,
    previous: Option<&SnapshotMeta>,
    created_at: Timestamp,
    report: &mut RunReport,
) -> Result<bool, RunError> {
    let partner = matches!(deps.target.delivery, Delivery::CohortImport { .. });
    if !partner || previous.is_some_and(|m| m.cohort_name == run.cohort_name) {
        return Ok(false);
    }
    let named = deps.braze.name_cohort(deps.target, &run.cohort_name, created_at).await.map_err(RunError::Naming)?;
    report.requests += 1;
    report.retries += named.attempts.saturating_sub(1);
    report.braze_budget_wait += named.budget_wait;
    *report.braze_responses.entry(named.status).or_default() += 1;
    report.cohort_named = true;
    Ok(true)
}

/// Step 6: records the keys about to be sent in doubt, with the run's plan when it is large
/// enough to checkpoint (`plan`: what the diff wrote of it). The plan and cadence, if the
/// store recorded the plan.
async fn record_doubt(
    deps: Writes<'_>,
    meta: &DoubtMeta,
    outputs: &DiffOutputs,
    plan: Option<PlanSections>,
    report: &mut RunReport,
) -> Result<Option<(PlanMeta, checkpoint::Cadence)>, RunError> {
    let cadence = checkpoint::Cadence::for_run(meta.keys, deps.braze, deps.target);
    let (Some(cadence), Some((keys, bytes))) = (cadence, plan) else {
        deps.snapshots.record_doubt(meta, &outputs.sends).await?;
        return Ok(None);
    };
    let plan = PlanMeta {
        format: FORMAT_VERSION,
        base_generation: meta.base_generation,
        cohort_id: meta.cohort_id.clone(),
        run_id: meta.run_id.clone(),
        recorded_at: meta.recorded_at,
        keys,
        bytes,
        progress: Progress { accepted: Vec::new(), permit: cadence.window },
        lease: deps.braze.fenced_by().filter(|_| keys[Section::Unsafe as usize] == 0).map(str::to_owned),
    };
    if deps.snapshots.record_doubt_with_plan(meta, &outputs.sends, &plan, &outputs.plan).await? {
        return Ok(Some((plan, cadence)));
    }
    report.notes.push(
        "another attempt wrote to the snapshot store since this run read it: this run writes no checkpoint, so \
         an interruption has the next run send all of its changes again"
            .into(),
    );
    Ok(None)
}

/// Step 8: sends the change lists (removals, then additions) — under checkpoints when the
/// run recorded a plan — and puts what Braze did in `report`. Fails unless Braze accepted
/// every change.
async fn send(
    run: &ImportRun,
    deps: Writes<'_>,
    (removes, adds): (SpooledTempFile, SpooledTempFile),
    planned: Option<(PlanMeta, checkpoint::Cadence)>,
    report: &mut RunReport,
) -> Result<(), RunError> {
    let read = move |tx: mpsc::Sender<Vec<Change>>| read_changes(removes, adds, tx);
    let (sent, read, stopped) = match &planned {
        None => {
            let (sent, read) = send_changes_from(deps.braze, deps.target, read).await;
            (sent, read, None)
        }
        Some((plan, cadence)) => {
            let cadence = cadence.paced(run.checkpoint_interval);
            let done =
                checkpoint::send_checkpointed(deps.braze, deps.target, deps.snapshots, plan, cadence, read).await;
            // A run that stops early leaves what Braze accepted since the last checkpoint.
            let unwritten = done.progress.accepted_keys() > done.written;
            let overtaken =
                matches!(done.stopped, Some(SnapshotError::Overtaken { .. } | SnapshotError::Fenced { .. }));
            let stopped_early = done.sent.stopped.is_some() || done.stopped.is_some();
            if unwritten
                && !overtaken
                && stopped_early
                && let Err(e) = deps.snapshots.checkpoint(plan, &done.progress.capped()).await
            {
                warn!(run = %run.run_id, error = %e, "could not write the last checkpoint of a stopped run");
            }
            (done.sent, done.read, done.stopped)
        }
    };
    count_sent(&sent, report);
    let planned_sends = report.added + report.removed + report.resent - report.already_sent;
    let accepted = sent.totals.added + sent.totals.removed + sent.totals.rejected.total();
    if let Some(error) = sent.stopped {
        return Err(RunError::Changes { error, accepted, planned: planned_sends });
    }
    if let Some(error) = stopped {
        return Err(RunError::Snapshot(error));
    }
    if let Err(source) = read {
        let dir = run.scratch_dir.display().to_string();
        return Err(RunError::Scratch { dir, action: "read the change lists", source });
    }
    if accepted != planned_sends {
        return Err(RunError::Incomplete { accepted, planned: planned_sends });
    }
    Ok(())
}

/// What Braze did with a run's changes, into its report.
fn count_sent(sent: &ChangesReport, report: &mut RunReport) {
    report.requests += sent.totals.requests;
    report.retries += sent.totals.retries;
    report.braze_budget_wait += sent.totals.budget_wait;
    for (status, count) in &sent.totals.responses_by_status {
        *report.braze_responses.entry(Some(*status)).or_default() += u64::from(*count);
    }
    let unanswered = sent.totals.timeouts + sent.totals.connection_errors;
    if unanswered > 0 {
        *report.braze_responses.entry(None).or_default() += u64::from(unanswered);
    }
    report.accepted_adds = sent.totals.added;
    report.accepted_removes = sent.totals.removed;
    // Objects Braze answered for by rejecting them are settled too: sending them again
    // would be rejected again. They are counted per reason, never as added.
    report.rejected = sent.totals.rejected.clone();
}

/// A run's scratch directory, under [`ImportRun::scratch_dir`]; removed when dropped.
fn run_scratch(run: &ImportRun) -> Result<tempfile::TempDir, RunError> {
    let scratch_err = |action| {
        let dir = run.scratch_dir.display().to_string();
        move |source| RunError::Scratch { dir, action, source }
    };
    std::fs::create_dir_all(&run.scratch_dir).map_err(scratch_err("create"))?;
    tempfile::Builder::new()
        .prefix("cohort-run-")
        .tempdir_in(&run.scratch_dir)
        .map_err(scratch_err("create a run directory"))
}

/// What [`plan`] found: the diff and what the rest of a run needs to act on it.
struct Planned {
    diffed: Diffed,
    previous_meta: Option<SnapshotMeta>,
    stored_generation: u64,
    remapped: bool,
    decision: GuardDecision,
}

/// Steps 1–4 of a run, shared with [`preview_import`]: loads the snapshot, sorts the source,
/// diffs them and asks the removal guard, filling in `report` (counts, samples, notes, the
/// guard's verdict). It sends nothing and writes to no store: `outputs` (a real run's) only
/// names scratch files for the new snapshot body and the keys to send. `Ok(Err(_))`: the
/// store does not hold what status says Braze holds (missing, older, damaged).
async fn plan(
    run: &ImportRun,
    members: MemberStream<'_>,
    reading: Reading<'_>,
    scratch: &Path,
    outputs: Option<DiffOutputs>,
    report: &mut RunReport,
) -> Result<Result<Planned, Missing>, RunError> {
    // 1. What Braze has, and what an interrupted run may have changed.
    let stored = match load(run, reading, scratch, report).await? {
        Ok(stored) => stored,
        Err(missing) => return Ok(Err(missing)),
    };
    let (stored_generation, remapped) = (stored.generation, stored.remapped);
    let previous_meta = stored.previous.as_ref().map(|p| p.meta.clone());

    // 2. The source, sorted and de-duplicated.
    let (sorted, pushed) = sort_source(members, scratch, run.sort_memory_budget, report).await?;

    // 3. The diff, writing the new snapshot body and the keys to send (a run's), and the
    // change lists.
    let mut diffed = match diff_against(run, stored, sorted, outputs).await? {
        Ok(diffed) => diffed,
        Err(missing) => return Ok(Err(missing)),
    };
    let counts = diffed.counts;
    report.cohort_size = counts.new;
    report.previous_size = counts.previous;
    report.added = counts.added;
    report.removed = counts.removed;
    report.unchanged = counts.unchanged;
    report.resent = counts.resent_adds + counts.resent_removes;
    report.already_sent = counts.already_sent;
    report.duplicates = pushed - counts.new;
    report.sample_added = std::mem::take(&mut diffed.sample_added);
    report.sample_removed = std::mem::take(&mut diffed.sample_removed);

    // 4. The removal guard: the one decision, for runs and previews alike.
    let input = GuardInput { previous_size: counts.previous, new_size: counts.new, removals: counts.removed };
    let decision = guard::decide(run.removal_guard.as_ref(), input, run.approval.as_ref());
    match &decision {
        GuardDecision::Proceed => {}
        GuardDecision::Approved { run_id } => report.approved_run = Some(run_id.clone()),
        GuardDecision::Blocked(blocked) => {
            report.hint = Some(blocked.how_to_approve(&run.import_name, &run.namespace, &run.run_id));
            report.blocked = Some(blocked.clone());
        }
    }
    Ok(Ok(Planned { diffed, previous_meta, stored_generation, remapped, decision }))
}

/// What step 1 found in the store, for this cohort.
struct StoredState {
    previous: Option<crate::snapshot::StoredSnapshot>,
    doubt: Option<crate::snapshot::StoredDoubt>,
    known: Option<KnownKeys>,
    generation: u64,
    /// The identifier mapping changed since the snapshot.
    remapped: bool,
}

/// Step 1: the snapshot and the keys in doubt (with what an interrupted run's checkpoint
/// settled). A store that does not hold what status says was committed ends the plan
/// before anything is sent; what changed since (cohort id, mapping) is noted.
async fn load(
    run: &ImportRun,
    reading: Reading<'_>,
    scratch: &Path,
    report: &mut RunReport,
) -> Result<Result<StoredState, Missing>, RunError> {
    let Reading { snapshots, cohort_id, lease } = reading;
    let loaded = match snapshots.load(scratch).await {
        Ok(loaded) => loaded,
        Err(SnapshotError::Corrupt { what, message }) => {
            return Ok(Err(Missing::Damaged { message: format!("{what}: {message}") }));
        }
        Err(e) => return Err(e.into()),
    };
    // After an approved resync the store was forgotten: what status recorded is not expected.
    let expected = run.expected_snapshot.as_ref().filter(|_| run.resync.is_none());
    if let Err(missing) = verify(expected, loaded.snapshot.as_ref().map(|s| &s.meta)) {
        return Ok(Err(missing));
    }
    let generation = loaded.generation();
    let previous = match loaded.snapshot {
        Some(s) if s.meta.cohort_id != cohort_id => {
            report.notes.push(format!(
                "spec.cohort.id changed from {:?} to {cohort_id:?}: this is a new Braze cohort, so \
                 every member is sent to it; the old cohort keeps its members",
                s.meta.cohort_id
            ));
            None
        }
        other => other,
    };
    let doubt = loaded.doubt.filter(|d| d.meta.cohort_id == cohort_id);
    let stored_plan = loaded.plan.filter(|_| doubt.is_some());
    let known = resolve_plan(stored_plan, scratch, report, lease).await;
    if let Some(d) = &doubt {
        let settled = known.as_ref().map_or(0, |k| k.accepted);
        report.notes.push(format!(
            "run {} stopped before Braze confirmed all its {} changes (its checkpoint shows {settled} accepted, \
             sent again only where this run's source differs); the others are sent again as this run's source says",
            d.meta.run_id, d.meta.keys
        ));
    }
    let remapped = previous.as_ref().is_some_and(|p| p.meta.identifier_fingerprint != run.identifier_fingerprint);
    if let Some(p) = previous.as_ref().filter(|_| remapped) {
        report.notes.push(format!(
            "the identifier mapping changed ({:?} → {:?}): members sent under the old \
             identifiers are removed and re-added under the new ones",
            p.meta.identifier_fingerprint, run.identifier_fingerprint
        ));
    }
    Ok(Ok(StoredState { previous, doubt, known, generation, remapped }))
}

/// Step 3: diffs the sorted source against `stored` on a blocking thread, then checks what
/// it read against what the store's metadata says (damage found: nothing was sent yet).
async fn diff_against(
    run: &ImportRun,
    stored: StoredState,
    sorted: sort::SortedKeys,
    outputs: Option<DiffOutputs>,
) -> Result<Result<Diffed, Missing>, RunError> {
    let scratch_dir = run.scratch_dir.display().to_string();
    let sample_size = run.sample_size;
    let previous_members = stored.previous.as_ref().map(|p| p.meta.members);
    let doubt_keys = stored.doubt.as_ref().map(|d| d.meta.keys);
    let diffed = tokio::task::spawn_blocking(move || {
        let bodies = Stored {
            previous: stored.previous.map(|p| p.body),
            doubt: stored.doubt.map(|d| d.body),
            known: stored.known,
        };
        diff_to_files(bodies, sorted, outputs.as_ref(), sample_size)
    })
    .await
    .expect("the diff does not panic");
    let diffed = match diffed {
        Ok(diffed) => diffed,
        Err(DiffFailure::Io(source)) => return Err(RunError::Scratch { dir: scratch_dir, action: "diff", source }),
        Err(DiffFailure::Run(RunError::Snapshot(SnapshotError::Corrupt { what, message }))) => {
            return Ok(Err(Missing::Damaged { message: format!("{what}: {message}") }));
        }
        Err(DiffFailure::Run(e)) => return Err(e),
    };
    let counts = diffed.counts;
    for (meta_says, read) in [(previous_members, counts.previous), (doubt_keys, counts.in_doubt)] {
        if let Some(expected) = meta_says.filter(|&n| n != read) {
            let count = RunError::SnapshotCount { expected, found: read };
            return Ok(Err(Missing::Damaged { message: count.to_string() }));
        }
    }
    Ok(Ok(diffed))
}

/// What an interrupted run's checkpoint tells a run: keys it settled, in the cohort and out
/// of it, and those no checkpoint may settle.
struct KnownKeys {
    resolved: Resolved,
    /// Sends the checkpoint shows accepted.
    accepted: u64,
}

/// Works out what the stored plan settles ([`crate::snapshot::plan::resolve`]). A plan that
/// cannot be read is left out: its keys stay in doubt, and are all sent again.
async fn resolve_plan(
    plan: Option<crate::snapshot::plan::StoredPlan>,
    scratch: &Path,
    report: &mut RunReport,
    lease: Option<&str>,
) -> Option<KnownKeys> {
    let plan = plan?;
    let (run_id, accepted) = (plan.meta.run_id.clone(), plan.meta.progress.accepted_keys());
    let quiet = crate::snapshot::plan::is_quiet(&plan.meta, lease);
    let dir = scratch.to_owned();
    match tokio::task::spawn_blocking(move || crate::snapshot::plan::resolve(plan, &dir, quiet)).await {
        Ok(Ok(resolved)) => Some(KnownKeys { resolved, accepted }),
        Ok(Err(e)) => {
            warn!(run = %run_id, error = %e, "ignoring a checkpoint that cannot be read");
            report.notes.push(format!(
                "the checkpoint of run {run_id} cannot be read ({e}): every key it left in doubt is sent again"
            ));
            None
        }
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Ends a run that found the store without what status says Braze holds: it sends nothing,
/// and its message says the two ways forward.
fn snapshot_missing(run: &ImportRun, report: &mut RunReport, missing: Missing) -> RunResult {
    let (name, namespace) = (&run.import_name, &run.namespace);
    report.hint = Some(format!(
        "either approve a resync (cohort-operator resync {name} -n {namespace}, or the annotation \
         cohorts.dev/approve-resync: {}), which sends every member of the source as an addition — members who \
         left the source while the snapshot was lost stay in the Braze cohort, as Braze cannot list its members — \
         or set a new spec.cohort.id for a fresh, exact cohort in Braze",
        run.run_id
    ));
    let resync_command = format!("cohort-operator resync {name} -n {namespace}");
    report.snapshot_missing = Some(report::SnapshotMissing { missing, resync_command });
    RunResult::Blocked
}

/// Sends to Braze the changes `read` produces on a blocking thread, in chunks through a
/// small channel, so neither side holds more than a few chunks. Returns what Braze did and
/// what `read` returned; `read` ends by itself once the sender stops reading (its channel
/// closes). Import runs and `deletionPolicy: RemoveMembers` both send through here.
pub(crate) async fn send_changes_from<R: Send + 'static>(
    braze: &BrazeClient,
    target: &CohortTarget,
    read: impl FnOnce(mpsc::Sender<Vec<Change>>) -> io::Result<R> + Send + 'static,
) -> (ChangesReport, io::Result<R>) {
    let (tx, rx) = mpsc::channel::<Vec<Change>>(2);
    let reader = tokio::task::spawn_blocking(move || read(tx));
    let changes = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
        .flat_map(futures::stream::iter);
    let sent = braze.send_changes(target, changes).await;
    let read = reader.await.expect("the change reader does not panic");
    (sent, read)
}

/// Streams the source into the sorter, which runs on a blocking thread.
async fn sort_source(
    mut members: MemberStream<'_>,
    scratch: &Path,
    budget: usize,
    report: &mut RunReport,
) -> Result<(sort::SortedKeys, u64), RunError> {
    let (tx, mut rx) = mpsc::channel::<Vec<Member>>(SORT_QUEUE);
    let dir = scratch.to_owned();
    let sorter = tokio::task::spawn_blocking(move || {
        let mut sorter = sort::ExternalSorter::new(dir, budget);
        let mut key = Vec::new();
        while let Some(batch) = rx.blocking_recv() {
            for member in &batch {
                key.clear();
                member.write_key(&mut key);
                sorter.push(&key)?;
            }
        }
        sorter.finish()
    });
    let mut source_error = None;
    while let Some(batch) = members.next().await {
        match batch {
            Ok(batch) => {
                report.rows += batch.rows();
                report.skipped.add(&batch.skipped);
                if tx.send(batch.members).await.is_err() {
                    break; // the sorter failed; its error is below
                }
            }
            Err(e) => {
                source_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    drop(members);
    let sorted = sorter.await.expect("the sorter does not panic");
    if let Some(e) = source_error {
        return Err(RunError::Source(e));
    }
    let (sorted, stats) = sorted.map_err(|source| RunError::Scratch {
        dir: scratch.display().to_string(),
        action: "sort the cohort",
        source,
    })?;
    report.spilled_runs = stats.spilled_runs;
    Ok((sorted, stats.pushed))
}

/// Where the diff writes the new snapshot body, the keys to send (both compressed), and the
/// run's plan.
#[derive(Clone, Debug)]
struct DiffOutputs {
    snapshot: PathBuf,
    sends: PathBuf,
    plan: PathBuf,
}

/// The keys and bytes of each section of a plan written.
type PlanSections = ([u64; crate::snapshot::plan::SECTIONS], [u64; crate::snapshot::plan::SECTIONS]);

/// What the store holds, opened for the diff.
struct Stored {
    previous: Option<File>,
    doubt: Option<File>,
    known: Option<KnownKeys>,
}

/// The diff's results: counts, samples, and the change lists (front-coded, sorted).
struct Diffed {
    counts: DiffCounts,
    adds: SpooledTempFile,
    removes: SpooledTempFile,
    /// [`MemberDigest`] of the new member set.
    digest: String,
    sample_added: Vec<String>,
    sample_removed: Vec<String>,
    /// The run's plan, written to [`DiffOutputs::plan`].
    plan: Option<PlanSections>,
}

enum DiffFailure {
    Io(io::Error),
    Run(RunError),
}

impl From<io::Error> for DiffFailure {
    fn from(e: io::Error) -> Self {
        DiffFailure::Io(e)
    }
}

/// A stored body (the previous snapshot, or the keys in doubt), or nothing. Invalid data in
/// it is damage to that store, told apart from this run's own scratch files failing.
struct StoredKeys {
    what: &'static str,
    body: Option<Box<BodyReader<BufReader<File>>>>,
}

impl StoredKeys {
    fn open(body: Option<File>, what: &'static str) -> Result<Self, DiffFailure> {
        let body = match body {
            None => None,
            Some(file) => Some(Box::new(
                read_body(BufReader::with_capacity(256 * 1024, file)).map_err(|e| snapshot_damaged(what, e))?,
            )),
        };
        Ok(StoredKeys { what, body })
    }
}

impl KeyCursor for StoredKeys {
    type Error = DiffFailure;
    fn key(&self) -> Option<&[u8]> {
        self.body.as_ref()?.key()
    }
    fn advance(&mut self) -> Result<(), DiffFailure> {
        let Some(body) = &mut self.body else { return Ok(()) };
        // The operating system failing to read is local trouble; anything the decoder or
        // the record format says (bad data, a frame cut short, a checksum) is damage.
        body.advance().map_err(|e| match e.raw_os_error() {
            Some(_) => DiffFailure::Io(e),
            None => snapshot_damaged(self.what, e),
        })
    }
}

fn create_body(path: &Path) -> io::Result<BodyWriter<BufWriter<File>>> {
    BodyWriter::new(BufWriter::with_capacity(256 * 1024, File::create(path)?))
}

fn finish_body(body: BodyWriter<BufWriter<File>>) -> io::Result<()> {
    let (out, _) = body.finish()?;
    out.into_inner().map_err(io::IntoInnerError::into_error)?;
    Ok(())
}

const PREVIOUS: &str = "the previous snapshot";
const DOUBT: &str = "the keys in doubt";
const CHECKPOINT: &str = "the checkpoint of an interrupted run";

/// A failed diff: damage in what it read from the store, or trouble with the scratch files.
fn diff_failure(e: DiffError<DiffFailure>) -> DiffFailure {
    match e {
        DiffError::Io(failure) => failure,
        DiffError::OutOfOrder { side, position } => {
            let e = io::Error::other(DiffError::<io::Error>::OutOfOrder { side, position }.to_string());
            match side {
                diff::Side::Previous => snapshot_damaged(PREVIOUS, e),
                diff::Side::InDoubt => snapshot_damaged(DOUBT, e),
                diff::Side::Settled => snapshot_damaged(CHECKPOINT, e),
                diff::Side::New => DiffFailure::Io(e),
            }
        }
    }
}

fn diff_to_files(
    stored: Stored,
    mut new: sort::SortedKeys,
    outputs: Option<&DiffOutputs>,
    sample_size: usize,
) -> Result<Diffed, DiffFailure> {
    let mut previous = StoredKeys::open(stored.previous, PREVIOUS)?;
    let mut doubt = StoredKeys::open(stored.doubt, DOUBT)?;
    let (mut settled, unsafe_keys) = match stored.known {
        Some(k) => (
            SettledKeys::new(Some(k.resolved.settled_in), Some(k.resolved.settled_out))?,
            Unsafe::Listed(StoredKeys::open(Some(k.resolved.unsafe_keys), CHECKPOINT)?),
        ),
        None => (SettledKeys::new(None, None)?, Unsafe::InDoubt),
    };
    let (mut snapshot, mut sends, mut plan) = match outputs {
        Some(o) => {
            let plan = PlanSink { writer: PlanWriter::new(&o.plan.with_extension("sections"))?, unsafe_keys };
            (Some(create_body(&o.snapshot)?), Some(create_body(&o.sends)?), Some(plan))
        }
        None => (None, None, None),
    };
    // Buffered: past CHANGES_IN_MEMORY a list is a file, and a record is a few bytes.
    let change_list =
        || FrontCodedWriter::new(BufWriter::with_capacity(CHANGE_LIST_BUFFER, SpooledTempFile::new(CHANGES_IN_MEMORY)));
    let (mut adds, mut removes) = (change_list(), change_list());
    let (mut sample_added, mut sample_removed) = (Vec::new(), Vec::new());
    let mut digest = MemberDigest::default();
    let on_key = |change: diff::Change, known: Known, key: &[u8]| -> Result<(), DiffFailure> {
        match change {
            diff::Change::Added => sample(&mut sample_added, key, sample_size),
            diff::Change::Removed => sample(&mut sample_removed, key, sample_size),
            diff::Change::Unchanged | diff::Change::Absent => {}
        }
        let send = change.send(known);
        match send {
            Some(diff::Send::Add) => adds.push(key)?,
            Some(diff::Send::Remove) => removes.push(key)?,
            None => {}
        }
        if let (Some(sends), Some(_)) = (&mut sends, send) {
            sends.push(key)?;
        }
        if let Some(plan) = &mut plan {
            plan.key(known, send, key)?;
        }
        if change.is_new() {
            digest.push(key);
            if let Some(snapshot) = &mut snapshot {
                snapshot.push(key)?;
            }
        }
        Ok(())
    };
    let counts = diff::merge_diff(&mut previous, &mut doubt, &mut settled, &mut new, on_key).map_err(diff_failure)?;
    for body in [snapshot, sends].into_iter().flatten() {
        finish_body(body)?;
    }
    let plan = match (plan, outputs) {
        (Some(plan), Some(o)) => Some(plan.writer.finish(&o.plan)?),
        _ => None,
    };
    let rewind = |w: FrontCodedWriter<BufWriter<SpooledTempFile>>| -> io::Result<SpooledTempFile> {
        let mut f = w.into_inner().into_inner().map_err(io::IntoInnerError::into_error)?;
        f.flush()?;
        f.seek(SeekFrom::Start(0))?;
        Ok(f)
    };
    let digest = digest.finish();
    let (adds, removes) = (rewind(adds)?, rewind(removes)?);
    Ok(Diffed { counts, adds, removes, digest, sample_added, sample_removed, plan })
}

/// Keys no checkpoint may settle: every key in doubt when no plan tells otherwise, or the
/// ones a plan lists.
enum Unsafe {
    InDoubt,
    Listed(StoredKeys),
}

impl Unsafe {
    /// Whether `key` (in key order, call after call) is unsafe.
    fn contains(&mut self, known: Known, key: &[u8]) -> Result<bool, DiffFailure> {
        match self {
            Unsafe::InDoubt => Ok(known == Known::InDoubt),
            Unsafe::Listed(listed) => {
                while listed.key().is_some_and(|k| k < key) {
                    listed.advance()?;
                }
                Ok(listed.key() == Some(key))
            }
        }
    }
}

/// Writes the run's plan as the diff goes ([`crate::snapshot::plan`]).
struct PlanSink {
    writer: PlanWriter,
    unsafe_keys: Unsafe,
}

impl PlanSink {
    fn key(&mut self, known: Known, send: Option<diff::Send>, key: &[u8]) -> Result<(), DiffFailure> {
        match (send, known) {
            (Some(diff::Send::Remove), _) => self.writer.push(Section::Removes, key)?,
            (Some(diff::Send::Add), _) => self.writer.push(Section::Adds, key)?,
            (None, Known::Settled(true)) => self.writer.push(Section::HeldIn, key)?,
            (None, Known::Settled(false)) => self.writer.push(Section::HeldOut, key)?,
            (None, Known::Previous | Known::InDoubt) => {}
        }
        if self.unsafe_keys.contains(known, key)? {
            self.writer.push(Section::Unsafe, key)?;
        }
        Ok(())
    }
}

fn snapshot_damaged(what: &str, e: io::Error) -> DiffFailure {
    DiffFailure::Run(RunError::Snapshot(crate::snapshot::SnapshotError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    }))
}

fn sample(into: &mut Vec<String>, key: &[u8], size: usize) {
    if into.len() < size
        && let Ok(m) = Member::from_key_bytes(key)
    {
        into.push(m.to_string());
    }
}

/// Reads the change lists back as Braze changes: removals first, then additions. Ends
/// early (without error) when the sender stops listening.
fn read_changes(removes: SpooledTempFile, adds: SpooledTempFile, tx: mpsc::Sender<Vec<Change>>) -> io::Result<()> {
    for (file, remove) in [(removes, true), (adds, false)] {
        let mut keys = FrontCodedReader::new(BufReader::with_capacity(64 * 1024, file))?;
        let mut chunk = Vec::with_capacity(SEND_CHUNK);
        while let Some(key) = keys.key() {
            let member = Member::from_key_bytes(key).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            chunk.push(Change { member, remove });
            if chunk.len() == SEND_CHUNK && tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
                return Ok(());
            }
            keys.advance()?;
        }
        if !chunk.is_empty() && tx.blocking_send(chunk).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `n` keys, cut short by `cut` bytes.
    fn body(dir: &Path, name: &str, n: u32, cut: usize) -> File {
        let path = dir.join(name);
        let mut w = create_body(&path).unwrap();
        for i in 0..n {
            w.push(format!("\x01member-{i:08}").as_bytes()).unwrap();
        }
        finish_body(w).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
        File::open(&path).unwrap()
    }

    fn damaged_store(result: Result<Diffed, DiffFailure>) -> String {
        match result {
            Err(DiffFailure::Run(RunError::Snapshot(crate::snapshot::SnapshotError::Corrupt { what, .. }))) => what,
            Err(DiffFailure::Io(e)) => panic!("reported as local trouble: {e}"),
            Err(DiffFailure::Run(e)) => panic!("{e}"),
            Ok(_) => panic!("a damaged body was read"),
        }
    }

    /// Members `member-00000000` … as a source stream.
    fn members(range: std::ops::Range<u32>) -> MemberStream<'static> {
        let members = range.map(|i| Member::ExternalId(format!("member-{i:08}"))).collect();
        futures::stream::iter([Ok(crate::source::MemberBatch { members, ..Default::default() })]).boxed()
    }

    /// The bytes of every file under `dir`, by path.
    fn files(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(p).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn a_preview_reports_the_runs_changes_and_the_guards_verdict_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        let store = crate::snapshot::fs::FsSnapshotStore::new(&store_dir, "growth_vip_uid");
        body(dir.path(), "previous", 10, 0);
        store.commit(&crate::snapshot::tests::meta(1, 10), &dir.path().join("previous")).await.unwrap();
        let before = files(&store_dir);
        let mut run = ImportRun::new("r1", RunTrigger::Manual, "growth", "vip", "VIP users");
        run.identifier_fingerprint = "external_id=user_id".into();
        run.scratch_dir = dir.path().join("scratch");
        run.sample_size = 3;

        // 8 of 10 leave, 2 join: over the default guard.
        let report = preview_import(&run, members(8..12), &store, "vip").await;
        assert_eq!(report.result, RunResult::DryRun, "{:?}", report.error);
        assert_eq!((report.cohort_size, report.previous_size), (4, 10));
        assert_eq!((report.added, report.removed, report.unchanged), (2, 8, 2));
        assert_eq!(report.sample_added, ["external_id:member-00000010", "external_id:member-00000011"]);
        assert_eq!(report.sample_removed.len(), 3, "bounded by the sample size");
        let blocked = report.blocked.as_ref().expect("the guard would block");
        assert_eq!(blocked.reason, guard::BlockReason::TooManyRemovals);
        assert_eq!(files(&store_dir), before, "the store is untouched");

        // Within the guard it proceeds; with the guard off too.
        let report = preview_import(&run, members(1..11), &store, "vip").await;
        assert_eq!((report.added, report.removed, report.blocked.is_none()), (1, 1, true));
        run.removal_guard = Some(crate::api::RemovalGuard { disabled: true, ..Default::default() });
        let report = preview_import(&run, members(0..0), &store, "vip").await;
        assert_eq!((report.removed, report.blocked.is_none()), (10, true));
        assert_eq!(files(&store_dir), before);

        // Bounded memory as in a run: a cohort past the sort buffer spills, same answer.
        run.sort_memory_budget = 0; // the sorter's smallest buffer, 64 KiB
        let report = preview_import(&run, members(5..20_005), &store, "vip").await;
        assert!(report.spilled_runs > 1, "{}", report.spilled_runs);
        assert_eq!((report.cohort_size, report.added, report.removed, report.unchanged), (20_000, 19_995, 5, 5));
        assert_eq!(files(&store_dir), before);
    }

    #[test]
    fn damage_found_mid_body_names_the_damaged_store() {
        let dir = tempfile::tempdir().unwrap();
        let empty = || sort::ExternalSorter::new(dir.path(), 0).finish().unwrap().0;
        // Large enough that the cut shows while diffing, not when the body is opened.
        let previous = body(dir.path(), "previous", 200_000, 5);
        assert_eq!(
            damaged_store(diff_to_files(
                Stored { previous: Some(previous), doubt: None, known: None },
                empty(),
                None,
                SAMPLE_SIZE
            )),
            "the previous snapshot"
        );
        let previous = body(dir.path(), "previous-whole", 10, 0);
        let doubt = body(dir.path(), "doubt", 200_000, 5);
        assert_eq!(
            damaged_store(diff_to_files(
                Stored { previous: Some(previous), doubt: Some(doubt), known: None },
                empty(),
                None,
                SAMPLE_SIZE
            )),
            "the keys in doubt"
        );
    }
}
