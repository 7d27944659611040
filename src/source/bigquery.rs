//! `bigquery`: a standard-SQL `SELECT` on Google BigQuery through its REST API.
//!
//! A read is one query job: `jobs.query` (with `useLegacySql: false`, `location`,
//! `maximumBytesBilled`, `maxResults`, a `requestId` so a resubmission after a lost answer
//! does not start a second job), then `jobs.getQueryResults` until `jobComplete`, then page
//! after page by `pageToken` until there is none. Only one page is held at a time, and a
//! page body larger than `maxPageBytes` stops the run. The read ends with every row
//! accounted for: rows read must equal `totalRows`, or the run fails — a result cut short
//! is never taken for a smaller cohort.
//!
//! Errors are classified by the body's `reason` before the HTTP status (BigQuery answers
//! 403 for rate limits and for missing permissions alike, see `wire`). Transient ones
//! (429, 5xx, `rateLimitExceeded`, `backendError`, a page cut off mid-body) are retried
//! ([`wire::retries`]: 6 attempts, 0.2 s doubling to 8 s); a job that keeps failing while
//! it runs is submitted again as a new job (BigQuery's advice for `backendError` jobs), 3
//! jobs at most. A refused access token is replaced once. `statementTimeoutSeconds` bounds
//! the whole read; past it, or when the read is abandoned, the job is cancelled.
//!
//! This file is BigQuery's wire protocol only ([`warehouse::Protocol`]); the read loop that
//! retries, cancels, meters pages and maps rows is [`warehouse::read`], the same for every
//! warehouse. Authentication and value conversion are in the submodules `auth` and
//! `values`; what else every warehouse source shares (the read-only statement check, column
//! plans, exact number text) is in [`super::warehouse`].

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

use self::auth::{Credentials, DEFAULT_METADATA_SERVER, ServiceAccountKey, TokenSource};
use self::values::ColumnKind;
use self::wire::{ApiError, ErrorClass, FormatOptions, JobReference, QueryRequest, QueryResponse, Row, Schema};
use super::warehouse::{
    self, Backoff, DEFAULT_MAX_PAGE_BYTES, Failure, Next, Page, PageLimit, PageRows, Progress, Protocol, Reading,
    ResultSet, Transient, checked_query,
};
use super::{MemberSource, MemberStream, REDACT_MIN_LEN, SourceContext, SourceError};
use crate::api::BigQuerySource;
use crate::domain::identifiers::{IdentifierFields, Value};
use crate::domain::validate::{SqlDialect, is_loopback};
use crate::net::HttpClient;
use crate::net::egress::{EgressDenied, EgressPolicy, EgressRule, denied_in};
use crate::secret::{error_chain, redact};

pub mod auth;
pub mod values;
pub mod wire;

/// How long `getQueryResults` asks BigQuery to wait for the job before answering.
const CALL_WAIT: Duration = Duration::from_secs(10);
/// How long `jobs.query` waits: short, so the job's reference (needed to cancel it on a
/// timeout) comes back soon even for a long query.
const QUERY_WAIT: Duration = Duration::from_secs(1);
/// Allowance on top of [`CALL_WAIT`] for the answer itself to arrive.
const CALL_MARGIN: Duration = Duration::from_secs(60);
/// Jobs submitted per read when one keeps failing while it runs.
const JOB_ATTEMPTS: u32 = 3;
/// Longest wait for an error answer's first bytes: a body that trickles must not hold the run.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);
/// Empty pages in a row tolerated before the pagination is taken to loop.
const MAX_EMPTY_PAGES: u32 = 1000;
const FORMAT: &str = "BigQuery answer";

pub struct BigQueryMembers {
    what: String,
    spec: BigQuerySource,
    endpoint: Url,
    fields: IdentifierFields,
    tokens: TokenSource,
    /// BigQuery's API, under the operator's egress policy.
    client: HttpClient,
    /// What of BigQuery's error answers may be quoted: messages only from googleapis.com.
    quoting: warehouse::Quoting,
    /// Where access tokens come from: the key's token endpoint or a `metadataServer` the
    /// spec names, under the egress policy; GKE's own metadata server (Workload Identity,
    /// the operator's credential, which the policy denies to sources by name) outside it.
    token_client: HttpClient,
    /// A page's body: `maxPageBytes`, never above the operator's ceiling.
    page_limit: PageLimit,
}

impl std::fmt::Debug for BigQueryMembers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigQueryMembers")
            .field("what", &self.what)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// One API call the read makes.
enum Call<'a> {
    /// `jobs.query`.
    Query { request_id: &'a str },
    /// `jobs.getQueryResults`, from the start or at a page token.
    Results { job: &'a JobReference, page_token: Option<&'a str> },
}

/// Why a call failed.
#[derive(Debug)]
enum CallError {
    /// An error answer from the API.
    Api(ApiError),
    /// The request or its answer did not get through.
    Transport(String),
    /// A 2xx body that is not the expected JSON (cut off, most likely).
    Malformed(String),
}

/// Where the next page is: its token, and its number (the first page is 1) for messages.
pub(crate) struct PageCursor {
    token: String,
    number: u64,
}

/// A BigQuery page's rows: `{"f":[{"v":…}]}`, each cell made text by its column's kind.
impl PageRows for Vec<Row> {
    type Kind = ColumnKind;

    fn len(&self) -> usize {
        self.len()
    }

    fn misfit(&self, width: usize) -> Option<(usize, usize)> {
        self.iter().enumerate().find(|(_, row)| row.f.len() != width).map(|(i, row)| (i, row.f.len()))
    }

    fn value(&self, row: usize, column: usize, kind: &ColumnKind) -> Value<'_> {
        kind.text(&self[row].f[column].v)
    }
}

/// A client under `egress`, following no redirect: one would carry the token.
fn http_client(egress: &Arc<EgressPolicy>) -> Result<HttpClient, String> {
    HttpClient::builder(egress).connect_timeout(Duration::from_secs(10)).build().map_err(|e| error_chain(&e))
}

/// GKE's metadata server, by name and by address.
fn metadata_server_rules() -> Vec<EgressRule> {
    [DEFAULT_METADATA_SERVER, "169.254.169.254"].iter().map(|r| r.parse().expect("a valid rule")).collect()
}

impl BigQueryMembers {
    /// Reads the key from its Secret (or picks the metadata server) and checks the spec.
    pub async fn open(
        spec: &BigQuerySource,
        fields: IdentifierFields,
        ctx: &impl SourceContext,
    ) -> Result<Self, SourceError> {
        let location = spec.location.as_deref().map(|l| format!(", location {l}")).unwrap_or_default();
        let (credentials, via) = match &spec.service_account_key_secret_ref {
            Some(r) => {
                let from = format!("Secret {}/{} key {}", ctx.namespace(), r.name, r.key);
                let json = ctx.secret_value(&r.name, &r.key).await?;
                let what = format!("bigquery query in project {}", spec.project_id);
                let key =
                    ServiceAccountKey::parse(&json, &from).map_err(|message| SourceError::Config { what, message })?;
                (Credentials::Key { key, from: from.clone() }, format!("key from {from}"))
            }
            None => {
                if !ctx.ambient_identity_allowed() {
                    return Err(SourceError::AmbientIdentityRefused {
                        what: format!("bigquery query in project {}{location}", spec.project_id),
                        namespace: ctx.namespace().to_owned(),
                        field: "bigquery.serviceAccountKeySecretRef",
                    });
                }
                let server = spec.metadata_server.clone().unwrap_or_else(|| DEFAULT_METADATA_SERVER.to_owned());
                (Credentials::Metadata { server }, "Workload Identity".to_owned())
            }
        };
        let what = format!("bigquery query in project {}{location} ({via})", spec.project_id);
        Self::under_policy(what, spec, fields, credentials, &ctx.egress())
            .map(|source| source.with_page_ceiling(ctx.max_page_bytes()))
    }

    /// No page body over `ceiling` bytes is read, whatever `maxPageBytes` says.
    pub fn with_page_ceiling(mut self, ceiling: u64) -> Self {
        self.page_limit = PageLimit::new("maxPageBytes", self.spec.max_page_bytes, ceiling);
        self
    }

    /// A source with credentials already resolved, under the default egress policy.
    pub fn new(
        what: String,
        spec: &BigQuerySource,
        fields: IdentifierFields,
        credentials: Credentials,
    ) -> Result<Self, SourceError> {
        Self::under_policy(what, spec, fields, credentials, &EgressPolicy::shared_default())
    }

    /// A source with credentials already resolved, connecting under `egress`.
    pub fn under_policy(
        what: String,
        spec: &BigQuerySource,
        fields: IdentifierFields,
        credentials: Credentials,
        egress: &Arc<EgressPolicy>,
    ) -> Result<Self, SourceError> {
        let config = |message: String| SourceError::Config { what: what.clone(), message };
        let mut spec = spec.clone();
        spec.query = checked_query(&what, "bigquery.query", &spec.query, SqlDialect::BigQuery)?;
        if spec.metadata_server.is_some() && spec.service_account_key_secret_ref.is_some() {
            return Err(config("set metadataServer only without serviceAccountKeySecretRef".to_owned()));
        }
        let endpoint = Url::parse(&spec.endpoint).map_err(|e| config(format!("endpoint is not a URL: {e}")))?;
        let google =
            endpoint.scheme() == "https" && endpoint.host_str().is_some_and(|h| h.ends_with(".googleapis.com"));
        if !google && !is_loopback(&endpoint) {
            // The token is a credential (with Workload Identity, the operator's own).
            return Err(config(
                "endpoint must be https://*.googleapis.com (or loopback, for a local stand-in)".to_owned(),
            ));
        }
        let denied = |denied| SourceError::EgressDenied { what: what.clone(), denied };
        egress.check_url(&endpoint).map_err(denied)?;
        let token_policy = match &credentials {
            // The operator's own identity ([`open`](Self::open) checked that this namespace
            // may use it): GKE's metadata server, which the policy denies to sources by
            // default, is allowed for this client alone — deny rules still win.
            Credentials::Metadata { server } if server == DEFAULT_METADATA_SERVER => {
                Arc::new(egress.as_ref().clone().with_allow(metadata_server_rules()))
            }
            Credentials::Metadata { server } => {
                let url = Url::parse(&format!("http://{server}/"))
                    .map_err(|e| config(format!("metadataServer is not host[:port]: {e}")))?;
                egress.check_url(&url).map_err(denied)?;
                egress.clone()
            }
            Credentials::Key { key, .. } => {
                egress.check_url(&key.token_uri).map_err(denied)?;
                egress.clone()
            }
        };
        let build = |policy| http_client(policy).map_err(|e| config(format!("cannot build the HTTP client: {e}")));
        let (client, token_client) = (build(egress)?, build(&token_policy)?);
        let tokens = TokenSource::new(credentials);
        let quoting = warehouse::Quoting::of(&endpoint, &["googleapis.com"]);
        let page_limit = PageLimit::new("maxPageBytes", spec.max_page_bytes, DEFAULT_MAX_PAGE_BYTES);
        Ok(BigQueryMembers { what, spec, endpoint, fields, tokens, client, quoting, token_client, page_limit })
    }

    fn location<'a>(&'a self, job: &'a JobReference) -> Option<&'a str> {
        job.location.as_deref().or(self.spec.location.as_deref())
    }

    /// `{endpoint}/bigquery/v2/projects/{project}/{segments…}`, each segment escaped.
    fn url(&self, project: &str, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .expect("checked to be http(s)")
            .pop_if_empty()
            .extend(["bigquery", "v2", "projects", project])
            .extend(segments);
        url
    }

    fn request(&self, call: &Call<'_>) -> Result<reqwest::RequestBuilder, EgressDenied> {
        let timeout = CALL_WAIT + CALL_MARGIN;
        Ok(match call {
            Call::Query { request_id } => {
                let body = QueryRequest {
                    query: &self.spec.query,
                    use_legacy_sql: false,
                    max_results: self.spec.page_size,
                    timeout_ms: QUERY_WAIT.as_millis() as u64,
                    location: self.spec.location.as_deref(),
                    maximum_bytes_billed: self.spec.maximum_bytes_billed.map(|n| n.to_string()),
                    request_id,
                    format_options: FormatOptions { use_int64_timestamp: true },
                };
                self.client.post(self.url(&self.spec.project_id, &["queries"]))?.json(&body).timeout(timeout)
            }
            Call::Results { job, page_token } => {
                let mut url = self.url(&job.project_id, &["queries", &job.job_id]);
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("maxResults", &self.spec.page_size.to_string())
                        .append_pair("timeoutMs", &CALL_WAIT.as_millis().to_string())
                        .append_pair("formatOptions.useInt64Timestamp", "true");
                    if let Some(location) = self.location(job) {
                        q.append_pair("location", location);
                    }
                    if let Some(token) = page_token {
                        q.append_pair("pageToken", token);
                    }
                }
                self.client.get(url)?.timeout(timeout)
            }
        })
    }

    /// One call: token, request, bounded body, status, JSON. `page` names the page asked
    /// for in messages (0: the job itself).
    async fn attempt(&self, call: &Call<'_>, page: u64) -> Result<QueryResponse, Failure> {
        let token = self.tokens.token(&self.token_client, &self.what).await?;
        let denied = |denied| SourceError::EgressDenied { what: self.what.clone(), denied };
        let request = self.request(call).map_err(denied)?;
        let response = request.bearer_auth(token.expose()).send().await.map_err(|e| match denied_in(&e) {
            Some(refused) => Failure::Fatal(denied(refused.clone())),
            None if e.is_timeout() => self.classified(CallError::Transport("timed out".to_owned()), page),
            None => self.classified(CallError::Transport(error_chain(&e.without_url())), page),
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            // An error answer is read for its reason and message only.
            let body = warehouse::read_error_body(response, ERROR_BODY_WAIT).await;
            return Err(self.classified(CallError::Api(ApiError::parse(status, &body)), page));
        }
        let part = if page == 0 { "the job's first answer".to_owned() } else { format!("page {page} of the result") };
        let body = self.read_page(&part, response).await?;
        serde_json::from_slice(&body)
            .map_err(|e| self.classified(CallError::Malformed(warehouse::json_error(&e)), page))
    }

    /// What a failed call means for the read: a refused token is replaced once, transient
    /// errors are retried (ending, when they keep on, as [`Self::failure`] says).
    fn classified(&self, e: CallError, page: u64) -> Failure {
        match &e {
            CallError::Api(api) if api.class() == ErrorClass::Unauthenticated => {
                Failure::Unauthorized(self.failure(e, page))
            }
            CallError::Api(api) if api.class() != ErrorClass::Transient => Failure::Fatal(self.failure(e, page)),
            _ => {
                let detail = self.redacted(&format!("{e:?}"));
                Failure::Transient(Transient { detail, hint: None, last: Some(Box::new(self.failure(e, page))) })
            }
        }
    }

    /// The columns and their kinds; a mapped REPEATED or RECORD column is refused.
    fn columns(&self, schema: &Schema) -> Result<Vec<(String, ColumnKind)>, SourceError> {
        let columns: Vec<(String, ColumnKind)> =
            schema.fields.iter().map(|f| (f.name.clone(), ColumnKind::of(f))).collect();
        for name in self.fields.field_names() {
            let unusable = columns.iter().find(|(n, _)| n == name).and_then(|(_, kind)| kind.unusable(name));
            if let Some(why) = unusable {
                return Err(SourceError::Config { what: self.what.clone(), message: why });
            }
        }
        Ok(columns)
    }

    fn malformed(&self, page: u64, message: &str) -> SourceError {
        SourceError::Malformed {
            what: self.what.clone(),
            format: FORMAT,
            location: if page == 0 { "the job".to_owned() } else { format!("page {page}") },
            message: self.redacted(message),
        }
    }

    fn redacted(&self, text: &str) -> String {
        let secrets = self.tokens.secrets();
        redact(text, &secrets.iter().map(String::as_str).collect::<Vec<_>>(), REDACT_MIN_LEN)
    }

    /// The user-facing error for a failed call; `page` 0 is the job itself.
    fn failure(&self, e: CallError, page: u64) -> SourceError {
        let at = if page == 0 { String::new() } else { format!("reading page {page} of the result: ") };
        let query = |message: String| SourceError::Query {
            what: self.what.clone(),
            message: self.redacted(&format!("{at}{message}")),
        };
        let api = match e {
            CallError::Malformed(m) => return self.malformed(page, &format!("not the expected JSON ({m})")),
            CallError::Transport(m) => {
                return SourceError::Transport {
                    what: self.what.clone(),
                    url: self.endpoint.as_str().trim_end_matches('/').to_owned(),
                    page,
                    message: self.redacted(&m),
                };
            }
            CallError::Api(api) => api,
        };
        let reason = warehouse::code(&api.reason).unwrap_or("no reason");
        let said = format!("HTTP {} {reason}: {}", api.status, self.quoting.message(&api.message, &[]));
        match api.class() {
            ErrorClass::Unauthenticated => SourceError::Connect {
                what: self.what.clone(),
                message: self.redacted(&format!(
                    "authentication failed: BigQuery refused the access token of {} ({said})",
                    self.tokens.hint()
                )),
            },
            ErrorClass::PermissionDenied => query(format!(
                "permission denied ({said}); {} needs roles/bigquery.jobUser on project {} and roles/bigquery.dataViewer on the tables read",
                self.tokens.hint(),
                self.spec.project_id
            )),
            ErrorClass::InvalidQuery => {
                query(format!("invalid query ({said}); the query runs as standard SQL (GoogleSQL)"))
            }
            ErrorClass::BytesBilledLimit => query(format!(
                "the query would bill more than maximumBytesBilled ({} bytes) and was not run ({said}); raise \
                 spec.source.bigquery.maximumBytesBilled or make the query scan less",
                self.spec.maximum_bytes_billed.map_or("the project's default".to_owned(), |n| n.to_string())
            )),
            ErrorClass::QuotaExceeded => query(format!(
                "quota exceeded ({said}); BigQuery asks to wait at least 10 minutes, the next run tries again"
            )),
            ErrorClass::NotFound => query(format!(
                "not found ({said}); check projectId, location ({}) and the tables the query names",
                self.spec.location.as_deref().unwrap_or("not set: US")
            )),
            ErrorClass::JobTimeout => query(format!("BigQuery stopped the job ({said})")),
            ErrorClass::Transient => query(format!("BigQuery kept failing after {} attempts ({said})", wire::ATTEMPTS)),
            ErrorClass::Other => query(format!("unexpected answer ({said})")),
        }
    }
}

/// Page bookkeeping: rows against `totalRows`, page numbers, looping tokens.
pub(crate) struct Pages {
    total: u64,
    read: u64,
    number: u64,
    empty_in_a_row: u32,
    last_token: Option<String>,
}

impl Pages {
    /// Counts a page's rows; the next token, or `None` at the end. Errors are messages.
    fn advance(&mut self, rows: usize, token: Option<String>) -> Result<Option<String>, String> {
        self.read += rows as u64;
        if self.read > self.total {
            return Err(format!("more rows than totalRows ({}) says", self.total));
        }
        self.empty_in_a_row = if rows == 0 { self.empty_in_a_row + 1 } else { 0 };
        if self.empty_in_a_row > MAX_EMPTY_PAGES {
            return Err(format!("{MAX_EMPTY_PAGES} empty pages in a row; the pagination does not end"));
        }
        let token = token.filter(|t| !t.is_empty());
        if token.is_some() && token == self.last_token {
            return Err("the same pageToken twice in a row; the pagination loops".to_owned());
        }
        self.last_token.clone_from(&token);
        if token.is_none() && self.read != self.total {
            return Err(format!(
                "the last page came after {} rows, but totalRows is {}; the result was cut short",
                self.read, self.total
            ));
        }
        Ok(token)
    }
}

/// BigQuery's REST v2: `jobs.query` (a `requestId` per job), `jobs.getQueryResults` until
/// `jobComplete`, then page by `pageToken`; `jobs.cancel`.
impl Protocol for BigQueryMembers {
    type Handle = JobReference;
    type Finished = QueryResponse;
    type Cursor = PageCursor;
    /// The next page's token.
    type PageInfo = Option<String>;
    type Ledger = Pages;
    type Rows = Vec<Row>;

    const FORMAT: &'static str = FORMAT;

    fn reading(&self) -> Reading<'_> {
        let statement_timeout = Duration::from_secs(self.spec.statement_timeout_seconds.into());
        Reading { what: &self.what, fields: &self.fields, statement_timeout, page_limit: self.page_limit }
    }

    fn retries(&self) -> Backoff {
        wire::retries()
    }

    /// The server itself waits up to `timeoutMs`; the pause between polls only keeps a
    /// server that answers at once from being asked in a tight loop.
    fn polling(&self) -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(1), u32::MAX)
    }

    /// A job that keeps failing while it runs is submitted again as a new job (BigQuery's
    /// advice for `backendError` jobs).
    fn resubmissions(&self) -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(8), JOB_ATTEMPTS - 1)
    }

    async fn submit(
        &self,
        request_id: &str,
        _resend: bool,
    ) -> Result<(JobReference, Progress<QueryResponse>), Failure> {
        let first = self.attempt(&Call::Query { request_id }, 0).await?;
        let job =
            first.job_reference.clone().ok_or_else(|| self.malformed(0, "jobs.query answered without jobReference"))?;
        Ok((job, if first.job_complete { Progress::Finished(first) } else { Progress::Running }))
    }

    async fn poll(&self, job: &JobReference) -> Result<Progress<QueryResponse>, Failure> {
        let response = self.attempt(&Call::Results { job, page_token: None }, 0).await?;
        Ok(if response.job_complete { Progress::Finished(response) } else { Progress::Running })
    }

    fn result(&self, mut first: QueryResponse) -> Result<ResultSet<Self>, SourceError> {
        let schema = first.schema.take().ok_or_else(|| self.malformed(1, "a complete job answered without schema"))?;
        let total = first.total_rows.ok_or_else(|| self.malformed(1, "a complete job answered without totalRows"))?;
        let page = Page { rows: std::mem::take(&mut first.rows), part: "page 1".to_owned(), info: first.page_token };
        let ledger = Pages { total, read: 0, number: 1, empty_in_a_row: 0, last_token: None };
        Ok(ResultSet { columns: self.columns(&schema)?, ledger, first: Next::Page(page) })
    }

    async fn page(&self, job: &JobReference, cursor: &PageCursor) -> Result<Page<Self>, Failure> {
        let number = cursor.number;
        let mut page = self.attempt(&Call::Results { job, page_token: Some(&cursor.token) }, number).await?;
        if !page.job_complete {
            return Err(Failure::Fatal(self.malformed(number, "a result page answered jobComplete: false")));
        }
        Ok(Page { rows: std::mem::take(&mut page.rows), part: format!("page {number}"), info: page.page_token })
    }

    fn tally(&self, pages: &mut Pages, page: &Page<Self>) -> Result<Option<PageCursor>, SourceError> {
        let next = pages.advance(page.rows.len(), page.info.clone()).map_err(|m| self.malformed(pages.number, &m))?;
        Ok(next.map(|token| {
            pages.number += 1;
            PageCursor { token, number: pages.number }
        }))
    }

    /// [`Pages::advance`] checked every row against `totalRows` at the last page.
    fn settle(&self, _pages: Pages) -> Result<(), SourceError> {
        Ok(())
    }

    fn cancel(&self, job: &JobReference) -> Option<reqwest::RequestBuilder> {
        let mut url = self.url(&job.project_id, &["jobs", &job.job_id, "cancel"]);
        if let Some(location) = self.location(job) {
            url.query_pairs_mut().append_pair("location", location);
        }
        let token = self.tokens.current()?;
        Some(self.client.post(url).ok()?.bearer_auth(token.expose()))
    }

    async fn reauthenticate(&self, _refused: SourceError) -> Result<(), SourceError> {
        self.tokens.invalidate().await;
        Ok(())
    }
}

impl MemberSource for BigQueryMembers {
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
    fn pages_account_for_every_row() {
        let mut p = Pages { total: 5, read: 0, number: 1, empty_in_a_row: 0, last_token: None };
        assert_eq!(p.advance(2, Some("a".into())), Ok(Some("a".into())));
        assert_eq!(p.advance(0, Some("b".into())), Ok(Some("b".into())));
        assert!(p.advance(1, Some("b".into())).unwrap_err().contains("loops"));
        let mut p = Pages { total: 5, read: 0, number: 1, empty_in_a_row: 0, last_token: None };
        assert!(p.advance(3, Some(String::new())).unwrap_err().contains("cut short"));
        let mut p = Pages { total: 2, read: 0, number: 1, empty_in_a_row: 0, last_token: None };
        assert!(p.advance(3, None).unwrap_err().contains("more rows"));
        let mut p = Pages { total: 2, read: 0, number: 1, empty_in_a_row: 0, last_token: None };
        assert_eq!(p.advance(2, None), Ok(None));
    }
}
