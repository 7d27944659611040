//! How platform tooling sees an import, on a real kube-apiserver with the Braze sandbox:
//! kstatus's verdict (cli-utils' generic rules, as Flux applies them without custom health
//! checks) for failed, running and healthy imports; Flux's "reconcile now" annotation.

use crate::controller_support::*;
use braze_sandbox::Faults;
use cohort_operator::api::{self, RunResult, RunTrigger};
use serde_json::{Value, json};

/// kstatus's verdict on a custom resource, following cli-utils' generic algorithm
/// (`sigs.k8s.io/cli-utils/pkg/kstatus/status`, `checkGenericProperties`) in its order:
/// being deleted → `Terminating`; `status.observedGeneration` behind `metadata.generation` →
/// `InProgress`; `Reconciling=True` → `InProgress`; `Stalled=True` → `Failed`; `Ready=False`
/// → `InProgress`; otherwise `Current`.
fn kstatus(object: &Value) -> &'static str {
    if !object["metadata"]["deletionTimestamp"].is_null() {
        return "Terminating";
    }
    let generation = &object["metadata"]["generation"];
    let observed = &object["status"]["observedGeneration"];
    if !generation.is_null() && observed != generation {
        return "InProgress";
    }
    let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let is = |type_: &str, value: &str| conditions.iter().any(|c| c["type"] == type_ && c["status"] == value);
    if is("Reconciling", "True") {
        "InProgress"
    } else if is("Stalled", "True") {
        "Failed"
    } else if is("Ready", "False") {
        "InProgress"
    } else {
        "Current"
    }
}

fn verdict(import: &api::CohortImport) -> &'static str {
    kstatus(&serde_json::to_value(import).unwrap())
}

/// The three conditions' (type, status, observedGeneration), in order.
fn conditions(import: &api::CohortImport) -> Vec<(String, String, Option<i64>)> {
    let status = import.status.as_ref().unwrap();
    status.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.observed_generation)).collect()
}

#[tokio::test]
async fn kstatus_sees_failed_running_and_healthy_imports() {
    let env = Env::new("ctl-kstatus").await;
    env.put_members(&ids(0..2500)).await;
    let operator = env.start().await;
    let daily = json!({ "cadence": "Daily", "at": "06:30" });

    // Healthy: a run that succeeded.
    env.create(env.import("healthy", "healthy", daily.clone())).await;
    let scheduled = env.wait_reason("healthy", "Scheduled").await;
    assert_eq!(verdict(&scheduled), "Current", "a new import waiting for its first run is healthy");
    env.request_run("healthy", "1").await;
    let healthy = env.wait_runs("healthy", 1).await;
    let generation = healthy.metadata.generation;
    assert_eq!(healthy.status.as_ref().unwrap().history[0].result, RunResult::Succeeded);
    assert_eq!(
        conditions(&healthy),
        [
            ("Ready".into(), "True".into(), generation),
            ("Reconciling".into(), "False".into(), generation),
            ("Stalled".into(), "False".into(), generation)
        ]
    );
    assert_eq!(verdict(&healthy), "Current");

    // Failed: its source is missing; only a person can fix that.
    let mut broken = env.import("broken", "broken", daily.clone());
    broken["spec"]["source"]["configMap"]["name"] = json!("absent");
    env.create(broken).await;
    env.wait_reason("broken", "Scheduled").await;
    env.request_run("broken", "1").await;
    let failed = env.wait_runs("broken", 1).await;
    assert_eq!(ready_reason(failed.status.as_ref().unwrap()), Some("ConfigMapNotFound"));
    let stalled = failed.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Stalled").unwrap().clone();
    assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "ConfigMapNotFound"));
    assert!(stalled.message.contains("absent"), "{}", stalled.message);
    assert_eq!(verdict(&failed), "Failed");

    // Running: a slow Braze keeps the run going while kstatus looks.
    env.sandbox.set_faults(Faults { latency_ms: 700, ..Faults::default() });
    env.create(env.import("busy", "busy", daily)).await;
    env.wait_reason("busy", "Scheduled").await;
    env.request_run("busy", "1").await;
    let running = env.wait_status("busy", "running", |s| s.current_run.is_some()).await;
    assert_eq!(verdict(&running), "InProgress");
    let reconciling = running.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Reconciling").cloned();
    assert_eq!(reconciling.map(|c| (c.status, c.reason)), Some(("True".into(), "Running".into())));
    env.sandbox.set_faults(Faults::default());
    let done = env.wait_runs("busy", 1).await;
    assert_eq!(verdict(&done), "Current", "{:?}", done.status.unwrap().history[0].message);

    // A spec change not yet observed is InProgress whatever the conditions say.
    let mut newer = serde_json::to_value(&healthy).unwrap();
    newer["metadata"]["generation"] = json!(generation.unwrap() + 1);
    assert_eq!(kstatus(&newer), "InProgress");
    operator.stop().await;
}

#[tokio::test]
async fn flux_requested_at_runs_once_per_value_independently_of_ours() {
    let env = Env::new("ctl-flux").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    env.create(env.import("gitops", "gitops", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.wait_reason("gitops", "Scheduled").await;

    let flux = |value: &str| json!({ "metadata": { "annotations": { api::FLUX_RECONCILE_ANNOTATION: value } } });
    env.merge("gitops", flux("2026-11-29T01:00:00Z")).await;
    let status = env.wait_runs("gitops", 1).await.status.unwrap();
    assert_eq!(status.history[0].trigger, RunTrigger::Manual);
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(status.last_handled_reconcile_at.as_deref(), Some("2026-11-29T01:00:00Z"));
    assert_eq!(env.members("gitops"), set(&ids(0..3)));

    // Our annotation runs once more, with Flux's value unchanged: no second run for it.
    env.request_run("gitops", "ours-1").await;
    let status = env
        .wait_status("gitops", "handled ours-1", |s| {
            s.last_handled_run_request.as_deref() == Some("ours-1") && s.current_run.is_none()
        })
        .await
        .status
        .unwrap();
    assert_eq!(status.history.len(), 2, "{:?}", status.history);

    // Other changes do not run it again; a new Flux value does, once.
    env.merge("gitops", json!({ "metadata": { "labels": { "team": "growth" } } })).await;
    env.merge("gitops", flux("2026-11-29T01:05:00Z")).await;
    let status = env
        .wait_status("gitops", "handled the second Flux request", |s| {
            s.last_handled_reconcile_at.as_deref() == Some("2026-11-29T01:05:00Z") && s.current_run.is_none()
        })
        .await
        .status
        .unwrap();
    assert_eq!(status.history.len(), 3, "{:?}", status.history);
    assert!(status.history.iter().all(|r| r.trigger == RunTrigger::Manual && r.result == RunResult::Succeeded));
    assert_eq!(status.last_handled_run_request.as_deref(), Some("ours-1"));
    operator.stop().await;
}

#[tokio::test]
async fn history_limits_keep_the_last_failure_in_sight() {
    let env = Env::new("ctl-history").await;
    let operator = env.start().await;
    let mut doc = env.import("kept", "kept", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["historyLimit"] = json!(2);
    doc["spec"]["failedRunsHistoryLimit"] = json!(1);
    env.create(doc).await;
    env.wait_reason("kept", "Scheduled").await;

    // No ConfigMap yet: the first run fails.
    env.request_run("kept", "0").await;
    let status = env.wait_runs("kept", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Failed, "{}", status.history[0].message);
    let failure = status.history[0].id.clone();

    // Four successes: two are kept (historyLimit, the default of successfulRunsHistoryLimit),
    // and the failure stays.
    env.put_members(&ids(0..3)).await;
    for i in 1..=4 {
        let value = i.to_string();
        env.request_run("kept", &value).await;
        env.wait_status("kept", &format!("run {i} done"), move |s| {
            s.last_handled_run_request.as_deref() == Some(value.as_str())
                && s.current_run.is_none()
                && s.last_run.as_ref().is_some_and(|r| r.result == RunResult::Succeeded)
        })
        .await;
    }
    let status = env.get("kept").await.status.unwrap();
    let kept: Vec<_> = status.history.iter().map(|r| (r.result, r.trigger)).collect();
    assert_eq!(kept.len(), 3, "{:?}", status.history);
    assert_eq!(&kept[..2], [(RunResult::Succeeded, RunTrigger::Manual); 2]);
    assert_eq!(status.history[2].id, failure, "the last failure is still in sight");
    assert_eq!(status.members, Some(3));
    operator.stop().await;
}

/// Waits until every line of `wanted` is in the metrics text of `operator`.
async fn wait_metrics(operator: &Operator, wanted: &[String]) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = operator.metrics.render();
        if wanted.iter().all(|w| text.contains(w.as_str())) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "not all of {wanted:#?} within {WAIT:?}:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn per_import_gauges_are_rebuilt_from_status_after_a_restart() {
    let env = Env::new("ctl-gauges").await;
    env.put_members(&ids(0..4)).await;
    let first = env.start().await;
    let daily = json!({ "cadence": "Daily", "at": "06:30" });
    env.create(env.import("good", "good", daily.clone())).await;
    let mut broken = env.import("bad", "bad", daily.clone());
    broken["spec"]["source"]["configMap"]["name"] = json!("absent");
    env.create(broken).await;
    env.create(env.import("new", "new", daily)).await;
    env.request_run("good", "1").await;
    env.request_run("bad", "1").await;
    let good = env.wait_runs("good", 1).await.status.unwrap();
    env.wait_runs("bad", 1).await;
    env.wait_reason("new", "Scheduled").await;
    first.kill().await;

    // A new process has seen no run: every gauge comes from status.
    let second = env.start().await;
    let ns = &env.ns;
    let success = good.last_successful_run_at.unwrap().as_second();
    let text = wait_metrics(
        &second,
        &[
            format!("cohort_operator_import_ready{{namespace=\"{ns}\",name=\"good\",reason=\"Succeeded\"}} 1"),
            format!("cohort_operator_import_ready{{namespace=\"{ns}\",name=\"bad\",reason=\"ConfigMapNotFound\"}} 1"),
            format!("cohort_operator_import_ready{{namespace=\"{ns}\",name=\"new\",reason=\"Scheduled\"}} 1"),
            format!(
                "cohort_operator_import_last_run_result{{namespace=\"{ns}\",name=\"good\",result=\"Succeeded\"}} 1"
            ),
            format!("cohort_operator_import_last_run_result{{namespace=\"{ns}\",name=\"bad\",result=\"Failed\"}} 1"),
            format!(
                "cohort_operator_import_last_success_timestamp_seconds{{namespace=\"{ns}\",name=\"good\"}} {success}"
            ),
            format!("cohort_operator_import_cohort_size{{namespace=\"{ns}\",name=\"good\"}} 4"),
        ],
    )
    .await;
    // An import that never succeeded has no success time to be stale about, but its Ready
    // series says why it is unhealthy.
    assert!(!text.contains(&format!("import_last_success_timestamp_seconds{{namespace=\"{ns}\",name=\"bad\"}}")));
    assert_eq!(text.matches(&format!("cohort_operator_import_ready{{namespace=\"{ns}\",name=\"good\"")).count(), 1);

    // Deleted: its series go.
    env.delete("good").await;
    env.wait_for("good", "deleted", |i| i.is_none()).await;
    let deadline = std::time::Instant::now() + WAIT;
    while second.metrics.render().contains("name=\"good\"") {
        assert!(std::time::Instant::now() < deadline, "{}", second.metrics.render());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    second.stop().await;
}
