//! What a run costs in Kubernetes API requests (issue 25, "a lean run"): every request the
//! operator sends, counted by verb and resource through a layer on its client.

use std::time::Duration;

use crate::controller_support::*;
use serde_json::json;

/// No request for this long: whatever a change caused has been sent.
const QUIET: Duration = Duration::from_millis(1500);

/// A later run of a one-member import that changes something: one status patch when it
/// starts and one when it ends, one read of the snapshot head and two conditional writes of
/// it (the keys in doubt, the commit), and one Event (`RunSucceeded`). The Braze key comes
/// from the cache of what the Secret watch saw unchanged.
const LATER_RUN_BUDGET: usize = 6;

#[tokio::test]
async fn a_later_one_member_run_costs_at_most_six_requests_and_a_reconcile_that_changes_nothing_none() {
    let env = Env::new("ctl-lean").await;
    let (client, log) = env.recording_client().await;
    let importer = env.importer_on(client.clone());
    let operator = env.start_on(client, env.config(), None, importer).await;
    let mut doc = env.import("lean", "lean", json!({ "cadence": "Weekly", "dayOfWeek": "Monday", "at": "03:00" }));
    doc["spec"]["source"] = json!({ "inline": { "rows": [ { "id": "u1" } ] } });
    env.create(doc).await;
    env.wait_reason("lean", "Scheduled").await;
    log.settle(QUIET).await;
    log.take();

    // The first run adds the finalizer too.
    env.request_run("lean", "first").await;
    env.wait_status("lean", "done with the first run", |s| {
        s.last_handled_run_request.as_deref() == Some("first") && s.current_run.is_none() && s.history.len() == 1
    })
    .await;
    log.settle(QUIET).await;
    let first = log.take();
    println!("first run: {} requests: {first:#?}", first.len());
    assert!(first.len() <= LATER_RUN_BUDGET + 1, "first run: {first:#?}");
    assert_eq!(env.members("lean"), set(&["u1".to_owned()]));

    // The member changes (the spec's new generation is recorded), then a run sends it.
    env.merge("lean", json!({ "spec": { "source": { "inline": { "rows": [ { "id": "u2" } ] } } } })).await;
    env.wait_for("lean", "new generation observed", |i| {
        i.is_some_and(|i| i.status.as_ref().and_then(|s| s.observed_generation) == i.metadata.generation)
    })
    .await;
    log.settle(QUIET).await;
    log.take();
    env.request_run("lean", "second").await;
    let done = env
        .wait_status("lean", "done with the second run", |s| {
            s.last_handled_run_request.as_deref() == Some("second") && s.current_run.is_none() && s.history.len() == 2
        })
        .await;
    let run = &done.status.unwrap().history[0];
    assert_eq!((run.added, run.removed), (1, 1), "{}", run.message);
    log.settle(QUIET).await;
    let later = log.take();
    println!("later run: {} requests: {later:#?}", later.len());
    assert!(later.len() <= LATER_RUN_BUDGET, "a later run sent {} requests: {later:#?}", later.len());
    assert!(!later.iter().any(|r| r.ends_with(" secrets")), "the Braze key comes from the cache: {later:#?}");
    assert!(
        !later.iter().any(|r| r == "create configmaps" || r == "deletecollection configmaps"),
        "a one-member body is kept in the snapshot head, no chunk: {later:#?}"
    );
    assert_eq!(env.members("lean"), set(&["u2".to_owned()]));

    // A reconcile that changes nothing sends nothing.
    let reconciles = operator.metrics.reconciles.get();
    env.merge("lean", json!({ "metadata": { "labels": { "team": "growth" } } })).await;
    wait_until("reconciled after the label", || operator.metrics.reconciles.get() > reconciles).await;
    log.settle(QUIET).await;
    let idle = log.take();
    assert!(idle.is_empty(), "a reconcile that changes nothing sent {idle:#?}");
    operator.stop().await;
}
