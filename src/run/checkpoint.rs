//! Sending a large run's changes under checkpoints ([`crate::snapshot::plan`]): as Braze
//! accepts requests, the accepted positions are written to the store every so many keys,
//! and the run sends no position past the permit the store holds.
//!
//! Two tasks of the run take part: the sender, whose input waits at the permit, and the
//! checkpointer, which hears of each finished request and writes a checkpoint when enough
//! was accepted since the last one, or when the sender nears (or waits at) the permit —
//! each write raising the permit ahead of the sender. A write that fails stops the sender
//! at the permit it has: a conflict means another attempt recorded its keys in doubt, and
//! this one must then send nothing its plan did not let it send.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, warn};

use crate::braze::{BrazeClient, Change, ChangesReport, CohortTarget, MAX_IDS_PER_REQUEST};
use crate::snapshot::plan::{PlanMeta, Progress};
use crate::snapshot::{SnapshotError, SnapshotStore};

/// Runs of fewer requests record no plan and write no checkpoint: a small run costs the
/// store what it always did.
pub const MIN_REQUESTS: u64 = 16;
/// About how many checkpoints a large run writes (one request each in the cluster store).
pub const CHECKPOINTS_PER_RUN: u64 = 512;
/// Requests accepted, at least, between two checkpoints.
pub const MIN_REQUESTS_BETWEEN: u64 = 4;
/// Tries of a checkpoint write that fails for a reason other than another attempt.
const WRITE_ATTEMPTS: u32 = 3;

/// How often a run checkpoints, in keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// Keys accepted between two checkpoints.
    pub every: u64,
    /// How far past the sender each checkpoint sets the permit.
    pub window: u64,
}

impl Cadence {
    /// The cadence of a run of `sends` changes to `target`; `None` for a small run (no plan).
    pub fn for_run(sends: u64, braze: &BrazeClient, target: &CohortTarget) -> Option<Cadence> {
        let config = braze.config();
        let per_request = target.max_per_request(config.max_ids_per_request).clamp(1, MAX_IDS_PER_REQUEST) as u64;
        Cadence::of(sends, per_request, config.max_in_flight.max(1) as u64)
    }

    /// For `sends` changes, `per_request` a request, `in_flight` requests at once. Pure.
    pub fn of(sends: u64, per_request: u64, in_flight: u64) -> Option<Cadence> {
        if sends < MIN_REQUESTS * per_request {
            return None;
        }
        let every = (sends / CHECKPOINTS_PER_RUN).max(MIN_REQUESTS_BETWEEN * per_request);
        // Room for what lands during a write, so the sender seldom waits for one; no more,
        // as what is below the permit and not accepted is sent again by the next two runs.
        Some(Cadence { every, window: every + in_flight * per_request })
    }
}

/// What sending under checkpoints did.
pub struct Checkpointed<R> {
    pub sent: ChangesReport,
    pub read: std::io::Result<R>,
    /// The progress as last known, and whether checkpoints stopped (the sender with them).
    pub progress: Progress,
    pub stopped: Option<SnapshotError>,
    /// Accepted keys the last checkpoint written holds.
    pub written: u64,
}

/// Sends what `read` produces, under the checkpoints of `plan` (recorded by `store` with the
/// run's keys in doubt, its permit the first one).
pub async fn send_checkpointed<R: Send + 'static>(
    braze: &BrazeClient,
    target: &CohortTarget,
    store: &dyn SnapshotStore,
    plan: &PlanMeta,
    cadence: Cadence,
    read: impl FnOnce(mpsc::Sender<Vec<Change>>) -> std::io::Result<R> + Send + 'static,
) -> Checkpointed<R> {
    let (tx, rx) = mpsc::channel::<Vec<Change>>(2);
    let reader = tokio::task::spawn_blocking(move || read(tx));
    let gate = Arc::new(Gate::new(plan.progress.permit));
    let changes = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
        .flat_map(futures::stream::iter)
        .enumerate()
        .then({
            let gate = gate.clone();
            move |(position, change)| {
                let gate = gate.clone();
                async move { gate.pass(position as u64).await.then_some(change) }
            }
        })
        .take_while(|change| std::future::ready(change.is_some()))
        .filter_map(std::future::ready);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let sending = braze.send_changes_with(target, changes, move |_, outcome| {
        let _ = done_tx.send((outcome.changes.clone(), outcome.accepted()));
    });
    let checkpointing = checkpointer(store, plan, cadence, done_rx, &gate);
    let (sent, (progress, written, stopped)) = tokio::join!(sending, checkpointing);
    let read = reader.await.expect("the change reader does not panic");
    Checkpointed { sent, read, progress, stopped, written }
}

/// Where the sender may go: positions below the permit, until checkpoints stop.
struct Gate {
    /// `None` once checkpoints stopped.
    permit: watch::Sender<Option<u64>>,
    /// The next position the sender wants.
    frontier: AtomicU64,
    /// The sender waits at the permit.
    waiting: Notify,
}

impl Gate {
    fn new(permit: u64) -> Self {
        Gate { permit: watch::Sender::new(Some(permit)), frontier: AtomicU64::new(0), waiting: Notify::new() }
    }

    /// Waits until `position` may be sent; `false` once it never may.
    async fn pass(&self, position: u64) -> bool {
        self.frontier.store(position, Ordering::Release);
        let mut permit = self.permit.subscribe();
        let allowed = |p: &Option<u64>| p.is_none_or(|p| position < p);
        if !allowed(&permit.borrow()) {
            self.waiting.notify_one();
        }
        match permit.wait_for(allowed).await {
            Ok(p) => p.is_some(),
            Err(_) => false,
        }
    }
}

/// Hears of each finished request; writes checkpoints; ends when the sender does. Returns
/// the progress known, the accepted keys written, and why checkpoints stopped, if they did.
async fn checkpointer(
    store: &dyn SnapshotStore,
    plan: &PlanMeta,
    cadence: Cadence,
    mut done: mpsc::UnboundedReceiver<(Range<u64>, bool)>,
    gate: &Gate,
) -> (Progress, u64, Option<SnapshotError>) {
    let mut progress = plan.progress.clone();
    let mut written = progress.accepted_keys();
    loop {
        let ended = tokio::select! {
            next = done.recv() => match next {
                Some((range, accepted)) => {
                    if accepted { progress.accept(range) }
                    false
                }
                None => true,
            },
            () = gate.waiting.notified() => false,
        };
        while let Ok((range, accepted)) = done.try_recv() {
            if accepted {
                progress.accept(range);
            }
        }
        if ended {
            return (progress, written, None);
        }
        let frontier = gate.frontier.load(Ordering::Acquire);
        let near = progress.permit.saturating_sub(frontier) <= cadence.window / 2;
        let accepted = progress.accepted_keys();
        if accepted - written < cadence.every && !near {
            continue;
        }
        progress.permit = progress.permit.max(frontier + cadence.window);
        match write(store, plan, &progress.capped()).await {
            Ok(()) => {
                written = accepted;
                gate.permit.send_replace(Some(progress.permit));
                debug!(run = %plan.run_id, accepted, permit = progress.permit, "checkpoint written");
            }
            Err(e) => {
                gate.permit.send_replace(None);
                return (progress, written, Some(e));
            }
        }
    }
}

/// One checkpoint write, tried again after trouble that is not another attempt's write.
async fn write(store: &dyn SnapshotStore, plan: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.checkpoint(plan, progress).await {
            Err(e @ (SnapshotError::Io { .. } | SnapshotError::Kube { .. })) if attempt < WRITE_ATTEMPTS => {
                warn!(run = %plan.run_id, error = %e, "checkpoint write failed; trying again");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_runs_write_no_checkpoint_and_large_ones_a_bounded_number() {
        assert_eq!(Cadence::of(15_999, 1000, 8), None, "fewer than 16 requests");
        let c = Cadence::of(16_000, 1000, 8).unwrap();
        assert_eq!((c.every, c.window), (4000, 12_000));
        let big = Cadence::of(1_600_000, 1000, 8).unwrap();
        assert_eq!(big.every, 4000, "the floor: 4 requests");
        let huge = Cadence::of(10_000_000, 1000, 8).unwrap();
        assert_eq!(huge.every, 19_531, "about 512 checkpoints");
        let track = Cadence::of(1_600_000, 75, 8).unwrap();
        assert_eq!((track.every, track.window), (3125, 3725));
        assert_eq!(Cadence::of(1199, 75, 8), None);
    }

    #[tokio::test]
    async fn the_gate_holds_the_sender_at_the_permit_until_it_rises_or_closes() {
        let gate = Arc::new(Gate::new(2));
        assert!(gate.pass(0).await && gate.pass(1).await);
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.pass(2).await }
        });
        gate.waiting.notified().await;
        assert_eq!(gate.frontier.load(Ordering::Acquire), 2);
        assert!(!waiting.is_finished());
        gate.permit.send_replace(Some(3));
        assert!(waiting.await.unwrap(), "the permit rose past it");
        let closed = tokio::spawn({
            let gate = gate.clone();
            async move { gate.pass(5).await }
        });
        gate.permit.send_replace(None);
        assert!(!closed.await.unwrap(), "checkpoints stopped: no further sends");
    }
}
