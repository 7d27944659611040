//! Contract tests of the `/users/track` wire format (membership by custom attribute)
//! against the Braze sandbox, over real HTTP on loopback: 75 objects a request, update-only
//! objects, array and boolean shapes, refused keys, per-object errors, the rate limit.

use std::time::Duration;

use braze_sandbox::{Faults, RateLimit, RestApiKey, RunningSandbox, SandboxUser, ScriptedFault};
use cohort_operator::api::AttributeShape;
use cohort_operator::braze::{
    BrazeClient, BrazeClientConfig, BrazeError, Change, CohortTarget, RetryPolicy, UnauthorizedReason,
};
use cohort_operator::domain::member::Member;
use futures::stream;

#[path = "support/braze.rs"]
mod braze_support;
use braze_support::{BrazeKeys, REST_API_KEY, attribute_target};

const KEYS: BrazeKeys = BrazeKeys { partner: "acme", partner_key: "pk", import_key: "dik" };

async fn sandbox(users: usize) -> RunningSandbox {
    let mut people: Vec<SandboxUser> = (0..users).map(|i| SandboxUser::identified(format!("u{i}"))).collect();
    people.push(SandboxUser::alias("ana", "crm"));
    braze_support::start_sandbox(KEYS, people).await
}

fn client() -> BrazeClient {
    let retry = RetryPolicy {
        max_attempts: 8,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        run_retry_budget: 50,
        max_server_wait: Duration::from_secs(5),
    };
    BrazeClient::new(BrazeClientConfig { request_timeout: Duration::from_secs(5), retry, ..Default::default() })
        .unwrap()
}

fn target(sandbox: &RunningSandbox, shape: AttributeShape, key: &str) -> CohortTarget {
    attribute_target(sandbox.url(), key, "cohorts", shape, "vip")
}

fn ext(i: usize) -> Member {
    Member::ExternalId(format!("u{i}"))
}

fn adds(range: std::ops::Range<usize>) -> impl futures::Stream<Item = Change> {
    stream::iter(range.map(|i| Change::add(ext(i))))
}

#[tokio::test]
async fn array_membership_goes_75_objects_a_request_update_only_and_exact() {
    let sandbox = sandbox(1000).await;
    let braze = client();
    let target = target(&sandbox, AttributeShape::Array, REST_API_KEY);
    let mut changes: Vec<Change> = (0..1000).map(|i| Change::add(ext(i))).collect();
    changes.push(Change::add(Member::Alias { name: "ana".into(), label: "crm".into() }));
    changes.push(Change::add(Member::ExternalId("not-a-braze-user".into())));
    let report = braze.send_changes(&target, stream::iter(changes)).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    assert_eq!(report.totals.requests, 1002u32.div_ceil(75));
    assert_eq!(report.totals.added, 1002, "Braze does not say which users it has");
    let track = sandbox.stats().track;
    assert_eq!(track.max_objects_in_request, 75);
    assert_eq!((track.users_created, track.missing_update_existing_only, track.unknown_users), (0, 0, 1));
    assert_eq!(sandbox.segment("cohorts", Some("vip")).len(), 1001);

    // Removals take the cohort id out of the array, and leave other cohorts' ids alone.
    let other = attribute_target(sandbox.url(), REST_API_KEY, "cohorts", AttributeShape::Array, "other");
    assert!(braze.send_changes(&other, adds(0..10)).await.is_complete());
    let leave = stream::iter((0..500).map(|i| Change::remove(ext(i))));
    assert!(braze.send_changes(&target, leave).await.is_complete());
    assert_eq!(sandbox.segment("cohorts", Some("vip")).len(), 501);
    assert_eq!(sandbox.attributes("u3").unwrap()["cohorts"], serde_json::json!(["other"]));
    assert_eq!(sandbox.stats().track.wasted_writes, 0, "every write changed something");
}

#[tokio::test]
async fn boolean_membership_sets_true_and_deletes_with_null() {
    let sandbox = sandbox(100).await;
    let braze = client();
    let target = target(&sandbox, AttributeShape::Boolean, REST_API_KEY);
    assert!(braze.send_changes(&target, adds(0..100)).await.is_complete());
    assert_eq!(sandbox.segment("cohorts", None).len(), 100);
    let leave = stream::iter((0..40).map(|i| Change::remove(ext(i))));
    assert!(braze.send_changes(&target, leave).await.is_complete());
    assert_eq!(sandbox.segment("cohorts", None).len(), 60);
    assert!(!sandbox.attributes("u0").unwrap().contains_key("cohorts"), "null deletes the attribute");
}

#[tokio::test]
async fn a_wrong_key_is_a_401_and_a_key_without_users_track_a_403_after_one_request() {
    let sandbox = sandbox(200).await;
    let braze = client();
    let report = braze.send_changes(&target(&sandbox, AttributeShape::Array, "rest-SECRET-wrong"), adds(0..200)).await;
    match &report.stopped {
        Some(e @ BrazeError::Unauthorized { reason: UnauthorizedReason::RestApiKey, .. }) => {
            let text = e.to_string();
            assert!(text.contains("users.track") && text.contains("APIs and Identifiers"), "{text}");
            assert!(!text.contains("rest-SECRET-wrong"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(report.totals.requests, 1, "the first request goes alone");

    sandbox
        .set_rest_api_keys(vec![RestApiKey { key: REST_API_KEY.into(), permissions: vec!["campaigns.list".into()] }]);
    let report = braze.send_changes(&target(&sandbox, AttributeShape::Array, REST_API_KEY), adds(0..200)).await;
    assert!(matches!(report.stopped, Some(BrazeError::Forbidden { .. })), "{:?}", report.stopped);
    assert!(report.stopped.unwrap().is_permanent());
    assert_eq!(sandbox.stats().track.data_points, 0);
}

#[tokio::test]
async fn objects_braze_rejects_are_counted_per_reason_and_not_as_added() {
    let sandbox = sandbox(150).await;
    sandbox.set_track_faults(Faults { reject_external_ids: vec!["u3".into(), "u80".into()], ..Faults::default() });
    let braze = client();
    let target = target(&sandbox, AttributeShape::Array, REST_API_KEY);
    let changes = stream::iter((0..100).map(|i| Change::remove(ext(i))).chain((100..150).map(|i| Change::add(ext(i)))));
    let report = braze.send_changes(&target, changes).await;
    assert!(report.is_complete());
    let t = &report.totals;
    assert_eq!((t.removed, t.added), (98, 50));
    assert_eq!((t.rejected.removes, t.rejected.adds), (2, 0));
    assert_eq!(t.rejected.by_reason.values().sum::<u64>(), 2);
    assert!(t.rejected.by_reason.keys().all(|r| r.contains("sandbox fault")), "{:?}", t.rejected.by_reason);
}

#[tokio::test]
async fn rate_limited_answers_wait_and_every_change_lands() {
    let sandbox = sandbox(300).await;
    let limit = RateLimit { requests: 2, window_ms: 1000, retry_after: false };
    let script = [ScriptedFault::Status(503)].into();
    sandbox.set_track_faults(Faults { rate_limit: Some(limit), script, ..Faults::default() });
    let braze = client();
    let report = braze.send_changes(&target(&sandbox, AttributeShape::Array, REST_API_KEY), adds(0..300)).await;
    assert!(report.is_complete(), "{:?}", report.stopped);
    assert_eq!(sandbox.segment("cohorts", Some("vip")).len(), 300);
    assert_eq!(sandbox.stats().track.wasted_writes, 0);
}

#[tokio::test]
async fn a_key_that_is_not_a_header_value_is_refused_before_sending() {
    let sandbox = sandbox(10).await;
    let report = client().send_changes(&target(&sandbox, AttributeShape::Array, "key\r\nX-Evil: 1"), adds(0..10)).await;
    match &report.stopped {
        Some(BrazeError::InvalidRequest(text)) => assert!(!text.contains("Evil"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sandbox.stats().track.requests, 0);
}
