//! A stand-in for Snowflake's SQL API v2 (`/api/v2/statements`), written from Snowflake's
//! reference and "Authenticating to the server" / "Handling responses" pages.
//!
//! Enforced as documented: key-pair JWTs only (`X-Snowflake-Authorization-Token-Type:
//! KEYPAIR_JWT`), the RS256 signature checked against the user's registered public key,
//! `iss = ACCOUNT.USER.SHA256:<fingerprint of that key>`, `sub = ACCOUNT.USER` exactly,
//! `iat`/`exp` in seconds or milliseconds, expired at `min(exp, iat + 1 h)` (60 s skew) →
//! 401 `390144`; a `User-Agent`; JSON `Content-Type` (else 415); `Accept` JSON or `*/*`.
//! Fake policy, stricter than documented: `USE …` and several statements are refused (422).
//!
//! Statements run on PostgreSQL (read-only), asynchronously: the POST answers 200 when the
//! result is ready within `sync_wait` (0 with `async=true`), else 202 with the handle, and
//! every status request answers 202 for the first `pending_polls` times. Results are split
//! into partitions of `partition_rows`: partition 0 in the result set with
//! `resultSetMetaData.partitionInfo`, the others gzip-encoded with no metadata. `timeout`
//! cancels the statement (408). `requestId` + `retry=true` returns the first run's handle.
//! Column names PostgreSQL folded to lower case are reported upper-cased, as Snowflake
//! folds unquoted identifiers.

// Handlers refuse a request with the HTTP response itself: an axum `Response` as the error.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::keys::{fingerprint_of, pem_block};
use crate::pg::{self, Column, QueryError, Rows};
use crate::serve::{Faults, Server};

/// What the stand-in knows and how it behaves.
#[derive(Clone, Debug)]
pub struct SnowflakeConfig {
    /// The account as the JWT names it (`MYORG-MYACCOUNT`).
    pub account: String,
    /// The user, upper-case as the JWT names it.
    pub user: String,
    /// The user's `RSA_PUBLIC_KEY`: base64 of the DER `SubjectPublicKeyInfo`.
    pub rsa_public_key: String,
    /// PostgreSQL database the statements run on.
    pub database_url: String,
    /// Rows per result partition.
    pub partition_rows: usize,
    /// Status requests (the POST included) answered 202 before the result is served.
    pub pending_polls: u32,
    /// How long a POST without `async=true` waits for the result before answering 202.
    pub sync_wait: Duration,
    /// Partitions ≥ 1 as `{"data": […]}` (true) or a bare array of rows.
    pub wrapped_partitions: bool,
}

impl SnowflakeConfig {
    pub fn new(account: &str, user: &str, rsa_public_key: &str, database_url: &str) -> Self {
        SnowflakeConfig {
            account: account.to_owned(),
            user: user.to_owned(),
            rsa_public_key: rsa_public_key.to_owned(),
            database_url: database_url.to_owned(),
            partition_rows: 10_000,
            pending_polls: 0,
            sync_wait: Duration::from_secs(45),
            wrapped_partitions: true,
        }
    }
}

/// Which request a scripted fault answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    /// `POST /api/v2/statements`.
    Submit,
    /// `GET /api/v2/statements/{h}` without `partition`.
    Poll,
    /// `GET /api/v2/statements/{h}?partition=N`.
    Partition(usize),
}

/// A scripted misbehaviour, used once by the first request it targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 `390505` Too many requests.
    TooManyRequests,
    /// 503 with an HTML body, as a load balancer sends.
    Unavailable,
    /// 500 (the POST still creates the statement: the client must resubmit with retry=true).
    InternalError,
    /// The request's JWT is taken as expired: 401 `390144`.
    ExpiredToken,
    /// The statement exceeds its timeout: 408, statement cancelled.
    StatementTimeout,
    /// 422 `003001` SQL access control error.
    PermissionDenied,
    /// The partition is served without its last row.
    TruncatedPartition,
}

/// A running statement's state.
#[derive(Clone, Debug)]
enum Outcome {
    Running,
    Done(Arc<ResultData>),
    Failed(StatusCode, Value),
    Cancelled,
}

/// A finished result: metadata and every partition's serialized rows.
#[derive(Debug)]
struct ResultData {
    row_type: Vec<Value>,
    num_rows: u64,
    /// Partition 0 as a JSON array; the others gzip-compressed bodies.
    first: String,
    rest: Vec<Vec<u8>>,
    counts: Vec<(u64, u64)>,
    truncated_rest: Vec<Vec<u8>>,
}

struct Statement {
    outcome: watch::Receiver<Outcome>,
    pending_polls: u32,
    task: tokio::task::AbortHandle,
}

struct Inner {
    config: SnowflakeConfig,
    statements: Mutex<HashMap<String, Statement>>,
    by_request_id: Mutex<HashMap<String, String>>,
    faults: Faults<FaultTarget, Fault>,
    executions: AtomicU64,
    cancels: AtomicU64,
    requests: AtomicU64,
    partition_requests: AtomicU64,
    decoding_key: jsonwebtoken::DecodingKey,
    fingerprint: String,
}

/// A stand-in serving on loopback until dropped.
pub struct RunningSnowflake {
    inner: Arc<Inner>,
    server: Server,
}

impl RunningSnowflake {
    /// Starts on a free loopback port.
    pub async fn start(config: SnowflakeConfig) -> anyhow::Result<RunningSnowflake> {
        Self::start_on(config, "127.0.0.1:0".parse().expect("address")).await
    }

    pub async fn start_on(config: SnowflakeConfig, addr: SocketAddr) -> anyhow::Result<RunningSnowflake> {
        let spki = base64::engine::general_purpose::STANDARD
            .decode(config.rsa_public_key.trim())
            .map_err(|e| anyhow::anyhow!("rsa_public_key is not base64: {e}"))?;
        let decoding_key =
            jsonwebtoken::DecodingKey::from_rsa_pem(pem_block("PUBLIC KEY", config.rsa_public_key.trim()).as_bytes())?;
        let inner = Arc::new(Inner {
            fingerprint: fingerprint_of(&spki),
            decoding_key,
            config,
            statements: Mutex::default(),
            by_request_id: Mutex::default(),
            faults: Faults::default(),
            executions: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            partition_requests: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let server = Server::serve(listener, router(inner.clone()))?;
        Ok(RunningSnowflake { inner, server })
    }

    /// `http://127.0.0.1:PORT`, the source's `endpoint`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Answers the next request aimed at `target` with `fault`.
    pub fn inject(&self, target: FaultTarget, fault: Fault) {
        self.inner.faults.push(target, fault);
    }

    /// Statements run on the database so far (resubmissions not counted).
    pub fn executions(&self) -> u64 {
        self.inner.executions.load(Ordering::SeqCst)
    }

    /// Cancel requests for known statements.
    pub fn cancels(&self) -> u64 {
        self.inner.cancels.load(Ordering::SeqCst)
    }

    /// Every request received.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Requests for partitions ≥ 1.
    pub fn partition_requests(&self) -> u64 {
        self.inner.partition_requests.load(Ordering::SeqCst)
    }

    /// The registered key's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/api/v2/statements", post(submit))
        .route("/api/v2/statements/{handle}", get(status))
        .route("/api/v2/statements/{handle}/cancel", post(cancel))
        .with_state(inner)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "code": code, "message": message }))).into_response()
}

fn unauthorized(detail: &str) -> Response {
    error(StatusCode::UNAUTHORIZED, "390144", &format!("JWT token is invalid. [{detail}]"))
}

impl Inner {
    /// Headers and JWT as the reference requires.
    fn authenticate(&self, headers: &HeaderMap, expired: bool) -> Result<(), Response> {
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        if text(header::USER_AGENT).is_empty() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "390142",
                "Incoming request does not contain a User-Agent header.",
            ));
        }
        let accept = text(header::ACCEPT);
        if !(accept.is_empty() || accept.contains("application/json") || accept.contains("*/*")) {
            return Err(error(StatusCode::NOT_ACCEPTABLE, "390142", "Accept must allow application/json."));
        }
        match text(header::HeaderName::from_static("x-snowflake-authorization-token-type")) {
            "KEYPAIR_JWT" => {}
            // Without the header Snowflake assumes OAuth, and a JWT is no OAuth token.
            "" | "OAUTH" => return Err(error(StatusCode::UNAUTHORIZED, "390303", "Invalid OAuth access token.")),
            _ => return Err(error(StatusCode::UNAUTHORIZED, "390144", "Unsupported token type.")),
        }
        let Some(token) = text(header::AUTHORIZATION).strip_prefix("Bearer ") else {
            return Err(unauthorized("no bearer token"));
        };
        self.verify_jwt(token.trim(), expired)
    }

    fn verify_jwt(&self, token: &str, expired: bool) -> Result<(), Response> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| unauthorized("malformed"))?;
        if header.alg != jsonwebtoken::Algorithm::RS256 {
            return Err(unauthorized("alg must be RS256"));
        }
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Value>(token, &self.decoding_key, &validation)
            .map_err(|_| unauthorized("signature does not match the registered public key"))?
            .claims;
        let subject = format!("{}.{}", self.config.account, self.config.user);
        let issuer = format!("{subject}.{}", self.fingerprint);
        if claims["sub"].as_str() != Some(subject.as_str()) {
            return Err(unauthorized("sub does not name this account and user"));
        }
        if claims["iss"].as_str() != Some(issuer.as_str()) {
            return Err(unauthorized("iss does not carry the registered key's fingerprint"));
        }
        let seconds = |v: &Value| v.as_f64().map(|t| if t > 1e11 { t / 1000.0 } else { t });
        let (Some(iat), Some(exp)) = (seconds(&claims["iat"]), seconds(&claims["exp"])) else {
            return Err(unauthorized("iat and exp are required"));
        };
        let now = jiff::Timestamp::now().as_second() as f64;
        let skew = 60.0;
        if expired || now > exp.min(iat + 3600.0) + skew || iat > now + skew {
            return Err(unauthorized("expired"));
        }
        Ok(())
    }

    fn statement(&self, handle: &str) -> Option<(watch::Receiver<Outcome>, bool)> {
        let mut statements = self.statements.lock().unwrap();
        let s = statements.get_mut(handle)?;
        let pending = s.pending_polls > 0;
        s.pending_polls = s.pending_polls.saturating_sub(1);
        Some((s.outcome.clone(), pending))
    }
}

fn fault_response(fault: Fault) -> Option<Response> {
    Some(match fault {
        Fault::TooManyRequests => error(StatusCode::TOO_MANY_REQUESTS, "390505", "Too many requests."),
        Fault::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "<html><body>503 Service Unavailable</body></html>").into_response()
        }
        Fault::InternalError => error(StatusCode::INTERNAL_SERVER_ERROR, "390400", "Internal error."),
        Fault::ExpiredToken => unauthorized("expired"),
        Fault::PermissionDenied => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "code": "003001",
                "sqlState": "42501",
                "message": "SQL access control error:\nInsufficient privileges to operate on table 'COHORT'",
            })),
        )
            .into_response(),
        Fault::StatementTimeout | Fault::TruncatedPartition => return None,
    })
}

async fn submit(
    State(inner): State<Arc<Inner>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let fault = inner.faults.take(FaultTarget::Submit);
    if let Err(response) = inner.authenticate(&headers, fault == Some(Fault::ExpiredToken)) {
        return response;
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "390142", "Content-Type must be application/json.");
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "390142", "Incoming request does not contain a valid payload.");
    };
    if let Some(response) = fault.and_then(fault_response)
        && fault != Some(Fault::InternalError)
    {
        return response;
    }
    let request_id = params.get("requestId").cloned();
    let existing = request_id.as_ref().and_then(|id| inner.by_request_id.lock().unwrap().get(id).cloned());
    let handle = match existing {
        // A resubmission (`retry=true`) of a statement already created: the same statement.
        Some(handle) if params.get("retry").map(String::as_str) == Some("true") => handle,
        Some(_) => {
            return error(
                StatusCode::CONFLICT,
                "390142",
                "A request with this requestId was already submitted; resubmit with retry=true.",
            );
        }
        None => match start_statement(&inner, &request, request_id, fault == Some(Fault::StatementTimeout)) {
            Ok(handle) => handle,
            Err(response) => return response,
        },
    };
    if fault == Some(Fault::InternalError) {
        // The statement was created, but the answer is lost.
        return error(StatusCode::INTERNAL_SERVER_ERROR, "390400", "Internal error.");
    }
    let wait =
        if params.get("async").map(String::as_str) == Some("true") { Duration::ZERO } else { inner.config.sync_wait };
    answer(&inner, &handle, wait).await
}

/// Checks the body and starts running the statement; its handle.
fn start_statement(
    inner: &Arc<Inner>,
    request: &Value,
    request_id: Option<String>,
    force_timeout: bool,
) -> Result<String, Response> {
    let Some(sql) = request["statement"].as_str().filter(|s| !s.trim().is_empty()) else {
        return Err(error(StatusCode::BAD_REQUEST, "390142", "Incoming request does not contain a valid payload."));
    };
    const FIELDS: [&str; 8] =
        ["statement", "timeout", "database", "schema", "warehouse", "role", "bindings", "parameters"];
    if let Some(unknown) = request.as_object().and_then(|o| o.keys().find(|k| !FIELDS.contains(&k.as_str()))) {
        return Err(error(StatusCode::BAD_REQUEST, "390142", &format!("Unknown field {unknown}.")));
    }
    if request.get("parameters").is_some_and(|p| !p.as_object().is_some_and(|o| o.is_empty())) {
        return Err(error(StatusCode::BAD_REQUEST, "390142", "This stand-in accepts no session parameters."));
    }
    let first_word = sql.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
    if first_word == "USE" {
        return Err(failure("000002", "0A000", "Unsupported feature 'USE' in the SQL API."));
    }
    let timeout = match request["timeout"].as_u64() {
        Some(0) | None => Duration::from_secs(604_800),
        Some(s) => Duration::from_secs(s),
    };
    let handle = pg::uuid();
    let (tx, rx) = watch::channel(Outcome::Running);
    inner.executions.fetch_add(1, Ordering::SeqCst);
    let run = tokio::spawn(execute(
        inner.clone(),
        sql.to_owned(),
        request["schema"].as_str().map(str::to_owned),
        if force_timeout { Duration::ZERO } else { timeout },
        timeout.as_secs(),
        tx,
    ));
    if let Some(id) = &request_id {
        inner.by_request_id.lock().unwrap().insert(id.clone(), handle.clone());
    }
    inner.statements.lock().unwrap().insert(
        handle.clone(),
        Statement { outcome: rx, pending_polls: inner.config.pending_polls, task: run.abort_handle() },
    );
    Ok(handle)
}

fn failure(code: &str, sql_state: &str, message: &str) -> Response {
    let body = json!({ "code": code, "sqlState": sql_state, "message": message });
    (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
}

/// Runs the statement and publishes its outcome.
async fn execute(
    inner: Arc<Inner>,
    sql: String,
    schema: Option<String>,
    timeout: Duration,
    timeout_secs: u64,
    tx: watch::Sender<Outcome>,
) {
    let sql = sql.trim().trim_end_matches(';').to_owned();
    let mut builder = ResultBuilder::new(inner.config.partition_rows, inner.config.wrapped_partitions);
    let ran = if timeout.is_zero() {
        Err(QueryError::Timeout)
    } else {
        pg::run_query(
            &inner.config.database_url,
            &sql,
            schema.as_deref(),
            timeout,
            inner.config.partition_rows,
            |cols, rows| builder.page(cols, rows),
        )
        .await
    };
    let outcome = match ran {
        Ok((columns, _)) => Outcome::Done(Arc::new(builder.finish(&columns))),
        Err(QueryError::Timeout) => Outcome::Failed(
            StatusCode::REQUEST_TIMEOUT,
            json!({
                "code": "000630",
                "sqlState": "57014",
                "message": format!("Statement reached its statement or warehouse timeout of {timeout_secs} second(s) and was canceled."),
            }),
        ),
        Err(QueryError::Database { sqlstate, message, position }) => {
            let (code, text) = match sqlstate.as_str() {
                "42601" => (
                    "001003",
                    format!(
                        "SQL compilation error:\nsyntax error line 1 at position {}: {message}",
                        position.unwrap_or(0)
                    ),
                ),
                "42P01" | "42703" => ("002003", format!("SQL compilation error:\n{message}")),
                "42501" => ("003001", format!("SQL access control error:\n{message}")),
                // The extended protocol takes one statement: as Snowflake's MULTI_STATEMENT_COUNT=1.
                "42000" if message.contains("multiple commands") => {
                    ("000008", "Actual statement count 2 did not match the desired statement count 1.".to_owned())
                }
                _ => ("100000", message.clone()),
            };
            Outcome::Failed(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "code": code, "sqlState": sqlstate, "message": text }),
            )
        }
        Err(QueryError::Connection(e)) => Outcome::Failed(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "code": "390400", "message": format!("Internal error: {e}") }),
        ),
    };
    let _ = tx.send(outcome);
}

/// The statement's answer: waits up to `wait` for it to finish, then 200/202/4xx.
async fn answer(inner: &Arc<Inner>, handle: &str, wait: Duration) -> Response {
    let Some((mut outcome, pending)) = inner.statement(handle) else {
        return failure("000709", "02000", &format!("Statement {handle} not found"));
    };
    if !pending {
        let _ = tokio::time::timeout(wait, outcome.wait_for(|o| !matches!(o, Outcome::Running))).await;
    }
    let current = outcome.borrow().clone();
    let running = || {
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({
                "code": "333334",
                "message": "Asynchronous execution in progress. Use provided query id to perform query monitoring and management.",
                "statementHandle": handle,
                "statementStatusUrl": format!("/api/v2/statements/{handle}"),
            })),
        )
            .into_response()
    };
    match current {
        _ if pending => running(),
        Outcome::Running => running(),
        Outcome::Cancelled => failure("000604", "57014", "SQL execution canceled"),
        Outcome::Failed(status, mut body) => {
            body["statementHandle"] = json!(handle);
            (status, axum::Json(body)).into_response()
        }
        Outcome::Done(result) => result_set(handle, &result),
    }
}

fn result_set(handle: &str, result: &ResultData) -> Response {
    let partition_info: Vec<Value> =
        result.counts.iter().map(|(rows, size)| json!({ "rowCount": rows, "uncompressedSize": size })).collect();
    let meta = json!({
        "numRows": result.num_rows,
        "format": "jsonv2",
        "partitionInfo": partition_info,
        "rowType": result.row_type,
    });
    // The rows are already serialized; splice them in rather than parse them again.
    let head = json!({
        "resultSetMetaData": meta,
        "code": "090001",
        "statementStatusUrl": format!("/api/v2/statements/{handle}"),
        "sqlState": "00000",
        "statementHandle": handle,
        "message": "Statement executed successfully.",
        "createdOn": jiff::Timestamp::now().as_millisecond(),
    })
    .to_string();
    let body = format!("{},\"data\":{}}}", &head[..head.len() - 1], result.first);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn status(
    State(inner): State<Arc<Inner>>,
    Path(handle): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let partition = match params.get("partition").map(|p| p.parse::<usize>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "390142", "partition must be a number."),
    };
    let target = partition.filter(|&n| n > 0).map_or(FaultTarget::Poll, FaultTarget::Partition);
    let fault = inner.faults.take(target);
    if let Err(response) = inner.authenticate(&headers, fault == Some(Fault::ExpiredToken)) {
        return response;
    }
    if let Some(response) = fault.and_then(fault_response) {
        return response;
    }
    match partition {
        None | Some(0) => answer(&inner, &handle, Duration::ZERO).await,
        Some(n) => {
            inner.partition_requests.fetch_add(1, Ordering::SeqCst);
            serve_partition(&inner, &handle, n, fault == Some(Fault::TruncatedPartition))
        }
    }
}

fn serve_partition(inner: &Inner, handle: &str, n: usize, truncated: bool) -> Response {
    let outcome = inner.statements.lock().unwrap().get(handle).map(|s| s.outcome.borrow().clone());
    match outcome {
        None => failure("000709", "02000", &format!("Statement {handle} not found")),
        Some(Outcome::Done(result)) => match result.rest.get(n - 1) {
            None => error(StatusCode::BAD_REQUEST, "390142", &format!("Partition {n} is out of range.")),
            Some(body) => {
                let body = if truncated { result.truncated_rest[n - 1].clone() } else { body.clone() };
                ([(header::CONTENT_TYPE, "application/json"), (header::CONTENT_ENCODING, "gzip")], Body::from(body))
                    .into_response()
            }
        },
        Some(Outcome::Running) => {
            (StatusCode::ACCEPTED, axum::Json(json!({ "code": "333334", "statementHandle": handle }))).into_response()
        }
        Some(Outcome::Cancelled) => failure("000604", "57014", "SQL execution canceled"),
        Some(Outcome::Failed(status, body)) => (status, axum::Json(body)).into_response(),
    }
}

async fn cancel(State(inner): State<Arc<Inner>>, Path(handle): Path<String>, headers: HeaderMap) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    if let Err(response) = inner.authenticate(&headers, false) {
        return response;
    }
    let mut statements = inner.statements.lock().unwrap();
    let Some(statement) = statements.get_mut(&handle) else {
        return failure("000709", "02000", &format!("Statement {handle} not found"));
    };
    inner.cancels.fetch_add(1, Ordering::SeqCst);
    statement.task.abort();
    if matches!(*statement.outcome.borrow(), Outcome::Running) {
        let (tx, rx) = watch::channel(Outcome::Cancelled);
        drop(tx);
        statement.outcome = rx;
    }
    (
        StatusCode::OK,
        axum::Json(json!({ "code": "000604", "sqlState": "57014", "message": "SQL execution canceled", "statementHandle": handle })),
    )
        .into_response()
}

/// Builds partitions as pages of rows arrive.
struct ResultBuilder {
    partition_rows: usize,
    wrapped: bool,
    pending: Rows,
    first: Option<String>,
    rest: Vec<Vec<u8>>,
    truncated_rest: Vec<Vec<u8>>,
    counts: Vec<(u64, u64)>,
    num_rows: u64,
    scales: Vec<u32>,
}

impl ResultBuilder {
    fn new(partition_rows: usize, wrapped: bool) -> Self {
        ResultBuilder {
            partition_rows: partition_rows.max(1),
            wrapped,
            pending: Vec::new(),
            first: None,
            rest: Vec::new(),
            truncated_rest: Vec::new(),
            counts: Vec::new(),
            num_rows: 0,
            scales: Vec::new(),
        }
    }

    fn page(&mut self, columns: &[Column], rows: Rows) {
        self.scales.resize(columns.len(), 0);
        for mut row in rows {
            for (i, cell) in row.iter_mut().enumerate() {
                if let Some(text) = cell {
                    if columns[i].pg_type == tokio_postgres::types::Type::NUMERIC
                        && let Some((_, frac)) = text.split_once('.')
                    {
                        self.scales[i] = self.scales[i].max(frac.len() as u32);
                    }
                    *text = render(&columns[i].pg_type, std::mem::take(text));
                }
            }
            self.pending.push(row);
            if self.pending.len() == self.partition_rows {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        let rows = std::mem::take(&mut self.pending);
        let json = serde_json::to_string(&rows).expect("rows serialize");
        self.num_rows += rows.len() as u64;
        self.counts.push((rows.len() as u64, json.len() as u64));
        if self.first.is_none() {
            self.first = Some(json);
            return;
        }
        let mut short = rows;
        short.pop();
        let short = serde_json::to_string(&short).expect("rows serialize");
        let wrap = |j: &str| if self.wrapped { format!("{{\"data\":{j}}}") } else { j.to_owned() };
        self.rest.push(gzip(wrap(&json).as_bytes()));
        self.truncated_rest.push(gzip(wrap(&short).as_bytes()));
    }

    fn finish(mut self, columns: &[Column]) -> ResultData {
        if !self.pending.is_empty() || self.first.is_none() {
            self.flush();
        }
        self.scales.resize(columns.len(), 0);
        let row_type = columns.iter().zip(&self.scales).map(|(c, &scale)| row_type(c, scale)).collect();
        ResultData {
            row_type,
            num_rows: self.num_rows,
            first: self.first.unwrap_or_else(|| "[]".to_owned()),
            rest: self.rest,
            counts: self.counts,
            truncated_rest: self.truncated_rest,
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("in-memory gzip");
    encoder.finish().expect("in-memory gzip")
}

/// Snowflake's type name for a PostgreSQL column type.
fn snowflake_type(t: &tokio_postgres::types::Type) -> &'static str {
    use tokio_postgres::types::Type;
    match *t {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::NUMERIC | Type::OID => "fixed",
        Type::FLOAT4 | Type::FLOAT8 => "real",
        Type::BOOL => "boolean",
        Type::DATE => "date",
        Type::TIMESTAMP => "timestamp_ntz",
        Type::TIMESTAMPTZ => "timestamp_ltz",
        Type::JSON | Type::JSONB => "variant",
        Type::BYTEA => "binary",
        _ if t.name().starts_with('_') => "array",
        _ => "text",
    }
}

fn row_type(column: &Column, scale: u32) -> Value {
    let ty = snowflake_type(&column.pg_type);
    let name = if pg::folded_identifier(&column.name) { column.name.to_uppercase() } else { column.name.clone() };
    json!({
        "name": name,
        "database": "", "schema": "", "table": "",
        "type": ty,
        "scale": if ty == "fixed" { json!(scale) } else { Value::Null },
        "precision": if ty == "fixed" { json!(38) } else { Value::Null },
        "length": if ty == "text" { json!(16_777_216) } else { Value::Null },
        "byteLength": if ty == "text" { json!(16_777_216) } else { Value::Null },
        "nullable": true,
        "collation": Value::Null,
    })
}

/// A PostgreSQL text value as Snowflake renders that type by default.
fn render(t: &tokio_postgres::types::Type, text: String) -> String {
    use tokio_postgres::types::Type;
    match *t {
        Type::BOOL => if text == "t" { "true" } else { "false" }.to_owned(),
        Type::DATE => match text.parse::<jiff::civil::Date>() {
            Ok(d) => (d - jiff::civil::date(1970, 1, 1)).get_days().to_string(),
            Err(_) => text,
        },
        Type::TIMESTAMP => match text.parse::<jiff::civil::DateTime>() {
            Ok(dt) => match dt.to_zoned(jiff::tz::TimeZone::UTC) {
                Ok(z) => {
                    let ts = z.timestamp();
                    format!("{}.{:09}", ts.as_second(), ts.subsec_nanosecond())
                }
                Err(_) => text,
            },
            Err(_) => text,
        },
        _ => text,
    }
}
