//! The runs this replica has in progress, and the other tasks of its leadership: what is
//! running where, which run's end is already in status, and stopping them all at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use tokio::task::AbortHandle;

use crate::api::CohortImport;

/// The runs this replica has in progress.
#[derive(Default)]
pub struct RunRegistry {
    runs: Mutex<HashMap<ObjectRef<CohortImport>, (String, AbortHandle)>>,
    /// The last run of each import whose end is recorded in status: a copy of the import
    /// still showing it as current is stale, not an interrupted run.
    recorded: Mutex<HashMap<ObjectRef<CohortImport>, String>>,
    /// Other work of this leadership in tasks of its own (run reports, hand-overs between
    /// shards): stopped with the runs when the Lease is lost.
    side_tasks: Mutex<Vec<AbortHandle>>,
}

impl RunRegistry {
    /// Whether `run_id` of `import` ended here and its end is already in status.
    pub fn is_recorded(&self, import: &ObjectRef<CohortImport>, run_id: &str) -> bool {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).get(import).is_some_and(|id| id == run_id)
    }

    pub(super) fn record(&self, import: ObjectRef<CohortImport>, run_id: String) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).insert(import, run_id);
    }

    pub(super) fn forget(&self, import: &ObjectRef<CohortImport>) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).remove(import);
    }

    pub fn is_running(&self, import: &ObjectRef<CohortImport>) -> bool {
        self.lock().contains_key(import)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<CohortImport>, (String, AbortHandle)>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `run` for `import` unless one is already in progress. The registry is
    /// locked while spawning, so the run cannot finish (and deregister) before it is
    /// registered.
    pub(super) fn spawn(
        &self,
        import: ObjectRef<CohortImport>,
        run_id: String,
        run: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        let mut runs = self.lock();
        if runs.contains_key(&import) {
            return false;
        }
        let handle = tokio::spawn(run);
        runs.insert(import, (run_id, handle.abort_handle()));
        true
    }

    pub(super) fn finished(&self, import: &ObjectRef<CohortImport>, run_id: &str) {
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

    pub(super) fn abort_all(&self) {
        for (_, (_, handle)) in self.lock().drain() {
            handle.abort();
        }
        for handle in self.side_tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            handle.abort();
        }
    }

    /// Spawns `task`, to be stopped with the runs ([`AbortRunsOnDrop`]): nothing this
    /// leadership started goes on after it ends.
    pub(super) fn spawn_side(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.side_tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task).abort_handle());
    }
}
