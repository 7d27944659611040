//! Import-run benchmark against the Braze sandbox on loopback.
//!
//! `cargo bench --bench import` (add `-- --quick`, or set `IMPORT_BENCH_QUICK=1`, for
//! 10× smaller sizes). The sandbox enforces Braze's documented limit of the partner cohort
//! import endpoints, 250,000 requests an hour (lowercase `x-ratelimit-limit`,
//! `x-ratelimit-remaining`, `x-ratelimit-reset` in epoch seconds on every answer, 429 past
//! it). Prints, for each scenario, members per second and the peak RSS of the process that
//! ran the import:
//! 1. the sandbox's raw capacity: the same 1,000-id bodies sent by a bare load loop with as
//!    many requests in flight as the client uses — the ceiling for any import;
//! 2. a first import of 1,000,000 members (every member sent, 1,000 ids per request), side
//!    by side with a plain sender (`benches/plain_sender.py`, Debian's `python3`, standard
//!    library only): the same requests — the naming, then the members 1,000 ids a request,
//!    as many at once as the operator's client — from a script that does nothing else.
//!    [`ROUNDS`] rounds, alternating, each into a fresh cohort; for each: seconds, the
//!    requests the sandbox received and how many it answered 429, and the operator's wait
//!    for budget (goal, issue 21: the operator no slower than the plain sender, no 429);
//! 3. an import of 10,000,000 members with 1% churn (100,000 leave, 100,000 join) against a
//!    10,000,000-member snapshot on the filesystem store;
//! 4. by custom attribute (`method: Attribute`, `/users/track`, 75 users a request, under
//!    the sandbox's default limit — Braze's documented 3,000 requests per 3 s): a first
//!    import of 1,000,000 members, then 1% churn of it (10,000 leave, 10,000 join).
//!
//! The sandbox runs in this process; each import runs in a child process (this binary again)
//! so its peak RSS (`VmHWM`) is its own. Sources are generated on the fly in a scrambled
//! order, so the sorter does real work.

use std::io::BufWriter;
use std::time::{Duration, Instant};

use braze_sandbox::bench::BenchConfig;
use braze_sandbox::{Faults, RateLimit, RunningSandbox, SandboxUser};
use cohort_operator::api::{AttributeShape, RemovalGuard, RunResult, RunTrigger};
use cohort_operator::braze::{BrazeClient, BrazeClientConfig};
use cohort_operator::domain::member::Member;
use cohort_operator::run::{ImportRun, RunDeps, run_import};
use cohort_operator::snapshot::format::BodyWriter;
use cohort_operator::snapshot::fs::FsSnapshotStore;
use cohort_operator::snapshot::{FORMAT_VERSION, SnapshotMeta, SnapshotStore};
use cohort_operator::source::{MemberBatch, MemberStream};
use futures::StreamExt;
use testkit::bench::{child_result, peak_rss_mib, print_result};

#[path = "../tests/support/braze.rs"]
mod braze_support;
use braze_support::{BrazeKeys, REST_API_KEY};

const PARTNER: &str = "bench";
const PARTNER_KEY: &str = "bench-partner-key";
const IMPORT_KEY: &str = "bench-import-key";
const KEYS: BrazeKeys = BrazeKeys { partner: PARTNER, partner_key: PARTNER_KEY, import_key: IMPORT_KEY };
const BATCH: u64 = 10_000;
/// Multiplier of the scrambled order; a prime that shares no factor with the sizes used.
const SCRAMBLE: u64 = 7_368_787;
/// Braze's documented limit of the partner cohort import endpoints.
const BRAZE_REQUESTS_PER_HOUR: u64 = 250_000;
/// Side-by-side rounds of the first import (operator, then plain sender, each round).
const ROUNDS: usize = 3;

fn user(i: u64) -> String {
    format!("user-{i:08}")
}

/// Source of ids `0..universe` in scrambled order, leaving out those `skip` says.
fn generated_source(universe: u64, skip: impl Fn(u64) -> bool + Send + Sync + 'static) -> MemberStream<'static> {
    futures::stream::iter((0..universe.div_ceil(BATCH)).map(move |b| {
        let members = (b * BATCH..((b + 1) * BATCH).min(universe))
            .map(|k| (k * SCRAMBLE) % universe)
            .filter(|&i| !skip(i))
            .map(|i| Member::ExternalId(user(i)))
            .collect();
        Ok(MemberBatch { members, ..MemberBatch::default() })
    }))
    .boxed()
}

const CHURN_BASE: u64 = 10_000_000;

/// Child: runs one import and prints `RESULT <json>`.
fn child(scenario: &str) {
    let url = std::env::var("IMPORT_BENCH_URL").expect("IMPORT_BENCH_URL");
    let dir = std::path::PathBuf::from(std::env::var("IMPORT_BENCH_DIR").expect("IMPORT_BENCH_DIR"));
    let size: u64 = std::env::var("IMPORT_BENCH_SIZE").expect("IMPORT_BENCH_SIZE").parse().unwrap();
    // The cohort (and its snapshot): the scenario's own unless the parent names one.
    let cohort = std::env::var("IMPORT_BENCH_COHORT").unwrap_or_else(|_| scenario.to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let by_attribute = scenario.starts_with("attr-");
        let target = match by_attribute {
            false => braze_support::target_at(url, KEYS, &cohort),
            true => braze_support::attribute_target(url, REST_API_KEY, "cohorts", AttributeShape::Array, "attr"),
        };
        let braze = BrazeClient::new(BrazeClientConfig::default()).unwrap();
        let store = FsSnapshotStore::new(dir.join("snapshots"), if by_attribute { "attr" } else { &cohort });
        let source = match scenario {
            "first" | "attr-first" => generated_source(size, |_| false),
            // 1% churn: every 100th of the snapshot's ids leaves; as many new ids join.
            "churn" | "attr-churn" => generated_source(size + size / 100, move |i| i < size && i % 100 == 0),
            other => panic!("unknown scenario {other}"),
        };
        let mut run = ImportRun::new("bench", RunTrigger::Manual, "bench", &cohort, "Bench cohort");
        run.scratch_dir = dir.join("scratch");
        run.removal_guard = Some(RemovalGuard { max_removal_percent: 100, disabled: true });
        let started = Instant::now();
        let report =
            run_import(&run, RunDeps { members: source, snapshots: &store, braze: &braze, target: &target }).await;
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(report.result, RunResult::Succeeded, "{}", report.message());
        print_result(&serde_json::json!({
            "members": report.cohort_size,
            "added": report.added,
            "removed": report.removed,
            "requests": report.requests,
            "spilled_runs": report.spilled_runs,
            "budget_wait_seconds": report.braze_budget_wait.as_secs_f64(),
            "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(),
        }));
    });
}

/// The 10M-member snapshot the churn scenario diffs against, written directly: ids
/// `0..size`, zero-padded, so numeric order is key order.
async fn write_baseline(dir: &std::path::Path, size: u64) {
    let store = FsSnapshotStore::new(dir.join("snapshots"), "churn");
    let body = dir.join("baseline.body");
    let mut w = BodyWriter::new(BufWriter::with_capacity(1 << 20, std::fs::File::create(&body).unwrap())).unwrap();
    for i in 0..size {
        w.push(Member::ExternalId(user(i)).key().as_bytes()).unwrap();
    }
    let (out, _) = w.finish().unwrap();
    out.into_inner().unwrap();
    let meta = SnapshotMeta {
        format: FORMAT_VERSION,
        generation: 1,
        cohort_id: "churn".into(),
        cohort_name: "Bench cohort".into(),
        cohort_created_at: jiff::Timestamp::now(),
        members: size,
        identifier_fingerprint: String::new(),
        run_id: "baseline".into(),
        committed_at: jiff::Timestamp::now(),
        digest: None,
    };
    store.commit(&meta, &body).await.unwrap();
    std::fs::remove_file(body).unwrap();
}

struct Outcome {
    members: u64,
    changes: u64,
    requests: u64,
    seconds: f64,
    rss: f64,
    spilled: u64,
    budget_wait: f64,
}

fn run_child(scenario: &str, url: &str, dir: &std::path::Path, size: u64) -> Outcome {
    run_child_into(scenario, scenario, url, dir, size)
}

/// [`run_child`] into cohort `cohort` (and its own snapshot).
fn run_child_into(scenario: &str, cohort: &str, url: &str, dir: &std::path::Path, size: u64) -> Outcome {
    let v = child_result(
        &format!("the {scenario} import"),
        &[
            ("IMPORT_BENCH_CHILD", scenario.to_owned()),
            ("IMPORT_BENCH_COHORT", cohort.to_owned()),
            ("IMPORT_BENCH_URL", url.to_owned()),
            ("IMPORT_BENCH_DIR", dir.display().to_string()),
            ("IMPORT_BENCH_SIZE", size.to_string()),
        ],
    );
    let n = |k: &str| v[k].as_u64().unwrap();
    Outcome {
        members: n("members"),
        changes: n("added") + n("removed"),
        requests: n("requests"),
        seconds: v["seconds"].as_f64().unwrap(),
        rss: v["peak_rss_mib"].as_f64().unwrap(),
        spilled: n("spilled_runs"),
        budget_wait: v["budget_wait_seconds"].as_f64().unwrap(),
    }
}

/// Debian's interpreter, as the plain sender must run without anything installed.
const PYTHON: &str = "/usr/bin/python3";

/// The plain sender (`benches/plain_sender.py`) importing `size` members into `cohort`,
/// `workers` requests at a time; returns its seconds (first request to last answer).
fn run_plain_sender(url: &str, cohort: &str, size: u64, workers: usize) -> f64 {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/plain_sender.py");
    // -I: isolated from the environment and the user's site-packages (standard library only).
    let output = std::process::Command::new(PYTHON)
        .args(["-I", script, url, PARTNER, PARTNER_KEY, IMPORT_KEY, cohort])
        .args([size.to_string(), "1000".to_owned(), workers.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{PYTHON} runs the plain sender (Debian's python3): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!("the plain sender failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    };
    let v: serde_json::Value = serde_json::from_str(line).expect("the plain sender's RESULT is JSON");
    v["seconds"].as_f64().unwrap()
}

/// What the sandbox saw of one side-by-side import.
struct Seen {
    requests: u64,
    limited: u64,
    members: usize,
}

fn seen(sandbox: &RunningSandbox, cohort: &str) -> Seen {
    let stats = sandbox.stats();
    Seen {
        requests: stats.requests,
        limited: stats.responses_by_status.get(&429).copied().unwrap_or(0),
        members: sandbox.members(PARTNER, cohort).map_or(0, |m| m.len()),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if let Ok(scenario) = std::env::var("IMPORT_BENCH_CHILD") {
        child(&scenario);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("IMPORT_BENCH_QUICK").is_some();
    let (first_size, churn_size) = if quick { (100_000, 1_000_000) } else { (1_000_000, CHURN_BASE) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = tempfile::Builder::new().prefix("import-bench-").tempdir().unwrap();
        // The first import's users, and those who join in the churn by attribute.
        let users = (0..first_size + first_size / 100)
            .map(|i| SandboxUser::identified(user(i)))
            .chain((0..100_000).map(|i| SandboxUser::identified(format!("bench-user-{i}"))));
        // Braze's hourly limit of the partner endpoints, windows aligned to the hour.
        let rate_limit = RateLimit { requests: BRAZE_REQUESTS_PER_HOUR, window_ms: 3_600_000, retry_after: false };
        let mut config = braze_support::sandbox_config(KEYS, users.collect());
        config.faults = Faults { rate_limit: Some(rate_limit), ..Faults::default() };
        let sandbox = braze_support::start(config).await;
        let url = sandbox.url();
        println!("import benchmark{} — Braze sandbox at {url}", if quick { " (quick)" } else { "" });

        let in_flight = BrazeClientConfig::default().max_in_flight;
        let capacity = braze_sandbox::bench::run(&BenchConfig {
            url: Some(url.clone()),
            partner: PARTNER.into(),
            partner_api_key: PARTNER_KEY.into(),
            data_import_key: IMPORT_KEY.into(),
            requests: if quick { 500 } else { 3000 },
            max_duration: Duration::from_secs(30),
            concurrency: in_flight,
            users: 100_000,
        })
        .await
        .unwrap();
        let raw = capacity.ids_per_sec();
        println!(
            "sandbox raw capacity        {:>12.0} ids/s   ({} requests of 1,000 ids, {in_flight} in flight, p50 {:.1} ms)",
            raw,
            capacity.requests,
            capacity.p50.as_secs_f64() * 1e3
        );

        // Side by side: the operator's first import and the plain sender's, alternating.
        println!(
            "first import of {first_size} members, side by side ({ROUNDS} rounds; the sandbox enforces \
             {BRAZE_REQUESTS_PER_HOUR} requests an hour, x-ratelimit-* headers, 429 past it):"
        );
        let (mut operator_seconds, mut plain_seconds) = (Vec::new(), Vec::new());
        let mut limited = 0;
        for round in 1..=ROUNDS {
            let cohort = format!("first-{round}");
            sandbox.reset_stats();
            let first = {
                let (url, dir, cohort) = (url.clone(), dir.path().to_owned(), cohort.clone());
                tokio::task::spawn_blocking(move || run_child_into("first", &cohort, &url, &dir, first_size))
                    .await
                    .unwrap()
            };
            let at = seen(&sandbox, &cohort);
            assert_eq!(at.members as u64, first.members, "the operator's cohort holds every member");
            limited += at.limited;
            operator_seconds.push(first.seconds);
            println!(
                "  round {round} operator     {:>6.2} s  {:>5} requests  {} answered 429  budget waits {:.3} s  \
                 peak RSS {:>5.1} MiB  ({:.0} members/s; {:.0}% of the sandbox's raw capacity)",
                first.seconds,
                at.requests,
                at.limited,
                first.budget_wait,
                first.rss,
                first.members as f64 / first.seconds,
                100.0 * first.changes as f64 / first.seconds / raw
            );

            let cohort = format!("plain-{round}");
            sandbox.reset_stats();
            let seconds = {
                let (url, cohort) = (url.clone(), cohort.clone());
                tokio::task::spawn_blocking(move || run_plain_sender(&url, &cohort, first_size, in_flight))
                    .await
                    .unwrap()
            };
            let at = seen(&sandbox, &cohort);
            assert_eq!(at.members as u64, first_size, "the plain sender's cohort holds every member ({} 429s)", at.limited);
            limited += at.limited;
            plain_seconds.push(seconds);
            println!(
                "  round {round} plain sender {seconds:>6.2} s  {:>5} requests  {} answered 429  \
                 ({:.0} members/s)",
                at.requests,
                at.limited,
                first_size as f64 / seconds
            );
        }
        let (operator, plain) = (median(operator_seconds), median(plain_seconds));
        println!(
            "  median: operator {operator:.2} s, plain sender {plain:.2} s ({:.0}% of the plain sender's time); \
             {limited} answered 429 in all; the sandbox's hour window has counted {} of its {BRAZE_REQUESTS_PER_HOUR} \
             requests",
            100.0 * operator / plain,
            sandbox.stats().max_requests_in_rate_window
        );

        let started = Instant::now();
        write_baseline(dir.path(), churn_size).await;
        println!("(baseline snapshot of {churn_size} members written in {:.1} s)", started.elapsed().as_secs_f64());
        let churn = {
            let url = url.clone();
            let dir = dir.path().to_owned();
            tokio::task::spawn_blocking(move || run_child("churn", &url, &dir, churn_size)).await.unwrap()
        };
        println!(
            "1% churn    {:>9} members {:>12.0} members/s {:>7.2} s  peak RSS {:>6.1} MiB  ({} changes in {} requests, {:.0} changes/s; sort spilled {} runs)",
            churn.members,
            churn.members as f64 / churn.seconds,
            churn.seconds,
            churn.rss,
            churn.changes,
            churn.requests,
            churn.changes as f64 / churn.seconds,
            churn.spilled
        );

        // By custom attribute: 1M first, then 1% churn of it, under Braze's documented limit.
        for (scenario, label) in [("attr-first", "attribute first"), ("attr-churn", "attribute 1% churn")] {
            sandbox.reset_stats();
            let outcome = {
                let url = url.clone();
                let dir = dir.path().to_owned();
                tokio::task::spawn_blocking(move || run_child(scenario, &url, &dir, first_size)).await.unwrap()
            };
            let track = sandbox.stats().track;
            println!(
                "{label:<19} {:>9} members {:>7.2} s  peak RSS {:>6.1} MiB  ({} changes in {} requests, {:.0} requests/s; \
                 {} data points, {} wasted, {} users created, most {} requests in a 3 s window)",
                outcome.members,
                outcome.seconds,
                outcome.rss,
                outcome.changes,
                outcome.requests,
                outcome.requests as f64 / outcome.seconds,
                track.data_points,
                track.wasted_writes,
                track.users_created,
                track.max_requests_in_rate_window
            );
        }
        drop(sandbox);
    });
}
