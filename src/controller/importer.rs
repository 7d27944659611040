//! The seam between the controller and the import pipeline: the controller decides when a
//! run happens and records it; an [`Importer`] does the run (source → diff → Braze →
//! snapshot) and the deletion policies.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use jiff::Timestamp;

use super::secrets::BrazeKeys;
use crate::api::{CohortImport, RunRecord, RunResult, RunTrigger};

/// A run the controller has recorded as started.
#[derive(Clone, Debug)]
pub struct RunJob {
    pub run_id: String,
    pub trigger: RunTrigger,
    pub started_at: Timestamp,
    /// The blocked run whose removals this run may make (`cohorts.dev/approve-removals`).
    pub approved_removals: Option<String>,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The history entry; the controller sets the times from its clock.
    pub record: RunRecord,
    /// The `Ready` reason when a failure has a more precise one than `Failed`
    /// (`SecretNotFound`, `ConfigMapNotFound`, …).
    pub reason: Option<String>,
    /// What a person should do next (failed and blocked runs).
    pub hint: Option<String>,
    /// Braze answers by HTTP status (`None`: no answer), every attempt counted.
    pub braze_responses: BTreeMap<Option<u16>, u64>,
}

impl RunOutcome {
    /// A run that failed before it could read anything.
    pub fn failed(job: &RunJob, reason: &str, message: String) -> Self {
        RunOutcome {
            record: RunRecord {
                id: job.run_id.clone(),
                trigger: job.trigger,
                started_at: job.started_at.to_string(),
                finished_at: None,
                result: RunResult::Failed,
                cohort_size: 0,
                added: 0,
                removed: 0,
                message,
            },
            reason: Some(reason.to_owned()),
            hint: None,
            braze_responses: BTreeMap::new(),
        }
    }
}

/// Carries out runs and deletion policies for the controller.
pub trait Importer: Send + Sync + 'static {
    /// Runs `import` once. Never fails as such: a failure is an outcome.
    fn run<'a>(&'a self, import: &'a CohortImport, job: &'a RunJob, keys: BrazeKeys) -> BoxFuture<'a, RunOutcome>;

    /// `deletionPolicy: RemoveMembers`: removes from Braze every member the import sent
    /// (its snapshot), then forgets the snapshot. Returns how many were removed.
    fn remove_members<'a>(&'a self, import: &'a CohortImport, keys: BrazeKeys) -> BoxFuture<'a, Result<u64, String>>;

    /// `deletionPolicy: Retain`: forgets the snapshot; Braze keeps the cohort as it is.
    fn forget<'a>(&'a self, import: &'a CohortImport) -> BoxFuture<'a, Result<(), String>>;
}
