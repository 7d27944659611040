//! A stand-in for the Databricks SQL Statement Execution API 2.0 and the workspace's OAuth
//! token endpoint, written from the API reference, the "Run SQL on warehouses" tutorial and
//! the OAuth M2M guide.
//!
//! Enforced: `Authorization: Bearer` with a known personal access token or an unexpired
//! token this endpoint issued; `/oidc/v1/token` takes HTTP Basic client credentials and
//! exactly `grant_type=client_credentials` with `scope=all-apis`. Request bodies: a
//! statement, the known `warehouse_id`, `wait_timeout` `0s` or `5s`–`50s`, the documented
//! enums, `ARROW_STREAM`/`CSV` only with `EXTERNAL_LINKS` (this stand-in serves
//! `JSON_ARRAY` only), no unknown fields → 400 `INVALID_PARAMETER_VALUE`.
//!
//! Statements run on PostgreSQL (read-only): `PENDING` → `RUNNING` → `SUCCEEDED`/`FAILED`
//! (SQL errors are HTTP 200 with `FAILED`), `CANCELED` on cancel or
//! `on_wait_timeout=CANCEL`, `CLOSED` after `result_ttl`; unknown ids → 404. Results come
//! in chunks of `chunk_rows` with a consistent manifest, `next_chunk_index` /
//! `next_chunk_internal_link` on all but the last; `INLINE` results over 25 MiB fail the
//! statement; `EXTERNAL_LINKS` chunks are served from `/external/…` links that expire and
//! refuse any `Authorization` header. Values are strings or null; `DOUBLE`s are written as
//! Spark writes them (`1.23456789E9`, `42.0`).

// Handlers refuse a request with the HTTP response itself: an axum `Response` as the error.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_postgres::types::Type;

use crate::pg::{self, Column, QueryError, Rows};
use crate::serve::{Faults, Server};

/// Largest `INLINE` result.
const INLINE_LIMIT: u64 = 25 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct DatabricksConfig {
    pub database_url: String,
    pub warehouse_id: String,
    /// Personal access tokens accepted.
    pub tokens: Vec<String>,
    /// OAuth clients (service principals): client id and secret.
    pub clients: Vec<(String, String)>,
    /// `expires_in` of issued OAuth tokens.
    pub token_lifetime: Duration,
    pub chunk_rows: usize,
    /// Status answers (the POST's included) that report `PENDING`/`RUNNING` before the result.
    pub pending_polls: u32,
    /// How long a finished result stays fetchable before the statement is `CLOSED`.
    pub result_ttl: Duration,
    /// How long an external link works.
    pub link_ttl: Duration,
    /// A hostile workspace: every external link answers with a redirect to this URL.
    pub link_redirect: Option<String>,
    /// A hostile workspace: `next_chunk_internal_link` is absolute, on this base
    /// (`http://host:port`), instead of a path on the workspace.
    pub internal_link_base: Option<String>,
}

impl DatabricksConfig {
    pub fn new(database_url: &str, warehouse_id: &str) -> Self {
        DatabricksConfig {
            database_url: database_url.to_owned(),
            warehouse_id: warehouse_id.to_owned(),
            tokens: Vec::new(),
            clients: Vec::new(),
            token_lifetime: Duration::from_secs(3600),
            chunk_rows: 10_000,
            pending_polls: 0,
            result_ttl: Duration::from_secs(3600),
            link_ttl: Duration::from_secs(900),
            link_redirect: None,
            internal_link_base: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    Token,
    Submit,
    Poll,
    /// `GET …/result/chunks/N`.
    Chunk(usize),
    /// The external link of chunk N.
    Link(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After: 1`.
    TooManyRequests,
    /// 503 `TEMPORARILY_UNAVAILABLE`.
    Unavailable,
    /// The request's bearer token is taken as expired: 401.
    ExpiredToken,
    /// The statement fails with `DEADLINE_EXCEEDED` (the warehouse's statement timeout).
    StatementTimeout,
    /// The statement fails with `PERMISSION_DENIED` / `[INSUFFICIENT_PERMISSIONS]`.
    PermissionDenied,
    /// The statement fails with `TEMPORARILY_UNAVAILABLE` (the client may resubmit).
    TransientFailure,
    /// The chunk (or link body) is served without its last row.
    TruncatedChunk,
    /// The external link has expired: 403 from storage.
    ExpiredLink,
}

#[derive(Clone, Debug)]
enum Outcome {
    Running,
    Done(Arc<ResultSet>),
    Failed { code: String, message: String, sql_state: Option<String> },
    Canceled,
}

#[derive(Debug)]
struct ResultSet {
    columns: Vec<Value>,
    /// Each chunk's serialized rows and row count.
    chunks: Vec<(String, u64)>,
    total_rows: u64,
    bytes: u64,
    external: bool,
    finished: Instant,
}

struct Statement {
    outcome: watch::Receiver<Outcome>,
    pending: u32,
    task: tokio::task::AbortHandle,
    cancelled: bool,
}

struct Inner {
    config: DatabricksConfig,
    base: Mutex<String>,
    statements: Mutex<HashMap<String, Statement>>,
    issued: Mutex<HashMap<String, Instant>>,
    links: Mutex<HashMap<String, (String, usize, Instant)>>,
    faults: Faults<FaultTarget, Fault>,
    executions: AtomicU64,
    cancels: AtomicU64,
    tokens_issued: AtomicU64,
    link_fetches: AtomicU64,
    authorization_on_link: AtomicBool,
}

pub struct RunningDatabricks {
    inner: Arc<Inner>,
    server: Server,
}

impl RunningDatabricks {
    pub async fn start(config: DatabricksConfig) -> anyhow::Result<RunningDatabricks> {
        Self::start_on(config, "127.0.0.1:0".parse().expect("address")).await
    }

    pub async fn start_on(config: DatabricksConfig, addr: SocketAddr) -> anyhow::Result<RunningDatabricks> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            config,
            base: Mutex::new(format!("http://{addr}")),
            statements: Mutex::default(),
            issued: Mutex::default(),
            links: Mutex::default(),
            faults: Faults::default(),
            executions: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            link_fetches: AtomicU64::new(0),
            authorization_on_link: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/oidc/v1/token", post(token))
            .route("/api/2.0/sql/statements", post(submit))
            .route("/api/2.0/sql/statements/{id}", get(status))
            .route("/api/2.0/sql/statements/{id}/cancel", post(cancel))
            .route("/api/2.0/sql/statements/{id}/result/chunks/{index}", get(chunk))
            .route("/external/{link}", get(external))
            .with_state(inner.clone());
        let server = Server::serve(listener, app)?;
        Ok(RunningDatabricks { inner, server })
    }

    /// The workspace URL (`host` of the source).
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn inject(&self, target: FaultTarget, fault: Fault) {
        self.inner.faults.push(target, fault);
    }

    pub fn executions(&self) -> u64 {
        self.inner.executions.load(Ordering::SeqCst)
    }

    pub fn cancels(&self) -> u64 {
        self.inner.cancels.load(Ordering::SeqCst)
    }

    pub fn tokens_issued(&self) -> u64 {
        self.inner.tokens_issued.load(Ordering::SeqCst)
    }

    pub fn link_fetches(&self) -> u64 {
        self.inner.link_fetches.load(Ordering::SeqCst)
    }

    /// Whether any external link request carried an `Authorization` header.
    pub fn authorization_sent_to_links(&self) -> bool {
        self.inner.authorization_on_link.load(Ordering::SeqCst)
    }
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "error_code": code, "message": message }))).into_response()
}

fn invalid(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

impl Inner {
    fn authenticate(&self, headers: &HeaderMap, fault: Option<Fault>) -> Result<(), Response> {
        let unauthenticated = || {
            api_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "Credential was not sent or was of an unsupported type for this API.",
            )
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(unauthenticated)?;
        if fault == Some(Fault::ExpiredToken) {
            return Err(api_error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "Token expired."));
        }
        let known = self.config.tokens.iter().any(|t| t == token)
            || self.issued.lock().unwrap().get(token).is_some_and(|expires| Instant::now() < *expires);
        if !known {
            return Err(api_error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "Invalid access token."));
        }
        match fault {
            Some(Fault::TooManyRequests) => Err((
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                axum::Json(json!({
                    "error_code": "REQUEST_LIMIT_EXCEEDED", "message": "Too many requests."
                })),
            )
                .into_response()),
            Some(Fault::Unavailable) => Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "TEMPORARILY_UNAVAILABLE",
                "The service is temporarily unavailable.",
            )),
            _ => Ok(()),
        }
    }
}

async fn token(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let oauth_error = |status, error: &str, description: &str| {
        (status, axum::Json(json!({ "error": error, "error_description": description }))).into_response()
    };
    if let Some(f @ (Fault::TooManyRequests | Fault::Unavailable)) = inner.faults.take(FaultTarget::Token) {
        let status =
            if f == Fault::Unavailable { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::TOO_MANY_REQUESTS };
        return oauth_error(status, "temporarily_unavailable", "Try again later.");
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded.",
        );
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let Some((id, secret)) = basic.as_deref().and_then(|b| b.split_once(':')) else {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication failed.");
    };
    if !inner.config.clients.iter().any(|(i, s)| i == id && s == secret) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication failed.");
    }
    let form: HashMap<String, String> = url_form(&body);
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials.",
        );
    }
    if form.get("scope").map(String::as_str) != Some("all-apis") {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", "scope must be all-apis.");
    }
    let token = format!("dsa{}", pg::uuid().replace('-', ""));
    inner.issued.lock().unwrap().insert(token.clone(), Instant::now() + inner.config.token_lifetime);
    inner.tokens_issued.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": inner.config.token_lifetime.as_secs(),
        "scope": "all-apis",
    }))
    .into_response()
}

/// `application/x-www-form-urlencoded` pairs.
fn url_form(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Some(b) =
                    std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (decode(k), decode(v))))
        .collect()
}

/// The request body's fields, checked as the reference describes them.
struct Request {
    statement: String,
    schema: Option<String>,
    wait: Duration,
    cancel_on_wait: bool,
    external: bool,
}

fn parse_request(inner: &Inner, body: &[u8]) -> Result<Request, Response> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|_| api_error(StatusCode::BAD_REQUEST, "MALFORMED_REQUEST", "Invalid JSON."))?;
    const FIELDS: [&str; 13] = [
        "statement",
        "warehouse_id",
        "catalog",
        "schema",
        "parameters",
        "wait_timeout",
        "on_wait_timeout",
        "disposition",
        "format",
        "row_limit",
        "byte_limit",
        "query_tags",
        "result_compression",
    ];
    if let Some(unknown) = request.as_object().and_then(|o| o.keys().find(|k| !FIELDS.contains(&k.as_str()))) {
        return Err(invalid(&format!("Unknown field: {unknown}")));
    }
    let statement = request["statement"]
        .as_str()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid("statement is required"))?;
    if request["warehouse_id"].as_str() != Some(inner.config.warehouse_id.as_str()) {
        return Err(invalid("warehouse_id does not name a SQL warehouse of this workspace"));
    }
    let wait = match request["wait_timeout"].as_str().unwrap_or("10s") {
        "0s" => Duration::ZERO,
        w => match w.strip_suffix('s').and_then(|n| n.parse::<u64>().ok()) {
            Some(n) if (5..=50).contains(&n) => Duration::from_secs(n),
            _ => return Err(invalid("wait_timeout must be 0s or between 5s and 50s")),
        },
    };
    let cancel_on_wait = match request["on_wait_timeout"].as_str().unwrap_or("CONTINUE") {
        "CONTINUE" => false,
        "CANCEL" => true,
        _ => return Err(invalid("on_wait_timeout must be CONTINUE or CANCEL")),
    };
    let external = match request["disposition"].as_str().unwrap_or("INLINE") {
        "INLINE" => false,
        "EXTERNAL_LINKS" => true,
        _ => return Err(invalid("disposition must be INLINE or EXTERNAL_LINKS")),
    };
    match request["format"].as_str().unwrap_or("JSON_ARRAY") {
        "JSON_ARRAY" => {}
        "ARROW_STREAM" | "CSV" if !external => {
            return Err(invalid("ARROW_STREAM and CSV need disposition EXTERNAL_LINKS"));
        }
        "ARROW_STREAM" | "CSV" => return Err(invalid("this stand-in serves JSON_ARRAY only")),
        _ => return Err(invalid("format must be JSON_ARRAY, ARROW_STREAM or CSV")),
    }
    Ok(Request {
        statement: statement.to_owned(),
        schema: request["schema"].as_str().map(str::to_owned),
        wait,
        cancel_on_wait,
        external,
    })
}

async fn submit(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let fault = inner.faults.take(FaultTarget::Submit);
    if let Err(response) = inner.authenticate(&headers, fault) {
        return response;
    }
    let request = match parse_request(&inner, &body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let id = format!("01ef{}", &pg::uuid()[4..]);
    let (tx, rx) = watch::channel(Outcome::Running);
    inner.executions.fetch_add(1, Ordering::SeqCst);
    let task = tokio::spawn(execute(
        inner.clone(),
        request.statement.clone(),
        request.schema.clone(),
        request.external,
        fault,
        tx,
    ));
    inner.statements.lock().unwrap().insert(
        id.clone(),
        Statement { outcome: rx, pending: inner.config.pending_polls, task: task.abort_handle(), cancelled: false },
    );
    let response = describe(&inner, &id, request.wait).await;
    if request.cancel_on_wait && matches!(response.0.as_str(), "PENDING" | "RUNNING") {
        cancel_statement(&inner, &id);
        return describe(&inner, &id, Duration::ZERO).await.1;
    }
    response.1
}

async fn execute(
    inner: Arc<Inner>,
    sql: String,
    schema: Option<String>,
    external: bool,
    fault: Option<Fault>,
    tx: watch::Sender<Outcome>,
) {
    let failed = |code: &str, message: &str| Outcome::Failed {
        code: code.to_owned(),
        message: message.to_owned(),
        sql_state: None,
    };
    let outcome = match fault {
        Some(Fault::StatementTimeout) => {
            failed("DEADLINE_EXCEEDED", "Query has been timed out due to STATEMENT_TIMEOUT.")
        }
        Some(Fault::PermissionDenied) => failed(
            "PERMISSION_DENIED",
            "[INSUFFICIENT_PERMISSIONS] Insufficient privileges: User does not have SELECT on Table 'main.analytics.cohort'.",
        ),
        Some(Fault::TransientFailure) => failed("TEMPORARILY_UNAVAILABLE", "The SQL warehouse is restarting."),
        _ => run(&inner, &sql, schema.as_deref(), external).await,
    };
    let _ = tx.send(outcome);
}

async fn run(inner: &Inner, sql: &str, schema: Option<&str>, external: bool) -> Outcome {
    let sql = sql.trim().trim_end_matches(';');
    let mut chunks: Vec<(String, u64)> = Vec::new();
    let mut bytes = 0u64;
    let ran = pg::run_query(
        &inner.config.database_url,
        sql,
        schema,
        Duration::from_secs(3600),
        inner.config.chunk_rows,
        |cols, rows| {
            let rows: Rows = rows
                .into_iter()
                .map(|row| row.into_iter().enumerate().map(|(i, c)| c.map(|t| render(&cols[i].pg_type, t))).collect())
                .collect();
            let json = serde_json::to_string(&rows).expect("rows serialize");
            bytes += json.len() as u64;
            chunks.push((json, rows.len() as u64));
        },
    )
    .await;
    match ran {
        Ok((columns, total_rows)) => {
            if !external && bytes > INLINE_LIMIT {
                return Outcome::Failed {
                    code: "BAD_REQUEST".to_owned(),
                    message: "[INLINE_BYTE_LIMIT_EXCEEDED] The result exceeds the 25 MiB limit of INLINE disposition; use EXTERNAL_LINKS.".to_owned(),
                    sql_state: None,
                };
            }
            Outcome::Done(Arc::new(ResultSet {
                columns: schema_of(&columns),
                chunks,
                total_rows,
                bytes,
                external,
                finished: Instant::now(),
            }))
        }
        Err(QueryError::Database { sqlstate, message, .. }) => {
            let (code, text) = match sqlstate.as_str() {
                "42601" => ("BAD_REQUEST", format!("[PARSE_SYNTAX_ERROR] Syntax error: {message}")),
                "42P01" => ("BAD_REQUEST", format!("[TABLE_OR_VIEW_NOT_FOUND] {message}")),
                "42703" => ("BAD_REQUEST", format!("[UNRESOLVED_COLUMN.WITHOUT_SUGGESTION] {message}")),
                "42501" => ("PERMISSION_DENIED", format!("[INSUFFICIENT_PERMISSIONS] {message}")),
                _ => ("BAD_REQUEST", message),
            };
            Outcome::Failed { code: code.to_owned(), message: text, sql_state: Some(sqlstate) }
        }
        Err(QueryError::Timeout) => {
            Outcome::Failed { code: "DEADLINE_EXCEEDED".into(), message: "Query timed out.".into(), sql_state: None }
        }
        Err(QueryError::Connection(e)) => {
            Outcome::Failed { code: "INTERNAL_ERROR".into(), message: e, sql_state: None }
        }
    }
}

fn schema_of(columns: &[Column]) -> Vec<Value> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (type_name, type_text) = spark_type(&c.pg_type);
            json!({ "name": c.name, "position": i, "type_name": type_name, "type_text": type_text })
        })
        .collect()
}

fn spark_type(t: &Type) -> (&'static str, &'static str) {
    match *t {
        Type::INT2 => ("SHORT", "SMALLINT"),
        Type::INT4 => ("INT", "INT"),
        Type::INT8 => ("LONG", "BIGINT"),
        Type::NUMERIC => ("DECIMAL", "DECIMAL(38,18)"),
        Type::FLOAT4 => ("FLOAT", "FLOAT"),
        Type::FLOAT8 => ("DOUBLE", "DOUBLE"),
        Type::BOOL => ("BOOLEAN", "BOOLEAN"),
        Type::DATE => ("DATE", "DATE"),
        Type::TIMESTAMP | Type::TIMESTAMPTZ => ("TIMESTAMP", "TIMESTAMP"),
        Type::BYTEA => ("BINARY", "BINARY"),
        _ if t.name().starts_with('_') => ("ARRAY", "ARRAY<STRING>"),
        _ => ("STRING", "STRING"),
    }
}

/// A PostgreSQL text value as Spark's JSON_ARRAY renders the type.
fn render(t: &Type, text: String) -> String {
    match *t {
        Type::BOOL => if text == "t" { "true" } else { "false" }.to_owned(),
        Type::FLOAT4 | Type::FLOAT8 => match text.parse::<f64>() {
            // Java's Double.toString: plain with at least one decimal in [1e-3, 1e7), else E notation.
            Ok(v) if v.is_finite() && (v == 0.0 || (1e-3..1e7).contains(&v.abs())) => {
                let plain = format!("{v}");
                if plain.contains('.') { plain } else { format!("{plain}.0") }
            }
            Ok(v) if v.is_finite() => {
                let e = format!("{v:E}");
                match e.split_once('E') {
                    Some((m, exp)) if !m.contains('.') => format!("{m}.0E{exp}"),
                    _ => e,
                }
            }
            _ => text,
        },
        Type::TIMESTAMP => text.replacen(' ', "T", 1),
        _ => text,
    }
}

/// The statement's state after waiting up to `wait` for it to finish, and its JSON answer.
async fn describe(inner: &Arc<Inner>, id: &str, wait: Duration) -> (String, Response) {
    let state = {
        let mut statements = inner.statements.lock().unwrap();
        statements.get_mut(id).map(|s| {
            let pending = s.pending > 0;
            s.pending = s.pending.saturating_sub(1);
            (s.outcome.clone(), pending)
        })
    };
    let Some((mut outcome, pending)) = state else {
        return (
            "".into(),
            api_error(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("The statement {id} was not found.")),
        );
    };
    if !pending && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, outcome.wait_for(|o| !matches!(o, Outcome::Running))).await;
    }
    let current = outcome.borrow().clone();
    let (state, body) = match current {
        _ if pending => ("PENDING", json!({ "statement_id": id, "status": { "state": "PENDING" } })),
        Outcome::Running => ("RUNNING", json!({ "statement_id": id, "status": { "state": "RUNNING" } })),
        Outcome::Canceled => ("CANCELED", json!({ "statement_id": id, "status": { "state": "CANCELED" } })),
        Outcome::Failed { code, message, sql_state } => {
            let mut status = json!({ "state": "FAILED", "error": { "error_code": code, "message": message } });
            if let Some(s) = sql_state {
                status["sql_state"] = json!(s);
            }
            ("FAILED", json!({ "statement_id": id, "status": status }))
        }
        Outcome::Done(result) if result.finished.elapsed() > inner.config.result_ttl => {
            ("CLOSED", json!({ "statement_id": id, "status": { "state": "CLOSED" } }))
        }
        Outcome::Done(result) => {
            let body = json!({
                "statement_id": id,
                "status": { "state": "SUCCEEDED" },
                "manifest": manifest(&result),
                "result": chunk_body(inner, id, &result, 0, None),
            });
            ("SUCCEEDED", body)
        }
    };
    (state.to_owned(), (StatusCode::OK, axum::Json(body)).into_response())
}

fn manifest(result: &ResultSet) -> Value {
    let mut offset = 0;
    let chunks: Vec<Value> = result
        .chunks
        .iter()
        .enumerate()
        .map(|(i, (_, rows))| {
            let c = json!({ "chunk_index": i, "row_offset": offset, "row_count": rows });
            offset += rows;
            c
        })
        .collect();
    json!({
        "format": "JSON_ARRAY",
        "schema": { "column_count": result.columns.len(), "columns": result.columns },
        "total_chunk_count": result.chunks.len(),
        "chunks": chunks,
        "total_row_count": result.total_rows,
        "total_byte_count": result.bytes,
        "truncated": false,
    })
}

/// Chunk `index` as the `result` object (rows inline, or an external link).
fn chunk_body(inner: &Inner, id: &str, result: &ResultSet, index: usize, truncated: Option<()>) -> Value {
    let offset: u64 = result.chunks[..index.min(result.chunks.len())].iter().map(|(_, r)| r).sum();
    let Some((rows_json, rows)) = result.chunks.get(index) else {
        // An empty result: one chunk without rows.
        return json!({ "chunk_index": 0, "row_offset": 0, "row_count": 0 });
    };
    let mut body = json!({ "chunk_index": index, "row_offset": offset, "row_count": rows });
    let next = (index + 1 < result.chunks.len()).then(|| index + 1);
    if result.external {
        let link = pg::uuid();
        inner
            .links
            .lock()
            .unwrap()
            .insert(link.clone(), (id.to_owned(), index, Instant::now() + inner.config.link_ttl));
        let base = inner.base.lock().unwrap().clone();
        let mut entry = json!({
            "chunk_index": index, "row_offset": offset, "row_count": rows,
            "external_link": format!("{base}/external/{link}?X-Amz-Signature={}", pg::uuid().replace('-', "")),
            "expiration": (jiff::Timestamp::now() + inner.config.link_ttl).to_string(),
        });
        if let Some(n) = next {
            entry["next_chunk_index"] = json!(n);
            entry["next_chunk_internal_link"] = json!(internal_link(inner, id, n));
        }
        body["external_links"] = json!([entry]);
    } else {
        let data: Value = if truncated.is_some() {
            let mut rows: Vec<Value> = serde_json::from_str(rows_json).expect("own rows");
            rows.pop();
            Value::Array(rows)
        } else {
            serde_json::from_str(rows_json).expect("own rows")
        };
        body["data_array"] = data;
    }
    if let Some(n) = next {
        body["next_chunk_index"] = json!(n);
        body["next_chunk_internal_link"] = json!(internal_link(inner, id, n));
    }
    body
}

/// The path of chunk `n`, or an absolute URL elsewhere for a hostile workspace.
fn internal_link(inner: &Inner, id: &str, n: usize) -> String {
    let base = inner.config.internal_link_base.as_deref().unwrap_or_default();
    format!("{base}/api/2.0/sql/statements/{id}/result/chunks/{n}")
}

async fn status(State(inner): State<Arc<Inner>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let fault = inner.faults.take(FaultTarget::Poll);
    if let Err(response) = inner.authenticate(&headers, fault) {
        return response;
    }
    describe(&inner, &id, Duration::ZERO).await.1
}

async fn chunk(
    State(inner): State<Arc<Inner>>,
    Path((id, index)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Ok(index) = index.parse::<usize>() else { return invalid("chunk_index must be a number") };
    let fault = inner.faults.take(FaultTarget::Chunk(index));
    if let Err(response) = inner.authenticate(&headers, fault) {
        return response;
    }
    let outcome = inner.statements.lock().unwrap().get(&id).map(|s| s.outcome.borrow().clone());
    match outcome {
        None => api_error(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("The statement {id} was not found.")),
        Some(Outcome::Done(result)) if result.finished.elapsed() > inner.config.result_ttl => api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_STATE",
            "The statement is CLOSED; its result is no longer available.",
        ),
        Some(Outcome::Done(result)) if index < result.chunks.len().max(1) => {
            let truncated = (fault == Some(Fault::TruncatedChunk)).then_some(());
            axum::Json(chunk_body(&inner, &id, &result, index, truncated)).into_response()
        }
        Some(Outcome::Done(_)) => invalid(&format!("chunk_index {index} is out of range")),
        Some(_) => {
            api_error(StatusCode::BAD_REQUEST, "INVALID_STATE", "The statement has not succeeded; no result to fetch.")
        }
    }
}

async fn external(
    State(inner): State<Arc<Inner>>,
    Path(link): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    inner.link_fetches.fetch_add(1, Ordering::SeqCst);
    if let Some(to) = &inner.config.link_redirect {
        return (StatusCode::FOUND, [(header::LOCATION, to.clone())]).into_response();
    }
    if headers.contains_key(header::AUTHORIZATION) {
        // As cloud storage: a signed URL and an Authorization header are two auth mechanisms.
        inner.authorization_on_link.store(true, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
        )
            .into_response();
    }
    let denied = || {
        (StatusCode::FORBIDDEN, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
            .into_response()
    };
    let Some((id, index, expires)) = inner.links.lock().unwrap().get(&link).cloned() else { return denied() };
    if !params.contains_key("X-Amz-Signature") || Instant::now() > expires {
        return denied();
    }
    let fault = inner.faults.take(FaultTarget::Link(index));
    if fault == Some(Fault::ExpiredLink) {
        inner.links.lock().unwrap().remove(&link);
        return denied();
    }
    let outcome = inner.statements.lock().unwrap().get(&id).map(|s| s.outcome.borrow().clone());
    let Some(Outcome::Done(result)) = outcome else { return denied() };
    let Some((rows, _)) = result.chunks.get(index) else { return denied() };
    let body = if fault == Some(Fault::TruncatedChunk) {
        let mut rows: Vec<Value> = serde_json::from_str(rows).expect("own rows");
        rows.pop();
        serde_json::to_string(&rows).expect("rows")
    } else {
        rows.clone()
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn cancel_statement(inner: &Inner, id: &str) -> bool {
    let mut statements = inner.statements.lock().unwrap();
    let Some(statement) = statements.get_mut(id) else { return false };
    inner.cancels.fetch_add(1, Ordering::SeqCst);
    statement.task.abort();
    if matches!(*statement.outcome.borrow(), Outcome::Running) && !statement.cancelled {
        let (tx, rx) = watch::channel(Outcome::Canceled);
        drop(tx);
        statement.outcome = rx;
        statement.cancelled = true;
        statement.pending = 0;
    }
    true
}

async fn cancel(State(inner): State<Arc<Inner>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(response) = inner.authenticate(&headers, None) {
        return response;
    }
    if cancel_statement(&inner, &id) {
        axum::Json(json!({})).into_response()
    } else {
        api_error(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("The statement {id} was not found."))
    }
}
