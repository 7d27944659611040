//! `CohortImport.status`: what happened, written only by the controller.
//!
//! Times are [`Timestamp`]s, serialised as RFC 3339 (`2026-11-28T06:30:00Z`) and declared
//! `format: date-time`, so the API server refuses a malformed one instead of the controller
//! guessing. The `Ready` condition's status and reasons are typed here, once, for every
//! module that sets or reads them ([`ConditionStatus`], [`ReadyReason`]).

use std::fmt;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::method::DeliveryMethod;

/// The type of the condition that sums an import up.
pub const READY: &str = "Ready";
/// kstatus's condition for "the controller is working on it": `True` while a run is in progress.
pub const RECONCILING: &str = "Reconciling";
/// kstatus's condition for "it cannot get better without a person": `True` under the
/// [`ReadyReason`]s whose [`ReadyReason::stalled`] is true.
pub const STALLED: &str = "Stalled";

/// A condition's `status`, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    /// A run is in progress: whether the import is in good shape is not known yet.
    Unknown,
}

impl ConditionStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { ConditionStatus::True } else { ConditionStatus::False }
    }
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the `Ready` condition is what it is. Sources, Secret readers, Events, status and the
/// command line all name reasons through this type. Each variant's name is its text
/// ([`as_str`](Self::as_str)), which is what lets [`parse`](Self::parse) derive its reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum ReadyReason {
    /// Waiting for the first run.
    Scheduled,
    Running,
    /// The last run failed and is retried at `status.nextRetryAt` (`spec.retry`).
    RetryScheduled,
    Succeeded,
    DryRun,
    Failed,
    Blocked,
    Missed,
    Suspended,
    Conflict,
    InvalidSpec,
    SecretNotFound,
    /// The API server would not give a Secret (Forbidden, unavailable).
    SecretReadFailed,
    ConfigMapNotFound,
    /// The source failed while being read (connection, query, HTTP status, bad data).
    SourceFailed,
    /// The source's destination is refused by the operator's egress policy.
    EgressDenied,
    /// The snapshot store could not be opened.
    SnapshotFailed,
    /// The snapshot of what Braze holds is missing, older than `status.committedSnapshot`
    /// says, or damaged: runs send nothing until a person approves a resync or moves the
    /// import to a new `spec.cohort.id`.
    SnapshotMissing,
    /// `deletionPolicy` could not complete; the import waits to be deleted.
    Deleting,
    /// `spec.destination.destinationRef` names a destination that does not exist (a
    /// `BrazeDestination` is looked for in the import's own namespace only).
    DestinationNotFound,
    /// The destination exists but this import may not use it: a `ClusterBrazeDestination`
    /// whose `namespaceSelector` does not select the import's namespace, or one naming a
    /// Secret outside the operator's destination Secret namespace. Nothing is sent.
    DestinationNotAllowed,
}

impl ReadyReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReadyReason::Scheduled => "Scheduled",
            ReadyReason::Running => "Running",
            ReadyReason::RetryScheduled => "RetryScheduled",
            ReadyReason::Succeeded => "Succeeded",
            ReadyReason::DryRun => "DryRun",
            ReadyReason::Failed => "Failed",
            ReadyReason::Blocked => "Blocked",
            ReadyReason::Missed => "Missed",
            ReadyReason::Suspended => "Suspended",
            ReadyReason::Conflict => "Conflict",
            ReadyReason::InvalidSpec => "InvalidSpec",
            ReadyReason::SecretNotFound => "SecretNotFound",
            ReadyReason::SecretReadFailed => "SecretReadFailed",
            ReadyReason::ConfigMapNotFound => "ConfigMapNotFound",
            ReadyReason::SourceFailed => "SourceFailed",
            ReadyReason::EgressDenied => "EgressDenied",
            ReadyReason::SnapshotFailed => "SnapshotFailed",
            ReadyReason::SnapshotMissing => "SnapshotMissing",
            ReadyReason::Deleting => "Deleting",
            ReadyReason::DestinationNotFound => "DestinationNotFound",
            ReadyReason::DestinationNotAllowed => "DestinationNotAllowed",
        }
    }

    /// The reason an idle import shows after a run with `result`.
    pub const fn after(result: RunResult) -> Self {
        match result {
            RunResult::Succeeded => ReadyReason::Succeeded,
            RunResult::DryRun => ReadyReason::DryRun,
            RunResult::Failed => ReadyReason::Failed,
            RunResult::Blocked => ReadyReason::Blocked,
            RunResult::Missed => ReadyReason::Missed,
        }
    }

    /// The reason a condition's text names, if it is one of ours.
    pub fn parse(text: &str) -> Option<Self> {
        use serde::de::value::{Error, StrDeserializer};
        Self::deserialize(StrDeserializer::<Error>::new(text)).ok()
    }

    /// Whether this reason says more precisely why a run ended `result` than
    /// [`after`](Self::after) does (a run that failed reading its source is `SourceFailed`):
    /// an idle import keeps it until the next run ends. Every reason is decided here, once.
    pub const fn refines(self, result: RunResult) -> bool {
        match self {
            ReadyReason::SourceFailed
            | ReadyReason::EgressDenied
            | ReadyReason::SnapshotFailed
            | ReadyReason::ConfigMapNotFound => matches!(result, RunResult::Failed),
            // Every reconcile reads the Secrets afresh and says so itself: a Secret that is
            // back must not stay reported missing.
            ReadyReason::SecretReadFailed | ReadyReason::SecretNotFound => false,
            // Set while the retry is pending, from `status.nextRetryAt`, not kept.
            ReadyReason::RetryScheduled
            // Decided from `status.snapshotMissingRun` (`idle_ready`), not kept.
            | ReadyReason::SnapshotMissing
            | ReadyReason::Scheduled
            | ReadyReason::Running
            | ReadyReason::Succeeded
            | ReadyReason::DryRun
            | ReadyReason::Failed
            | ReadyReason::Blocked
            | ReadyReason::Missed
            | ReadyReason::Suspended
            | ReadyReason::Conflict
            | ReadyReason::InvalidSpec
            | ReadyReason::Deleting
            | ReadyReason::DestinationNotFound
            | ReadyReason::DestinationNotAllowed => false,
        }
    }

    /// `Ready`'s status under this reason.
    pub const fn status(self) -> ConditionStatus {
        match self {
            ReadyReason::Scheduled | ReadyReason::Succeeded | ReadyReason::DryRun => ConditionStatus::True,
            ReadyReason::Running => ConditionStatus::Unknown,
            _ => ConditionStatus::False,
        }
    }

    /// Whether the import cannot become healthy again without a person (kstatus's `Stalled`,
    /// which kstatus tooling reports as `Failed`). Every reason is decided here, once; a new
    /// reason must be decided too (the match has no catch-all).
    pub const fn stalled(self) -> bool {
        match self {
            // Healthy, or working on it.
            ReadyReason::Scheduled | ReadyReason::Succeeded | ReadyReason::DryRun | ReadyReason::Running => false,
            // A person chose this (`spec.suspend`); nothing is wrong.
            ReadyReason::Suspended => false,
            // Only a scheduled run was skipped (the operator was down); the next one runs by itself.
            ReadyReason::Missed => false,
            // The failed run is tried again by itself (`spec.retry`).
            ReadyReason::RetryScheduled => false,
            // A person must fix the spec, create the Secret or ConfigMap, approve the removals,
            // resolve the cohort conflict, or change the egress policy or deletionPolicy.
            ReadyReason::InvalidSpec
            | ReadyReason::SecretNotFound
            | ReadyReason::ConfigMapNotFound
            | ReadyReason::Conflict
            | ReadyReason::Blocked
            | ReadyReason::EgressDenied
            | ReadyReason::Deleting => true,
            // A person must create the destination, or label the namespace as the cluster
            // destination's namespaceSelector asks (or have it changed).
            ReadyReason::DestinationNotFound | ReadyReason::DestinationNotAllowed => true,
            // Only a person can say how Braze's cohort is to be made whole again: a resync
            // (members who left meanwhile stay) or a new cohort id.
            ReadyReason::SnapshotMissing => true,
            // The last run failed and no retry is pending (`spec.retry` is used up, off, or the
            // failure cannot pass on its own), so the import stays unhealthy until the next
            // scheduled run — or until a person looks and requests a run. Failing loudly beats
            // kstatus waiting forever on `InProgress`.
            ReadyReason::Failed
            | ReadyReason::SourceFailed
            | ReadyReason::SnapshotFailed
            | ReadyReason::SecretReadFailed => true,
        }
    }
}

impl fmt::Display for ReadyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason equals the text Kubernetes shows for it (conditions store reasons as text).
impl PartialEq<&str> for ReadyReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl CohortImportStatus {
    /// The `Ready` condition, if set.
    pub fn ready(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == READY)
    }
}

/// The schema of a [`Timestamp`] field: an RFC 3339 string the API server checks.
pub(super) fn date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "date-time" })
}

/// [`date_time`] for an optional field (nullable, like every other optional field).
pub(super) fn optional_date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "date-time", "nullable": true })
}

/// Longest `message` kept in a history entry; keeps status small at the maximum history.
pub const MAX_RUN_MESSAGE_CHARS: usize = 256;

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CohortImportStatus {
    /// Standard conditions: `Ready` first, then kstatus's `Reconciling` (`True` while a run
    /// is in progress) and `Stalled` (`True` when only a person can make the import healthy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the next run starts (RFC 3339): the next scheduled run, or the retry of a failed
    /// run (`nextRetryAt`) when that comes first; absent when none is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub next_run_at: Option<Timestamp>,
    /// When the last run, which failed, is retried (`spec.retry`); absent when no retry is
    /// pending. A scheduled or requested run that starts first replaces the retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub next_retry_at: Option<Timestamp>,
    /// Which retry of a failed scheduled or requested run is pending at `nextRetryAt` or
    /// running now: 1 for the first, up to `spec.retry.limit`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub retry_attempt: Option<u32>,
    /// The most recent run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunRecord>,
    /// When the last run that succeeded finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub last_successful_run_at: Option<Timestamp>,
    /// The last `cohorts.dev/run-requested-at` value acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_run_request: Option<String>,
    /// The last `reconcile.fluxcd.io/requestedAt` value acted upon (Flux's field name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// Members in the source at the last successful run (what the `Members` column shows);
    /// Braze does not report how many of them matched existing users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    /// Which kind of source `spec.source` names (`Inline`, `ConfigMap`, `Http`, `Postgres`,
    /// `Snowflake`, `Databricks`, `BigQuery`), for `kubectl get -o wide`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_kind: Option<String>,
    /// Finished runs, newest first, as many as `spec.historyLimit` (or
    /// `successfulRunsHistoryLimit` + `failedRunsHistoryLimit`) keep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub history: Vec<RunRecord>,
    /// The run in progress. Written before the run starts, so a run cut short by an
    /// operator restart is found and run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_run: Option<CurrentRun>,
    /// Which scheduled runs are already handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleStatus>,
    /// Why the last run report (email, Slack or webhook) could not be sent; cleared by the
    /// next one sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_notification_error: Option<String>,
    /// Which Braze workspace the import last imported into: a one-way hash of its data
    /// import key (never the key), so that imports of other workspaces do not conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub braze_workspace: Option<String>,
    /// What the last dry run (`spec.dryRun: true`) would have done, with a few of the
    /// (pseudonymous) ids it would have added and removed. Kept when later runs are real.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dry_run: Option<DryRunSample>,
    /// The snapshot the last commit left in the store: what Braze holds, as far as the
    /// operator knows. A run that finds the store without it (missing, older, damaged)
    /// ends `Blocked` with reason `SnapshotMissing` and sends nothing. Absent until the
    /// first successful run (and in status written by earlier versions, which record it at
    /// their next successful run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_snapshot: Option<CommittedSnapshot>,
    /// The last run blocked because the snapshot was missing, older than
    /// `committedSnapshot` or damaged (`Ready` reason `SnapshotMissing`): naming it in
    /// `cohorts.dev/approve-resync` approves a resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_missing_run: Option<String>,
}

/// Ids listed per direction in [`DryRunSample`].
pub const MAX_DRY_RUN_SAMPLE: usize = 10;

/// A dry run's findings: its counts, the removal guard's verdict and a bounded sample of ids.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DryRunSample {
    /// The dry run's id, as in `history`.
    pub run_id: String,
    /// RFC 3339.
    #[schemars(schema_with = "date_time")]
    pub finished_at: Timestamp,
    /// Members in the source.
    #[serde(default)]
    pub cohort_size: u64,
    /// Members it would have added and removed.
    #[serde(default)]
    pub would_add: u64,
    #[serde(default)]
    pub would_remove: u64,
    /// The removal guard would have blocked a real run (see `history` for why).
    #[serde(default)]
    pub would_block: bool,
    /// The first ids it would have added, in key order (`external_id:…`, `alias:…@…`,
    /// `device_id:…`), at most 10; an empty list with `spec.dryRunSample: false`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub sample_added: Vec<String>,
    /// The first ids it would have removed, at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub sample_removed: Vec<String>,
}

/// What a commit left in the snapshot store (`status.committedSnapshot`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommittedSnapshot {
    /// Which cohort the snapshot belongs to: a hash of namespace, REST endpoint, partner and
    /// cohort id (`s1-` and 16 hex digits), as the store is keyed. Another cohort starts
    /// afresh.
    pub key: String,
    /// The snapshot generation: 1 for the first commit, then one more per commit.
    pub generation: u64,
    /// Members in it.
    pub members: u64,
    /// SHA-256 of its member keys in order (`sha256:` and 64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl RunRecord {
    /// The removals the run found, sent or not: what approving a blocked run lets through.
    /// Status written before `wouldRemove` existed kept them in `removed`.
    pub fn planned_removals(&self) -> u64 {
        self.would_remove.unwrap_or(self.removed)
    }
}

/// A run that has started and not yet finished.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CurrentRun {
    /// The run's id, which its history entry keeps, e.g. `20261128-063000-a1b2`.
    pub id: String,
    /// What started it: `Initial` (the import's first run), `Scheduled`, `Manual` (the
    /// `cohorts.dev/run-requested-at` annotation), or `Retry` (of a failed run, `spec.retry`).
    pub trigger: RunTrigger,
    /// RFC 3339.
    #[schemars(schema_with = "date_time")]
    pub started_at: Timestamp,
    /// The removal approval (`cohorts.dev/approve-removals`) this run acts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_removals: Option<String>,
    /// The resync approval (`cohorts.dev/approve-resync`, naming a run blocked because the
    /// snapshot was missing) this run acts on: it sends the whole source as additions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_resync: Option<String>,
    /// The shard (`--shard`, the `cohorts.dev/shard` value it owns) of the sharded operator
    /// running it. An import relabelled to another shard keeps its run here: the old shard
    /// stops the run and clears `runnerShard`, `runnerLease` and `runnerIdentity`, and the new
    /// shard resumes the run only then (or once the old shard's Lease shows it stopped), so
    /// it never runs twice. (Flat fields: Kubernetes 1.20's server-side apply leaves an empty
    /// nested object behind when one is removed.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_shard: Option<String>,
    /// The Lease that operator holds while it runs imports, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_lease: Option<String>,
    /// The Lease holder identity (the pod name) of that operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_identity: Option<String>,
    /// How many times this run has started: 1, plus one each time it was interrupted (an
    /// operator restart or failover) and run again. At the operator's `--max-run-attempts`
    /// an interrupted run is not run again but ends `Failed`.
    #[serde(default = "first_attempt")]
    #[schemars(range(min = 1))]
    pub attempt: u32,
}

/// Which sharded operator runs an import's current run (`currentRun.runner*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRunner {
    pub shard: String,
    pub lease: Option<String>,
    pub identity: String,
}

impl CurrentRun {
    /// Who runs it; `None` when no sharded operator holds it.
    pub fn runner(&self) -> Option<RunRunner> {
        Some(RunRunner {
            shard: self.runner_shard.clone()?,
            lease: self.runner_lease.clone(),
            identity: self.runner_identity.clone().unwrap_or_default(),
        })
    }

    pub fn set_runner(&mut self, runner: Option<RunRunner>) {
        self.runner_shard = runner.as_ref().map(|r| r.shard.clone());
        self.runner_lease = runner.as_ref().and_then(|r| r.lease.clone());
        self.runner_identity = runner.map(|r| r.identity);
    }
}

/// A run recorded before attempts were counted is on its first.
fn first_attempt() -> u32 {
    1
}

/// The schedule's progress: runs at or before `handledThrough` are done (run, missed, or
/// passed over because the schedule changed or was held).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// The schedule in force, for people, e.g. `Daily at 06:30 (UTC)`, or `Suspended` /
    /// `Conflict`.
    pub description: String,
    /// Which schedule `handledThrough` counts for: a hash of the normalised schedule
    /// (`s1-` and 16 hex digits), or `Suspended` / `Conflict`. Absent in status written by
    /// earlier versions, where `description` served as the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub handled_through: Option<Timestamp>,
}

/// One finished (or missed) run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// Unique per import, e.g. `20261128-063000-a1b2`.
    pub id: String,
    /// The attempt that ended the run: more than 1 when it was resumed after an interruption
    /// (an operator restart or a failover). Only the attempt in progress may record its end,
    /// so a late finish of an old leader cannot overwrite the new leader's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// What started it: `Initial` (the import's first run), `Scheduled`, `Manual` (the
    /// `cohorts.dev/run-requested-at` annotation), or `Retry` (of a failed run, `spec.retry`).
    pub trigger: RunTrigger,
    /// RFC 3339.
    #[schemars(schema_with = "date_time")]
    pub started_at: Timestamp,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub finished_at: Option<Timestamp>,
    /// How it ended: `Succeeded`; `Failed` (`message` says why); `Blocked` by the removal
    /// guard (`message` says how to approve); `DryRun` (nothing sent); `Missed` (the operator
    /// was down past the starting deadline).
    pub result: RunResult,
    /// Members in the source after normalisation and de-duplication.
    #[serde(default)]
    pub cohort_size: u64,
    /// Members added to the Braze cohort: what Braze accepted, 0 for a run that sent nothing.
    #[serde(default)]
    pub added: u64,
    /// Members removed from the Braze cohort: what Braze accepted, 0 for a run that sent
    /// nothing.
    #[serde(default)]
    pub removed: u64,
    /// For a run that did not send everything (failed, blocked, dry run): the additions it
    /// found and would have made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_add: Option<u64>,
    /// For a run that did not send everything: the removals it found and would have made
    /// (for a blocked run, what an approval lets through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_remove: Option<u64>,
    /// Short, human-readable; truncated to 256 characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunTrigger {
    /// The first run of a new import.
    Initial,
    Scheduled,
    /// Requested through the `cohorts.dev/run-requested-at` annotation.
    Manual,
    /// A retry of a failed run (`spec.retry`); `status.retryAttempt` counts them.
    Retry,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunResult {
    Succeeded,
    Failed,
    /// The removal guard stopped the run; see the message for how to approve it.
    Blocked,
    /// A dry run: changes computed and reported, nothing sent.
    DryRun,
    /// The operator was down past the starting deadline; the run was skipped.
    Missed,
}
/// What the operator observed of a destination; written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The method in force (`CohortImport` when the spec leaves it out), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<DeliveryMethod>,
    /// `Ready`: the spec is valid, every key Secret it names holds its key, and the endpoint
    /// is known (for `CohortImport` without `partnerApiKeySecretRef`: the operator has the
    /// partner key of its region).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Why a destination's `Ready` condition is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum DestinationReason {
    Ready,
    /// The spec breaks a rule the schema cannot hold (the method's fields, the endpoint).
    InvalidSpec,
    /// A key Secret, or its key, is missing.
    SecretNotFound,
    /// The API server would not give a Secret.
    SecretReadFailed,
    /// A ClusterBrazeDestination names a Secret outside the destination Secret namespace.
    SecretNamespaceNotAllowed,
    /// The endpoint's region is not known, or the operator has no partner key for it.
    UnknownEndpoint,
}

impl DestinationReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            DestinationReason::Ready => "Ready",
            DestinationReason::InvalidSpec => "InvalidSpec",
            DestinationReason::SecretNotFound => "SecretNotFound",
            DestinationReason::SecretReadFailed => "SecretReadFailed",
            DestinationReason::SecretNamespaceNotAllowed => "SecretNamespaceNotAllowed",
            DestinationReason::UnknownEndpoint => "UnknownEndpoint",
        }
    }
}
