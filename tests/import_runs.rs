//! Import runs end to end against the Braze sandbox on loopback: exactness under random
//! churn, convergence after killed runs and Braze failures, the removal guard, dry runs.
//!
//! Every check compares the sandbox's actual cohort membership with the source.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use braze_sandbox::{Faults, RunningSandbox, SandboxUser, ScriptedFault};
use cohort_operator::api::{RemovalGuard, RunResult, RunTrigger};
use cohort_operator::braze::{BrazeClient, BrazeClientConfig, BrazeError, CohortTarget, RetryPolicy};
use cohort_operator::domain::guard::{BlockReason, RemovalApproval};
use cohort_operator::domain::identifiers::{SkipCounts, SkipReason};
use cohort_operator::domain::member::Member;
use cohort_operator::run::{ImportRun, RunDeps, RunError, RunReport, new_run_id, run_import};
use cohort_operator::snapshot::fs::FsSnapshotStore;
use cohort_operator::snapshot::{Missing, SnapshotStore};
use cohort_operator::source::{MemberBatch, MemberStream, SourceError};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

#[path = "support/braze.rs"]
mod braze_support;

const PARTNER: &str = "acme";
const PARTNER_KEY: &str = "partner-key-5b1c";
const IMPORT_KEY: &str = "import-key-9f2e";
const KEYS: braze_support::BrazeKeys =
    braze_support::BrazeKeys { partner: PARTNER, partner_key: PARTNER_KEY, import_key: IMPORT_KEY };
const COHORT: &str = "vip-users";

/// Member `i` of the pool the tests draw cohorts from; identifier kinds mixed.
fn pool_member(i: usize) -> Member {
    match i % 3 {
        0 => Member::ExternalId(format!("user-{i:05}")),
        1 => Member::Alias { name: format!("alias-{i:05}"), label: "crm".into() },
        _ => Member::DeviceId(format!("device-{i:05}")),
    }
}

fn sandbox_user(m: &Member) -> SandboxUser {
    match m {
        Member::ExternalId(id) => SandboxUser::identified(id),
        Member::Alias { name, label } => SandboxUser::alias(name, label),
        Member::DeviceId(id) => SandboxUser::anonymous(id),
    }
}

fn member_of(u: &SandboxUser) -> Member {
    if let Some(id) = &u.external_id {
        Member::ExternalId(id.clone())
    } else if let Some(a) = u.aliases.first() {
        Member::Alias { name: a.alias_name.clone(), label: a.alias_label.clone() }
    } else {
        Member::DeviceId(u.device_ids[0].clone())
    }
}

/// A source stream: batches of up to 700 members, each batch repeating a few members and
/// reporting a skipped row, the way real sources do.
fn source(members: &BTreeSet<Member>) -> MemberStream<'static> {
    let mut shuffled: Vec<Member> = members.iter().cloned().collect();
    shuffled.shuffle(&mut rand::rng());
    let batches: Vec<Result<MemberBatch, SourceError>> = shuffled
        .chunks(700)
        .map(|chunk| {
            let mut members = chunk.to_vec();
            members.extend(chunk.iter().take(3).cloned());
            let mut skipped = SkipCounts::default();
            skipped.record(SkipReason::Missing);
            Ok(MemberBatch { members, skipped })
        })
        .collect();
    futures::stream::iter(batches).boxed()
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(20),
        run_retry_budget: 100,
        max_server_wait: Duration::from_secs(1),
    }
}

fn client_config() -> BrazeClientConfig {
    BrazeClientConfig {
        max_in_flight: 4,
        // Small requests, so a run spans many and can be stopped between them.
        max_ids_per_request: 100,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        retry: fast_retries(),
        ..BrazeClientConfig::default()
    }
}

struct World {
    sandbox: RunningSandbox,
    braze: BrazeClient,
    target: CohortTarget,
    store: FsSnapshotStore,
    dir: tempfile::TempDir,
    cohort_name: String,
    /// Every run of this world uses this guard unless the test sets another.
    guard: Option<RemovalGuard>,
}

impl World {
    async fn new(pool: usize) -> World {
        let sandbox =
            braze_support::start_sandbox(KEYS, (0..pool).map(|i| sandbox_user(&pool_member(i))).collect()).await;
        let target = braze_support::target(&sandbox, KEYS, COHORT);
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path().join("snapshots"), "growth_vip");
        World {
            sandbox,
            braze: BrazeClient::new(client_config()).unwrap(),
            target,
            store,
            dir,
            cohort_name: "VIP users".into(),
            guard: None,
        }
    }

    fn run(&self) -> ImportRun {
        let mut run = ImportRun::new(
            new_run_id(jiff::Timestamp::now()),
            RunTrigger::Scheduled,
            "growth",
            "vip",
            &self.cohort_name,
        );
        run.identifier_fingerprint = "externalId=user_id;alias=alias/label=crm;deviceId=device".into();
        run.removal_guard = self.guard.clone();
        run.scratch_dir = self.dir.path().join("scratch");
        run
    }

    async fn import_with(&self, members: &BTreeSet<Member>, tweak: impl FnOnce(&mut ImportRun)) -> RunReport {
        let mut run = self.run();
        tweak(&mut run);
        self.import_stream(&run, source(members)).await
    }

    async fn import_stream(&self, run: &ImportRun, members: MemberStream<'static>) -> RunReport {
        let deps = RunDeps { members, snapshots: &self.store, braze: &self.braze, target: &self.target };
        run_import(run, deps).await
    }

    async fn import(&self, members: &BTreeSet<Member>) -> RunReport {
        self.import_with(members, |_| {}).await
    }

    fn braze_members(&self) -> BTreeSet<Member> {
        self.sandbox.members(PARTNER, COHORT).unwrap_or_default().iter().map(member_of).collect()
    }

    async fn generation(&self) -> u64 {
        self.store.load(self.dir.path()).await.unwrap().generation()
    }
}

/// Braze's members equal `expected`; on failure, says which are missing and which extra.
#[track_caller]
fn assert_braze_has(world: &World, expected: &BTreeSet<Member>, context: &str) {
    let actual = world.braze_members();
    if &actual != expected {
        let missing: Vec<_> = expected.difference(&actual).take(5).map(Member::to_string).collect();
        let extra: Vec<_> = actual.difference(expected).take(5).map(Member::to_string).collect();
        panic!(
            "{context}: Braze differs from the source: {} missing (e.g. {missing:?}), {} extra (e.g. {extra:?})",
            expected.difference(&actual).count(),
            actual.difference(expected).count(),
        );
    }
}

fn succeeded(report: &RunReport) {
    assert_eq!(report.result, RunResult::Succeeded, "{}: {:?}", report.message(), report.error);
}

fn seeded_rng(test: &str) -> StdRng {
    let seed: u64 = rand::random();
    eprintln!("{test}: random seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Removes up to `max_out` of `current` and adds up to `max_in` members of the pool that
/// are not in it (often ones removed earlier: re-adds).
fn churn(rng: &mut StdRng, current: &BTreeSet<Member>, pool: usize, max_out: usize, max_in: usize) -> BTreeSet<Member> {
    let mut next = current.clone();
    let members: Vec<Member> = current.iter().cloned().collect();
    let out = rng.random_range(0..=max_out.min(members.len()));
    for m in members.choose_multiple(rng, out) {
        next.remove(m);
    }
    let outside: Vec<Member> = (0..pool).map(pool_member).filter(|m| !current.contains(m)).collect();
    let add = rng.random_range(0..=max_in.min(outside.len()));
    next.extend(outside.choose_multiple(rng, add).cloned());
    next
}

fn random_cohort(rng: &mut StdRng, pool: usize, size: usize) -> BTreeSet<Member> {
    let all: Vec<Member> = (0..pool).map(pool_member).collect();
    all.choose_multiple(rng, size).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_churn_keeps_braze_exactly_equal_to_the_source() {
    let mut rng = seeded_rng("random_churn");
    let pool = 4000;
    let world = World::new(pool).await;
    let mut current = random_cohort(&mut rng, pool, 1500);
    let first = world.import(&current).await;
    succeeded(&first);
    assert!(first.cohort_named);
    assert_eq!((first.added, first.removed, first.cohort_size), (1500, 0, 1500));
    assert_braze_has(&world, &current, "after the run");

    for round in 1..=30 {
        let next = if round % 7 == 0 { current.clone() } else { churn(&mut rng, &current, pool, 140, 140) };
        let expected_added = next.difference(&current).count() as u64;
        let expected_removed = current.difference(&next).count() as u64;
        let report = world
            .import_with(&next, |run| {
                // Every other run sorts in a tiny budget, so spills and merges take part.
                if round % 2 == 1 {
                    run.sort_memory_budget = 64 * 1024;
                }
            })
            .await;
        succeeded(&report);
        assert_eq!(
            (report.added, report.removed, report.cohort_size),
            (expected_added, expected_removed, next.len() as u64),
            "round {round}"
        );
        assert_eq!(report.unchanged, next.intersection(&current).count() as u64);
        assert!(!report.cohort_named, "round {round}: the name did not change");
        assert_braze_has(&world, &next, &format!("round {round}: Braze differs from the source"));
        if expected_added + expected_removed == 0 {
            assert_eq!(report.requests, 0, "round {round}: nothing to send");
            assert_eq!(report.committed_generation, None);
        }
        current = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_skips_duplicates_and_spills() {
    let world = World::new(3000).await;
    let members: BTreeSet<Member> = (0..3000).map(pool_member).collect();
    let report = world.import_with(&members, |run| run.sort_memory_budget = 64 * 1024).await;
    succeeded(&report);
    // 5 batches of 700 or fewer, each with 3 repeats and one skipped row.
    assert_eq!(report.cohort_size, 3000);
    assert_eq!(report.duplicates, 5 * 3);
    assert_eq!(report.skipped.get(SkipReason::Missing), 5);
    assert_eq!(report.rows, 3000 + 5 * 3 + 5);
    assert!(report.spilled_runs > 1, "{}", report.spilled_runs);
    assert_eq!(report.requests, 1 + 30, "one naming, 30 requests of 100 ids");
    assert_eq!(report.accepted_adds, 3000);
    assert_braze_has(&world, &members, "after the run");
    let message = report.to_record().message;
    assert!(message.contains("3000 members") && message.contains("5 rows skipped"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_names_the_cohort_and_a_new_name_is_posted_again() {
    let mut world = World::new(30).await;
    let members: BTreeSet<Member> = (0..30).map(pool_member).collect();
    let report = world.import(&members).await;
    succeeded(&report);
    assert!(report.cohort_named);
    assert_eq!(world.sandbox.cohort_names(PARTNER), ["VIP users"]);

    world.cohort_name = "VIP customers".into();
    let before = world.sandbox.stats();
    let report = world.import(&members).await;
    succeeded(&report);
    assert!(report.cohort_named);
    assert_eq!(report.requests, 1, "only the naming");
    assert_eq!(world.sandbox.stats().users_requests, before.users_requests);
    assert_eq!(world.sandbox.cohort_names(PARTNER), ["VIP customers"]);
    assert_eq!(report.committed_generation, Some(2));

    let report = world.import(&members).await;
    succeeded(&report);
    assert_eq!((report.requests, report.committed_generation), (0, None));
    assert_braze_has(&world, &members, "after the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_cohort_id_starts_a_new_braze_cohort() {
    let mut world = World::new(30).await;
    let members: BTreeSet<Member> = (0..30).map(pool_member).collect();
    succeeded(&world.import(&members).await);
    world.target.cohort_id = "vip-users-v2".into();
    let report = world.import(&members).await;
    succeeded(&report);
    assert_eq!((report.added, report.removed), (30, 0));
    assert!(report.notes.iter().any(|n| n.contains("spec.cohort.id changed")), "{:?}", report.notes);
    let v2: BTreeSet<Member> = world.sandbox.members(PARTNER, "vip-users-v2").unwrap().iter().map(member_of).collect();
    assert_eq!(v2, members);
}

/// A new identifier mapping that leaves every key as it was changes nothing in Braze, but
/// is committed, so its note appears once rather than on every later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_mapping_with_the_same_keys_is_noted_once() {
    let world = World::new(30).await;
    let members: BTreeSet<Member> = (0..30).map(pool_member).collect();
    succeeded(&world.import(&members).await);
    let remap = |run: &mut ImportRun| run.identifier_fingerprint = "externalId=uid".into();
    let report = world.import_with(&members, remap).await;
    succeeded(&report);
    assert_eq!((report.added, report.removed, report.requests), (0, 0, 0));
    assert!(report.notes.iter().any(|n| n.contains("identifier mapping changed")), "{:?}", report.notes);
    assert_eq!(report.committed_generation, Some(2));
    let report = world.import_with(&members, remap).await;
    succeeded(&report);
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    assert_eq!(report.committed_generation, None);
}

/// Kills runs at random points — while sorting and diffing, between Braze requests, while
/// committing — sometimes several in a row with different sources, and checks that the next
/// complete run leaves Braze exactly equal to its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_killed_at_random_points_converge() {
    let mut rng = seeded_rng("killed_runs");
    let pool = 3000;
    let mut world = World::new(pool).await;
    world.guard = Some(RemovalGuard { max_removal_percent: 100, disabled: true });
    let world = std::sync::Arc::new(world);
    let mut current = random_cohort(&mut rng, pool, 800);
    succeeded(&world.import(&current).await);

    let mut kills = 0;
    for round in 0..16 {
        current = churn(&mut rng, &current, pool, 400, 400);
        let changes = current.len() as u64; // an upper bound on the requests' ids
        let stop_after = rng.random_range(0..=changes / 100 + 2);
        let base = world.sandbox.stats().users_requests;
        let task = {
            let world = world.clone();
            let next = current.clone();
            tokio::spawn(async move { world.import(&next).await })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !task.is_finished() && world.sandbox.stats().users_requests < base + stop_after {
            assert!(Instant::now() < deadline, "round {round}: the run neither finished nor sent");
            tokio::task::yield_now().await;
        }
        task.abort();
        match task.await {
            Err(e) if e.is_cancelled() => kills += 1,
            Err(e) => panic!("round {round}: the run panicked: {e}"),
            Ok(report) => succeeded(&report),
        }
        // Half the time another source comes before a run completes.
        if rng.random_bool(0.5) && round != 15 {
            continue;
        }
        let report = world.import(&current).await;
        succeeded(&report);
        assert_braze_has(&world, &current, &format!("round {round}: Braze differs after a killed run"));
        let doubt = world.store.load(world.dir.path()).await.unwrap().doubt;
        assert!(doubt.is_none(), "round {round}: a complete run settles every key in doubt");
    }
    assert!(kills > 0, "no run was killed; the test proved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_facing_braze_failures_converge() {
    let mut rng = seeded_rng("braze_failures");
    let pool = 3000;
    let mut world = World::new(pool).await;
    world.guard = Some(RemovalGuard { max_removal_percent: 100, disabled: true });
    world.braze = BrazeClient::new(BrazeClientConfig {
        retry: RetryPolicy { max_attempts: 2, run_retry_budget: 3, ..fast_retries() },
        ..client_config()
    })
    .unwrap();
    let mut current = random_cohort(&mut rng, pool, 600);
    succeeded(&world.import(&current).await);

    world.sandbox.set_faults(Faults {
        server_error_rate: 0.15,
        drop_rate: 0.05,
        locked_rate: 0.05,
        ..Faults::default()
    });
    let mut failures = 0;
    // Faults are random: go on past 12 rounds until one failed a run (one in four runs of
    // 12 rounds saw none), with a bound.
    for round in 0..60 {
        if round >= 12 && failures > 0 {
            break;
        }
        current = churn(&mut rng, &current, pool, 300, 300);
        let generation = world.generation().await;
        let report = world.import(&current).await;
        match report.result {
            RunResult::Succeeded => {
                assert_braze_has(&world, &current, &format!("round {round}"));
            }
            RunResult::Failed => {
                failures += 1;
                assert!(
                    matches!(report.error, Some(RunError::Changes { .. } | RunError::Naming(_))),
                    "round {round}: {:?}",
                    report.error
                );
                assert!(report.hint.as_deref().unwrap_or_default().contains("next run re-sends"), "{:?}", report.hint);
                assert_eq!(world.generation().await, generation, "round {round}: a failed run moved the snapshot");
                assert!(report.unsent > 0, "round {round}");
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert!(failures > 0, "Braze never failed a run; the test proved nothing");

    world.sandbox.set_faults(Faults::default());
    let report = world.import(&current).await;
    succeeded(&report);
    assert_braze_has(&world, &current, "after the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_fails_the_run_and_the_next_run_sends_what_is_missing() {
    let world = World::new(1000).await;
    let members: BTreeSet<Member> = (0..1000).map(pool_member).collect();
    // The naming and two requests pass; then Braze answers 503 to everything.
    let pass = ScriptedFault::Delay { delay_ms: 0 };
    world.sandbox.set_faults(Faults {
        script: [pass.clone(), pass.clone(), pass].into(),
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let report = world.import(&members).await;
    assert_eq!(report.result, RunResult::Failed);
    let Some(RunError::Changes { error, accepted, planned }) = &report.error else { panic!("{:?}", report.error) };
    assert!(!error.is_permanent(), "{error}");
    assert_eq!((*accepted, *planned), (200, 1000));
    assert_eq!(report.accepted_adds, 200);
    assert_eq!(report.unsent, 800);
    assert_eq!(world.braze_members().len(), 200);
    assert_eq!(world.generation().await, 0);

    world.sandbox.set_faults(Faults::default());
    let report = world.import(&members).await;
    succeeded(&report);
    assert_braze_has(&world, &members, "after the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_fail_the_run_with_what_to_do_and_nothing_advances() {
    let mut world = World::new(50).await;
    let members: BTreeSet<Member> = (0..50).map(pool_member).collect();
    let revoked = braze_support::BrazeKeys { import_key: "revoked-key", ..KEYS };
    world.target = braze_support::target_at(world.target.rest_endpoint.clone(), revoked, COHORT);
    let report = world.import(&members).await;
    assert_eq!(report.result, RunResult::Failed);
    assert!(matches!(report.error, Some(RunError::Naming(BrazeError::Unauthorized { .. }))), "{:?}", report.error);
    let message = report.message();
    assert!(message.contains("Technology Partners"), "{message}");
    assert!(!message.contains("revoked-key") && !format!("{report:?}").contains("revoked-key"));
    assert_eq!(world.generation().await, 0);

    world.target = braze_support::target_at(world.target.rest_endpoint.clone(), KEYS, COHORT);
    succeeded(&world.import(&members).await);
    assert_braze_has(&world, &members, "after the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_error_fails_the_run_before_anything_is_sent() {
    let world = World::new(100).await;
    let members: BTreeSet<Member> = (0..100).map(pool_member).collect();
    succeeded(&world.import(&members).await);
    let before = world.sandbox.stats().requests;
    let batch = MemberBatch { members: vec![pool_member(1)], skipped: SkipCounts::default() };
    let failing: MemberStream<'static> = futures::stream::iter(vec![
        Ok(batch),
        Err(SourceError::Query { what: "postgres query".into(), message: "relation \"users\" does not exist".into() }),
    ])
    .boxed();
    let report = world.import_stream(&world.run(), failing).await;
    assert_eq!(report.result, RunResult::Failed);
    assert!(matches!(report.error, Some(RunError::Source(_))), "{:?}", report.error);
    assert!(report.message().contains("relation \"users\" does not exist"), "{}", report.message());
    assert!(report.hint.as_deref().unwrap().contains("nothing was sent"));
    assert_eq!(world.sandbox.stats().requests, before);
    assert_eq!(world.generation().await, 1);
    assert_braze_has(&world, &members, "after the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_blocks_mass_removals_until_that_run_is_approved() {
    let world = World::new(100).await;
    let members: BTreeSet<Member> = (0..100).map(pool_member).collect();
    succeeded(&world.import(&members).await);
    let requests = world.sandbox.stats().requests;

    // An empty source while Braze holds 100.
    let report = world.import(&BTreeSet::new()).await;
    assert_eq!(report.result, RunResult::Blocked, "{}", report.message());
    let blocked = report.blocked.as_ref().unwrap();
    assert_eq!(blocked.reason, BlockReason::EmptySource);
    let message = report.to_record().message;
    assert!(
        message.contains("no member") && message.contains(&format!("cohorts.dev/approve-removals={}", report.run_id)),
        "{message}"
    );
    assert_eq!(world.sandbox.stats().requests, requests, "a blocked run sends nothing");
    assert_braze_has(&world, &members, "after the run");

    // 40 of 100 leaving: past the default 20%.
    let sixty: BTreeSet<Member> = (0..60).map(pool_member).collect();
    let blocked_run = world.import(&sixty).await;
    assert_eq!(blocked_run.result, RunResult::Blocked);
    let record = blocked_run.to_record();
    assert_eq!((record.removed, record.would_remove, record.cohort_size), (0, Some(40), 60));
    assert_eq!(blocked_run.blocked.as_ref().unwrap().reason, BlockReason::TooManyRemovals);
    assert_eq!(world.generation().await, 1);

    // An approval for fewer removals than the run makes does not cover it.
    let small = RemovalApproval { run_id: record.id.clone(), removals: 39 };
    let report = world.import_with(&sixty, |run| run.approval = Some(small)).await;
    assert_eq!(report.result, RunResult::Blocked);
    assert!(report.message().contains("covers 39 removals, not 40"), "{}", report.message());
    assert_eq!(world.sandbox.stats().requests, requests);

    // Approving the blocked run by its id and numbers lets it through.
    let approval = RemovalApproval { run_id: record.id.clone(), removals: record.planned_removals() };
    let report = world.import_with(&sixty, |run| run.approval = Some(approval)).await;
    succeeded(&report);
    assert_eq!(report.approved_run.as_deref(), Some(record.id.as_str()));
    assert_braze_has(&world, &sixty, "after the run");

    // A spec that opts out of the guard may empty the cohort.
    let report = world
        .import_with(&BTreeSet::new(), |run| {
            run.removal_guard = Some(RemovalGuard { max_removal_percent: 20, disabled: true })
        })
        .await;
    succeeded(&report);
    assert!(world.braze_members().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_the_diff_and_sends_nothing() {
    let world = World::new(200).await;
    let before: BTreeSet<Member> = (0..50).map(pool_member).collect();
    succeeded(&world.import(&before).await);
    let requests = world.sandbox.stats().requests;
    let after: BTreeSet<Member> = (5..50).chain(100..110).map(pool_member).collect();

    let report = world.import_with(&after, |run| run.dry_run = true).await;
    assert_eq!(report.result, RunResult::DryRun, "{}", report.message());
    assert_eq!((report.added, report.removed, report.cohort_size), (10, 5, 55));
    let removed: BTreeSet<Member> = (0..5).map(pool_member).collect();
    assert_eq!(report.sample_removed, removed.iter().map(Member::to_string).collect::<Vec<_>>(), "in key order");
    assert_eq!(report.sample_added.len(), 10);
    assert!(report.sample_added.iter().all(|s| after.iter().any(|m| &m.to_string() == s)));
    assert!(report.message().starts_with("dry run, nothing sent: would add 10 and remove 5"), "{}", report.message());
    assert_eq!(world.sandbox.stats().requests, requests);
    let loaded = world.store.load(world.dir.path()).await.unwrap();
    assert_eq!(loaded.generation(), 1);
    assert!(loaded.doubt.is_none(), "a dry run records nothing");
    assert_braze_has(&world, &before, "after the run");

    // A dry run past the guard says it would be blocked, and still sends nothing.
    let report = world.import_with(&BTreeSet::new(), |run| run.dry_run = true).await;
    assert_eq!(report.result, RunResult::DryRun);
    assert!(report.blocked.is_some());
    assert!(report.message().contains("the removal guard would block it"), "{}", report.message());

    let report = world.import(&after).await;
    succeeded(&report);
    assert_eq!((report.added, report.removed), (10, 5));
    assert_braze_has(&world, &after, "after the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_blocks_the_run_until_a_resync() {
    let world = World::new(20).await;
    let members: BTreeSet<Member> = (0..20).map(pool_member).collect();
    succeeded(&world.import(&members).await);
    let path = world.store.path().to_owned();
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 5);
    std::fs::write(&path, bytes).unwrap();
    // What Braze holds is unknown: nothing is sent.
    let fewer: BTreeSet<Member> = (0..15).map(pool_member).collect();
    let report = world.import(&fewer).await;
    assert_eq!(report.result, RunResult::Blocked, "{}", report.message());
    let missing = report.snapshot_missing.as_ref().map(|m| &m.missing);
    assert!(matches!(missing, Some(Missing::Damaged { .. })), "{missing:?}");
    assert_eq!(report.requests, 0);
    assert!(report.hint.as_deref().unwrap().contains("approve a resync"));
    assert!(report.message().contains("cohort-operator resync vip -n growth"), "{}", report.message());
    assert_braze_has(&world, &members, "after the blocked run");
    // A resync forgets the damaged store and sends the whole source as additions.
    let blocked = report.run_id.clone();
    let report = world.import_with(&fewer, |run| run.resync = Some(blocked)).await;
    succeeded(&report);
    assert_eq!((report.added, report.removed), (15, 0));
    assert!(report.message().contains("members who left while the snapshot was lost could not be removed"));
    assert_braze_has(&world, &members, "members who left stay: nothing can tell who they are");
}
