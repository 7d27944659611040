//! The controller end to end on a real kube-apiserver, with the Braze sandbox and real
//! sources: schedules, manual runs, status, events and metrics.

use crate::controller_support::*;
use cohort_operator::api::{RunResult, RunTrigger};
use cohort_operator::controller::metrics;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

fn next_run(status: &cohort_operator::api::CohortImportStatus) -> Timestamp {
    status.next_run_at.expect("nextRunAt set")
}

#[tokio::test]
async fn a_daily_import_runs_at_its_time_and_records_each_run() {
    let env = Env::new("ctl-daily").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    let (server, _serve) = metrics::serve(operator.metrics.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();

    env.create(env.import("daily", "daily", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let scheduled = env
        .wait_status("daily", "Scheduled", |s| ready_reason(s) == Some("Scheduled") && s.next_run_at.is_some())
        .await;
    let status = scheduled.status.unwrap();
    let first = next_run(&status);
    assert_eq!(first.strftime("%H:%M:%S").to_string(), "06:30:00");
    assert!(status.history.is_empty() && status.last_run.is_none());
    assert_eq!(status.observed_generation, scheduled.metadata.generation);
    assert_eq!(env.sandbox.stats().requests, 0, "nothing is sent before the first run time");
    assert_eq!(ready(&status).unwrap().status, "True");

    // Just before 06:30: the run starts at 06:30 by the clock, not when the clock jumps.
    env.clock.set(first - SignedDuration::from_secs(2));
    let done = env.wait_runs("daily", 1).await;
    let status = done.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.trigger, RunTrigger::Initial);
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added, run.removed), (3, 3, 0));
    let started: Timestamp = run.started_at;
    assert!(started >= first, "started {started} before its time {first}");
    assert!(started.duration_since(first) < SignedDuration::from_secs(30));
    assert_eq!(status.last_run.as_ref(), Some(run));
    assert_eq!(status.last_successful_run_at, run.finished_at);
    assert_eq!(next_run(&status), first + SignedDuration::from_hours(24));
    assert_eq!(ready_reason(&status), Some("Succeeded"));
    assert_eq!(env.members("daily"), set(&ids(0..3)));

    // The next day, with the source changed: only the changes are sent.
    env.put_members(&ids(1..5)).await;
    env.clock.set(first + SignedDuration::from_hours(24) - SignedDuration::from_secs(1));
    let done = env.wait_runs("daily", 2).await;
    let status = done.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.trigger, RunTrigger::Scheduled);
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added, run.removed), (4, 2, 1));
    assert_eq!(status.history[1].trigger, RunTrigger::Initial, "history is newest first");
    assert_eq!(env.members("daily"), set(&ids(1..5)));

    // Events and metrics tell the same story.
    env.wait_event("daily", "RunSucceeded").await;
    let reasons: Vec<String> = env.events("daily").await.into_iter().map(|(r, _)| r).collect();
    // A run's start is shown by status, not by an Event: each run is one Event, at its end.
    assert!(!reasons.contains(&"RunStarted".to_owned()), "{reasons:?}");
    let text = reqwest::get(format!("http://{server}/metrics")).await.unwrap().text().await.unwrap();
    for needle in [
        "cohort_operator_runs_total{result=\"Succeeded\"} 2",
        "cohort_operator_members_added_total 5",
        "cohort_operator_members_removed_total 1",
        "cohort_operator_last_success_timestamp_seconds{namespace=",
        "cohort_operator_braze_requests_total{status=\"201\"} 3",
    ] {
        assert!(text.contains(needle), "{needle} missing from /metrics:\n{text}");
    }
    let health = reqwest::get(format!("http://{server}/healthz")).await.unwrap();
    assert!(health.status().is_success());
    let ready = reqwest::get(format!("http://{server}/readyz")).await.unwrap();
    assert!(ready.status().is_success());
    operator.stop().await;
}

#[tokio::test]
async fn a_manual_run_happens_once_per_annotation_value() {
    let env = Env::new("ctl-manual").await;
    env.put_members(&ids(0..2)).await;
    let operator = env.start().await;
    env.create(env.import("manual", "manual", json!({ "cadence": "Weekly", "dayOfWeek": "Monday", "at": "03:00" })))
        .await;
    env.wait_reason("manual", "Scheduled").await;

    // The CLI sets the annotation.
    let value = cohort_operator::cli::trigger(env.client.clone(), &env.ns, "manual").await.unwrap();
    let done = env.wait_runs("manual", 1).await;
    let status = done.status.unwrap();
    assert_eq!(status.history[0].trigger, RunTrigger::Manual);
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(status.last_handled_run_request.as_deref(), Some(value.as_str()));
    assert_eq!(env.members("manual"), set(&ids(0..2)));

    // Other changes and a jump of the clock (a reconcile of everything) do not run it again.
    env.merge("manual", json!({ "metadata": { "labels": { "team": "growth" } } })).await;
    env.clock.advance(SignedDuration::from_mins(5));
    // A second value runs once more; a repeat of the first would have made three runs.
    env.request_run("manual", "second").await;
    let done = env
        .wait_status("manual", "handled the second request", |s| {
            s.last_handled_run_request.as_deref() == Some("second") && s.current_run.is_none() && !s.history.is_empty()
        })
        .await;
    let status = done.status.unwrap();
    assert_eq!(status.history.len(), 2, "{:?}", status.history);
    assert!(status.history.iter().all(|r| r.trigger == RunTrigger::Manual));
    let users_requests = env.sandbox.stats().users_requests;
    assert_eq!(users_requests, 1, "the second run had nothing to change");
    // Each run's Events name that run: two runs are two Events of each reason, not one
    // series repeating the first run's note.
    let notes = env.wait_events("manual", "RunSucceeded", 2).await;
    for run in &status.history {
        assert_eq!(notes.iter().filter(|n| n.contains(&run.id)).count(), 1, "RunSucceeded of {}: {notes:?}", run.id);
    }
    operator.stop().await;
}

#[tokio::test]
async fn once_runs_soon_after_creation_and_never_again() {
    let env = Env::new("ctl-once").await;
    env.put_members(&ids(0..4)).await;
    let operator = env.start().await;
    env.create(env.import("once", "once", json!({ "cadence": "Once" }))).await;
    let done = env.wait_runs("once", 1).await;
    let status = done.status.unwrap();
    assert_eq!(status.history[0].trigger, RunTrigger::Initial);
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(status.next_run_at, None, "Once has no next run");
    assert_eq!(env.members("once"), set(&ids(0..4)));

    // Months later nothing more has run: the next thing in the history is a manual run.
    env.clock.advance(SignedDuration::from_hours(24 * 90));
    env.request_run("once", "later").await;
    let done = env
        .wait_status("once", "ran the request", |s| {
            s.last_handled_run_request.as_deref() == Some("later") && s.current_run.is_none() && s.history.len() >= 2
        })
        .await;
    let status = done.status.unwrap();
    assert_eq!(status.history.len(), 2);
    assert_eq!(status.history[0].trigger, RunTrigger::Manual);
    operator.stop().await;
}

#[tokio::test]
async fn missed_runs_run_once_within_the_deadline_and_are_recorded_past_it() {
    let env = Env::new("ctl-missed").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    env.create(env.import("late", "late", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let status = env.wait_status("late", "Scheduled", |s| s.next_run_at.is_some()).await.status.unwrap();
    let first = next_run(&status);
    operator.kill().await;

    // Down over three run times; back 30 minutes after the last: it runs once.
    env.clock.set(first + SignedDuration::from_hours(48) + SignedDuration::from_mins(30));
    let operator = env.start().await;
    let status = env.wait_runs("late", 1).await.status.unwrap();
    assert_eq!(status.history[0].trigger, RunTrigger::Initial);
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(next_run(&status), first + SignedDuration::from_hours(72));
    operator.kill().await;

    // Down again; back two hours after a run time (the deadline is one hour): missed.
    let requests = env.sandbox.stats().requests;
    env.clock.set(first + SignedDuration::from_hours(72) + SignedDuration::from_hours(2));
    let operator = env.start().await;
    let status = env.wait_runs("late", 2).await.status.unwrap();
    let missed = &status.history[0];
    assert_eq!(missed.result, RunResult::Missed);
    assert_eq!(missed.started_at, first + SignedDuration::from_hours(72));
    assert!(missed.message.contains("starting deadline"), "{}", missed.message);
    assert_eq!(ready_reason(&status), Some("Missed"));
    assert_eq!(next_run(&status), first + SignedDuration::from_hours(96));
    assert_eq!(env.sandbox.stats().requests, requests, "a missed run sends nothing");
    env.wait_event("late", "RunMissed").await;
    operator.stop().await;
}

#[tokio::test]
async fn invalid_specs_and_missing_secrets_are_reported_by_name() {
    let env = Env::new("ctl-invalid").await;
    env.put_members(&ids(0..2)).await;
    let operator = env.start().await;

    // Weekly without a day: the schema cannot say it, the controller does.
    env.create(env.import("weekly", "weekly", json!({ "cadence": "Weekly", "at": "06:30" }))).await;
    let status = env.wait_reason("weekly", "InvalidSpec").await.status.unwrap();
    let message = &ready(&status).unwrap().message;
    assert!(message.contains("spec.schedule.dayOfWeek"), "{message}");
    assert_eq!(status.next_run_at, None);
    env.wait_event("weekly", "InvalidSpec").await;
    // Fixing it schedules it.
    env.merge("weekly", json!({ "spec": { "schedule": { "dayOfWeek": "Friday" } } })).await;
    env.wait_reason("weekly", "Scheduled").await;

    // A Secret that does not exist yet.
    let mut doc = env.import("nokey", "nokey", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["destination"]["braze"]["dataImportKeySecretRef"] =
        json!({ "name": "braze-later", "key": "data-import-key" });
    env.create(doc).await;
    let status = env.wait_reason("nokey", "SecretNotFound").await.status.unwrap();
    let message = &ready(&status).unwrap().message;
    assert!(message.contains(&format!("Secret {}/braze-later not found", env.ns)), "{message}");
    assert!(status.next_run_at.is_some(), "the schedule stands");
    // Creating it is noticed without any other change to the import.
    env.put_secret("braze-later", "data-import-key", IMPORT_KEY).await;
    env.wait_reason("nokey", "Scheduled").await;
    operator.stop().await;
}

#[tokio::test]
async fn the_cli_works_as_a_kubectl_plugin() {
    let env = Env::new("ctl-plugin").await;
    env.put_members(&ids(0..2)).await;
    let operator = env.start().await;
    env.create(env.import("plugin", "plugin", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.wait_reason("plugin", "Scheduled").await;

    // `kubectl cohort …` finds `kubectl-cohort` on PATH.
    let bin_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(binary(), bin_dir.path().join("kubectl-cohort")).unwrap();
    let path = format!("{}:{}", bin_dir.path().display(), std::env::var("PATH").unwrap_or_default());
    // Not blocking: the controller runs on this test's runtime.
    let kubectl = async |args: &[&str]| {
        let out = tokio::process::Command::new("kubectl")
            .args(args)
            .env("PATH", &path)
            .env("KUBECONFIG", env.cluster.kubeconfig())
            .output()
            .await
            .expect("kubectl runs");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let out = kubectl(&["cohort", "trigger", "plugin", "-n", &env.ns, "--wait", "--timeout-seconds", "60"]).await;
    assert!(out.contains("run requested"), "{out}");
    assert!(out.contains("Succeeded"), "{out}");
    let table = kubectl(&["cohort", "history", "plugin", "-n", &env.ns]).await;
    assert!(table.contains("RUN") && table.contains("Manual") && table.contains("Succeeded"), "{table}");

    // suspend / resume change only spec.suspend, under the CLI's own field manager.
    kubectl(&["cohort", "suspend", "plugin", "-n", &env.ns]).await;
    let status = env.wait_reason("plugin", "Suspended").await;
    assert!(status.spec.suspend);
    let managers: Vec<String> =
        status.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.contains(&"kubectl-cohort".to_owned()), "{managers:?}");
    kubectl(&["cohort", "resume", "plugin", "-n", &env.ns]).await;
    env.wait_status("plugin", "Succeeded again", |s| ready_reason(s) == Some("Succeeded") && s.next_run_at.is_some())
        .await;
    operator.stop().await;
}

#[tokio::test]
async fn status_written_before_schedule_identities_keeps_its_place_in_the_schedule() {
    let env = Env::new("ctl-upgrade").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    env.create(env.import("old", "old", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    let status = env.wait_status("old", "Scheduled", |s| s.next_run_at.is_some()).await.status.unwrap();
    let first = next_run(&status);
    let description = status.schedule.as_ref().unwrap().description.clone();
    assert_eq!(description, "Daily at 06:30 (UTC)");
    operator.kill().await;

    // As an operator before schedule identities left it: the first run time handled, the
    // schedule named by its description only.
    let legacy =
        json!({ "status": { "schedule": { "description": description, "identity": null, "handledThrough": first } } });
    env.imports()
        .patch_status("old", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&legacy))
        .await
        .expect("legacy status written");

    // Upgraded ten minutes after that run time: the handled run is not run again, and the
    // cursor is not reset to now.
    env.clock.set(first + SignedDuration::from_mins(10));
    let operator = env.start().await;
    let status =
        env.wait_status("old", "upgraded", |s| s.schedule.as_ref().is_some_and(|c| c.identity.is_some())).await;
    let status = status.status.unwrap();
    assert_eq!(status.schedule.as_ref().unwrap().handled_through, Some(first));
    assert!(status.current_run.is_none() && status.history.is_empty(), "the handled run did not run again");
    operator.kill().await;

    // Back from downtime within the deadline of the next run time: that run is not missed.
    let legacy = json!({ "status": { "schedule": { "description": description, "identity": null } } });
    env.imports()
        .patch_status("old", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&legacy))
        .await
        .expect("legacy status written");
    env.clock.set(first + SignedDuration::from_hours(24) + SignedDuration::from_mins(10));
    let operator = env.start().await;
    let status = env.wait_runs("old", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(status.history[0].trigger, RunTrigger::Initial);
    assert_eq!(status.schedule.as_ref().unwrap().handled_through, Some(first + SignedDuration::from_hours(24)));
    assert_eq!(env.members("old"), set(&ids(0..3)));
    operator.stop().await;
}
