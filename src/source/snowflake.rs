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
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::private_key::{self, KeySource, SigningKey};
use super::warehouse::{
    self, ColumnType, CompactRows, Failure, Next, Page, PageLimit, Progress, Protocol, Reading, ResultSet,
};
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
    /// The JWT requests carry, minted anew before it gets old.
    jwt: Mutex<Option<Jwt>>,
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
pub(crate) struct Answer {
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

/// What a 200 or 202 answer means for the read.
enum Answered {
    /// 200: the body (a result set, or a partition's rows).
    Done(Vec<u8>),
    /// 202 (or 429 while polling): the statement runs on under this handle.
    Running(Option<String>),
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

/// What a result set promises: each partition's row count and their sum; and what was read.
pub(crate) struct Partitions {
    counts: Vec<u64>,
    total: u64,
    /// The partition the next page is.
    next: usize,
    read: u64,
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
        let (user, SigningKey { key, fingerprint }) = user_and_key(spec, ctx, &credentials_from, &config).await?;
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
            jwt: Mutex::new(None),
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

    /// The current JWT: minted anew when there is none, it is getting old, or `fresh`.
    fn jwt(&self, fresh: bool) -> Result<SecretString, SourceError> {
        let mut jwt = self.jwt.lock().expect("not poisoned");
        match jwt.as_ref() {
            Some(current) if !fresh && current.minted.elapsed() <= JWT_RENEW_AFTER => Ok(current.token.clone()),
            _ => {
                let token = mint_jwt(&self.key, &self.subject, &self.fingerprint).map_err(|e| SourceError::Config {
                    what: self.what.clone(),
                    message: format!("cannot sign the JWT: {e}"),
                })?;
                *jwt = Some(Jwt { token: token.clone(), minted: Instant::now() });
                Ok(token)
            }
        }
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

    fn prepare(&self, method: Method, url: Url, body: bool) -> Result<reqwest::RequestBuilder, SourceError> {
        let jwt = self.jwt(false)?;
        let request = self
            .client
            .request(method, url)
            .map_err(|denied| SourceError::EgressDenied { what: self.what.clone(), denied })?;
        let mut request = request
            .bearer_auth(jwt.expose())
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

    /// One request and what its answer means; the body of a 200 is read under the partition
    /// cap, any other for its handle or message only.
    async fn exchange(&self, call: Call, method: Method, url: Url, body: bool) -> Result<Answered, Failure> {
        let sent = self.prepare(method, url, body)?.send().await;
        let response = sent.map_err(|e| match warehouse::transport(&self.what, &e) {
            Ok(detail) => Failure::transient(format!("{} failed: {detail}", call.part())),
            Err(denied) => Failure::Fatal(denied),
        })?;
        let status = response.status();
        let hint = warehouse::retry_after(&response);
        if status == StatusCode::OK {
            return Ok(Answered::Done(self.read_page(&call.part(), response).await?));
        }
        let body = warehouse::read_error_body(response, ERROR_BODY_WAIT).await;
        let answer = || serde_json::from_slice::<Answer>(&body).unwrap_or_default();
        let detail = || self.said(status, &answer());
        match (status, call) {
            (StatusCode::ACCEPTED, Call::Submit | Call::Poll) => Ok(Answered::Running(answer().statement_handle)),
            (StatusCode::TOO_MANY_REQUESTS, Call::Poll) => Ok(Answered::Running(None)),
            (StatusCode::UNAUTHORIZED, _) => Err(Failure::Unauthorized(self.auth_failed(detail()))),
            (StatusCode::FORBIDDEN, _) => Err(Failure::Fatal(SourceError::Permission {
                what: self.what.clone(),
                detail: detail(),
                fix: "Snowflake refused the SQL API for this user (the API is not enabled, or a network policy \
                      blocks it); ask the account administrator"
                    .to_owned(),
            })),
            (StatusCode::REQUEST_TIMEOUT, _) => Err(Failure::Fatal(self.timeout())),
            (StatusCode::UNPROCESSABLE_ENTITY, _) => Err(Failure::Fatal(self.query_failed(answer()))),
            (s, _) if matches!(s.as_u16(), 429 | 500 | 502 | 503 | 504) => Err(Failure::retry_after(detail(), hint)),
            _ => Err(Failure::Fatal(SourceError::Query {
                what: self.what.clone(),
                message: format!("the SQL API refused the request ({})", detail()),
            })),
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

    /// A result set's answer (partition 0, with the metadata).
    fn answer(&self, body: &[u8]) -> Result<Answer, SourceError> {
        serde_json::from_slice(body).map_err(|e| self.malformed("partition 0", warehouse::json_error(&e)))
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

    /// Checks a finished result set: its partitions, their row counts and sum.
    fn plan<'a>(&self, answer: &'a Answer) -> Result<(&'a MetaData, Partitions), SourceError> {
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
        Ok((meta, Partitions { counts, total, next: 0, read: 0 }))
    }
}

/// The user and the signing key from the credentials Secret.
async fn user_and_key(
    spec: &SnowflakeSource,
    ctx: &impl SourceContext,
    credentials_from: &str,
    config: &impl Fn(String) -> SourceError,
) -> Result<(String, SigningKey), SourceError> {
    let c = &spec.credentials;
    let user = ctx.secret_value(&c.secret_name, &c.user_key).await?;
    let private_key = ctx.secret_value(&c.secret_name, &c.private_key_key).await?;
    let passphrase = match &c.private_key_passphrase_key {
        Some(key) => Some(ctx.secret_value(&c.secret_name, key).await?),
        None => None,
    };
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
    let key = private_key::signing_key(&from, private_key.expose(), passphrase.as_ref().map(SecretString::expose))
        .await
        .map_err(|m| config(format!("key {} of {credentials_from}: {m}", c.private_key_key)))?;
    Ok((user, key))
}

/// Snowflake's SQL API v2: `POST /api/v2/statements` (async, with a `requestId`), `GET` the
/// handle until 200, partitions 1..P−1 by `?partition=N`, `POST …/cancel`.
impl Protocol for SnowflakeMembers {
    type Handle = String;
    type Finished = Answer;
    /// A partition's number.
    type Cursor = usize;
    type PageInfo = ();
    type Ledger = Partitions;
    type Rows = CompactRows;

    const FORMAT: &'static str = FORMAT;

    fn reading(&self) -> Reading<'_> {
        let statement_timeout = self.statement_timeout;
        Reading { what: &self.what, fields: &self.fields, statement_timeout, page_limit: self.page_limit }
    }

    async fn submit(&self, request_id: &str, resend: bool) -> Result<(String, Progress<Answer>), Failure> {
        let mut url = self.url(None, None);
        url.query_pairs_mut().append_pair("requestId", request_id).append_pair("async", "true");
        if resend {
            // The same requestId with retry=true: Snowflake does not run it twice.
            url.query_pairs_mut().append_pair("retry", "true");
        }
        match self.exchange(Call::Submit, Method::POST, url, true).await? {
            Answered::Done(body) => {
                let answer = self.answer(&body)?;
                Ok((answer.statement_handle.clone().unwrap_or_default(), Progress::Finished(answer)))
            }
            Answered::Running(Some(handle)) => Ok((handle, Progress::Running)),
            Answered::Running(None) => {
                Err(Failure::Fatal(self.malformed("a 202 answer", "no statementHandle to poll".to_owned())))
            }
        }
    }

    async fn poll(&self, handle: &String) -> Result<Progress<Answer>, Failure> {
        match self.exchange(Call::Poll, Method::GET, self.url(Some(handle), None), false).await? {
            Answered::Done(body) => Ok(Progress::Finished(self.answer(&body)?)),
            Answered::Running(_) => Ok(Progress::Running),
        }
    }

    fn result(&self, mut answer: Answer) -> Result<ResultSet<Self>, SourceError> {
        let (meta, ledger) = self.plan(&answer)?;
        let columns = meta.row_type.iter().map(|c| (c.name.clone(), column_type(c))).collect();
        let rows = std::mem::take(&mut answer.data);
        let first = Page { rows, part: "partition 0".to_owned(), info: () };
        Ok(ResultSet { columns, ledger, first: Next::Page(first) })
    }

    async fn page(&self, handle: &String, n: &usize) -> Result<Page<Self>, Failure> {
        if handle.is_empty() {
            let message = "no statementHandle to fetch further partitions with".to_owned();
            return Err(Failure::Fatal(self.malformed("partition 0", message)));
        }
        let part = format!("partition {n}");
        let mut url = self.url(Some(handle), None);
        url.query_pairs_mut().append_pair("partition", &n.to_string());
        match self.exchange(Call::Partition(*n), Method::GET, url, false).await? {
            Answered::Done(body) => {
                let rows = partition_rows(&body).map_err(|e| self.malformed(&part, warehouse::json_error(&e)))?;
                Ok(Page { rows, part, info: () })
            }
            Answered::Running(_) => Err(Failure::Fatal(self.malformed(&part, "the partition answered 202".to_owned()))),
        }
    }

    fn tally(&self, ledger: &mut Partitions, page: &Page<Self>) -> Result<Option<usize>, SourceError> {
        let n = ledger.next;
        self.check_count(&page.part, page.rows.len(), ledger.counts[n])?;
        ledger.read += page.rows.len() as u64;
        ledger.next = n + 1;
        Ok((ledger.next < ledger.counts.len()).then_some(ledger.next))
    }

    fn settle(&self, ledger: Partitions) -> Result<(), SourceError> {
        if ledger.read != ledger.total {
            let message = format!("{} rows read where numRows is {}", ledger.read, ledger.total);
            return Err(self.malformed("the result", message));
        }
        Ok(())
    }

    fn cancel(&self, handle: &String) -> Option<reqwest::RequestBuilder> {
        if handle.is_empty() {
            return None;
        }
        self.prepare(Method::POST, self.url(Some(handle), Some("cancel")), false).ok()
    }

    async fn reauthenticate(&self, _refused: SourceError) -> Result<(), SourceError> {
        self.jwt(true).map(drop)
    }
}

impl MemberSource for SnowflakeMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        warehouse::read(self)
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
