//! The controller with the Snowflake and Databricks sources: a real kube-apiserver, the
//! warehouse stand-ins (statements run on a real PostgreSQL) and the Braze sandbox; the
//! credentials live in Secrets the imports refer to.

use crate::controller_support::*;
use cohort_operator::api::RunResult;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use testkit::postgres::Postgres;
use warehouse_sandbox::databricks::{DatabricksConfig, RunningDatabricks};
use warehouse_sandbox::keys::RsaKeyPair;
use warehouse_sandbox::snowflake::{RunningSnowflake, SnowflakeConfig};

/// A database for this test with `subscribers`: u0 … u1999, every other one active.
fn warehouse_table(env: &Env) -> String {
    let pg = Postgres::shared();
    let db = env.ns.replace('-', "_");
    pg.create_database(&db);
    pg.psql(
        &db,
        "CREATE TABLE subscribers (user_id text, active boolean); \
                  INSERT INTO subscribers SELECT 'u' || i, i % 2 = 0 FROM generate_series(0, 1999) AS i;",
    )
    .expect("setup SQL");
    pg.url(&db)
}

async fn create_secret(env: &Env, name: &str, data: serde_json::Value) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name }, "stringData": data
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("Secret created");
}

async fn import_and_check(env: &Env, name: &str, source: serde_json::Value, id_column: &str) {
    let mut doc = env.import(name, name, json!({ "cadence": "Daily", "at": "05:00" }));
    doc["spec"]["source"] = source;
    doc["spec"]["identifiers"] = json!({ "externalId": id_column });
    env.create(doc).await;
    env.wait_reason(name, "Scheduled").await;
    env.request_run(name, "first").await;
    let status = env.wait_runs(name, 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added), (1000, 1000));
    let expected: Vec<String> = (0..2000).step_by(2).map(|i| format!("u{i}")).collect();
    assert_eq!(env.members(name), set(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snowflake_cohort_is_imported_into_braze() {
    let env = Env::new("ctl-sf").await;
    let url = warehouse_table(&env);
    let key = RsaKeyPair::generate();
    let mut config = SnowflakeConfig::new("MYORG-GROWTH", "COHORT_READER", &key.rsa_public_key(), &url);
    config.partition_rows = 300;
    config.pending_polls = 1;
    let snowflake = RunningSnowflake::start(config).await.expect("Snowflake stand-in");
    create_secret(
        &env,
        "snowflake",
        json!({ "account": "myorg-growth", "user": "cohort_reader", "privateKey": key.private_key_pem() }),
    )
    .await;
    let operator = env.start().await;
    let source = json!({ "snowflake": {
        "credentials": { "secretName": "snowflake" },
        "endpoint": snowflake.url(),
        "warehouse": "COHORTS_WH",
        "query": "SELECT user_id FROM subscribers WHERE active",
    } });
    import_and_check(&env, "snowflake", source, "USER_ID").await;
    assert_eq!(snowflake.executions(), 1);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_databricks_cohort_is_imported_into_braze() {
    let env = Env::new("ctl-dbx").await;
    let url = warehouse_table(&env);
    let mut config = DatabricksConfig::new(&url, "8f2a9c0d1e3b4a56");
    config.clients = vec![("sp-cohorts".into(), "sp-secret-value".into())];
    config.chunk_rows = 300;
    config.pending_polls = 1;
    let databricks = RunningDatabricks::start(config).await.expect("Databricks stand-in");
    create_secret(&env, "databricks-sp", json!({ "clientId": "sp-cohorts", "clientSecret": "sp-secret-value" })).await;
    let operator = env.start().await;
    let source = json!({ "databricks": {
        "host": databricks.url(),
        "warehouseId": "8f2a9c0d1e3b4a56",
        "auth": { "oauth": { "secretName": "databricks-sp" } },
        "query": "SELECT user_id FROM subscribers WHERE active",
    } });
    import_and_check(&env, "databricks", source, "user_id").await;
    assert!(!databricks.authorization_sent_to_links());
    operator.stop().await;
}
