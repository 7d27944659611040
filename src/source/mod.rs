//! Cohort sources: where the member list comes from.
//!
//! Every kind — [`inline`], [`config_map`], [`http`], [`postgres`], [`snowflake`],
//! [`databricks`], [`bigquery`] — is a [`MemberSource`]:
//! an async stream of [`MemberBatch`]es, so no source holds the whole cohort in memory.
//! Each row becomes one [`Member`] through the spec's identifier mapping
//! ([`crate::domain::identifiers`]); rows that give none are counted by reason.
//!
//! Batches may repeat members, within a batch and across batches: collapsing duplicates
//! needs the whole cohort, so it happens downstream ([`read_cohort`] does it, and counts
//! them). A source *error* ends the stream with `Err`; it is never an empty cohort.
//!
//! Secrets (connection URLs, tokens, passwords) are held as [`SecretString`]s and never
//! appear in [`MemberSource::describe`], in a [`SourceError`], or in a log line.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::api::{IdentifierMapping, ReadyReason, SourceSpec};
use crate::domain::identifiers::{IdentifierFields, SkipCounts, SkipReason};
use crate::domain::member::{Member, MemberKey};
use crate::domain::validate::ValidSource;
use crate::net::egress;
use crate::secret::SecretString;

pub use ambient::AmbientIdentity;

mod ambient;
pub mod bigquery;
pub mod config_map;
pub mod databricks;
mod formats;
pub mod http;
pub mod inline;
mod json;
pub mod kube;
pub mod postgres;
pub mod private_key;
pub mod snowflake;
pub mod warehouse;

/// Rows per batch for sources that choose their own batch size.
pub const BATCH_ROWS: usize = 10_000;

/// Members read from a source, and the rows that gave none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberBatch {
    /// May contain duplicates.
    pub members: Vec<Member>,
    pub skipped: SkipCounts,
}

impl MemberBatch {
    /// Rows this batch accounts for.
    pub fn rows(&self) -> u64 {
        self.members.len() as u64 + self.skipped.total()
    }
}

/// The batches of one read. After an `Err` the stream ends.
pub type MemberStream<'a> = BoxStream<'a, Result<MemberBatch, SourceError>>;

/// A cohort source, opened and ready to read (possibly several times).
pub trait MemberSource: Send + Sync + fmt::Debug {
    /// What is read, for messages and logs, without secrets: e.g. `postgres query
    /// (connection from Secret growth/warehouse key url)`.
    fn describe(&self) -> String;

    /// Reads the source from the start.
    fn members(&self) -> MemberStream<'_>;
}

/// A whole cohort, read, sorted and de-duplicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CohortRead {
    /// Sorted, unique.
    pub members: Vec<MemberKey>,
    pub skipped: SkipCounts,
    /// Rows that repeated a member already read.
    pub duplicates: u64,
    /// Rows read in all.
    pub rows: u64,
}

/// Reads a source to the end and collapses duplicates. Holds every member's key; for the
/// largest cohorts consume [`MemberSource::members`] directly instead.
pub async fn read_cohort(source: &dyn MemberSource) -> Result<CohortRead, SourceError> {
    let mut read = CohortRead::default();
    let mut stream = source.members();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        read.rows += batch.rows();
        read.skipped.add(&batch.skipped);
        read.members.extend(batch.members.iter().map(Member::key));
    }
    read.members.sort_unstable();
    let before = read.members.len();
    read.members.dedup();
    read.duplicates = (before - read.members.len()) as u64;
    Ok(read)
}

/// The Kubernetes object a source reads its configuration from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Secret,
    ConfigMap,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Secret => "Secret",
            ObjectKind::ConfigMap => "ConfigMap",
        })
    }
}

/// Why a source could not be opened or read. `what` is [`MemberSource::describe`]. No
/// variant ever holds a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("{kind} {namespace}/{name} not found: create it in the import's namespace or fix the name in the spec")]
    ObjectNotFound { kind: ObjectKind, namespace: String, name: String },
    #[error("{kind} {namespace}/{name} has no key {key:?}: add it or fix the key in the spec")]
    KeyNotFound { kind: ObjectKind, namespace: String, name: String, key: String },
    #[error("{kind} {namespace}/{name} key {key:?} is not UTF-8 text")]
    KeyNotText { kind: ObjectKind, namespace: String, name: String, key: String },
    #[error("cannot read {kind} {namespace}/{name}: {message}")]
    ObjectRead { kind: ObjectKind, namespace: String, name: String, message: String },
    /// The spec cannot work as written (a mapped column the source lacks, a bad URL, …).
    #[error("{what}: {message}")]
    Config { what: String, message: String },
    #[error("{what}: cannot connect: {message}")]
    Connect { what: String, message: String },
    /// The source would authenticate as the operator itself (its cloud identity), and the
    /// operator does not lend it to this namespace. `field` is what to set instead.
    #[error(
        "{what}: without {field} the source would use the operator's own cloud identity (Workload Identity), \
         which the operator does not lend to namespace {namespace}: set {field} to a credential of your own, or \
         ask the operator's administrator to start it with --ambient-identity-namespaces={namespace} (chart value \
         ambientIdentity.namespaces)"
    )]
    AmbientIdentityRefused { what: String, namespace: String, field: &'static str },
    /// The operator's egress policy refuses where the source would connect.
    #[error("{what}: {denied}")]
    EgressDenied { what: String, denied: egress::EgressDenied },
    #[error("{what}: query failed: {message}")]
    Query { what: String, message: String },
    #[error("{what}: no result within {seconds} s, cancelled; raise statementTimeoutSeconds or make the query faster")]
    Timeout { what: String, seconds: u64 },
    #[error("{what}: {url} (page {page}) answered HTTP {status}{detail}")]
    HttpStatus { what: String, url: String, page: u64, status: u16, detail: String },
    #[error("{what}: reading {url} (page {page}) failed: {message}")]
    Transport { what: String, url: String, page: u64, message: String },
    #[error("{what}: malformed {format} at {location}: {message}")]
    Malformed { what: String, format: &'static str, location: String, message: String },
    #[error(
        "{what}: more than maxBytes ({limit} bytes) after decompression; raise maxBytes if the export is really this large"
    )]
    TooLarge { what: String, limit: u64 },
    /// One row, line or value is longer than its limit; `field` is the spec field that
    /// raises it. Reading stops there, so memory stays bounded whatever the input.
    #[error(
        "{what}: the {item} at {location} is longer than {limit} bytes; raise {field} if rows really are this long"
    )]
    RowTooLarge { what: String, item: &'static str, location: String, limit: u64, field: &'static str },
    /// One page of a warehouse's answer (a partition, a chunk) is over the spec's byte cap.
    #[error("{what}: {part} is larger than {field} ({limit} bytes); raise {field} or select fewer columns")]
    PageTooLarge { what: String, part: String, field: &'static str, limit: u64 },
    /// One page is over the operator's ceiling (`--max-source-page-bytes`), which a spec can
    /// lower but never raise.
    #[error(
        "{what}: {part} is larger than the operator's ceiling of {limit} bytes a page (--max-source-page-bytes); \
         select fewer columns or rows per page, or ask the operator's administrators to raise it"
    )]
    PageOverCeiling { what: String, part: String, limit: u64 },
    /// The warehouse refused the credentials. `fix` says where they come from.
    #[error("{what}: authentication failed: {detail}; {fix}")]
    Auth { what: String, detail: String, fix: String },
    /// The credentials work but may not run the query (a role, a grant, the API disabled).
    #[error("{what}: permission denied: {detail}; {fix}")]
    Permission { what: String, detail: String, fix: String },
    /// The warehouse kept answering with a transient error (429, 503, …) until the retries
    /// ran out.
    #[error("{what}: still unavailable after {attempts} attempts: {detail}; the next run tries again")]
    Unavailable { what: String, attempts: u32, detail: String },
}

impl SourceError {
    /// The `Ready` condition reason the controller reports for this error.
    pub fn reason(&self) -> ReadyReason {
        match self {
            SourceError::ObjectNotFound { kind: ObjectKind::Secret, .. }
            | SourceError::KeyNotFound { kind: ObjectKind::Secret, .. } => ReadyReason::SecretNotFound,
            SourceError::ObjectNotFound { kind: ObjectKind::ConfigMap, .. }
            | SourceError::KeyNotFound { kind: ObjectKind::ConfigMap, .. } => ReadyReason::ConfigMapNotFound,
            SourceError::Config { .. }
            | SourceError::KeyNotText { .. }
            | SourceError::AmbientIdentityRefused { .. } => ReadyReason::InvalidSpec,
            SourceError::EgressDenied { .. } => ReadyReason::EgressDenied,
            _ => ReadyReason::SourceFailed,
        }
    }
}

/// Reads the Secrets and ConfigMaps a source names, in the import's namespace.
pub trait SourceContext: Send + Sync {
    /// The import's namespace; every object is read from it.
    fn namespace(&self) -> &str;

    /// A Secret key's value, as UTF-8 text.
    fn secret_value(&self, name: &str, key: &str) -> impl Future<Output = Result<SecretString, SourceError>> + Send;

    /// A ConfigMap key's bytes (from `data`, or `binaryData`).
    fn config_map_value(&self, name: &str, key: &str) -> impl Future<Output = Result<Vec<u8>, SourceError>> + Send;

    /// Where sources may connect ([`egress`]); every source that opens a connection obeys it.
    fn egress(&self) -> std::sync::Arc<egress::EgressPolicy> {
        egress::EgressPolicy::shared_default()
    }

    /// Whether this namespace's imports may authenticate as the operator itself (its cloud
    /// identity: GKE Workload Identity through the metadata server). Off unless the
    /// operator names the namespace (`--ambient-identity-namespaces`).
    fn ambient_identity_allowed(&self) -> bool {
        false
    }

    /// The operator's ceiling on one warehouse page's body, in bytes (`--max-source-page-bytes`):
    /// a spec's own cap (`maxPartitionBytes`, `maxChunkBytes`, `maxPageBytes`) only lowers it.
    fn max_page_bytes(&self) -> u64 {
        warehouse::DEFAULT_MAX_PAGE_BYTES
    }
}

/// Secrets and ConfigMaps held in memory, for tests and for callers that already read them.
#[derive(Clone, Default)]
pub struct InMemoryObjects {
    pub namespace: String,
    /// Secret name → key → value.
    pub secrets: BTreeMap<String, BTreeMap<String, SecretString>>,
    /// ConfigMap name → key → bytes.
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// `None`: the default policy.
    pub egress: Option<std::sync::Arc<egress::EgressPolicy>>,
    /// Whether the operator's own cloud identity may be used ([`SourceContext::ambient_identity_allowed`]).
    pub ambient_identity: bool,
    /// `None`: [`warehouse::DEFAULT_MAX_PAGE_BYTES`].
    pub max_page_bytes: Option<u64>,
}

impl fmt::Debug for InMemoryObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryObjects")
            .field("namespace", &self.namespace)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("config_maps", &self.config_maps.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl InMemoryObjects {
    pub fn new(namespace: impl Into<String>) -> Self {
        InMemoryObjects { namespace: namespace.into(), ..Default::default() }
    }

    pub fn with_secret(mut self, name: &str, key: &str, value: impl Into<String>) -> Self {
        self.secrets.entry(name.to_owned()).or_default().insert(key.to_owned(), SecretString::new(value.into()));
        self
    }

    pub fn with_egress(mut self, policy: std::sync::Arc<egress::EgressPolicy>) -> Self {
        self.egress = Some(policy);
        self
    }

    pub fn with_ambient_identity(mut self, allowed: bool) -> Self {
        self.ambient_identity = allowed;
        self
    }

    /// The operator's ceiling on a warehouse page (see [`SourceContext::max_page_bytes`]).
    pub fn with_max_page_bytes(mut self, bytes: u64) -> Self {
        self.max_page_bytes = Some(bytes);
        self
    }

    pub fn with_config_map(mut self, name: &str, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.config_maps.entry(name.to_owned()).or_default().insert(key.to_owned(), value.into());
        self
    }

    fn lookup<'a, T>(
        &self,
        objects: &'a BTreeMap<String, BTreeMap<String, T>>,
        kind: ObjectKind,
        name: &str,
        key: &str,
    ) -> Result<&'a T, SourceError> {
        let object = objects.get(name).ok_or_else(|| SourceError::ObjectNotFound {
            kind,
            namespace: self.namespace.clone(),
            name: name.to_owned(),
        })?;
        object.get(key).ok_or_else(|| SourceError::KeyNotFound {
            kind,
            namespace: self.namespace.clone(),
            name: name.to_owned(),
            key: key.to_owned(),
        })
    }
}

impl SourceContext for InMemoryObjects {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn secret_value(&self, name: &str, key: &str) -> Result<SecretString, SourceError> {
        self.lookup(&self.secrets, ObjectKind::Secret, name, key).cloned()
    }

    async fn config_map_value(&self, name: &str, key: &str) -> Result<Vec<u8>, SourceError> {
        self.lookup(&self.config_maps, ObjectKind::ConfigMap, name, key).cloned()
    }

    fn egress(&self) -> std::sync::Arc<egress::EgressPolicy> {
        self.egress.clone().unwrap_or_else(egress::EgressPolicy::shared_default)
    }

    fn ambient_identity_allowed(&self) -> bool {
        self.ambient_identity
    }

    fn max_page_bytes(&self) -> u64 {
        self.max_page_bytes.unwrap_or(warehouse::DEFAULT_MAX_PAGE_BYTES)
    }
}

/// Opens `source` (a validated spec's [`ValidSpec::source`](crate::domain::validate::ValidSpec)),
/// reading the Secrets and ConfigMaps it needs, and checks what can be checked before
/// reading (the mapped columns, URLs, formats). Each row becomes a member through `fields`.
pub async fn open_source(
    source: &ValidSource,
    fields: &IdentifierFields,
    ctx: &impl SourceContext,
) -> Result<Box<dyn MemberSource>, SourceError> {
    let fields = fields.clone();
    Ok(match source {
        ValidSource::Inline(inline) => Box::new(inline::InlineMembers::new(inline, fields)),
        ValidSource::ConfigMap(cm) => Box::new(config_map::ConfigMapMembers::open(cm, fields, ctx).await?),
        ValidSource::Http(http) => Box::new(http::HttpMembers::open(http, fields, ctx).await?),
        ValidSource::Postgres(pg) => Box::new(postgres::PostgresMembers::open(pg, fields, ctx).await?),
        ValidSource::Snowflake(sf) => Box::new(snowflake::SnowflakeMembers::open(sf, fields, ctx).await?),
        ValidSource::Databricks(dbx) => Box::new(databricks::DatabricksMembers::open(dbx, fields, ctx).await?),
        ValidSource::BigQuery(bq) => Box::new(bigquery::BigQueryMembers::open(bq, fields, ctx).await?),
    })
}

/// [`open_source`] for callers that hold an unvalidated spec (tests, tools, benchmarks):
/// picks the one source kind and parses the identifier mapping first. The controller
/// validates the whole spec instead and opens its [`ValidSpec`](crate::domain::validate::ValidSpec)'s parts.
pub async fn open_source_spec(
    spec: &SourceSpec,
    mapping: &IdentifierMapping,
    ctx: &impl SourceContext,
) -> Result<Box<dyn MemberSource>, SourceError> {
    let fields = IdentifierFields::from_mapping(mapping)
        .map_err(|e| SourceError::Config { what: "identifiers".to_owned(), message: e.to_string() })?;
    let source = ValidSource::of(spec).ok_or_else(|| SourceError::Config {
        what: "source".to_owned(),
        message: "set exactly one of inline, configMap, http, postgres, snowflake, databricks and bigquery".to_owned(),
    })?;
    open_source(&source, &fields, ctx).await
}

/// Collects resolved rows into batches.
#[derive(Debug, Default)]
pub(crate) struct BatchBuilder {
    batch: MemberBatch,
}

impl BatchBuilder {
    pub(crate) fn push(&mut self, row: Result<Member, SkipReason>) {
        match row {
            Ok(member) => self.batch.members.push(member),
            Err(reason) => self.batch.skipped.record(reason),
        }
    }

    pub(crate) fn skip(&mut self, reason: SkipReason) {
        self.batch.skipped.record(reason);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.batch.rows() == 0
    }

    /// Rows collected so far.
    pub(crate) fn rows(&self) -> u64 {
        self.batch.rows()
    }

    pub(crate) fn take(&mut self) -> MemberBatch {
        std::mem::take(&mut self.batch)
    }
}

/// Source secrets shorter than this are not redacted: they are user-chosen and may be tiny
/// (a Basic-auth username `me`), and replacing them would blank out ordinary words.
pub(crate) const REDACT_MIN_LEN: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_every_secret() {
        let redact = |text: &str, secrets: &[&str]| crate::secret::redact(text, secrets, REDACT_MIN_LEN);
        assert_eq!(redact("token abc123 and abc123", &["abc123"]), "token <redacted> and <redacted>");
        // Tiny values would blank out ordinary words; they are left alone.
        assert_eq!(redact("a b", &["a"]), "a b");
    }

    #[test]
    fn reasons_follow_the_object_kind() {
        let e = SourceError::ObjectNotFound { kind: ObjectKind::Secret, namespace: "ns".into(), name: "s".into() };
        assert_eq!(e.reason(), ReadyReason::SecretNotFound);
        assert_eq!(
            e.to_string(),
            "Secret ns/s not found: create it in the import's namespace or fix the name in the spec"
        );
    }

    #[tokio::test]
    async fn in_memory_objects_name_what_is_missing() {
        let objects = InMemoryObjects::new("ns").with_secret("s", "k", "hunter2");
        assert_eq!(objects.secret_value("s", "k").await.unwrap().expose(), "hunter2");
        let err = objects.secret_value("s", "other").await.unwrap_err();
        assert_eq!(err.to_string(), "Secret ns/s has no key \"other\": add it or fix the key in the spec");
        assert!(!format!("{objects:?}").contains("hunter2"));
    }
}
