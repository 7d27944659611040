//! `CohortImport.spec`: what a team asks for.
//!
//! Every rule an OpenAPI v3 schema can hold lives here as a schema attribute, so the API
//! server (Kubernetes 1.20, no CEL) rejects bad input at `kubectl apply`. Rules the schema
//! cannot express are checked by `domain::validate` and reported as `Ready=False,
//! reason=InvalidSpec`.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::method::DeliveryMethod;
use super::status::{CohortImportStatus, DestinationStatus};

/// DNS-1123 subdomain: the names of Secrets and ConfigMaps.
pub const OBJECT_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Keys of Secret and ConfigMap data.
pub const DATA_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// `HH:MM`, 00:00 to 23:59.
pub const WALL_TIME_PATTERN: &str = r"^([01][0-9]|2[0-3]):[0-5][0-9]$";

/// Keeps one Braze cohort equal to a cohort from an analytics source.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cohorts.dev",
    version = "v1alpha1",
    kind = "CohortImport",
    namespaced,
    shortname = "coi",
    status = "CohortImportStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Cadence","type":"string","jsonPath":".spec.schedule.cadence"}"#,
    printcolumn = r#"{"name":"Cron","type":"string","jsonPath":".spec.schedule.expression","description":"The cron expression of cadence Cron"}"#,
    printcolumn = r#"{"name":"Last Result","type":"string","jsonPath":".status.lastRun.result"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.members","description":"Members in the source at the last successful run"}"#,
    printcolumn = r#"{"name":"Last Run","type":"date","jsonPath":".status.lastRun.finishedAt"}"#,
    printcolumn = r#"{"name":"Next Run","type":"string","jsonPath":".status.nextRunAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Cohort","type":"string","priority":1,"jsonPath":".spec.cohort.id"}"#,
    printcolumn = r#"{"name":"Source","type":"string","priority":1,"jsonPath":".status.sourceKind"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CohortImportSpec {
    /// The Braze cohort this import keeps up to date.
    pub cohort: CohortIdentity,
    /// Where the member list comes from. Set exactly one kind.
    pub source: SourceSpec,
    /// Which source field holds each Braze identifier. When a row carries several, the
    /// external id wins, then the alias, then the device id.
    pub identifiers: IdentifierMapping,
    /// Where the cohort goes.
    pub destination: Destination,
    /// When imports run.
    pub schedule: ScheduleSpec,
    /// Stop future runs. A run in progress finishes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,
    /// How many runs `.status.history` keeps, newest first. With
    /// `successfulRunsHistoryLimit` or `failedRunsHistoryLimit` set, the default of the other.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 50))]
    pub history_limit: u8,
    /// How many successful runs (`Succeeded`, `DryRun`) history keeps (CronJob's convention);
    /// default `historyLimit`. Setting it or `failedRunsHistoryLimit` counts the two apart, so
    /// a run of successes never pushes the last failure out of sight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 50))]
    pub successful_runs_history_limit: Option<u8>,
    /// How many unsuccessful runs (`Failed`, `Blocked`, `Missed`) history keeps; default
    /// `historyLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 50))]
    pub failed_runs_history_limit: Option<u8>,
    /// Compute and report the changes without sending anything to Braze.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// Whether a dry run lists up to 10 of the ids it would add and remove in
    /// `status.lastDryRun` (default true). The ids are the source's pseudonymous user ids,
    /// readable by whoever may read this resource; set false to record the counts only.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub dry_run_sample: bool,
    /// Who hears about each finished run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: most imports set none, and the store keeps every import (see `SourceSpec`).
    pub notifications: Option<Box<Notifications>>,
    /// What happens to the Braze cohort when this resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Protection against removing many members by mistake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_guard: Option<RemovalGuard>,
    /// Longest a run may take, in seconds: a run still going then ends `Failed` (deadline
    /// exceeded); what it sent stays in doubt and the next run converges. Default: the
    /// operator's `--run-timeout-seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_timeout_seconds: Option<u32>,
    /// Retries of a failed run before the next scheduled one, with exponential backoff and
    /// jitter. On by default (3 retries, 1 min doubling to at most 1 h): a run is safe to
    /// repeat, since it sends only what Braze does not hold yet. Only failures that can pass
    /// on their own are retried (the source or Braze unavailable, a run over its deadline);
    /// never a `Blocked` run, an invalid spec, a missing Secret or ConfigMap, refused
    /// credentials, an egress denial or a crash loop. `limit: 0` turns retries off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

/// `spec.retry`: how often and how soon a failed run is tried again.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries of one failed run, at most; 0 turns retries off. A retry never runs at or
    /// after the next scheduled run, which runs instead.
    #[serde(default = "default_retry_limit")]
    #[schemars(range(min = 0, max = 10))]
    pub limit: u8,
    /// Wait before the first retry, in seconds; each further retry waits twice as long as
    /// the one before. Each wait is shortened by up to a quarter (a jitter drawn from the
    /// failed run's id), so that imports that failed together do not retry together.
    #[serde(default = "default_retry_backoff_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub backoff_seconds: u32,
    /// Longest wait between retries, in seconds; at least `backoffSeconds`.
    #[serde(default = "default_retry_max_backoff_seconds")]
    #[schemars(range(min = 1, max = 604800))]
    pub max_backoff_seconds: u32,
}

fn default_retry_limit() -> u8 {
    3
}

fn default_retry_backoff_seconds() -> u32 {
    60
}

fn default_retry_max_backoff_seconds() -> u32 {
    3600
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            limit: default_retry_limit(),
            backoff_seconds: default_retry_backoff_seconds(),
            max_backoff_seconds: default_retry_max_backoff_seconds(),
        }
    }
}

fn default_history_limit() -> u8 {
    10
}

/// What `.status.history` keeps: [`CohortImportSpec::history_limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryLimits {
    /// The newest runs, whatever their result (only `historyLimit` set).
    Newest(u8),
    /// The newest successful and the newest unsuccessful runs, counted apart.
    ByResult { succeeded: u8, failed: u8 },
}

impl CohortImportSpec {
    /// `spec.retry`, with its defaults when unset.
    pub fn retry_policy(&self) -> RetrySpec {
        self.retry.unwrap_or_default()
    }

    /// The history limits in force: `historyLimit` alone caps the whole history, as before
    /// the per-result limits existed; either per-result limit counts results apart, the
    /// other defaulting to `historyLimit`.
    pub fn history_limits(&self) -> HistoryLimits {
        let total = self.history_limit.max(1);
        match (self.successful_runs_history_limit, self.failed_runs_history_limit) {
            (None, None) => HistoryLimits::Newest(total),
            (succeeded, failed) => {
                HistoryLimits::ByResult { succeeded: succeeded.unwrap_or(total), failed: failed.unwrap_or(total) }
            }
        }
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The Braze cohort: a stable id and what Braze users see.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CohortIdentity {
    /// Stable identifier, sent as Braze's `cohort_id`. Never derive it from the display
    /// name: changing it starts a new cohort in Braze.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^\S(.*\S)?$"))]
    pub id: String,
    /// Display name shown in Braze's segment filter. Changing it renames the cohort.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
}

/// Exactly one of the source kinds.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct SourceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineSource>,
    // The other kinds are boxed: exactly one is set, and held inline every import kept in
    // the controller's store would carry room for all of them (1.2 KiB of its 3.6 KiB; the
    // store keeps 10,000 imports in `controller_scale`). Box is invisible to serde and the
    // schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<Box<ConfigMapSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Box<HttpSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<Box<PostgresSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snowflake: Option<Box<SnowflakeSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databricks: Option<Box<DatabricksSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bigquery: Option<Box<BigQuerySource>>,
}

/// A small member list written in the resource itself.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineSource {
    /// Rows of field name → value; `identifiers` names the fields.
    #[schemars(length(max = 10000))]
    pub rows: Vec<BTreeMap<String, String>>,
}

/// A ConfigMap key holding one id per line, or CSV with a header.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapSource {
    /// ConfigMap in the import's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// The key within the ConfigMap's `data` or `binaryData`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub key: String,
    /// `Lines`: one value a line, in a field named by `column`. `Csv`: a header row names
    /// the fields.
    #[serde(default)]
    pub format: ConfigMapFormat,
    /// Field name given to each line of a `Lines` ConfigMap.
    #[serde(default = "default_lines_column")]
    #[schemars(length(min = 1, max = 128))]
    pub column: String,
}

fn default_lines_column() -> String {
    "id".to_owned()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ConfigMapFormat {
    #[default]
    Lines,
    Csv,
}

/// An export fetched over HTTP(S).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// The export's first page. Credentials go in `auth`, never in the URL.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://\S+$"))]
    pub url: String,
    /// `Csv` (a header row names the fields), `Json` (an array of objects) or `Ndjson`.
    pub format: HttpFormat,
    /// For `Json`: an RFC 6901 pointer to the array of rows, e.g. `/data/users`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/.*)?$"))]
    pub json_pointer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<HttpAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagination: Option<HttpPagination>,
    /// Longest wait to connect.
    #[serde(default = "default_connect_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub connect_timeout_seconds: u32,
    /// Longest wait for the next bytes of a response.
    #[serde(default = "default_read_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub read_timeout_seconds: u32,
    /// Largest total body (after decompression) accepted across all pages. Memory does not
    /// grow with it (bodies are streamed); it bounds the time and scratch space one run takes.
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 1))]
    pub max_bytes: u64,
    /// Longest row accepted: a CSV record, an NDJSON line, one element of the JSON array (or
    /// a JSON key or pagination value). Rows are held one at a time, so this bounds memory.
    #[serde(default = "default_max_row_bytes")]
    #[schemars(range(min = 1024, max = 67108864))]
    pub max_row_bytes: u64,
}

fn default_connect_timeout() -> u32 {
    10
}
fn default_read_timeout() -> u32 {
    60
}
fn default_max_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_max_row_bytes() -> u64 {
    1024 * 1024
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HttpFormat {
    Csv,
    Json,
    Ndjson,
}

/// Credentials for the export, each from a Secret in the import's namespace. Set one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct HttpAuth {
    /// `Authorization: Bearer <value>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret_ref: Option<SecretKeyRef>,
    /// HTTP basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// A named header carrying the Secret's value, e.g. `X-Api-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderAuth>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// Secret holding both the user name and the password.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub secret_name: String,
    /// Key of the user name in that Secret.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub username_key: String,
    /// Key of the password in that Secret.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".to_owned()
}
fn default_password_key() -> String {
    "password".to_owned()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderAuth {
    /// The header's name.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))]
    pub name: String,
    /// The header's value.
    pub value_secret_ref: SecretKeyRef,
}

/// How to find the next page. Set one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct HttpPagination {
    /// JSON pointer to the next page's URL in the body; absent or null ends the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/.*$"))]
    pub next_url_pointer: Option<String>,
    /// A cursor in the body passed back as a query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<CursorPagination>,
    /// Follow `Link: <...>; rel="next"` headers (RFC 8288).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_header: Option<bool>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CursorPagination {
    /// JSON pointer to the cursor in the body; absent, null or empty ends the export.
    #[schemars(regex(pattern = r"^/.*$"))]
    pub pointer: String,
    /// Query parameter that carries the cursor to the next request.
    #[schemars(length(min = 1, max = 128))]
    pub param: String,
}

/// A `SELECT` on a PostgreSQL-compatible warehouse.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSource {
    /// Secret key holding a connection URL, `postgres://user:password@host:5432/db`.
    pub connection_secret_ref: SecretKeyRef,
    /// A read-only query; column names are the fields `identifiers` refers to.
    #[schemars(length(min = 1, max = 65536))]
    pub query: String,
    /// The query is cancelled after this long.
    #[serde(default = "default_statement_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub statement_timeout_seconds: u32,
    /// Rows fetched from the cursor per round trip. Rows are read as they arrive, so a
    /// large value costs no memory.
    #[serde(default = "default_fetch_size")]
    #[schemars(range(min = 1, max = 1000000))]
    pub fetch_size: u32,
    /// Longest row accepted, in bytes as the server sends it (every column's text).
    #[serde(default = "default_max_row_bytes")]
    #[schemars(range(min = 1024, max = 67108864))]
    pub max_row_bytes: u64,
}

fn default_statement_timeout() -> u32 {
    900
}
fn default_fetch_size() -> u32 {
    10_000
}

/// A `SELECT` on Snowflake through the SQL API v2, authenticated with a key pair (JWT).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnowflakeSource {
    /// The Secret holding the account identifier, the user and the private key.
    pub credentials: SnowflakeCredentials,
    /// The SQL API's base URL. Default `https://<account>.snowflakecomputing.com`; set it
    /// for private connectivity, e.g. `https://myorg-myaccount.privatelink.snowflakecomputing.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^https?://[^\s/?#]+/?$"))]
    pub endpoint: Option<String>,
    /// Warehouse that runs the query; the user's default when omitted. Case-sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub warehouse: Option<String>,
    /// Database the query's unqualified names resolve in; the user's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub database: Option<String>,
    /// Schema the query's unqualified names resolve in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub schema: Option<String>,
    /// Role the query runs as; the user's default when omitted. Give it read access only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub role: Option<String>,
    /// One `SELECT` (or `WITH … SELECT`) statement; column names are the fields
    /// `identifiers` refers to (Snowflake upper-cases unquoted names: `user_id` is `USER_ID`).
    #[schemars(length(min = 1, max = 65536))]
    pub query: String,
    /// Snowflake cancels the statement after this long; the whole read is bounded by it too.
    #[serde(default = "default_statement_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub statement_timeout_seconds: u32,
    /// Largest result partition accepted, in bytes after decompression. The operator's
    /// `--max-source-page-bytes` (default 32 MiB) caps it: this field can only lower it.
    #[serde(default = "default_max_page_bytes")]
    #[schemars(range(min = 1))]
    pub max_partition_bytes: u64,
}

/// Keys of the Secret a Snowflake source reads.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnowflakeCredentials {
    /// The Secret's name (same namespace as the import).
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub secret_name: String,
    /// Key holding the account identifier: `myorg-myaccount`, or a locator such as
    /// `xy12345.us-east-2.aws`.
    #[serde(default = "default_account_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub account_key: String,
    /// Key holding the Snowflake user name.
    #[serde(default = "default_user_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub user_key: String,
    /// Key holding the RSA private key, PEM (`PRIVATE KEY`, `ENCRYPTED PRIVATE KEY` or
    /// `RSA PRIVATE KEY`); its public key is registered with `ALTER USER … SET RSA_PUBLIC_KEY`.
    #[serde(default = "default_private_key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub private_key_key: String,
    /// Key holding the passphrase of an encrypted private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub private_key_passphrase_key: Option<String>,
}

fn default_account_key() -> String {
    "account".to_owned()
}
fn default_user_key() -> String {
    "user".to_owned()
}
fn default_private_key_key() -> String {
    "privateKey".to_owned()
}
fn default_max_page_bytes() -> u64 {
    256 * 1024 * 1024
}

/// A `SELECT` on a Databricks SQL warehouse through the Statement Execution API 2.0.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabricksSource {
    /// The workspace URL, e.g. `https://dbc-a1b2c3d4-e5f6.cloud.databricks.com`.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^https?://[^\s/?#]+/?$"))]
    pub host: String,
    /// The SQL warehouse's id (the last part of its HTTP path, `/sql/1.0/warehouses/<id>`).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub warehouse_id: String,
    /// Default catalog of the query's unqualified names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub catalog: Option<String>,
    /// Default schema of the query's unqualified names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub schema: Option<String>,
    pub auth: DatabricksAuth,
    /// One `SELECT` (or `WITH … SELECT`) statement; column names are the fields
    /// `identifiers` refers to.
    #[schemars(length(min = 1, max = 65536))]
    pub query: String,
    /// `ExternalLinks` (default) streams results of any size in chunks fetched from cloud
    /// storage (the operator must reach it); `Inline` returns chunks through the workspace
    /// itself, for results up to 25 MiB.
    #[serde(default)]
    pub disposition: DatabricksDisposition,
    /// The statement is cancelled after this long; the whole read is bounded by it too.
    #[serde(default = "default_statement_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub statement_timeout_seconds: u32,
    /// Largest result chunk accepted, in bytes. The operator's `--max-source-page-bytes`
    /// (default 32 MiB) caps it: this field can only lower it.
    #[serde(default = "default_max_page_bytes")]
    #[schemars(range(min = 1))]
    pub max_chunk_bytes: u64,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DatabricksDisposition {
    #[default]
    ExternalLinks,
    Inline,
}

/// How the source authenticates to the workspace. Set one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct DatabricksAuth {
    /// A personal access token (`Authorization: Bearer <token>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// OAuth machine-to-machine: a service principal's client id and secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<DatabricksOAuth>,
}

/// A service principal's OAuth client credentials, exchanged at the workspace's token endpoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabricksOAuth {
    /// Secret holding the client id and secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub secret_name: String,
    /// Key of the OAuth client id (the service principal's application id).
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub client_id_key: String,
    /// Key of the OAuth secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub client_secret_key: String,
}

fn default_client_id_key() -> String {
    "clientId".to_owned()
}
fn default_client_secret_key() -> String {
    "clientSecret".to_owned()
}

/// A standard-SQL `SELECT` on Google BigQuery, through its REST API (`jobs.query`, then
/// `jobs.getQueryResults` page by page).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BigQuerySource {
    /// The Google Cloud project the query job runs (and is billed) in.
    #[schemars(length(min = 6, max = 128), regex(pattern = r"^[a-z][-a-z0-9.:]*[a-z0-9]$"))]
    pub project_id: String,
    /// Where the job runs: `US`, `EU` or a region such as `europe-west1`; required for
    /// datasets outside the `US` and `EU` multi-regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z][-A-Za-z0-9]*$"))]
    pub location: Option<String>,
    /// One read-only standard-SQL (GoogleSQL) `SELECT` or `WITH` statement; column names
    /// are the fields `identifiers` refers to.
    #[schemars(length(min = 1, max = 65536))]
    pub query: String,
    /// Cost guard: a query that would bill more bytes than this fails, uncharged, instead
    /// of running. Unset, the project's default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub maximum_bytes_billed: Option<u64>,
    /// A Secret key holding a service-account key (the JSON file from `gcloud iam
    /// service-accounts keys create`). Omit it to use the operator's own identity from the
    /// GCE/GKE metadata server (Workload Identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key_secret_ref: Option<SecretKeyRef>,
    /// The metadata server used when no key is given, `host[:port]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[A-Za-z0-9.\-\[\]:]+$"))]
    pub metadata_server: Option<String>,
    /// The BigQuery API root. Only `https://*.googleapis.com` (regional or private
    /// endpoints), or a loopback address for a local stand-in.
    #[serde(default = "default_bigquery_endpoint")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^https?://[^\s/?#]+/?$"))]
    pub endpoint: String,
    /// Rows per result page (`maxResults`); BigQuery also caps a page at about 10 MB.
    #[serde(default = "default_bigquery_page_size")]
    #[schemars(range(min = 1, max = 100000))]
    pub page_size: u32,
    /// Largest page body accepted, in bytes; a larger page fails the run. The operator's
    /// `--max-source-page-bytes` (default 32 MiB) caps it: this field can only lower it.
    #[serde(default = "default_bigquery_max_page_bytes")]
    #[schemars(range(min = 65536, max = 1073741824))]
    pub max_page_bytes: u64,
    /// The whole read (job and every page) is cancelled after this long.
    #[serde(default = "default_statement_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub statement_timeout_seconds: u32,
}

/// Google's global BigQuery endpoint.
pub const BIGQUERY_ENDPOINT: &str = "https://bigquery.googleapis.com";

fn default_bigquery_endpoint() -> String {
    BIGQUERY_ENDPOINT.to_owned()
}
fn default_bigquery_page_size() -> u32 {
    10_000
}
fn default_bigquery_max_page_bytes() -> u64 {
    64 * 1024 * 1024
}

/// A key of a Secret in the import's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name (same namespace as the import).
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// The key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub key: String,
}

/// Which source fields hold Braze identifiers. Set at least one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1))]
pub struct IdentifierMapping {
    /// Field holding the Braze `external_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub external_id: Option<String>,
    /// Fields holding a user alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<AliasMapping>,
    /// Field holding a Braze `device_id` (matches anonymous users only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub device_id: Option<String>,
}

/// A user alias: the name from a field, the label fixed or from a field (set one).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AliasMapping {
    /// Field holding `alias_name`.
    #[schemars(length(min = 1, max = 128))]
    pub name_field: String,
    /// A fixed `alias_label` for every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub label: Option<String>,
    /// Field holding `alias_label`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub label_field: Option<String>,
}

/// Where the cohort goes: a Braze workspace written here (`braze`), or a shared
/// destination named by `destinationRef`. Set exactly one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Destination {
    /// A Braze workspace, through the partner cohort import API (`method: CohortImport`,
    /// the default) or a custom attribute and the customer's REST API key
    /// (`method: Attribute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub braze: Option<BrazeDestinationSpec>,
    /// A shared destination instead of `braze`: a `BrazeDestination` in this import's
    /// namespace, or a `ClusterBrazeDestination` whose `namespaceSelector` selects this
    /// namespace. Its key is read at every run, so rotating it in its Secret takes effect at
    /// every import's next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_ref: Option<DestinationRef>,
    /// What `destinationRef` resolved to, set by the operator for one reconcile; never read
    /// from or written to the API server.
    #[serde(skip)]
    #[schemars(skip)]
    // Boxed: never set in the store's copies, only in one reconcile's (see `SourceSpec`).
    pub resolved: Option<Box<ResolvedDestination>>,
}

impl Destination {
    /// The Braze workspace in force: `braze`, or what `destinationRef` resolved to. `None`
    /// for a reference not resolved (yet).
    pub fn braze(&self) -> Option<&BrazeDestinationSpec> {
        match (&self.braze, &self.destination_ref) {
            (Some(braze), _) => Some(braze),
            (None, Some(_)) => self.resolved.as_ref().map(|r| &r.braze),
            (None, None) => None,
        }
    }

    /// How messages name the fields of the Braze workspace in force, e.g.
    /// `spec.destination.braze` or `ClusterBrazeDestination shared-us: spec`.
    pub fn field_prefix(&self) -> String {
        match (&self.braze, &self.resolved) {
            (None, Some(resolved)) => format!("{} {}: spec", resolved.kind.as_str(), resolved.name),
            _ => "spec.destination.braze".to_owned(),
        }
    }

    /// The namespace of the Secrets the workspace's keys are in: `import_namespace`, unless
    /// a `ClusterBrazeDestination` names the operator's destination Secret namespace.
    pub fn secret_namespace<'a>(&'a self, import_namespace: &'a str) -> &'a str {
        match (&self.braze, &self.resolved) {
            (None, Some(resolved)) => &resolved.secret_namespace,
            _ => import_namespace,
        }
    }

    /// The kind of destination the key fields belong to: `None` for `braze`.
    pub fn resolved_kind(&self) -> Option<DestinationKind> {
        self.braze.is_none().then(|| self.resolved.as_ref().map(|r| r.kind)).flatten()
    }
}

/// `spec.destination.destinationRef`: a shared destination, cert-manager's `issuerRef`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRef {
    /// `BrazeDestination` (in the import's own namespace; there is no namespace field) or
    /// `ClusterBrazeDestination`.
    pub kind: DestinationKind,
    /// The destination's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
}

/// The two kinds of shared destination.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum DestinationKind {
    /// Namespaced: usable by the imports of its namespace only; its Secrets are read there.
    BrazeDestination,
    /// Cluster-scoped: usable by the imports of the namespaces its `namespaceSelector`
    /// selects; its Secrets are read only in the operator's destination Secret namespace.
    ClusterBrazeDestination,
}

impl DestinationKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            DestinationKind::BrazeDestination => "BrazeDestination",
            DestinationKind::ClusterBrazeDestination => "ClusterBrazeDestination",
        }
    }
}

/// A `destinationRef` resolved: the workspace, where its Secrets are, and what it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedDestination {
    pub braze: BrazeDestinationSpec,
    /// The namespace every key Secret of `braze` is read from.
    pub secret_namespace: String,
    pub kind: DestinationKind,
    pub name: String,
}

/// A Braze workspace — what `spec.destination.braze` holds, and the spec of a shared
/// `BrazeDestination`. The fields each method uses are required with it and refused with
/// the other (the operator checks; Kubernetes 1.20 has no CEL). Its Secrets are read in the
/// namespace of the import (inline) or of the `BrazeDestination`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cohorts.dev",
    version = "v1alpha1",
    kind = "BrazeDestination",
    plural = "brazedestinations",
    namespaced,
    shortname = "bzd",
    // `kubectl get braze-destinations`, as people write it.
    shortname = "braze-destinations",
    status = "DestinationStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".status.method"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.restEndpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BrazeDestinationSpec {
    /// The customer's REST endpoint, e.g. `https://rest.iad-01.braze.com`.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^https?://[^\s/?#]+/?$"))]
    pub rest_endpoint: String,
    /// How membership reaches Braze. `CohortImport` (default): Braze's partner cohort import
    /// API, for Braze technology partners (`partner`, `dataImportKeySecretRef`). `Attribute`:
    /// a custom attribute written through `/users/track` with the customer's REST API key
    /// (`apiKeySecretRef`, `attribute`), for every Braze customer. Changing the method starts
    /// a fresh snapshot (the first run sends the whole cohort) and leaves what the old method
    /// wrote in Braze as it is.
    #[serde(default, skip_serializing_if = "DeliveryMethod::is_default")]
    pub method: DeliveryMethod,
    /// `CohortImport` only: the partner path segment, `{restEndpoint}/partners/{partner}/cohorts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub partner: Option<String>,
    /// `CohortImport` only: the customer's data import key (`client_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_import_key_secret_ref: Option<SecretKeyRef>,
    /// `CohortImport` only: overrides the operator's partner API key for this import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_api_key_secret_ref: Option<SecretKeyRef>,
    /// `Attribute` only: the customer's REST API key, with the `users.track` permission
    /// (Braze: Settings → APIs and Identifiers → API Keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// `Attribute` only: the custom attribute that holds membership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<MembershipAttributeSpec>,
}

impl BrazeDestinationSpec {
    /// Where membership lands besides endpoint and cohort id, in one text: the partner
    /// (lowercase) for `CohortImport`, `users/track:<attribute>` for `Attribute` (no partner
    /// name holds `/` or `:`). Keys snapshots and cohort ownership by method.
    pub fn route(&self) -> String {
        match (self.method, &self.attribute) {
            (DeliveryMethod::Attribute, Some(a)) => format!("users/track:{}", a.name),
            (DeliveryMethod::Attribute, None) => "users/track:".to_owned(),
            (DeliveryMethod::CohortImport, _) => self.partner.as_deref().unwrap_or_default().to_ascii_lowercase(),
        }
    }

    /// Whether the route holds one cohort only: a Boolean attribute is the membership of
    /// one cohort, whatever `spec.cohort.id` says.
    pub fn one_slot_per_route(&self) -> bool {
        self.method == DeliveryMethod::Attribute
            && self.attribute.as_ref().is_some_and(|a| a.shape == AttributeShape::Boolean)
    }

    /// The Secret keys this destination names, each with its field path.
    pub fn secret_refs(&self) -> Vec<(&'static str, &SecretKeyRef)> {
        let refs = [
            ("spec.destination.braze.dataImportKeySecretRef", self.data_import_key_secret_ref.as_ref()),
            ("spec.destination.braze.partnerApiKeySecretRef", self.partner_api_key_secret_ref.as_ref()),
            ("spec.destination.braze.apiKeySecretRef", self.api_key_secret_ref.as_ref()),
        ];
        refs.into_iter().filter_map(|(field, r)| r.map(|r| (field, r))).collect()
    }
}

/// The custom attribute membership is written to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MembershipAttributeSpec {
    /// The custom attribute's name: 1 to 255 characters, not starting with `$`, no control
    /// characters or surrounding spaces, not one of Braze's identifier or standard fields.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^$\s]([^\x00-\x1f]*[^\s])?$"))]
    pub name: String,
    /// `Array`: the attribute is an array of cohort ids; members get `spec.cohort.id` added,
    /// leavers removed (Braze segment filter: "includes value"). `Boolean`: the attribute is
    /// this cohort's alone; members get `true`, leavers `null` (filter: "is true").
    pub shape: AttributeShape,
}

/// How membership is written into the attribute.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AttributeShape {
    /// An array attribute of cohort ids, shared by cohorts.
    Array,
    /// A boolean attribute per cohort.
    Boolean,
}

/// When imports run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// `Once` runs soon after creation (or at `at`) and then only when triggered. `Hourly`
    /// runs at `minute` past every hour; `Daily`, `Weekly` and `Monthly` at `at`; `Cron` at
    /// every time `expression` matches.
    pub cadence: Cadence,
    /// Required with, and only with, `Cron`: five fields, `minute hour day-of-month month
    /// day-of-week`, on `timeZone`'s clock, e.g. `*/15 * * * *` or `30 6 * * MON-FRI` (a
    /// CronJob's syntax, nicknames such as `@daily` included). A wall time skipped by a
    /// clock change runs at the end of the gap, a repeated one once. Expressions that run
    /// more often than the operator's `--min-cron-interval-minutes` (default 5) allows are
    /// refused; the interval is measured on the wall clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub expression: Option<String>,
    /// Local wall time `HH:MM` in `timeZone`. Required with `Daily`, `Weekly` and `Monthly`;
    /// not used with `Hourly` or `Cron`. `Once` without it runs soon after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = WALL_TIME_PATTERN))]
    pub at: Option<String>,
    /// Required with, and only with, `Hourly`: the minute past every hour, 0–59, on
    /// `timeZone`'s clock (it matters in zones offset by 30 or 45 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 59))]
    pub minute: Option<u8>,
    /// Required with, and only with, `Weekly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_week: Option<DayOfWeek>,
    /// Required with, and only with, `Monthly`; a month shorter than this runs on its last day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31))]
    pub day_of_month: Option<u8>,
    /// IANA time zone of `at` (and of `minute` and `expression`), e.g. `Europe/Lisbon`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z][A-Za-z0-9_+\-/]*$"))]
    pub time_zone: String,
    /// Recurring cadences only: run once right after the resource is created instead of
    /// waiting for the first scheduled time. Not repeated when the operator restarts.
    #[serde(default, skip_serializing_if = "is_false")]
    pub run_on_create: bool,
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Cadence {
    Once,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Cron,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DayOfWeek {
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

/// Who hears about each finished run. Each channel has its own `on` filter; a first
/// success after failures is reported as a recovery to every channel that heard of them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notifications {
    /// A run report by email (the SMTP server is operator configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailNotification>,
    /// A message in a Slack channel, through an incoming webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackNotification>,
    /// The run record as a CloudEvent (structured JSON), POSTed to an HTTP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookNotification>,
    /// A PagerDuty alert through the Events API v2: `trigger` when a run fails or is
    /// blocked, `resolve` on the next success; one alert per import (its dedup key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagerduty: Option<PagerDutyNotification>,
}

/// A PagerDuty service's Events API v2 integration. The operator posts to
/// `--pagerduty-events-url` (PagerDuty's US endpoint by default).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PagerDutyNotification {
    /// Secret key holding the integration's routing key (its 32-character Integration Key).
    pub routing_key_secret_ref: SecretKeyRef,
    /// Which results trigger an alert (`Failed`, which includes `Missed`, and `Blocked`);
    /// all of them when omitted. A success after a result listed here resolves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<NotifyOn>>,
    /// `Changed` (the default here): trigger on the first failure or block, resolve on the
    /// recovery. `Always`: trigger on every failed or blocked run (PagerDuty adds it to the
    /// open alert) and resolve on every success.
    #[serde(default = "notify_when_changed", skip_serializing_if = "is_changed")]
    pub when: NotifyWhen,
}

fn notify_when_changed() -> NotifyWhen {
    NotifyWhen::Changed
}

fn is_changed(when: &NotifyWhen) -> bool {
    *when == NotifyWhen::Changed
}

/// A Slack incoming webhook. Its URL is the credential, so it lives in a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlackNotification {
    /// Secret key holding the incoming-webhook URL, `https://hooks.slack.com/services/...`.
    pub url_secret_ref: SecretKeyRef,
    /// Which results send a message; all of them when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<NotifyOn>>,
    /// `Always` (the default): every run `on` names. `Changed`: only a run whose result
    /// differs from the previous run's (the newest in `.status.history`; a dry run counts as
    /// a success, a missed run as a failure, no previous run as a success): the first
    /// failure or block, and the recovery.
    #[serde(default, skip_serializing_if = "NotifyWhen::is_always")]
    pub when: NotifyWhen,
}

/// An HTTP endpoint that receives each run record as a CloudEvent.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookNotification {
    /// Secret key holding the endpoint's URL (`https://`; it may carry a token).
    pub url_secret_ref: SecretKeyRef,
    /// Extra request headers, e.g. `Authorization`, each value from a Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub headers: Vec<SecretHeader>,
    /// Which results send an event; all of them when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<NotifyOn>>,
    /// `Always` (the default): every run `on` names. `Changed`: only a run whose result
    /// differs from the previous run's (the newest in `.status.history`; a dry run counts as
    /// a success, a missed run as a failure, no previous run as a success): the first
    /// failure or block, and the recovery.
    #[serde(default, skip_serializing_if = "NotifyWhen::is_always")]
    pub when: NotifyWhen,
}

/// A request header whose value is a Secret's.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretHeader {
    /// The header's name, e.g. `Authorization`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))]
    pub name: String,
    /// The header's value.
    pub value_secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmailNotification {
    /// Recipients of the run report.
    #[schemars(length(min = 1, max = 50))]
    pub to: Vec<EmailAddress>,
    /// Which results send an email; all of them when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<NotifyOn>>,
    /// `Always` (the default): every run `on` names. `Changed`: only a run whose result
    /// differs from the previous run's (the newest in `.status.history`; a dry run counts as
    /// a success, a missed run as a failure, no previous run as a success): the first
    /// failure or block, and the recovery.
    #[serde(default, skip_serializing_if = "NotifyWhen::is_always")]
    pub when: NotifyWhen,
}

/// An email address, `local@domain`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct EmailAddress(#[schemars(length(min = 3, max = 254), regex(pattern = r"^[^@\s]+@[^@\s]+$"))] pub String);

/// When a channel hears of a run its `on` names.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum NotifyWhen {
    /// Every such run.
    #[default]
    Always,
    /// Only when the result changed since the previous run.
    Changed,
}

impl NotifyWhen {
    pub fn is_always(&self) -> bool {
        *self == NotifyWhen::Always
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NotifyOn {
    Succeeded,
    Failed,
    Blocked,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Leave the Braze cohort as it is.
    #[default]
    Retain,
    /// Remove every member this import sent, then let go.
    RemoveMembers,
}

/// A run that would remove many members sends no removal until approved.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemovalGuard {
    /// Largest share of the previous cohort, in percent, one run may remove unapproved.
    #[serde(default = "default_max_removal_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_removal_percent: u8,
    /// Turn the guard off, including the empty-source check.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
}

/// The share of the previous cohort one run may remove unless approved.
pub fn default_max_removal_percent() -> u8 {
    20
}

impl Default for RemovalGuard {
    fn default() -> Self {
        Self { max_removal_percent: default_max_removal_percent(), disabled: false }
    }
}
