//! `spec.retry` on a real kube-apiserver with the Braze sandbox: a run that fails while Braze
//! answers 5xx is retried by itself — after a restart too — and succeeds once Braze
//! recovers; a failure that needs a person is not retried; retries stop at the limit and a
//! requested run still works. The test clock stands in for the backoff.

use std::sync::Arc;
use std::time::Duration;

use crate::controller_support::*;
use braze_sandbox::Faults;
use cohort_operator::api::{CohortImportStatus, RunResult, RunTrigger, STALLED};
use cohort_operator::braze::retry::RetryPolicy;
use cohort_operator::braze::{BrazeClient, BrazeClientConfig};
use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use jiff::SignedDuration;
use serde_json::{Value, json};

/// The real pipeline, with a Braze client that gives up on a request after two quick
/// attempts: a run against a failing Braze fails in well under a second.
fn impatient_importer(env: &Env) -> Arc<PipelineImporter> {
    let braze = BrazeClient::new(BrazeClientConfig {
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        ..BrazeClientConfig::default()
    })
    .unwrap();
    Arc::new(PipelineImporter::new(
        env.client.clone(),
        braze,
        SnapshotStoreKind::Cluster,
        env.scratch.path().to_owned(),
    ))
}

async fn start(env: &Env) -> Operator {
    env.start_importing(env.config(), None, impatient_importer(env)).await
}

/// A `Once` import (one run, soon after creation: no scheduled run to bound the retries)
/// with `retry`.
fn once_with_retry(env: &Env, name: &str, retry: Value) -> Value {
    let mut doc = env.import(name, name, json!({ "cadence": "Once" }));
    doc["spec"]["retry"] = retry;
    doc
}

fn stalled(status: &CohortImportStatus) -> String {
    status.conditions.iter().find(|c| c.type_ == STALLED).map(|c| c.status.clone()).unwrap_or_default()
}

fn server_errors() -> Faults {
    Faults { server_error_rate: 1.0, ..Faults::default() }
}

#[tokio::test]
async fn a_failed_run_is_retried_after_its_backoff_and_then_succeeds() {
    let env = Env::new("ctl-retry").await;
    env.put_members(&ids(0..5)).await;
    env.sandbox.set_faults(server_errors());
    let operator = start(&env).await;
    let retry = json!({ "limit": 3, "backoffSeconds": 600, "maxBackoffSeconds": 3600 });
    env.create(once_with_retry(&env, "flaky", retry)).await;

    // The first run fails on Braze's 500s; a retry is scheduled 7.5 to 10 minutes later.
    let status = env
        .wait_status("flaky", "failed with a retry pending", |s| {
            s.history.len() == 1 && s.current_run.is_none() && s.next_retry_at.is_some()
        })
        .await
        .status
        .unwrap();
    let failed = status.history[0].clone();
    assert_eq!((failed.trigger, failed.result), (RunTrigger::Initial, RunResult::Failed), "{}", failed.message);
    let retry_at = status.next_retry_at.unwrap();
    let wait = retry_at.duration_since(failed.finished_at.unwrap());
    assert!(wait >= SignedDuration::from_secs(450) && wait <= SignedDuration::from_secs(600), "{wait:?}");
    assert_eq!(status.retry_attempt, Some(1));
    assert_eq!(status.next_run_at, Some(retry_at), "kubectl get's NEXT RUN shows the retry");
    let status = env.wait_reason("flaky", "RetryScheduled").await.status.unwrap();
    let message = &status.ready().unwrap().message;
    assert!(message.contains(&format!("retry 1 of 3 at {retry_at}")), "{message}");
    assert_eq!(stalled(&status), "False", "the import gets better by itself");
    let note = env.wait_event("flaky", "RetryScheduled").await;
    assert_eq!(note, format!("Run {} failed; retry 1 of 3 at {retry_at} (spec.retry)", failed.id));
    assert!(env.members("flaky").is_empty());

    // The retry is in status: an operator that restarts meanwhile keeps it.
    operator.kill().await;
    let operator = start(&env).await;
    env.sandbox.set_faults(Faults::default());
    env.clock.set(retry_at - SignedDuration::from_secs(1));
    let status = env.wait_runs("flaky", 2).await.status.unwrap();
    let retried = &status.history[0];
    assert_eq!((retried.trigger, retried.result), (RunTrigger::Retry, RunResult::Succeeded), "{}", retried.message);
    assert!(retried.started_at >= retry_at, "not before its time");
    assert_eq!(status.history[1].id, failed.id, "history: the failure, then the retry's success");
    assert_eq!((retried.added, status.members), (5, Some(5)));
    assert_eq!((status.next_retry_at, status.retry_attempt, status.next_run_at), (None, None, None));
    assert_eq!(status.last_handled_run_request, None, "nobody asked for it");
    assert_eq!(ready_reason(&status), Some("Succeeded"));
    assert_eq!(env.members("flaky"), set(&ids(0..5)));
    operator.stop().await;
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_a_requested_run_still_works() {
    let env = Env::new("ctl-retry-limit").await;
    env.put_members(&ids(0..3)).await;
    env.sandbox.set_faults(server_errors());
    let operator = start(&env).await;
    let retry = json!({ "limit": 1, "backoffSeconds": 300, "maxBackoffSeconds": 300 });
    env.create(once_with_retry(&env, "down", retry)).await;
    let status = env
        .wait_status("down", "failed with a retry pending", |s| s.history.len() == 1 && s.next_retry_at.is_some())
        .await
        .status
        .unwrap();
    env.clock.set(status.next_retry_at.unwrap());

    // The one retry fails too: none is left, and the import says it needs a look.
    let status = env.wait_runs("down", 2).await.status.unwrap();
    let retried = &status.history[0];
    assert_eq!((retried.trigger, retried.result), (RunTrigger::Retry, RunResult::Failed), "{}", retried.message);
    assert_eq!((status.next_retry_at, status.retry_attempt, status.next_run_at), (None, None, None));
    let status = env.wait_reason("down", "Failed").await.status.unwrap();
    assert_eq!(stalled(&status), "True");

    // A person looks, Braze is back, and a requested run goes through.
    env.sandbox.set_faults(Faults::default());
    env.request_run("down", "after-outage").await;
    let status = env.wait_runs("down", 3).await.status.unwrap();
    let manual = &status.history[0];
    assert_eq!((manual.trigger, manual.result), (RunTrigger::Manual, RunResult::Succeeded), "{}", manual.message);
    assert_eq!(env.members("down"), set(&ids(0..3)));
    operator.stop().await;
}

#[tokio::test]
async fn a_failure_that_needs_a_person_is_not_retried() {
    let env = Env::new("ctl-retry-permanent").await;
    env.put_members(&ids(0..3)).await;
    // Braze refuses the data import key (401): permanent until someone changes the Secret.
    env.put_secret("braze", "data-import-key", "not-the-key").await;
    let operator = start(&env).await;
    env.create(once_with_retry(&env, "refused", json!({}))).await;
    let status = env.wait_runs("refused", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Failed);
    assert!(run.message.contains("401"), "{}", run.message);
    assert_eq!((status.next_retry_at, status.retry_attempt), (None, None), "default spec.retry, not for this");
    let status = env.wait_reason("refused", "Failed").await.status.unwrap();
    assert_eq!(stalled(&status), "True");
    operator.stop().await;
}
