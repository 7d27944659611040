//! A Snowflake private key from a Secret, decrypted in bounded time and memory, once per
//! Secret value.
//!
//! An encrypted PKCS#8 key names its own key-derivation cost: a PBKDF2 iteration count, or
//! scrypt's N, r and p. Whoever writes the Secret picks them, so they are read first and
//! refused above [`Ceilings`] (what `openssl pkcs8 -topk8 -v2 aes-256-cbc` and `-scrypt`
//! write by default is far below). A derivation that is allowed runs on a blocking thread,
//! one at a time per process, under [`DERIVATION_TIMEOUT`]: the async runtime (Lease renewal,
//! `/healthz`, every other import) never waits for it. Its outcome is kept per Secret key
//! and value (namespace, name, key and a SHA-256 of the encrypted key and passphrase), so a
//! run, its retries and later runs derive it once; a new value derives again.
//!
//! No message carries the key or the passphrase.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::EncodingKey;
use pkcs8::pkcs5::EncryptionScheme;
use pkcs8::pkcs5::pbes2::Kdf;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Longest a derivation may take; past it the import fails (the derivation finishes on its
/// own thread and its outcome is kept for the next attempt).
pub const DERIVATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Secret keys whose outcome is kept; past it the oldest half is forgotten.
const CACHE_ENTRIES: usize = 1024;

/// The highest key-derivation cost the operator runs. A derivation at these ceilings takes
/// about a second on one core and at most 32 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ceilings {
    pub pbkdf2_iterations: u32,
    /// scrypt's N is `2^log_n`.
    pub scrypt_log_n: u32,
    pub scrypt_r: u32,
    pub scrypt_p: u32,
}

/// PBKDF2 up to 1,000,000 iterations (openssl writes 2,048); scrypt up to N = 2^15, r = 8,
/// p = 4 (openssl writes N = 2^14, r = 8, p = 1): 128·r·N = 32 MiB at most.
pub const CEILINGS: Ceilings = Ceilings { pbkdf2_iterations: 1_000_000, scrypt_log_n: 15, scrypt_r: 8, scrypt_p: 4 };

/// A usable signing key and its public key's fingerprint `SHA256:<base64>`.
#[derive(Clone)]
pub struct SigningKey {
    pub key: EncodingKey,
    pub fingerprint: String,
}

/// Which Secret key a private key comes from: the cache's key, with a digest of the value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeySource {
    pub namespace: String,
    pub secret: String,
    pub key: String,
}

type Outcome = Result<Arc<SigningKey>, String>;

/// Outcomes by Secret key: the digest of the value each is for, and the outcome.
type Outcomes = HashMap<KeySource, ([u8; 32], Outcome)>;

static CACHE: LazyLock<Mutex<Outcomes>> = LazyLock::new(Default::default);
/// One derivation at a time in the whole process.
static DERIVING: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(1)));
static DERIVATIONS: AtomicU64 = AtomicU64::new(0);

/// Key derivations run by this process so far (each encrypted key value derives once).
pub fn derivations() -> u64 {
    DERIVATIONS.load(Ordering::Relaxed)
}

/// The signing key in `pem`; an encrypted one is decrypted with `passphrase` within the
/// [`CEILINGS`] and [`DERIVATION_TIMEOUT`], once per value of `from`. Errors say what is
/// wrong and how to fix it, never the key.
pub async fn signing_key(from: &KeySource, pem: &str, passphrase: Option<&str>) -> Result<SigningKey, String> {
    let (label, doc) = pkcs8::SecretDocument::from_pem(pem.trim())
        .map_err(|e| format!("the private key is not PEM text ({e}); paste the whole -----BEGIN … KEY----- block"))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return plain_key(label, doc.as_bytes());
    }
    let passphrase = passphrase.ok_or(
        "the private key is encrypted; put its passphrase in the Secret and name its key in \
         credentials.privateKeyPassphraseKey",
    )?;
    check_cost(&encrypted(doc.as_bytes())?.encryption_algorithm, &CEILINGS)?;
    let digest = value_digest(pem, passphrase);
    if let Some(outcome) = cached(from, &digest) {
        return outcome.map(|k| (*k).clone());
    }
    let der = doc.as_bytes().to_vec();
    let passphrase = passphrase.to_owned();
    let from = from.clone();
    let derive = async move {
        let permit = DERIVING.clone().acquire_owned().await.map_err(|_| "the operator is shutting down".to_owned())?;
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // Another import may have derived it while this one waited.
            if let Some(outcome) = cached(&from, &digest) {
                return outcome;
            }
            DERIVATIONS.fetch_add(1, Ordering::Relaxed);
            let outcome = decrypt(&der, &passphrase).map(Arc::new);
            remember(from, digest, outcome.clone());
            outcome
        });
        task.await.map_err(|_| "decrypting the private key failed unexpectedly".to_owned())?
    };
    match tokio::time::timeout(DERIVATION_TIMEOUT, derive).await {
        Ok(outcome) => outcome.map(|k| (*k).clone()),
        Err(_) => Err(format!(
            "decrypting the private key took longer than {} s (other imports' keys may be decrypting first); \
             the next attempt uses its result",
            DERIVATION_TIMEOUT.as_secs()
        )),
    }
}

/// The key-derivation cost `scheme` asks for, refused above `ceilings` with a message naming
/// the parameter, its value and the ceiling. Pure: nothing is derived.
pub fn check_cost(scheme: &EncryptionScheme<'_>, ceilings: &Ceilings) -> Result<(), String> {
    let EncryptionScheme::Pbes2(params) = scheme else {
        return Err("the private key is encrypted with PBES1, which is not supported; re-encrypt it with \
             `openssl pkcs8 -topk8 -v2 aes-256-cbc`"
            .to_owned());
    };
    let refuse = |parameter: &str, value: u64, ceiling: u64| {
        Err(format!(
            "the encrypted private key asks for {parameter} {value}, above the operator's ceiling of {ceiling}; \
             re-encrypt it with `openssl pkcs8 -topk8 -v2 aes-256-cbc` (or -scrypt) and its default cost"
        ))
    };
    match &params.kdf {
        Kdf::Pbkdf2(p) if p.iteration_count > ceilings.pbkdf2_iterations => {
            refuse("PBKDF2 iteration count", p.iteration_count.into(), ceilings.pbkdf2_iterations.into())
        }
        Kdf::Scrypt(s) if !s.cost_parameter.is_power_of_two() => {
            Err(format!("the encrypted private key's scrypt N ({}) is not a power of two", s.cost_parameter))
        }
        Kdf::Scrypt(s) if s.cost_parameter > 1u64 << ceilings.scrypt_log_n => {
            refuse("scrypt N", s.cost_parameter, 1u64 << ceilings.scrypt_log_n)
        }
        Kdf::Scrypt(s) if u32::from(s.block_size) > ceilings.scrypt_r => {
            refuse("scrypt r", s.block_size.into(), ceilings.scrypt_r.into())
        }
        Kdf::Scrypt(s) if u32::from(s.parallelization) > ceilings.scrypt_p => {
            refuse("scrypt p", s.parallelization.into(), ceilings.scrypt_p.into())
        }
        _ => Ok(()),
    }
}

fn encrypted(der: &[u8]) -> Result<pkcs8::EncryptedPrivateKeyInfo<'_>, String> {
    use pkcs8::der::Decode;
    pkcs8::EncryptedPrivateKeyInfo::from_der(der).map_err(|e| format!("the encrypted private key is malformed ({e})"))
}

/// Derives and decrypts (slow: call only within the ceilings, off the async runtime).
fn decrypt(der: &[u8], passphrase: &str) -> Result<SigningKey, String> {
    let decrypted = encrypted(der)?.decrypt(passphrase).map_err(|_| {
        "cannot decrypt the private key: the passphrase is wrong or the cipher is not PBES2 \
         with AES-CBC or DES-EDE3-CBC"
            .to_owned()
    })?;
    rsa_key(&rsa_of_pkcs8(decrypted.as_bytes())?)
}

fn plain_key(label: &str, der: &[u8]) -> Result<SigningKey, String> {
    match label {
        "PRIVATE KEY" => rsa_key(&rsa_of_pkcs8(der)?),
        "RSA PRIVATE KEY" => rsa_key(der),
        other => Err(format!("the PEM block is {other:?}, not a private key")),
    }
}

/// The signing key of a PKCS#1 RSA key, and its public key's fingerprint.
fn rsa_key(pkcs1: &[u8]) -> Result<SigningKey, String> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let pair = aws_lc_rs::rsa::KeyPair::from_der(pkcs1)
        .map_err(|e| format!("not a usable RSA private key ({e}); Snowflake needs RSA 2048 bits or more"))?;
    let spki = pair.public_key().as_der().map_err(|_| "cannot encode the public key".to_owned())?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki.as_ref());
    let fingerprint = format!("SHA256:{}", base64::engine::general_purpose::STANDARD.encode(digest.as_ref()));
    Ok(SigningKey { key: EncodingKey::from_rsa_der(pkcs1), fingerprint })
}

/// The PKCS#1 key inside a PKCS#8 `PrivateKeyInfo`, if it is RSA.
fn rsa_of_pkcs8(der: &[u8]) -> Result<Vec<u8>, String> {
    use pkcs8::der::Decode;
    const RSA: pkcs8::ObjectIdentifier = pkcs8::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    let info = pkcs8::PrivateKeyInfo::from_der(der).map_err(|e| format!("the private key is malformed ({e})"))?;
    if info.algorithm.oid != RSA {
        return Err(format!(
            "the private key is not RSA (algorithm {}); Snowflake key pairs are RSA",
            info.algorithm.oid
        ));
    }
    Ok(info.private_key.to_vec())
}

/// SHA-256 over the key and the passphrase, each length-prefixed.
fn value_digest(pem: &str, passphrase: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [pem.as_bytes(), passphrase.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

fn cached(from: &KeySource, digest: &[u8; 32]) -> Option<Outcome> {
    let cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cache.get(from).filter(|(d, _)| d == digest).map(|(_, outcome)| outcome.clone())
}

/// Keeps `outcome` for `from`, replacing the outcome of an earlier value.
fn remember(from: KeySource, digest: [u8; 32], outcome: Outcome) {
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if cache.len() >= CACHE_ENTRIES && !cache.contains_key(&from) {
        let forget: Vec<KeySource> = cache.keys().take(CACHE_ENTRIES / 2).cloned().collect();
        for key in forget {
            cache.remove(&key);
        }
    }
    cache.insert(from, (digest, outcome));
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs8::pkcs5::pbes2;

    fn pbkdf2(iterations: u32) -> EncryptionScheme<'static> {
        pbes2::Parameters {
            kdf: pbes2::Pbkdf2Params {
                salt: &[1; 16],
                iteration_count: iterations,
                key_length: None,
                prf: pbes2::Pbkdf2Prf::HmacWithSha256,
            }
            .into(),
            encryption: pbes2::EncryptionScheme::Aes256Cbc { iv: &[2; 16] },
        }
        .into()
    }

    fn scrypt(n: u64, r: u16, p: u16) -> EncryptionScheme<'static> {
        pbes2::Parameters {
            kdf: pbes2::ScryptParams {
                salt: &[1; 16],
                cost_parameter: n,
                block_size: r,
                parallelization: p,
                key_length: None,
            }
            .into(),
            encryption: pbes2::EncryptionScheme::Aes256Cbc { iv: &[2; 16] },
        }
        .into()
    }

    #[test]
    fn openssl_defaults_pass_and_costs_above_the_ceilings_are_named() {
        // What `openssl pkcs8 -topk8 -v2 aes-256-cbc` and `-scrypt` write (OpenSSL 3).
        assert_eq!(check_cost(&pbkdf2(2048), &CEILINGS), Ok(()));
        assert_eq!(check_cost(&scrypt(1 << 14, 8, 1), &CEILINGS), Ok(()));
        assert_eq!(check_cost(&pbkdf2(1_000_000), &CEILINGS), Ok(()));
        assert_eq!(check_cost(&scrypt(1 << 15, 8, 4), &CEILINGS), Ok(()));
        let err = check_cost(&pbkdf2(i32::MAX as u32), &CEILINGS).unwrap_err();
        assert!(err.contains("PBKDF2 iteration count 2147483647, above the operator's ceiling of 1000000"), "{err}");
        let err = check_cost(&scrypt(1 << 40, 8, 1), &CEILINGS).unwrap_err();
        assert!(err.contains("scrypt N 1099511627776, above the operator's ceiling of 32768"), "{err}");
        assert!(check_cost(&scrypt(1 << 14, 9, 1), &CEILINGS).unwrap_err().contains("scrypt r 9"));
        assert!(check_cost(&scrypt(1 << 14, 8, 5), &CEILINGS).unwrap_err().contains("scrypt p 5"));
        assert!(check_cost(&scrypt(3, 8, 1), &CEILINGS).unwrap_err().contains("not a power of two"));
    }

    #[tokio::test]
    async fn bad_keys_say_what_is_wrong_without_the_key() {
        let from = KeySource { namespace: "ns".into(), secret: "s".into(), key: "privateKey".into() };
        let err = signing_key(&from, "not a key", None).await.err().unwrap();
        assert!(err.contains("not PEM"), "{err}");
        let pem =
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n";
        let err = signing_key(&from, pem, None).await.err().unwrap();
        assert!(err.contains("not PEM") || err.contains("not a private key"), "{err}");
    }

    #[test]
    fn digests_tell_values_apart() {
        assert_ne!(value_digest("ab", "c"), value_digest("a", "bc"));
        assert_eq!(value_digest("k", "p"), value_digest("k", "p"));
    }
}
