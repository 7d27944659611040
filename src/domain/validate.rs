//! The rules of a `CohortImport` spec that its OpenAPI schema cannot say (Kubernetes 1.20
//! has no CEL): one source kind, fields that go with a cadence, a real time zone, a URL
//! Braze can be reached at, a single SELECT. The schema's own rules (`minProperties`,
//! patterns) are checked again where they matter, because a resource written before the CRD
//! changed, or by a client that skipped validation, still reaches the controller.
//!
//! [`validate`] reports every problem at once, each naming its field path and the fix; the
//! controller shows [`SpecErrors`] as `Ready=False, reason=InvalidSpec`. Messages never
//! echo a URL (it could carry a token); a host name is the most they show.
//!
//! Decisions:
//! - Daily, Weekly and Monthly schedules need `at`: a run time chosen for the team, not a
//!   default, decides when Braze changes. `Once` without `at` runs at creation.
//! - The Braze endpoint must be `https://`; `http://` is accepted only for loopback hosts
//!   (`127.0.0.0/8`, `::1`, `localhost`), which is where a local Braze sandbox runs.
//! - An HTTP source may use `http://` (in-cluster exporters often do), but not with `auth`
//!   unless the host is loopback: a token or password would cross the network in clear.
//! - The Postgres query must be one statement starting with `SELECT` or `WITH` (after
//!   comments and opening parentheses). This is a guard against mistakes, not the security
//!   boundary: the source runs the query in a read-only transaction.

use std::fmt;
use std::net::IpAddr;

use reqwest::Url;

use crate::api::{
    BigQuerySource, BrazeDestinationSpec, CohortImportSpec, ConfigMapSource, DatabricksSource, DeliveryMethod,
    Destination, HttpFormat, HttpSource, IdentifierMapping, InlineSource, Notifications, PostgresSource, RetrySpec,
    ScheduleSpec, SnowflakeSource, SourceSpec,
};

use super::identifiers::{IdentifierFields, MappingError};
use super::schedule::{self, Schedule, spec::ScheduleProblem};
pub use super::sql::{QueryProblem, SqlDialect, check_select};

/// Operator settings that some rules depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The shortest time between two runs of a `Cron` schedule, on the wall clock
    /// (`--min-cron-interval-minutes`).
    pub min_cron_interval: jiff::SignedDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { min_cron_interval: jiff::SignedDuration::from_mins(5) }
    }
}

/// A spec that passed every rule, with the parts later stages need already parsed: the
/// importer opens [`Self::source`] with [`Self::identifiers`] and sends to
/// [`Self::braze_endpoint`], without reading `spec`'s raw forms of them again.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// The spec as written; every rule of this module holds for it.
    pub spec: CohortImportSpec,
    pub schedule: Schedule,
    /// The one source `spec.source` sets, with its settings.
    pub source: ValidSource,
    pub identifiers: IdentifierFields,
    /// `spec.destination.braze.restEndpoint`, parsed: https (or http on loopback), a host,
    /// no credentials, no path.
    pub braze_endpoint: Url,
}

/// The one source kind `spec.source` sets, with its settings: what
/// [`crate::source::open_source`] opens. In a [`ValidSpec`] every rule of this module holds
/// for it; the variants are public so that tests and tools can open a source directly, and
/// each source re-checks what its safety rests on (the read-only query, endpoints).
#[derive(Clone, Debug, PartialEq)]
pub enum ValidSource {
    Inline(InlineSource),
    ConfigMap(ConfigMapSource),
    Http(HttpSource),
    Postgres(PostgresSource),
    Snowflake(SnowflakeSource),
    Databricks(DatabricksSource),
    BigQuery(BigQuerySource),
}

impl ValidSource {
    /// The one source `spec` sets, or `None` when it sets none or several.
    pub fn of(spec: &SourceSpec) -> Option<ValidSource> {
        let set = [
            spec.inline.clone().map(ValidSource::Inline),
            spec.config_map.as_deref().cloned().map(ValidSource::ConfigMap),
            spec.http.as_deref().cloned().map(ValidSource::Http),
            spec.postgres.as_deref().cloned().map(ValidSource::Postgres),
            spec.snowflake.as_deref().cloned().map(ValidSource::Snowflake),
            spec.databricks.as_deref().cloned().map(ValidSource::Databricks),
            spec.bigquery.as_deref().cloned().map(ValidSource::BigQuery),
        ];
        let mut set = set.into_iter().flatten();
        match (set.next(), set.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }

    pub fn kind(&self) -> SourceKind {
        match self {
            ValidSource::Inline(_) => SourceKind::Inline,
            ValidSource::ConfigMap(_) => SourceKind::ConfigMap,
            ValidSource::Http(_) => SourceKind::Http,
            ValidSource::Postgres(_) => SourceKind::Postgres,
            ValidSource::Snowflake(_) => SourceKind::Snowflake,
            ValidSource::Databricks(_) => SourceKind::Databricks,
            ValidSource::BigQuery(_) => SourceKind::BigQuery,
        }
    }
}

/// Which of `spec.source`'s kinds is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    Inline,
    ConfigMap,
    Http,
    Postgres,
    Snowflake,
    Databricks,
    BigQuery,
}

/// One broken rule: where, and what is wrong with the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct SpecError {
    /// Field path from the resource root, e.g. `spec.schedule.dayOfWeek`.
    pub path: String,
    pub problem: Problem,
}

/// What is wrong with a field, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{}", not_exactly_one(.what, .choices, .set))]
    NotExactlyOne { what: &'static str, choices: &'static [&'static str], set: Vec<&'static str> },
    #[error(transparent)]
    Schedule(#[from] ScheduleProblem),
    #[error("maps no identifier; set at least one of externalId, alias or deviceId")]
    NoIdentifier,
    #[error("is required with method: {method}; set it{hint}")]
    RequiredWithMethod { method: &'static str, hint: &'static str },
    #[error("is not used with method: {method}; remove it{hint}")]
    NotWithMethod { method: &'static str, hint: &'static str },
    #[error(
        "names a destination that was not resolved; create it, or for a ClusterBrazeDestination label this \
         namespace as its namespaceSelector asks"
    )]
    DestinationNotResolved,
    #[error(
        "cannot be used with method: Attribute: /users/track finds users by external id or alias, never by \
         device id; remove spec.identifiers.deviceId and map externalId or alias, or use method: CohortImport"
    )]
    DeviceIdWithAttribute,
    #[error("{value:?} {reason}; Braze custom attribute names are 1 to 255 characters, e.g. cohorts")]
    AttributeName { value: String, reason: &'static str },
    #[error("sets both label and labelField; keep label for one fixed label, or labelField to read each row's label")]
    AliasLabelBoth,
    #[error(
        "sets neither label nor labelField; set label (one fixed label) or labelField (the field holding each row's label)"
    )]
    AliasLabelNeither,
    #[error("is empty; name the source field")]
    EmptyFieldName,
    #[error("{reason}; use a short label without control characters")]
    AliasFixedLabel { reason: &'static str },
    #[error("is not a URL ({reason}); write it like {example}")]
    Url { reason: String, example: &'static str },
    #[error("uses {scheme}://; use https:// or http://")]
    UnsupportedScheme { scheme: String },
    #[error(
        "uses http:// for host {host}; use https:// (http:// is accepted only for loopback hosts such as 127.0.0.1 and localhost)"
    )]
    InsecureEndpoint { host: String },
    #[error("carries a user name or password; remove them and give credentials through {instead}")]
    UrlCredentials { instead: &'static str },
    #[error("has a path, query or fragment; give only the scheme and host, e.g. {example}")]
    EndpointNotBare { example: &'static str },
    #[error(
        "would send credentials unencrypted over http:// to {host}; use an https:// url (http:// with auth is accepted only for loopback hosts)"
    )]
    CredentialsInClear { host: String },
    #[error("set only with format Json (format is {format:?}); remove it or use format Json")]
    JsonOnly { format: HttpFormat },
    #[error("reads the next page from a JSON body, but format is {format:?}; use linkHeader pagination or format Json")]
    BodyPagination { format: HttpFormat },
    #[error("{value:?} is not a JSON pointer: `~` must be followed by 0 or 1 (write ~0 for ~ and ~1 for /)")]
    JsonPointer { value: String },
    #[error("{value:?} does not look like an email address; write one address, local@domain, per entry")]
    EmailAddress { value: String },
    #[error(
        "is empty, so no report would ever be sent; list results (Succeeded, Failed, Blocked) or remove `on` to email every result"
    )]
    NoNotifyOn,
    #[error(
        "is empty, so nothing would ever be sent; list results (Succeeded, Failed, Blocked) or remove `on` to report every result"
    )]
    NoChannelNotifyOn,
    #[error("{name:?} is not an HTTP header name; use letters, digits and - (e.g. Authorization)")]
    HeaderName { name: String },
    #[error(
        "{name:?} is set by the operator (the body's type and length, the connection, CloudEvents' ce-* attributes); remove it"
    )]
    ReservedHeader { name: String },
    #[error("{name:?} is set twice (header names ignore case); keep one")]
    DuplicateHeader { name: String },
    #[error("is blank; give the name, or remove the field to use the default")]
    BlankName,
    /// The query is not one SELECT statement ([`crate::domain::sql`]).
    #[error(transparent)]
    Query(#[from] QueryProblem),
    #[error(
        "{value:?} is not a Google Cloud project id; use the project's id (lowercase letters, digits and hyphens, e.g. my-analytics-123), not its name or number"
    )]
    ProjectId { value: String },
    #[error(
        "points at {host}, which is not a Google API host; use https://bigquery.googleapis.com (or another https://*.googleapis.com endpoint); other hosts are accepted only on loopback, for a local stand-in"
    )]
    NotGoogleEndpoint { host: String },
    #[error(
        "is used only without serviceAccountKeySecretRef (the metadata server gives the operator's own identity); remove it or the key reference"
    )]
    OnlyWithoutKey,
    #[error("{value} is out of range; use {min} to {max}{hint}")]
    OutOfRange { value: u64, min: u64, max: u64, hint: &'static str },
    #[error(
        "{max} is less than backoffSeconds ({backoff}); raise maxBackoffSeconds to at least {backoff}, or lower backoffSeconds"
    )]
    MaxBackoffBelowBackoff { max: u32, backoff: u32 },
}

fn not_exactly_one(what: &str, choices: &[&str], set: &[&str]) -> String {
    if set.is_empty() {
        format!("sets no {what}; set exactly one of {}", choices.join(", "))
    } else {
        format!("sets {} {what}s ({}); keep exactly one", set.len(), set.join(", "))
    }
}

/// Every broken rule of a spec. Displays as one line, for a condition message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn errors(&self) -> &[SpecError] {
        &self.0
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems:", all.len())?;
                for (i, e) in all.iter().enumerate() {
                    write!(f, "{} ({}) {e}", if i == 0 { "" } else { ";" }, i + 1)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for SpecErrors {}

/// Collects problems; each check adds what it finds and carries on.
#[derive(Default)]
struct Problems(Vec<SpecError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, problem: Problem) {
        self.0.push(SpecError { path: path.into(), problem });
    }
}

/// Checks every rule the schema cannot hold and parses what later stages need, under the
/// default [`Limits`].
pub fn validate(spec: &CohortImportSpec) -> Result<ValidSpec, SpecErrors> {
    validate_with(spec, &Limits::default())
}

/// [`validate`] under the operator's `limits`.
pub fn validate_with(spec: &CohortImportSpec, limits: &Limits) -> Result<ValidSpec, SpecErrors> {
    let mut problems = Problems::default();
    let source = check_source(&spec.source, &mut problems);
    let schedule = check_schedule(&spec.schedule, limits, &mut problems);
    let identifiers = check_identifiers(&spec.identifiers, &mut problems);
    let braze_endpoint = check_destination(&spec.destination, &spec.identifiers, &mut problems);
    if let Some(notifications) = &spec.notifications {
        check_notifications(notifications, &mut problems);
    }
    if let Some(retry) = &spec.retry {
        check_retry(retry, &mut problems);
    }
    match (source, schedule, identifiers, braze_endpoint) {
        (Some(source), Some(schedule), Some(identifiers), Some(braze_endpoint)) if problems.0.is_empty() => {
            Ok(ValidSpec { spec: spec.clone(), schedule, source, identifiers, braze_endpoint })
        }
        _ => Err(SpecErrors(problems.0)),
    }
}

impl TryFrom<&ScheduleSpec> for Schedule {
    type Error = SpecErrors;

    fn try_from(spec: &ScheduleSpec) -> Result<Self, Self::Error> {
        let mut problems = Problems::default();
        check_schedule(spec, &Limits::default(), &mut problems).ok_or(SpecErrors(problems.0))
    }
}

fn check_source(source: &SourceSpec, problems: &mut Problems) -> Option<ValidSource> {
    if let Some(http) = &source.http {
        check_http(http, problems);
    }
    if let Some(postgres) = &source.postgres
        && let Err(problem) = check_query(&postgres.query)
    {
        problems.add("spec.source.postgres.query", problem);
    }
    if let Some(snowflake) = &source.snowflake {
        check_snowflake(snowflake, problems);
    }
    if let Some(databricks) = &source.databricks {
        check_databricks(databricks, problems);
    }
    if let Some(bigquery) = &source.bigquery {
        check_bigquery(bigquery, problems);
    }
    let set = [
        source.inline.is_some(),
        source.config_map.is_some(),
        source.http.is_some(),
        source.postgres.is_some(),
        source.snowflake.is_some(),
        source.databricks.is_some(),
        source.bigquery.is_some(),
    ];
    exactly_one(
        "spec.source",
        "source",
        &["inline", "configMap", "http", "postgres", "snowflake", "databricks", "bigquery"],
        set,
        problems,
    )?;
    ValidSource::of(source)
}

fn check_snowflake(snowflake: &SnowflakeSource, problems: &mut Problems) {
    if let Err(problem) = check_select(&snowflake.query, SqlDialect::Snowflake) {
        problems.add("spec.source.snowflake.query", Problem::from(problem));
    }
    if let Some(endpoint) = &snowflake.endpoint {
        check_bare_endpoint(
            "spec.source.snowflake.endpoint",
            endpoint,
            "https://myorg-myaccount.snowflakecomputing.com",
            "spec.source.snowflake.credentials",
            problems,
        );
    }
    for (field, value) in [
        ("warehouse", &snowflake.warehouse),
        ("database", &snowflake.database),
        ("schema", &snowflake.schema),
        ("role", &snowflake.role),
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            problems.add(format!("spec.source.snowflake.{field}"), Problem::BlankName);
        }
    }
}

fn check_databricks(databricks: &DatabricksSource, problems: &mut Problems) {
    if let Err(problem) = check_select(&databricks.query, SqlDialect::Databricks) {
        problems.add("spec.source.databricks.query", Problem::from(problem));
    }
    check_bare_endpoint(
        "spec.source.databricks.host",
        &databricks.host,
        "https://dbc-a1b2c3d4-e5f6.cloud.databricks.com",
        "spec.source.databricks.auth",
        problems,
    );
    if databricks.warehouse_id.trim().is_empty() {
        problems.add("spec.source.databricks.warehouseId", Problem::BlankName);
    }
    exactly_one(
        "spec.source.databricks.auth",
        "auth kind",
        &["tokenSecretRef", "oauth"],
        [databricks.auth.token_secret_ref.is_some(), databricks.auth.oauth.is_some()],
        problems,
    );
}

/// The index of the one choice that is set, or a [`Problem::NotExactlyOne`] at `path`.
fn exactly_one<const N: usize>(
    path: &str,
    what: &'static str,
    choices: &'static [&'static str; N],
    set: [bool; N],
    problems: &mut Problems,
) -> Option<usize> {
    let chosen: Vec<usize> = (0..N).filter(|&i| set[i]).collect();
    match chosen.as_slice() {
        [one] => Some(*one),
        _ => {
            let set = chosen.iter().map(|&i| choices[i]).collect();
            problems.add(path, Problem::NotExactlyOne { what, choices, set });
            None
        }
    }
}

fn check_http(http: &HttpSource, problems: &mut Problems) {
    const URL_EXAMPLE: &str = "https://exports.example.com/cohorts/active.csv";
    match Url::parse(&http.url) {
        Err(e) => problems.add("spec.source.http.url", Problem::Url { reason: e.to_string(), example: URL_EXAMPLE }),
        Ok(url) => {
            if !matches!(url.scheme(), "http" | "https") {
                problems.add("spec.source.http.url", Problem::UnsupportedScheme { scheme: url.scheme().to_owned() });
            }
            if !url.username().is_empty() || url.password().is_some() {
                problems.add("spec.source.http.url", Problem::UrlCredentials { instead: "spec.source.http.auth" });
            }
            if http.auth.is_some() && url.scheme() == "http" && !is_loopback(&url) {
                problems.add(
                    "spec.source.http.auth",
                    Problem::CredentialsInClear { host: url.host_str().unwrap_or("").to_owned() },
                );
            }
        }
    }
    if let Some(auth) = &http.auth {
        exactly_one(
            "spec.source.http.auth",
            "auth kind",
            &["bearerTokenSecretRef", "basic", "header"],
            [auth.bearer_token_secret_ref.is_some(), auth.basic.is_some(), auth.header.is_some()],
            problems,
        );
    }
    if let Some(pointer) = &http.json_pointer {
        if http.format != HttpFormat::Json {
            problems.add("spec.source.http.jsonPointer", Problem::JsonOnly { format: http.format });
        }
        check_json_pointer("spec.source.http.jsonPointer", pointer, problems);
    }
    if let Some(pagination) = &http.pagination {
        exactly_one(
            "spec.source.http.pagination",
            "pagination kind",
            &["nextUrlPointer", "cursor", "linkHeader"],
            [pagination.next_url_pointer.is_some(), pagination.cursor.is_some(), pagination.link_header.is_some()],
            problems,
        );
        if let Some(pointer) = &pagination.next_url_pointer {
            let path = "spec.source.http.pagination.nextUrlPointer";
            if http.format != HttpFormat::Json {
                problems.add(path, Problem::BodyPagination { format: http.format });
            }
            check_json_pointer(path, pointer, problems);
        }
        if let Some(cursor) = &pagination.cursor {
            if http.format != HttpFormat::Json {
                problems.add("spec.source.http.pagination.cursor", Problem::BodyPagination { format: http.format });
            }
            check_json_pointer("spec.source.http.pagination.cursor.pointer", &cursor.pointer, problems);
        }
    }
}

/// RFC 6901: empty, or `/`-separated tokens where `~` only starts `~0` or `~1`.
fn check_json_pointer(path: &str, pointer: &str, problems: &mut Problems) {
    let well_formed = (pointer.is_empty() || pointer.starts_with('/'))
        && pointer.split('~').skip(1).all(|after| after.starts_with(['0', '1']));
    if !well_formed {
        problems.add(path, Problem::JsonPointer { value: pointer.to_owned() });
    }
}

fn check_schedule(spec: &ScheduleSpec, limits: &Limits, problems: &mut Problems) -> Option<Schedule> {
    schedule::spec::parse(spec, limits.min_cron_interval)
        .map_err(|found| found.into_iter().for_each(|(path, problem)| problems.add(path, problem.into())))
        .ok()
}

fn check_identifiers(mapping: &IdentifierMapping, problems: &mut Problems) -> Option<IdentifierFields> {
    // The two rules the brief of this module owns get their own messages; the mapping's
    // parser (shared with the sources) then finds anything else, one problem at a time.
    let before = problems.0.len();
    if mapping.external_id.is_none() && mapping.alias.is_none() && mapping.device_id.is_none() {
        problems.add("spec.identifiers", Problem::NoIdentifier);
    }
    if let Some(alias) = &mapping.alias {
        match (&alias.label, &alias.label_field) {
            (Some(_), Some(_)) => problems.add("spec.identifiers.alias", Problem::AliasLabelBoth),
            (None, None) => problems.add("spec.identifiers.alias", Problem::AliasLabelNeither),
            _ => {}
        }
    }
    if problems.0.len() > before {
        return None;
    }
    match IdentifierFields::from_mapping(mapping) {
        Ok(fields) => Some(fields),
        Err(e) => {
            let (path, problem) = match e {
                MappingError::Empty => ("spec.identifiers".to_owned(), Problem::NoIdentifier),
                MappingError::AliasLabel => ("spec.identifiers.alias".to_owned(), Problem::AliasLabelNeither),
                MappingError::EmptyFieldName { field } => {
                    (format!("spec.identifiers.{field}"), Problem::EmptyFieldName)
                }
                MappingError::BadFixedLabel { reason } => {
                    ("spec.identifiers.alias.label".to_owned(), Problem::AliasFixedLabel { reason })
                }
            };
            problems.add(path, problem);
            None
        }
    }
}

/// Braze's identifier fields and standard profile attributes: a custom attribute of one
/// of these names would write (or be refused as) something else.
const RESERVED_ATTRIBUTES: &[&str] = &[
    "external_id",
    "user_alias",
    "braze_id",
    "_update_existing_only",
    "email",
    "phone",
    "first_name",
    "last_name",
    "gender",
    "dob",
    "country",
    "home_city",
    "language",
    "time_zone",
    "email_subscribe",
    "push_subscribe",
    "push_tokens",
    "subscription_groups",
    "date_of_first_session",
    "date_of_last_session",
    "image_url",
    "marked_email_as_spam_at",
    "email_open_tracking_disabled",
    "email_click_tracking_disabled",
];

/// `spec.destination`: exactly one of `braze` and `destinationRef` (the schema says so too),
/// and the Braze workspace in force — inline, or what the reference resolved to, whose
/// problems are named by the destination's own fields. A reference is resolved before
/// validation (`controller::destinations`); one that is not yet is a problem here.
fn check_destination(
    destination: &Destination,
    identifiers: &IdentifierMapping,
    problems: &mut Problems,
) -> Option<Url> {
    const CHOICES: &[&str] = &["braze", "destinationRef"];
    match (&destination.braze, &destination.destination_ref) {
        (Some(_), Some(_)) => {
            let set = CHOICES.to_vec();
            problems.add("spec.destination", Problem::NotExactlyOne { what: "destination", choices: CHOICES, set });
            return None;
        }
        (None, None) => {
            let set = Vec::new();
            problems.add("spec.destination", Problem::NotExactlyOne { what: "destination", choices: CHOICES, set });
            return None;
        }
        _ => {}
    }
    let Some(braze) = destination.braze() else {
        problems.add("spec.destination.destinationRef", Problem::DestinationNotResolved);
        return None;
    };
    let at = destination.field_prefix();
    let url = check_braze_endpoint(&at, &braze.rest_endpoint, problems);
    check_delivery(&at, braze, problems);
    if braze.method == DeliveryMethod::Attribute && identifiers.device_id.is_some() {
        problems.add("spec.identifiers.deviceId", Problem::DeviceIdWithAttribute);
    }
    url
}

/// A shared destination's own rules (what [`check_destination`] checks of a workspace,
/// without an import's identifiers), its fields named under `at` (e.g. `spec`).
pub fn validate_workspace(at: &str, braze: &BrazeDestinationSpec) -> Result<Url, SpecErrors> {
    let mut problems = Problems::default();
    let url = check_braze_endpoint(at, &braze.rest_endpoint, &mut problems);
    check_delivery(at, braze, &mut problems);
    match url {
        Some(url) if problems.0.is_empty() => Ok(url),
        _ => Err(SpecErrors(problems.0)),
    }
}

/// The fields of each method are required with it and refused with the other.
fn check_delivery(at: &str, braze: &BrazeDestinationSpec, problems: &mut Problems) {
    let set = |present: bool, field: &str, problems: &mut Problems, method, hint| {
        if present {
            problems.add(format!("{at}.{field}"), Problem::NotWithMethod { method, hint });
        }
    };
    let need = |present: bool, field: &str, problems: &mut Problems, method, hint| {
        if !present {
            problems.add(format!("{at}.{field}"), Problem::RequiredWithMethod { method, hint });
        }
    };
    match braze.method {
        DeliveryMethod::CohortImport => {
            let (m, h) =
                ("CohortImport", " (for Braze technology partners; or use method: Attribute with a REST API key)");
            need(braze.partner.is_some(), "partner", problems, m, h);
            need(braze.data_import_key_secret_ref.is_some(), "dataImportKeySecretRef", problems, m, h);
            let h = " (it is for method: Attribute)";
            set(braze.api_key_secret_ref.is_some(), "apiKeySecretRef", problems, m, h);
            set(braze.attribute.is_some(), "attribute", problems, m, h);
        }
        DeliveryMethod::Attribute => {
            let (m, h) = ("Attribute", ", e.g. {name: braze-rest, key: api-key}");
            need(braze.api_key_secret_ref.is_some(), "apiKeySecretRef", problems, m, h);
            let h = ", e.g. {name: cohorts, shape: Array}";
            need(braze.attribute.is_some(), "attribute", problems, m, h);
            let h = " (partner keys are for method: CohortImport; this method uses apiKeySecretRef)";
            set(braze.partner.is_some(), "partner", problems, m, h);
            set(braze.data_import_key_secret_ref.is_some(), "dataImportKeySecretRef", problems, m, h);
            set(braze.partner_api_key_secret_ref.is_some(), "partnerApiKeySecretRef", problems, m, h);
            if let Some(attribute) = &braze.attribute
                && let Err(reason) = check_attribute_name(&attribute.name)
            {
                let value = attribute.name.clone();
                problems.add(format!("{at}.attribute.name"), Problem::AttributeName { value, reason });
            }
        }
    }
}

/// Braze's rules for custom attribute names, and the names that are not custom attributes.
pub fn check_attribute_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.chars().count() > 255 {
        return Err("is empty or longer than 255 characters");
    }
    if name.starts_with('$') {
        return Err("starts with $, which Braze reserves");
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err("has surrounding spaces or control characters");
    }
    if RESERVED_ATTRIBUTES.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err("is a Braze identifier or standard attribute, not a custom attribute; pick another name");
    }
    Ok(())
}

fn check_braze_endpoint(at: &str, endpoint: &str, problems: &mut Problems) -> Option<Url> {
    check_bare_endpoint(
        &format!("{at}.restEndpoint"),
        endpoint,
        "https://rest.iad-01.braze.com",
        "spec.destination.braze.dataImportKeySecretRef",
        problems,
    )
}

/// A service's base URL: https (http only on loopback), a host, no credentials, no path.
fn check_bare_endpoint(
    path: &str,
    endpoint: &str,
    example: &'static str,
    credentials_field: &'static str,
    problems: &mut Problems,
) -> Option<Url> {
    let url = match Url::parse(endpoint) {
        Ok(url) => url,
        Err(e) => {
            problems.add(path, Problem::Url { reason: e.to_string(), example });
            return None;
        }
    };
    let before = problems.0.len();
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => problems.add(path, Problem::InsecureEndpoint { host: url.host_str().unwrap_or("").to_owned() }),
        other => problems.add(path, Problem::UnsupportedScheme { scheme: other.to_owned() }),
    }
    if !url.username().is_empty() || url.password().is_some() {
        problems.add(path, Problem::UrlCredentials { instead: credentials_field });
    }
    if url.host_str().is_none_or(str::is_empty)
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
    {
        problems.add(path, Problem::EndpointNotBare { example });
    }
    (problems.0.len() == before).then_some(url)
}

/// Loopback hosts, where plain http stays on the machine.
pub fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `spec.retry`: the schema holds the ranges on Kubernetes; checked again here for an object
/// that did not pass through it, and the one rule across fields the schema cannot hold.
fn check_retry(retry: &RetrySpec, problems: &mut Problems) {
    let ranges: [(&str, u64, u64, u64, &'static str); 3] = [
        ("spec.retry.limit", retry.limit.into(), 0, 10, " (0 turns retries off)"),
        ("spec.retry.backoffSeconds", retry.backoff_seconds.into(), 1, 86_400, " (a day)"),
        ("spec.retry.maxBackoffSeconds", retry.max_backoff_seconds.into(), 1, 604_800, " (a week)"),
    ];
    for (path, value, min, max, hint) in ranges {
        if !(min..=max).contains(&value) {
            problems.add(path, Problem::OutOfRange { value, min, max, hint });
        }
    }
    if retry.max_backoff_seconds < retry.backoff_seconds {
        problems.add(
            "spec.retry.maxBackoffSeconds",
            Problem::MaxBackoffBelowBackoff { max: retry.max_backoff_seconds, backoff: retry.backoff_seconds },
        );
    }
}

fn check_notifications(notifications: &Notifications, problems: &mut Problems) {
    if let Some(email) = &notifications.email {
        for (i, address) in email.to.iter().enumerate() {
            if !looks_like_email(&address.0) {
                problems.add(
                    format!("spec.notifications.email.to[{i}]"),
                    Problem::EmailAddress { value: address.0.clone() },
                );
            }
        }
        if email.on.as_ref().is_some_and(Vec::is_empty) {
            problems.add("spec.notifications.email.on", Problem::NoNotifyOn);
        }
    }
    if let Some(slack) = &notifications.slack
        && slack.on.as_ref().is_some_and(Vec::is_empty)
    {
        problems.add("spec.notifications.slack.on", Problem::NoChannelNotifyOn);
    }
    if let Some(webhook) = &notifications.webhook {
        if webhook.on.as_ref().is_some_and(Vec::is_empty) {
            problems.add("spec.notifications.webhook.on", Problem::NoChannelNotifyOn);
        }
        check_webhook_headers(&webhook.headers, problems);
    }
    if let Some(pagerduty) = &notifications.pagerduty
        && pagerduty.on.as_ref().is_some_and(Vec::is_empty)
    {
        problems.add("spec.notifications.pagerduty.on", Problem::NoChannelNotifyOn);
    }
}

/// Headers the operator sets itself (the body's type and length, the connection) or that
/// would turn the structured CloudEvent into a binary-mode one (`ce-*`).
const RESERVED_WEBHOOK_HEADERS: &[&str] =
    &["content-type", "content-length", "content-encoding", "host", "transfer-encoding", "connection"];

fn check_webhook_headers(headers: &[crate::api::SecretHeader], problems: &mut Problems) {
    let mut seen = std::collections::HashSet::new();
    for (i, header) in headers.iter().enumerate() {
        let path = format!("spec.notifications.webhook.headers[{i}].name");
        let name = header.name.to_ascii_lowercase();
        let token =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b));
        if !token {
            problems.add(path, Problem::HeaderName { name: header.name.clone() });
        } else if RESERVED_WEBHOOK_HEADERS.contains(&name.as_str()) || name.starts_with("ce-") {
            problems.add(path, Problem::ReservedHeader { name: header.name.clone() });
        } else if !seen.insert(name) {
            problems.add(path, Problem::DuplicateHeader { name: header.name.clone() });
        }
    }
}

/// `local@domain` with a plain local part and a DNS host name: catches typos and several
/// addresses in one entry, not every RFC 5322 form (quoted local parts are refused).
fn looks_like_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| c.is_alphanumeric() || (c.is_ascii_punctuation() && !"\"(),:;<>@[\\]".contains(c)));
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let domain_ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    local_ok && domain_ok
}

/// `spec.source.bigquery`: the project, the query (GoogleSQL), where the access token may
/// be sent. A token is sent only to Google's API hosts or to loopback: with Workload
/// Identity it is the operator's own credential, and must never reach a host a spec names.
fn check_bigquery(bq: &BigQuerySource, problems: &mut Problems) {
    const PATH: &str = "spec.source.bigquery";
    let project_ok = bq.project_id.len() >= 6
        && bq.project_id.starts_with(|c: char| c.is_ascii_lowercase())
        && bq.project_id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:".contains(c))
        && !bq.project_id.ends_with(['-', '.', ':']);
    if !project_ok {
        problems.add(format!("{PATH}.projectId"), Problem::ProjectId { value: bq.project_id.clone() });
    }
    if let Err(problem) = check_googlesql_query(&bq.query) {
        problems.add(format!("{PATH}.query"), problem);
    }
    if bq.metadata_server.is_some() && bq.service_account_key_secret_ref.is_some() {
        problems.add(format!("{PATH}.metadataServer"), Problem::OnlyWithoutKey);
    }
    const EXAMPLE: &str = "https://bigquery.googleapis.com";
    let path = format!("{PATH}.endpoint");
    match Url::parse(&bq.endpoint) {
        Err(e) => problems.add(path, Problem::Url { reason: e.to_string(), example: EXAMPLE }),
        Ok(url) => {
            let host = url.host_str().unwrap_or("").to_ascii_lowercase();
            let google = url.scheme() == "https" && host.ends_with(".googleapis.com");
            if !google && !is_loopback(&url) {
                problems.add(path.clone(), Problem::NotGoogleEndpoint { host });
            }
            if !url.username().is_empty() || url.password().is_some() {
                problems
                    .add(path, Problem::UrlCredentials { instead: "spec.source.bigquery.serviceAccountKeySecretRef" });
            }
        }
    }
}

/// One PostgreSQL statement starting with SELECT or WITH (see [`check_select`]).
pub fn check_query(query: &str) -> Result<(), Problem> {
    Ok(check_select(query, SqlDialect::Postgres)?)
}

/// One GoogleSQL (BigQuery standard SQL) statement starting with SELECT or WITH. Its lexer
/// differs from PostgreSQL's: `#` comments, `/* */` not nested, `'…'` and `"…"` strings
/// (also triple-quoted) with backslash escapes, `` `…` `` quoted identifiers. BigQuery runs a
/// multi-statement script in one `jobs.query`, so a second statement is refused here.
pub fn check_googlesql_query(query: &str) -> Result<(), Problem> {
    Ok(check_select(query, SqlDialect::BigQuery)?)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Cadence;
    use crate::api::{AliasMapping, EmailAddress, EmailNotification, HttpAuth, HttpPagination, NotifyOn};
    use crate::domain::identifiers::LabelSource;
    use crate::domain::schedule::{MinuteOfHour, Recurrence, next_run_after, previous_run_at_or_before};
    use jiff::civil::Weekday;
    use jiff::tz::TimeZone;

    /// A team's weekly import from the warehouse, as a user would apply it.
    const WAREHOUSE_EXAMPLE: &str = r#"
apiVersion: cohorts.dev/v1alpha1
kind: CohortImport
metadata:
  name: churn-risk
  namespace: growth
spec:
  cohort:
    id: churn-risk-v1
    name: Churn risk (weekly)
  source:
    postgres:
      connectionSecretRef: {name: warehouse, key: url}
      query: |
        -- users at risk; `;` in comments is fine
        WITH active AS (
          SELECT user_id FROM events WHERE ts > now() - interval '30 days'
        )
        SELECT u.external_id FROM users u JOIN active a USING (user_id)
        WHERE u.segment = 'a;b';
  identifiers:
    externalId: external_id
  destination:
    braze:
      restEndpoint: https://rest.iad-01.braze.com
      partner: acme
      dataImportKeySecretRef: {name: braze, key: data-import-key}
  schedule:
    cadence: Weekly
    dayOfWeek: Monday
    at: "06:00"
    timeZone: Europe/Lisbon
  notifications:
    email:
      to: [growth-team@example.com, ana.silva+cohorts@example.pt]
      on: [Failed, Blocked]
"#;

    /// An HTTP export into the local Braze sandbox, daily, aliases with a fixed label.
    const SANDBOX_EXAMPLE: &str = r#"
apiVersion: cohorts.dev/v1alpha1
kind: CohortImport
metadata: {name: vip, namespace: crm}
spec:
  cohort: {id: vip, name: VIP}
  source:
    http:
      url: https://exports.example.com/vip.json
      format: Json
      jsonPointer: /data/users
      auth: {bearerTokenSecretRef: {name: exporter, key: token}}
      pagination: {cursor: {pointer: /next, param: cursor}}
  identifiers:
    alias: {nameField: email, label: email}
    deviceId: device
  destination:
    braze:
      restEndpoint: http://127.0.0.1:38080
      partner: sandbox
      dataImportKeySecretRef: {name: braze, key: key}
  schedule:
    cadence: Daily
    at: "23:30"
    timeZone: America/New_York
"#;

    fn example(yaml: &str) -> CohortImportSpec {
        let resource: crate::api::CohortImport = serde_yaml::from_str(yaml).unwrap();
        resource.spec
    }

    fn errors(spec: &CohortImportSpec) -> Vec<SpecError> {
        validate(spec).expect_err("the spec should be invalid").0
    }

    fn paths(spec: &CohortImportSpec) -> Vec<String> {
        errors(spec).into_iter().map(|e| e.path).collect()
    }

    /// The only problem of `spec`, as a message.
    fn only_message(spec: &CohortImportSpec) -> String {
        let all = errors(spec);
        assert_eq!(all.len(), 1, "{all:#?}");
        all[0].to_string()
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn warehouse_example_is_valid_and_scheduled() {
        let valid = validate(&example(WAREHOUSE_EXAMPLE)).unwrap();
        assert_eq!(valid.source.kind(), SourceKind::Postgres);
        assert_eq!(valid.identifiers.external_id.as_deref(), Some("external_id"));
        assert_eq!(valid.braze_endpoint.as_str(), "https://rest.iad-01.braze.com/");
        assert_eq!(
            valid.schedule,
            Schedule::new(
                Recurrence::Weekly { on: Weekday::Monday, at: "06:00".parse().unwrap() },
                TimeZone::get("Europe/Lisbon").unwrap()
            )
        );
        // Created on Sunday 2024-03-31 (Lisbon switched to UTC+1 that night).
        let created = ts("2024-03-31T12:00:00Z");
        assert_eq!(next_run_after(&valid.schedule, created, created), Some(ts("2024-04-01T05:00:00Z")));
        assert_eq!(previous_run_at_or_before(&valid.schedule, created, created), None);
    }

    #[test]
    fn sandbox_example_is_valid() {
        let valid = validate(&example(SANDBOX_EXAMPLE)).unwrap();
        assert_eq!(valid.source.kind(), SourceKind::Http);
        assert_eq!(valid.braze_endpoint.as_str(), "http://127.0.0.1:38080/");
        assert_eq!(valid.identifiers.alias, Some(("email".to_owned(), LabelSource::Fixed("email".to_owned()))));
        assert_eq!(valid.identifiers.device_id.as_deref(), Some("device"));
        assert!(matches!(valid.schedule.recurrence, Recurrence::Daily { .. }));
    }

    #[test]
    fn all_problems_are_reported_together() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.schedule.cadence = Cadence::Daily;
        spec.schedule.time_zone = "Europe/Lisbn".into();
        spec.identifiers = IdentifierMapping::default();
        let all = errors(&spec);
        let got: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(got, ["spec.schedule.dayOfWeek", "spec.schedule.timeZone", "spec.identifiers"]);
        let message = SpecErrors(all).to_string();
        assert!(!message.contains('\n'));
        assert!(message.starts_with("3 problems: (1) spec.schedule.dayOfWeek: "), "{message}");
        assert!(message.contains("; (2) spec.schedule.timeZone: \"Europe/Lisbn\" is not an IANA time zone"));
        assert!(message.contains("; (3) spec.identifiers: maps no identifier"));
    }

    #[test]
    fn one_problem_displays_alone() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.schedule.day_of_week = None;
        let e = validate(&spec).unwrap_err();
        assert_eq!(e.to_string(), "spec.schedule.dayOfWeek: required with cadence Weekly; set it, e.g. Monday");
    }

    // ---- source ----

    #[test]
    fn exactly_one_source() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.source = SourceSpec::default();
        assert_eq!(
            only_message(&spec),
            "spec.source: sets no source; set exactly one of inline, configMap, http, postgres, snowflake, databricks, bigquery"
        );
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.source.http = example(SANDBOX_EXAMPLE).source.http;
        assert_eq!(only_message(&spec), "spec.source: sets 2 sources (http, postgres); keep exactly one");
    }

    fn http_spec() -> CohortImportSpec {
        example(SANDBOX_EXAMPLE)
    }

    fn http(spec: &mut CohortImportSpec) -> &mut HttpSource {
        spec.source.http.as_mut().unwrap()
    }

    #[test]
    fn http_auth_is_exactly_one_kind() {
        let mut spec = http_spec();
        http(&mut spec).auth = Some(HttpAuth { bearer_token_secret_ref: None, basic: None, header: None });
        assert_eq!(
            only_message(&spec),
            "spec.source.http.auth: sets no auth kind; set exactly one of bearerTokenSecretRef, basic, header"
        );
        let mut spec = http_spec();
        let auth: HttpAuth = serde_json::from_value(serde_json::json!({
            "bearerTokenSecretRef": {"name": "a", "key": "b"},
            "basic": {"secretName": "c"},
        }))
        .unwrap();
        http(&mut spec).auth = Some(auth);
        assert_eq!(
            only_message(&spec),
            "spec.source.http.auth: sets 2 auth kinds (bearerTokenSecretRef, basic); keep exactly one"
        );
    }

    #[test]
    fn http_pagination_is_exactly_one_kind() {
        let mut spec = http_spec();
        http(&mut spec).pagination =
            Some(HttpPagination { next_url_pointer: Some("/next".into()), cursor: None, link_header: Some(true) });
        assert_eq!(
            only_message(&spec),
            "spec.source.http.pagination: sets 2 pagination kinds (nextUrlPointer, linkHeader); keep exactly one"
        );
        http(&mut spec).pagination = Some(HttpPagination { next_url_pointer: None, cursor: None, link_header: None });
        assert_eq!(paths(&spec), ["spec.source.http.pagination"]);
    }

    #[test]
    fn body_pointers_need_json() {
        let mut spec = http_spec();
        http(&mut spec).format = HttpFormat::Csv;
        assert_eq!(paths(&spec), ["spec.source.http.jsonPointer", "spec.source.http.pagination.cursor"]);
        let all = errors(&spec);
        assert_eq!(
            all[0].to_string(),
            "spec.source.http.jsonPointer: set only with format Json (format is Csv); remove it or use format Json"
        );
        // Link headers work with any body.
        http(&mut spec).json_pointer = None;
        http(&mut spec).pagination =
            Some(HttpPagination { next_url_pointer: None, cursor: None, link_header: Some(true) });
        validate(&spec).unwrap();
    }

    #[test]
    fn json_pointers_are_rfc_6901() {
        let mut spec = http_spec();
        http(&mut spec).json_pointer = Some("/a~2b".into());
        assert_eq!(paths(&spec), ["spec.source.http.jsonPointer"]);
        http(&mut spec).json_pointer = Some("/a~0b/c~1d".into());
        validate(&spec).unwrap();
        http(&mut spec).json_pointer = Some("".into());
        validate(&spec).unwrap();
    }

    #[test]
    fn http_credentials_need_https_off_loopback() {
        let mut spec = http_spec();
        http(&mut spec).url = "http://exporter.data.svc:8080/vip.json".into();
        assert_eq!(
            only_message(&spec),
            "spec.source.http.auth: would send credentials unencrypted over http:// to \
             exporter.data.svc; use an https:// url (http:// with auth is accepted only for loopback hosts)"
        );
        // Without credentials plain http is fine; on loopback too.
        http(&mut spec).auth = None;
        validate(&spec).unwrap();
        let mut spec = http_spec();
        http(&mut spec).url = "http://127.0.0.1:9000/vip.json".into();
        validate(&spec).unwrap();
    }

    #[test]
    fn http_url_without_userinfo_and_never_echoed() {
        let mut spec = http_spec();
        http(&mut spec).url = "https://bob:hunter2@exports.example.com/vip.json".into();
        let message = only_message(&spec);
        assert!(message.starts_with("spec.source.http.url: carries a user name or password"));
        assert!(!message.contains("hunter2"));
        http(&mut spec).url = "https://exa mple.com/x".into();
        let message = only_message(&spec);
        assert!(message.starts_with("spec.source.http.url: is not a URL ("), "{message}");
        assert!(!message.contains("exa mple"));
    }

    // ---- postgres query ----

    fn query_problem(q: &str) -> Option<Problem> {
        check_query(q).err()
    }

    #[test]
    fn query_is_one_select_or_with() {
        for ok in [
            "SELECT 1",
            "select id from users;",
            "  -- leading comment\n/* block /* nested */ */ WITH x AS (SELECT 1) SELECT * FROM x ;  -- done",
            "(SELECT 1) UNION (SELECT 2)",
            "SELECT ';' AS a, \"odd;name\", E'it\\'s; fine', $$a;b$$, $tag$ x; $$ y $tag$ FROM t",
            "SELECT $1::text, a$b FROM t",
            "SELECT 'it''s; ok'",
            "SELECT 1;;",
        ] {
            assert_eq!(query_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn query_rejects_other_statements() {
        assert_eq!(
            query_problem("DELETE FROM users"),
            Some(Problem::Query(QueryProblem::NotSelect { first: "DELETE".into() }))
        );
        assert_eq!(
            query_problem("  /* hi */ update users set x = 1"),
            Some(Problem::Query(QueryProblem::NotSelect { first: "update".into() }))
        );
        assert_eq!(
            query_problem("selectx from t"),
            Some(Problem::Query(QueryProblem::NotSelect { first: "selectx".into() }))
        );
        assert_eq!(query_problem("-- only a comment\n"), Some(Problem::Query(QueryProblem::Empty)));
        assert_eq!(query_problem(";"), Some(Problem::Query(QueryProblem::NotSelect { first: ";".into() })));
    }

    #[test]
    fn query_rejects_several_statements() {
        assert_eq!(
            query_problem("SELECT 1;\nDROP TABLE users"),
            Some(Problem::Query(QueryProblem::MultipleStatements { line: 1 }))
        );
        assert_eq!(
            query_problem("SELECT 'a;b'\n;\n-- c\nSELECT 2"),
            Some(Problem::Query(QueryProblem::MultipleStatements { line: 2 }))
        );
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.source.postgres.as_mut().unwrap().query = "SELECT id FROM a; SELECT id FROM b".into();
        assert_eq!(
            only_message(&spec),
            "spec.source.postgres.query: holds more than one statement (text follows the `;` on \
             line 1); keep a single SELECT statement and remove what follows the `;`"
        );
    }

    #[test]
    fn query_reports_unclosed_quotes() {
        assert_eq!(
            query_problem("SELECT 1\nWHERE a = 'x;\nDROP TABLE t"),
            Some(Problem::Query(QueryProblem::Unterminated { what: "string literal '", line: 2 }))
        );
        assert_eq!(
            query_problem("SELECT \"a"),
            Some(Problem::Query(QueryProblem::Unterminated { what: "quoted identifier \"", line: 1 }))
        );
        assert_eq!(
            query_problem("SELECT $x$ abc $y$"),
            Some(Problem::Query(QueryProblem::Unterminated { what: "dollar-quoted string", line: 1 }))
        );
        assert_eq!(
            query_problem("SELECT 1 /* /* */"),
            Some(Problem::Query(QueryProblem::Unterminated { what: "comment /*", line: 1 }))
        );
        // Without E, a backslash does not escape the quote.
        assert_eq!(
            query_problem(r"SELECT 'a\'; SELECT 2"),
            Some(Problem::Query(QueryProblem::MultipleStatements { line: 1 }))
        );
    }

    // ---- warehouse dialects ----

    #[test]
    fn warehouse_sources_are_checked() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.source.postgres = None;
        spec.source.snowflake = Some(
            serde_json::from_value(serde_json::json!({
                "credentials": { "secretName": "snowflake" },
                "endpoint": "http://snowflake.internal",
                "role": " ",
                "query": "DELETE FROM users",
            }))
            .unwrap(),
        );
        assert_eq!(
            paths(&spec),
            ["spec.source.snowflake.query", "spec.source.snowflake.endpoint", "spec.source.snowflake.role"]
        );
        spec.source.snowflake = None;
        spec.source.databricks = Some(
            serde_json::from_value(serde_json::json!({
                "host": "https://dbc-1.cloud.databricks.com/sql/1.0",
                "warehouseId": "abc",
                "auth": {},
                "query": "SELECT 1; SELECT 2",
            }))
            .unwrap(),
        );
        assert_eq!(
            paths(&spec),
            ["spec.source.databricks.query", "spec.source.databricks.host", "spec.source.databricks.auth"]
        );
        let valid = |spec: &CohortImportSpec| validate(spec).map(|v| v.source.kind());
        let dbx = spec.source.databricks.as_mut().unwrap();
        dbx.host = "https://dbc-1.cloud.databricks.com".into();
        dbx.query = "SELECT id FROM t".into();
        dbx.auth.token_secret_ref = Some(crate::api::SecretKeyRef { name: "dbx".into(), key: "token".into() });
        assert_eq!(valid(&spec), Ok(SourceKind::Databricks));
    }

    #[test]
    fn the_valid_source_is_the_one_kind_set_with_its_settings() {
        let spec = example(WAREHOUSE_EXAMPLE);
        let valid = validate(&spec).unwrap();
        assert_eq!(valid.source, ValidSource::Postgres(*spec.source.postgres.clone().unwrap()));
        assert_eq!(ValidSource::of(&spec.source), Some(valid.source));
        let mut two = spec.source.clone();
        two.inline = Some(InlineSource { rows: vec![] });
        assert_eq!(ValidSource::of(&two), None);
        assert_eq!(ValidSource::of(&SourceSpec::default()), None);
    }

    // ---- schedule ----

    fn schedule_paths(f: impl FnOnce(&mut ScheduleSpec)) -> Vec<String> {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        f(&mut spec.schedule);
        match validate(&spec) {
            Ok(_) => vec![],
            Err(e) => e.0.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn day_of_week_only_with_weekly() {
        assert_eq!(
            schedule_paths(|s| s.cadence = Cadence::Daily),
            [
                "spec.schedule.dayOfWeek: set only with cadence Weekly (cadence is Daily); remove it or change the cadence"
            ]
        );
        assert_eq!(
            schedule_paths(|s| s.day_of_week = None),
            ["spec.schedule.dayOfWeek: required with cadence Weekly; set it, e.g. Monday"]
        );
    }

    #[test]
    fn day_of_month_only_with_monthly() {
        assert_eq!(
            schedule_paths(|s| s.day_of_month = Some(1)),
            [
                "spec.schedule.dayOfMonth: set only with cadence Monthly (cadence is Weekly); remove it or change the cadence"
            ]
        );
        assert_eq!(
            schedule_paths(|s| {
                s.cadence = Cadence::Monthly;
                s.day_of_week = None;
            }),
            ["spec.schedule.dayOfMonth: required with cadence Monthly; set it, e.g. 1"]
        );
        assert_eq!(
            schedule_paths(|s| {
                s.cadence = Cadence::Monthly;
                s.day_of_week = None;
                s.day_of_month = Some(32);
            }),
            [
                "spec.schedule.dayOfMonth: 32 is not a day of the month; use 1 to 31 (a month shorter than the day runs on its last day)"
            ]
        );
        assert_eq!(
            schedule_paths(|s| {
                s.cadence = Cadence::Monthly;
                s.day_of_week = None;
                s.day_of_month = Some(31);
            }),
            Vec::<String>::new()
        );
    }

    #[test]
    fn at_is_a_wall_time_and_required_when_recurring() {
        assert_eq!(
            schedule_paths(|s| s.at = Some("6:00".into())),
            ["spec.schedule.at: \"6:00\" is not a wall time; write HH:MM from 00:00 to 23:59, e.g. \"06:00\""]
        );
        assert_eq!(schedule_paths(|s| s.at = Some("24:00".into())).len(), 1);
        assert_eq!(
            schedule_paths(|s| s.at = None),
            ["spec.schedule.at: required with cadence Weekly; set it, e.g. \"06:00\""]
        );
    }

    #[test]
    fn hourly_needs_minute_and_no_at() {
        let hourly = |s: &mut ScheduleSpec| {
            s.cadence = Cadence::Hourly;
            s.day_of_week = None;
            s.at = None;
            s.minute = Some(15);
        };
        assert_eq!(schedule_paths(hourly), Vec::<String>::new());
        let mut spec = example(WAREHOUSE_EXAMPLE);
        hourly(&mut spec.schedule);
        let valid = validate(&spec).unwrap();
        assert_eq!(valid.schedule.recurrence, Recurrence::Hourly { minute: MinuteOfHour::new(15).unwrap() });
        assert_eq!(
            schedule_paths(|s| {
                hourly(s);
                s.minute = None;
                s.at = Some("06:15".into());
            }),
            [
                "spec.schedule.at: is not used with cadence Hourly, which runs at `minute` past every hour; remove `at` and set minute, e.g. minute: 15",
                "spec.schedule.minute: required with cadence Hourly; set it, e.g. 15",
            ]
        );
        assert_eq!(
            schedule_paths(|s| {
                hourly(s);
                s.minute = Some(60);
            }),
            ["spec.schedule.minute: 60 is not a minute of the hour; use 0 to 59, e.g. minute: 15"]
        );
        assert_eq!(
            schedule_paths(|s| s.minute = Some(15)),
            ["spec.schedule.minute: set only with cadence Hourly (cadence is Weekly); remove it or change the cadence"]
        );
    }

    #[test]
    fn the_attribute_method_takes_its_own_fields_and_refuses_the_partners() {
        use crate::api::{AttributeShape, MembershipAttributeSpec, SecretKeyRef};
        let mut spec = example(WAREHOUSE_EXAMPLE);
        assert!(validate(&spec).is_ok(), "an existing manifest stays valid");
        spec.destination.braze.as_mut().unwrap().method = DeliveryMethod::Attribute;
        let texts = |spec: &CohortImportSpec| errors(spec).iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            texts(&spec),
            [
                "spec.destination.braze.apiKeySecretRef: is required with method: Attribute; set it, e.g. {name: braze-rest, key: api-key}",
                "spec.destination.braze.attribute: is required with method: Attribute; set it, e.g. {name: cohorts, shape: Array}",
                "spec.destination.braze.partner: is not used with method: Attribute; remove it (partner keys are for method: CohortImport; this method uses apiKeySecretRef)",
                "spec.destination.braze.dataImportKeySecretRef: is not used with method: Attribute; remove it (partner keys are for method: CohortImport; this method uses apiKeySecretRef)",
            ]
        );
        let braze = spec.destination.braze.as_mut().unwrap();
        braze.partner = None;
        braze.data_import_key_secret_ref = None;
        braze.api_key_secret_ref = Some(SecretKeyRef { name: "braze-rest".into(), key: "api-key".into() });
        braze.attribute = Some(MembershipAttributeSpec { name: "cohorts".into(), shape: AttributeShape::Array });
        assert!(validate(&spec).is_ok(), "{:?}", validate(&spec));

        spec.identifiers.device_id = Some("device".into());
        assert_eq!(paths(&spec), ["spec.identifiers.deviceId"]);
        assert!(texts(&spec)[0].contains("map externalId or alias, or use method: CohortImport"));
        spec.identifiers.device_id = None;
        for (name, reason) in [
            ("$cohorts", "starts with $"),
            ("email", "standard attribute"),
            ("External_ID", "standard attribute"),
            (" cohorts", "surrounding spaces"),
            ("co\u{7}horts", "control characters"),
        ] {
            spec.destination.braze.as_mut().unwrap().attribute.as_mut().unwrap().name = name.into();
            let text = texts(&spec).join("\n");
            assert!(text.starts_with("spec.destination.braze.attribute.name: "), "{text}");
            assert!(text.contains(reason), "{name:?}: {text}");
        }

        // Back to the partner method with the attribute's fields left over.
        spec.destination.braze.as_mut().unwrap().method = DeliveryMethod::CohortImport;
        assert_eq!(
            paths(&spec),
            [
                "spec.destination.braze.partner",
                "spec.destination.braze.dataImportKeySecretRef",
                "spec.destination.braze.apiKeySecretRef",
                "spec.destination.braze.attribute",
            ]
        );
    }

    #[test]
    fn run_on_create_is_for_recurring_cadences() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.schedule.run_on_create = true;
        assert!(validate(&spec).unwrap().schedule.run_on_create);
        assert_eq!(
            schedule_paths(|s| {
                s.cadence = Cadence::Once;
                s.day_of_week = None;
                s.run_on_create = true;
            }),
            [
                "spec.schedule.runOnCreate: is only for recurring cadences; Once already runs soon after creation when `at` is omitted, so remove runOnCreate (or `at`)"
            ]
        );
    }

    #[test]
    fn once_needs_no_at() {
        let schedule = ScheduleSpec {
            cadence: Cadence::Once,
            at: None,
            day_of_week: None,
            day_of_month: None,
            minute: None,
            expression: None,
            time_zone: "UTC".into(),
            run_on_create: false,
        };
        let parsed = Schedule::try_from(&schedule).unwrap();
        assert_eq!(parsed.recurrence, Recurrence::Once { at: None });
        let with_at = ScheduleSpec { at: Some("09:15".into()), ..schedule };
        assert_eq!(
            Schedule::try_from(&with_at).unwrap().recurrence,
            Recurrence::Once { at: Some("09:15".parse().unwrap()) }
        );
    }

    #[test]
    fn time_zone_is_iana() {
        assert_eq!(
            schedule_paths(|s| s.time_zone = "Mars/Olympus_Mons".into()),
            [
                "spec.schedule.timeZone: \"Mars/Olympus_Mons\" is not an IANA time zone; use a name such as Europe/Lisbon, America/New_York or UTC"
            ]
        );
        for zone in ["UTC", "Australia/Lord_Howe", "America/Argentina/Buenos_Aires", "Etc/GMT+5"] {
            assert_eq!(schedule_paths(|s| s.time_zone = zone.into()), Vec::<String>::new(), "{zone}");
        }
    }

    // ---- identifiers ----

    #[test]
    fn identifiers_need_one_mapping() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.identifiers = IdentifierMapping::default();
        assert_eq!(
            only_message(&spec),
            "spec.identifiers: maps no identifier; set at least one of externalId, alias or deviceId"
        );
    }

    #[test]
    fn alias_needs_exactly_one_label_source() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.identifiers.alias = Some(AliasMapping {
            name_field: "email".into(),
            label: Some("email".into()),
            label_field: Some("kind".into()),
        });
        assert_eq!(errors(&spec)[0].problem, Problem::AliasLabelBoth);
        spec.identifiers.alias = Some(AliasMapping { name_field: "email".into(), label: None, label_field: None });
        assert_eq!(
            only_message(&spec),
            "spec.identifiers.alias: sets neither label nor labelField; set label (one fixed label) \
             or labelField (the field holding each row's label)"
        );
        spec.identifiers.alias =
            Some(AliasMapping { name_field: "email".into(), label: None, label_field: Some("kind".into()) });
        let valid = validate(&spec).unwrap();
        assert_eq!(valid.identifiers.alias, Some(("email".into(), LabelSource::Field("kind".into()))));
    }

    #[test]
    fn identifier_field_names_are_not_empty() {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.identifiers.external_id = Some(String::new());
        assert_eq!(only_message(&spec), "spec.identifiers.externalId: is empty; name the source field");
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.identifiers.alias =
            Some(AliasMapping { name_field: "email".into(), label: Some("a\tb".into()), label_field: None });
        assert_eq!(paths(&spec), ["spec.identifiers.alias.label"]);
    }

    // ---- Braze endpoint ----

    fn endpoint_messages(endpoint: &str) -> Vec<String> {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.destination.braze.as_mut().unwrap().rest_endpoint = endpoint.into();
        match validate(&spec) {
            Ok(_) => vec![],
            Err(e) => e.0.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn braze_endpoint_is_https_or_loopback_http() {
        for ok in [
            "https://rest.iad-01.braze.com",
            "https://rest.fra-02.braze.eu/",
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:9000",
            "https://127.0.0.1:8443",
        ] {
            assert_eq!(endpoint_messages(ok), Vec::<String>::new(), "{ok}");
        }
        assert_eq!(
            endpoint_messages("http://rest.iad-01.braze.com"),
            ["spec.destination.braze.restEndpoint: uses http:// for host rest.iad-01.braze.com; use \
              https:// (http:// is accepted only for loopback hosts such as 127.0.0.1 and localhost)"]
        );
        assert_eq!(endpoint_messages("http://10.0.0.5").len(), 1);
        assert_eq!(
            endpoint_messages("ftp://rest.iad-01.braze.com"),
            ["spec.destination.braze.restEndpoint: uses ftp://; use https:// or http://"]
        );
    }

    #[test]
    fn braze_endpoint_is_bare_and_without_credentials() {
        assert_eq!(
            endpoint_messages("https://rest.iad-01.braze.com/partners"),
            ["spec.destination.braze.restEndpoint: has a path, query or fragment; give only the \
              scheme and host, e.g. https://rest.iad-01.braze.com"]
        );
        assert_eq!(endpoint_messages("https://rest.iad-01.braze.com?x=1").len(), 1);
        let messages = endpoint_messages("https://key:s3cret@rest.iad-01.braze.com");
        assert_eq!(
            messages,
            ["spec.destination.braze.restEndpoint: carries a user name or password; remove them and \
              give credentials through spec.destination.braze.dataImportKeySecretRef"]
        );
        let messages = endpoint_messages("rest.iad-01.braze.com");
        assert_eq!(
            messages,
            ["spec.destination.braze.restEndpoint: is not a URL (relative URL without a base); \
              write it like https://rest.iad-01.braze.com"]
        );
    }

    // ---- notifications ----

    fn with_recipients(to: &[&str], on: Option<Vec<NotifyOn>>) -> CohortImportSpec {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.notifications = Some(Box::new(Notifications {
            email: Some(EmailNotification {
                to: to.iter().map(|s| EmailAddress((*s).into())).collect(),
                on,
                when: Default::default(),
            }),
            ..Notifications::default()
        }));
        spec
    }

    #[test]
    fn email_recipients_look_like_addresses() {
        validate(&with_recipients(&["a@b.co", "first.last+tag@sub.example.org", "ops@localhost"], None)).unwrap();
        let spec = with_recipients(
            &[
                "ok@example.com",
                "a@b.com, c@d.com",
                "no-at.example.com",
                "x@-bad.com",
                "x@a..b",
                ".x@a.b",
                "<a@b.c>",
                "a b@c.d",
            ],
            None,
        );
        assert_eq!(
            paths(&spec),
            [
                "spec.notifications.email.to[1]",
                "spec.notifications.email.to[2]",
                "spec.notifications.email.to[3]",
                "spec.notifications.email.to[4]",
                "spec.notifications.email.to[5]",
                "spec.notifications.email.to[6]",
                "spec.notifications.email.to[7]",
            ]
        );
        assert_eq!(
            errors(&spec)[0].to_string(),
            "spec.notifications.email.to[1]: \"a@b.com, c@d.com\" does not look like an email \
             address; write one address, local@domain, per entry"
        );
    }

    #[test]
    fn email_on_is_not_empty() {
        let spec = with_recipients(&["a@b.co"], Some(vec![]));
        assert_eq!(errors(&spec)[0].problem, Problem::NoNotifyOn);
        validate(&with_recipients(&["a@b.co"], Some(vec![NotifyOn::Failed]))).unwrap();
    }

    #[test]
    fn slack_and_webhook_on_are_not_empty_and_headers_are_ours_to_set() {
        use crate::api::{SecretHeader, SecretKeyRef, SlackNotification, WebhookNotification};
        let secret = |key: &str| SecretKeyRef { name: "hooks".into(), key: key.into() };
        let header = |name: &str| SecretHeader { name: name.into(), value_secret_ref: secret("token") };
        let mut spec = example(WAREHOUSE_EXAMPLE);
        spec.notifications = Some(Box::new(Notifications {
            slack: Some(SlackNotification {
                url_secret_ref: secret("slack"),
                on: Some(vec![]),
                when: Default::default(),
            }),
            webhook: Some(WebhookNotification {
                url_secret_ref: secret("url"),
                headers: vec![
                    header("Authorization"),
                    header("X-Team"),
                    header("content-type"),
                    header("ce-type"),
                    header("x-team"),
                    header("Bad Header"),
                ],
                on: Some(vec![]),
                when: Default::default(),
            }),
            ..Notifications::default()
        }));
        let messages: Vec<String> = errors(&spec).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            messages,
            [
                "spec.notifications.slack.on: is empty, so nothing would ever be sent; list results (Succeeded, Failed, Blocked) or remove `on` to report every result",
                "spec.notifications.webhook.on: is empty, so nothing would ever be sent; list results (Succeeded, Failed, Blocked) or remove `on` to report every result",
                "spec.notifications.webhook.headers[2].name: \"content-type\" is set by the operator (the body's type and length, the connection, CloudEvents' ce-* attributes); remove it",
                "spec.notifications.webhook.headers[3].name: \"ce-type\" is set by the operator (the body's type and length, the connection, CloudEvents' ce-* attributes); remove it",
                "spec.notifications.webhook.headers[4].name: \"x-team\" is set twice (header names ignore case); keep one",
                "spec.notifications.webhook.headers[5].name: \"Bad Header\" is not an HTTP header name; use letters, digits and - (e.g. Authorization)",
            ]
        );
        let n = spec.notifications.as_mut().unwrap();
        n.slack.as_mut().unwrap().on = None;
        let webhook = n.webhook.as_mut().unwrap();
        webhook.on = Some(vec![NotifyOn::Failed]);
        webhook.headers.truncate(2);
        validate(&spec).unwrap();
    }

    fn bigquery(extra: serde_json::Value) -> CohortImportSpec {
        let mut spec = example(WAREHOUSE_EXAMPLE);
        let mut bq = serde_json::json!({
            "projectId": "cohort-analytics",
            "query": "SELECT user_id FROM `cohort-analytics.events.active`",
            "serviceAccountKeySecretRef": { "name": "bq", "key": "key.json" },
        });
        for (k, v) in extra.as_object().unwrap() {
            bq[k] = v.clone();
        }
        spec.source = serde_json::from_value(serde_json::json!({ "bigquery": bq })).unwrap();
        spec
    }

    #[test]
    fn bigquery_sources_are_checked() {
        let valid = validate(&bigquery(serde_json::json!({}))).unwrap();
        assert_eq!(valid.source.kind(), SourceKind::BigQuery);
        let spec = bigquery(serde_json::json!({
            "projectId": "My Project",
            "query": "SELECT 1; DROP TABLE x",
            "endpoint": "http://bigquery.example.com",
            "metadataServer": "127.0.0.1:8080",
        }));
        assert_eq!(
            paths(&spec),
            [
                "spec.source.bigquery.projectId",
                "spec.source.bigquery.query",
                "spec.source.bigquery.metadataServer",
                "spec.source.bigquery.endpoint",
            ]
        );
        assert!(errors(&spec)[3].to_string().contains("not a Google API host"));
        let regional = bigquery(serde_json::json!({ "endpoint": "https://bigquery.europe-west1.rep.googleapis.com" }));
        validate(&regional).unwrap();
        validate(&bigquery(serde_json::json!({ "endpoint": "http://127.0.0.1:4020" }))).unwrap();
        let mut two = bigquery(serde_json::json!({}));
        two.source.postgres = example(WAREHOUSE_EXAMPLE).source.postgres;
        assert!(errors(&two)[0].to_string().contains("sets 2 sources (postgres, bigquery)"), "{}", errors(&two)[0]);
    }

    #[test]
    fn googlesql_queries_are_one_select() {
        for ok in [
            "SELECT 'it\\'s; fine' AS a # comment; here\n",
            "WITH a AS (SELECT \"x;y\" AS s) SELECT s FROM a;",
            "SELECT `my-project.ds.t`.id FROM `my-project.ds.t` -- ;\n;;",
            "SELECT \'\'\'multi\n;line\'\'\' AS s, r'\\d;' AS r",
            "(SELECT 1) /* ; */",
        ] {
            assert_eq!(check_googlesql_query(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_googlesql_query("SELECT 1;\nDELETE FROM t"),
            Err(Problem::Query(QueryProblem::MultipleStatements { line: 1 }))
        );
        assert_eq!(check_googlesql_query("# only\n"), Err(Problem::Query(QueryProblem::Empty)));
        assert!(matches!(
            check_googlesql_query("INSERT INTO t VALUES (1)"),
            Err(Problem::Query(QueryProblem::NotSelect { .. }))
        ));
        assert!(matches!(
            check_googlesql_query("SELECT 'open"),
            Err(Problem::Query(QueryProblem::Unterminated { .. }))
        ));
        assert!(matches!(
            check_googlesql_query("SELECT `open"),
            Err(Problem::Query(QueryProblem::Unterminated { .. }))
        ));
    }

    #[test]
    fn retry_settings_are_checked_naming_the_field_and_the_fix() {
        let mut spec = http_spec();
        spec.retry = Some(RetrySpec { limit: 3, backoff_seconds: 600, max_backoff_seconds: 60 });
        let [e] = &errors(&spec)[..] else { panic!("{:?}", errors(&spec)) };
        assert_eq!(
            e.to_string(),
            "spec.retry.maxBackoffSeconds: 60 is less than backoffSeconds (600); raise maxBackoffSeconds to at \
             least 600, or lower backoffSeconds"
        );
        spec.retry = Some(RetrySpec { limit: 11, backoff_seconds: 0, max_backoff_seconds: 60 });
        let messages: Vec<String> = errors(&spec).iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "spec.retry.limit: 11 is out of range; use 0 to 10 (0 turns retries off)",
                "spec.retry.backoffSeconds: 0 is out of range; use 1 to 86400 (a day)",
            ]
        );
        spec.retry = Some(RetrySpec { limit: 0, ..RetrySpec::default() });
        assert!(validate(&spec).is_ok(), "limit 0 turns retries off");
        let defaults: CohortImportSpec = example(&SANDBOX_EXAMPLE.replace("spec:\n", "spec:\n  retry: {}\n"));
        assert_eq!(defaults.retry, Some(RetrySpec::default()), "every field has a default");
    }
}
