//! What the warehouse source tests (Snowflake, Databricks, BigQuery) share: the 100,000-row
//! cohort table on the shared PostgreSQL the stand-ins run statements on, a source spec with
//! fields merged in, the mapping over the table's columns, and the checks of a full read and
//! of an abandoned one. Included by the test files that need it
//! (`#[path = "support/warehouse.rs"] mod warehouse_support;`).
#![allow(dead_code)]

use std::time::Duration;

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::identifiers::SkipReason;
use cohort_operator::domain::member::Member;
use cohort_operator::source::{CohortRead, MemberSource};
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::postgres::Postgres;

/// Rows of the `cohort` table.
pub const ROWS: u64 = 100_000;

/// Every row of the `cohort` table, in order.
pub const QUERY: &str = "SELECT user_id, email, device FROM cohort ORDER BY i";

/// A database of its own on the shared PostgreSQL with the `cohort` table: 100,000 rows,
/// 60% external ids (`user_id`), 20% aliases (`email`), 10% device ids (`device`), 10% with
/// none. Returns its URL.
pub fn cohort_database(name: &str) -> String {
    let pg = Postgres::shared();
    pg.create_database(name);
    pg.psql(
        name,
        &format!(
            "CREATE TABLE cohort AS SELECT i, \
               CASE WHEN i % 10 < 6 THEN 'u' || i END AS user_id, \
               CASE WHEN i % 10 IN (6, 7) THEN 'alias-' || i END AS email, \
               CASE WHEN i % 10 = 8 THEN 'device-' || i END AS device \
             FROM generate_series(1, {ROWS}) AS i"
        ),
    )
    .expect("cohort table");
    pg.url(name)
}

/// `spec.source` with the one source `kind` (`"snowflake"`, …): `fields` with `extra`'s
/// fields merged in (a null in `extra` removes the field).
pub fn source_spec(kind: &str, mut fields: Value, extra: Value) -> SourceSpec {
    for (k, v) in extra.as_object().expect("extra is an object") {
        if v.is_null() {
            fields.as_object_mut().expect("fields is an object").remove(k);
        } else {
            fields[k] = v.clone();
        }
    }
    serde_json::from_value(json!({ kind: fields })).expect("a source spec")
}

/// The `cohort` table's columns as identifiers, named as the warehouse returns them.
pub fn cohort_mapping(user_id: &str, email: &str, device: &str) -> IdentifierMapping {
    serde_json::from_value(json!({
        "externalId": user_id,
        "alias": { "nameField": email, "label": "email" },
        "deviceId": device,
    }))
    .expect("a mapping")
}

/// The whole `cohort` table was read: every row, 90,000 members of the three kinds, the
/// 10,000 rows without an identifier counted as missing.
pub fn assert_full_cohort(read: &CohortRead) {
    assert_eq!(read.rows, ROWS);
    assert_eq!(read.members.len(), 90_000);
    assert_eq!(read.skipped.get(SkipReason::Missing), 10_000);
    assert!(read.members.contains(&Member::ExternalId("u1".into()).key()));
    assert!(read.members.contains(&Member::Alias { name: "alias-6".into(), label: "email".into() }.key()));
    assert!(read.members.contains(&Member::DeviceId("device-8".into()).key()));
}

/// Starts reading `source` (a statement that runs long), gives up after 1.5 s as a run that
/// times out would, and waits (up to 20 s) until the stand-in counts a cancel request.
pub async fn assert_abandoned_read_cancels(source: &dyn MemberSource, cancels: impl Fn() -> u64) {
    {
        let mut stream = source.members();
        assert!(tokio::time::timeout(Duration::from_millis(1500), stream.next()).await.is_err());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while cancels() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no cancel request arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
