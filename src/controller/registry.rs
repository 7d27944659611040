//! The runs this replica has in progress, and the other tasks of its leadership: what is
//! running where, which run's end is already in status, and stopping them all at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kube::runtime::reflector::ObjectRef;
use tokio::task::AbortHandle;

use crate::api::CohortImport;

/// One attempt of a run in this process: what leaves the registry names the attempt it
/// was made for, so that a later attempt (even of the same run) is never removed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ticket(u64);

/// A run in progress here: its attempt, and how to stop its task (`None` while it is
/// being spawned; `stop` then says whether to stop it once it is).
struct Entry {
    ticket: Ticket,
    handle: Option<AbortHandle>,
    stop: bool,
}

impl Entry {
    fn stop(&mut self) {
        self.stop = true;
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// The runs this replica has in progress.
#[derive(Default)]
pub struct RunRegistry {
    runs: Mutex<HashMap<ObjectRef<CohortImport>, Entry>>,
    tickets: AtomicU64,
    /// Every run was stopped for good ([`Self::abort_all`]): one being spawned stops too.
    closed: AtomicBool,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<CohortImport>, Entry>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for the next attempt to [`Self::spawn`].
    pub(super) fn ticket(&self) -> Ticket {
        Ticket(self.tickets.fetch_add(1, Ordering::Relaxed))
    }

    /// Spawns `run` for `import` unless one is already in progress. The run is registered
    /// before its task exists, so it cannot finish (and deregister) first; the registry is
    /// not locked while spawning, since a future tokio drops at once (a runtime shutting
    /// down) deregisters from its drop.
    pub(super) fn spawn(
        &self,
        import: ObjectRef<CohortImport>,
        ticket: Ticket,
        run: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        {
            let mut runs = self.lock();
            if runs.contains_key(&import) {
                drop(runs);
                drop(run); // its guard deregisters nothing: the ticket was never registered
                return false;
            }
            runs.insert(import.clone(), Entry { ticket, handle: None, stop: false });
        }
        let handle = tokio::spawn(run).abort_handle();
        let mut runs = self.lock();
        match runs.get_mut(&import) {
            Some(entry) if entry.ticket == ticket => {
                entry.handle = Some(handle);
                if entry.stop || self.closed.load(Ordering::Acquire) {
                    entry.stop();
                }
            }
            // Finished already, or every run was stopped meanwhile.
            _ if self.closed.load(Ordering::Acquire) => handle.abort(),
            _ => {}
        }
        true
    }

    /// The attempt of `ticket` has stopped (an attempt never spawned changes nothing).
    pub(super) fn finished(&self, import: &ObjectRef<CohortImport>, ticket: Ticket) {
        let mut runs = self.lock();
        if runs.get(import).is_some_and(|entry| entry.ticket == ticket) {
            runs.remove(import);
        }
    }

    /// Stops the run of `import` in progress here, if any. The run stays registered — no
    /// other attempt of the import starts here — until its own tasks have stopped
    /// ([`Self::finished`]). Returns whether a run was stopping.
    pub(super) fn abort(&self, import: &ObjectRef<CohortImport>) -> bool {
        let mut runs = self.lock();
        let Some(entry) = runs.get_mut(import) else { return false };
        entry.stop();
        true
    }

    /// Stops every run and side task for good: the leadership ended.
    pub(super) fn abort_all(&self) {
        self.closed.store(true, Ordering::Release);
        for (_, mut entry) in self.lock().drain() {
            entry.stop();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// What a run's task holds: leaves the registry when dropped, as `runs::Deregister` does.
    struct Leaves(Arc<RunRegistry>, ObjectRef<CohortImport>, Ticket);

    impl Drop for Leaves {
        fn drop(&mut self) {
            self.0.finished(&self.1, self.2);
        }
    }

    /// Waits until the import's run has left the registry (fails after 5 s).
    async fn stopped(runs: &RunRegistry) {
        let wait = async {
            while runs.is_running(&import()) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), wait).await.expect("the run leaves the registry");
    }

    fn import() -> ObjectRef<CohortImport> {
        ObjectRef::new("daily").within("team-a")
    }

    #[tokio::test]
    async fn a_stopped_run_holds_its_import_until_its_task_has_stopped() {
        let runs = Arc::new(RunRegistry::default());
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let first = runs.ticket();
        let leaves = Leaves(runs.clone(), import(), first);
        assert!(runs.spawn(import(), first, async move {
            let _leaves = leaves;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        }));
        started.await.unwrap();
        assert!(runs.abort(&import()), "a run was in progress");
        // Until the task has stopped, no other attempt of the import starts here — and an
        // attempt refused meanwhile (its guard dropped unspawned) does not remove it.
        let refused = runs.ticket();
        let guard = Leaves(runs.clone(), import(), refused);
        assert!(!runs.spawn(import(), refused, async move { drop(guard) }), "stopping, not stopped");
        assert!(runs.is_running(&import()), "the stopping attempt is still registered");
        stopped(&runs).await;
        assert!(!runs.abort(&import()), "nothing left to stop");
        assert!(runs.spawn(import(), runs.ticket(), async {}));
    }

    #[tokio::test]
    async fn a_run_stopped_before_it_first_ran_leaves_the_registry() {
        let runs = Arc::new(RunRegistry::default());
        let ticket = runs.ticket();
        let leaves = Leaves(runs.clone(), import(), ticket);
        // The current-thread runtime has not polled the task when it is aborted.
        assert!(runs.spawn(import(), ticket, async move {
            let _leaves = leaves;
            std::future::pending::<()>().await;
        }));
        assert!(runs.abort(&import()));
        stopped(&runs).await;
    }
}
