//! Contract tests of the Braze client against the Braze sandbox, over real HTTP on
//! loopback: batching, membership semantics, permanent and transient failures, reports,
//! and that no key ever reaches a log line.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use braze_sandbox::{DataImportKey, Faults, Partner, RateLimit, RunningSandbox, SandboxUser, ScriptedFault};
use cohort_operator::braze::{
    BrazeClient, BrazeClientConfig, BrazeError, Change, ChangesReport, CohortTarget, RetryPolicy, TransientFailure,
    UnauthorizedReason,
};
use cohort_operator::domain::member::Member;
use futures::stream;

#[path = "support/braze.rs"]
mod braze_support;
use braze_support::BrazeKeys;

const PARTNER: &str = "acme";
const PARTNER_KEY: &str = "pk-SECRET-partner-4f1c";
const IMPORT_KEY: &str = "dik-SECRET-import-9a27";
const KEYS: BrazeKeys = BrazeKeys { partner: PARTNER, partner_key: PARTNER_KEY, import_key: IMPORT_KEY };
/// Valid, but enabled only for another partner: Braze's 401 for it repeats the key.
const OTHER_IMPORT_KEY: &str = "dik-SECRET-other-5e31";
const WRONG_KEY: &str = "dik-SECRET-wrong-0b8d";
const SECRETS: [&str; 4] = [PARTNER_KEY, IMPORT_KEY, OTHER_IMPORT_KEY, WRONG_KEY];

/// Every log line of this test binary, all levels from debug up, all crates.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || LogWriter(writer.clone()))
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buffer
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_no_secret_in(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "a key appears in {what}:\n{text}");
    }
}

fn assert_no_secret_logged() {
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(!logs.is_empty(), "the log capture works");
    assert_no_secret_in("the captured logs", &logs);
}

fn users() -> Vec<SandboxUser> {
    let mut users: Vec<SandboxUser> = (0..3000).map(|i| SandboxUser::identified(format!("u{i}"))).collect();
    users.extend((0..500).map(|i| SandboxUser::alias(format!("a{i}"), "crm")));
    users.extend((0..500).map(|i| SandboxUser::anonymous(format!("d{i}"))));
    // Anonymous on d-late, later identified as u-late: d-late no longer matches.
    users.push(SandboxUser::anonymous("d-late"));
    users.push(SandboxUser {
        external_id: Some("u-late".into()),
        device_ids: vec!["d-late".into()],
        ..Default::default()
    });
    users
}

/// Also a second partner, `other`, with a data import key of its own: the import key of
/// `acme` is enabled for `acme` only.
async fn sandbox() -> RunningSandbox {
    logs();
    let mut config = braze_support::sandbox_config(KEYS, users());
    config.data_import_keys[0].partners = vec![PARTNER.into()];
    config.partners.push(Partner { name: "other".into(), api_key: "other-partner-key".into() });
    config.data_import_keys.push(DataImportKey { key: OTHER_IMPORT_KEY.into(), partners: vec!["other".into()] });
    braze_support::start(config).await
}

fn client(max_in_flight: usize, retry: RetryPolicy) -> BrazeClient {
    BrazeClient::new(BrazeClientConfig {
        max_in_flight,
        request_timeout: Duration::from_secs(5),
        retry,
        ..BrazeClientConfig::default()
    })
    .unwrap()
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        run_retry_budget: 50,
        max_server_wait: Duration::from_secs(5),
    }
}

fn target(sandbox: &RunningSandbox, cohort_id: &str, import_key: &'static str) -> CohortTarget {
    braze_support::target(sandbox, BrazeKeys { import_key, ..KEYS }, cohort_id)
}

fn ext(i: usize) -> Member {
    Member::ExternalId(format!("u{i}"))
}

fn sorted_ids(users: Vec<SandboxUser>) -> Vec<String> {
    let mut ids: Vec<String> = users
        .into_iter()
        .map(|u| match (u.external_id, u.aliases.first(), u.device_ids.first()) {
            (Some(e), _, _) => e,
            (None, Some(a), _) => format!("{}@{}", a.alias_name, a.alias_label),
            (None, None, Some(d)) => format!("device:{d}"),
            _ => unreachable!(),
        })
        .collect();
    ids.sort();
    ids
}

fn assert_report_has_no_secret(report: &ChangesReport) {
    assert_no_secret_in("the report", &format!("{report:?}"));
    if let Some(e) = &report.stopped {
        assert_no_secret_in("the error", &e.to_string());
    }
}

#[tokio::test]
async fn adds_and_removes_of_every_identifier_kind_land_as_braze_applies_them() {
    let sandbox = sandbox().await;
    let client = client(4, fast_retries());
    let target = target(&sandbox, "cohort-1", IMPORT_KEY);
    let users_before = sandbox.user_count();

    // Naming, then renaming: Braze's segment filter shows the latest name.
    let created: jiff::Timestamp = "2024-05-01T10:00:00Z".parse().unwrap();
    let named = client.name_cohort(&target, "Churn risk", created).await.unwrap();
    assert_eq!((named.status, named.attempts), (Some(201), 1));
    client.name_cohort(&target, "Churn risk (EU)", created).await.unwrap();
    assert_eq!(sandbox.cohort_names(PARTNER), ["Churn risk (EU)"]);
    assert_eq!(sandbox.cohorts()[0].created_at.as_deref(), Some("2024-05-01T10:00:00Z"));

    // 1,500 external ids, 500 aliases, 500 device ids, 100 unknown ids, and the device id
    // of a user identified since: 2,601 adds, interleaved.
    let mut adds: Vec<Change> = Vec::new();
    for i in 0..500 {
        adds.push(Change::add(ext(i)));
        adds.push(Change::add(Member::Alias { name: format!("a{i}"), label: "crm".into() }));
        adds.push(Change::add(ext(500 + i)));
        adds.push(Change::add(Member::DeviceId(format!("d{i}"))));
        adds.push(Change::add(ext(1000 + i)));
    }
    adds.extend((0..100).map(|i| Change::add(Member::ExternalId(format!("ghost{i}")))));
    adds.push(Change::add(Member::DeviceId("d-late".into())));
    let report = client.send_changes(&target, stream::iter(adds)).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    assert_eq!(report.requests.len(), 3);
    assert_eq!(report.totals.added, 2601);
    assert_eq!(report.unsent_from, 2601);
    assert!((0..2601).all(|p| report.accepted(p)));
    assert!(!report.accepted(2601));

    let mut expected: Vec<String> = (0..1500).map(|i| format!("u{i}")).collect();
    expected.extend((0..500).map(|i| format!("a{i}@crm")));
    expected.extend((0..500).map(|i| format!("device:d{i}")));
    expected.sort();
    assert_eq!(sorted_ids(sandbox.members(PARTNER, "cohort-1").unwrap()), expected);
    let stats = sandbox.stats();
    assert_eq!(stats.ids_unmatched, 101, "unknown ids and the identified user's device id are ignored");
    assert_eq!(sandbox.user_count(), users_before, "the import never creates users");

    // One run of removes and adds together: requests carry both objects.
    let mut changes = Vec::new();
    for i in 0..700 {
        changes.push(Change::remove(ext(i)));
        changes.push(Change::add(ext(2000 + i)));
    }
    changes.extend((0..250).map(|i| Change::remove(Member::Alias { name: format!("a{i}"), label: "crm".into() })));
    changes.extend((0..250).map(|i| Change::remove(Member::DeviceId(format!("d{i}")))));
    let report = client.send_changes(&target, stream::iter(changes)).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    assert_eq!((report.totals.added, report.totals.removed), (700, 1200));
    assert!(report.requests.iter().any(|r| r.adds.total() > 0 && r.removes.total() > 0));

    let mut expected: Vec<String> = (700..1500).chain(2000..2700).map(|i| format!("u{i}")).collect();
    expected.extend((250..500).map(|i| format!("a{i}@crm")));
    expected.extend((250..500).map(|i| format!("device:d{i}")));
    expected.sort();
    assert_eq!(sorted_ids(sandbox.members(PARTNER, "cohort-1").unwrap()), expected);

    // No request ever carried more than 1,000 ids, and every one was accepted.
    let stats = sandbox.stats();
    assert!(stats.max_ids_in_request <= 1000 && stats.max_ids_in_request > 0);
    assert!(sandbox.requests().iter().all(|r| r.ids <= 1000 && r.status == 201));
    assert!(stats.max_concurrent_requests <= 4);
    assert_report_has_no_secret(&report);
    assert_no_secret_logged();
}

#[tokio::test]
async fn concurrency_is_bounded_and_starts_with_one_request() {
    let sandbox = sandbox().await;
    sandbox.set_faults(Faults { latency_ms: 30, ..Faults::default() });
    let client = client(3, fast_retries());
    let target = target(&sandbox, "cohort-c", IMPORT_KEY);
    let changes = (0..3000).map(|i| Change::add(ext(i))).collect::<Vec<_>>();
    let mut started_alone = None;
    let report = client
        .send_changes_with(&target, stream::iter(changes.clone()), |_, outcome| {
            // When the first request finishes, the sandbox has seen only it.
            started_alone.get_or_insert(sandbox.stats().users_requests);
            assert!(outcome.accepted());
        })
        .await;
    assert!(report.is_complete());
    assert_eq!(started_alone, Some(1));
    assert_eq!(sandbox.stats().max_concurrent_requests, 2, "3,000 ids: one request, then the other two together");

    sandbox.reset_stats();
    let more = (0..12_000).map(|i| Change::add(Member::ExternalId(format!("x{i}"))));
    let report = client.send_changes(&target, stream::iter(more)).await;
    assert!(report.is_complete());
    assert_eq!(report.requests.len(), 12);
    let max = sandbox.stats().max_concurrent_requests;
    assert!((2..=3).contains(&max), "max concurrent requests {max}");
    assert_no_secret_logged();
}

#[tokio::test]
async fn a_401_stops_the_run_after_one_request_with_brazes_message() {
    let sandbox = sandbox().await;
    let client = client(8, fast_retries());
    let changes = || stream::iter((0..5000).map(|i| Change::add(ext(i))).collect::<Vec<_>>());

    let report = client.send_changes(&target(&sandbox, "c401", WRONG_KEY), changes()).await;
    assert_eq!(sandbox.stats().users_requests, 1);
    assert_eq!(report.requests.len(), 1);
    assert_eq!(report.totals.retries, 0);
    assert_eq!(report.unsent_from, 1000);
    assert_eq!(report.unaccepted.len(), 1);
    assert_eq!(report.totals.unaccepted_adds, 1000);
    assert!(!report.accepted(0));
    match &report.stopped {
        Some(e @ BrazeError::Unauthorized { reason: UnauthorizedReason::DataImportKey, message }) => {
            assert_eq!(message, "Invalid client secret");
            assert!(e.to_string().contains("401: Invalid client secret"), "{e}");
        }
        other => panic!("expected a 401 for the data import key, got {other:?}"),
    }
    assert_report_has_no_secret(&report);

    // Braze repeats the data import key when the partner is not enabled for it.
    sandbox.reset_stats();
    let report = client.send_changes(&target(&sandbox, "c401", OTHER_IMPORT_KEY), changes()).await;
    assert_eq!(sandbox.stats().users_requests, 1);
    match &report.stopped {
        Some(BrazeError::Unauthorized { reason: UnauthorizedReason::PartnerNotEnabled, message }) => {
            // Braze's documented message, named in the operator's words: nothing of the answer.
            assert_eq!(message, "Partner not enabled for client");
        }
        other => panic!("expected partner-not-enabled, got {other:?}"),
    }
    assert_report_has_no_secret(&report);

    // A wrong partner key on the naming endpoint.
    let bad_partner = braze_support::target(&sandbox, BrazeKeys { partner_key: WRONG_KEY, ..KEYS }, "c401");
    let error = client.name_cohort(&bad_partner, "Name", jiff::Timestamp::now()).await.unwrap_err();
    assert!(matches!(error, BrazeError::Unauthorized { reason: UnauthorizedReason::PartnerApiKey, .. }), "{error:?}");
    assert_no_secret_in("the error", &format!("{error} {error:?}"));
    assert_eq!(sandbox.stats().name_requests, 1);
    assert!(sandbox.members(PARTNER, "c401").is_none(), "nothing reached the cohort");
    assert_no_secret_logged();
}

#[tokio::test]
async fn a_400_is_not_retried() {
    let sandbox = sandbox().await;
    sandbox.set_faults(Faults { script: [ScriptedFault::Status(400)].into(), ..Faults::default() });
    let client = client(8, fast_retries());
    let report = client
        .send_changes(&target(&sandbox, "c400", IMPORT_KEY), stream::iter((0..3000).map(|i| Change::add(ext(i)))))
        .await;
    assert_eq!(sandbox.stats().users_requests, 1);
    assert_eq!(report.requests[0].attempts, 1);
    // The sandbox's text is not one of Braze's documented messages: it is not quoted.
    assert!(
        matches!(&report.stopped, Some(BrazeError::BadRequest { message }) if message.contains("not quoted") && !message.contains("Injected")),
        "{:?}",
        report.stopped
    );
    assert_no_secret_logged();
}

#[tokio::test]
async fn rate_limits_server_errors_locks_drops_and_timeouts_are_retried_to_success() {
    let sandbox = sandbox().await;
    sandbox.set_faults(Faults {
        script: [
            ScriptedFault::Status(429),
            ScriptedFault::Status(500),
            ScriptedFault::Status(503),
            ScriptedFault::Status(423),
            serde_json::from_str("\"drop\"").unwrap(),
            ScriptedFault::Delay { delay_ms: 1500 },
        ]
        .into(),
        ..Faults::default()
    });
    let client = BrazeClient::new(BrazeClientConfig {
        max_in_flight: 2,
        request_timeout: Duration::from_millis(400),
        retry: fast_retries(),
        ..BrazeClientConfig::default()
    })
    .unwrap();
    let target = target(&sandbox, "c-retry", IMPORT_KEY);
    let report = client.send_changes(&target, stream::iter((0..3000).map(|i| Change::add(ext(i))))).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    let t = &report.totals;
    assert_eq!(t.retries, 6);
    assert_eq!(t.attempts, 9);
    assert_eq!((t.timeouts, t.connection_errors), (1, 1));
    for status in [429, 500, 503, 423] {
        assert_eq!(t.responses_by_status.get(&status), Some(&1), "{status}");
    }
    assert_eq!(sandbox.member_external_ids(PARTNER, "c-retry").len(), 3000);

    // A real rate limit: 2 requests a second, with x-ratelimit-*; the client waits for the
    // reset and gets everything through.
    sandbox.set_faults(Faults {
        rate_limit: Some(RateLimit { requests: 2, window_ms: 1000, retry_after: false }),
        ..Faults::default()
    });
    sandbox.reset_stats();
    let report = client.send_changes(&target, stream::iter((0..5000).map(|i| Change::remove(ext(i))))).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    // The shared budget follows x-ratelimit-remaining/reset: it waits for the window instead
    // of collecting 429s, and any 429 that still comes is waited out, not retried blindly.
    assert!(report.totals.budget_wait > Duration::ZERO, "{:?}", report.totals);
    let limited = report.totals.responses_by_status.get(&429).copied().unwrap_or(0);
    assert_eq!(report.totals.rate_limited, limited);
    assert_eq!(report.totals.removed, 5000);
    assert!(sandbox.member_external_ids(PARTNER, "c-retry").is_empty());
    assert_no_secret_logged();
}

#[tokio::test]
async fn an_exhausted_retry_budget_fails_clearly_and_reports_what_was_accepted() {
    let sandbox = sandbox().await;
    let client = client(2, RetryPolicy { run_retry_budget: 3, max_attempts: 20, ..fast_retries() });
    let target = target(&sandbox, "c-budget", IMPORT_KEY);
    let mut accepted_seen = 0;
    // Braze starts failing for good after two accepted requests.
    let report = client
        .send_changes_with(
            &target,
            stream::iter((0..10_000).map(|i| {
                // Seeded users first, then ids Braze does not know.
                Change::add(if i < 3000 { ext(i) } else { Member::ExternalId(format!("v{i}")) })
            })),
            |_, outcome| {
                if outcome.accepted() {
                    accepted_seen += 1;
                    if accepted_seen == 2 {
                        sandbox.set_faults(Faults { server_error_rate: 1.0, ..Faults::default() });
                    }
                }
            },
        )
        .await;
    let error = report.stopped.clone().expect("the run stops");
    match &error {
        BrazeError::RetryBudgetExhausted { budget: 3, last: TransientFailure::Status { status, .. } } => {
            assert!((500..600).contains(status));
        }
        other => panic!("expected an exhausted retry budget, got {other:?}"),
    }
    assert!(error.to_string().contains("retry budget of 3 retries is used up"), "{error}");
    let t = &report.totals;
    assert_eq!(t.retries, 3);
    assert!(t.accepted_requests >= 2);
    assert!(t.failed_requests >= 1);
    assert_eq!(t.added, u64::from(t.accepted_requests) * 1000);
    assert_eq!(t.unaccepted_adds, report.unaccepted.iter().map(|b| b.len() as u64).sum::<u64>());
    assert!(report.unsent_from < 10_000, "the run stopped reading its input");

    // The report tells exactly which changes Braze has: accepted positions are members,
    // the rest are not.
    let members = sandbox.member_external_ids(PARTNER, "c-budget");
    let accepted_known = (0..3000).filter(|&p| report.accepted(p)).count();
    assert_eq!(members.len(), accepted_known);
    for position in 0..report.unsent_from.min(3000) {
        let id = format!("u{position}");
        assert_eq!(members.binary_search(&id).is_ok(), report.accepted(position), "{id}");
    }
    for batch in &report.unaccepted {
        assert!(batch.adds.iter().all(|m| match m {
            Member::ExternalId(id) => members.binary_search(id).is_err(),
            _ => false,
        }));
    }
    assert_report_has_no_secret(&report);
    assert_no_secret_logged();
}

/// Braze sends `x-ratelimit-reset` (the end of its hourly window) on every answer. A 503
/// carrying a reset an hour away is a server error, not a rate limit: it is retried with
/// the client's own short backoff, not held for the hour nor failed as rate limited. A 429
/// with the same reset is a rate limit, and the run stops rather than wait that long.
#[tokio::test]
async fn a_503_with_a_distant_rate_limit_reset_keeps_its_own_backoff() {
    let sandbox = sandbox().await;
    let distant = |status: u16, remaining: u64| ScriptedFault::WithRateLimit { status, reset_after_s: 3600, remaining };
    sandbox.set_faults(Faults {
        script: [distant(503, 100), distant(502, 100), distant(503, 7)].into(),
        ..Faults::default()
    });
    // Waits Braze names are refused past 5 s (fast_retries): an hour would fail the run.
    let client = client(1, fast_retries());
    let target = target(&sandbox, "c-503", IMPORT_KEY);
    let report = client.send_changes(&target, stream::iter((0..1500).map(|i| Change::add(ext(i))))).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    let t = &report.totals;
    assert_eq!((t.retries, t.attempts), (3, 5));
    assert_eq!(t.responses_by_status.get(&503), Some(&2));
    assert_eq!(t.responses_by_status.get(&502), Some(&1));
    // Each retry waited at most the backoff ceiling (50 ms here), never the hour: the whole
    // request took far less than even one honoured reset would have.
    let first = &report.requests[0];
    assert_eq!(first.attempts, 4);
    assert!(first.elapsed < Duration::from_secs(60), "{:?}", first.elapsed);
    assert_eq!(sandbox.member_external_ids(PARTNER, "c-503").len(), 1500);

    // The same reset on a 429, or on a 503 saying no request is left, is a rate limit.
    for (status, remaining) in [(429, 100), (503, 0)] {
        // A client of its own: the rate limit closes its destination's shared budget for the hour.
        let limited = crate::client(1, fast_retries());
        sandbox.set_faults(Faults { script: [distant(status, remaining)].into(), ..Faults::default() });
        let report = limited.send_changes(&target, stream::iter((0..10).map(|i| Change::remove(ext(i))))).await;
        match report.stopped {
            Some(BrazeError::RateLimited { wait, .. }) => assert!(wait > Duration::from_secs(3000), "{wait:?}"),
            other => panic!("{status} with remaining {remaining}: expected RateLimited, got {other:?}"),
        }
    }
    assert_report_has_no_secret(&report);
    assert_no_secret_logged();
}
