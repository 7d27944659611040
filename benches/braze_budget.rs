//! One Braze budget shared by many imports: 100 imports of 20,000 members each, all at once
//! in one process, against the Braze sandbox with a rate limit like Braze's (fixed windows,
//! 429 past the limit) and the operator's budget set to the same rate.
//!
//! `cargo bench --bench braze_budget` (add `-- --quick` for 20 imports of 5,000 members).
//! Prints: runs failed (target 0), the request rate the sandbox saw against the budget
//! (target within ±5%), the most requests any sandbox window received, 429s, and the total
//! time against the budget's minimum — (requests − burst) / rate — (target within 10%).

use std::sync::Arc;
use std::time::{Duration, Instant};

use braze_sandbox::{Faults, RateLimit, SandboxUser};
use cohort_operator::api::{RunResult, RunTrigger};
use cohort_operator::braze::{BrazeClient, BrazeClientConfig, BudgetConfig, Budgets};
use cohort_operator::domain::member::Member;
use cohort_operator::run::{ImportRun, RunDeps, run_import};
use cohort_operator::snapshot::fs::FsSnapshotStore;
use cohort_operator::source::{MemberBatch, MemberStream};
use futures::StreamExt;

#[path = "../tests/support/braze.rs"]
mod braze_support;
use braze_support::BrazeKeys;

const KEYS: BrazeKeys =
    BrazeKeys { partner: "bench", partner_key: "bench-partner-key", import_key: "bench-import-key" };
/// Braze's limit in the sandbox, and the operator's budget: requests per minute.
const PER_MINUTE: u64 = 600;
const BURST: u32 = 10;

struct Size {
    imports: usize,
    members: u64,
}

fn source(members: u64) -> MemberStream<'static> {
    futures::stream::iter((0..members.div_ceil(5_000)).map(move |b| {
        let members = (b * 5_000..((b + 1) * 5_000).min(members)).map(|i| Member::ExternalId(format!("user-{i:06}")));
        Ok(MemberBatch { members: members.collect(), ..MemberBatch::default() })
    }))
    .boxed()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("BUDGET_BENCH_QUICK").is_some();
    let size = if quick { Size { imports: 20, members: 5_000 } } else { Size { imports: 100, members: 20_000 } };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(bench(size));
}

async fn bench(size: Size) {
    let users = (0..size.members).map(|i| SandboxUser::identified(format!("user-{i:06}"))).collect();
    let mut config = braze_support::sandbox_config(KEYS, users);
    config.faults = Faults {
        rate_limit: Some(RateLimit { requests: PER_MINUTE, window_ms: 60_000, retry_after: false }),
        ..Faults::default()
    };
    let sandbox = braze_support::start(config).await;
    let budget = BudgetConfig { requests_per_hour: (PER_MINUTE * 60) as u32, burst: BURST, ..BudgetConfig::default() };
    let braze = BrazeClient::new(BrazeClientConfig::default()).unwrap().with_budgets(Arc::new(Budgets::new(budget)));
    let dir = tempfile::tempdir().unwrap();
    println!(
        "braze_budget: {} imports of {} members at once; sandbox limit and budget {PER_MINUTE}/min, burst {BURST}",
        size.imports, size.members
    );

    let started = Instant::now();
    // When Braze saw the first request: before it, the runs read and sort their sources.
    let first_request = {
        let sandbox = sandbox.handle();
        tokio::spawn(async move {
            while sandbox.stats().requests == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Instant::now()
        })
    };
    let runs = (0..size.imports).map(|i| {
        let (braze, url, dir) = (braze.clone(), sandbox.url(), dir.path().to_owned());
        let members = size.members;
        tokio::spawn(async move {
            let name = format!("import-{i:03}");
            let target = braze_support::target_at(url, KEYS, &name);
            let store = FsSnapshotStore::new(dir.join("snapshots"), &name);
            let mut run = ImportRun::new("bench", RunTrigger::Manual, "bench", &name, "Bench cohort");
            run.scratch_dir = dir.join("scratch");
            std::fs::create_dir_all(&run.scratch_dir).unwrap();
            let deps = RunDeps { members: source(members), snapshots: &store, braze: &braze, target: &target };
            run_import(&run, deps).await
        })
    });
    let reports = futures::future::join_all(runs).await;
    let elapsed = started.elapsed();
    let sending = first_request.await.expect("first request").elapsed();

    let reports: Vec<_> = reports.into_iter().map(|r| r.expect("run task")).collect();
    let failed: Vec<_> = reports.iter().filter(|r| r.result != RunResult::Succeeded).collect();
    for r in &failed {
        println!("  failed: {}", r.message());
    }
    let requests: u64 = reports.iter().map(|r| u64::from(r.requests)).sum();
    let waited = reports.iter().map(|r| r.braze_budget_wait).max().unwrap_or(Duration::ZERO);
    let stats = sandbox.stats();
    let rate = PER_MINUTE as f64 / 60.0;
    let minimum = (stats.requests.saturating_sub(u64::from(BURST))) as f64 / rate;
    let seen_per_minute = stats.requests as f64 / sending.as_secs_f64() * 60.0;
    println!("  runs failed:                  {} of {}", failed.len(), reports.len());
    println!("  requests (runs' count):       {requests}");
    println!(
        "  sandbox saw:                  {} requests, {} of them 429",
        stats.requests,
        stats.responses_by_status.get(&429).copied().unwrap_or(0)
    );
    println!(
        "  rate seen by the sandbox:     {seen_per_minute:.1}/min = {:.1}% of the budget (first request to last)",
        seen_per_minute / PER_MINUTE as f64 * 100.0
    );
    println!(
        "  most in one sandbox window:   {} (limit {PER_MINUTE}; windows are aligned minutes)",
        stats.max_requests_in_rate_window
    );
    println!(
        "  sending time:                 {:.1} s (first request to last); the budget's minimum {minimum:.1} s; {:+.1}%",
        sending.as_secs_f64(),
        (sending.as_secs_f64() / minimum - 1.0) * 100.0
    );
    println!(
        "  total time:                   {:.1} s, reading and sorting the sources included; {:+.1}%",
        elapsed.as_secs_f64(),
        (elapsed.as_secs_f64() / minimum - 1.0) * 100.0
    );
    println!("  longest wait of one run:      {:.1} s", waited.as_secs_f64());
    sandbox.shutdown().await.unwrap();
}
