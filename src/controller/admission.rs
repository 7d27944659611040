//! Run admission: which waiting run starts when a slot frees up.
//!
//! At a busy minute (06:00, 00:00) hundreds of runs become due at once, far more than
//! `--max-concurrent-runs`. They wait here, and are admitted round-robin by namespace: each
//! time a slot frees up, the next namespace in turn that has a run waiting and is under
//! `--max-concurrent-runs-per-namespace` gets it, and goes to the back of the line. So a
//! team with 900 imports at 06:00 cannot push the run of a team with one to the end of the
//! minute; within a namespace, runs start in the order they became due.
//!
//! [`FairQueue`] is the pure decision (no clock, no tasks); [`Admission`] hands its
//! decisions to the waiting run tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Runs waiting for a slot, and the slots taken, by namespace.
#[derive(Debug)]
pub struct FairQueue<T> {
    /// Runs at once in all.
    cap: usize,
    /// Runs at once in one namespace.
    per_namespace: usize,
    running: usize,
    running_in: HashMap<String, usize>,
    /// Namespaces with runs waiting, in turn order.
    turn: VecDeque<String>,
    waiting: HashMap<String, VecDeque<T>>,
}

impl<T> FairQueue<T> {
    pub fn new(cap: usize, per_namespace: usize) -> Self {
        FairQueue {
            cap: cap.max(1),
            per_namespace: per_namespace.max(1),
            running: 0,
            running_in: HashMap::new(),
            turn: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }

    /// A run of `namespace` waits for a slot; a namespace new to the line goes to its back.
    pub fn push(&mut self, namespace: &str, waiter: T) {
        let queue = self.waiting.entry(namespace.to_owned()).or_default();
        if queue.is_empty() {
            self.turn.push_back(namespace.to_owned());
        }
        queue.push_back(waiter);
    }

    /// The next run to admit, if a slot is free and a namespace under its cap has one
    /// waiting: the first such namespace in turn, which then goes to the back. The slot
    /// counts as taken until [`FairQueue::release`].
    pub fn admit(&mut self) -> Option<(String, T)> {
        if self.running >= self.cap {
            return None;
        }
        let position = self.turn.iter().position(|ns| self.running_here(ns) < self.per_namespace)?;
        let namespace = self.turn.remove(position)?;
        let queue = self.waiting.get_mut(&namespace)?;
        let waiter = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&namespace);
        } else {
            self.turn.push_back(namespace.clone());
        }
        self.running += 1;
        *self.running_in.entry(namespace.clone()).or_default() += 1;
        Some((namespace, waiter))
    }

    /// A run of `namespace` admitted earlier has ended; its slot is free.
    pub fn release(&mut self, namespace: &str) {
        self.running = self.running.saturating_sub(1);
        if let Some(count) = self.running_in.get_mut(namespace) {
            *count -= 1;
            if *count == 0 {
                self.running_in.remove(namespace);
            }
        }
    }

    /// Runs waiting in all.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    fn running_here(&self, namespace: &str) -> usize {
        self.running_in.get(namespace).copied().unwrap_or(0)
    }
}

/// The run slots of this process, admitted through a [`FairQueue`].
#[derive(Clone)]
pub struct Admission {
    queue: Arc<Mutex<FairQueue<oneshot::Sender<Admitted>>>>,
}

/// A run's slot, freed when dropped.
pub struct Admitted {
    queue: Option<Arc<Mutex<FairQueue<oneshot::Sender<Admitted>>>>>,
    namespace: String,
}

impl Admission {
    pub fn new(cap: usize, per_namespace: usize) -> Self {
        Admission { queue: Arc::new(Mutex::new(FairQueue::new(cap, per_namespace))) }
    }

    /// Waits for a slot for a run of `namespace`. Dropping the future (the run aborted)
    /// gives up its place, or the slot it was just given.
    pub async fn admit(&self, namespace: &str) -> Admitted {
        let (tx, rx) = oneshot::channel();
        self.lock().push(namespace, tx);
        dispatch(&self.queue);
        rx.await.expect("a waiter is only dropped by being admitted")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue<oneshot::Sender<Admitted>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands free slots to waiting runs. A run that stopped waiting (its receiver dropped)
/// gives its slot back at once and the next one is tried.
fn dispatch(queue: &Arc<Mutex<FairQueue<oneshot::Sender<Admitted>>>>) {
    loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).admit();
        let Some((namespace, waiter)) = next else {
            return;
        };
        let admitted = Admitted { queue: Some(queue.clone()), namespace };
        if let Err(mut refused) = waiter.send(admitted) {
            // Released here rather than by its drop, which would dispatch again (recursion).
            refused.queue = None;
            queue.lock().unwrap_or_else(|e| e.into_inner()).release(&refused.namespace);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.lock().unwrap_or_else(|e| e.into_inner()).release(&self.namespace);
            dispatch(&queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Admits until no slot is free, releasing none.
    fn admit_all<T>(q: &mut FairQueue<T>) -> Vec<(String, T)> {
        std::iter::from_fn(|| q.admit()).collect()
    }

    #[test]
    fn namespaces_take_turns_whatever_the_order_runs_became_due() {
        let mut q = FairQueue::new(100, 100);
        for i in 0..5 {
            q.push("big", i);
        }
        q.push("small", 10);
        q.push("other", 20);
        q.push("other", 21);
        let order: Vec<_> = admit_all(&mut q).into_iter().map(|(ns, id)| format!("{ns}:{id}")).collect();
        assert_eq!(
            order,
            ["big:0", "small:10", "other:20", "big:1", "other:21", "big:2", "big:3", "big:4"],
            "round-robin by namespace, first-due first within one"
        );
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_full_process_admits_nothing_until_a_slot_is_released() {
        let mut q = FairQueue::new(2, 10);
        for i in 0..3 {
            q.push("a", i);
        }
        q.push("b", 9);
        let first: Vec<_> = admit_all(&mut q).into_iter().map(|(_, id)| id).collect();
        assert_eq!(first, [0, 9], "two slots: b's run comes before a's second");
        assert!(q.admit().is_none());
        q.release("b");
        assert_eq!(q.admit(), Some(("a".to_owned(), 1)));
        assert!(q.admit().is_none());
        q.release("a");
        assert_eq!(q.admit(), Some(("a".to_owned(), 2)));
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_namespace_at_its_cap_is_passed_over_not_blocking_the_others() {
        let mut q = FairQueue::new(10, 1);
        q.push("a", 1);
        q.push("a", 2);
        q.push("b", 3);
        q.push("b", 4);
        let admitted: Vec<_> = admit_all(&mut q).into_iter().map(|(_, id)| id).collect();
        assert_eq!(admitted, [1, 3], "one each: both namespaces at their cap");
        q.release("b");
        assert_eq!(q.admit(), Some(("b".to_owned(), 4)), "a is still at its cap");
        assert!(q.admit().is_none());
        q.release("a");
        assert_eq!(q.admit(), Some(("a".to_owned(), 2)));
    }

    #[test]
    fn caps_of_zero_mean_one() {
        let mut q = FairQueue::new(0, 0);
        q.push("a", 1);
        q.push("a", 2);
        assert_eq!(admit_all(&mut q).len(), 1);
    }

    #[tokio::test]
    async fn a_run_that_stops_waiting_gives_its_turn_away() {
        let admission = Admission::new(1, 1);
        let first = admission.admit("a").await;
        let gone = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit("b").await }
        });
        let next = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit("c").await }
        });
        // Both wait behind `first`; b is aborted while waiting.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while admission.lock().waiting() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "both runs wait");
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(first);
        let c = tokio::time::timeout(Duration::from_secs(5), next).await.expect("c is admitted").unwrap();
        assert_eq!(c.namespace, "c");
        drop(c);
        let again = tokio::time::timeout(Duration::from_secs(5), admission.admit("a")).await;
        assert!(again.is_ok(), "every slot came back");
    }
}
