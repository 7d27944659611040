//! Hourly and cron schedules and `runOnCreate` on a real kube-apiserver with the Braze sandbox, the
//! test clock standing in for the hours.

use crate::controller_support::*;
use cohort_operator::api::{CohortImportStatus, RunResult, RunTrigger};
use cohort_operator::controller::clock::Clock;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

fn next_run(status: &CohortImportStatus) -> Timestamp {
    status.next_run_at.expect("nextRunAt set")
}

#[tokio::test]
async fn an_hourly_import_runs_at_its_minute_on_the_zones_clock() {
    let env = Env::new("ctl-hourly").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    // Kolkata is UTC+5:30: minute 15 there is minute 45 in UTC.
    let schedule = json!({ "cadence": "Hourly", "minute": 15, "timeZone": "Asia/Kolkata" });
    env.create(env.import("hourly", "hourly", schedule)).await;
    let status = env.wait_status("hourly", "Scheduled", |s| s.next_run_at.is_some()).await.status.unwrap();
    let first = next_run(&status);
    assert_eq!(first.to_zoned(TimeZone::get("Asia/Kolkata").unwrap()).strftime("%M:%S").to_string(), "15:00");
    assert_eq!(first.strftime("%M:%S").to_string(), "45:00");
    assert!(first.duration_since(env.clock.now()) <= SignedDuration::from_hours(1));
    assert!(status.history.is_empty(), "nothing runs before the first slot");

    env.clock.set(first - SignedDuration::from_secs(2));
    let status = env.wait_runs("hourly", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.trigger, run.result), (RunTrigger::Initial, RunResult::Succeeded), "{}", run.message);
    assert!(run.started_at >= first);
    assert_eq!(next_run(&status), first + SignedDuration::from_hours(1));

    // An hour later, the next one.
    env.put_members(&ids(0..5)).await;
    env.clock.set(first + SignedDuration::from_hours(1) - SignedDuration::from_secs(1));
    let status = env.wait_runs("hourly", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.trigger, run.result), (RunTrigger::Scheduled, RunResult::Succeeded), "{}", run.message);
    assert_eq!((run.cohort_size, run.added), (5, 2));
    assert!(run.started_at >= first + SignedDuration::from_hours(1));
    assert_eq!(next_run(&status), first + SignedDuration::from_hours(2));
    assert_eq!(env.members("hourly"), set(&ids(0..5)));
    operator.stop().await;
}

#[tokio::test]
async fn run_on_create_runs_once_on_creation_and_not_again_after_a_restart() {
    let env = Env::new("ctl-oncreate").await;
    env.put_members(&ids(0..4)).await;
    let operator = env.start().await;
    let schedule = json!({ "cadence": "Daily", "at": "06:30", "runOnCreate": true });
    let created = env.create(env.import("eager", "eager", schedule)).await;
    let status = env.wait_runs("eager", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.trigger, run.result), (RunTrigger::Initial, RunResult::Succeeded), "{}", run.message);
    let created_at: Timestamp = created.metadata.creation_timestamp.unwrap().0;
    let started: Timestamp = run.started_at;
    assert!(started.duration_since(created_at) < SignedDuration::from_secs(60), "right after creation");
    assert_eq!(env.members("eager"), set(&ids(0..4)));
    let first_slot = next_run(&status);
    assert_eq!(first_slot.strftime("%H:%M").to_string(), "06:30");

    // The operator restarts: the run on creation is not run again; the first slot runs.
    operator.kill().await;
    env.put_members(&ids(0..6)).await;
    let operator = env.start().await;
    env.clock.set(first_slot - SignedDuration::from_secs(2));
    let status = env.wait_runs("eager", 2).await.status.unwrap();
    assert_eq!(status.history.len(), 2, "{:?}", status.history);
    let slot_run = &status.history[0];
    assert_eq!(
        (slot_run.trigger, slot_run.result),
        (RunTrigger::Scheduled, RunResult::Succeeded),
        "{}",
        slot_run.message
    );
    assert!(slot_run.started_at >= first_slot, "the second run is the slot's");
    assert_eq!(slot_run.added, 2);
    assert_eq!(next_run(&status), first_slot + SignedDuration::from_hours(24));
    operator.stop().await;
}

#[tokio::test]
async fn a_cron_import_runs_at_the_expected_minute_on_the_zones_clock() {
    let env = Env::new("ctl-cron").await;
    env.put_members(&ids(0..3)).await;
    let operator = env.start().await;
    // Kathmandu is UTC+5:45: :10, :30 and :50 there are :55, :15 and :35 in UTC.
    let schedule = json!({ "cadence": "Cron", "expression": "10-50/20 * * * *", "timeZone": "Asia/Kathmandu" });
    env.create(env.import("cron", "cron", schedule)).await;
    let status = env.wait_status("cron", "Scheduled", |s| s.next_run_at.is_some()).await.status.unwrap();
    let first = next_run(&status);
    let kathmandu = TimeZone::get("Asia/Kathmandu").unwrap();
    let minute = first.to_zoned(kathmandu.clone()).strftime("%M:%S").to_string();
    assert!(["10:00", "30:00", "50:00"].contains(&minute.as_str()), "{first} is {minute} in Kathmandu");
    assert!(first > env.clock.now() && first.duration_since(env.clock.now()) <= SignedDuration::from_mins(40));
    assert!(status.history.is_empty(), "nothing runs before the first match");

    env.clock.set(first - SignedDuration::from_secs(2));
    let status = env.wait_runs("cron", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.trigger, run.result), (RunTrigger::Initial, RunResult::Succeeded), "{}", run.message);
    assert!(run.started_at >= first && run.started_at < first + SignedDuration::from_mins(1), "{}", run.started_at);
    // The next match, exactly: 20 minutes on, or from :50 to :10 of the next hour.
    assert_eq!(next_run(&status), first + SignedDuration::from_mins(20));
    assert_eq!(env.members("cron"), set(&ids(0..3)));

    // `kubectl get` shows the expression: the CRD's printer column reads it.
    let crd = cohort_operator::api::crd();
    let columns = crd.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
    assert!(columns.iter().any(|c| c.name == "Cron" && c.json_path == ".spec.schedule.expression"));
    operator.stop().await;
}

#[tokio::test]
async fn a_cron_expression_running_more_often_than_the_operator_allows_is_refused() {
    let env = Env::new("ctl-cron-often").await;
    env.put_members(&ids(0..2)).await;
    let mut config = env.config();
    config.limits.min_cron_interval = SignedDuration::from_mins(10);
    let operator = env.start_with(config, None).await;
    let schedule = json!({ "cadence": "Cron", "expression": "*/5 * * * *" });
    env.create(env.import("often", "often", schedule)).await;
    let status = env.wait_reason("often", "InvalidSpec").await.status.unwrap();
    let message = &ready(&status).unwrap().message;
    assert!(message.contains("spec.schedule.expression"), "{message}");
    assert!(message.contains("--min-cron-interval-minutes=10"), "{message}");
    assert!(status.next_run_at.is_none() && status.history.is_empty());

    // Every 10 minutes is allowed: the import is scheduled.
    env.merge("often", json!({ "spec": { "schedule": { "expression": "*/10 * * * *" } } })).await;
    let status = env.wait_status("often", "Scheduled", |s| s.next_run_at.is_some()).await.status.unwrap();
    assert_eq!(next_run(&status).strftime("%S").to_string(), "00");
    assert_eq!(next_run(&status).as_second() % 600, 0, "a multiple of 10 minutes in UTC");
    operator.stop().await;
}
