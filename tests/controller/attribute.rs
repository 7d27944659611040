//! Membership by custom attribute (`method: Attribute`, `/users/track` with the customer's
//! REST API key), end to end on a real kube-apiserver with the Braze sandbox: exact first
//! and churn imports that never create a user, the removal guard, a kill in the middle of a
//! run, refused keys, per-object errors, and a switch of method.

use crate::controller_support::*;
use braze_sandbox::{Faults, RestApiKey};
use cohort_operator::api::RunResult;
use serde_json::json;

const WEEKLY: fn() -> serde_json::Value = || json!({ "cadence": "Weekly", "dayOfWeek": "Monday", "at": "03:00" });

fn segment(env: &Env, cohort: &str) -> std::collections::BTreeSet<String> {
    env.sandbox.segment_external_ids("cohorts", Some(cohort)).into_iter().collect()
}

#[tokio::test]
async fn a_first_import_and_a_one_percent_churn_send_only_the_changes_and_create_nobody() {
    let env = Env::new("attr-exact").await;
    // 40 of the source's ids are not Braze users: update-only objects must not create them.
    let mut members = ids(0..2000);
    members.extend((0..40).map(|i| format!("stranger-{i}")));
    env.put_members(&members).await;
    let operator = env.start().await;
    env.create(env.attribute_import("vip", "vip", WEEKLY(), "cohorts", "Array")).await;
    env.wait_reason("vip", "Scheduled").await;

    env.request_run("vip", "first").await;
    let status = env.wait_runs("vip", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added, run.removed), (2040, 2040, 0));
    assert_eq!(segment(&env, "vip"), set(&ids(0..2000)));
    let track = env.sandbox.stats().track;
    assert_eq!(track.users_created, 0, "never a user created");
    assert_eq!(track.missing_update_existing_only, 0);
    assert_eq!((track.unknown_users, track.data_points, track.wasted_writes), (40, 2000, 0));
    assert_eq!(track.requests, 2040u64.div_ceil(75), "75 objects a request");
    assert!(track.max_objects_in_request <= 75);
    assert_eq!(env.sandbox.stats().users_requests, 0, "nothing through the partner API");
    assert_eq!(env.sandbox.stats().name_requests, 0, "an attribute has no cohort to name");

    // 1% churn: 20 leave, 20 join. Only those 40 objects are sent.
    env.sandbox.reset_stats();
    env.put_members(&ids(20..2020)).await;
    env.request_run("vip", "churn").await;
    let status = env.wait_runs("vip", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added, run.removed), (2000, 20, 60), "the 40 strangers left too");
    assert_eq!(segment(&env, "vip"), set(&ids(20..2020)));
    let track = env.sandbox.stats().track;
    assert_eq!((track.data_points, track.wasted_writes, track.users_created), (40, 0, 0));
    assert_eq!(track.unknown_users, 40);
    assert_eq!(track.requests, 80u64.div_ceil(75));
    operator.stop().await;
}

#[tokio::test]
async fn a_dry_run_sends_nothing_and_the_guard_blocks_a_mass_removal_by_boolean_attribute() {
    let env = Env::new("attr-guard").await;
    env.put_members(&ids(0..100)).await;
    let operator = env.start().await;
    let mut doc = env.attribute_import("flag", "flag", WEEKLY(), "in_flag_cohort", "Boolean");
    doc["spec"]["removalGuard"] = json!({ "maxRemovalPercent": 20 });
    doc["spec"]["dryRun"] = json!(true);
    env.create(doc).await;
    env.wait_reason("flag", "Scheduled").await;
    env.request_run("flag", "dry").await;
    let run = env.wait_runs("flag", 1).await.status.unwrap().history[0].clone();
    assert_eq!((run.result, run.would_add), (RunResult::DryRun, Some(100)), "{}", run.message);
    assert_eq!(env.sandbox.stats().track.requests, 0, "a dry run sends nothing");

    env.merge("flag", json!({ "spec": { "dryRun": false } })).await;
    env.request_run("flag", "first").await;
    let run = env.wait_runs("flag", 2).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!(env.sandbox.segment_external_ids("in_flag_cohort", None).len(), 100);

    // The Boolean attribute is the cohort in Braze: a new cohort id changes nothing there.
    env.sandbox.reset_stats();
    env.merge("flag", json!({ "spec": { "cohort": { "id": "flag-v2" } } })).await;
    env.request_run("flag", "new-id").await;
    let run = env.wait_runs("flag", 3).await.status.unwrap().history[0].clone();
    assert_eq!((run.result, run.added, run.removed), (RunResult::Succeeded, 0, 0), "{}", run.message);
    assert_eq!(env.sandbox.stats().track.requests, 0);

    env.put_members(&ids(0..10)).await;
    env.request_run("flag", "mass-removal").await;
    let run = env.wait_runs("flag", 4).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Blocked, "{}", run.message);
    assert_eq!(run.would_remove, Some(90));
    assert_eq!(env.sandbox.stats().track.requests, 0, "a blocked run sends nothing");
    assert_eq!(env.sandbox.segment_external_ids("in_flag_cohort", None).len(), 100);
    operator.stop().await;
}

#[tokio::test]
async fn an_operator_killed_mid_run_converges_exactly_without_creating_users() {
    let env = Env::new("attr-kill").await;
    env.put_members(&ids(0..3000)).await;
    let operator = env.start().await;
    env.create(env.attribute_import("cut", "cut", WEEKLY(), "cohorts", "Array")).await;
    env.wait_reason("cut", "Scheduled").await;

    // Braze is slow; the operator dies after the first requests were answered.
    env.sandbox.set_track_faults(Faults { latency_ms: 300, ..Faults::default() });
    env.request_run("cut", "now").await;
    wait_until("Braze receiving the run", || env.sandbox.stats().track.processed >= 150).await;
    operator.kill().await;
    env.sandbox.set_track_faults(Faults::default());

    let operator = env.start().await;
    let status = env.wait_runs("cut", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!(segment(&env, "cut"), set(&ids(0..3000)), "exact after the crash");
    let track = env.sandbox.stats().track;
    assert_eq!((track.users_created, track.missing_update_existing_only), (0, 0));
    // Every write beyond one per member re-sent a value the user already had: the resumed
    // run re-sends every key the first attempt left in doubt (all of its planned sends,
    // not only those in flight at the kill).
    assert_eq!(track.data_points, 3000 + track.wasted_writes, "{track:?}");
    assert!(track.wasted_writes <= 3000, "{track:?}");

    // The next run sends nothing: the snapshot holds exactly what Braze has.
    env.sandbox.reset_stats();
    env.request_run("cut", "again").await;
    let status = env.wait_runs("cut", 2).await.status.unwrap();
    assert_eq!((status.history[0].added, status.history[0].removed), (0, 0));
    assert_eq!(env.sandbox.stats().track.requests, 0);
    operator.stop().await;
}

#[tokio::test]
async fn a_refused_rest_api_key_stops_the_run_with_what_to_do_401_then_403() {
    let env = Env::new("attr-keys").await;
    env.put_members(&ids(0..500)).await;
    env.put_secret("braze-rest", "api-key", "a-deleted-key").await;
    let operator = env.start().await;
    let mut doc = env.attribute_import("keys", "keys", WEEKLY(), "cohorts", "Array");
    doc["spec"]["retry"] = json!({ "limit": 0 });
    env.create(doc).await;
    env.wait_reason("keys", "Scheduled").await;
    env.request_run("keys", "401").await;
    let run = env.wait_runs("keys", 1).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Failed);
    assert!(run.message.contains("401") && run.message.contains("APIs and Identifiers"), "{}", run.message);
    assert!(!run.message.contains("a-deleted-key"));
    assert_eq!(env.sandbox.stats().track.requests, 1, "a wrong key costs one request");

    // The right key, without the users.track permission: 403.
    env.put_secret("braze-rest", "api-key", REST_API_KEY).await;
    let export_only = RestApiKey { key: REST_API_KEY.into(), permissions: vec!["users.export.ids".into()] };
    env.sandbox.set_rest_api_keys(vec![export_only]);
    env.request_run("keys", "403").await;
    let run = env.wait_runs("keys", 2).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Failed);
    assert!(run.message.contains("403") && run.message.contains("users.track permission"), "{}", run.message);
    assert!(segment(&env, "keys").is_empty());
    operator.stop().await;
}

#[tokio::test]
async fn objects_braze_rejects_are_counted_by_reason_never_as_added() {
    let env = Env::new("attr-errors").await;
    env.put_members(&ids(0..200)).await;
    env.sandbox.set_track_faults(Faults {
        reject_external_ids: vec!["u7".into(), "u70".into(), "u170".into()],
        ..Faults::default()
    });
    let operator = env.start().await;
    env.create(env.attribute_import("errs", "errs", WEEKLY(), "cohorts", "Array")).await;
    env.wait_reason("errs", "Scheduled").await;
    env.request_run("errs", "now").await;
    let run = env.wait_runs("errs", 1).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added), (200, 197), "rejected objects are not added");
    assert!(run.message.contains("Braze rejected 3 users: 3× sandbox fault"), "{}", run.message);
    assert_eq!(segment(&env, "errs").len(), 197);
    operator.stop().await;
}

#[tokio::test]
async fn switching_method_starts_a_fresh_snapshot_and_leaves_the_partner_cohort_alone() {
    let env = Env::new("attr-switch").await;
    env.put_members(&ids(0..50)).await;
    let operator = env.start().await;
    env.create(env.import("sw", "sw", WEEKLY())).await;
    env.wait_reason("sw", "Scheduled").await;
    env.request_run("sw", "partner").await;
    env.wait_runs("sw", 1).await;
    assert_eq!(env.members("sw"), set(&ids(0..50)));

    let switched = env.attribute_import("sw", "sw", WEEKLY(), "cohorts", "Array");
    env.merge(
        "sw",
        json!({ "spec": { "destination": { "braze": {
        "partner": null, "dataImportKeySecretRef": null,
        "method": "Attribute", "apiKeySecretRef": switched["spec"]["destination"]["braze"]["apiKeySecretRef"],
        "attribute": switched["spec"]["destination"]["braze"]["attribute"],
    } } } }),
    )
    .await;
    env.put_members(&ids(10..50)).await;
    env.request_run("sw", "attribute").await;
    let run = env.wait_runs("sw", 2).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.added, run.removed), (40, 0), "the whole cohort, afresh");
    assert_eq!(segment(&env, "sw"), set(&ids(10..50)));
    assert_eq!(env.members("sw"), set(&ids(0..50)), "the partner cohort is left as it was");
    operator.stop().await;
}

#[tokio::test]
async fn a_device_id_mapping_with_the_attribute_method_is_refused_naming_the_fix() {
    let env = Env::new("attr-invalid").await;
    env.put_members(&ids(0..5)).await;
    let operator = env.start().await;
    let mut doc = env.attribute_import("bad", "bad", WEEKLY(), "cohorts", "Array");
    doc["spec"]["identifiers"] = json!({ "externalId": "id", "deviceId": "device" });
    doc["spec"]["destination"]["braze"]["partner"] = json!("kubit");
    env.create(doc).await;
    let invalid = env.wait_reason("bad", "InvalidSpec").await;
    let message = ready(invalid.status.as_ref().unwrap()).unwrap().message.clone();
    assert!(message.contains("spec.identifiers.deviceId") && message.contains("method: CohortImport"), "{message}");
    assert!(message.contains("spec.destination.braze.partner: is not used with method: Attribute"), "{message}");
    assert_eq!(env.sandbox.stats().track.requests, 0);
    operator.stop().await;
}
