//! BigQuery REST v2 shapes the source sends and reads (`jobs.query`,
//! `jobs.getQueryResults`, the error envelope), and what each error means for a run.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::source::warehouse::Backoff;

/// Attempts at one request (the first included) before a transient error is final.
pub const ATTEMPTS: u32 = 6;

/// How a transient error (an API call, a token request) is retried: [`ATTEMPTS`] in all,
/// waits from 0.2 s doubling up to 8 s — brief, since a job that keeps failing is better
/// submitted again as a new one.
pub fn retries() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(8), ATTEMPTS - 1)
}

/// `POST …/projects/{projectId}/queries`.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct QueryRequest<'a> {
    pub query: &'a str,
    /// The API's default is legacy SQL.
    pub use_legacy_sql: bool,
    pub max_results: u32,
    /// How long the call waits for the job; not a query timeout.
    pub timeout_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<&'a str>,
    /// int64 fields travel as JSON strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_bytes_billed: Option<String>,
    /// Makes a resubmission after a lost answer return the same job.
    pub request_id: &'a str,
    pub format_options: FormatOptions,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct FormatOptions {
    /// TIMESTAMP as integer microseconds instead of float seconds (`1.56E9`).
    pub use_int64_timestamp: bool,
}

/// The fields of `bigquery#queryResponse` and `bigquery#getQueryResultsResponse` the
/// source reads. `schema`, `rows` and `totalRows` come only once the job is complete.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueryResponse {
    pub job_reference: Option<JobReference>,
    #[serde(default)]
    pub job_complete: bool,
    pub schema: Option<Schema>,
    #[serde(default, deserialize_with = "int64")]
    pub total_rows: Option<u64>,
    pub page_token: Option<String>,
    #[serde(default)]
    pub rows: Vec<Row>,
    #[serde(default)]
    pub errors: Vec<ErrorProto>,
}

#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JobReference {
    pub project_id: String,
    pub job_id: String,
    pub location: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Schema {
    #[serde(default)]
    pub fields: Vec<Field>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: String,
    pub mode: Option<String>,
}

/// `{"f":[{"v":…}, …]}`: one cell per top-level schema field, in schema order.
#[derive(Deserialize, Debug)]
pub struct Row {
    pub f: Vec<Cell>,
}

#[derive(Deserialize, Debug)]
pub struct Cell {
    /// A string, null, or for REPEATED/RECORD fields an array or object.
    #[serde(default)]
    pub v: serde_json::Value,
}

/// `ErrorProto`: `reason` is what decides; `message` is for people.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct ErrorProto {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

/// `{"error":{"code":403,"message":"…","errors":[{"reason":"…"}],"status":"…"}}`. Not
/// every error response carries it.
#[derive(Deserialize, Debug, Default)]
pub struct ErrorEnvelope {
    #[serde(default)]
    pub error: ErrorBody,
}

#[derive(Deserialize, Debug, Default)]
pub struct ErrorBody {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub errors: Vec<ErrorProto>,
    #[serde(default)]
    pub status: String,
}

/// int64 fields arrive as JSON strings; accept a number too.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(u64),
    }
    match Option::<Int>::deserialize(d)? {
        None => Ok(None),
        Some(Int::Number(n)) => Ok(Some(n)),
        Some(Int::Text(s)) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// An HTTP error answer from the API: status, the first error reason, Google's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub reason: String,
    pub message: String,
}

impl ApiError {
    /// Reads the error envelope if there is one; a body without it keeps only the status.
    pub fn parse(status: u16, body: &[u8]) -> ApiError {
        let envelope: ErrorEnvelope = serde_json::from_slice(body).unwrap_or_default();
        let first = envelope.error.errors.first().cloned().unwrap_or_default();
        let reason = if first.reason.is_empty() { envelope.error.status } else { first.reason };
        let message = if envelope.error.message.is_empty() { first.message } else { envelope.error.message };
        ApiError { status, reason, message }
    }

    /// What the run does about it. The reason decides before the status: BigQuery answers
    /// 403 for rate limits and for missing permissions alike, and `bytesBilledLimitExceeded`
    /// has been seen as 400 and as 500.
    pub fn class(&self) -> ErrorClass {
        match self.reason.as_str() {
            "rateLimitExceeded"
            | "backendError"
            | "internalError"
            | "badGateway"
            | "jobRateLimitExceeded"
            | "jobBackendError"
            | "jobInternalError" => ErrorClass::Transient,
            "bytesBilledLimitExceeded" => ErrorClass::BytesBilledLimit,
            "invalidQuery" => ErrorClass::InvalidQuery,
            "accessDenied" | "PERMISSION_DENIED" => ErrorClass::PermissionDenied,
            "quotaExceeded" => ErrorClass::QuotaExceeded,
            "notFound" | "NOT_FOUND" => ErrorClass::NotFound,
            "timeout" | "stopped" => ErrorClass::JobTimeout,
            _ => match self.status {
                401 => ErrorClass::Unauthenticated,
                403 => ErrorClass::PermissionDenied,
                404 => ErrorClass::NotFound,
                408 | 429 | 500 | 502 | 503 | 504 => ErrorClass::Transient,
                _ => ErrorClass::Other,
            },
        }
    }
}

/// What an error answer means for the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try the same request again after a backoff.
    Transient,
    /// The access token was refused: get a new one, once.
    Unauthenticated,
    PermissionDenied,
    InvalidQuery,
    BytesBilledLimit,
    /// Long-term quota (BigQuery asks to wait ≥ 10 minutes): fail, the next run retries.
    QuotaExceeded,
    NotFound,
    /// The job itself timed out or was stopped on BigQuery's side.
    JobTimeout,
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, body: &str) -> ApiError {
        ApiError::parse(status, body.as_bytes())
    }

    #[test]
    fn the_reason_decides_before_the_status() {
        let rate = r#"{"error":{"code":403,"message":"Exceeded rate limits","errors":[{"domain":"global","reason":"rateLimitExceeded","message":"x"}]}}"#;
        assert_eq!(err(403, rate).class(), ErrorClass::Transient);
        let denied =
            r#"{"error":{"code":403,"message":"Access Denied: Project p","errors":[{"reason":"accessDenied"}]}}"#;
        assert_eq!(err(403, denied).class(), ErrorClass::PermissionDenied);
        assert_eq!(err(403, denied).message, "Access Denied: Project p");
        let billed = r#"{"error":{"code":500,"message":"Query exceeded limit for bytes billed: 1000.","errors":[{"reason":"bytesBilledLimitExceeded"}]}}"#;
        assert_eq!(err(500, billed).class(), ErrorClass::BytesBilledLimit);
        assert_eq!(
            err(400, r#"{"error":{"errors":[{"reason":"invalidQuery","message":"Syntax error"}]}}"#).class(),
            ErrorClass::InvalidQuery
        );
        assert_eq!(err(403, r#"{"error":{"errors":[{"reason":"quotaExceeded"}]}}"#).class(), ErrorClass::QuotaExceeded);
        assert_eq!(err(503, r#"{"error":{"errors":[{"reason":"backendError"}]}}"#).class(), ErrorClass::Transient);
    }

    #[test]
    fn bodiless_errors_fall_back_to_the_status() {
        assert_eq!(err(502, "<html>bad gateway</html>").class(), ErrorClass::Transient);
        assert_eq!(err(429, "").class(), ErrorClass::Transient);
        assert_eq!(
            err(401, r#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#).class(),
            ErrorClass::Unauthenticated
        );
        assert_eq!(err(403, "").class(), ErrorClass::PermissionDenied);
        assert_eq!(err(418, "").class(), ErrorClass::Other);
    }

    #[test]
    fn responses_parse_with_int64_strings_and_without_rows() {
        let r: QueryResponse = serde_json::from_str(
            r#"{"kind":"bigquery#queryResponse","jobReference":{"projectId":"p","jobId":"j","location":"EU"},"jobComplete":false}"#,
        )
        .unwrap();
        assert!(!r.job_complete && r.rows.is_empty() && r.total_rows.is_none());
        let r: QueryResponse = serde_json::from_str(
            r#"{"jobComplete":true,"totalRows":"2","schema":{"fields":[{"name":"id","type":"INTEGER","mode":"NULLABLE"}]},"rows":[{"f":[{"v":"1"}]},{"f":[{"v":null}]}]}"#,
        )
        .unwrap();
        assert_eq!((r.total_rows, r.rows.len()), (Some(2), 2));
        assert!(r.rows[1].f[0].v.is_null());
    }
}
