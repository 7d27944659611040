//! The controller with a warehouse source: a real PostgreSQL server and a real
//! kube-apiserver; the connection URL lives in a Secret the import refers to.

use crate::controller_support::*;
use cohort_operator::api::{RunResult, RunTrigger};
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

/// A BigQuery cohort through the local BigQuery stand-in (token exchange checked, SQL on a
/// real PostgreSQL): the service-account key lives in a Secret the import refers to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bigquery_cohort_is_imported_from_a_service_account_key_secret() {
    use warehouse_sandbox::bigquery::oauth::TestServiceAccount;
    use warehouse_sandbox::bigquery::{BigQueryConfig, Endpoint, Fault, RunningBigQuery};

    let env = Env::new("ctl-bq").await;
    let db = env.ns.replace('-', "_");
    let setup_db = db.clone();
    let url = tokio::task::spawn_blocking(move || {
        let pg = Postgres::shared();
        pg.create_database(&setup_db);
        // Float and integer columns ride along unmapped, in BigQuery's own renderings.
        pg.psql(
            &setup_db,
            "CREATE SCHEMA cohorts; \
                 CREATE TABLE cohorts.churn_risk (user_id text, score float8, n bigint); \
                 INSERT INTO cohorts.churn_risk SELECT 'u' || i, i * 1e10, i FROM generate_series(0, 2999) AS i;",
        )
        .expect("setup SQL");
        pg.url(&setup_db)
    })
    .await
    .unwrap();
    let account =
        tokio::task::spawn_blocking(|| TestServiceAccount::generate("cohorts@kubit-analytics.iam.gserviceaccount.com"))
            .await
            .unwrap();
    let mut config = BigQueryConfig::new(&url, "kubit-analytics", "EU");
    config.accounts.push(account.registered());
    config.incomplete_polls = 1;
    let bq = RunningBigQuery::start(config, "127.0.0.1:0".parse().unwrap()).await.expect("stand-in starts");
    bq.push_fault(Fault::Status { on: Endpoint::Results, status: 403, reason: Some("rateLimitExceeded".into()) }).await;
    let operator = env.start().await;

    let mut doc = env.import("churn", "churn-risk-bq", json!({ "cadence": "Daily", "at": "07:00", "timeZone": "UTC" }));
    doc["spec"]["source"] = json!({ "bigquery": {
        "projectId": "kubit-analytics",
        "location": "EU",
        "query": "SELECT user_id FROM cohorts.churn_risk WHERE n % 3 = 0",
        "maximumBytesBilled": 1_000_000_000u64,
        "endpoint": bq.url(),
        "pageSize": 250,
        "serviceAccountKeySecretRef": { "name": "bigquery-reader", "key": "key.json" },
    } });
    doc["spec"]["identifiers"] = json!({ "externalId": "user_id" });
    env.create(doc).await;

    let status = env.wait_reason("churn", "SecretNotFound").await.status.unwrap();
    assert!(ready(&status).unwrap().message.contains("bigquery-reader"), "{:?}", ready(&status));
    env.put_secret("bigquery-reader", "key.json", &bq.key_json(&account)).await;
    env.wait_reason("churn", "Scheduled").await;
    env.request_run("churn", "first").await;
    let status = env.wait_runs("churn", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.result, run.cohort_size, run.added), (RunResult::Succeeded, 1000, 1000), "{}", run.message);
    let expected: Vec<String> = (0..3000).step_by(3).map(|i| format!("u{i}")).collect();
    assert_eq!(env.members("churn-risk-bq"), set(&expected));
    let stats = bq.stats().await;
    assert_eq!((stats.jobs_created, stats.pages_served), (1, 4), "{stats:?}");
    assert_eq!(stats.last_maximum_bytes_billed.as_deref(), Some("1000000000"));

    // A query over the cost guard fails the run clearly and changes nothing in Braze.
    env.merge("churn", json!({ "spec": { "source": { "bigquery": { "maximumBytesBilled": 1000 } } } })).await;
    env.request_run("churn", "over-budget").await;
    let status = env.wait_runs("churn", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Failed, "{}", run.message);
    assert!(run.message.contains("maximumBytesBilled (1000 bytes)"), "{}", run.message);
    assert!(!run.message.contains("PRIVATE KEY") && !run.message.contains("ya29."), "{}", run.message);
    assert_eq!(env.members("churn-risk-bq"), set(&expected), "a failed read removes no one");
    operator.stop().await;
}
