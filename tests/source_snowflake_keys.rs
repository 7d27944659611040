//! Encrypted Snowflake private keys whose key derivation a hostile tenant chose: refused
//! before anything is derived, within a second and without memory; a key that is allowed is
//! decrypted off the async runtime, once per Secret value.
//!
//! The tests share one process-wide derivation counter and RSS, so they run one at a time.

use std::cell::Cell;
use std::time::{Duration, Instant};

use cohort_operator::api::SourceSpec;
use cohort_operator::source::private_key::{self, CEILINGS};
use cohort_operator::source::{InMemoryObjects, SourceError, open_source_spec};
use serde_json::json;
use warehouse_sandbox::keys::{KeyDerivation, RsaKeyPair, key_derivation_bomb_pem};

#[path = "support/warehouse.rs"]
mod warehouse_support;
use warehouse_support::{cohort_mapping, source_spec};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Snowflake source whose Secret `name` in `namespace` holds `pem` and passphrase
/// `passphrase`. The endpoint is never reached: keys are read when the source opens.
fn source(namespace: &str, name: &str, pem: &str) -> (SourceSpec, InMemoryObjects) {
    let spec = source_spec(
        "snowflake",
        json!({
            "credentials": { "secretName": name, "privateKeyPassphraseKey": "passphrase" },
            "endpoint": "http://127.0.0.1:9",
            "query": "SELECT user_id FROM cohort",
        }),
        json!({}),
    );
    let objects = InMemoryObjects::new(namespace)
        .with_secret(name, "account", "myorg-analytics")
        .with_secret(name, "user", "cohort_reader")
        .with_secret(name, "privateKey", pem)
        .with_secret(name, "passphrase", "s3cret pass");
    (spec, objects)
}

async fn open(spec: &SourceSpec, objects: &InMemoryObjects) -> Result<(), SourceError> {
    open_source_spec(spec, &cohort_mapping("USER_ID", "EMAIL", "DEVICE"), objects).await.map(|_| ())
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// Opens a source over a bomb named by `kdf`; checks the refusal's time, memory and message.
async fn assert_refused_fast(kdf: KeyDerivation, expected: &str) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (spec, objects) = source("tenant-a", "snowflake", &key_derivation_bomb_pem(kdf));
    let (derived, rss) = (private_key::derivations(), rss_mib());
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(1), open(&spec, &objects))
        .await
        .expect("refused within a second")
        .expect_err("a bomb is refused");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(rss_mib() - rss < 8.0, "RSS grew from {rss:.1} to {:.1} MiB", rss_mib());
    assert_eq!(private_key::derivations(), derived, "nothing is derived");
    assert_eq!(err.reason(), cohort_operator::api::ReadyReason::InvalidSpec);
    let message = err.to_string();
    assert!(message.contains("key privateKey of Secret tenant-a/snowflake"), "{message}");
    assert!(message.contains(expected), "{message}");
    assert!(!message.contains("s3cret") && !message.contains("ENCRYPTED PRIVATE KEY"), "{message}");
}

#[tokio::test]
async fn a_pbkdf2_bomb_is_refused_within_a_second() {
    let count = i32::MAX as u32;
    assert_refused_fast(
        KeyDerivation::Pbkdf2 { iterations: count },
        &format!("PBKDF2 iteration count {count}, above the operator's ceiling of {}", CEILINGS.pbkdf2_iterations),
    )
    .await;
}

#[tokio::test]
async fn a_scrypt_bomb_is_refused_within_a_second() {
    // N = 2^40: 128·r·N would be a petabyte.
    assert_refused_fast(
        KeyDerivation::Scrypt { log_n: 40, r: 8, p: 1 },
        "scrypt N 1099511627776, above the operator's ceiling of 32768",
    )
    .await;
    assert_refused_fast(KeyDerivation::Scrypt { log_n: 14, r: 8, p: 16 }, "scrypt p 16").await;
}

/// `work`'s output and the longest the runtime left a 5 ms ticker waiting while `work` ran
/// on the same single-threaded runtime.
async fn longest_tick_gap<T>(work: impl std::future::Future<Output = T>) -> (T, Duration) {
    let longest = Cell::new(Duration::ZERO);
    let last = Cell::new(Instant::now());
    let ticker = async {
        let mut interval = tokio::time::interval(Duration::from_millis(5));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            longest.set(longest.get().max(last.get().elapsed()));
            last.set(Instant::now());
        }
    };
    let out = tokio::select! {
        out = work => out,
        _ = ticker => unreachable!("the ticker never ends"),
    };
    (out, longest.get().max(last.get().elapsed()))
}

#[tokio::test(flavor = "current_thread")]
async fn three_key_derivation_bombs_and_a_real_key_leave_the_runtime_responsive() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bomb = KeyDerivation::Pbkdf2 { iterations: i32::MAX as u32 };
    let bombs: Vec<_> =
        (0..3).map(|i| source("tenant-b", &format!("bomb-{i}"), &key_derivation_bomb_pem(bomb))).collect();
    let pair = RsaKeyPair::generate();
    // OpenSSL's scrypt default (N = 2^14, r = 8, p = 1): 16 MiB and the costliest
    // derivation these tests run.
    let real = pair.encrypted_private_key_pem_with("s3cret pass", KeyDerivation::Scrypt { log_n: 14, r: 8, p: 1 });
    let (spec, objects) = source("tenant-b", "real", &real);
    let derived = private_key::derivations();
    let started = Instant::now();
    let ((refused, opened), gap) = longest_tick_gap(async {
        let refused = futures::future::join_all(bombs.iter().map(|(s, o)| open(s, o))).await;
        (refused, open(&spec, &objects).await)
    })
    .await;
    let took = started.elapsed();
    for outcome in refused {
        assert!(outcome.unwrap_err().to_string().contains("PBKDF2 iteration count"));
    }
    opened.expect("the real key is decrypted");
    assert_eq!(private_key::derivations(), derived + 1, "one derivation: the real key's");
    // The derivation ran on a blocking thread: the runtime kept ticking all along (on the
    // runtime's thread, the ticker would have waited for the whole derivation).
    assert!(took > Duration::from_millis(100), "the derivation is measurable ({took:?})");
    assert!(gap * 4 < took && gap < Duration::from_secs(1), "the runtime stalled for {gap:?} of {took:?}");
    // Opened again (a retry, the next run): the key is not derived again.
    let started = Instant::now();
    open(&spec, &objects).await.expect("opened again");
    assert_eq!(private_key::derivations(), derived + 1, "not derived twice");
    assert!(started.elapsed() < took / 2, "{:?}", started.elapsed());
}

#[tokio::test]
async fn keys_as_openssl_encrypts_them_by_default_are_read() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // `openssl pkcs8 -topk8 -v2 aes-256-cbc` and `-scrypt` (OpenSSL 3.0), passphrase "x".
    for (name, pem) in [
        ("pbkdf2", include_str!("support/keys/openssl-pbkdf2-default.pem")),
        ("scrypt", include_str!("support/keys/openssl-scrypt-default.pem")),
    ] {
        let (spec, objects) = source("tenant-c", name, pem);
        let objects = objects.with_secret(name, "passphrase", "x");
        open(&spec, &objects).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
