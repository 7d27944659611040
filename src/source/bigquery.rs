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
//! with full-jitter backoff; a job that keeps failing while it runs is submitted again as a
//! new job (BigQuery's advice for `backendError` jobs). A refused access token is replaced
//! once. `statementTimeoutSeconds` bounds the whole read; past it the job is cancelled.
//!
//! Authentication and value conversion are in the submodules `auth` and `values`; what
//! every warehouse source shares (retry timing, bounded page reads, the read-only statement
//! check, column plans, exact number text) is in [`super::warehouse`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use tokio::time::Instant;

use self::auth::{Credentials, DEFAULT_METADATA_SERVER, ServiceAccountKey, TokenSource};
use self::values::ColumnKind;
use self::wire::{ApiError, ErrorClass, FormatOptions, JobReference, QueryRequest, QueryResponse, Row, Schema};
use super::warehouse::{
    self, BodyError, DEFAULT_MAX_PAGE_BYTES, PageLimit, RetryPolicy, checked_query, column_plan, read_body_bounded,
    read_error_body,
};
use super::{BatchBuilder, MemberBatch, MemberSource, MemberStream, REDACT_MIN_LEN, SourceContext, SourceError};
use crate::api::BigQuerySource;
use crate::domain::identifiers::{ColumnPlan, IdentifierFields};
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
    retry: RetryPolicy,
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

/// Why a call failed (after its retries).
#[derive(Debug)]
enum CallError {
    /// An error answer from the API.
    Api(ApiError),
    /// No token: already a finished, user-facing error.
    Auth(SourceError),
    /// The egress policy refuses the address (the endpoint's name resolved to a denied one).
    Denied(EgressDenied),
    /// The request or its answer did not get through.
    Transport(String),
    /// A 2xx body that is not the expected JSON (cut off, most likely).
    Malformed(String),
    TooLarge,
}

impl CallError {
    fn transient(&self) -> bool {
        match self {
            CallError::Api(e) => e.class() == ErrorClass::Transient,
            CallError::Transport(_) | CallError::Malformed(_) => true,
            CallError::Auth(_) | CallError::Denied(_) | CallError::TooLarge => false,
        }
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
        Self::under_policy(what, spec, fields, credentials, RetryPolicy::default(), &ctx.egress())
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
        retry: RetryPolicy,
    ) -> Result<Self, SourceError> {
        Self::under_policy(what, spec, fields, credentials, retry, &EgressPolicy::shared_default())
    }

    /// A source with credentials already resolved, connecting under `egress`.
    pub fn under_policy(
        what: String,
        spec: &BigQuerySource,
        fields: IdentifierFields,
        credentials: Credentials,
        retry: RetryPolicy,
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
        let tokens = TokenSource::new(credentials, retry);
        let quoting = warehouse::Quoting::of(&endpoint, &["googleapis.com"]);
        let page_limit = PageLimit::new("maxPageBytes", spec.max_page_bytes, DEFAULT_MAX_PAGE_BYTES);
        Ok(BigQueryMembers { what, spec, endpoint, fields, tokens, client, quoting, token_client, retry, page_limit })
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

    /// One attempt at a call: token, request, bounded body, status, JSON.
    async fn attempt(&self, call: &Call<'_>) -> Result<QueryResponse, CallError> {
        let token = self.tokens.token(&self.token_client, &self.what).await.map_err(CallError::Auth)?;
        let request = self.request(call).map_err(CallError::Denied)?;
        let response = request.bearer_auth(token.expose()).send().await.map_err(|e| match denied_in(&e) {
            Some(denied) => CallError::Denied(denied.clone()),
            None if e.is_timeout() => CallError::Transport("timed out".to_owned()),
            None => CallError::Transport(error_chain(&e.without_url())),
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            // An error answer is read for its reason and message only.
            let body = read_error_body(response, ERROR_BODY_WAIT).await;
            return Err(CallError::Api(ApiError::parse(status, &body)));
        }
        let body = read_body_bounded(response, self.page_limit.bytes).await.map_err(|e| match e {
            BodyError::TooLarge => CallError::TooLarge,
            BodyError::Transport(e) => {
                CallError::Transport(format!("the answer broke off: {}", error_chain(&e.without_url())))
            }
        })?;
        serde_json::from_slice(&body).map_err(|e| CallError::Malformed(warehouse::json_error(&e)))
    }

    /// A call with its retries: transient failures after a backoff, a refused token once
    /// with a fresh one.
    async fn call(&self, call: &Call<'_>) -> Result<QueryResponse, CallError> {
        let (mut attempt, mut fresh_token) = (1, false);
        loop {
            match self.attempt(call).await {
                Ok(response) => return Ok(response),
                Err(CallError::Api(e)) if e.class() == ErrorClass::Unauthenticated && !fresh_token => {
                    fresh_token = true;
                    self.tokens.invalidate().await;
                }
                Err(e) if e.transient() && attempt < self.retry.attempts => {
                    tracing::info!(source = %self.what, attempt, "BigQuery call failed, retrying: {}", self.redacted(&format!("{e:?}")));
                    self.retry.wait(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits the query and waits for the job to complete; a job that keeps failing
    /// while it runs is submitted again as a new one. Records the job in `current` so a
    /// timeout can cancel it.
    async fn complete_job(
        &self,
        current: &Mutex<Option<JobReference>>,
    ) -> Result<(JobReference, QueryResponse), SourceError> {
        let mut job_attempt = 1;
        loop {
            // A new requestId: the one before belongs to the job that kept failing.
            let request_id = format!("cohort-{:032x}", rand::random::<u128>());
            let outcome = match self.call(&Call::Query { request_id: &request_id }).await {
                Ok(first) => {
                    let job = first
                        .job_reference
                        .clone()
                        .ok_or_else(|| self.malformed(0, "jobs.query answered without jobReference"))?;
                    *current.lock().expect("not poisoned") = Some(job.clone());
                    self.await_job(&job, first).await.map(|done| (job, done))
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(done) => return Ok(done),
                Err(e) if e.transient() && job_attempt < JOB_ATTEMPTS => {
                    tracing::warn!(source = %self.what, "the job kept failing, submitting the query again: {}", self.redacted(&format!("{e:?}")));
                    self.retry.wait(job_attempt).await;
                    job_attempt += 1;
                }
                Err(e) => return Err(self.failure(e, 0)),
            }
        }
    }

    /// Polls `getQueryResults` until `jobComplete`; its answer then holds the first page.
    async fn await_job(&self, job: &JobReference, mut response: QueryResponse) -> Result<QueryResponse, CallError> {
        let mut polls = 0u32;
        while !response.job_complete {
            // The server itself waits up to timeoutMs; this pause only keeps a server that
            // answers at once from being asked in a tight loop.
            if polls > 0 {
                tokio::time::sleep(Duration::from_millis(50 * u64::from(polls.min(20)))).await;
            }
            polls += 1;
            response = self.call(&Call::Results { job, page_token: None }).await?;
        }
        Ok(response)
    }

    /// Best effort: asks BigQuery to stop the job (after a timeout).
    async fn cancel(&self, job: &JobReference) {
        let mut url = self.url(&job.project_id, &["jobs", &job.job_id, "cancel"]);
        if let Some(location) = self.location(job) {
            url.query_pairs_mut().append_pair("location", location);
        }
        let Ok(token) = self.tokens.token(&self.token_client, &self.what).await else { return };
        let Ok(request) = self.client.post(url) else { return };
        let sent = request.bearer_auth(token.expose()).timeout(Duration::from_secs(5)).send().await;
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::info!(source = %self.what, job = %job.job_id, "cancelled the job")
            }
            Ok(r) => {
                tracing::warn!(source = %self.what, job = %job.job_id, "cancelling the job answered HTTP {}", r.status())
            }
            Err(e) => {
                tracing::warn!(source = %self.what, job = %job.job_id, "cancelling the job failed: {}", error_chain(&e.without_url()))
            }
        }
    }

    /// The column plan and each column's kind; a mapped REPEATED or RECORD column is refused.
    fn plan(&self, schema: &Schema) -> Result<(ColumnPlan, Vec<ColumnKind>), SourceError> {
        let names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
        let plan = column_plan(&self.what, &self.fields, &names)?;
        let kinds: Vec<ColumnKind> = schema.fields.iter().map(ColumnKind::of).collect();
        for name in self.fields.field_names() {
            let at = names.iter().position(|n| *n == name).expect("the plan found it");
            if let Some(why) = kinds[at].unusable(name) {
                return Err(SourceError::Config { what: self.what.clone(), message: why });
            }
        }
        Ok((plan, kinds))
    }

    /// One page's rows as members.
    fn batch(
        &self,
        rows: &[Row],
        plan: &ColumnPlan,
        kinds: &[ColumnKind],
        page: u64,
    ) -> Result<MemberBatch, SourceError> {
        let mut batch = BatchBuilder::default();
        for (i, row) in rows.iter().enumerate() {
            if row.f.len() != kinds.len() {
                let message = format!("row {} has {} cells, the schema {} columns", i + 1, row.f.len(), kinds.len());
                return Err(self.malformed(page, &message));
            }
            batch.push(self.fields.resolve_columns(plan, |c| kinds[c].text(&row.f[c].v)));
        }
        Ok(batch.take())
    }

    fn malformed(&self, page: u64, message: &str) -> SourceError {
        SourceError::Malformed {
            what: self.what.clone(),
            format: "BigQuery answer",
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
            CallError::Auth(e) => return e,
            CallError::Denied(denied) => return SourceError::EgressDenied { what: self.what.clone(), denied },
            CallError::TooLarge => {
                let part =
                    if page == 0 { "the job's first answer".to_owned() } else { format!("page {page} of the result") };
                return self.page_limit.exceeded(&self.what, &part);
            }
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
            ErrorClass::Transient => {
                query(format!("BigQuery kept failing after {} attempts ({said})", self.retry.attempts))
            }
            ErrorClass::Other => query(format!("unexpected answer ({said})")),
        }
    }

    /// Waits for `step` within the read's deadline; past it, cancels the job and fails.
    async fn within<T>(
        &self,
        deadline: Instant,
        current: &Mutex<Option<JobReference>>,
        step: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        match tokio::time::timeout_at(deadline, step).await {
            Ok(done) => done,
            Err(_) => {
                let job = current.lock().expect("not poisoned").clone();
                if let Some(job) = job {
                    self.cancel(&job).await;
                }
                Err(SourceError::Timeout {
                    what: self.what.clone(),
                    seconds: self.spec.statement_timeout_seconds.into(),
                })
            }
        }
    }
}

/// Page bookkeeping: rows against `totalRows`, page numbers, looping tokens.
struct Pages {
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

impl MemberSource for BigQueryMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        Box::pin(async_stream::try_stream! {
            let deadline = Instant::now() + Duration::from_secs(self.spec.statement_timeout_seconds.into());
            let current = Mutex::new(None);
            let (job, mut page) = self.within(deadline, &current, self.complete_job(&current)).await?;
            let schema = page.schema.take().ok_or_else(|| self.malformed(1, "a complete job answered without schema"))?;
            let total = page.total_rows.ok_or_else(|| self.malformed(1, "a complete job answered without totalRows"))?;
            let (plan, kinds) = self.plan(&schema)?;
            let mut pages = Pages { total, read: 0, number: 1, empty_in_a_row: 0, last_token: None };
            loop {
                let rows = std::mem::take(&mut page.rows);
                let batch = self.batch(&rows, &plan, &kinds, pages.number)?;
                let next = pages.advance(rows.len(), page.page_token.take()).map_err(|m| self.malformed(pages.number, &m))?;
                drop(rows);
                if batch.rows() > 0 {
                    yield batch;
                }
                let Some(token) = next else { break };
                pages.number += 1;
                let call = Call::Results { job: &job, page_token: Some(&token) };
                let number = pages.number;
                page = self.within(deadline, &current, async { self.call(&call).await.map_err(|e| self.failure(e, number)) }).await?;
                if !page.job_complete {
                    Err(self.malformed(number, "a result page answered jobComplete: false"))?;
                }
            }
        })
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
