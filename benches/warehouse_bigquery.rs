//! The BigQuery source against the local stand-in on loopback: rows per second and peak
//! RSS while reading a 1,000,000-row cohort (10,000-row pages, 100 pages).
//!
//! `cargo bench --bench warehouse_bigquery` (add `-- --quick`, or set
//! `WAREHOUSE_BENCH_QUICK=1`, for 100,000 rows). PostgreSQL (testkit) and the stand-in run
//! in this process; the read runs in a child process (this binary again), so its peak RSS
//! (`VmHWM`) is the source's own. The figure includes the job's wait: the stand-in runs the
//! SQL and renders every row before the first page, as BigQuery does.

use std::time::{Duration, Instant};

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::source::{InMemoryObjects, open_source_spec};
use futures::StreamExt;
use testkit::bench::{child_result, peak_rss_mib, print_result};
use testkit::postgres::Postgres;
use warehouse_sandbox::bigquery::oauth::TestServiceAccount;
use warehouse_sandbox::bigquery::{BigQueryConfig, RunningBigQuery};

const PROJECT: &str = "bench-analytics";

/// Child: reads the whole source and prints its `RESULT`: rows, seconds, peak RSS.
fn child() {
    let endpoint = std::env::var("BQ_BENCH_ENDPOINT").expect("BQ_BENCH_ENDPOINT");
    let key = std::env::var("BQ_BENCH_KEY").expect("BQ_BENCH_KEY");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let spec: SourceSpec = serde_json::from_value(serde_json::json!({ "bigquery": {
            "projectId": PROJECT,
            "location": "EU",
            "query": "SELECT user_id FROM cohort",
            "endpoint": endpoint,
            "serviceAccountKeySecretRef": { "name": "bq", "key": "key.json" },
            "pageSize": 10000,
        }}))
        .unwrap();
        let mapping = IdentifierMapping { external_id: Some("user_id".into()), ..Default::default() };
        let objects = InMemoryObjects::new("bench").with_secret("bq", "key.json", key);
        let source = open_source_spec(&spec, &mapping, &objects).await.expect("source opens");
        let started = Instant::now();
        let mut rows = 0u64;
        let mut stream = source.members();
        while let Some(batch) = stream.next().await {
            rows += batch.expect("batch").rows();
        }
        let secs = started.elapsed().as_secs_f64();
        print_result(&serde_json::json!({ "rows": rows, "seconds": secs, "peak_rss_mib": peak_rss_mib() }));
    });
}

fn main() {
    if std::env::var_os("BQ_BENCH_CHILD").is_some() {
        return child();
    }
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("WAREHOUSE_BENCH_QUICK").is_some();
    let rows: u64 = if quick { 100_000 } else { 1_000_000 };
    let pg = Postgres::start();
    pg.create_database("bench");
    pg.psql("bench", &format!("CREATE TABLE cohort AS SELECT 'user-' || lpad(i::text, 8, '0') AS user_id FROM generate_series(1, {rows}) AS i"))
        .expect("bench table");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let account = TestServiceAccount::generate("bench-reader@bench-analytics.iam.gserviceaccount.com");
    let mut config = BigQueryConfig::new(&pg.url("bench"), PROJECT, "EU");
    config.accounts.push(account.registered());
    config.max_wait = Duration::from_secs(30);
    let sandbox =
        runtime.block_on(RunningBigQuery::start(config, "127.0.0.1:0".parse().unwrap())).expect("stand-in starts");
    let result = child_result(
        "the bigquery read",
        &[
            ("BQ_BENCH_CHILD", "1".to_owned()),
            ("BQ_BENCH_ENDPOINT", sandbox.url()),
            ("BQ_BENCH_KEY", sandbox.key_json(&account)),
        ],
    );
    let (read, secs, rss) = (
        result["rows"].as_u64().unwrap(),
        result["seconds"].as_f64().unwrap(),
        result["peak_rss_mib"].as_f64().unwrap(),
    );
    assert_eq!(read, rows, "every row read");
    let stats = runtime.block_on(sandbox.stats());
    println!(
        "bigquery source, {rows} rows in {} pages: {:.0} rows/s ({secs:.2} s, job included), peak RSS {rss:.1} MiB",
        stats.pages_served,
        rows as f64 / secs
    );
}
