//! A local BigQuery for the `bigquery` cohort source: Google's OAuth token endpoint (the
//! service-account JWT-bearer grant), the metadata server's token endpoint (Workload
//! Identity), and the REST v2 `jobs.query`, `jobs.getQueryResults` and `jobs.cancel`
//! methods, written from Google's public documentation (`shared/notes/
//! warehouse-sql-apis.md` §2). Queries run on a real PostgreSQL.
//!
//! What it enforces, as the real service does: a valid, unexpired bearer token on every
//! API call (401 `UNAUTHENTICATED` otherwise); the job's project (403 `accessDenied` for
//! another project or an account without the right role); `location` on
//! `getQueryResults` equal to the job's (404 `notFound` otherwise) and, for a region
//! outside the US/EU multi-regions, on `jobs.query` too; `maximumBytesBilled` (a query that
//! would bill more fails with `bytesBilledLimitExceeded`, billing at least 10 MB as
//! on-demand pricing does); `maxResults` and a 10 MB cap per page; page tokens bound to
//! their job (400 `invalid` otherwise); `requestId` idempotency. Stricter than the real
//! service, on purpose: `useLegacySql` must be sent as `false`.
//!
//! Faults for tests, each taken by the next matching request: an HTTP status with a
//! Google error reason (429, 403 `rateLimitExceeded`, 503 `backendError`, 403
//! `quotaExceeded`, bodiless 502…), every issued token expiring at once, a job that stays
//! running until cancelled (a job timeout), a job that fails while it runs, a page cut off
//! mid-body, a page missing a row.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

pub mod oauth;
pub mod results;

use oauth::{BearerError, RegisteredAccount, TestServiceAccount, TokenForm, TokenStore};
use results::ResultSet;

/// What BigQuery bills at least per query (on-demand pricing's 10 MB minimum).
pub const MIN_BYTES_BILLED: u64 = 10 * 1024 * 1024;
/// BigQuery caps a result page at about 10 MB.
pub const MAX_PAGE_BYTES: usize = 10 * 1024 * 1024;

/// How the stand-in is set up.
#[derive(Clone)]
pub struct BigQueryConfig {
    /// Where queries run: `postgres://…`.
    pub postgres_url: String,
    /// The one project jobs may run in.
    pub project_id: String,
    /// Where every job runs, e.g. `europe-west1` or `EU`.
    pub location: String,
    /// Service accounts whose assertions the token endpoint accepts.
    pub accounts: Vec<RegisteredAccount>,
    /// Accounts that get tokens but lack `bigquery.jobs.create` on the project.
    pub denied_accounts: Vec<String>,
    /// The identity the metadata server hands tokens for; `None`: no metadata server.
    pub metadata_identity: Option<String>,
    /// `expires_in` of issued tokens (short, to exercise refreshing).
    pub token_lifetime: Duration,
    /// Answers that report `jobComplete: false` before a finished job is shown complete.
    pub incomplete_polls: u32,
    /// Longest `timeoutMs` wait honoured.
    pub max_wait: Duration,
}

impl BigQueryConfig {
    pub fn new(postgres_url: &str, project_id: &str, location: &str) -> BigQueryConfig {
        BigQueryConfig {
            postgres_url: postgres_url.to_owned(),
            project_id: project_id.to_owned(),
            location: location.to_owned(),
            accounts: Vec::new(),
            denied_accounts: Vec::new(),
            metadata_identity: None,
            token_lifetime: Duration::from_secs(3600),
            incomplete_polls: 0,
            max_wait: Duration::from_secs(10),
        }
    }
}

/// Which endpoint a status fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Metadata,
    Query,
    Results,
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next call to `on` answers `status`, with Google's error envelope naming
    /// `reason`, or with no body when `reason` is `None`.
    Status { on: Endpoint, status: u16, reason: Option<String> },
    /// The next job stays running until cancelled.
    NeverComplete,
    /// The next job fails while it runs: every `getQueryResults` for it answers `status`
    /// with `reason` (e.g. 500 `backendError`), as a failed job does.
    FailJob { status: u16, reason: String },
    /// The next page's body stops half-way and the connection closes.
    TruncatePage,
    /// The next page leaves out its last row (its token still points past it).
    DropRow,
}

/// What the stand-in saw, for tests to assert on.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub token_grants: u64,
    pub token_refusals: u64,
    pub metadata_tokens: u64,
    pub jobs_created: u64,
    pub query_calls: u64,
    pub results_calls: u64,
    pub pages_served: u64,
    pub rows_served: u64,
    pub cancels: u64,
    pub unauthorized: u64,
    pub faults_injected: u64,
    pub last_max_results: Option<u32>,
    pub last_maximum_bytes_billed: Option<String>,
    pub last_query: Option<String>,
}

/// An error answer in Google's envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub reason: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, reason: &str, message: &str) -> ApiError {
        ApiError { status, reason: reason.to_owned(), message: message.to_owned() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status_name = match self.status {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        let body = serde_json::json!({ "error": {
            "code": self.status,
            "message": self.message,
            "errors": [{ "message": self.message, "domain": "global", "reason": self.reason }],
            "status": status_name,
        }});
        let mut response =
            (StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body))
                .into_response();
        if self.status == 401 {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer realm=\"https://accounts.google.com/\"".parse().unwrap());
        }
        response
    }
}

#[derive(Clone)]
enum JobState {
    Running,
    Done(Arc<ResultSet>),
    Failed(ApiError),
}

struct Job {
    project: String,
    location: String,
    /// Binds page tokens to this job.
    nonce: u64,
    state: watch::Sender<JobState>,
    /// Answers still to report `jobComplete: false`.
    incomplete_left: u32,
    /// Set by the FailJob fault: every results call answers this once the job is done.
    fails_with: Option<ApiError>,
}

struct Inner {
    accounts: HashMap<String, RegisteredAccount>,
    tokens: TokenStore,
    jobs: HashMap<String, Job>,
    request_ids: HashMap<String, String>,
    faults: Vec<Fault>,
    stats: Stats,
}

struct Shared {
    config: BigQueryConfig,
    /// `http://127.0.0.1:PORT`, known once bound: the token endpoint's audience.
    base_url: String,
    inner: Mutex<Inner>,
}

/// A running stand-in; dropping it stops the server.
pub struct RunningBigQuery {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningBigQuery {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl RunningBigQuery {
    /// Serves on `listen` (port 0: a free loopback port).
    pub async fn start(config: BigQueryConfig, listen: SocketAddr) -> std::io::Result<RunningBigQuery> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let accounts = config.accounts.iter().map(|a| (a.client_email.clone(), a.clone())).collect();
        let inner = Inner {
            accounts,
            tokens: TokenStore::default(),
            jobs: HashMap::new(),
            request_ids: HashMap::new(),
            faults: Vec::new(),
            stats: Stats::default(),
        };
        let shared = Arc::new(Shared { config, base_url: format!("http://{addr}"), inner: Mutex::new(inner) });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RunningBigQuery { addr, shared, task: Some(task) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API root, for `spec.source.bigquery.endpoint`.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The token endpoint, for a key file's `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.shared.base_url)
    }

    /// `host:port` of the metadata server, for `spec.source.bigquery.metadataServer`.
    pub fn metadata_server(&self) -> String {
        self.addr.to_string()
    }

    /// A key file for `account`, with `token_uri` pointing here.
    pub fn key_json(&self, account: &TestServiceAccount) -> String {
        account.key_json(&self.shared.config.project_id, &self.token_uri())
    }

    pub async fn stats(&self) -> Stats {
        self.shared.inner.lock().await.stats.clone()
    }

    pub async fn push_fault(&self, fault: Fault) {
        self.shared.inner.lock().await.faults.push(fault);
    }

    /// Faults not yet taken.
    pub async fn pending_faults(&self) -> usize {
        self.shared.inner.lock().await.faults.len()
    }

    /// Every token issued so far expires now.
    pub async fn expire_tokens(&self) {
        self.shared.inner.lock().await.tokens.expire_all();
    }

    /// Waits until the server stops (never, unless it fails).
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/token", post(token))
        .route("/computeMetadata/v1/instance/service-accounts/default/token", get(metadata_token))
        .route("/bigquery/v2/projects/{project}/queries", post(jobs_query))
        .route("/bigquery/v2/projects/{project}/queries/{job}", get(get_query_results))
        .route("/bigquery/v2/projects/{project}/jobs/{job}/cancel", post(cancel))
        .route("/sandbox/stats", get(stats))
        .with_state(shared)
}

impl Inner {
    /// Takes the first fault `matches` accepts.
    fn take_fault(&mut self, matches: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let at = self.faults.iter().position(matches)?;
        self.stats.faults_injected += 1;
        Some(self.faults.remove(at))
    }

    fn status_fault(&mut self, on: Endpoint) -> Option<Response> {
        let Some(Fault::Status { status, reason, .. }) =
            self.take_fault(|f| matches!(f, Fault::Status { on: o, .. } if *o == on))
        else {
            return None;
        };
        Some(match reason {
            Some(reason) => ApiError::new(status, &reason, &format!("injected {reason}")).into_response(),
            None => StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR).into_response(),
        })
    }

    /// The caller's identity, or Google's 401.
    fn authenticate(&mut self, headers: &HeaderMap) -> Result<String, ApiError> {
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.tokens.check(authorization).map_err(|e| {
            self.stats.unauthorized += 1;
            let message = match e {
                BearerError::Missing => {
                    "Request is missing required authentication credential. Expected OAuth 2 access token."
                }
                BearerError::Invalid => {
                    "Request had invalid authentication credentials. Expected OAuth 2 access token."
                }
            };
            ApiError::new(401, "authError", message)
        })
    }
}

async fn token(State(shared): State<Arc<Shared>>, Form(form): Form<TokenForm>) -> Response {
    let mut inner = shared.inner.lock().await;
    if let Some(fault) = inner.status_fault(Endpoint::Token) {
        return fault;
    }
    let audience = format!("{}/token", shared.base_url);
    match oauth::check_grant(&form, &inner.accounts, &audience, oauth::now_secs()) {
        Ok(identity) => {
            inner.stats.token_grants += 1;
            let lifetime = shared.config.token_lifetime;
            let access_token = inner.tokens.issue(&identity, lifetime);
            axum::Json(serde_json::json!({
                "access_token": access_token, "expires_in": lifetime.as_secs(), "token_type": "Bearer",
            }))
            .into_response()
        }
        Err(e) => {
            inner.stats.token_refusals += 1;
            let body = serde_json::json!({ "error": e.error, "error_description": e.description });
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
    }
}

async fn metadata_token(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let mut inner = shared.inner.lock().await;
    let flavored = |mut r: Response| {
        r.headers_mut().insert("Metadata-Flavor", "Google".parse().unwrap());
        r
    };
    if let Some(fault) = inner.status_fault(Endpoint::Metadata) {
        return flavored(fault);
    }
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return flavored((StatusCode::FORBIDDEN, "Missing required header: Metadata-Flavor").into_response());
    }
    let Some(identity) = shared.config.metadata_identity.clone() else {
        return flavored((StatusCode::NOT_FOUND, "no service account is attached").into_response());
    };
    inner.stats.metadata_tokens += 1;
    let lifetime = shared.config.token_lifetime;
    let access_token = inner.tokens.issue(&identity, lifetime);
    flavored(
        axum::Json(serde_json::json!({ "access_token": access_token, "expires_in": lifetime.as_secs(), "token_type": "Bearer" }))
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryBody {
    query: Option<String>,
    use_legacy_sql: Option<bool>,
    max_results: Option<u32>,
    timeout_ms: Option<u64>,
    location: Option<String>,
    maximum_bytes_billed: Option<String>,
    request_id: Option<String>,
}

/// Checks the caller may run jobs in `project`.
fn authorize(shared: &Shared, identity: &str, project: &str) -> Result<(), ApiError> {
    if project != shared.config.project_id || shared.config.denied_accounts.iter().any(|d| d == identity) {
        return Err(ApiError::new(
            403,
            "accessDenied",
            &format!(
                "Access Denied: Project {project}: User does not have bigquery.jobs.create permission in project {project}."
            ),
        ));
    }
    Ok(())
}

fn location_matches(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

async fn jobs_query(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (job_id, body) = {
        let mut inner = shared.inner.lock().await;
        let identity = match inner.authenticate(&headers) {
            Ok(identity) => identity,
            Err(e) => return e.into_response(),
        };
        inner.stats.query_calls += 1;
        if let Some(fault) = inner.status_fault(Endpoint::Query) {
            return fault;
        }
        let body: QueryBody = match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(e) => {
                return ApiError::new(400, "invalid", &format!("Invalid JSON payload received. {e}")).into_response();
            }
        };
        match create_job(&shared, &mut inner, &identity, &project, &body) {
            Ok(job_id) => (job_id, body),
            Err(e) => return e.into_response(),
        }
    };
    answer(&shared, &job_id, None, body.max_results, body.timeout_ms, "bigquery#queryResponse").await
}

/// Validates a `jobs.query` body and starts (or finds, by `requestId`) its job.
fn create_job(
    shared: &Arc<Shared>,
    inner: &mut Inner,
    identity: &str,
    project: &str,
    body: &QueryBody,
) -> Result<String, ApiError> {
    authorize(shared, identity, project)?;
    let query = body
        .query
        .clone()
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| ApiError::new(400, "invalid", "Required parameter is missing: query"))?;
    if body.use_legacy_sql != Some(false) {
        return Err(ApiError::new(
            400,
            "invalidQuery",
            "This stand-in runs standard SQL only: send useLegacySql: false",
        ));
    }
    let location = &shared.config.location;
    let multi_region = ["US", "EU"].iter().any(|m| location_matches(m, location));
    match &body.location {
        Some(l) if !location_matches(l, location) => {
            return Err(ApiError::new(
                404,
                "notFound",
                &format!("Not found: Dataset {project}:cohorts was not found in location {l}"),
            ));
        }
        None if !multi_region => {
            return Err(ApiError::new(
                404,
                "notFound",
                &format!("Not found: Dataset {project}:cohorts was not found in location US"),
            ));
        }
        _ => {}
    }
    let limit = match &body.maximum_bytes_billed {
        None => None,
        Some(text) => Some(
            text.parse::<u64>().map_err(|_| ApiError::new(400, "invalid", "Invalid value for maximumBytesBilled"))?,
        ),
    };
    inner.stats.last_max_results = body.max_results;
    inner.stats.last_maximum_bytes_billed.clone_from(&body.maximum_bytes_billed);
    inner.stats.last_query = Some(query.clone());
    if let Some(rid) = &body.request_id
        && let Some(existing) = inner.request_ids.get(rid)
    {
        return Ok(existing.clone());
    }
    let job_id = format!("job_{:024x}", rand::random::<u128>() >> 32);
    let (state, _) = watch::channel(JobState::Running);
    let never = inner.take_fault(|f| *f == Fault::NeverComplete).is_some();
    let fails_with = match inner.take_fault(|f| matches!(f, Fault::FailJob { .. })) {
        Some(Fault::FailJob { status, reason }) => {
            Some(ApiError::new(status, &reason, "The job encountered an internal error during execution"))
        }
        _ => None,
    };
    let job = Job {
        project: project.to_owned(),
        location: location.clone(),
        nonce: rand::random(),
        state: state.clone(),
        incomplete_left: shared.config.incomplete_polls,
        fails_with,
    };
    inner.jobs.insert(job_id.clone(), job);
    if let Some(rid) = &body.request_id {
        inner.request_ids.insert(rid.clone(), job_id.clone());
    }
    inner.stats.jobs_created += 1;
    if !never {
        let url = shared.config.postgres_url.clone();
        tokio::spawn(async move {
            let outcome = match results::run(&url, &query).await {
                Ok(set) => billed(set, limit),
                Err(e) => JobState::Failed(e),
            };
            state.send_replace(outcome);
        });
    }
    Ok(job_id)
}

/// A finished result, unless it would bill more than `limit`: BigQuery bills at least
/// 10 MB, and fails such a job uncharged.
fn billed(set: ResultSet, limit: Option<u64>) -> JobState {
    let bytes = set.bytes.max(MIN_BYTES_BILLED);
    match limit {
        Some(limit) if bytes > limit => JobState::Failed(ApiError::new(
            400,
            "bytesBilledLimitExceeded",
            &format!("Query exceeded limit for bytes billed: {limit}. {bytes} or higher required."),
        )),
        _ => JobState::Done(Arc::new(set)),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultsParams {
    page_token: Option<String>,
    max_results: Option<u32>,
    timeout_ms: Option<u64>,
    location: Option<String>,
}

async fn get_query_results(
    State(shared): State<Arc<Shared>>,
    Path((project, job_id)): Path<(String, String)>,
    Query(params): Query<ResultsParams>,
    headers: HeaderMap,
) -> Response {
    {
        let mut inner = shared.inner.lock().await;
        let identity = match inner.authenticate(&headers) {
            Ok(identity) => identity,
            Err(e) => return e.into_response(),
        };
        inner.stats.results_calls += 1;
        if let Some(fault) = inner.status_fault(Endpoint::Results) {
            return fault;
        }
        if let Err(e) = authorize(&shared, &identity, &project) {
            return e.into_response();
        }
        let not_found =
            || ApiError::new(404, "notFound", &format!("Not found: Job {project}:{job_id}")).into_response();
        let Some(job) = inner.jobs.get(&job_id) else { return not_found() };
        // A job outside the US multi-region is found only with its location.
        let given = params.location.as_deref().unwrap_or("US");
        if job.project != project || !location_matches(given, &job.location) {
            return not_found();
        }
    }
    answer(
        &shared,
        &job_id,
        params.page_token.as_deref(),
        params.max_results,
        params.timeout_ms,
        "bigquery#getQueryResultsResponse",
    )
    .await
}

/// Waits (up to `timeoutMs`) for the job, then answers with its state and a page.
async fn answer(
    shared: &Arc<Shared>,
    job_id: &str,
    page_token: Option<&str>,
    max_results: Option<u32>,
    timeout_ms: Option<u64>,
    kind: &str,
) -> Response {
    let mut state = match shared.inner.lock().await.jobs.get(job_id) {
        Some(job) => job.state.subscribe(),
        None => return ApiError::new(404, "notFound", &format!("Not found: Job {job_id}")).into_response(),
    };
    let wait = Duration::from_millis(timeout_ms.unwrap_or(10_000)).min(shared.config.max_wait);
    let _ = tokio::time::timeout(wait, state.wait_for(|s| !matches!(s, JobState::Running))).await;
    let current = state.borrow().clone();
    let mut inner = shared.inner.lock().await;
    let job = inner.jobs.get_mut(job_id).expect("jobs are never removed");
    let reference = serde_json::json!({ "projectId": job.project, "jobId": job_id, "location": job.location });
    let incomplete = serde_json::json!({ "kind": kind, "jobReference": reference, "jobComplete": false });
    let set = match current {
        JobState::Running => return axum::Json(incomplete).into_response(),
        JobState::Failed(e) => return e.into_response(),
        JobState::Done(set) => set,
    };
    if job.incomplete_left > 0 {
        job.incomplete_left -= 1;
        return axum::Json(incomplete).into_response();
    }
    if let Some(e) = &job.fails_with {
        return e.clone().into_response();
    }
    let nonce = job.nonce;
    let start = match page_token {
        None => 0,
        Some(token) => match parse_token(token, nonce, set.rows.len()) {
            Some(start) => start,
            None => return ApiError::new(400, "invalid", "Invalid page token").into_response(),
        },
    };
    let max_results = max_results.unwrap_or(u32::MAX) as usize;
    let mut end = start;
    let mut bytes = 0;
    while end < set.rows.len()
        && end - start < max_results
        && (end == start || bytes + set.rows[end].len() <= MAX_PAGE_BYTES)
    {
        bytes += set.rows[end].len();
        end += 1;
    }
    let drop_row = end > start && inner.take_fault(|f| *f == Fault::DropRow).is_some();
    let truncate = inner.take_fault(|f| *f == Fault::TruncatePage).is_some();
    inner.stats.pages_served += 1;
    inner.stats.rows_served += (end - start - usize::from(drop_row)) as u64;
    drop(inner);
    let next = (end < set.rows.len()).then(|| format!("{nonce:016x}{end:x}"));
    let body = page_json(kind, &reference, &set, &set.rows[start..end - usize::from(drop_row)], next.as_deref());
    if truncate {
        return truncated(body);
    }
    ([(header::CONTENT_TYPE, "application/json; charset=UTF-8")], body).into_response()
}

/// The offset a token points at, if it belongs to the job (`nonce`) and is in range.
fn parse_token(token: &str, nonce: u64, rows: usize) -> Option<usize> {
    if token.len() <= 16 || !token.is_ascii() {
        return None;
    }
    let (job, offset) = token.split_at(16);
    if u64::from_str_radix(job, 16).ok()? != nonce {
        return None;
    }
    usize::from_str_radix(offset, 16).ok().filter(|o| *o <= rows)
}

fn page_json(
    kind: &str,
    reference: &serde_json::Value,
    set: &ResultSet,
    rows: &[Box<str>],
    next: Option<&str>,
) -> String {
    let mut out = String::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 512);
    out.push_str(&format!(
        "{{\"kind\":\"{kind}\",\"etag\":\"{:x}\",\"schema\":{{\"fields\":{}}},\"jobReference\":{reference},\"totalRows\":\"{}\",",
        rand::random::<u32>(),
        set.schema_json,
        set.rows.len()
    ));
    if let Some(next) = next {
        out.push_str(&format!("\"pageToken\":\"{next}\","));
    }
    if !rows.is_empty() {
        out.push_str("\"rows\":[");
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(row);
        }
        out.push_str("],");
    }
    out.push_str(&format!("\"totalBytesProcessed\":\"{}\",\"jobComplete\":true,\"cacheHit\":false}}", set.bytes));
    out
}

/// Half the body, then the connection breaks (no final chunk).
fn truncated(body: String) -> Response {
    let half = body.as_bytes()[..body.len() / 2].to_vec();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(half), Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected truncation"))];
    let stream = futures::stream::iter(chunks);
    ([(header::CONTENT_TYPE, "application/json; charset=UTF-8")], Body::from_stream(stream)).into_response()
}

#[derive(Deserialize)]
struct CancelParams {
    location: Option<String>,
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Path((project, job_id)): Path<(String, String)>,
    Query(params): Query<CancelParams>,
    headers: HeaderMap,
) -> Response {
    let mut inner = shared.inner.lock().await;
    if let Err(e) = inner.authenticate(&headers) {
        return e.into_response();
    }
    let given = params.location.unwrap_or_else(|| "US".to_owned());
    let Some(job) = inner.jobs.get(&job_id).filter(|j| j.project == project && location_matches(&given, &j.location))
    else {
        return ApiError::new(404, "notFound", &format!("Not found: Job {project}:{job_id}")).into_response();
    };
    let state = job.state.clone();
    let reference = serde_json::json!({ "projectId": job.project, "jobId": job_id, "location": job.location });
    if matches!(*state.borrow(), JobState::Running) {
        state.send_replace(JobState::Failed(ApiError::new(
            400,
            "stopped",
            "Job execution was cancelled: User requested cancellation",
        )));
    }
    inner.stats.cancels += 1;
    axum::Json(serde_json::json!({ "kind": "bigquery#jobCancelResponse", "job": { "jobReference": reference, "status": { "state": "DONE" } } }))
        .into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.inner.lock().await.stats.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_bound_to_their_job() {
        let token = format!("{:016x}{:x}", 7u64, 300);
        assert_eq!(parse_token(&token, 7, 1000), Some(300));
        assert_eq!(parse_token(&token, 8, 1000), None);
        assert_eq!(parse_token(&token, 7, 100), None);
        assert_eq!(parse_token("garbage", 7, 1000), None);
    }
}
