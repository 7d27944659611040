//! An import's life on a real kube-apiserver with the Braze sandbox: one schedule per
//! cohort, suspend and resume, a rotated Secret, both deletion policies, and status writes
//! that never overwrite a newer status.

use crate::controller_support::*;
use braze_sandbox::{DataImportKey, Faults};
use cohort_operator::api::{CohortImportStatus, RunResult, RunTrigger};
use cohort_operator::controller::status;
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use serde_json::json;

#[tokio::test]
async fn the_older_import_of_a_cohort_runs_and_the_other_waits_for_it() {
    let env = Env::new("ctl-conflict").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    env.create(env.import("first", "shared", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.wait_reason("first", "Scheduled").await;
    // An import holds its cohort once it has run.
    env.request_run("first", "first-run").await;
    env.wait_runs("first", 1).await;
    env.create(env.import("second", "shared", json!({ "cadence": "Daily", "at": "07:30" }))).await;
    let status = wait_held_by(&env, "second", "first").await;
    assert_eq!(ready(&status).unwrap().status, "False");
    assert_eq!(status.next_run_at, None);
    env.wait_event("second", "Conflict").await;

    // A run asked of the loser waits; the winner runs as usual.
    env.request_run("second", "asked-while-in-conflict").await;
    env.wait_status("second", "holding the request", |s| {
        ready_reason(s) == Some("Conflict") && ready(s).unwrap().message.contains("waits")
    })
    .await;
    env.request_run("first", "winner-runs").await;
    env.wait_runs("first", 2).await;
    assert!(env.get("second").await.status.unwrap().history.is_empty(), "the loser never ran");

    // The winner goes (keeping Braze's cohort as it is): the other takes over and runs
    // the request it was holding.
    env.delete("first").await;
    env.wait_for("first", "deleted", |i| i.is_none()).await;
    let status = env.wait_runs("second", 1).await.status.unwrap();
    assert_eq!(status.history[0].trigger, RunTrigger::Manual);
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert!(status.next_run_at.is_some());
    assert_eq!(env.members("shared"), set(&ids(0..3)));
    operator.stop().await;
}

/// Imports change cohorts: one moving onto a held cohort waits, the holder moving away lets
/// it go, and a holder moving in takes the cohort over (conflicts are looked up by cohort: a
/// change must move the import there).
#[tokio::test]
async fn an_import_moving_between_cohorts_waits_for_the_holder_or_lets_go() {
    let env = Env::new("ctl-move").await;
    env.put_members(&ids(0..2)).await;
    let operator = env.start().await;
    env.create(env.import("first", "shared", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.request_run("first", "first-run").await;
    env.wait_runs("first", 1).await;
    env.create(env.import("second", "elsewhere", json!({ "cadence": "Daily", "at": "07:30" }))).await;
    env.wait_reason("second", "Scheduled").await;

    move_to(&env, "second", "shared").await;
    wait_held_by(&env, "second", "first").await;

    move_to(&env, "first", "moved").await;
    let freed = env.wait_reason("second", "Scheduled").await;
    assert!(freed.status.unwrap().next_run_at.is_some());
    assert_ne!(ready_reason(env.get("first").await.status.as_ref().unwrap()), Some("Conflict"));

    // The holder moving onto a cohort whose import never ran takes it over.
    env.create(env.import("third", "own", json!({ "cadence": "Daily", "at": "08:30" }))).await;
    env.wait_reason("third", "Scheduled").await;
    move_to(&env, "first", "own").await;
    wait_held_by(&env, "third", "first").await;
    operator.stop().await;
}

async fn move_to(env: &Env, name: &str, cohort: &str) {
    env.merge(name, json!({ "spec": { "cohort": { "id": cohort } } })).await;
}

/// Waits until `name` is in `Conflict`, its message naming `holder`.
async fn wait_held_by(env: &Env, name: &str, holder: &str) -> CohortImportStatus {
    let status = env.wait_reason(name, "Conflict").await.status.unwrap();
    let message = &ready(&status).unwrap().message;
    assert!(message.contains(&format!("{}/{holder}", env.ns)), "{name}: the holder is named: {message}");
    status
}

#[tokio::test]
async fn suspend_lets_a_run_in_progress_finish_and_resume_skips_what_was_missed() {
    let env = Env::new("ctl-suspend").await;
    env.put_members(&ids(0..2500)).await;
    let operator = env.start().await;
    env.create(env.import("paused", "paused", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let status = env.wait_status("paused", "Scheduled", |s| s.next_run_at.is_some()).await.status.unwrap();
    let first: Timestamp = status.next_run_at.unwrap();

    // A slow Braze keeps the run going while the import is suspended.
    env.sandbox.set_faults(Faults { latency_ms: 700, ..Faults::default() });
    env.request_run("paused", "slow").await;
    env.wait_status("paused", "Running", |s| s.current_run.is_some()).await;
    cohort_operator::cli::set_suspend(env.client.clone(), &env.ns, "paused", true).await.unwrap();
    let status = env
        .wait_status("paused", "Suspended after the run", |s| {
            ready_reason(s) == Some("Suspended") && s.history.len() == 1
        })
        .await
        .status
        .unwrap();
    assert_eq!(
        status.history[0].result,
        RunResult::Succeeded,
        "the run in progress finished: {}",
        status.history[0].message
    );
    assert_eq!(status.history[0].added, 2500);
    assert_eq!(status.next_run_at, None);
    env.sandbox.set_faults(Faults::default());

    // While suspended, the run time passes; resuming does not catch up on it.
    env.put_members(&ids(0..10)).await;
    env.clock.set(first + SignedDuration::from_mins(10));
    cohort_operator::cli::set_suspend(env.client.clone(), &env.ns, "paused", false).await.unwrap();
    let status = env
        .wait_status("paused", "resumed", |s| ready_reason(s) == Some("Succeeded") && s.next_run_at.is_some())
        .await
        .status
        .unwrap();
    assert_eq!(status.history.len(), 1, "nothing ran while suspended or on resume");
    let next: Timestamp = status.next_run_at.unwrap();
    assert_eq!(next, first + SignedDuration::from_hours(24));

    // It runs at its next time again.
    env.clock.set(next - SignedDuration::from_secs(1));
    let status = env.wait_runs("paused", 2).await.status.unwrap();
    assert_eq!(status.history[0].trigger, RunTrigger::Scheduled);
    assert_eq!((status.history[0].removed, status.history[0].cohort_size), (2490, 10));
    assert_eq!(env.members("paused"), set(&ids(0..10)));
    operator.stop().await;
}

#[tokio::test]
async fn a_rotated_secret_is_used_by_the_next_run() {
    let env = Env::new("ctl-rotate").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    env.create(env.import("rotate", "rotate", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.request_run("rotate", "1").await;
    let status = env.wait_runs("rotate", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);

    // The customer replaces the data import key in Braze: the old one stops working.
    env.sandbox.set_data_import_keys(vec![DataImportKey { key: "import-key-2".into(), partners: vec![] }]);
    env.put_members(&ids(0..5)).await;
    env.request_run("rotate", "2").await;
    let status = env.wait_runs("rotate", 2).await.status.unwrap();
    let failed = &status.history[0];
    assert_eq!(failed.result, RunResult::Failed);
    assert!(failed.message.contains("client secret"), "{}", failed.message);
    assert!(!failed.message.contains(IMPORT_KEY), "no key in status: {}", failed.message);
    assert_eq!(ready_reason(&status), Some("Failed"));
    env.wait_event("rotate", "RunFailed").await;

    // The Secret is updated: the next run uses the new key and sends what was missed.
    env.put_secret("braze", "data-import-key", "import-key-2").await;
    env.request_run("rotate", "3").await;
    let status = env.wait_runs("rotate", 3).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(status.history[0].added, 2);
    assert_eq!(env.members("rotate"), set(&ids(0..5)));
    operator.stop().await;
}

#[tokio::test]
async fn deletion_retains_or_removes_the_members_it_sent() {
    let env = Env::new("ctl-delete").await;
    env.put_members(&ids(0..1500)).await;
    let operator = env.start().await;
    env.create(env.import("keep", "keep", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let mut doc = env.import("remove", "remove", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["deletionPolicy"] = json!("RemoveMembers");
    env.create(doc).await;
    for name in ["keep", "remove"] {
        env.request_run(name, "1").await;
        let status = env.wait_runs(name, 1).await.status.unwrap();
        assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    }
    assert_eq!(env.members("keep").len(), 1500);
    assert_eq!(env.members("remove").len(), 1500);
    let keep = env.get("keep").await;
    assert!(keep.finalizers().contains(&cohort_operator::api::FINALIZER.to_owned()));
    let kept = env.snapshot_maps("keep").await.len();
    assert!(kept > 0);

    // Retain (the default): the cohort stays as it is in Braze, and so does its snapshot,
    // released (no holder), for an import of the same cohort applied later.
    env.delete("keep").await;
    env.wait_for("keep", "deleted", |i| i.is_none()).await;
    assert_eq!(env.members("keep"), set(&ids(0..1500)));
    let maps = env.snapshot_maps("keep").await;
    assert_eq!(maps.len(), kept);
    assert!(maps.iter().all(|cm| cm.metadata.owner_references.is_none()));
    let head = maps.iter().find(|cm| cm.metadata.labels.as_ref().unwrap()["cohorts.dev/snapshot-part"] == "head");
    assert!(!head.unwrap().metadata.labels.as_ref().unwrap().contains_key("cohorts.dev/snapshot-holder"));

    // RemoveMembers: every member it sent leaves the cohort, then the import goes.
    env.delete("remove").await;
    env.wait_for("remove", "deleted", |i| i.is_none()).await;
    assert!(env.members("remove").is_empty(), "members left: {}", env.members("remove").len());
    assert!(env.snapshot_maps("remove").await.is_empty());
    operator.stop().await;
}

#[tokio::test]
async fn a_removal_braze_refuses_holds_the_deletion_and_says_how_to_let_it_go() {
    let env = Env::new("ctl-delete-refused").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    let mut doc = env.import("refused", "refused", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["deletionPolicy"] = json!("RemoveMembers");
    env.create(doc).await;
    env.request_run("refused", "1").await;
    let status = env.wait_runs("refused", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);

    // The customer revoked the data import key: Braze refuses every removal (401), for good.
    env.sandbox.set_data_import_keys(vec![DataImportKey { key: "import-key-2".into(), partners: vec![] }]);
    env.delete("refused").await;
    let note = env.wait_event("refused", "CleanupFailed").await;
    assert!(note.contains("set spec.deletionPolicy to Retain"), "{note}");
    assert!(note.contains("401"), "the cause is named: {note}");
    let held = env.wait_reason("refused", "Deleting").await;
    let message = &ready(held.status.as_ref().unwrap()).unwrap().message;
    assert!(message.contains(&format!("kubectl patch cohortimport refused -n {}", env.ns)), "{message}");
    assert_eq!(env.members("refused"), set(&ids(0..3)), "nothing was removed");

    // Doing what it says lets the import go, and the members stay.
    env.merge("refused", json!({ "spec": { "deletionPolicy": "Retain" } })).await;
    env.wait_for("refused", "deleted", |i| i.is_none()).await;
    assert_eq!(env.members("refused"), set(&ids(0..3)));
    operator.stop().await;
}

#[tokio::test]
async fn a_status_computed_from_a_stale_copy_is_refused() {
    let env = Env::new("ctl-stale").await;
    env.put_members(&ids(0..1)).await;
    env.create(env.import("stale", "stale", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let api = env.imports();
    let old = env.get("stale").await;
    env.merge("stale", json!({ "metadata": { "labels": { "touched": "yes" } } })).await;
    let desired = cohort_operator::api::CohortImportStatus {
        next_run_at: Some("2030-01-01T00:00:00Z".parse().unwrap()),
        ..Default::default()
    };
    let err = status::write(&api, &old, &desired).await.expect_err("a write from a stale copy is refused");
    assert!(status::is_stale_write(&err), "{err}");
    let fresh = env.get("stale").await;
    assert_eq!(status::write(&api, &fresh, &desired).await.unwrap(), status::Written::Applied);
    let fresh = env.get("stale").await;
    assert_eq!(fresh.status.as_ref(), Some(&desired));
    assert_eq!(status::write(&api, &fresh, &desired).await.unwrap(), status::Written::Unchanged);
}

#[tokio::test]
async fn the_api_server_refuses_a_status_time_that_is_not_rfc_3339() {
    // Status times are typed: the CRD declares them `format: date-time`, so a malformed
    // one never reaches the controller (which would otherwise have to guess a time).
    let env = Env::new("ctl-times").await;
    env.create(env.import("times", "times", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let api = env.imports();
    let params = kube::api::PatchParams::default();
    for bad in
        [json!({ "nextRunAt": "tomorrow" }), json!({ "schedule": { "description": "d", "handledThrough": "06:30" } })]
    {
        let patch = kube::api::Patch::Merge(json!({ "status": bad }));
        let err = api.patch_status("times", &params, &patch).await.expect_err("a malformed time is refused");
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "{err}");
    }
    let good = kube::api::Patch::Merge(json!({ "status": { "nextRunAt": "2030-01-01T06:30:00Z" } }));
    let written = api.patch_status("times", &params, &good).await.expect("an RFC 3339 time is accepted");
    assert_eq!(written.status.unwrap().next_run_at, Some("2030-01-01T06:30:00Z".parse().unwrap()));
}

#[tokio::test]
async fn a_blocked_run_waits_for_approval_and_then_removes() {
    let env = Env::new("ctl-blocked").await;
    env.put_members(&ids(0..10)).await;
    let operator = env.start().await;
    let mut doc = env.import("guarded", "guarded", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["removalGuard"] = json!({ "maxRemovalPercent": 20 });
    env.create(doc).await;
    env.request_run("guarded", "1").await;
    env.wait_runs("guarded", 1).await;

    // Half the cohort leaves at once: the guard stops the run before anything is sent.
    env.put_members(&ids(0..5)).await;
    env.request_run("guarded", "2").await;
    let status = env.wait_runs("guarded", 2).await.status.unwrap();
    let blocked = status.history[0].clone();
    assert_eq!(blocked.result, RunResult::Blocked, "{}", blocked.message);
    assert_eq!((blocked.added, blocked.removed), (0, 0), "a blocked run sent nothing");
    assert_eq!((blocked.would_add, blocked.would_remove), (Some(0), Some(5)));
    assert_eq!(status.members, Some(10), "the last successful run's source, not the blocked one's");
    assert_eq!(ready_reason(&status), Some("Blocked"));
    assert!(blocked.message.contains(&blocked.id), "the message says which run to approve: {}", blocked.message);
    env.wait_event("guarded", "RunBlocked").await;
    assert_eq!(env.members("guarded").len(), 10);

    // Approving that run runs the import again with its removals allowed.
    cohort_operator::cli::approve(env.client.clone(), &env.ns, "guarded", &blocked.id).await.unwrap();
    let status = env.wait_runs("guarded", 3).await.status.unwrap();
    let approved = &status.history[0];
    assert_eq!(approved.trigger, RunTrigger::Manual);
    assert_eq!(approved.result, RunResult::Succeeded, "{}", approved.message);
    assert_eq!(approved.removed, 5);
    assert_eq!(env.members("guarded"), set(&ids(0..5)));
    operator.stop().await;
}

/// The finalizer comes with an import's first run: one that never ran holds no snapshot and
/// sent no one to Braze, so it goes at once when deleted, and its series go with it.
#[tokio::test]
async fn an_import_that_never_ran_is_deleted_at_once() {
    let env = Env::new("ctl-never-ran").await;
    let operator = env.start().await;
    env.create(env.import("idle", "idle", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let idle = env.wait_reason("idle", "Scheduled").await;
    assert!(idle.finalizers().is_empty(), "{:?}", idle.finalizers());
    let series = format!("cohort_operator_import_ready{{namespace=\"{}\",name=\"idle\"", env.ns);
    wait_until("its series exported", || operator.metrics.render().contains(&series)).await;
    env.delete("idle").await;
    env.wait_for("idle", "deleted", |i| i.is_none()).await;
    wait_until("its series gone", || !operator.metrics.render().contains(&series)).await;
    operator.stop().await;
}
