//! The BigQuery source against the local stand-in (`warehouse-sandbox`), which checks the
//! OAuth token exchange and bearer tokens and runs the SQL on a real PostgreSQL (testkit,
//! one server per test binary, a database per test).

use std::sync::Arc;

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::identifiers::SkipReason;
use cohort_operator::domain::member::{Member, MemberKey};
use cohort_operator::source::{InMemoryObjects, MemberSource, SourceError, open_source_spec, read_cohort};

use futures::StreamExt;
use serde_json::{Value, json};
use testkit::postgres::Postgres;
use warehouse_sandbox::bigquery::oauth::TestServiceAccount;
use warehouse_sandbox::bigquery::{BigQueryConfig, Endpoint, Fault, RunningBigQuery, Stats};

#[path = "support/warehouse.rs"]
mod warehouse_support;

const PROJECT: &str = "cohort-analytics";
const LOCATION: &str = "europe-west1";
const EMAIL: &str = "cohort-reader@cohort-analytics.iam.gserviceaccount.com";

/// A database with `setup` run in it, a stand-in over it, and a registered account.
struct World {
    bq: RunningBigQuery,
    account: TestServiceAccount,
}

async fn world(db: &str, setup: &str, tweak: impl FnOnce(&mut BigQueryConfig, &TestServiceAccount)) -> World {
    let (db, setup) = (db.to_owned(), setup.to_owned());
    let url = tokio::task::spawn_blocking(move || {
        let pg = Postgres::shared();
        pg.create_database(&db);
        if !setup.is_empty() {
            pg.psql(&db, &setup).expect("setup SQL");
        }
        pg.url(&db)
    })
    .await
    .unwrap();
    let account = tokio::task::spawn_blocking(|| TestServiceAccount::generate(EMAIL)).await.unwrap();
    let mut config = BigQueryConfig::new(&url, PROJECT, LOCATION);
    config.accounts.push(account.registered());
    tweak(&mut config, &account);
    let bq = RunningBigQuery::start(config, "127.0.0.1:0".parse().unwrap()).await.expect("stand-in starts");
    World { bq, account }
}

impl World {
    /// The spec's `bigquery` object for `query`, with `extra` fields merged in.
    fn spec(&self, query: &str, extra: Value) -> SourceSpec {
        let fields = json!({
            "projectId": PROJECT,
            "location": LOCATION,
            "query": query,
            "endpoint": self.bq.url(),
            "serviceAccountKeySecretRef": { "name": "bq", "key": "key.json" },
        });
        warehouse_support::source_spec("bigquery", fields, extra)
    }

    fn objects(&self) -> InMemoryObjects {
        InMemoryObjects::new("growth").with_secret("bq", "key.json", self.bq.key_json(&self.account))
    }

    async fn open(&self, query: &str, extra: Value, mapping: &IdentifierMapping) -> Box<dyn MemberSource> {
        open_source_spec(&self.spec(query, extra), mapping, &self.objects()).await.expect("source opens")
    }

    async fn stats(&self) -> Stats {
        self.bq.stats().await
    }

    /// Reads `query` mapping `uid` to the external id and returns the error it fails with,
    /// after checking that no secret is in it.
    async fn failure(&self, query: &str, extra: Value) -> SourceError {
        let source = self.open(query, extra.clone(), &external("uid")).await;
        let err = match read_cohort(source.as_ref()).await {
            Ok(read) => panic!("{query} with {extra} read {} rows instead of failing", read.rows),
            Err(err) => err,
        };
        self.assert_no_secret(&err.to_string());
        self.assert_no_secret(&format!("{err:?}"));
        err
    }

    fn assert_no_secret(&self, text: &str) {
        let key_line = self.account.private_key_pem.lines().nth(3).unwrap();
        assert!(!text.contains(key_line), "the private key leaked: {text}");
        assert!(!text.contains("ya29."), "an access token leaked: {text}");
        assert!(!text.contains("eyJ"), "a JWT leaked: {text}");
    }
}

fn external(field: &str) -> IdentifierMapping {
    IdentifierMapping { external_id: Some(field.into()), ..Default::default() }
}

fn mapping(json: Value) -> IdentifierMapping {
    serde_json::from_value(json).expect("mapping")
}

/// 100,000 rows of every identifier kind, numeric external ids beyond 2⁵³, NULLs, blanks,
/// oversized and control-character values, duplicates.
const BIG_TABLE: &str = "
CREATE TABLE cohort AS
SELECT i,
  CASE i % 6 WHEN 1 THEN 9007199254740993 + (i / 12) END AS uid,
  CASE i % 6 WHEN 2 THEN 'e' || i || '@example.com' WHEN 3 THEN '' WHEN 4 THEN repeat('x', 998)
             WHEN 5 THEN 'tab' || chr(9) || i END AS email,
  CASE WHEN i % 6 IN (0, 1, 2) THEN 'dev-' || i END AS device
FROM generate_series(1, 100000) AS i;";

fn expected_row(i: u64) -> Result<Member, SkipReason> {
    match i % 6 {
        0 => Ok(Member::DeviceId(format!("dev-{i}"))),
        // Each uid appears twice: i = 12k+1 and 12k+7 share k.
        1 => Ok(Member::ExternalId((9007199254740993u64 + i / 12).to_string())),
        2 => Ok(Member::Alias { name: format!("e{i}@example.com"), label: "email".into() }),
        3 => Err(SkipReason::Missing),
        4 => Err(SkipReason::TooLong),
        _ => Err(SkipReason::ControlCharacter),
    }
}

#[tokio::test]
async fn a_large_result_streams_every_identifier_kind_across_many_pages() {
    let w = world("bq_big", BIG_TABLE, |c, _| {
        c.incomplete_polls = 2;
    })
    .await;
    let identifiers = mapping(
        json!({ "externalId": "uid", "alias": { "nameField": "email", "label": "email" }, "deviceId": "device" }),
    );
    let source =
        w.open("SELECT uid, email, device FROM cohort ORDER BY i;", json!({ "pageSize": 7000 }), &identifiers).await;
    assert!(!source.describe().contains("BEGIN"), "{}", source.describe());
    let mut stream = source.members();
    let mut members = Vec::new();
    let mut skipped = cohort_operator::domain::identifiers::SkipCounts::default();
    let mut batches = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.expect("batch");
        assert!(batch.rows() <= 7000, "one page at a time");
        batches += 1;
        skipped.add(&batch.skipped);
        members.extend(batch.members);
    }
    drop(stream);
    let mut want_members = Vec::new();
    let mut want_skipped = cohort_operator::domain::identifiers::SkipCounts::default();
    for i in 1..=100_000 {
        match expected_row(i) {
            Ok(m) => want_members.push(m),
            Err(r) => want_skipped.record(r),
        }
    }
    assert_eq!(members, want_members, "every member, in order, numeric ids exact");
    assert_eq!(skipped, want_skipped);
    assert_eq!(batches, 15, "100,000 rows in pages of 7,000");
    let stats = w.stats().await;
    assert_eq!(stats.jobs_created, 1);
    assert_eq!(stats.pages_served, 15);
    assert_eq!(stats.rows_served, 100_000);
    assert_eq!(stats.last_max_results, Some(7000));
    // One token serves the whole read (refreshing ahead of expiry is unit-tested in
    // auth.rs; an expired token mid-read is in transient_faults_are_survived).
    assert_eq!((stats.token_grants, stats.unauthorized), (1, 0), "{stats:?}");
    let read = read_cohort(source.as_ref()).await.expect("a second read");
    assert_eq!(read.rows, 100_000);
    // 16,667 uid rows (i = 6k+1), two per uid: 8,333 repeats.
    assert_eq!(read.duplicates, 8_333);
}

#[tokio::test]
async fn numbers_arrive_as_braze_expects() {
    let w = world(
        "bq_numbers",
        "CREATE TABLE t (f float8, n numeric, b bigint, s text); \
        INSERT INTO t VALUES (1e10, 123.4500, 9223372036854775807, '007'), (0.00025, 5.000, -42, ' spaced ')",
        |_, _| {},
    )
    .await;
    for (column, want) in [
        ("f", vec!["0.00025", "10000000000"]),
        ("n", vec!["123.45", "5"]),
        ("b", vec!["-42", "9223372036854775807"]),
        ("s", vec![" spaced ", "007"]),
    ] {
        let source = w.open(&format!("SELECT {column} AS uid FROM t"), json!({}), &external("uid")).await;
        let read = read_cohort(source.as_ref()).await.expect("read");
        let got: Vec<MemberKey> = read.members;
        let want: Vec<MemberKey> = want.iter().map(|id| Member::ExternalId((*id).to_owned()).key()).collect();
        assert_eq!(got, want, "column {column}");
    }
}

#[tokio::test]
async fn transient_faults_are_survived() {
    let w =
        world("bq_faults", "CREATE TABLE t AS SELECT 'u' || i AS uid FROM generate_series(1, 5000) AS i", |_, _| {})
            .await;
    for fault in [
        Fault::Status { on: Endpoint::Token, status: 503, reason: None },
        Fault::Status { on: Endpoint::Query, status: 429, reason: None },
        Fault::Status { on: Endpoint::Query, status: 403, reason: Some("rateLimitExceeded".into()) },
        Fault::Status { on: Endpoint::Results, status: 503, reason: Some("backendError".into()) },
        Fault::Status { on: Endpoint::Results, status: 502, reason: None },
        Fault::TruncatePage,
    ] {
        w.bq.push_fault(fault).await;
    }
    let source = w.open("SELECT uid FROM t", json!({ "pageSize": 1000 }), &external("uid")).await;
    let mut stream = source.members();
    let first = stream.next().await.unwrap().expect("first page");
    // Every token issued so far stops working mid-read.
    w.bq.expire_tokens().await;
    let mut rows = first.rows();
    while let Some(batch) = stream.next().await {
        rows += batch.expect("batch").rows();
    }
    assert_eq!(rows, 5000);
    let stats = w.stats().await;
    assert_eq!(w.bq.pending_faults().await, 0, "every fault was met: {stats:?}");
    assert_eq!(stats.jobs_created, 1, "retries of jobs.query reuse the requestId: {stats:?}");
    assert_eq!(stats.unauthorized, 1, "the expired token was replaced once: {stats:?}");
    assert!(stats.token_grants >= 2);
}

#[tokio::test]
async fn a_job_that_fails_while_running_is_submitted_again() {
    let w = world("bq_rerun", "CREATE TABLE t AS SELECT 'u' || i AS uid FROM generate_series(1, 300) AS i", |c, _| {
        c.incomplete_polls = 1
    })
    .await;
    w.bq.push_fault(Fault::FailJob { status: 500, reason: "backendError".into() }).await;
    let source = w.open("SELECT uid FROM t", json!({}), &external("uid")).await;
    let read = read_cohort(source.as_ref()).await.expect("read");
    assert_eq!(read.members.len(), 300);
    assert_eq!(w.stats().await.jobs_created, 2);
}

#[tokio::test]
async fn every_failure_is_reported_as_the_user_needs_it() {
    let w = world(
        "bq_failures",
        "CREATE TABLE t AS SELECT 'u' || i AS uid, ARRAY['a' || i, 'b'] AS tags FROM generate_series(1, 3000) AS i",
        |_, _| {},
    )
    .await;
    let q = "SELECT uid FROM t";

    let e = w.failure("SELECT FROM WHERE", json!({})).await;
    // The stand-in is not googleapis.com: its message is not quoted, its reason is.
    assert!(e.to_string().contains("invalid query (HTTP 400 invalidQuery: "), "{e}");
    assert!(!e.to_string().contains("Syntax error"), "{e}");
    let e = w.failure("SELECT uid FROM missing_table", json!({})).await;
    assert!(e.to_string().contains("not found") && e.to_string().contains("check projectId, location"), "{e}");
    let e = w.failure(q, json!({ "maximumBytesBilled": 1000 })).await;
    assert!(e.to_string().contains("would bill more than maximumBytesBilled (1000 bytes) and was not run"), "{e}");
    assert_eq!(w.stats().await.last_maximum_bytes_billed.as_deref(), Some("1000"), "sent as an int64 string");
    let e = w.failure(q, json!({ "projectId": "someone-elses" })).await;
    assert!(
        e.to_string().contains("permission denied")
            && e.to_string().contains("roles/bigquery.jobUser on project someone-elses"),
        "{e}"
    );
    let e = w.failure(q, json!({ "location": "US" })).await;
    assert!(e.to_string().contains("not found") && e.to_string().contains("location (US)"), "{e}");
    let e = w.failure(q, json!({ "location": null })).await;
    assert!(e.to_string().contains("not found"), "{e}");
    let e = w.failure("SELECT tags AS uid FROM t", json!({})).await;
    assert_eq!(e.reason(), "InvalidSpec");
    assert!(e.to_string().contains("REPEATED") && e.to_string().contains("UNNEST"), "{e}");
    let e = w.failure("SELECT uid AS user_id FROM t", json!({})).await;
    assert!(e.to_string().contains("no column \"uid\"") && e.to_string().contains("\"user_id\""), "{e}");
    let e = w
        .failure("SELECT uid || repeat('x', 100) AS uid FROM t", json!({ "pageSize": 3000, "maxPageBytes": 65536 }))
        .await;
    assert!(matches!(e, SourceError::PageTooLarge { limit: 65536, .. }), "{e}");
    assert!(e.to_string().contains("maxPageBytes (65536 bytes)"), "{e}");

    w.bq.push_fault(Fault::Status { on: Endpoint::Query, status: 403, reason: Some("quotaExceeded".into()) }).await;
    let e = w.failure(q, json!({})).await;
    assert!(e.to_string().contains("quota exceeded") && e.to_string().contains("10 minutes"), "{e}");

    w.bq.push_fault(Fault::DropRow).await;
    let e = w.failure(q, json!({ "pageSize": 1000 })).await;
    assert!(e.to_string().contains("totalRows is 3000; the result was cut short"), "{e}");

    for _ in 0..6 {
        w.bq.push_fault(Fault::Status { on: Endpoint::Results, status: 503, reason: Some("backendError".into()) })
            .await;
    }
    let e = w.failure(q, json!({ "pageSize": 1000 })).await;
    assert!(e.to_string().contains("kept failing after 6 attempts") && e.to_string().contains("page 2"), "{e}");

    for _ in 0..2 {
        w.bq.push_fault(Fault::Status { on: Endpoint::Query, status: 401, reason: None }).await;
    }
    let e = w.failure(q, json!({})).await;
    assert!(
        e.to_string().contains("authentication failed: BigQuery refused the access token")
            && e.to_string().contains(EMAIL),
        "{e}"
    );

    w.bq.push_fault(Fault::NeverComplete).await;
    let e = w.failure(q, json!({ "statementTimeoutSeconds": 2 })).await;
    assert!(matches!(e, SourceError::Timeout { seconds: 2, .. }), "{e}");
    assert_eq!(w.stats().await.cancels, 1, "the job was cancelled");
}

#[tokio::test]
async fn a_key_the_token_endpoint_refuses_is_named_without_its_content() {
    // The stand-in knows the account by another key: the assertion's signature fails.
    let w = world("bq_badkey", "CREATE TABLE t AS SELECT 'u1' AS uid", |c, _| {
        c.accounts = vec![TestServiceAccount::generate(EMAIL).registered()];
    })
    .await;
    let e = w.failure("SELECT uid FROM t", json!({})).await;
    let text = e.to_string();
    // The OAuth error code, never the endpoint's description (no echo).
    assert!(text.contains("authentication failed") && text.contains("(HTTP 400: invalid_grant)"), "{text}");
    assert!(!text.contains("Invalid JWT Signature"), "{text}");
    assert!(text.contains("Secret growth/bq key key.json"), "{text}");
    assert_eq!(w.stats().await.token_refusals, 1, "a refused grant is not retried");

    let objects = InMemoryObjects::new("growth").with_secret(
        "bq",
        "key.json",
        r#"{"type":"authorized_user","refresh_token":"1//secret-refresh"}"#,
    );
    let e = open_source_spec(&w.spec("SELECT uid FROM t", json!({})), &external("uid"), &objects)
        .await
        .expect_err("refused");
    assert_eq!(e.reason(), "InvalidSpec");
    assert!(e.to_string().contains("authorized_user") && !e.to_string().contains("secret-refresh"), "{e}");
    let e = open_source_spec(&w.spec("SELECT 1 AS uid; DELETE FROM t", json!({})), &external("uid"), &w.objects())
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("more than one statement"), "{e}");
    let e = open_source_spec(
        &w.spec("SELECT uid FROM t", json!({ "endpoint": "http://bigquery.example.com" })),
        &external("uid"),
        &w.objects(),
    )
    .await
    .expect_err("refused");
    assert!(e.to_string().contains("googleapis.com"), "{e}");
}

#[tokio::test]
async fn workload_identity_takes_tokens_from_the_metadata_server() {
    let w = world("bq_wi", "CREATE TABLE t AS SELECT 'u' || i AS uid FROM generate_series(1, 10) AS i", |c, _| {
        c.metadata_identity = Some("operator@cohort-analytics.iam.gserviceaccount.com".into());
    })
    .await;
    let spec = w.spec(
        "SELECT uid FROM t",
        json!({ "serviceAccountKeySecretRef": null, "metadataServer": w.bq.metadata_server() }),
    );
    let lent = InMemoryObjects::new("growth").with_ambient_identity(true);
    let source = open_source_spec(&spec, &external("uid"), &lent).await.expect("opens");
    assert!(source.describe().contains("Workload Identity"), "{}", source.describe());
    assert_eq!(read_cohort(source.as_ref()).await.expect("read").members.len(), 10);
    let stats = w.stats().await;
    assert_eq!((stats.metadata_tokens, stats.token_grants), (1, 0));

    // No metadata server there: said so, with the way out.
    let spec =
        w.spec("SELECT uid FROM t", json!({ "serviceAccountKeySecretRef": null, "metadataServer": "127.0.0.1:9" }));
    let source = open_source_spec(&spec, &external("uid"), &lent).await.expect("opens");
    let e = read_cohort(source.as_ref()).await.expect_err("fails");
    assert!(
        e.to_string().contains("metadata server 127.0.0.1:9") && e.to_string().contains("serviceAccountKeySecretRef"),
        "{e}"
    );
}

/// Without a key of its own a source would act as the operator (its Workload Identity):
/// refused unless the operator lends its identity to the namespace, saying what to set; no
/// token is asked for.
#[tokio::test]
async fn ambient_credentials_are_refused_by_default_and_allowed_only_where_configured() {
    let w = world("bq_ambient", "CREATE TABLE t AS SELECT 'u' || i AS uid FROM generate_series(1, 3) AS i", |c, _| {
        c.metadata_identity = Some("operator@cohort-analytics.iam.gserviceaccount.com".into());
    })
    .await;
    for with_server in [false, true] {
        let mut fields = json!({ "serviceAccountKeySecretRef": null });
        if with_server {
            fields["metadataServer"] = json!(w.bq.metadata_server());
        }
        let spec = w.spec("SELECT uid FROM t", fields);
        let e = open_source_spec(&spec, &external("uid"), &InMemoryObjects::new("growth")).await.unwrap_err();
        assert!(matches!(e, SourceError::AmbientIdentityRefused { .. }), "{e:?}");
        assert_eq!(e.reason(), "InvalidSpec");
        let text = e.to_string();
        assert!(
            text.contains("does not lend to namespace growth")
                && text.contains("set bigquery.serviceAccountKeySecretRef")
                && text.contains("--ambient-identity-namespaces=growth"),
            "{text}"
        );
    }
    assert_eq!(w.stats().await.metadata_tokens, 0, "no token was asked for");

    // Lent to this namespace only: another namespace is still refused.
    let spec = w.spec(
        "SELECT uid FROM t",
        json!({ "serviceAccountKeySecretRef": null, "metadataServer": w.bq.metadata_server() }),
    );
    let lent = InMemoryObjects::new("growth").with_ambient_identity(true);
    let source = open_source_spec(&spec, &external("uid"), &lent).await.expect("opens");
    assert_eq!(read_cohort(source.as_ref()).await.expect("read").members.len(), 3);
    assert_eq!(w.stats().await.metadata_tokens, 1);
    let ambient = cohort_operator::source::AmbientIdentity::from_list(&["growth".to_owned()]).unwrap();
    assert!(ambient.allows("growth") && !ambient.allows("marketing"));
}

/// The API endpoint, the key's token endpoint and a `metadataServer` the spec names are
/// under the operator's egress policy; loopback put on the deny list stands in for a
/// forbidden address, so nothing could leave the machine even if the check failed.
#[tokio::test]
async fn the_api_the_token_endpoint_and_a_named_metadata_server_follow_the_egress_policy() {
    use cohort_operator::net::egress::{EgressDefault, EgressPolicy};
    let w = world("bq_egress", "CREATE TABLE t AS SELECT 'u1' AS uid", |_, _| {}).await;
    let deny = |rule: &str| Arc::new(EgressPolicy::new(vec![], vec![rule.parse().unwrap()], EgressDefault::Allow));
    let refused = |e: SourceError| {
        assert!(matches!(e, SourceError::EgressDenied { .. }), "{e:?}");
        e.to_string()
    };

    // The API endpoint (and the stand-in's token endpoint, on the same address).
    let objects = w.objects().with_egress(deny("127.0.0.1"));
    let e = open_source_spec(&w.spec("SELECT uid FROM t", json!({})), &external("uid"), &objects).await.unwrap_err();
    assert!(refused(e).contains("--egress-deny 127.0.0.1"));

    // A metadata server the spec names.
    let spec =
        w.spec("SELECT uid FROM t", json!({ "serviceAccountKeySecretRef": null, "metadataServer": "127.0.0.2:80" }));
    let objects = InMemoryObjects::new("growth").with_egress(deny("127.0.0.2")).with_ambient_identity(true);
    let e = open_source_spec(&spec, &external("uid"), &objects).await.unwrap_err();
    assert!(refused(e).contains("127.0.0.2"));
    assert_eq!(w.stats().await.token_grants, 0, "no token was asked for");
}
