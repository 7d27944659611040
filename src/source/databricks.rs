//! `databricks`: a user-written `SELECT` on a Databricks SQL warehouse through the SQL
//! Statement Execution API 2.0.
//!
//! 1. Authentication: a personal access token, or OAuth machine-to-machine — the service
//!    principal's client id and secret exchanged at `<host>/oidc/v1/token` (HTTP Basic,
//!    `grant_type=client_credentials&scope=all-apis`); the token is cached and fetched anew
//!    before it expires, and once more when the workspace answers 401.
//! 2. `POST /api/2.0/sql/statements` with `warehouse_id`, `catalog`/`schema`,
//!    `wait_timeout: "0s"` (the id at once, so an abandoned read can cancel it),
//!    `on_wait_timeout: CONTINUE`, `format: JSON_ARRAY` and the
//!    spec's `disposition` (`EXTERNAL_LINKS` by default: results of any size; `INLINE` caps
//!    them at 25 MiB). The API runs exactly one statement per request.
//! 3. `PENDING`/`RUNNING` → poll `GET /api/2.0/sql/statements/{id}` until a terminal state.
//!    A SQL error is HTTP 200 with `FAILED`; `CANCELED` and `CLOSED` are errors too.
//! 4. `SUCCEEDED`: refused if `manifest.truncated`; then chunk after chunk, following
//!    `next_chunk_internal_link` (or `next_chunk_index`), one chunk in memory at a time under
//!    `maxChunkBytes` and the operator's `--max-source-page-bytes`, kept as
//!    [`CompactRows`] and mapped a batch at a time (an error answer is read for 4 KiB at most). External links are fetched **without** the Authorization header (with
//!    only the headers the link names); an expired link is renewed through the chunk
//!    endpoint once. Chunk indexes must run 0..total_chunk_count−1, each chunk's
//!    `row_offset` equal the rows read so far, and the total equal `total_row_count`.
//! 5. 429 and 503 (and `TEMPORARILY_UNAVAILABLE`-style failures) are retried with backoff.
//!    Past `statementTimeoutSeconds`, or when the read is abandoned, the statement is
//!    cancelled (`POST …/cancel`).
//!
//! Tokens, client secrets and external links (signed URLs) never appear in messages or logs.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::warehouse::{
    self, Backoff, ColumnType, CompactRows, Failure, Next, Page, PageLimit, Progress, Protocol, Reading, ResultSet,
};
use super::{MemberSource, MemberStream, SourceContext, SourceError};
use crate::api::{DatabricksDisposition, DatabricksSource};
use crate::domain::identifiers::IdentifierFields;
use crate::domain::sql::SqlDialect;
use crate::net::{Credentials, HttpClient};
use crate::secret::{SecretString, error_chain};

const FORMAT: &str = "Databricks result";
/// Databricks' own workspace domains (AWS, Azure, GCP): their error messages are quoted
/// ([`warehouse::Quoting`]).
const VENDOR_DOMAINS: &[&str] = &["cloud.databricks.com", "azuredatabricks.net", "gcp.databricks.com"];
/// The statement call answers at once with the statement's id (then polled), so that an
/// abandoned read can always cancel what it started.
const WAIT_TIMEOUT: &str = "0s";
const READ_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for an error answer's first bytes: a body that trickles must not hold the run.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);
/// An OAuth token response is small; 1 MiB is far above any.
const TOKEN_BODY_LIMIT: PageLimit = PageLimit { bytes: 1 << 20, field: Some("maxChunkBytes") };
/// A cached OAuth token is replaced this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// How requests are authenticated.
enum Auth {
    Token(SecretString),
    OAuth { client_id: SecretString, client_secret: SecretString, token_url: Url },
}

/// An OAuth access token and when to stop using it.
#[derive(Clone)]
struct CachedToken {
    token: SecretString,
    refresh_at: Instant,
}

pub struct DatabricksMembers {
    what: String,
    host: Url,
    body: serde_json::Value,
    disposition: DatabricksDisposition,
    statement_timeout: Duration,
    /// A chunk's body: `maxChunkBytes`, never above the operator's ceiling.
    page_limit: PageLimit,
    fields: IdentifierFields,
    auth: Auth,
    auth_from: String,
    /// The current OAuth token (a cancel request takes it too).
    cached: Mutex<Option<CachedToken>>,
    client: HttpClient,
    /// What of the workspace's error answers may be quoted: messages only from Databricks'
    /// own domains.
    quoting: warehouse::Quoting,
    /// For external links: carries no credentials of ours.
    link_client: HttpClient,
}

impl fmt::Debug for DatabricksMembers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabricksMembers").field("what", &self.what).finish_non_exhaustive()
    }
}

// ---- wire shapes (Statement Execution API 2.0) ----

#[derive(Deserialize, Debug, Default)]
pub(crate) struct StatementResponse {
    statement_id: Option<String>,
    status: Option<Status>,
    manifest: Option<Manifest>,
    result: Option<ResultData>,
}

#[derive(Deserialize, Debug, Default)]
struct Status {
    state: Option<String>,
    error: Option<ServiceError>,
    sql_state: Option<String>,
}

/// An OAuth token endpoint's error answer (RFC 6749 §5.2); only `error`, a code, is shown.
#[derive(Deserialize, Debug, Default)]
struct OAuthError {
    error: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct ServiceError {
    error_code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize, Debug)]
struct Manifest {
    schema: Option<Schema>,
    total_chunk_count: Option<u64>,
    total_row_count: Option<u64>,
    #[serde(default)]
    truncated: bool,
}

#[derive(Deserialize, Debug)]
struct Schema {
    #[serde(default)]
    columns: Vec<ColumnInfo>,
}

#[derive(Deserialize, Debug)]
struct ColumnInfo {
    name: String,
    type_name: Option<String>,
    position: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
struct ResultData {
    chunk_index: Option<u64>,
    row_offset: Option<u64>,
    row_count: Option<u64>,
    data_array: Option<CompactRows>,
    next_chunk_index: Option<u64>,
    next_chunk_internal_link: Option<String>,
    #[serde(default)]
    external_links: Vec<ExternalLink>,
}

#[derive(Deserialize, Debug, Clone)]
struct ExternalLink {
    chunk_index: Option<u64>,
    row_offset: Option<u64>,
    row_count: Option<u64>,
    external_link: String,
    next_chunk_index: Option<u64>,
    next_chunk_internal_link: Option<String>,
    #[serde(default)]
    http_headers: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

fn column_type(type_name: &str) -> ColumnType {
    match type_name.to_ascii_uppercase().as_str() {
        "BYTE" | "TINYINT" | "SHORT" | "SMALLINT" | "INT" | "INTEGER" | "LONG" | "BIGINT" | "DECIMAL" => {
            ColumnType::Exact
        }
        "FLOAT" | "DOUBLE" | "REAL" => ColumnType::Float,
        "ARRAY" | "MAP" | "STRUCT" | "VARIANT" | "OBJECT" => ColumnType::Unsupported,
        _ => ColumnType::Text,
    }
}

/// Error codes the API uses for conditions that pass (a re-submission is our inference).
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "TEMPORARILY_UNAVAILABLE"
            | "SERVICE_UNDER_MAINTENANCE"
            | "WORKSPACE_TEMPORARILY_UNAVAILABLE"
            | "RESOURCE_EXHAUSTED"
    )
}

/// What a statement promises (chunks, rows) and what was read of it.
pub(crate) struct Chunks {
    /// The chunk the next page is.
    index: u64,
    read: u64,
    total_rows: Option<u64>,
    total_chunks: Option<u64>,
}

/// Where a chunk is: its index, the internal link the previous chunk named, or (chunk 0)
/// the external link the statement's answer gave.
pub(crate) struct ChunkCursor {
    index: u64,
    link: Option<String>,
    external: Option<ExternalLink>,
}

/// What a chunk says of itself and of the next one.
#[derive(Default)]
pub(crate) struct ChunkInfo {
    /// `false` for a statement's answer without a result: no chunk to count.
    present: bool,
    index: Option<u64>,
    row_offset: Option<u64>,
    row_count: Option<u64>,
    next_index: Option<u64>,
    next_link: Option<String>,
}

impl ChunkInfo {
    fn of(result: &ResultData) -> Self {
        ChunkInfo {
            present: true,
            index: result.chunk_index,
            row_offset: result.row_offset,
            row_count: result.row_count,
            next_index: result.next_chunk_index,
            next_link: result.next_chunk_internal_link.clone(),
        }
    }

    fn of_link(link: &ExternalLink) -> Self {
        ChunkInfo {
            present: true,
            index: link.chunk_index,
            row_offset: link.row_offset,
            row_count: link.row_count,
            next_index: link.next_chunk_index,
            next_link: link.next_chunk_internal_link.clone(),
        }
    }
}

impl DatabricksMembers {
    /// Reads the credentials and checks the host and the query.
    pub async fn open(
        spec: &DatabricksSource,
        fields: IdentifierFields,
        ctx: &impl SourceContext,
    ) -> Result<Self, SourceError> {
        let host = Url::parse(&spec.host).map_err(|e| SourceError::Config {
            what: "databricks query".to_owned(),
            message: format!("host is not a URL: {e}"),
        })?;
        let what = format!(
            "databricks query (workspace {}, warehouse {})",
            host.host_str().unwrap_or_default(),
            spec.warehouse_id
        );
        let config = |message: String| SourceError::Config { what: what.clone(), message };
        if !matches!(host.scheme(), "http" | "https") {
            return Err(config("host must start with https://".to_owned()));
        }
        let (auth, auth_from) = auth(spec, &host, &what, ctx).await?;
        let body = statement_body(spec, &what)?;
        let egress = ctx.egress();
        // A literal address in the URL is not resolved, so it is checked here.
        egress.check_url(&host).map_err(|denied| SourceError::EgressDenied { what: what.clone(), denied })?;
        // Result links are on cloud storage, not the workspace: a redirect is followed only
        // where the policy allows, and nothing of ours goes along.
        let link_client = HttpClient::builder(&egress)
            .follow_redirects(&host, Credentials::None)
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| config(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        Ok(DatabricksMembers {
            client: warehouse::http_client(&what, READ_TIMEOUT, &egress)?,
            quoting: warehouse::Quoting::of(&host, VENDOR_DOMAINS),
            link_client,
            host,
            body,
            disposition: spec.disposition,
            statement_timeout: Duration::from_secs(spec.statement_timeout_seconds.into()),
            page_limit: PageLimit::new("maxChunkBytes", spec.max_chunk_bytes, ctx.max_page_bytes()),
            fields,
            auth,
            auth_from,
            cached: Mutex::default(),
            what,
        })
    }

    fn secrets(&self) -> Vec<String> {
        let mut secrets = match &self.auth {
            Auth::Token(t) => vec![t.expose().to_owned()],
            Auth::OAuth { client_id, client_secret, .. } => {
                vec![client_id.expose().to_owned(), client_secret.expose().to_owned()]
            }
        };
        if let Some(c) = self.cached.lock().unwrap().as_ref() {
            secrets.push(c.token.expose().to_owned());
        }
        secrets
    }

    /// A message of an answer as it may be shown ([`warehouse::Quoting`]), keys redacted.
    fn quote(&self, message: &str) -> String {
        let secrets = self.secrets();
        self.quoting.message(message, &secrets.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn timeout(&self) -> SourceError {
        SourceError::Timeout { what: self.what.clone(), seconds: self.statement_timeout.as_secs() }
    }

    fn malformed(&self, location: &str, message: String) -> SourceError {
        SourceError::Malformed { what: self.what.clone(), format: FORMAT, location: location.to_owned(), message }
    }

    fn auth_failed(&self, detail: String) -> SourceError {
        let fix = match &self.auth {
            Auth::Token(_) => format!("check the personal access token in {} (expired or revoked?)", self.auth_from),
            Auth::OAuth { .. } => format!(
                "check the service principal's client id and secret in {} and that it may use this workspace",
                self.auth_from
            ),
        };
        SourceError::Auth { what: self.what.clone(), detail, fix }
    }

    /// The bearer token: the PAT, or a cached OAuth token fetched anew before it expires.
    async fn bearer(&self, force_new: bool) -> Result<SecretString, SourceError> {
        let Auth::OAuth { client_id, client_secret, token_url } = &self.auth else {
            let Auth::Token(token) = &self.auth else { unreachable!() };
            return Ok(token.clone());
        };
        if !force_new
            && let Some(cached) = self.cached.lock().unwrap().as_ref().filter(|c| Instant::now() < c.refresh_at)
        {
            return Ok(cached.token.clone());
        }
        let mut backoff = Backoff::transient();
        loop {
            let sent = self
                .client
                .post(token_url.clone())
                .map_err(|denied| SourceError::EgressDenied { what: self.what.clone(), denied })?
                .basic_auth(client_id.expose(), Some(client_secret.expose()))
                .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials&scope=all-apis")
                .send()
                .await;
            let (detail, hint) = match sent {
                Err(e) => (format!("token request failed: {}", warehouse::transport(&self.what, &e)?), None),
                Ok(response) => {
                    let status = response.status();
                    let hint = warehouse::retry_after(&response);
                    let body =
                        warehouse::read_body(&self.what, "the token response", TOKEN_BODY_LIMIT, response).await?;
                    if status.is_success() {
                        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                            self.malformed(
                                "the token response",
                                format!("no access_token: {}", warehouse::json_error(&e)),
                            )
                        })?;
                        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600));
                        let margin = TOKEN_REFRESH_MARGIN.min(lifetime / 2);
                        let token = SecretString::new(parsed.access_token);
                        let refresh_at = Instant::now() + lifetime - margin;
                        *self.cached.lock().unwrap() = Some(CachedToken { token: token.clone(), refresh_at });
                        return Ok(token);
                    }
                    let error: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
                    let code = error.error.as_deref().and_then(warehouse::code).map(|c| format!(" ({c})"));
                    let detail =
                        format!("token endpoint answered HTTP {}{}", status.as_u16(), code.unwrap_or_default());
                    if !matches!(status.as_u16(), 429 | 500..=599) {
                        return Err(self.auth_failed(detail));
                    }
                    (detail, hint)
                }
            };
            tokio::time::sleep(backoff.delay_or_unavailable(hint, &self.what, detail)?).await;
        }
    }

    /// `path` on the workspace. The workspace token goes with every request to it, so a
    /// link from an answer (`next_chunk_internal_link`) that leads anywhere else — an
    /// absolute URL, `//host/…` — is refused.
    fn url(&self, path: &str) -> Result<Url, SourceError> {
        let url =
            self.host.join(path).map_err(|e| self.malformed("a chunk link", format!("{path:?} is not a path: {e}")))?;
        if url.origin() != self.host.origin() {
            return Err(self.malformed(
                "a chunk link",
                "next_chunk_internal_link leads outside the workspace host; the workspace token is sent only \
                 to the workspace"
                    .to_owned(),
            ));
        }
        Ok(url)
    }

    /// One API request and what its answer means; the body of a 200 is read under the
    /// chunk cap, any other for its code and message only.
    async fn exchange(&self, method: Method, url: Url, body: bool, part: &str) -> Result<Vec<u8>, Failure> {
        let token = self.bearer(false).await?;
        let request = self
            .client
            .request(method, url)
            .map_err(|denied| SourceError::EgressDenied { what: self.what.clone(), denied })?
            .bearer_auth(token.expose());
        let request = if body { request.json(&self.body) } else { request };
        let response = request.send().await.map_err(|e| match warehouse::transport(&self.what, &e.without_url()) {
            Ok(detail) => Failure::transient(format!("{part} failed: {detail}")),
            Err(denied) => Failure::Fatal(denied),
        })?;
        let status = response.status();
        let hint = warehouse::retry_after(&response);
        if status == StatusCode::OK {
            return self.read_page(part, response).await;
        }
        let body = warehouse::read_error_body(response, ERROR_BODY_WAIT).await;
        let error: ServiceError = serde_json::from_slice(&body).unwrap_or_default();
        let code = error.error_code.as_deref().and_then(warehouse::code).unwrap_or_default();
        let detail =
            format!("HTTP {} {code}: {}", status.as_u16(), self.quote(error.message.as_deref().unwrap_or_default()));
        Err(match status.as_u16() {
            429 | 503 => Failure::retry_after(detail, hint),
            401 => Failure::Unauthorized(self.auth_failed(detail)),
            403 => Failure::Fatal(SourceError::Permission {
                what: self.what.clone(),
                detail,
                fix: format!(
                    "give the identity in {} CAN USE on the SQL warehouse and SELECT on the tables",
                    self.auth_from
                ),
            }),
            _ => Failure::Fatal(SourceError::Query {
                what: self.what.clone(),
                message: format!("the API refused the request ({detail})"),
            }),
        })
    }

    fn parse(&self, part: &str, body: &[u8]) -> Result<StatementResponse, SourceError> {
        serde_json::from_slice(body).map_err(|e| self.malformed(part, warehouse::json_error(&e)))
    }

    /// How the statement is doing, by its state.
    fn progress(&self, mut response: StatementResponse) -> Progress<StatementResponse> {
        let status = response.status.take().unwrap_or_default();
        match status.state.as_deref().unwrap_or_default() {
            "SUCCEEDED" => Progress::Finished(response),
            "PENDING" | "RUNNING" => Progress::Running,
            "FAILED" => {
                let error = status.error.unwrap_or_default();
                let code = error.error_code.unwrap_or_default();
                if transient_code(&code) {
                    return Progress::Interrupted(format!("{code}: {}", error.message.unwrap_or_default()));
                }
                Progress::Failed(self.failed(&code, error.message.unwrap_or_default(), status.sql_state))
            }
            "CANCELED" => Progress::Failed(SourceError::Query {
                what: self.what.clone(),
                message: "the statement was cancelled in the workspace before it finished".to_owned(),
            }),
            "CLOSED" => Progress::Failed(SourceError::Query {
                what: self.what.clone(),
                message: "the statement's result is no longer available (CLOSED); the next run reads it anew"
                    .to_owned(),
            }),
            other => Progress::Failed(self.malformed("the statement", format!("unknown state {other:?}"))),
        }
    }

    /// A `FAILED` statement, in the user's terms.
    fn failed(&self, code: &str, message: String, sql_state: Option<String>) -> SourceError {
        let permission = code == "PERMISSION_DENIED"
            || message.contains("PERMISSION_DENIED")
            || message.contains("INSUFFICIENT_PERMISSIONS")
            || sql_state.as_deref() == Some("42501");
        let inline = message.to_ascii_lowercase().contains("inline");
        let code = warehouse::code(code).unwrap_or("none");
        let sql_state = sql_state.as_deref().and_then(warehouse::code).map(str::to_owned);
        let message = self.quote(&message);
        if permission {
            return SourceError::Permission {
                what: self.what.clone(),
                detail: format!("{code}: {message}"),
                fix: format!("grant the identity in {} SELECT on what the query reads", self.auth_from),
            };
        }
        if code == "DEADLINE_EXCEEDED" {
            return self.timeout();
        }
        let mut text = format!("{code}: {message}");
        if let Some(state) = sql_state {
            text.push_str(&format!(" (SQLSTATE {state})"));
        }
        if self.disposition == DatabricksDisposition::Inline && inline {
            text.push_str("; results over 25 MiB need disposition: ExternalLinks");
        }
        SourceError::Query { what: self.what.clone(), message: text }
    }

    /// The rows of one external link, fetched without our credentials; `None` when the link
    /// has expired (links last 15 minutes).
    async fn link_rows(&self, link: &ExternalLink, part: &str) -> Result<Option<CompactRows>, Failure> {
        let url = Url::parse(&link.external_link)
            .map_err(|_| self.malformed(part, "the external link is not a URL".to_owned()))?;
        if url.scheme() != "https"
            && !url.host_str().is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]")
        {
            return Err(Failure::Fatal(self.malformed(part, "the external link is not https".to_owned())));
        }
        let mut request = self
            .link_client
            .get(url)
            .map_err(|denied| SourceError::EgressDenied { what: self.what.clone(), denied })?;
        for (name, value) in &link.http_headers {
            request = request.header(name, value);
        }
        // The error would quote the signed URL: leave it out.
        let response = request.send().await.map_err(|e| match warehouse::transport(&self.what, &e.without_url()) {
            Ok(detail) => Failure::transient(format!("{part}: fetching the external link failed: {detail}")),
            Err(denied) => Failure::Fatal(denied),
        })?;
        match response.status().as_u16() {
            200..=299 => {
                let body = self.read_page(part, response).await?;
                let rows = serde_json::from_slice(&body).map_err(|e| {
                    self.malformed(part, format!("the external link's body: {}", warehouse::json_error(&e)))
                })?;
                Ok(Some(rows))
            }
            401 | 403 | 404 => Ok(None),
            status => Err(Failure::transient(format!("{part}: the external link answered HTTP {status}"))),
        }
    }

    /// Chunk `index` through the chunk endpoint (or the internal link given).
    async fn chunk(&self, id: &str, index: u64, link: Option<&str>) -> Result<ResultData, Failure> {
        let path = link.map_or_else(|| format!("/api/2.0/sql/statements/{id}/result/chunks/{index}"), str::to_owned);
        let part = format!("chunk {index}");
        let body = self.exchange(Method::GET, self.url(&path)?, false, &part).await?;
        Ok(serde_json::from_slice(&body).map_err(|e| self.malformed(&part, warehouse::json_error(&e)))?)
    }

    /// One chunk's rows, from its inline data or its external link.
    async fn chunk_page(&self, id: &str, result: ResultData, index: u64) -> Result<Page<Self>, Failure> {
        let part = format!("chunk {index}");
        if self.disposition == DatabricksDisposition::Inline || result.external_links.is_empty() {
            let info = ChunkInfo::of(&result);
            // No data_array: a chunk without rows.
            return Ok(Page { rows: result.data_array.unwrap_or_default(), part, info });
        }
        let link = self.one_link(result.external_links, &part)?;
        self.link_page(id, link, index).await
    }

    fn one_link(&self, mut links: Vec<ExternalLink>, part: &str) -> Result<ExternalLink, SourceError> {
        if links.len() != 1 {
            return Err(
                self.malformed(part, format!("{} external links in one chunk answer; expected one", links.len()))
            );
        }
        Ok(links.remove(0))
    }

    /// The rows behind `link`; an expired link is renewed through the chunk endpoint once.
    async fn link_page(&self, id: &str, link: ExternalLink, index: u64) -> Result<Page<Self>, Failure> {
        let part = format!("chunk {index}");
        if let Some(rows) = self.link_rows(&link, &part).await? {
            return Ok(Page { rows, info: ChunkInfo::of_link(&link), part });
        }
        let fresh = self.chunk(id, link.chunk_index.unwrap_or(index), None).await?.external_links;
        let link = self
            .one_link(fresh, &part)
            .map_err(|_| self.malformed(&part, "no fresh external link for an expired one".to_owned()))?;
        let rows = self
            .link_rows(&link, &part)
            .await?
            .ok_or_else(|| self.malformed(&part, "the renewed external link was refused too".to_owned()))?;
        Ok(Page { rows, info: ChunkInfo::of_link(&link), part })
    }

    fn check_chunk(&self, page: &Page<Self>, expected: u64, read: u64) -> Result<(), SourceError> {
        let (chunk, rows) = (&page.info, page.rows.len() as u64);
        let bad = |message: String| Err(self.malformed(&page.part, message));
        if chunk.index.is_some_and(|i| i != expected) {
            return bad(format!("the answer is chunk {}", chunk.index.unwrap_or_default()));
        }
        if chunk.row_offset.is_some_and(|o| o != read) {
            return bad(format!(
                "row_offset is {} but {read} rows came before it",
                chunk.row_offset.unwrap_or_default()
            ));
        }
        if chunk.row_count.is_some_and(|c| c != rows) {
            return bad(format!(
                "{rows} rows where row_count promises {}; the answer was cut short, nothing is imported",
                chunk.row_count.unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// The result's columns in order; a truncated result is refused.
    fn columns(&self, manifest: &Manifest) -> Result<Vec<(String, ColumnType)>, SourceError> {
        if manifest.truncated {
            return Err(self.malformed(
                "the manifest",
                "the result is truncated (a row or byte limit of the warehouse); nothing is imported".to_owned(),
            ));
        }
        let mut columns: Vec<&ColumnInfo> =
            manifest.schema.as_ref().map(|s| s.columns.iter().collect()).unwrap_or_default();
        columns.sort_by_key(|c| c.position.unwrap_or(0));
        Ok(columns
            .into_iter()
            .map(|c| (c.name.clone(), column_type(c.type_name.as_deref().unwrap_or("STRING"))))
            .collect())
    }
}

/// The Statement Execution API 2.0: `POST /api/2.0/sql/statements` (`wait_timeout: 0s`),
/// `GET …/{id}` until a terminal state, chunks inline or behind external links,
/// `POST …/{id}/cancel`.
impl Protocol for DatabricksMembers {
    type Handle = String;
    type Finished = StatementResponse;
    type Cursor = ChunkCursor;
    type PageInfo = ChunkInfo;
    type Ledger = Chunks;
    type Rows = CompactRows;

    const FORMAT: &'static str = FORMAT;

    fn reading(&self) -> Reading<'_> {
        let statement_timeout = self.statement_timeout;
        Reading { what: &self.what, fields: &self.fields, statement_timeout, page_limit: self.page_limit }
    }

    /// A statement that failed with a passing error code is submitted again.
    fn resubmissions(&self) -> Backoff {
        Backoff::transient()
    }

    async fn submit(&self, _request_id: &str, _resend: bool) -> Result<(String, Progress<StatementResponse>), Failure> {
        let url = self.url("/api/2.0/sql/statements")?;
        let response = self.parse("the statement", &self.exchange(Method::POST, url, true, "the statement").await?)?;
        let id = response
            .statement_id
            .clone()
            .ok_or_else(|| self.malformed("the statement", "no statement_id".to_owned()))?;
        Ok((id, self.progress(response)))
    }

    async fn poll(&self, id: &String) -> Result<Progress<StatementResponse>, Failure> {
        let url = self.url(&format!("/api/2.0/sql/statements/{id}"))?;
        let body = self.exchange(Method::GET, url, false, "the statement status").await?;
        Ok(self.progress(self.parse("the statement", &body)?))
    }

    fn result(&self, response: StatementResponse) -> Result<ResultSet<Self>, SourceError> {
        let manifest = response.manifest.ok_or_else(|| self.malformed("the statement", "no manifest".to_owned()))?;
        let columns = self.columns(&manifest)?;
        let ledger = Chunks {
            index: 0,
            read: 0,
            total_rows: manifest.total_row_count,
            total_chunks: manifest.total_chunk_count,
        };
        let part = "chunk 0".to_owned();
        let first = match response.result {
            None => Next::Page(Page { rows: CompactRows::default(), part, info: ChunkInfo::default() }),
            Some(result) if self.disposition == DatabricksDisposition::Inline || result.external_links.is_empty() => {
                Next::Page(Page { info: ChunkInfo::of(&result), rows: result.data_array.unwrap_or_default(), part })
            }
            Some(result) => {
                let link = self.one_link(result.external_links, &part)?;
                Next::Fetch(ChunkCursor { index: 0, link: None, external: Some(link) })
            }
        };
        Ok(ResultSet { columns, ledger, first })
    }

    async fn page(&self, id: &String, cursor: &ChunkCursor) -> Result<Page<Self>, Failure> {
        if let Some(link) = &cursor.external {
            return self.link_page(id, link.clone(), cursor.index).await;
        }
        let result = self.chunk(id, cursor.index, cursor.link.as_deref()).await?;
        self.chunk_page(id, result, cursor.index).await
    }

    fn tally(&self, ledger: &mut Chunks, page: &Page<Self>) -> Result<Option<ChunkCursor>, SourceError> {
        if !page.info.present {
            return Ok(None);
        }
        self.check_chunk(page, ledger.index, ledger.read)?;
        ledger.read += page.rows.len() as u64;
        ledger.index += 1;
        let ChunkInfo { next_index, next_link, .. } = &page.info;
        if next_link.is_none() && next_index.is_none() {
            return Ok(None);
        }
        let next = next_index.unwrap_or(ledger.index);
        if next != ledger.index {
            let message = format!("the next chunk is {next}, not {}", ledger.index);
            return Err(self.malformed(&format!("chunk {}", ledger.index - 1), message));
        }
        Ok(Some(ChunkCursor { index: next, link: next_link.clone(), external: None }))
    }

    fn settle(&self, ledger: Chunks) -> Result<(), SourceError> {
        let Chunks { index, read, total_rows, total_chunks } = ledger;
        if total_chunks.is_some_and(|t| t != index && !(t == 0 && index <= 1 && read == 0)) {
            let message =
                format!("{index} chunks read where total_chunk_count is {}", total_chunks.unwrap_or_default());
            return Err(self.malformed("the result", message));
        }
        if total_rows.is_some_and(|t| t != read) {
            let message = format!("{read} rows read where total_row_count is {}", total_rows.unwrap_or_default());
            return Err(self.malformed("the result", message));
        }
        Ok(())
    }

    fn cancel(&self, id: &String) -> Option<reqwest::RequestBuilder> {
        let url = self.url(&format!("/api/2.0/sql/statements/{id}/cancel")).ok()?;
        let token = match &self.auth {
            Auth::Token(token) => token.clone(),
            Auth::OAuth { .. } => self.cached.lock().ok()?.as_ref()?.token.clone(),
        };
        Some(self.client.post(url).ok()?.bearer_auth(token.expose()))
    }

    async fn reauthenticate(&self, refused: SourceError) -> Result<(), SourceError> {
        match self.auth {
            Auth::Token(_) => Err(refused),
            Auth::OAuth { .. } => self.bearer(true).await.map(drop),
        }
    }
}

impl MemberSource for DatabricksMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        warehouse::read(self)
    }
}

/// The workspace token, or the OAuth client credentials (M2M) and their token URL, and where
/// they come from (for messages).
async fn auth(
    spec: &DatabricksSource,
    host: &Url,
    what: &str,
    ctx: &impl SourceContext,
) -> Result<(Auth, String), SourceError> {
    let ns = ctx.namespace();
    match (&spec.auth.token_secret_ref, &spec.auth.oauth) {
        (Some(r), None) => {
            let token = ctx.secret_value(&r.name, &r.key).await?;
            Ok((Auth::Token(token), format!("Secret {ns}/{} key {}", r.name, r.key)))
        }
        (None, Some(o)) => {
            let mut token_url = host.clone();
            token_url.set_path("/oidc/v1/token");
            let client_id = ctx.secret_value(&o.secret_name, &o.client_id_key).await?;
            let client_secret = ctx.secret_value(&o.secret_name, &o.client_secret_key).await?;
            Ok((Auth::OAuth { client_id, client_secret, token_url }, format!("Secret {ns}/{}", o.secret_name)))
        }
        _ => Err(SourceError::Config {
            what: what.to_owned(),
            message: "auth: set exactly one of tokenSecretRef and oauth".to_owned(),
        }),
    }
}

/// The body of the Statement Execution API's submit: the checked query and where and how
/// its result comes back.
fn statement_body(spec: &DatabricksSource, what: &str) -> Result<serde_json::Value, SourceError> {
    let statement = warehouse::checked_query(what, "databricks.query", &spec.query, SqlDialect::Databricks)?;
    let mut body = json!({
        "statement": statement,
        "warehouse_id": spec.warehouse_id,
        "wait_timeout": WAIT_TIMEOUT,
        "on_wait_timeout": "CONTINUE",
        "format": "JSON_ARRAY",
        "disposition": match spec.disposition {
            DatabricksDisposition::ExternalLinks => "EXTERNAL_LINKS",
            DatabricksDisposition::Inline => "INLINE",
        },
    });
    if let Some(catalog) = &spec.catalog {
        body["catalog"] = json!(catalog);
    }
    if let Some(schema) = &spec.schema {
        body["schema"] = json!(schema);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spark_types_map_to_exactness() {
        assert_eq!(column_type("BIGINT"), ColumnType::Exact);
        assert_eq!(column_type("decimal"), ColumnType::Exact);
        assert_eq!(column_type("DOUBLE"), ColumnType::Float);
        assert_eq!(column_type("STRING"), ColumnType::Text);
        assert_eq!(column_type("ARRAY"), ColumnType::Unsupported);
        assert!(transient_code("TEMPORARILY_UNAVAILABLE") && !transient_code("BAD_REQUEST"));
    }
}
