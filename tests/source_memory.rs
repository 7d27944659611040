//! Streaming a 1,000,000-row PostgreSQL source keeps memory flat: the resident set grows by
//! far less than holding the cohort would take. Prints the figures. (Alone in its binary so
//! that no other test's allocations move the numbers.)

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::member::Member;
use cohort_operator::source::{InMemoryObjects, open_source_spec};
use futures::StreamExt;
use testkit::postgres::Postgres;

const ROWS: u64 = 1_000_000;
/// Far below what one million held members take (about 100 MiB here), far above the
/// buffers of one fetch.
const MAX_GROWTH_KIB: u64 = 32 * 1024;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test]
async fn a_million_rows_stream_in_flat_memory() {
    let pg = Postgres::start();
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE cohort AS SELECT 'member-' || lpad(i::text, 10, '0') || '-' || md5(i::text) AS uid \
             FROM generate_series(1, {ROWS}) AS i"
        ),
    )
    .expect("table");
    let spec: SourceSpec = serde_json::from_value(serde_json::json!({ "postgres": {
        "connectionSecretRef": { "name": "warehouse", "key": "url" },
        "query": "SELECT uid FROM cohort",
        "fetchSize": 10_000,
    }}))
    .unwrap();
    let identifiers: IdentifierMapping = serde_json::from_value(serde_json::json!({ "externalId": "uid" })).unwrap();
    let objects = InMemoryObjects::new("bench").with_secret("warehouse", "url", pg.url("postgres"));
    let source = open_source_spec(&spec, &identifiers, &objects).await.expect("source");

    let mut stream = source.members();
    let mut rows = 0u64;
    let mut id_bytes = 0u64;
    let mut batches = 0u64;
    let mut baseline = 0;
    let mut peak = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.expect("batch");
        rows += batch.rows();
        batches += 1;
        id_bytes += batch
            .members
            .iter()
            .map(|m| match m {
                Member::ExternalId(id) => id.len() as u64,
                other => panic!("unexpected member {other}"),
            })
            .sum::<u64>();
        drop(batch);
        let rss = rss_kib();
        // The first batch brings the connection and its buffers to their working size.
        if batches == 1 {
            baseline = rss;
        }
        peak = peak.max(rss);
    }
    assert_eq!(rows, ROWS);
    let growth = peak - baseline;
    let held_kib = (id_bytes + ROWS * std::mem::size_of::<Member>() as u64) / 1024;
    println!(
        "postgres source: {rows} rows in {batches} batches; RSS {baseline} KiB after the first batch, \
         peak {peak} KiB, growth {growth} KiB; holding the members would take at least {held_kib} KiB"
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew by {growth} KiB while streaming {rows} rows (holding them takes {held_kib} KiB)"
    );
}
