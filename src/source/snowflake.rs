//! `snowflake`: a user-written `SELECT` through Snowflake's SQL API v2.
//!
//! 1. Key-pair authentication: a JWT signed RS256 with the user's private key (PKCS#8 PEM,
//!    encrypted or not, or PKCS#1), claims exactly as Snowflake documents them:
//!    `iss = ACCOUNT.USER.SHA256:<fingerprint>` (standard base64 of the SHA-256 of the public
//!    key's DER `SubjectPublicKeyInfo`), `sub = ACCOUNT.USER`, `iat`, `exp` 59 minutes
//!    later (Snowflake caps a JWT at one hour), ACCOUNT without region and upper-cased. A JWT
//!    is re-minted before it gets old, and once when Snowflake answers 401.
//! 2. `POST /api/v2/statements?requestId=<uuid>&async=true` (the handle at once, so an
//!    abandoned read can always cancel what it started) with the statement, `timeout`, and the
//!    `warehouse`/`database`/`schema`/`role` fields (never `USE …`). Snowflake runs exactly
//!    one statement per request by default (`MULTI_STATEMENT_COUNT` = 1), so the statement
//!    cannot smuggle in a second one; the role should be read-only. A 500/502 or a lost
//!    connection resubmits with the same `requestId` and `retry=true`, so the statement
//!    never runs twice.
//! 3. 202 (running) → poll `GET /api/v2/statements/{handle}` (429 while polling means still
//!    running) until 200, then read partition 0 from that answer and partitions 1..P−1 with
//!    `?partition=N` (gzip bodies, rows only), one at a time, each under
//!    `maxPartitionBytes` and the operator's `--max-source-page-bytes`, kept as
//!    [`CompactRows`] and mapped a batch at a time (an error answer is read for 4 KiB at most). Every row count is checked against `partitionInfo` and the total
//!    against `numRows`: a short answer is an error, never a smaller cohort.
//! 4. Past `statementTimeoutSeconds` (Snowflake enforces it too, answering 408) and when a
//!    read is abandoned (the run's own timeout drops the stream), the statement is cancelled
//!    (`POST …/cancel`).
//!
//! An encrypted private key is decrypted within the operator's key-derivation ceilings, off
//! the async runtime and once per Secret value ([`super::private_key`]).
//!
//! The private key, its passphrase and every JWT stay out of messages, logs and `Debug`.

use std::fmt;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::private_key::{self, KeySource, SigningKey};
use super::warehouse::{self, Backoff, ColumnType, CompactRows, PageLimit, RowMapper};
use super::{MemberSource, MemberStream, SourceContext, SourceError};
use crate::api::SnowflakeSource;
use crate::domain::identifiers::IdentifierFields;
use crate::domain::sql::SqlDialect;
use crate::net::HttpClient;
use crate::secret::SecretString;

/// How long a JWT is valid (Snowflake caps it at one hour), and when a new one is minted.
const JWT_LIFETIME: Duration = Duration::from_secs(59 * 60);
const JWT_RENEW_AFTER: Duration = Duration::from_secs(50 * 60);
/// Above any wait Snowflake takes to answer (a synchronous request may take 45 s).
const READ_TIMEOUT: Duration = Duration::from_secs(90);
const FORMAT: &str = "Snowflake result";
/// Snowflake's own API domains: their error messages are quoted ([`warehouse::Quoting`]).
const VENDOR_DOMAINS: &[&str] = &["snowflakecomputing.com", "snowflakecomputing.cn"];
/// `code` of a result too large to return whole.
const CODE_TOO_LARGE: &str = "391908";
const TOKEN_TYPE_HEADER: &str = "X-Snowflake-Authorization-Token-Type";
/// Longest wait for an error answer's first bytes: a body that trickles must not hold the run.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);

/// The statement request body.
#[derive(Serialize, Clone, Debug)]
struct StatementBody {
    statement: String,
    timeout: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    warehouse: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// A JWT and when it was minted.
struct Jwt {
    token: SecretString,
    minted: Instant,
}

pub struct SnowflakeMembers {
    what: String,
    base: Url,
    /// `ACCOUNT.USER`, the JWT's `sub`.
    subject: String,
    /// `SHA256:<base64>` of the public key.
    fingerprint: String,
    key: EncodingKey,
    /// Where the credentials come from, for messages.
    credentials_from: String,
    body: StatementBody,
    statement_timeout: Duration,
    /// A partition's body: `maxPartitionBytes`, never above the operator's ceiling.
    page_limit: PageLimit,
    fields: IdentifierFields,
    client: HttpClient,
    /// What of Snowflake's error answers may be quoted: its messages only from its own domain.
    quoting: warehouse::Quoting,
}

impl fmt::Debug for SnowflakeMembers {
    /// Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnowflakeMembers")
            .field("what", &self.what)
            .field("subject", &self.subject)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The account as the JWT names it: upper-case, without region or cloud (`xy12345.us-east-2.aws`
/// → `XY12345`; `myorg-myaccount` stays whole). Like Snowflake's own connectors: cut at the
/// first `.`, or at the first `-` for a `.global` account.
pub fn jwt_account(account: &str) -> String {
    let account = account.trim();
    let cut = if account.contains(".global") { account.split('-').next() } else { account.split('.').next() };
    cut.unwrap_or(account).to_uppercase()
}

/// A key-pair JWT as Snowflake documents it, valid for [`JWT_LIFETIME`] from now.
fn mint_jwt(key: &EncodingKey, subject: &str, fingerprint: &str) -> Result<SecretString, jsonwebtoken::errors::Error> {
    let now = jiff::Timestamp::now().as_second().max(0) as u64;
    let issuer = format!("{subject}.{fingerprint}");
    let claims = Claims { iss: &issuer, sub: subject, iat: now, exp: now + JWT_LIFETIME.as_secs() };
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key).map(SecretString::new)
}

// ---- wire shapes (Snowflake SQL API v2 reference) ----

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct Answer {
    code: Option<String>,
    message: Option<String>,
    sql_state: Option<String>,
    statement_handle: Option<String>,
    statement_handles: Option<Vec<String>>,
    result_set_meta_data: Option<MetaData>,
    #[serde(default)]
    data: CompactRows,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct MetaData {
    num_rows: Option<u64>,
    #[serde(default)]
    row_type: Vec<RowType>,
    #[serde(default)]
    partition_info: Vec<PartitionInfo>,
}

#[derive(Deserialize, Debug)]
struct RowType {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct PartitionInfo {
    row_count: u64,
}

/// A partition's body: rows only; `{"data": […]}` or the bare array (the reference does not
/// show one, so both are read). Told apart by the first byte, not by serde's `untagged`,
/// which would first copy the whole body into a tree of values.
#[derive(Deserialize)]
struct WrappedPartition {
    data: CompactRows,
}

fn partition_rows(body: &[u8]) -> Result<CompactRows, serde_json::Error> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        serde_json::from_slice(body)
    } else {
        serde_json::from_slice::<WrappedPartition>(body).map(|p| p.data)
    }
}

fn column_type(row_type: &RowType) -> ColumnType {
    // The reference writes types lower-case, the OpenAPI upper-case.
    match row_type.ty.to_ascii_lowercase().as_str() {
        "fixed" | "decfloat" | "number" => ColumnType::Exact,
        "real" | "float" | "double" => ColumnType::Float,
        "variant" => ColumnType::Json,
        "object" | "array" | "map" | "vector" | "geography" | "geometry" => ColumnType::Unsupported,
        _ => ColumnType::Text,
    }
}

/// What one response means for the read.
enum Step {
    /// 200: the body (a result set, or a partition's rows).
    Done(Vec<u8>),
    /// 202 (or 429 while polling): the statement runs on under this handle.
    Running(Option<String>),
    /// Worth sending again after a wait (429, 503, 504, 500/502, a lost connection).
    Retry { detail: String, hint: Option<Duration> },
    /// 401: a new JWT, then once more.
    Reauthenticate(String),
}

/// Which request a response answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Call {
    Submit,
    Poll,
    Partition(usize),
}

impl Call {
    fn part(self) -> String {
        match self {
            Call::Partition(n) => format!("partition {n}"),
            _ => "partition 0".to_owned(),
        }
    }
}

/// A statement Snowflake may still be running: cancelled when dropped unfinished (the read
/// was abandoned or failed), so no warehouse keeps working for nobody.
struct Running {
    client: HttpClient,
    cancel_url: Option<Url>,
    /// To mint the cancel request's JWT: the key, `sub` and fingerprint.
    key: EncodingKey,
    subject: String,
    fingerprint: String,
    what: String,
}

impl Running {
    fn finished(&mut self) {
        self.cancel_url = None;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(url) = self.cancel_url.take() else { return };
        let Ok(jwt) = mint_jwt(&self.key, &self.subject, &self.fingerprint) else { return };
        let Ok(request) = self.client.post(url) else { return };
        let request = request
            .bearer_auth(jwt.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .header(TOKEN_TYPE_HEADER, "KEYPAIR_JWT");
        warehouse::cancel_in_background(self.what.clone(), request);
    }
}

impl SnowflakeMembers {
    /// Reads the credentials Secret, parses the key and checks the query.
    pub async fn open(
        spec: &SnowflakeSource,
        fields: IdentifierFields,
        ctx: &impl SourceContext,
    ) -> Result<Self, SourceError> {
        let c = &spec.credentials;
        let credentials_from = format!("Secret {}/{}", ctx.namespace(), c.secret_name);
        let account = ctx.secret_value(&c.secret_name, &c.account_key).await?;
        let user = ctx.secret_value(&c.secret_name, &c.user_key).await?;
        let private_key = ctx.secret_value(&c.secret_name, &c.private_key_key).await?;
        let passphrase = match &c.private_key_passphrase_key {
            Some(key) => Some(ctx.secret_value(&c.secret_name, key).await?),
            None => None,
        };
        let account = account.expose().trim().to_owned();
        let what = format!("snowflake query (account {account}, credentials from {credentials_from})");
        let config = |message: String| SourceError::Config { what: what.clone(), message };
        if account.is_empty() || !account.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            return Err(config(format!(
                "key {} of {credentials_from} must hold an account identifier such as myorg-myaccount or \
                 xy12345.us-east-2.aws (letters, digits, '-', '_', '.')",
                c.account_key
            )));
        }
        let user = user.expose().trim().to_owned();
        if user.is_empty() {
            return Err(config(format!(
                "key {} of {credentials_from} is empty; put the Snowflake user name there",
                c.user_key
            )));
        }
        let from = KeySource {
            namespace: ctx.namespace().to_owned(),
            secret: c.secret_name.clone(),
            key: c.private_key_key.clone(),
        };
        let SigningKey { key, fingerprint } =
            private_key::signing_key(&from, private_key.expose(), passphrase.as_ref().map(SecretString::expose))
                .await
                .map_err(|m| config(format!("key {} of {credentials_from}: {m}", c.private_key_key)))?;
        let base = match &spec.endpoint {
            Some(endpoint) => Url::parse(endpoint).map_err(|e| config(format!("endpoint is not a URL: {e}")))?,
            None => Url::parse(&format!("https://{}.snowflakecomputing.com", account.to_ascii_lowercase()))
                .map_err(|e| config(format!("no URL can be made of the account identifier: {e}")))?,
        };
        let egress = ctx.egress();
        // A literal address in the URL is not resolved, so it is checked here.
        egress.check_url(&base).map_err(|denied| SourceError::EgressDenied { what: what.clone(), denied })?;
        let statement = warehouse::checked_query(&what, "snowflake.query", &spec.query, SqlDialect::Snowflake)?;
        Ok(SnowflakeMembers {
            subject: format!("{}.{}", jwt_account(&account), user.to_uppercase()),
            fingerprint,
            key,
            credentials_from,
            body: StatementBody {
                statement,
                timeout: spec.statement_timeout_seconds,
                warehouse: spec.warehouse.clone(),
                database: spec.database.clone(),
                schema: spec.schema.clone(),
                role: spec.role.clone(),
            },
            statement_timeout: Duration::from_secs(spec.statement_timeout_seconds.into()),
            page_limit: PageLimit::new("maxPartitionBytes", spec.max_partition_bytes, ctx.max_page_bytes()),
            client: warehouse::http_client(&what, READ_TIMEOUT, &egress)?,
            quoting: warehouse::Quoting::of(&base, VENDOR_DOMAINS),
            base,
            fields,
            what,
        })
    }

    /// The JWT's `sub` (`ACCOUNT.USER`) and the public key's fingerprint.
    pub fn identity(&self) -> (&str, &str) {
        (&self.subject, &self.fingerprint)
    }

    fn mint(&self) -> Result<Jwt, SourceError> {
        let token = mint_jwt(&self.key, &self.subject, &self.fingerprint).map_err(|e| SourceError::Config {
            what: self.what.clone(),
            message: format!("cannot sign the JWT: {e}"),
        })?;
        Ok(Jwt { token, minted: Instant::now() })
    }

    fn url(&self, handle: Option<&str>, tail: Option<&str>) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("http(s) URLs have paths");
            path.pop_if_empty().extend(["api", "v2", "statements"]);
            if let Some(h) = handle {
                path.push(h);
            }
            if let Some(t) = tail {
                path.push(t);
            }
        }
        url
    }

    fn prepare(&self, method: Method, url: Url, jwt: &Jwt, body: bool) -> Result<reqwest::RequestBuilder, SourceError> {
        let request = self
            .client
            .request(method, url)
            .map_err(|denied| SourceError::EgressDenied { what: self.what.clone(), denied })?;
        let mut request = request
            .bearer_auth(jwt.token.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .header(TOKEN_TYPE_HEADER, "KEYPAIR_JWT");
        if body {
            request = request.json(&self.body);
        }
        Ok(request)
    }

    fn timeout(&self) -> SourceError {
        SourceError::Timeout { what: self.what.clone(), seconds: self.statement_timeout.as_secs() }
    }

    fn malformed(&self, location: &str, message: String) -> SourceError {
        SourceError::Malformed { what: self.what.clone(), format: FORMAT, location: location.to_owned(), message }
    }

    /// What a response means; reads its body (under the partition cap).
    async fn step(&self, call: Call, response: reqwest::Response) -> Result<Step, SourceError> {
        let status = response.status();
        let hint = warehouse::retry_after(&response);
        // An answer other than 200 is read for its handle or message only.
        let body = if status == StatusCode::OK {
            warehouse::read_body(&self.what, &call.part(), self.page_limit, response).await?
        } else {
            warehouse::read_error_body(response, ERROR_BODY_WAIT).await
        };
        let answer = || serde_json::from_slice::<Answer>(&body).unwrap_or_default();
        let detail = || self.said(status, &answer());
        match (status, call) {
            (StatusCode::OK, _) => Ok(Step::Done(body)),
            (StatusCode::ACCEPTED, Call::Submit | Call::Poll) => Ok(Step::Running(answer().statement_handle)),
            (StatusCode::TOO_MANY_REQUESTS, Call::Poll) => Ok(Step::Running(None)),
            (StatusCode::UNAUTHORIZED, _) => Ok(Step::Reauthenticate(detail())),
            (StatusCode::FORBIDDEN, _) => Err(SourceError::Permission {
                what: self.what.clone(),
                detail: detail(),
                fix: "Snowflake refused the SQL API for this user (the API is not enabled, or a network policy \
                      blocks it); ask the account administrator"
                    .to_owned(),
            }),
            (StatusCode::REQUEST_TIMEOUT, _) => Err(self.timeout()),
            (StatusCode::UNPROCESSABLE_ENTITY, _) => Err(self.query_failed(answer())),
            (s, _) if matches!(s.as_u16(), 429 | 500 | 502 | 503 | 504) => Ok(Step::Retry { detail: detail(), hint }),
            _ => Err(SourceError::Query {
                what: self.what.clone(),
                message: format!("the SQL API refused the request ({})", detail()),
            }),
        }
    }

    /// What an error answer said, as it may be shown ([`warehouse::Quoting`]): the status,
    /// Snowflake's code and, from Snowflake's own domain, its message.
    fn said(&self, status: StatusCode, answer: &Answer) -> String {
        let mut said = format!("HTTP {}", status.as_u16());
        if let Some(code) = answer.code.as_deref().and_then(warehouse::code) {
            said.push_str(&format!(" (code {code})"));
        }
        if let Some(message) = &answer.message {
            said.push_str(&format!(": {}", self.quoting.message(message, &[])));
        }
        said
    }

    /// A 422: the statement failed. Access-control errors (`003001`, SQLSTATE 42501) say so.
    fn query_failed(&self, answer: Answer) -> SourceError {
        let code = answer.code.as_deref().and_then(warehouse::code).unwrap_or("none").to_owned();
        let state = answer.sql_state.as_deref().and_then(warehouse::code).unwrap_or("none").to_owned();
        let message = match &answer.message {
            Some(message) => self.quoting.message(message, &[]),
            None => "no message".to_owned(),
        };
        if code == "003001" || state == "42501" {
            return SourceError::Permission {
                what: self.what.clone(),
                detail: format!("{message} (code {code})"),
                fix: format!(
                    "grant the role the query runs as{} SELECT on what the query reads",
                    self.body.role.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                ),
            };
        }
        SourceError::Query { what: self.what.clone(), message: format!("{message} (code {code}, SQLSTATE {state})") }
    }

    fn auth_failed(&self, detail: String) -> SourceError {
        SourceError::Auth {
            what: self.what.clone(),
            detail,
            fix: format!(
                "check that {} holds the account and user ({}) and the private key whose public key is set with \
                 ALTER USER … SET RSA_PUBLIC_KEY (its fingerprint is {})",
                self.credentials_from, self.subject, self.fingerprint
            ),
        }
    }

    /// Sends one request until it gets an answer that is not transient: retries with backoff,
    /// re-mints the JWT once on 401, and gives up at the deadline.
    async fn exchange(
        &self,
        call: Call,
        jwt: &mut Jwt,
        deadline: Instant,
        mut request: impl FnMut(bool) -> (Method, Url, bool),
    ) -> Result<Step, SourceError> {
        let mut backoff = Backoff::transient();
        let mut reminted = false;
        let mut resend = false;
        loop {
            if jwt.minted.elapsed() > JWT_RENEW_AFTER {
                *jwt = self.mint()?;
            }
            let (method, url, body) = request(resend);
            let prepared = self.prepare(method, url, jwt, body)?;
            let sent = tokio::time::timeout_at(deadline, prepared.send()).await.map_err(|_| self.timeout())?;
            let (detail, hint) = match sent {
                Err(e) => (format!("{} failed: {}", call.part(), warehouse::transport(&self.what, &e)?), None),
                Ok(response) => match tokio::time::timeout_at(deadline, self.step(call, response))
                    .await
                    .map_err(|_| self.timeout())??
                {
                    Step::Retry { detail, hint } => (detail, hint),
                    Step::Reauthenticate(detail) if reminted => return Err(self.auth_failed(detail)),
                    Step::Reauthenticate(_) => {
                        reminted = true;
                        *jwt = self.mint()?;
                        continue;
                    }
                    other => return Ok(other),
                },
            };
            tracing::debug!(source = %self.what, call = ?call, "transient answer, retrying: {detail}");
            resend = true;
            let wait = backoff.delay_or_unavailable(hint, &self.what, detail)?;
            warehouse::sleep_within(wait, deadline, || self.timeout()).await?;
        }
    }

    /// Submits the statement and polls it to its result set (partition 0).
    async fn result_set(&self, jwt: &mut Jwt, running: &mut Running, deadline: Instant) -> Result<Answer, SourceError> {
        let request_id = warehouse::request_id();
        let submit = self.url(None, None);
        let step = self
            .exchange(Call::Submit, jwt, deadline, |resend| {
                let mut url = submit.clone();
                url.query_pairs_mut().append_pair("requestId", &request_id).append_pair("async", "true");
                if resend {
                    // The same requestId with retry=true: Snowflake does not run it twice.
                    url.query_pairs_mut().append_pair("retry", "true");
                }
                (Method::POST, url, true)
            })
            .await?;
        let mut handle: Option<String> = None;
        let mut step = step;
        let mut poll = warehouse::polling();
        loop {
            match step {
                Step::Done(body) => {
                    return serde_json::from_slice(&body)
                        .map_err(|e| self.malformed("partition 0", warehouse::json_error(&e)));
                }
                Step::Running(h) => {
                    if let Some(h) = h {
                        running.cancel_url = Some(self.url(Some(&h), Some("cancel")));
                        handle = Some(h);
                    }
                    let Some(h) = handle.clone() else {
                        return Err(self.malformed("a 202 answer", "no statementHandle to poll".to_owned()));
                    };
                    let wait = poll.next_delay(None).unwrap_or(Duration::from_secs(5));
                    warehouse::sleep_within(wait, deadline, || self.timeout()).await?;
                    let url = self.url(Some(&h), None);
                    step = self.exchange(Call::Poll, jwt, deadline, |_| (Method::GET, url.clone(), false)).await?;
                }
                Step::Retry { .. } | Step::Reauthenticate(_) => unreachable!("exchange resolves these"),
            }
        }
    }

    /// Partition `n` (1..P−1) of the finished statement.
    async fn partition(
        &self,
        handle: &str,
        n: usize,
        jwt: &mut Jwt,
        deadline: Instant,
    ) -> Result<CompactRows, SourceError> {
        let mut url = self.url(Some(handle), None);
        url.query_pairs_mut().append_pair("partition", &n.to_string());
        match self.exchange(Call::Partition(n), jwt, deadline, |_| (Method::GET, url.clone(), false)).await? {
            Step::Done(body) => {
                partition_rows(&body).map_err(|e| self.malformed(&format!("partition {n}"), warehouse::json_error(&e)))
            }
            _ => Err(self.malformed(&format!("partition {n}"), "the partition answered 202".to_owned())),
        }
    }

    fn check_count(&self, part: &str, got: usize, expected: u64) -> Result<(), SourceError> {
        if got as u64 != expected {
            return Err(self.malformed(
                part,
                format!(
                    "{got} rows where partitionInfo promises {expected}; the answer was cut short, nothing is imported"
                ),
            ));
        }
        Ok(())
    }

    /// Checks a finished result set and plans its columns.
    fn plan(&self, answer: &Answer) -> Result<(RowMapper, Vec<u64>, u64), SourceError> {
        if answer.code.as_deref() == Some(CODE_TOO_LARGE) {
            return Err(self.malformed(
                "partition 0",
                format!("Snowflake says the result is too large to return whole (code {CODE_TOO_LARGE})"),
            ));
        }
        if answer.statement_handles.is_some() {
            return Err(
                self.malformed("partition 0", "several statements ran; the query must be one SELECT".to_owned())
            );
        }
        let meta = answer
            .result_set_meta_data
            .as_ref()
            .ok_or_else(|| self.malformed("partition 0", "no resultSetMetaData".to_owned()))?;
        let columns = meta.row_type.iter().map(|c| (c.name.clone(), column_type(c))).collect();
        let mapper = RowMapper::new(&self.what, &self.fields, columns)?;
        let counts: Vec<u64> = if meta.partition_info.is_empty() {
            vec![answer.data.len() as u64]
        } else {
            meta.partition_info.iter().map(|p| p.row_count).collect()
        };
        let total: u64 = counts.iter().sum();
        if let Some(num_rows) = meta.num_rows
            && num_rows != total
        {
            return Err(self.malformed(
                "resultSetMetaData",
                format!("numRows is {num_rows} but the partitions hold {total} rows"),
            ));
        }
        Ok((mapper, counts, total))
    }
}

impl MemberSource for SnowflakeMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        Box::pin(async_stream::try_stream! {
            let deadline = Instant::now() + self.statement_timeout;
            let mut jwt = self.mint()?;
            let mut running = Running {
                client: self.client.clone(),
                cancel_url: None,
                key: self.key.clone(),
                subject: self.subject.clone(),
                fingerprint: self.fingerprint.clone(),
                what: self.what.clone(),
            };
            let answer = self.result_set(&mut jwt, &mut running, deadline).await;
            // Past the deadline the statement is cancelled (the guard does it on drop).
            let mut answer = answer?;
            running.finished();
            let (mapper, counts, total) = self.plan(&answer)?;
            let handle = answer.statement_handle.clone().unwrap_or_default();
            self.check_count("partition 0", answer.data.len(), counts[0])?;
            let first = std::mem::take(&mut answer.data);
            drop(answer);
            let mut read = first.len() as u64;
            for batch in mapper.batches(&self.what, FORMAT, "partition 0", &first)? {
                yield batch;
            }
            drop(first);
            for (n, &expected) in counts.iter().enumerate().skip(1) {
                if handle.is_empty() {
                    Err::<(), SourceError>(self.malformed("partition 0", "no statementHandle to fetch further partitions with".to_owned()))?;
                }
                let rows = self.partition(&handle, n, &mut jwt, deadline).await?;
                let part = format!("partition {n}");
                self.check_count(&part, rows.len(), expected)?;
                read += rows.len() as u64;
                for batch in mapper.batches(&self.what, FORMAT, &part, &rows)? {
                    yield batch;
                }
            }
            if read != total {
                Err::<(), SourceError>(self.malformed("the result", format!("{read} rows read where numRows is {total}")))?;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_lose_region_and_cloud_and_are_upper_case() {
        assert_eq!(jwt_account("myorg-myaccount"), "MYORG-MYACCOUNT");
        assert_eq!(jwt_account("xy12345.us-east-2.aws"), "XY12345");
        assert_eq!(jwt_account("xy12345.privatelink"), "XY12345");
        assert_eq!(jwt_account("myorg-acct.global"), "MYORG");
        assert_eq!(jwt_account(" my_org-my_acct "), "MY_ORG-MY_ACCT");
    }
}
