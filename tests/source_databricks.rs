//! The Databricks source against the Statement Execution API stand-in (warehouse-sandbox),
//! whose statements run on a real PostgreSQL: 100,000-row cohorts over many chunks, inline
//! and through external links (never sent our token), PAT and OAuth M2M, faults survived,
//! and every failure said plainly without a secret.

use std::time::Duration;

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::identifiers::SkipReason;
use cohort_operator::domain::member::{Member, MemberKey};
use cohort_operator::source::{CohortRead, InMemoryObjects, SourceError, open_source_spec, read_cohort};
use serde_json::{Value, json};
use warehouse_sandbox::databricks::{DatabricksConfig, Fault, FaultTarget, RunningDatabricks};

#[path = "support/warehouse.rs"]
mod warehouse_support;
use warehouse_support::{QUERY, assert_abandoned_read_cancels, assert_full_cohort, cohort_database, source_spec};

const PAT: &str = "dapi0123456789abcdef0123456789abcdef";
const CLIENT_ID: &str = "7f3c1d2e-sp-cohorts";
const CLIENT_SECRET: &str = "dose0123456789secret";
const WAREHOUSE: &str = "8f2a9c0d1e3b4a56";

async fn workspace(db: &str, tune: impl FnOnce(&mut DatabricksConfig)) -> (RunningDatabricks, InMemoryObjects) {
    let mut config = DatabricksConfig::new(&cohort_database(db), WAREHOUSE);
    config.tokens = vec![PAT.to_owned()];
    config.clients = vec![(CLIENT_ID.to_owned(), CLIENT_SECRET.to_owned())];
    config.chunk_rows = 10_000;
    config.pending_polls = 2;
    tune(&mut config);
    let workspace = RunningDatabricks::start(config).await.expect("stand-in starts");
    let objects = InMemoryObjects::new("growth")
        .with_secret("databricks", "token", PAT)
        .with_secret("databricks-sp", "clientId", CLIENT_ID)
        .with_secret("databricks-sp", "clientSecret", CLIENT_SECRET);
    (workspace, objects)
}

fn spec(workspace: &RunningDatabricks, query: &str, extra: Value) -> SourceSpec {
    let fields = json!({
        "host": workspace.url(),
        "warehouseId": WAREHOUSE,
        "catalog": "main",
        "auth": { "tokenSecretRef": { "name": "databricks", "key": "token" } },
        "query": query,
        "statementTimeoutSeconds": 120,
    });
    source_spec("databricks", fields, extra)
}

fn mapping() -> IdentifierMapping {
    warehouse_support::cohort_mapping("user_id", "email", "device")
}

const OAUTH: &str = r#"{ "oauth": { "secretName": "databricks-sp" } }"#;

async fn read(objects: &InMemoryObjects, spec: &SourceSpec) -> Result<CohortRead, SourceError> {
    let source = open_source_spec(spec, &mapping(), objects).await?;
    read_cohort(source.as_ref()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_cohort_is_read_through_ten_external_links_without_our_token() {
    let (ws, objects) = workspace("dbx_links", |_| {}).await;
    let read = read(&objects, &spec(&ws, QUERY, json!({}))).await.expect("read");
    assert_full_cohort(&read);
    assert_eq!(ws.link_fetches(), 10);
    assert!(!ws.authorization_sent_to_links(), "the bearer token went to cloud storage");
    assert_eq!(ws.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_cohort_is_read_inline_chunk_by_chunk_with_oauth() {
    let (ws, objects) = workspace("dbx_inline", |c| c.token_lifetime = Duration::from_secs(3600)).await;
    let oauth: Value = serde_json::from_str(OAUTH).unwrap();
    let read =
        read(&objects, &spec(&ws, QUERY, json!({ "disposition": "Inline", "auth": oauth }))).await.expect("read");
    assert_full_cohort(&read);
    assert_eq!(ws.link_fetches(), 0);
    // One token for the whole read: cached, not fetched per request.
    assert_eq!(ws.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_oauth_tokens_are_replaced_before_they_expire() {
    // Tokens live 2 s, so the margin (half the lifetime) replaces each after about 1 s.
    let (ws, objects) = workspace("dbx_refresh", |c| {
        c.token_lifetime = Duration::from_secs(2);
        c.pending_polls = 6;
    })
    .await;
    let oauth: Value = serde_json::from_str(OAUTH).unwrap();
    let query = "SELECT user_id, email, device FROM cohort WHERE i <= 30000";
    let read =
        read(&objects, &spec(&ws, query, json!({ "disposition": "Inline", "auth": oauth }))).await.expect("read");
    assert_eq!(read.rows, 30_000);
    assert!(ws.tokens_issued() >= 2, "the token was never refreshed ({} issued)", ws.tokens_issued());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_survived() {
    let (ws, objects) = workspace("dbx_faults", |_| {}).await;
    let oauth: Value = serde_json::from_str(OAUTH).unwrap();
    ws.inject(FaultTarget::Token, Fault::Unavailable);
    ws.inject(FaultTarget::Submit, Fault::TooManyRequests);
    ws.inject(FaultTarget::Submit, Fault::TransientFailure);
    ws.inject(FaultTarget::Poll, Fault::Unavailable);
    ws.inject(FaultTarget::Poll, Fault::ExpiredToken);
    ws.inject(FaultTarget::Chunk(2), Fault::TooManyRequests);
    ws.inject(FaultTarget::Link(4), Fault::ExpiredLink);
    ws.inject(FaultTarget::Chunk(6), Fault::Unavailable);
    let read = read(&objects, &spec(&ws, QUERY, json!({ "auth": oauth }))).await.expect("read despite faults");
    assert_full_cohort(&read);
    // The statement that failed TEMPORARILY_UNAVAILABLE was submitted again.
    assert_eq!(ws.executions(), 2);
    assert!(ws.tokens_issued() >= 2, "a 401 fetches a new token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_identifiers_arrive_as_braze_expects() {
    let (ws, objects) = workspace("dbx_numbers", |_| {}).await;
    let query = "SELECT 12345678901::bigint AS id UNION ALL SELECT 42.00::numeric(10,2) \
                 UNION ALL SELECT 1234567890::float8 UNION ALL SELECT 7::float8 UNION ALL SELECT NULL";
    let ids: IdentifierMapping = serde_json::from_value(json!({ "externalId": "id" })).unwrap();
    let source = open_source_spec(&spec(&ws, query, json!({ "disposition": "Inline" })), &ids, &objects).await.unwrap();
    let read = read_cohort(source.as_ref()).await.unwrap();
    let mut expected: Vec<MemberKey> =
        ["12345678901", "42", "1234567890", "7"].iter().map(|s| Member::ExternalId((*s).into()).key()).collect();
    expected.sort();
    // Spark writes the doubles as 1.23456789E9 and 7.0: they still arrive as plain integers.
    assert_eq!(read.members, expected);
    assert_eq!(read.skipped.get(SkipReason::Missing), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_reported_as_the_user_needs_it() {
    let (ws, objects) = workspace("dbx_failures", |c| c.pending_polls = 0).await;
    let full = spec(&ws, QUERY, json!({}));
    let no_secret = |text: &str| {
        for secret in [PAT, CLIENT_SECRET, "X-Amz-Signature"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    };

    let bad_token = objects.clone().with_secret("databricks", "token", "dapi-revoked-token-0000");
    let err = read(&bad_token, &full).await.unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("Secret growth/databricks key token"), "{err}");
    assert!(!err.to_string().contains("dapi-revoked-token-0000"), "{err}");

    let bad_client = objects.clone().with_secret("databricks-sp", "clientSecret", "wrong-secret-123");
    let oauth: Value = serde_json::from_str(OAUTH).unwrap();
    let err = read(&bad_client, &spec(&ws, QUERY, json!({ "auth": oauth }))).await.unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }) && err.to_string().contains("invalid_client"), "{err}");
    assert!(!err.to_string().contains("wrong-secret-123"), "{err}");

    ws.inject(FaultTarget::Submit, Fault::PermissionDenied);
    let err = read(&objects, &full).await.unwrap_err();
    // The code is named; the stand-in is not a Databricks domain, so its message is not quoted.
    assert!(
        matches!(err, SourceError::Permission { .. })
            && err.to_string().contains("PERMISSION_DENIED: the host is not the vendor's"),
        "{err}"
    );

    ws.inject(FaultTarget::Submit, Fault::StatementTimeout);
    let err = read(&objects, &full).await.unwrap_err();
    assert!(matches!(err, SourceError::Timeout { seconds: 120, .. }), "{err}");

    ws.inject(FaultTarget::Link(3), Fault::TruncatedChunk);
    let err = read(&objects, &full).await.unwrap_err();
    assert!(err.to_string().contains("chunk 3") && err.to_string().contains("cut short"), "{err}");
    no_secret(&err.to_string());

    ws.inject(FaultTarget::Chunk(2), Fault::TruncatedChunk);
    let err = read(&objects, &spec(&ws, QUERY, json!({ "disposition": "Inline" }))).await.unwrap_err();
    assert!(err.to_string().contains("chunk 2") && err.to_string().contains("cut short"), "{err}");

    let err = read(&objects, &spec(&ws, "SELECT user_id FROM cohort WHERE", json!({}))).await.unwrap_err();
    // The error code and SQLSTATE, never the stand-in's message (it is not a Databricks domain).
    assert!(matches!(err, SourceError::Query { .. }) && err.to_string().contains("(SQLSTATE 42601)"), "{err}");
    assert!(err.to_string().contains("not quoted"), "{err}");

    let err = read(&objects, &spec(&ws, QUERY, json!({ "warehouseId": "unknown0warehouse" }))).await.unwrap_err();
    assert!(err.to_string().contains("INVALID_PARAMETER_VALUE"), "{err}");

    let err = read(&objects, &spec(&ws, QUERY, json!({ "maxChunkBytes": 50_000 }))).await.unwrap_err();
    assert!(
        matches!(err, SourceError::PageTooLarge { .. }) && err.to_string().contains("maxChunkBytes (50000 bytes)"),
        "{err}"
    );

    let err = open_source_spec(&spec(&ws, "INSERT INTO cohort VALUES (1)", json!({})), &mapping(), &objects)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("starts with \"INSERT\""), "{err}");

    let objects_without = InMemoryObjects::new("growth");
    let err = open_source_spec(&full, &mapping(), &objects_without).await.unwrap_err();
    assert_eq!(err.reason(), "SecretNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_read_cancels_the_statement() {
    let (ws, objects) = workspace("dbx_cancel", |c| c.pending_polls = 0).await;
    let ids: IdentifierMapping = serde_json::from_value(json!({ "externalId": "user_id" })).unwrap();
    let spec = spec(&ws, "SELECT pg_sleep(40)::text AS user_id", json!({}));
    let source = open_source_spec(&spec, &ids, &objects).await.unwrap();
    assert_abandoned_read_cancels(source.as_ref(), || ws.cancels()).await;
    let spec = self::spec(&ws, "SELECT pg_sleep(40)::text AS user_id", json!({ "statementTimeoutSeconds": 2 }));
    let source = open_source_spec(&spec, &ids, &objects).await.unwrap();
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert!(matches!(err, SourceError::Timeout { seconds: 2, .. }), "{err}");
}

/// A TCP listener on `ip` that counts the connections it gets and drops each: it stands for
/// an address the source must never reach (127.0.0.2 stands for a forbidden network).
async fn tripwire(ip: &str) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("a loopback address");
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, hits)
}

/// A hostile workspace: its external links redirect to a denied address, or its
/// `next_chunk_internal_link` is an absolute URL elsewhere (which would receive the
/// workspace token). Both are refused, and nothing reaches the other address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_external_link_and_an_absolute_internal_link_are_refused_and_reach_nothing() {
    use cohort_operator::net::egress::{EgressDefault, EgressPolicy};
    let (elsewhere, hits) = tripwire("127.0.0.2").await;
    let deny = std::sync::Arc::new(EgressPolicy::new(vec![], vec!["127.0.0.2".parse().unwrap()], EgressDefault::Allow));

    let to = format!("http://{elsewhere}/stolen");
    let (ws, objects) = workspace("dbx_redirect", |c| c.link_redirect = Some(to)).await;
    let err = read(&objects.with_egress(deny.clone()), &spec(&ws, QUERY, json!({}))).await.unwrap_err();
    assert!(matches!(err, SourceError::EgressDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("--egress-deny 127.0.0.2"), "{err}");
    assert!(ws.link_fetches() >= 1, "the link itself was fetched");

    // The internal link leads to another host: refused by the source whatever the policy
    // says, so the token is never sent there.
    let base = format!("http://{elsewhere}");
    for disposition in ["Inline", "ExternalLinks"] {
        let (ws, objects) = workspace(&format!("dbx_abs_{}", disposition.to_lowercase()), |c| {
            c.internal_link_base = Some(base.clone());
        })
        .await;
        let err = read(&objects, &spec(&ws, QUERY, json!({ "disposition": disposition }))).await.unwrap_err();
        assert!(err.to_string().contains("leads outside the workspace host"), "{disposition}: {err}");
        assert!(!err.to_string().contains(PAT), "{err}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "a connection reached the other address");
}

#[path = "support/hostile_databricks.rs"]
mod hostile_databricks;

/// A Databricks source on a hostile `host`, inline, with the spec's `extra` fields.
fn hostile_spec(host: &str, extra: Value) -> SourceSpec {
    let fields = json!({
        "host": host,
        "warehouseId": WAREHOUSE,
        "disposition": "Inline",
        "auth": { "tokenSecretRef": { "name": "databricks", "key": "token" } },
        "query": "SELECT user_id FROM cohort",
        "statementTimeoutSeconds": 120,
    });
    source_spec("databricks", fields, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_inline_chunk_is_refused_or_streamed_with_flat_memory() {
    use futures::StreamExt;
    let user_id: IdentifierMapping = serde_json::from_value(json!({ "externalId": "user_id" })).unwrap();
    let ceiling = 8u64 << 20;
    let objects = InMemoryObjects::new("growth").with_secret("databricks", "token", PAT).with_max_page_bytes(ceiling);

    // Over the operator's ceiling (the attack: 240 MB of one-character ids; 42 MB here): the
    // spec cannot raise the ceiling, and reading stops at it.
    let rows = 7_000_000;
    let base = hostile_databricks::serve_inline_chunk(rows).await;
    let source = open_source_spec(&hostile_spec(&base, json!({ "maxChunkBytes": 1u64 << 30 })), &user_id, &objects)
        .await
        .expect("opens");
    let err = read_cohort(source.as_ref()).await.expect_err("over the ceiling");
    assert!(matches!(err, SourceError::PageOverCeiling { limit, .. } if limit == ceiling), "{err:?}");
    assert!(
        err.to_string()
            .contains("larger than the operator's ceiling of 8388608 bytes a page (--max-source-page-bytes)"),
        "{err}"
    );
    // A spec's own cap below the ceiling is the one that applies, and says so.
    let source =
        open_source_spec(&hostile_spec(&base, json!({ "maxChunkBytes": 1 << 20 })), &user_id, &objects).await.unwrap();
    let err = read_cohort(source.as_ref()).await.expect_err("over maxChunkBytes");
    assert!(err.to_string().contains("larger than maxChunkBytes (1048576 bytes)"), "{err}");

    // Under the ceiling (1.3 million one-character ids, 7.8 MB in one chunk): kept compact and
    // mapped 10,000 rows at a time, never one batch of the whole chunk.
    let rows = 1_300_000;
    assert!(hostile_databricks::inline_chunk_bytes(rows) < ceiling);
    let base = hostile_databricks::serve_inline_chunk(rows).await;
    let source = open_source_spec(&hostile_spec(&base, json!({})), &user_id, &objects).await.unwrap();
    let mut batches = source.members();
    let (mut read, mut largest) = (0u64, 0u64);
    while let Some(batch) = batches.next().await {
        let batch = batch.expect("read");
        read += batch.rows();
        largest = largest.max(batch.rows());
    }
    assert_eq!(read, rows);
    assert_eq!(largest, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_error_answer_is_read_for_4_kib_at_most() {
    let user_id: IdentifierMapping = serde_json::from_value(json!({ "externalId": "user_id" })).unwrap();
    let objects = InMemoryObjects::new("growth").with_secret("databricks", "token", PAT);
    let base = hostile_databricks::serve_endless_error().await;
    let source = open_source_spec(&hostile_spec(&base, json!({})), &user_id, &objects).await.unwrap();
    let started = std::time::Instant::now();
    let err = read_cohort(source.as_ref()).await.expect_err("a 500 fails");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    // The body never ends: the read stopped after 4 KiB, not at a timeout.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(err.to_string().len() < 1000, "{err}");
}
