//! Access tokens for the BigQuery API: from a service-account key (the OAuth 2.0
//! JWT-bearer grant [G-SA]) or from the GCE/GKE metadata server (Workload Identity).
//!
//! The key path signs an RS256 assertion (`iss` = the key's `client_email`, `scope`, `aud`
//! = the key's `token_uri`, `iat`, `exp` = `iat` + 1 h — Google's maximum) with the key's
//! private key through `jsonwebtoken`, and trades it at `token_uri` for an access token.
//! The metadata path asks `http://{metadataServer}/computeMetadata/v1/instance/
//! service-accounts/default/token` with `Metadata-Flavor: Google`, and requires the same
//! header on the answer (as Google's libraries do), so an ordinary web server answering at
//! that address is not mistaken for it.
//!
//! Tokens are cached and replaced before they expire: at three quarters of their lifetime,
//! and at least a minute before the end. Neither the key, the assertion nor a token ever
//! reaches a message: the key's parse errors are serde's position-only ones, and servers'
//! answers are reduced to their OAuth `error` code and description.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::domain::validate::is_loopback;
use crate::net::HttpClient;
use crate::secret::{SecretString, error_chain, redact};
use crate::source::warehouse::read_body_bounded;
use crate::source::{REDACT_MIN_LEN, SourceError};

/// What BigQuery's `jobs.query` needs [BQ-JOB].
pub const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
/// Google's token endpoint, when a key does not name one.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// GCE/GKE's metadata server.
pub const DEFAULT_METADATA_SERVER: &str = "metadata.google.internal";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google accepts assertions valid for at most an hour.
const ASSERTION_LIFETIME_SECS: u64 = 3600;
/// Largest token answer read.
const MAX_TOKEN_BODY: u64 = 64 * 1024;

/// The fields of a service-account key file the grant needs.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    #[serde(default)]
    kind: String,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

/// A service-account key, parsed and ready to sign.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub token_uri: reqwest::Url,
    key_id: Option<String>,
    signing_key: jsonwebtoken::EncodingKey,
    /// The PEM text, to redact from any message that could echo it.
    pem: SecretString,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey").field("client_email", &self.client_email).finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Parses a key file. `from` names where it came from, for messages.
    pub fn parse(json: &SecretString, from: &str) -> Result<ServiceAccountKey, String> {
        let file: KeyFile = serde_json::from_str(json.expose()).map_err(|e| {
            // serde_json names a line and column, and a missing field's name; never content.
            format!("{from} does not hold a service-account key file (JSON with type, client_email, private_key): {e}")
        })?;
        if file.kind != "service_account" {
            return Err(format!(
                "{from} holds credentials of type {:?}, not a service-account key; create one with \
                 `gcloud iam service-accounts keys create`",
                file.kind.chars().take(40).collect::<String>()
            ));
        }
        if file.client_email.is_empty() || file.private_key.is_empty() {
            return Err(format!("{from}: the service-account key has no client_email or private_key"));
        }
        let signing_key = jsonwebtoken::EncodingKey::from_rsa_pem(file.private_key.as_bytes())
            .map_err(|_| format!("{from}: private_key is not an RSA private key in PEM form"))?;
        let token_uri = file.token_uri.as_deref().unwrap_or(GOOGLE_TOKEN_URI);
        let token_uri = reqwest::Url::parse(token_uri).map_err(|e| format!("{from}: token_uri is not a URL: {e}"))?;
        if !(token_uri.scheme() == "https" || (token_uri.scheme() == "http" && is_loopback(&token_uri))) {
            return Err(format!(
                "{from}: token_uri must be https:// (http:// only on loopback): the signed assertion is a credential"
            ));
        }
        Ok(ServiceAccountKey {
            client_email: file.client_email,
            token_uri,
            key_id: file.private_key_id,
            signing_key,
            pem: SecretString::new(file.private_key),
        })
    }

    /// The signed JWT-bearer assertion, valid from `now` (seconds since the epoch) for an hour.
    fn assertion(&self, now: u64) -> Result<SecretString, String> {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            scope: &'a str,
            aud: &'a str,
            iat: u64,
            exp: u64,
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = self.key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: self.token_uri.as_str(),
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.signing_key)
            .map(SecretString::new)
            .map_err(|e| format!("signing the token request failed: {e}"))
    }
}

/// Where access tokens come from.
#[derive(Debug)]
pub enum Credentials {
    Key {
        key: ServiceAccountKey,
        from: String,
    },
    /// `host[:port]` of the metadata server.
    Metadata {
        server: String,
    },
}

/// An access token and when to stop using it.
struct Token {
    value: SecretString,
    refresh_at: Instant,
}

/// The token endpoint's and metadata server's answer.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct OAuthError {
    #[serde(default)]
    error: String,
}

/// Why no token could be had. Messages never hold the key, assertion or token.
#[derive(Debug)]
pub enum TokenError {
    /// Worth another try (5xx, 429, a dropped connection).
    Transient(String),
    Fatal(String),
}

/// Credentials plus the cached token.
pub struct TokenSource {
    credentials: Credentials,
    cached: Mutex<Option<Token>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("credentials", &self.credentials).finish_non_exhaustive()
    }
}

impl TokenSource {
    pub fn new(credentials: Credentials) -> TokenSource {
        TokenSource { credentials, cached: Mutex::new(None) }
    }

    /// Secrets to take out of any text shown: the key, the current token.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Credentials::Key { key, .. } = &self.credentials {
            out.push(key.pem.expose().to_owned());
        }
        if let Ok(cached) = self.cached.try_lock()
            && let Some(t) = cached.as_ref()
        {
            out.push(t.value.expose().to_owned());
        }
        out
    }

    /// Where a refused token should send the user.
    pub fn hint(&self) -> String {
        match &self.credentials {
            Credentials::Key { key, from } => format!("the service account {} (key in {from})", key.client_email),
            Credentials::Metadata { server } => format!("the operator's Workload Identity (metadata server {server})"),
        }
    }

    /// A token valid for a while yet, fetched if the cached one is due for refresh. `what`
    /// names the source in the error.
    pub async fn token(&self, client: &HttpClient, what: &str) -> Result<SecretString, SourceError> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let token = self.fetch_with_retries(client, what).await?;
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// The cached token, if there is one and no one is fetching a new one: for a request
    /// that cannot wait (a cancel sent as a read is dropped).
    pub fn current(&self) -> Option<SecretString> {
        self.cached.try_lock().ok()?.as_ref().map(|t| t.value.clone())
    }

    /// Forgets the cached token (the API refused it).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch_with_retries(&self, client: &HttpClient, what: &str) -> Result<Token, SourceError> {
        let mut backoff = super::wire::retries();
        loop {
            let message = match self.fetch(client).await {
                Ok(token) => return Ok(token),
                Err(TokenError::Transient(m)) => match backoff.next_delay(None) {
                    Some(wait) => {
                        tracing::debug!("token request failed, retrying: {m}");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => m,
                },
                Err(TokenError::Fatal(m)) => m,
            };
            let secrets = self.secrets();
            let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
            return Err(SourceError::Connect {
                what: what.to_owned(),
                message: format!("authentication failed: {}", redact(&message, &secrets, REDACT_MIN_LEN)),
            });
        }
    }

    async fn fetch(&self, client: &HttpClient) -> Result<Token, TokenError> {
        let started = Instant::now();
        let response = match &self.credentials {
            Credentials::Key { key, from } => {
                let now = jiff::Timestamp::now().as_second().max(0) as u64;
                let assertion = key.assertion(now).map_err(TokenError::Fatal)?;
                let form = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", JWT_BEARER)
                    .append_pair("assertion", assertion.expose())
                    .finish();
                let sent = client
                    .post(key.token_uri.clone())
                    .map_err(|denied| TokenError::Fatal(denied.to_string()))?
                    .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form)
                    .send()
                    .await;
                let response = sent.map_err(|e| transport(&format!("the token endpoint {}", key.token_uri), &e))?;
                check_token_status(response, &format!("the token endpoint refused the key in {from}")).await?
            }
            Credentials::Metadata { server } => {
                let url = format!(
                    "http://{server}/computeMetadata/v1/instance/service-accounts/default/token?scopes={SCOPE}"
                );
                let url = reqwest::Url::parse(&url)
                    .map_err(|e| TokenError::Fatal(format!("metadataServer {server:?} is not host[:port]: {e}")))?;
                let sent = client
                    .get(url)
                    .map_err(|denied| TokenError::Fatal(denied.to_string()))?
                    .header("Metadata-Flavor", "Google")
                    .send()
                    .await;
                let response = sent.map_err(|e| match transport(&format!("the metadata server {server}"), &e) {
                    TokenError::Transient(m) => TokenError::Transient(format!(
                        "{m} (outside GKE/GCE, or without Workload Identity, set serviceAccountKeySecretRef)"
                    )),
                    fatal => fatal,
                })?;
                if response.headers().get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
                    return Err(TokenError::Fatal(format!(
                        "{server} answered without `Metadata-Flavor: Google`; it is not a GCE/GKE metadata server"
                    )));
                }
                check_token_status(response, &format!("the metadata server {server} gave no token")).await?
            }
        };
        token_from(response, started)
    }
}

/// `Ok` with the body of a 2xx answer; a classified error otherwise.
async fn check_token_status(response: reqwest::Response, refused: &str) -> Result<Vec<u8>, TokenError> {
    let status = response.status().as_u16();
    let body = read_body_bounded(response, MAX_TOKEN_BODY)
        .await
        .map_err(|_| TokenError::Transient(format!("{refused}: the answer (HTTP {status}) could not be read")))?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let e: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
    // Only the error code (RFC 6749 §5.2), never the endpoint's free text: the token
    // endpoint is named by a key a tenant supplies.
    let detail = crate::source::warehouse::code(&e.error).map(|code| format!(": {code}")).unwrap_or_default();
    let advice = match (status, e.error.as_str()) {
        (_, "invalid_grant") => "; check that the key is current (not deleted or rotated) and the clock is right",
        (_, "invalid_client" | "unauthorized_client") => "; the key or its service account is deleted or disabled",
        (404, _) => "; no service account is attached to this workload",
        (403, _) => "; the request was refused (is Workload Identity set up for this namespace?)",
        _ => "",
    };
    let message = format!("{refused} (HTTP {status}{detail}){advice}");
    if status == 429 || status >= 500 { Err(TokenError::Transient(message)) } else { Err(TokenError::Fatal(message)) }
}

fn token_from(body: Vec<u8>, started: Instant) -> Result<Token, TokenError> {
    let answer: TokenAnswer = serde_json::from_slice(&body)
        .map_err(|e| TokenError::Fatal(format!("the token {}", crate::source::warehouse::json_error(&e))))?;
    if answer.access_token.is_empty() {
        return Err(TokenError::Fatal("the token answer holds an empty access_token".to_owned()));
    }
    let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
    // Refresh at three quarters of the lifetime, and at least a minute before the end.
    let early = (lifetime / 4).min(Duration::from_secs(60));
    Ok(Token { value: SecretString::new(answer.access_token), refresh_at: started + lifetime.saturating_sub(early) })
}

fn transport(what: &str, e: &reqwest::Error) -> TokenError {
    if let Some(denied) = crate::net::egress::denied_in(e) {
        return TokenError::Fatal(format!("cannot reach {what}: {denied}"));
    }
    let text = if e.is_timeout() { "timed out".to_owned() } else { error_chain(e) };
    TokenError::Transient(format!("cannot reach {what}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_are_not_service_account_keys_are_named_without_content() {
        let from = "Secret ns/bq key key.json";
        let user = SecretString::new(
            r#"{"type":"authorized_user","client_id":"x","client_secret":"s3cr3t-value","refresh_token":"r"}"#,
        );
        let err = ServiceAccountKey::parse(&user, from).unwrap_err();
        assert!(err.contains("authorized_user") && !err.contains("s3cr3t"), "{err}");
        let garbage = SecretString::new("not json s3cr3t-value");
        let err = ServiceAccountKey::parse(&garbage, from).unwrap_err();
        assert!(err.contains(from) && !err.contains("s3cr3t"), "{err}");
        let bad_pem = SecretString::new(
            r#"{"type":"service_account","client_email":"a@p.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\ns3cr3t\n-----END PRIVATE KEY-----\n"}"#,
        );
        let err = ServiceAccountKey::parse(&bad_pem, from).unwrap_err();
        assert!(err.contains("private_key") && !err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        let started = Instant::now();
        let token = token_from(br#"{"access_token":"t","expires_in":3600}"#.to_vec(), started).unwrap();
        assert_eq!(token.refresh_at - started, Duration::from_secs(3540));
        let token = token_from(br#"{"access_token":"t","expires_in":8}"#.to_vec(), started).unwrap();
        assert_eq!(token.refresh_at - started, Duration::from_secs(6));
        assert!(token_from(br#"{"access_token":""}"#.to_vec(), started).is_err());
    }
}
