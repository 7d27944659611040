//! The controller with a warehouse source: a real PostgreSQL server and a real
//! kube-apiserver; the connection URL lives in a Secret the import refers to.

mod controller_support;

use cohort_operator::api::{RunResult, RunTrigger};
use controller_support::*;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use testkit::postgres::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_cohort_is_imported_on_schedule_once_its_secret_exists() {
    let env = Env::new("ctl-pg").await;
    let pg = Postgres::shared();
    let db = env.ns.replace('-', "_");
    pg.create_database(&db);
    pg.psql(
        &db,
        "CREATE TABLE subscribers (user_id text, active boolean); \
                  INSERT INTO subscribers SELECT 'u' || i, i % 2 = 0 FROM generate_series(0, 1999) AS i;",
    )
    .expect("setup SQL");
    let operator = env.start().await;

    let mut doc =
        env.import("warehouse", "warehouse", json!({ "cadence": "Daily", "at": "05:00", "timeZone": "Europe/Lisbon" }));
    doc["spec"]["source"] = json!({ "postgres": {
        "connectionSecretRef": { "name": "warehouse", "key": "url" },
        "query": "SELECT user_id FROM subscribers WHERE active"
    } });
    doc["spec"]["identifiers"] = json!({ "externalId": "user_id" });
    env.create(doc).await;

    // The connection Secret is missing: said so by name, and noticed when it appears.
    let status = env.wait_reason("warehouse", "SecretNotFound").await.status.unwrap();
    assert!(ready(&status).unwrap().message.contains("warehouse"), "{:?}", ready(&status));
    env.put_secret("warehouse", "url", &pg.url(&db)).await;
    let status = env.wait_reason("warehouse", "Scheduled").await.status.unwrap();
    let first: Timestamp = status.next_run_at.unwrap();
    let local = first.to_zoned(jiff::tz::TimeZone::get("Europe/Lisbon").unwrap());
    assert_eq!((local.hour(), local.minute()), (5, 0), "05:00 in Lisbon");

    env.clock.set(first - SignedDuration::from_secs(1));
    let status = env.wait_runs("warehouse", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.trigger, run.result), (RunTrigger::Initial, RunResult::Succeeded), "{}", run.message);
    assert_eq!((run.cohort_size, run.added), (1000, 1000));
    let expected: Vec<String> = (0..2000).step_by(2).map(|i| format!("u{i}")).collect();
    assert_eq!(env.members("warehouse"), set(&expected));

    // The warehouse changes; a manual run sends the difference.
    let sql = "UPDATE subscribers SET active = NOT active WHERE user_id IN ('u0', 'u1')";
    tokio::task::spawn_blocking(move || Postgres::shared().psql(&db, sql)).await.unwrap().expect("update");
    env.request_run("warehouse", "after-update").await;
    let status = env.wait_runs("warehouse", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.result, run.added, run.removed), (RunResult::Succeeded, 1, 1), "{}", run.message);
    let members = env.members("warehouse");
    assert!(members.contains("u1") && !members.contains("u0"));
    operator.stop().await;
}
