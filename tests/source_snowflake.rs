//! The Snowflake source against the Snowflake SQL API stand-in (warehouse-sandbox), whose
//! statements run on a real PostgreSQL: 100,000-row cohorts over many partitions, key-pair
//! JWTs in every documented key form, faults survived, and every failure said plainly
//! without a secret.

use std::time::Duration;

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::identifiers::SkipReason;
use cohort_operator::domain::member::{Member, MemberKey};
use cohort_operator::source::{CohortRead, InMemoryObjects, SourceError, open_source_spec, read_cohort};
use serde_json::{Value, json};
use warehouse_sandbox::keys::{KeyCipher, RsaKeyPair};
use warehouse_sandbox::snowflake::{Fault, FaultTarget, RunningSnowflake, SnowflakeConfig};

#[path = "support/warehouse.rs"]
mod warehouse_support;
use warehouse_support::{QUERY, assert_abandoned_read_cancels, assert_full_cohort, cohort_database, source_spec};

const ACCOUNT: &str = "myorg-analytics";
const USER: &str = "cohort_reader";

struct World {
    key: RsaKeyPair,
    snowflake: RunningSnowflake,
    objects: InMemoryObjects,
}

fn key() -> RsaKeyPair {
    static KEY: std::sync::OnceLock<RsaKeyPair> = std::sync::OnceLock::new();
    KEY.get_or_init(RsaKeyPair::generate).clone()
}

async fn world(db: &str, tune: impl FnOnce(&mut SnowflakeConfig)) -> World {
    let key = key();
    let url = cohort_database(db);
    let mut config = SnowflakeConfig::new("MYORG-ANALYTICS", "COHORT_READER", &key.rsa_public_key(), &url);
    config.partition_rows = 10_000;
    config.pending_polls = 2;
    config.sync_wait = Duration::ZERO;
    tune(&mut config);
    let snowflake = RunningSnowflake::start(config).await.expect("stand-in starts");
    let objects = InMemoryObjects::new("growth")
        .with_secret("snowflake", "account", ACCOUNT)
        .with_secret("snowflake", "user", USER)
        .with_secret("snowflake", "privateKey", key.private_key_pem());
    World { key, snowflake, objects }
}

fn spec(world: &World, query: &str, extra: Value) -> SourceSpec {
    let fields = json!({
        "credentials": { "secretName": "snowflake" },
        "endpoint": world.snowflake.url(),
        "warehouse": "COHORTS_WH",
        "database": "ANALYTICS",
        "role": "COHORT_READER",
        "query": query,
        "statementTimeoutSeconds": 120,
    });
    source_spec("snowflake", fields, extra)
}

/// Snowflake upper-cases unquoted column names.
fn mapping() -> IdentifierMapping {
    warehouse_support::cohort_mapping("USER_ID", "EMAIL", "DEVICE")
}

async fn read(world: &World, spec: &SourceSpec) -> Result<CohortRead, SourceError> {
    let source = open_source_spec(spec, &mapping(), &world.objects).await?;
    read_cohort(source.as_ref()).await
}

/// No secret of the key pair in a message.
fn assert_no_secret(world: &World, text: &str) {
    assert!(!text.contains("PRIVATE KEY") && !text.contains(&world.key.private_key_pem()[40..90]), "{text}");
    assert!(!text.contains("eyJ"), "a JWT in {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_cohort_is_read_over_ten_partitions_after_the_statement_completes_later() {
    let world = world("sf_full", |_| {}).await;
    let read = read(&world, &spec(&world, QUERY, json!({}))).await.expect("read");
    assert_full_cohort(&read);
    assert_eq!(world.snowflake.partition_requests(), 9, "partitions 1..9 fetched once each");
    assert_eq!(world.snowflake.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_survived_and_the_statement_runs_once() {
    let world = world("sf_faults", |_| {}).await;
    let sf = &world.snowflake;
    sf.inject(FaultTarget::Submit, Fault::TooManyRequests);
    sf.inject(FaultTarget::Submit, Fault::InternalError);
    sf.inject(FaultTarget::Poll, Fault::Unavailable);
    sf.inject(FaultTarget::Poll, Fault::TooManyRequests);
    sf.inject(FaultTarget::Partition(3), Fault::TooManyRequests);
    sf.inject(FaultTarget::Partition(5), Fault::ExpiredToken);
    sf.inject(FaultTarget::Partition(7), Fault::Unavailable);
    let read = read(&world, &spec(&world, QUERY, json!({}))).await.expect("read despite faults");
    assert_full_cohort(&read);
    // The 500 came after the statement was created: the resubmission (requestId + retry=true)
    // found it instead of running it again.
    assert_eq!(sf.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_partition_bodies_and_every_key_form_are_read() {
    let world = world("sf_keys", |c| c.wrapped_partitions = false).await;
    let query = "SELECT user_id, email, device FROM cohort WHERE i <= 25000";
    for (name, objects) in [
        (
            // An unencrypted key ignores a passphrase.
            "pkcs1",
            world.objects.clone().with_secret("snowflake", "privateKey", world.key.pkcs1_pem()).with_secret(
                "snowflake",
                "passphrase",
                "unused",
            ),
        ),
        (
            "aes",
            world
                .objects
                .clone()
                .with_secret(
                    "snowflake",
                    "privateKey",
                    world.key.encrypted_private_key_pem("s3cret pass", KeyCipher::Aes256Cbc),
                )
                .with_secret("snowflake", "passphrase", "s3cret pass"),
        ),
        (
            "des3",
            world
                .objects
                .clone()
                .with_secret(
                    "snowflake",
                    "privateKey",
                    world.key.encrypted_private_key_pem("s3cret pass", KeyCipher::DesEde3Cbc),
                )
                .with_secret("snowflake", "passphrase", "s3cret pass"),
        ),
    ] {
        let spec = spec(
            &world,
            query,
            json!({ "credentials": { "secretName": "snowflake", "privateKeyPassphraseKey": "passphrase" } }),
        );
        let source = open_source_spec(&spec, &mapping(), &objects).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let read = read_cohort(source.as_ref()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((read.rows, read.members.len()), (25_000, 22_500), "{name}");
    }
    // An encrypted key without its passphrase, or with a wrong one: said so, not shown.
    let encrypted = world.key.encrypted_private_key_pem("right", KeyCipher::Aes256Cbc);
    let objects = world.objects.clone().with_secret("snowflake", "privateKey", encrypted.clone()).with_secret(
        "snowflake",
        "passphrase",
        "wrong",
    );
    let err = open_source_spec(&spec(&world, query, json!({})), &mapping(), &objects).await.unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("privateKeyPassphraseKey"), "{err}");
    let with_pass = spec(
        &world,
        query,
        json!({ "credentials": { "secretName": "snowflake", "privateKeyPassphraseKey": "passphrase" } }),
    );
    let err = open_source_spec(&with_pass, &mapping(), &objects).await.unwrap_err();
    assert!(err.to_string().contains("passphrase is wrong"), "{err}");
    assert!(!err.to_string().contains(&encrypted[40..80]) && !err.to_string().contains("wrong\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_identifiers_arrive_as_braze_expects() {
    let world = world("sf_numbers", |_| {}).await;
    let query = "SELECT 12345678901::numeric(20,0) AS id UNION ALL SELECT 42.00::numeric(10,2) \
                 UNION ALL SELECT 1234567890::float8 UNION ALL SELECT 1e16::float8 UNION ALL SELECT NULL";
    let spec = spec(&world, query, json!({}));
    let ids: IdentifierMapping = serde_json::from_value(json!({ "externalId": "ID" })).unwrap();
    let source = open_source_spec(&spec, &ids, &world.objects).await.unwrap();
    let read = read_cohort(source.as_ref()).await.unwrap();
    let expected: Vec<MemberKey> = ["12345678901", "1234567890", "42"]
        .iter()
        .map(|s| Member::ExternalId((*s).into()).key())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(read.members, expected);
    // 1e16 as a float can no longer be an exact id; NULL is missing.
    assert_eq!(read.skipped.get(SkipReason::UnsupportedValue), 1);
    assert_eq!(read.skipped.get(SkipReason::Missing), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_reported_as_the_user_needs_it() {
    let world = world("sf_failures", |_| {}).await;
    let sf = &world.snowflake;
    let full = spec(&world, QUERY, json!({}));

    // A key Snowflake does not know for this user: authentication, naming the fingerprint.
    let other = RsaKeyPair::generate();
    let objects = world.objects.clone().with_secret("snowflake", "privateKey", other.private_key_pem());
    let source = open_source_spec(&full, &mapping(), &objects).await.unwrap();
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("390144") && text.contains(&other.fingerprint()) && text.contains("RSA_PUBLIC_KEY"),
        "{text}"
    );
    assert!(text.contains("MYORG-ANALYTICS.COHORT_READER"), "{text}");
    assert_no_secret(&world, &text);

    sf.inject(FaultTarget::Submit, Fault::PermissionDenied);
    let err = read(&world, &full).await.unwrap_err();
    assert!(matches!(err, SourceError::Permission { .. }), "{err}");
    // The code and our fix; the stand-in is not snowflakecomputing.com, so its words are not quoted.
    assert!(err.to_string().contains("(code 003001)") && err.to_string().contains("COHORT_READER"), "{err}");
    assert!(!err.to_string().contains("Insufficient privileges"), "{err}");

    sf.inject(FaultTarget::Submit, Fault::StatementTimeout);
    let err = read(&world, &full).await.unwrap_err();
    assert!(matches!(err, SourceError::Timeout { seconds: 120, .. }), "{err}");

    sf.inject(FaultTarget::Partition(2), Fault::TruncatedPartition);
    let err = read(&world, &full).await.unwrap_err();
    assert!(err.to_string().contains("partition 2") && err.to_string().contains("cut short"), "{err}");

    let err = read(&world, &spec(&world, "SELECT user_id FROM cohort WHERE", json!({}))).await.unwrap_err();
    assert!(matches!(err, SourceError::Query { .. }) && err.to_string().contains("001003"), "{err}");
    let err = read(&world, &spec(&world, "SELECT user_id FROM no_such_table", json!({}))).await.unwrap_err();
    assert!(err.to_string().contains("code 002003") && err.to_string().contains("SQLSTATE 42P01"), "{err}");

    // The mapping names a column the query lacks (Snowflake upper-cases unquoted names).
    let lower: IdentifierMapping = serde_json::from_value(json!({ "externalId": "user_id" })).unwrap();
    let source = open_source_spec(&full, &lower, &world.objects).await.unwrap();
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("no column \"user_id\"") && err.to_string().contains("\"USER_ID\""), "{err}");

    // A partition over the byte cap, named with the field that raises it.
    let err = read(&world, &spec(&world, QUERY, json!({ "maxPartitionBytes": 100_000 }))).await.unwrap_err();
    assert!(matches!(err, SourceError::PageTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("maxPartitionBytes (100000 bytes)"), "{err}");

    // Not a single SELECT: refused before anything is sent.
    let executions = sf.executions();
    let err = open_source_spec(&spec(&world, "SELECT 1; DROP TABLE cohort", json!({})), &mapping(), &world.objects)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("more than one statement"), "{err}");
    assert_eq!(sf.executions(), executions);

    // A missing Secret key names it.
    let objects = InMemoryObjects::new("growth").with_secret("snowflake", "account", ACCOUNT);
    let err = open_source_spec(&full, &mapping(), &objects).await.unwrap_err();
    assert_eq!(err.reason(), "SecretNotFound");
    assert!(err.to_string().contains("\"user\""), "{err}");
    assert!(!format!("{:?}", open_source_spec(&full, &mapping(), &world.objects).await.unwrap()).contains("PRIVATE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_read_cancels_the_statement() {
    let world = world("sf_cancel", |c| c.pending_polls = 0).await;
    let spec = spec(&world, "SELECT pg_sleep(30)::text AS user_id", json!({}));
    let ids: IdentifierMapping = serde_json::from_value(json!({ "externalId": "USER_ID" })).unwrap();
    let source = open_source_spec(&spec, &ids, &world.objects).await.unwrap();
    // The run gives up (its own timeout) while Snowflake still runs the statement.
    assert_abandoned_read_cancels(source.as_ref(), || world.snowflake.cancels()).await;
    // Past statementTimeoutSeconds the source itself cancels and says so.
    let spec = self::spec(&world, "SELECT pg_sleep(30)::text AS user_id", json!({ "statementTimeoutSeconds": 2 }));
    let source = open_source_spec(&spec, &ids, &world.objects).await.unwrap();
    let err = read_cohort(source.as_ref()).await.unwrap_err();
    assert!(matches!(err, SourceError::Timeout { seconds: 2, .. }), "{err}");
    assert!(source.describe().contains("myorg-analytics"));
}
