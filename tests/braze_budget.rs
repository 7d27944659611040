//! The shared Braze budget against the Braze sandbox with a rate limit like Braze's (fixed
//! windows, 429 with lowercase `x-ratelimit-*`): a 429 storm from many runs of one
//! workspace is absorbed by waiting, not failures; a budget under the limit sends without a
//! single 429; a wait past the bound fails the run clearly; waits reach the metrics; a first
//! import under Braze's hourly limit spends it at once, without a 429.

use std::sync::Arc;
use std::time::Duration;

use braze_sandbox::{Faults, RateLimit, RunningSandbox, SandboxUser};
use cohort_operator::braze::{
    BrazeClient, BrazeClientConfig, BrazeError, BudgetConfig, Budgets, Change, CohortTarget, RetryPolicy,
};
use cohort_operator::controller::metrics::Metrics;
use cohort_operator::domain::member::Member;
use futures::stream;

#[path = "support/braze.rs"]
mod braze_support;
use braze_support::BrazeKeys;

const PARTNER: &str = "acme";
const PARTNER_KEY: &str = "pk-budget-partner-71c2";
const IMPORT_KEY: &str = "dik-budget-import-5d90";
const KEYS: BrazeKeys = BrazeKeys { partner: PARTNER, partner_key: PARTNER_KEY, import_key: IMPORT_KEY };
const USERS: usize = 20_000;

async fn sandbox(rate_limit: RateLimit) -> RunningSandbox {
    let mut config =
        braze_support::sandbox_config(KEYS, (0..USERS).map(|i| SandboxUser::identified(format!("u{i}"))).collect());
    config.faults = Faults { rate_limit: Some(rate_limit), ..Faults::default() };
    braze_support::start(config).await
}

fn client(budget: BudgetConfig, metrics: Option<Arc<Metrics>>) -> BrazeClient {
    let mut budgets = Budgets::new(budget);
    if let Some(metrics) = metrics {
        budgets = budgets.with_observer(metrics);
    }
    BrazeClient::new(BrazeClientConfig {
        max_in_flight: 4,
        request_timeout: Duration::from_secs(5),
        // Few attempts and retries: only waiting for budget can absorb a storm of 429s.
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            run_retry_budget: 2,
            max_server_wait: Duration::from_secs(1),
        },
        ..BrazeClientConfig::default()
    })
    .unwrap()
    .with_budgets(Arc::new(budgets))
}

fn target(sandbox: &RunningSandbox, cohort: usize) -> CohortTarget {
    braze_support::target(sandbox, KEYS, &format!("cohort-{cohort}"))
}

fn adds(range: std::ops::Range<usize>) -> impl futures::Stream<Item = Change> {
    stream::iter(range.map(|i| Change::add(Member::ExternalId(format!("u{i}")))))
}

fn per_second(requests: u32, burst: u32) -> BudgetConfig {
    BudgetConfig { requests_per_hour: requests * 3600, burst, ..BudgetConfig::default() }
}

#[tokio::test]
async fn a_429_storm_from_many_runs_of_one_workspace_is_absorbed_by_waiting() {
    // Braze allows 20 a second; the operator's budget believes in 200 with a burst of 100:
    // eight runs at once start a storm of 429s.
    let sandbox = sandbox(RateLimit { requests: 20, window_ms: 1000, retry_after: false }).await;
    let metrics = Arc::new(Metrics::new());
    let client = client(per_second(200, 100), Some(metrics.clone()));
    let runs = (0..8).map(|cohort| {
        let (client, target) = (client.clone(), target(&sandbox, cohort));
        async move { client.send_changes(&target, adds(0..10_000)).await }
    });
    let reports = futures::future::join_all(runs).await;

    let stats = sandbox.stats();
    let limited = stats.responses_by_status.get(&429).copied().unwrap_or(0);
    assert!(limited > 0, "the storm happened: {stats:?}");
    for (cohort, report) in reports.iter().enumerate() {
        assert!(report.is_complete(), "run {cohort} failed: {:?}", report.stopped);
        assert_eq!(report.totals.added, 10_000);
        assert_eq!(sandbox.member_external_ids(PARTNER, &format!("cohort-{cohort}")).len(), 10_000);
    }
    let absorbed: u64 = reports.iter().map(|r| u64::from(r.totals.rate_limited)).sum();
    assert_eq!(absorbed, limited, "every 429 was waited out, none spent an attempt");
    assert!(reports.iter().any(|r| r.totals.budget_wait > Duration::ZERO));
    // Once Braze spoke, the budget followed its windows: far fewer 429s than requests.
    assert!(limited < 80, "{limited} 429s for 80 requests");
    let text = metrics.render();
    assert!(text.contains("cohort_operator_braze_budget_wait_seconds_count"), "{text}");
    assert!(!text.contains("cohort_operator_braze_budget_wait_seconds_count 0\n"), "{text}");
}

#[tokio::test]
async fn a_budget_under_brazes_limit_sends_without_a_single_429() {
    // Braze: 20 per 1-second window. Budget: 18 a second, burst 1 — at most 19 in any second.
    let sandbox = sandbox(RateLimit { requests: 20, window_ms: 1000, retry_after: false }).await;
    let client = client(per_second(18, 1), None);
    let runs = (0..4).map(|cohort| {
        let (client, target) = (client.clone(), target(&sandbox, cohort));
        async move { client.send_changes(&target, adds(0..5_000)).await }
    });
    let reports = futures::future::join_all(runs).await;
    for report in &reports {
        assert!(report.is_complete(), "{:?}", report.stopped);
        assert_eq!(report.totals.rate_limited, 0);
    }
    let stats = sandbox.stats();
    assert_eq!(stats.requests, 20);
    assert_eq!(stats.responses_by_status.get(&429), None, "{stats:?}");
    assert!(stats.max_requests_in_rate_window <= 19, "{stats:?}");
    // 20 requests at 18 a second after the first: the runs waited for one another.
    let waited: Duration = reports.iter().map(|r| r.totals.budget_wait).max().unwrap();
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
}

#[tokio::test]
async fn a_wait_past_the_bound_stops_the_run_clearly_and_names_the_bound() {
    // One request a minute: the second waits until the window ends, far past the bound.
    let sandbox = sandbox(RateLimit { requests: 1, window_ms: 60_000, retry_after: true }).await;
    let budget = BudgetConfig { max_wait: Duration::from_millis(300), ..BudgetConfig::default() };
    let client = client(budget, None);
    let report = client.send_changes(&target(&sandbox, 0), adds(0..3_000)).await;
    match &report.stopped {
        Some(BrazeError::RateLimited { max_wait, .. }) => assert_eq!(*max_wait, Duration::from_millis(300)),
        other => panic!("expected RateLimited, got {other:?}"),
    }
    let message = report.stopped.as_ref().unwrap().to_string();
    assert!(message.contains("what was not sent goes in the next run"), "{message}");
    assert!(!message.contains(IMPORT_KEY) && !message.contains(PARTNER_KEY));
    assert_eq!(report.totals.added, 1000, "the first request went through");
    // Nothing hammered Braze while waiting: one 429, then the wait.
    assert!(sandbox.stats().requests <= 3, "{:?}", sandbox.stats());
}

#[tokio::test]
async fn naming_requests_draw_from_the_same_budget() {
    let sandbox = sandbox(RateLimit { requests: 1000, window_ms: 60_000, retry_after: false }).await;
    // Two a second, burst 1: the second naming waits about half a second.
    let client = client(per_second(2, 1), None);
    let created = "2026-11-29T00:00:00Z".parse().unwrap();
    let first = client.name_cohort(&target(&sandbox, 0), "First", created).await.unwrap();
    let second = client.name_cohort(&target(&sandbox, 1), "Second", created).await.unwrap();
    assert!(first.budget_wait < Duration::from_millis(100), "{:?}", first.budget_wait);
    assert!(second.budget_wait >= Duration::from_millis(400), "{:?}", second.budget_wait);
}

#[tokio::test]
async fn a_first_import_spends_the_hours_budget_at_once_without_a_single_429() {
    // Braze as documented: 250,000 an hour, counted in hourly windows, with its headers. The
    // default budget: 600 requests (more than the old burst of 500) wait for nothing.
    let sandbox = sandbox(RateLimit { requests: 250_000, window_ms: 3_600_000, retry_after: false }).await;
    let client = BrazeClient::new(BrazeClientConfig { request_timeout: Duration::from_secs(30), ..Default::default() })
        .unwrap()
        .with_budgets(Arc::new(Budgets::new(BudgetConfig::default())));
    let report = client.send_changes(&target(&sandbox, 0), adds(0..600_000)).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    assert_eq!(report.totals.requests, 600);
    // The old budget (burst 500, then the hourly average) held the last 100 back 1.44 s;
    // what is left here is taking turns in the queue.
    assert!(report.totals.budget_wait < Duration::from_millis(500), "{:?}", report.totals.budget_wait);
    let stats = sandbox.stats();
    assert_eq!(stats.responses_by_status.get(&429), None, "{stats:?}");
    assert_eq!(stats.requests, 600);
}
