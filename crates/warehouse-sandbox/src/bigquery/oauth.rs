//! Google's OAuth 2.0 token endpoint for service accounts (the JWT-bearer grant) and the
//! GCE/GKE metadata server's token endpoint, as Google documents them
//! ("Using OAuth 2.0 for Server to Server Applications"; "Authenticate workloads").
//!
//! The token endpoint checks what Google checks: `grant_type` exactly
//! `urn:ietf:params:oauth:grant-type:jwt-bearer`; the assertion's RS256 signature against
//! the registered public key of its `iss` (base64url parts accepted padded or not); `aud`
//! equal to this endpoint's URL; a `scope` that covers BigQuery; `exp - iat` ≤ 1 h, `iat`
//! not in the future and `exp` not in the past (60 s of skew). Failures answer 400 with
//! Google's `{"error": …, "error_description": …}`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;

/// The grant type Google requires for a signed assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Clock skew tolerated on `iat` and `exp`.
const SKEW_SECS: i64 = 60;

/// base64url, with or without `=` padding.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A service account whose key the stand-in knows: its public half verifies assertions.
#[derive(Clone)]
pub struct RegisteredAccount {
    pub client_email: String,
    pub public_key: jsonwebtoken::DecodingKey,
}

/// A service account and its private key, made for tests, the demo and benchmarks.
#[derive(Clone)]
pub struct TestServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    /// PKCS#8 PEM, as in Google's key files.
    pub private_key_pem: String,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

impl std::fmt::Debug for TestServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServiceAccount").field("client_email", &self.client_email).finish_non_exhaustive()
    }
}

impl TestServiceAccount {
    /// A fresh 2048-bit RSA key for `client_email`.
    pub fn generate(client_email: &str) -> TestServiceAccount {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
        use aws_lc_rs::signature::KeyPair as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA key generation");
        let private: Pkcs8V1Der = pair.as_der().expect("PKCS#8 encoding");
        let public: PublicKeyX509Der = pair.public_key().as_der().expect("SPKI encoding");
        TestServiceAccount {
            client_email: client_email.to_owned(),
            private_key_id: format!("{:040x}", rand::random::<u128>()),
            private_key_pem: pem("PRIVATE KEY", private.as_ref()),
            public_key_pem: pem("PUBLIC KEY", public.as_ref()),
        }
    }

    /// The key file `gcloud iam service-accounts keys create` writes, with `token_uri`
    /// pointing at `token_uri`.
    pub fn key_json(&self, project_id: &str, token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })
        .to_string()
    }

    pub fn registered(&self) -> RegisteredAccount {
        RegisteredAccount {
            client_email: self.client_email.clone(),
            public_key: jsonwebtoken::DecodingKey::from_rsa_pem(self.public_key_pem.as_bytes())
                .expect("own public key"),
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> =
        body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// The form Google's token endpoint takes.
#[derive(Deserialize, Debug, Default)]
pub struct TokenForm {
    #[serde(default)]
    pub grant_type: String,
    #[serde(default)]
    pub assertion: String,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    aud: String,
    iat: Option<i64>,
    exp: Option<i64>,
}

/// A refusal: HTTP 400 with Google's `error` and `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantError {
    pub error: &'static str,
    pub description: String,
}

fn invalid_grant(description: impl Into<String>) -> GrantError {
    GrantError { error: "invalid_grant", description: description.into() }
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Checks a token request; `Ok` names the service account to issue a token to.
pub fn check_grant(
    form: &TokenForm,
    accounts: &HashMap<String, RegisteredAccount>,
    audience: &str,
    now: i64,
) -> Result<String, GrantError> {
    if form.grant_type != JWT_BEARER {
        return Err(GrantError {
            error: "unsupported_grant_type",
            description: format!("Invalid grant_type: {}", form.grant_type),
        });
    }
    let parts: Vec<&str> = form.assertion.split('.').collect();
    let [header, payload, signature] = parts[..] else { return Err(invalid_grant("Invalid JWT: not three segments")) };
    let header: Header = decode_json(header).ok_or_else(|| invalid_grant("Invalid JWT header"))?;
    if header.alg != "RS256" {
        return Err(invalid_grant(format!("Invalid JWT: alg {} is not RS256", header.alg)));
    }
    let claims: Claims = decode_json(payload).ok_or_else(|| invalid_grant("Invalid JWT payload"))?;
    let account = accounts.get(&claims.iss).ok_or_else(|| invalid_grant("Invalid grant: account not found"))?;
    let message = &form.assertion[..header_payload_len(&form.assertion)];
    let signed = jsonwebtoken::crypto::verify(
        signature.trim_end_matches('='),
        message.as_bytes(),
        &account.public_key,
        jsonwebtoken::Algorithm::RS256,
    );
    if !matches!(signed, Ok(true)) {
        return Err(invalid_grant("Invalid JWT Signature."));
    }
    if claims.aud != audience {
        return Err(invalid_grant("Invalid JWT: Failed audience check."));
    }
    let scopes: Vec<&str> = claims.scope.split(' ').collect();
    let covers = |s: &&str| s.ends_with("/auth/bigquery") || s.ends_with("/auth/cloud-platform");
    if !scopes.iter().any(covers) {
        return Err(GrantError {
            error: "invalid_scope",
            description: format!("scope {:?} does not cover BigQuery", claims.scope),
        });
    }
    let (Some(iat), Some(exp)) = (claims.iat, claims.exp) else {
        return Err(invalid_grant("Invalid JWT: iat and exp are required"));
    };
    if exp - iat > 3600 || iat > now + SKEW_SECS || exp < now - SKEW_SECS || exp <= iat {
        return Err(invalid_grant(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. \
             Check your iat and exp values in the JWT claim.",
        ));
    }
    Ok(account.client_email.clone())
}

/// Length of `header.payload`, the signed part.
fn header_payload_len(jwt: &str) -> usize {
    jwt.rfind('.').unwrap_or(0)
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    serde_json::from_slice(&B64.decode(part).ok()?).ok()
}

/// Issued access tokens and who holds them.
#[derive(Default)]
pub struct TokenStore {
    tokens: HashMap<String, (String, std::time::Instant)>,
}

/// Why a bearer token is not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum BearerError {
    Missing,
    Invalid,
}

impl TokenStore {
    pub fn issue(&mut self, identity: &str, lifetime: Duration) -> String {
        let token = format!("ya29.sandbox-{:032x}", rand::random::<u128>());
        self.tokens.insert(token.clone(), (identity.to_owned(), std::time::Instant::now() + lifetime));
        token
    }

    /// The identity behind an `Authorization` header value.
    pub fn check(&self, authorization: Option<&str>) -> Result<String, BearerError> {
        let token = authorization.and_then(|h| h.strip_prefix("Bearer ")).ok_or(BearerError::Missing)?;
        match self.tokens.get(token) {
            Some((identity, expires)) if std::time::Instant::now() < *expires => Ok(identity.clone()),
            _ => Err(BearerError::Invalid),
        }
    }

    /// Every token issued so far stops working (the "expired token" fault).
    pub fn expire_all(&mut self) {
        let now = std::time::Instant::now();
        for (_, expires) in self.tokens.values_mut() {
            *expires = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(account: &TestServiceAccount, claims: serde_json::Value, pad: bool) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key_pem.as_bytes()).unwrap();
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        let jwt = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        if !pad {
            return jwt;
        }
        // Re-encode with padding, as some clients send it, and sign that.
        let padded = |p: &str| base64::engine::general_purpose::URL_SAFE.encode(B64.decode(p).unwrap());
        let parts: Vec<&str> = jwt.split('.').collect();
        let message = format!("{}.{}", padded(parts[0]), padded(parts[1]));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::RS256).unwrap();
        format!("{message}.{}", padded(&sig))
    }

    #[test]
    fn assertions_are_checked_as_google_does() {
        let account = TestServiceAccount::generate("reader@p.iam.gserviceaccount.com");
        let other = TestServiceAccount::generate("reader@p.iam.gserviceaccount.com");
        let accounts: HashMap<_, _> = [(account.client_email.clone(), account.registered())].into();
        let aud = "http://127.0.0.1:1/token";
        let now = now_secs();
        let claims = |scope: &str, aud: &str, iat: i64, exp: i64| serde_json::json!({"iss": account.client_email, "scope": scope, "aud": aud, "iat": iat, "exp": exp});
        let form = |assertion: String| TokenForm { grant_type: JWT_BEARER.into(), assertion };
        let good = claims("https://www.googleapis.com/auth/bigquery", aud, now, now + 3600);
        for pad in [false, true] {
            assert_eq!(
                check_grant(&form(sign(&account, good.clone(), pad)), &accounts, aud, now).as_deref(),
                Ok(account.client_email.as_str())
            );
        }
        let refused = |assertion: String| check_grant(&form(assertion), &accounts, aud, now).unwrap_err();
        assert_eq!(refused(sign(&other, good.clone(), false)).description, "Invalid JWT Signature.");
        assert!(
            refused(sign(
                &account,
                claims("https://www.googleapis.com/auth/bigquery", "https://x/token", now, now + 60),
                false
            ))
            .description
            .contains("audience")
        );
        assert_eq!(
            refused(sign(
                &account,
                claims("https://www.googleapis.com/auth/devstorage.read_only", aud, now, now + 60),
                false
            ))
            .error,
            "invalid_scope"
        );
        assert!(
            refused(sign(&account, claims("https://www.googleapis.com/auth/bigquery", aud, now, now + 7200), false))
                .description
                .contains("short-lived")
        );
        assert!(
            refused(sign(
                &account,
                claims("https://www.googleapis.com/auth/bigquery", aud, now - 7200, now - 3600),
                false
            ))
            .description
            .contains("short-lived")
        );
        let wrong_grant = TokenForm { grant_type: "client_credentials".into(), assertion: sign(&account, good, false) };
        assert_eq!(check_grant(&wrong_grant, &accounts, aud, now).unwrap_err().error, "unsupported_grant_type");
    }

    #[test]
    fn tokens_expire() {
        let mut store = TokenStore::default();
        let t = store.issue("a", Duration::from_secs(60));
        assert_eq!(store.check(Some(&format!("Bearer {t}"))).as_deref(), Ok("a"));
        assert_eq!(store.check(None), Err(BearerError::Missing));
        store.expire_all();
        assert_eq!(store.check(Some(&format!("Bearer {t}"))), Err(BearerError::Invalid));
    }
}
