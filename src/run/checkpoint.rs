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
//!
//! Checkpoints are also paced in time: at most one per [`Cadence::min_interval`] (a quarter
//! second by default), however fast Braze accepts, so a run costs the store at most four
//! head updates a second. To keep a fast sender from waiting at the permit between two
//! writes, each write sets the permit at least twice as far past the sender as it went in
//! one interval since the last write ([`Pace`]). The price: when Braze is faster than the
//! cadence in keys, an interruption re-sends what Braze accepted since the last write — up
//! to a quarter second of traffic, about what a few requests in flight hold — besides what
//! was in flight. (Under the Lease what the run was permitted to send and did not is sent
//! once by the next attempt, [`crate::snapshot::plan`]; without it, by every later one until
//! a commit.)

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
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
/// Least time between two checkpoints of a run, by default.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// How often a run checkpoints, in keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// Keys accepted between two checkpoints.
    pub every: u64,
    /// How far past the sender each checkpoint sets the permit, at least.
    pub window: u64,
    /// Least time between two checkpoints.
    pub min_interval: Duration,
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
        Some(Cadence { every, window: every + in_flight * per_request, min_interval: MIN_INTERVAL })
    }

    /// This cadence with at least `min_interval` between two checkpoints.
    pub fn paced(self, min_interval: Duration) -> Cadence {
        Cadence { min_interval, ..self }
    }
}

/// When the next checkpoint may be written, and how far past the sender it sets the permit.
struct Pace {
    min_interval: Duration,
    /// When the last checkpoint was written (or sending began), and the sender's position then.
    last_at: Instant,
    last_frontier: u64,
    /// How far past the sender the last checkpoint set the permit.
    window: u64,
}

impl Pace {
    fn new(cadence: &Cadence, now: Instant) -> Pace {
        Pace { min_interval: cadence.min_interval, last_at: now, last_frontier: 0, window: cadence.window }
    }

    /// The earliest time of the next write.
    fn next_at(&self) -> Instant {
        self.last_at + self.min_interval
    }

    /// A write at `now` with the sender at `frontier`: the window it sets past the sender —
    /// the cadence's, or twice what the sender covers in one interval at its pace since the
    /// last write, whichever is more; doubled when the sender was `blocked` at the permit
    /// (its pace was the window's, not its own).
    fn wrote(&mut self, cadence: &Cadence, frontier: u64, now: Instant, blocked: bool) -> u64 {
        let elapsed = now.saturating_duration_since(self.last_at).as_secs_f64().max(1e-3);
        let covered = frontier.saturating_sub(self.last_frontier) as f64;
        let paced = (2.0 * covered * self.min_interval.as_secs_f64() / elapsed).ceil() as u64;
        let grown = if blocked { self.window.saturating_mul(2) } else { 0 };
        self.window = cadence.window.max(paced).max(grown);
        (self.last_at, self.last_frontier) = (now, frontier);
        self.window
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
    // A `/users/track` 201 listing per-object errors is accepted: its whole range is settled,
    // as a commit settles those rejections (the run reports them); they are not sent again.
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

/// Hears of each finished request; writes checkpoints, at most one per interval; ends when
/// the sender does. Returns the progress known, the accepted keys written, and why
/// checkpoints stopped, if they did.
async fn checkpointer(
    store: &dyn SnapshotStore,
    plan: &PlanMeta,
    cadence: Cadence,
    mut done: mpsc::UnboundedReceiver<(Range<u64>, bool)>,
    gate: &Gate,
) -> (Progress, u64, Option<SnapshotError>) {
    let mut progress = plan.progress.clone();
    let mut written = progress.accepted_keys();
    let mut pace = Pace::new(&cadence, Instant::now());
    // A write is due but its interval has not passed: wake when it has.
    let mut due = false;
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
            () = tokio::time::sleep_until(pace.next_at()), if due => false,
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
        let near = progress.permit.saturating_sub(frontier) <= pace.window / 2;
        // The sender waits at the permit: the window was too small for its pace (a run's
        // start). Written at once, doubling the window, so it never waits out an interval.
        let blocked = frontier >= progress.permit;
        let accepted = progress.accepted_keys();
        due = accepted - written >= cadence.every || near;
        let now = Instant::now();
        if !due || (now < pace.next_at() && !blocked) {
            continue;
        }
        due = false;
        let window = pace.wrote(&cadence, frontier, now, blocked);
        progress.permit = progress.permit.max(frontier + window);
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
        assert_eq!(c.min_interval, MIN_INTERVAL);
        assert_eq!(c.paced(Duration::ZERO).min_interval, Duration::ZERO);
    }

    #[test]
    fn the_window_grows_with_the_senders_pace_and_never_below_the_cadence() {
        let cadence = Cadence::of(16_000, 1000, 8).unwrap().paced(Duration::from_secs(1));
        let start = Instant::now();
        let mut pace = Pace::new(&cadence, start);
        assert_eq!(pace.next_at(), start + Duration::from_secs(1));
        // 30,000 keys in two seconds: 15,000 an interval, twice that past the sender.
        assert_eq!(pace.wrote(&cadence, 30_000, start + Duration::from_secs(2), false), 30_000);
        assert_eq!(pace.next_at(), start + Duration::from_secs(3));
        // A slow sender: the cadence's window.
        assert_eq!(pace.wrote(&cadence, 31_000, start + Duration::from_secs(4), false), cadence.window);
        // The sender waited at the permit: its pace was the window's, so the window doubles.
        assert_eq!(pace.wrote(&cadence, 31_000, start + Duration::from_secs(5), true), 2 * cadence.window);
        // Unpaced (zero interval): always the cadence's window.
        let unpaced = cadence.paced(Duration::ZERO);
        let mut pace = Pace::new(&unpaced, start);
        assert_eq!(pace.wrote(&unpaced, 1_000_000, start + Duration::from_millis(1), false), unpaced.window);
    }

    /// Counts checkpoint writes; the checkpointer calls nothing else.
    #[derive(Default)]
    struct Counting(std::sync::Mutex<Vec<Progress>>);

    #[async_trait::async_trait]
    impl SnapshotStore for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn load(&self, _: &std::path::Path) -> Result<crate::snapshot::Loaded, SnapshotError> {
            unreachable!("the checkpointer only checkpoints")
        }
        async fn record_doubt(&self, _: &crate::snapshot::DoubtMeta, _: &std::path::Path) -> Result<(), SnapshotError> {
            unreachable!("the checkpointer only checkpoints")
        }
        async fn record_doubt_with_plan(
            &self,
            _: &crate::snapshot::DoubtMeta,
            _: &std::path::Path,
            _: &PlanMeta,
            _: &std::path::Path,
        ) -> Result<bool, SnapshotError> {
            unreachable!("the checkpointer only checkpoints")
        }
        async fn checkpoint(&self, _: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
            self.0.lock().unwrap().push(progress.clone());
            Ok(())
        }
        async fn commit(&self, _: &crate::snapshot::SnapshotMeta, _: &std::path::Path) -> Result<(), SnapshotError> {
            unreachable!("the checkpointer only checkpoints")
        }
        async fn delete(&self) -> Result<(), SnapshotError> {
            unreachable!("the checkpointer only checkpoints")
        }
    }

    /// A plan of `additions` keys to add, its permit the cadence's first window.
    fn additions_plan(additions: u64, cadence: &Cadence) -> PlanMeta {
        PlanMeta {
            format: 1,
            base_generation: 0,
            cohort_id: "vip".into(),
            run_id: "r".into(),
            recorded_at: jiff::Timestamp::UNIX_EPOCH,
            keys: [0, additions, 0, 0, 0],
            bytes: [0; crate::snapshot::plan::SECTIONS],
            progress: Progress { accepted: Vec::new(), permit: cadence.window },
            lease: None,
        }
    }

    /// A Braze that accepts a request every 2 ms, with a cadence that asks for a checkpoint
    /// after each: one write per interval at most, and the permit stays ahead of the sender.
    #[tokio::test]
    async fn a_fast_braze_gets_at_most_one_checkpoint_an_interval() {
        let interval = Duration::from_millis(200);
        let cadence = Cadence { every: 10, window: 50, min_interval: interval };
        let plan = additions_plan(1_000_000, &cadence);
        let (store, gate) = (Counting::default(), Gate::new(cadence.window));
        let (tx, rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let feeding = async {
            let mut position = 0;
            while started.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(2)).await;
                tx.send((position..position + 10, true)).unwrap();
                position += 10;
                gate.frontier.store(position, Ordering::Release);
            }
            drop(tx);
            position
        };
        let ((progress, _, stopped), sent) = tokio::join!(checkpointer(&store, &plan, cadence, rx, &gate), feeding);
        assert!(stopped.is_none());
        let writes = store.0.lock().unwrap().len() as u32;
        let most = started.elapsed().as_millis() as u32 / interval.as_millis() as u32 + 1;
        assert!((2..=most).contains(&writes), "{writes} checkpoints in {:?}", started.elapsed());
        assert!(progress.permit > sent, "the permit ({}) stayed ahead of the sender ({sent})", progress.permit);
    }

    /// A sender at full speed from the start reaches the first permit at once: it gets a
    /// checkpoint then, with the window doubled, and never waits out the interval (an hour
    /// here: had the checkpointer held it, the send would not end within a minute).
    #[tokio::test]
    async fn a_sender_waiting_at_the_permit_is_not_held_for_the_interval() {
        let cadence = Cadence { every: 1_000_000, window: 50, min_interval: Duration::from_secs(3600) };
        let plan = additions_plan(10_000, &cadence);
        let (store, gate) = (Counting::default(), Gate::new(cadence.window));
        let (tx, rx) = mpsc::unbounded_channel();
        let sending = async {
            for position in 0..10_000u64 {
                assert!(gate.pass(position).await, "checkpoints go on");
                tx.send((position..position + 1, true)).unwrap();
            }
            drop(tx);
        };
        let both = async { tokio::join!(checkpointer(&store, &plan, cadence, rx, &gate), sending) };
        let ((progress, _, stopped), ()) =
            tokio::time::timeout(Duration::from_secs(60), both).await.expect("the sender was held at the permit");
        assert!(stopped.is_none());
        let writes = store.0.lock().unwrap().len();
        assert!((1..=10).contains(&writes), "{writes} checkpoints: the window doubles each time");
        assert!(progress.permit >= 10_000);
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
