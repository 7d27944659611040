//! Warehouse source benchmark: rows per second and peak RSS of the Snowflake and Databricks
//! sources reading a 1,000,000-row cohort from their stand-ins (warehouse-sandbox) over
//! loopback.
//!
//! `cargo bench --bench warehouse` (add `-- --quick`, or set `WAREHOUSE_BENCH_QUICK=1`, for
//! 100,000 rows). PostgreSQL and the stand-ins run in this process; each read runs in a
//! child process (this binary again) so its peak RSS (`VmHWM`) is the source's own. The
//! time covers the whole read: submitting the statement, the stand-in running it on
//! PostgreSQL and serialising the result (on the same cores), and fetching every
//! partition/chunk (10,000 rows each) and mapping every row to a member.

use std::time::{Duration, Instant};

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::source::{InMemoryObjects, open_source_spec};
use futures::StreamExt;
use serde_json::json;
use testkit::bench::{child_result, peak_rss_mib, print_result};
use testkit::postgres::Postgres;
use warehouse_sandbox::databricks::{DatabricksConfig, RunningDatabricks};
use warehouse_sandbox::keys::RsaKeyPair;
use warehouse_sandbox::snowflake::{RunningSnowflake, SnowflakeConfig};

const WAREHOUSE_ID: &str = "bench0warehouse";
const TOKEN: &str = "dapi-bench-token";

/// Child: reads the source named by `WAREHOUSE_BENCH_CHILD` and prints `RESULT <json>`.
fn child(kind: &str) {
    let url = std::env::var("WAREHOUSE_BENCH_URL").expect("WAREHOUSE_BENCH_URL");
    let rows: u64 = std::env::var("WAREHOUSE_BENCH_ROWS").expect("WAREHOUSE_BENCH_ROWS").parse().unwrap();
    let key = std::env::var("WAREHOUSE_BENCH_KEY").unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let query = "SELECT uid FROM cohort";
        let (spec, column, objects) = match kind {
            "snowflake" => (
                json!({ "snowflake": { "credentials": { "secretName": "sf" }, "endpoint": url, "query": query, "statementTimeoutSeconds": 3600 } }),
                "UID",
                InMemoryObjects::new("bench")
                    .with_secret("sf", "account", "bench")
                    .with_secret("sf", "user", "reader")
                    .with_secret("sf", "privateKey", std::fs::read_to_string(key).unwrap()),
            ),
            "databricks" => (
                json!({ "databricks": {
                    "host": url, "warehouseId": WAREHOUSE_ID, "query": query, "statementTimeoutSeconds": 3600,
                    "auth": { "tokenSecretRef": { "name": "dbx", "key": "token" } },
                } }),
                "uid",
                InMemoryObjects::new("bench").with_secret("dbx", "token", TOKEN),
            ),
            other => panic!("unknown source {other}"),
        };
        let spec: SourceSpec = serde_json::from_value(spec).unwrap();
        let mapping: IdentifierMapping = serde_json::from_value(json!({ "externalId": column })).unwrap();
        let started = Instant::now();
        let source = open_source_spec(&spec, &mapping, &objects).await.expect("source opens");
        let mut stream = source.members();
        let mut read = 0u64;
        let mut members = 0u64;
        while let Some(batch) = stream.next().await {
            let batch = batch.expect("batch");
            read += batch.rows();
            members += batch.members.len() as u64;
        }
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!((read, members), (rows, rows));
        print_result(&json!({ "rows": read, "seconds": seconds, "peak_rss_mib": peak_rss_mib() }));
    });
}

fn run_child(kind: &str, url: &str, rows: u64, key: &str) -> serde_json::Value {
    child_result(
        &format!("the {kind} read"),
        &[
            ("WAREHOUSE_BENCH_CHILD", kind.to_owned()),
            ("WAREHOUSE_BENCH_URL", url.to_owned()),
            ("WAREHOUSE_BENCH_ROWS", rows.to_string()),
            ("WAREHOUSE_BENCH_KEY", key.to_owned()),
        ],
    )
}

fn main() {
    if let Ok(kind) = std::env::var("WAREHOUSE_BENCH_CHILD") {
        child(&kind);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("WAREHOUSE_BENCH_QUICK").is_some();
    let rows: u64 = if quick { 100_000 } else { 1_000_000 };
    let pg = Postgres::start();
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE cohort AS SELECT 'member-' || lpad(i::text, 10, '0') || '-' || md5(i::text) AS uid \
             FROM generate_series(1, {rows}) AS i"
        ),
    )
    .expect("cohort table");
    let db = pg.url("postgres");
    let dir = tempfile::tempdir().unwrap();
    let key = RsaKeyPair::generate();
    let key_file = dir.path().join("rsa_key.p8");
    std::fs::write(&key_file, key.private_key_pem()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "warehouse source benchmark{} — {rows} rows, 10,000 per partition/chunk",
        if quick { " (quick)" } else { "" }
    );
    runtime.block_on(async {
        let mut config = SnowflakeConfig::new("BENCH", "READER", &key.rsa_public_key(), &db);
        config.sync_wait = Duration::ZERO;
        let snowflake = RunningSnowflake::start(config).await.unwrap();
        let mut config = DatabricksConfig::new(&db, WAREHOUSE_ID);
        config.tokens = vec![TOKEN.to_owned()];
        let databricks = RunningDatabricks::start(config).await.unwrap();
        for (kind, url) in [("snowflake", snowflake.url()), ("databricks", databricks.url())] {
            let key_path = key_file.display().to_string();
            let result = tokio::task::spawn_blocking(move || run_child(kind, &url, rows, &key_path)).await.unwrap();
            let seconds = result["seconds"].as_f64().unwrap();
            println!(
                "{kind:<11} {rows:>9} rows in {seconds:>6.2} s   {:>10.0} rows/s   peak RSS {:>6.1} MiB",
                rows as f64 / seconds,
                result["peak_rss_mib"].as_f64().unwrap()
            );
        }
    });
}
