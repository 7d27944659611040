//! The seam between the controller and the import pipeline: the controller decides when a
//! run happens and records it; an [`Importer`] does the run (source → diff → Braze →
//! snapshot) and the deletion policies.

use futures::future::BoxFuture;

use super::secrets::{BrazeKeys, KeyError};
use crate::api::{CohortImport, CurrentRun, ReadyReason};
use crate::domain::validate::ValidSpec;
use crate::run::{RemovalError, RunReport};
use crate::snapshot::SnapshotError;
use crate::source::SourceError;

/// Why an [`Importer`] could not do what it was asked. A run that started reading reports
/// its failure in its [`RunReport`] instead; these stop it before, or stop a deletion policy.
/// Messages name the object and the fix, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("reading the source failed: {0}")]
    Source(#[from] SourceError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Removal(#[from] RemovalError),
}

impl ImportError {
    /// The `Ready` reason of a run that failed this way.
    pub fn reason(&self) -> ReadyReason {
        match self {
            ImportError::Keys(e) => e.reason(),
            ImportError::Source(e) => e.reason(),
            ImportError::Snapshot(_) => ReadyReason::SnapshotFailed,
            ImportError::Removal(_) => ReadyReason::Failed,
        }
    }
}

/// Carries out runs and deletion policies for the controller.
pub trait Importer: Send + Sync + 'static {
    /// Runs `import` once, as `run` (already recorded in status as in progress), with the
    /// spec as validated. A failure once the run is reading is in the report.
    fn run<'a>(
        &'a self,
        import: &'a CohortImport,
        spec: &'a ValidSpec,
        run: &'a CurrentRun,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<RunReport, ImportError>>;

    /// `deletionPolicy: RemoveMembers`: removes from Braze every member the import sent
    /// (its snapshot), then forgets the snapshot. Returns how many were removed.
    fn remove_members<'a>(
        &'a self,
        import: &'a CohortImport,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<u64, ImportError>>;

    /// `deletionPolicy: Retain`: Braze keeps the cohort as it is, and the store keeps its
    /// snapshot, released, for an import of the same cohort created later.
    fn forget<'a>(&'a self, import: &'a CohortImport) -> BoxFuture<'a, Result<(), ImportError>>;
}
