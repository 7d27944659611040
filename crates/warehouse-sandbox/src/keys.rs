//! RSA key pairs for tests and the demo, in the forms Snowflake's key-pair guide produces:
//! an unencrypted PKCS#8 PEM (`openssl pkcs8 -topk8 -nocrypt`), an encrypted one (PBES2 with
//! AES-256-CBC, OpenSSL 3's default, or DES-EDE3-CBC as the guide's `-v2 des3`), and the
//! public key as `ALTER USER … SET RSA_PUBLIC_KEY` takes it.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair;
use base64::Engine;
use pkcs8::der::pem::LineEnding;
use pkcs8::der::{Decode, EncodePem};
use pkcs8::pkcs5::pbes2;

/// A generated RSA 2048 key pair.
#[derive(Clone)]
pub struct RsaKeyPair {
    pkcs8_der: Vec<u8>,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for RsaKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaKeyPair").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

/// How an encrypted private key is enciphered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyCipher {
    Aes256Cbc,
    DesEde3Cbc,
}

/// The key-derivation function and cost an encrypted private key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyDerivation {
    /// PBKDF2 with HMAC-SHA256 (`openssl pkcs8 -topk8 -v2 aes-256-cbc`: 2,048 iterations).
    Pbkdf2 { iterations: u32 },
    /// scrypt with N = 2^log_n (`openssl pkcs8 -topk8 -scrypt`: log_n 14, r 8, p 1).
    Scrypt { log_n: u8, r: u16, p: u16 },
}

impl KeyDerivation {
    fn parameters<'a>(self, salt: &'a [u8], iv: &'a [u8; 16]) -> pbes2::Parameters<'a> {
        let kdf: pbes2::Kdf<'a> = match self {
            KeyDerivation::Pbkdf2 { iterations } => pbes2::Pbkdf2Params {
                salt,
                iteration_count: iterations,
                key_length: None,
                prf: pbes2::Pbkdf2Prf::HmacWithSha256,
            }
            .into(),
            KeyDerivation::Scrypt { log_n, r, p } => pbes2::ScryptParams {
                salt,
                cost_parameter: 1u64 << log_n,
                block_size: r,
                parallelization: p,
                key_length: None,
            }
            .into(),
        };
        pbes2::Parameters { kdf, encryption: pbes2::EncryptionScheme::Aes256Cbc { iv } }
    }
}

/// A hostile tenant's `ENCRYPTED PRIVATE KEY`: well-formed, naming `kdf`'s cost, its
/// ciphertext random. Nothing is derived to make it, so the cost may be anything: a reader
/// that derived before checking would spend it.
pub fn key_derivation_bomb_pem(kdf: KeyDerivation) -> String {
    let salt: [u8; 16] = rand::random();
    let iv: [u8; 16] = rand::random();
    let ciphertext: Vec<u8> = (0..1232).map(|_| rand::random::<u8>()).collect();
    let info = pkcs8::EncryptedPrivateKeyInfo {
        encryption_algorithm: kdf.parameters(&salt, &iv).into(),
        encrypted_data: &ciphertext,
    };
    info.to_pem(LineEnding::LF).expect("PEM").to_string()
}

impl RsaKeyPair {
    pub fn generate() -> RsaKeyPair {
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA key generation");
        let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().expect("PKCS#8 encoding");
        let spki: aws_lc_rs::encoding::PublicKeyX509Der = pair.public_key().as_der().expect("SPKI encoding");
        RsaKeyPair { pkcs8_der: pkcs8.as_ref().to_vec(), spki_der: spki.as_ref().to_vec() }
    }

    /// `-----BEGIN PRIVATE KEY-----` (unencrypted PKCS#8).
    pub fn private_key_pem(&self) -> String {
        let info = pkcs8::PrivateKeyInfo::from_der(&self.pkcs8_der).expect("own key");
        info.to_pem(LineEnding::LF).expect("PEM").to_string()
    }

    /// `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1, as `openssl genrsa` of OpenSSL 1.x wrote).
    pub fn pkcs1_pem(&self) -> String {
        let info = pkcs8::PrivateKeyInfo::from_der(&self.pkcs8_der).expect("own key");
        let body = base64::engine::general_purpose::STANDARD.encode(info.private_key);
        pem_block("RSA PRIVATE KEY", &body)
    }

    /// `-----BEGIN ENCRYPTED PRIVATE KEY-----` under `passphrase`.
    pub fn encrypted_private_key_pem(&self, passphrase: &str, cipher: KeyCipher) -> String {
        let info = pkcs8::PrivateKeyInfo::from_der(&self.pkcs8_der).expect("own key");
        let salt: [u8; 16] = rand::random();
        let iv16: [u8; 16] = rand::random();
        let iv8: [u8; 8] = rand::random();
        let params = match cipher {
            KeyCipher::Aes256Cbc => pbes2::Parameters::pbkdf2_sha256_aes256cbc(2048, &salt, &iv16).expect("params"),
            KeyCipher::DesEde3Cbc => pbes2::Parameters {
                kdf: pbes2::Pbkdf2Params {
                    salt: &salt,
                    iteration_count: 2048,
                    key_length: None,
                    prf: pbes2::Pbkdf2Prf::HmacWithSha256,
                }
                .into(),
                encryption: pbes2::EncryptionScheme::DesEde3Cbc { iv: &iv8 },
            },
        };
        let doc = info.encrypt_with_params(params, passphrase).expect("encryption");
        doc.to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF).expect("PEM").to_string()
    }

    /// `-----BEGIN ENCRYPTED PRIVATE KEY-----` under `passphrase`, AES-256-CBC with the key
    /// derived by `kdf` (derived here, so keep its cost modest).
    pub fn encrypted_private_key_pem_with(&self, passphrase: &str, kdf: KeyDerivation) -> String {
        let info = pkcs8::PrivateKeyInfo::from_der(&self.pkcs8_der).expect("own key");
        let salt: [u8; 16] = rand::random();
        let iv: [u8; 16] = rand::random();
        let doc = info.encrypt_with_params(kdf.parameters(&salt, &iv), passphrase).expect("encryption");
        doc.to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF).expect("PEM").to_string()
    }

    /// The public key's DER `SubjectPublicKeyInfo`, base64 — what `ALTER USER … SET
    /// RSA_PUBLIC_KEY = '…'` takes.
    pub fn rsa_public_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.spki_der)
    }

    /// `SHA256:<base64>`, as `DESCRIBE USER` shows in `RSA_PUBLIC_KEY_FP`.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.spki_der)
    }
}

/// `SHA256:` and the standard base64 of the SHA-256 of a DER public key.
pub fn fingerprint_of(spki_der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

/// A PEM block with 64-character lines.
pub fn pem_block(label: &str, base64_body: &str) -> String {
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in base64_body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
