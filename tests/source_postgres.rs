//! The PostgreSQL source against a real server started by testkit (one per test binary,
//! a database per test).

use std::time::{Duration, Instant};

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::identifiers::{MAX_IDENTIFIER_BYTES, SkipReason};
use cohort_operator::domain::member::{Member, MemberKey};
use cohort_operator::source::{InMemoryObjects, MemberSource, SourceError, open_source_spec, read_cohort};
use testkit::postgres::Postgres;

const PASSWORD: &str = "pw-Zq8s1-never-shown";

/// A fresh database on the shared server, with `setup` run in it.
fn database(name: &str, setup: &str) -> (&'static Postgres, String) {
    let pg = Postgres::shared();
    pg.create_database(name);
    if !setup.is_empty() {
        pg.psql(name, setup).expect("setup SQL");
    }
    (pg, name.to_owned())
}

/// Trust authentication ignores the password, so it can stand in for a real one.
fn url(pg: &Postgres, db: &str) -> String {
    format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable", pg.port())
}

fn mapping(json: serde_json::Value) -> IdentifierMapping {
    serde_json::from_value(json).expect("mapping")
}

async fn open(
    url: &str,
    query: &str,
    fetch_size: u32,
    timeout: u32,
    identifiers: &IdentifierMapping,
) -> Box<dyn MemberSource> {
    let spec: SourceSpec = serde_json::from_value(serde_json::json!({ "postgres": {
        "connectionSecretRef": { "name": "warehouse", "key": "url" },
        "query": query,
        "fetchSize": fetch_size,
        "statementTimeoutSeconds": timeout,
    }}))
    .expect("spec");
    let objects = InMemoryObjects::new("growth").with_secret("warehouse", "url", url);
    open_source_spec(&spec, identifiers, &objects).await.expect("source opens")
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
}

/// Row `i` of the big table, as the SQL below builds it.
fn expected_row(i: u64) -> Result<Member, SkipReason> {
    match i % 6 {
        0 => Ok(Member::DeviceId(format!("dev-{i}"))),
        // Each uid appears twice: i = 12k+1 and 12k+7 share k.
        1 => Ok(Member::ExternalId(format!("u-{}", i / 12))),
        2 => Ok(Member::Alias { name: format!("e{i}@example.com"), label: "email".into() }),
        3 => Err(SkipReason::Missing),
        4 => Err(SkipReason::TooLong),
        _ => Err(SkipReason::ControlCharacter),
    }
}

const BIG_TABLE: &str = "
CREATE TABLE cohort AS
SELECT i,
  CASE i % 6 WHEN 1 THEN 'u-' || (i / 12) WHEN 2 THEN '' WHEN 4 THEN repeat('x', 998)
             WHEN 5 THEN 'tab' || chr(9) || i ELSE NULL END AS uid,
  CASE WHEN i % 6 IN (2, 4) THEN 'e' || i || '@example.com' END AS email,
  CASE WHEN i % 6 IN (0, 1, 2) THEN 'dev-' || i END AS device
FROM generate_series(1, 120000) AS i;";

#[tokio::test]
async fn a_large_table_streams_every_identifier_kind_with_nulls_and_duplicates() {
    let (pg, db) = database("big", BIG_TABLE);
    let identifiers = mapping(serde_json::json!({
        "externalId": "uid",
        "alias": { "nameField": "email", "label": "email" },
        "deviceId": "device",
    }));
    // 7,000 does not divide 120,000: the last fetch is short.
    let source =
        open(&url(pg, &db), "SELECT uid, email, device FROM cohort ORDER BY i;", 7_000, 60, &identifiers).await;

    let mut batches = 0;
    let mut stream = source.members();
    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
        let batch = batch.expect("batch");
        assert!(batch.rows() <= 7_000);
        batches += 1;
    }
    drop(stream);
    assert_eq!(batches, 18);

    let read = read_cohort(source.as_ref()).await.expect("read");
    let mut expected: Vec<MemberKey> = Vec::new();
    let mut skipped = [0u64; 6];
    for i in 1..=120_000 {
        match expected_row(i) {
            Ok(m) => expected.push(m.key()),
            Err(r) => skipped[SkipReason::ALL.iter().position(|&x| x == r).unwrap()] += 1,
        }
    }
    let total = expected.len();
    expected.sort();
    expected.dedup();
    assert_eq!(read.rows, 120_000);
    assert_eq!(read.members.len(), expected.len());
    assert_eq!(read.members, expected);
    assert_eq!(read.duplicates, (total - expected.len()) as u64);
    assert_eq!(read.duplicates, 10_000);
    for (reason, n) in SkipReason::ALL.iter().zip(skipped) {
        assert_eq!(read.skipped.get(*reason), n, "{reason:?}");
    }
    // The alias row (i % 6 == 2) has an empty uid: the alias wins over the device id.
    assert!(read.members.contains(&Member::Alias { name: "e2@example.com".into(), label: "email".into() }.key()));
    assert!(!read.members.contains(&Member::DeviceId("dev-2".into()).key()));
    assert_eq!("x".repeat(998).len(), MAX_IDENTIFIER_BYTES + 1);
}

#[tokio::test]
async fn non_text_columns_arrive_as_the_database_prints_them() {
    let (pg, db) = database("types", "");
    let identifiers =
        mapping(serde_json::json!({ "externalId": "uid", "alias": { "nameField": "n", "labelField": "l" } }));
    // The mapping reads three columns; each query returns all three.
    let cases = [
        ("SELECT 9007199254740993::bigint AS uid, NULL AS n, NULL AS l", Member::ExternalId("9007199254740993".into())),
        ("SELECT 42::int AS uid, NULL AS n, NULL AS l", Member::ExternalId("42".into())),
        (
            "SELECT 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid AS uid, NULL AS n, NULL AS l",
            Member::ExternalId("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into()),
        ),
        ("SELECT 12.50::numeric AS uid, NULL AS n, NULL AS l", Member::ExternalId("12.50".into())),
        (
            "SELECT NULL::text AS uid, 7::smallint AS n, 'k'::varchar(3) AS l",
            Member::Alias { name: "7".into(), label: "k".into() },
        ),
    ];
    for (query, member) in cases {
        let source = open(&url(pg, &db), query, 100, 30, &identifiers).await;
        let read = read_cohort(source.as_ref()).await.expect(query);
        assert_eq!(read.members, vec![member.key()], "{query}");
    }
}

#[tokio::test]
async fn an_empty_result_is_an_empty_cohort_but_a_failing_query_is_an_error() {
    let (pg, db) = database("failing", "CREATE TABLE cohort (uid text); CREATE SEQUENCE s;");
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    let url = url(pg, &db);

    let empty = open(&url, "SELECT uid FROM cohort", 100, 30, &identifiers).await;
    let read = read_cohort(empty.as_ref()).await.expect("empty result");
    assert_eq!((read.rows, read.members.len()), (0, 0));

    let missing = open(&url, "SELECT uid FROM no_such_table", 100, 30, &identifiers).await;
    let err = read_cohort(missing.as_ref()).await.unwrap_err();
    assert!(matches!(err, SourceError::Query { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "postgres query (connection from Secret growth/warehouse key url): query failed: \
         ERROR 42P01: relation \"no_such_table\" does not exist (at character 17 of the query)"
    );

    let syntax = open(&url, "SELEC uid FROM cohort", 100, 30, &identifiers).await;
    let err = read_cohort(syntax.as_ref()).await.unwrap_err().to_string();
    assert!(err.contains("42601") && err.contains("syntax error"), "{err}");

    let no_column = open(&url, "SELECT uid AS id FROM cohort", 100, 30, &identifiers).await;
    let err = read_cohort(no_column.as_ref()).await.unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("no column \"uid\" named in identifiers (columns: \"id\")"), "{err}");
}

#[tokio::test]
async fn the_query_cannot_write() {
    let (pg, db) = database("readonly", "CREATE TABLE cohort AS SELECT 'u1'::text AS uid; CREATE SEQUENCE s;");
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    let url = url(pg, &db);

    let nextval = open(&url, "SELECT nextval('s')::text AS uid", 100, 30, &identifiers).await;
    let err = read_cohort(nextval.as_ref()).await.unwrap_err().to_string();
    assert!(err.contains("read-only transaction"), "{err}");

    // A second statement cannot leave the read-only transaction.
    let smuggled = open(&url, "SELECT uid FROM cohort; COMMIT; DROP TABLE cohort", 100, 30, &identifiers).await;
    let err = read_cohort(smuggled.as_ref()).await.unwrap_err().to_string();
    assert!(err.contains("42601"), "{err}");
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM cohort").unwrap().trim(), "1");
}

#[tokio::test]
async fn a_statement_timeout_fails_the_run_and_stops_the_query() {
    let (pg, db) = database("slow", "");
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    let source = open(&url(pg, &db), "SELECT pg_sleep(30)::text AS uid /* cohort-slow */", 100, 1, &identifiers).await;
    let started = Instant::now();
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(matches!(err, SourceError::Timeout { seconds: 1, .. }), "{err:?}");
    assert_eq!(err.reason(), "SourceFailed");
    assert!(err.to_string().contains("no result within 1 s"), "{err}");
    // The server is no longer running it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = pg
            .psql(
                &db,
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%cohort-slow%' AND pid <> pg_backend_pid()",
            )
            .unwrap();
        if running.trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the slow query is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn connection_refused_is_an_error_not_an_empty_cohort() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/db?sslmode=disable");
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    let source = open(&url, "SELECT 1 AS uid", 100, 30, &identifiers).await;
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    assert_no_secret(&err.to_string());
    assert_no_secret(&format!("{err:?}"));
}

#[tokio::test]
async fn the_connection_url_never_shows() {
    let (pg, db) = database("secrets", "");
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    // The server repeats the bad value in its message; the source redacts it.
    let query = format!("SELECT '{PASSWORD}'::int::text AS uid");
    let source = open(&url(pg, &db), &query, 100, 30, &identifiers).await;
    assert_no_secret(&source.describe());
    // (Its Debug shows the query, which here holds the value on purpose, but never the URL.)
    assert!(!format!("{source:?}").contains("postgres://"));
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert!(err.to_string().contains("invalid input syntax for type integer: \"<redacted>\""), "{err}");
    assert_no_secret(&err.to_string());
    assert_no_secret(&format!("{err:?}"));
}

#[tokio::test]
async fn a_missing_secret_is_named() {
    let spec: SourceSpec = serde_json::from_value(serde_json::json!({ "postgres": {
        "connectionSecretRef": { "name": "warehouse", "key": "url" }, "query": "SELECT 1 AS uid" }}))
    .unwrap();
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    let err = open_source_spec(&spec, &identifiers, &InMemoryObjects::new("growth")).await.unwrap_err();
    assert_eq!(err.reason(), "SecretNotFound");
    assert!(err.to_string().starts_with("Secret growth/warehouse not found"), "{err}");
}

#[tokio::test]
async fn sslmode_follows_the_url() {
    let (pg, db) = database("tls", "");
    let identifiers = mapping(serde_json::json!({ "externalId": "uid" }));
    let base = format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port());
    // The default, prefer, asks for TLS and goes on without it on this server.
    let prefer = open(&base, "SELECT 'p1' AS uid", 100, 30, &identifiers).await;
    assert_eq!(read_cohort(prefer.as_ref()).await.unwrap().members, vec![Member::ExternalId("p1".into()).key()]);
    // require does not.
    let require = open(&format!("{base}?sslmode=require"), "SELECT 'p1' AS uid", 100, 30, &identifiers).await;
    let err = read_cohort(require.as_ref()).await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// A loopback TCP proxy in front of the server that rewrites, in the client's byte stream,
/// `from` into `to` (same length, so no message length changes): here the FETCH count, so
/// that every FETCH returns fewer rows than asked, as Redshift's cap or a proxy would.
async fn rewriting_proxy(upstream: u16, from: &'static [u8], to: &'static [u8]) -> u16 {
    assert_eq!(from.len(), to.len(), "the rewrite keeps message lengths");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut pending: Vec<u8> = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&chunk[..n]);
                    let mut at = 0;
                    while let Some(i) = pending[at..].windows(from.len()).position(|w| w == from) {
                        pending[at + i..at + i + from.len()].copy_from_slice(to);
                        at += i + from.len();
                    }
                    // Hold back only a tail that may be the start of `from`; send the rest now.
                    let keep = (1..from.len())
                        .rev()
                        .find(|&k| pending.len() >= k && pending.ends_with(&from[..k]))
                        .unwrap_or(0);
                    let send = pending.len() - keep;
                    if server_write.write_all(&pending[..send]).await.is_err() {
                        return;
                    }
                    pending.drain(..send);
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn fetches_capped_below_fetch_size_still_read_every_row() {
    let (pg, db) =
        database("capped_fetch", "CREATE TABLE members AS SELECT 'm-' || i AS uid FROM generate_series(1, 25000) AS i");
    // Every `FETCH FORWARD 10000` reaches the server as `FETCH FORWARD 00999`.
    let port = rewriting_proxy(pg.port(), b"FETCH FORWARD 10000 ", b"FETCH FORWARD 00999 ").await;
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/{db}?sslmode=disable");
    let source =
        open(&url, "SELECT uid FROM members", 10_000, 60, &mapping(serde_json::json!({ "externalId": "uid" }))).await;
    let mut batches = 0;
    let mut stream = source.members();
    let mut rows = 0;
    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
        let batch = batch.expect("batch");
        rows += batch.rows();
        batches += 1;
        assert!(batch.rows() <= 999, "the proxy capped every FETCH at 999 rows");
    }
    drop(stream);
    assert_eq!(rows, 25_000);
    assert_eq!(batches, 26, "25 full capped pages and one short one; the empty FETCH ends it");
    let read = read_cohort(source.as_ref()).await.expect("read");
    let mut expected: Vec<MemberKey> = (1..=25_000).map(|i| Member::ExternalId(format!("m-{i}")).key()).collect();
    expected.sort();
    assert_eq!(read.members, expected);
}

#[tokio::test]
async fn a_row_longer_than_max_row_bytes_fails_naming_the_field() {
    let (pg, db) = database(
        "wide_rows",
        "CREATE TABLE members AS SELECT 'w-' || i AS uid, repeat('x', CASE WHEN i = 3 THEN 5000 ELSE 10 END) AS note \
         FROM generate_series(1, 5) AS i",
    );
    let spec: SourceSpec = serde_json::from_value(serde_json::json!({ "postgres": {
        "connectionSecretRef": { "name": "warehouse", "key": "url" },
        "query": "SELECT uid, note FROM members ORDER BY uid",
        "maxRowBytes": 4096,
    }}))
    .expect("spec");
    let objects = InMemoryObjects::new("growth").with_secret("warehouse", "url", url(pg, &db));
    let source = open_source_spec(&spec, &mapping(serde_json::json!({ "externalId": "uid" })), &objects).await.unwrap();
    let err = read_cohort(source.as_ref()).await.expect_err("a row is too long");
    assert!(matches!(err, SourceError::RowTooLarge { limit: 4096, field: "postgres.maxRowBytes", .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "postgres query (connection from Secret growth/warehouse key url): the row at position 3 of the result is longer \
         than 4096 bytes; \
         raise postgres.maxRowBytes if rows really are this long"
    );
    assert_no_secret(&err.to_string());
}
