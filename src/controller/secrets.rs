//! The two Braze keys a run needs.
//!
//! - The customer's **data import key** comes from a Secret in the import's own namespace
//!   (`spec.destination.braze.dataImportKeySecretRef`). A `SecretKeyRef` has no namespace
//!   field, so a reference into another namespace cannot even be written. Through a
//!   `destinationRef` it comes from the destination's Secret: in the namespace of the
//!   `BrazeDestination` (which is the import's), or of a `ClusterBrazeDestination` — the
//!   operator's destination Secret namespace, no other ([`crate::api::ClusterBrazeDestinationSpec::workspace`]).
//! - The **partner API key** is the operator's: Braze issues one per region (US, EU, …).
//!   It comes from the operator's configuration — a directory with one file per region
//!   (`us`, `eu`, `au`; a mounted Secret), read at every run so a rotated key is picked up —
//!   unless the import overrides it with
//!   `partnerApiKeySecretRef` (again in its own namespace).
//!
//! The region of an endpoint is looked up in Braze's list of REST endpoints (by cluster,
//! never guessed from the URL text), extended by the operator's `--braze-endpoint-region`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::api::{BrazeDestinationSpec, DeliveryMethod, Destination, DestinationKind, ReadyReason, SecretKeyRef};
use crate::braze::normalize_endpoint;
use crate::secret::SecretString;
use crate::source::kube::KubeObjects;
use crate::source::{SourceContext, SourceError};

/// Braze's REST endpoints and the region whose partner key serves them.
const KNOWN_ENDPOINTS: &[(&str, &str)] = &[
    ("rest.iad-01.braze.com", "us"),
    ("rest.iad-02.braze.com", "us"),
    ("rest.iad-03.braze.com", "us"),
    ("rest.iad-04.braze.com", "us"),
    ("rest.iad-05.braze.com", "us"),
    ("rest.iad-06.braze.com", "us"),
    ("rest.iad-07.braze.com", "us"),
    ("rest.iad-08.braze.com", "us"),
    ("rest.fra-01.braze.eu", "eu"),
    ("rest.fra-02.braze.eu", "eu"),
    ("rest.au-01.braze.com", "au"),
];

/// Why a key could not be had. Messages name the object and the fix, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("Secret {namespace}/{name} not found: create it or fix {field}")]
    SecretNotFound { namespace: String, name: String, field: &'static str },
    #[error("Secret {namespace}/{name} has no key {key:?}: add it or fix {field}")]
    KeyNotFound { namespace: String, name: String, key: String, field: &'static str },
    #[error("Secret {namespace}/{name} key {key:?} is empty or not UTF-8 text")]
    NotText { namespace: String, name: String, key: String },
    #[error("{field} is not set; set it (the spec is checked before a run, so this is a spec changed meanwhile)")]
    NoReference { field: &'static str },
    #[error("cannot read Secret {namespace}/{name}: {message}")]
    Read { namespace: String, name: String, message: String },
    #[error(
        "no partner API key for Braze endpoint {endpoint}: it is not a known Braze REST endpoint; \
         map it to a region with the operator's --braze-endpoint-region, or set \
         spec.destination.braze.partnerApiKeySecretRef"
    )]
    UnknownEndpoint { endpoint: String },
    #[error(
        "no partner API key for Braze region {region} (endpoint {endpoint}): the operator's \
         configuration has no file {path}; add it, or set spec.destination.braze.partnerApiKeySecretRef"
    )]
    PartnerKeyMissing { region: String, endpoint: String, path: String },
}

impl KeyError {
    /// The `Ready` reason: everything but a failed API read is a missing secret.
    pub fn reason(&self) -> ReadyReason {
        match self {
            KeyError::Read { .. } => ReadyReason::SecretReadFailed,
            _ => ReadyReason::SecretNotFound,
        }
    }
}

/// The operator's partner API keys, one file per region.
#[derive(Clone, Debug, Default)]
pub struct PartnerKeys {
    /// Files named after regions (`us`, `eu`, …); `None`: every import must override.
    pub dir: Option<PathBuf>,
    /// Endpoints beyond Braze's list (normalised with [`normalize_endpoint`]) → region.
    pub extra_endpoints: BTreeMap<String, String>,
}

impl PartnerKeys {
    /// The region whose partner key serves `endpoint`.
    pub fn region_of(&self, endpoint: &str) -> Option<String> {
        let normalized = normalize_endpoint(endpoint);
        if let Some(region) = self.extra_endpoints.get(&normalized) {
            return Some(region.clone());
        }
        let host = normalized.strip_prefix("https://")?;
        KNOWN_ENDPOINTS.iter().find(|(known, _)| *known == host).map(|(_, region)| (*region).to_owned())
    }

    /// Reads the partner key for `endpoint` from the configuration directory.
    pub async fn key_for(&self, endpoint: &str) -> Result<SecretString, KeyError> {
        let region =
            self.region_of(endpoint).ok_or_else(|| KeyError::UnknownEndpoint { endpoint: endpoint.to_owned() })?;
        let missing = |path: &Path| KeyError::PartnerKeyMissing {
            region: region.clone(),
            endpoint: endpoint.to_owned(),
            path: path.display().to_string(),
        };
        let Some(dir) = &self.dir else {
            return Err(missing(Path::new("<--partner-keys-dir not set>")));
        };
        let path = dir.join(&region);
        let text = tokio::fs::read_to_string(&path).await.map_err(|_| missing(&path))?;
        let key = text.trim();
        if key.is_empty() {
            return Err(missing(&path));
        }
        Ok(SecretString::new(key.to_owned()))
    }
}

/// Parses `URL=REGION` (regions are lower case, like the key files).
pub fn parse_endpoint_region(text: &str) -> Result<(String, String), String> {
    let (url, region) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("{text:?}: expected ENDPOINT=REGION, e.g. https://rest.iad-09.braze.com=us"))?;
    if url.is_empty() || region.is_empty() || region.contains('/') {
        return Err(format!("{text:?}: expected ENDPOINT=REGION"));
    }
    Ok((normalize_endpoint(url), region.to_ascii_lowercase()))
}

/// Reads one key of a Secret in the import's namespace, through the one Secret reader the
/// sources use too ([`KubeObjects`]), so a check and a run read a value the same way.
/// `field` names the spec field for messages.
pub async fn secret_value(
    objects: &KubeObjects,
    reference: &SecretKeyRef,
    field: &'static str,
) -> Result<SecretString, KeyError> {
    Ok(secret_value_at(objects, reference, field).await?.0)
}

/// [`secret_value`] and the Secret's `resourceVersion` as read.
async fn secret_value_at(
    objects: &KubeObjects,
    reference: &SecretKeyRef,
    field: &'static str,
) -> Result<(SecretString, Option<String>), KeyError> {
    let namespace = objects.namespace().to_owned();
    let name = reference.name.clone();
    objects.secret_value_at(&reference.name, &reference.key).await.map_err(|e| match e {
        SourceError::ObjectNotFound { .. } => KeyError::SecretNotFound { namespace, name, field },
        SourceError::KeyNotFound { key, .. } => KeyError::KeyNotFound { namespace, name, key, field },
        SourceError::KeyNotText { key, .. } => KeyError::NotText { namespace, name, key },
        SourceError::ObjectRead { message, .. } => KeyError::Read { namespace, name, message },
        other => KeyError::Read { namespace, name, message: other.to_string() },
    })
}

/// A Braze key — [`secret_value`] without surrounding white space (a Braze key has none),
/// and not empty — and its Secret's `resourceVersion` as read.
async fn braze_key_at(
    objects: &KubeObjects,
    reference: &SecretKeyRef,
    field: &'static str,
) -> Result<(SecretString, Option<String>), KeyError> {
    let (value, version) = secret_value_at(objects, reference, field).await?;
    let key = value.expose().trim();
    if key.is_empty() {
        let (namespace, name) = (objects.namespace().to_owned(), reference.name.clone());
        return Err(KeyError::NotText { namespace, name, key: reference.key.clone() });
    }
    Ok((SecretString::new(key.to_owned()), version))
}

/// One Secret key an import reads, as the check before a run looks at it.
pub struct CheckedKey {
    pub reference: SecretKeyRef,
    pub field: &'static str,
    /// A Braze key ([`braze_key_at`]: not blank), or a source's value ([`secret_value`]).
    pub braze: bool,
}

/// Reads `key` as a run will read it and notes it in `checks` as found at its Secret's
/// `resourceVersion` — a Braze key with its value, for the run ([`braze_keys`]); a source's
/// value is dropped.
pub async fn check_key(objects: &KubeObjects, key: &CheckedKey, checks: &SecretChecks) -> Result<(), KeyError> {
    let namespace = objects.namespace();
    if key.braze {
        let (value, version) = braze_key_at(objects, &key.reference, key.field).await?;
        checks.found_value(namespace, &key.reference, version, value);
    } else {
        let (_, version) = secret_value_at(objects, &key.reference, key.field).await?;
        checks.found(namespace, &key.reference, version);
    }
    Ok(())
}

/// A Braze key from `checks` while the Secret watch sees its Secret as it was read
/// ([`SecretChecks::value`]), else read ([`braze_key_at`]) and kept there.
async fn cached_braze_key(
    objects: &KubeObjects,
    checks: &SecretChecks,
    reference: &SecretKeyRef,
    field: &'static str,
) -> Result<SecretString, KeyError> {
    let namespace = objects.namespace();
    if let Some(value) = checks.value(namespace, reference) {
        return Ok(value);
    }
    let (value, version) = braze_key_at(objects, reference, field).await?;
    checks.found_value(namespace, reference, version, value.clone());
    Ok(value)
}

/// Secret keys found present, and at which `resourceVersion` of their Secret, so that a
/// reconcile reads a Secret again only once the Secret watch saw it change: many imports
/// share one Secret, and an import is reconciled after each run. Trusted for at most
/// [`SecretChecks::TRUST`], since a watch that restarts does not report what was deleted
/// while it was down. Without the watch (`--watch-secrets=false`) nothing is trusted.
///
/// The Braze keys' values are kept with them (the watch itself sees only metadata), so
/// that a run reads its key from here under the same rule: a key rotated in its Secret is
/// read afresh by the first run after the watch saw the change. Source Secrets' values
/// are never kept.
#[derive(Default)]
pub struct SecretChecks {
    /// (namespace, Secret) → its `resourceVersion` as the watch last saw it.
    seen: Mutex<HashMap<(String, String), String>>,
    /// (namespace, Secret, key) → the `resourceVersion` the key was found at, and when.
    found: Mutex<HashMap<(String, String, String), Found>>,
}

/// When and in which version of its Secret a key was found present; a Braze key's value.
struct Found {
    version: String,
    at: Instant,
    value: Option<SecretString>,
}

impl SecretChecks {
    /// How long a key found present is trusted without reading it again.
    pub const TRUST: Duration = Duration::from_secs(300);

    /// The Secret watch saw `namespace`/`name` at `version` (changed, created or deleted).
    pub fn saw(&self, namespace: &str, name: &str, version: Option<&str>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match version {
            Some(v) => seen.insert((namespace.to_owned(), name.to_owned()), v.to_owned()),
            None => seen.remove(&(namespace.to_owned(), name.to_owned())),
        };
    }

    /// Whether `reference` was found present in the Secret as the watch last saw it.
    pub fn is_present(&self, namespace: &str, reference: &SecretKeyRef) -> bool {
        self.trusted(namespace, reference, |_| ()).is_some()
    }

    /// The Braze key `reference` as read from the Secret the watch last saw, if it was.
    pub fn value(&self, namespace: &str, reference: &SecretKeyRef) -> Option<SecretString> {
        self.trusted(namespace, reference, |f| f.value.clone()).flatten()
    }

    /// `what` of the key `reference` found in the Secret as the watch last saw it, within
    /// [`Self::TRUST`].
    fn trusted<T>(&self, namespace: &str, reference: &SecretKeyRef, what: impl Fn(&Found) -> T) -> Option<T> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let current = seen.get(&(namespace.to_owned(), reference.name.clone()))?;
        let found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_owned(), reference.name.clone(), reference.key.clone());
        found.get(&key).filter(|f| f.version == *current && f.at.elapsed() < Self::TRUST).map(what)
    }

    /// `reference` was read and is present, in its Secret at `version`.
    pub fn found(&self, namespace: &str, reference: &SecretKeyRef, version: Option<String>) {
        self.note(namespace, reference, version, None);
    }

    /// The Braze key `reference` was read, `value`, in its Secret at `version`.
    pub fn found_value(&self, namespace: &str, reference: &SecretKeyRef, version: Option<String>, value: SecretString) {
        self.note(namespace, reference, version, Some(value));
    }

    fn note(&self, namespace: &str, reference: &SecretKeyRef, version: Option<String>, value: Option<SecretString>) {
        let key = (namespace.to_owned(), reference.name.clone(), reference.key.clone());
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        match version {
            Some(version) => found.insert(key, Found { version, at: Instant::now(), value }),
            None => found.remove(&key),
        };
    }
}

/// The keys of one import's method.
#[derive(Clone, Debug)]
pub enum BrazeKeys {
    /// `method: CohortImport`.
    Partner { data_import_key: SecretString, partner_api_key: SecretString },
    /// `method: Attribute`: the customer's REST API key.
    RestApi { api_key: SecretString },
}

impl BrazeKeys {
    /// The key that names the customer's workspace: the data import key, or the REST API
    /// key (both are made per workspace).
    pub fn workspace_key(&self) -> &SecretString {
        match self {
            BrazeKeys::Partner { data_import_key, .. } => data_import_key,
            BrazeKeys::RestApi { api_key } => api_key,
        }
    }

    /// Every key's value, for redacting text the operator does not control (a panic's).
    pub fn exposed(&self) -> Vec<&str> {
        match self {
            BrazeKeys::Partner { data_import_key, partner_api_key } => {
                vec![data_import_key.expose(), partner_api_key.expose()]
            }
            BrazeKeys::RestApi { api_key } => vec![api_key.expose()],
        }
    }
}

pub const DATA_IMPORT_KEY_FIELD: &str = "spec.destination.braze.dataImportKeySecretRef";
pub const PARTNER_KEY_FIELD: &str = "spec.destination.braze.partnerApiKeySecretRef";
pub const REST_API_KEY_FIELD: &str = "spec.destination.braze.apiKeySecretRef";

/// How messages name the three key fields of a workspace, by where it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyFields {
    pub data_import_key: &'static str,
    pub partner_key: &'static str,
    pub rest_api_key: &'static str,
}

impl KeyFields {
    /// The fields of an import's `spec.destination.braze` (`None`) or of a shared destination.
    pub const fn of(kind: Option<DestinationKind>) -> Self {
        match kind {
            None => KeyFields {
                data_import_key: DATA_IMPORT_KEY_FIELD,
                partner_key: PARTNER_KEY_FIELD,
                rest_api_key: REST_API_KEY_FIELD,
            },
            Some(DestinationKind::BrazeDestination) => KeyFields {
                data_import_key: "the BrazeDestination's spec.dataImportKeySecretRef",
                partner_key: "the BrazeDestination's spec.partnerApiKeySecretRef",
                rest_api_key: "the BrazeDestination's spec.apiKeySecretRef",
            },
            Some(DestinationKind::ClusterBrazeDestination) => KeyFields {
                data_import_key: "the ClusterBrazeDestination's spec.dataImportKeySecretRef",
                partner_key: "the ClusterBrazeDestination's spec.partnerApiKeySecretRef",
                rest_api_key: "the ClusterBrazeDestination's spec.apiKeySecretRef",
            },
        }
    }
}

/// The Braze workspace an import's (resolved) destination names, where its Secrets are and
/// how messages name its fields.
#[derive(Clone, Copy, Debug)]
pub struct Workspace<'a> {
    pub braze: &'a BrazeDestinationSpec,
    pub secret_namespace: &'a str,
    pub fields: KeyFields,
}

impl<'a> Workspace<'a> {
    /// The workspace of `destination` for an import in `import_namespace`; an error for a
    /// `destinationRef` not resolved (the reconcile resolves it before anything runs).
    pub fn of(destination: &'a Destination, import_namespace: &'a str) -> Result<Self, KeyError> {
        let braze = destination.braze().ok_or(KeyError::NoReference { field: "spec.destination" })?;
        let secret_namespace = destination.secret_namespace(import_namespace);
        Ok(Workspace { braze, secret_namespace, fields: KeyFields::of(destination.resolved_kind()) })
    }

    /// An inline workspace (`spec.destination.braze`) of an import in `namespace`.
    pub fn inline(braze: &'a BrazeDestinationSpec, namespace: &'a str) -> Self {
        Workspace { braze, secret_namespace: namespace, fields: KeyFields::of(None) }
    }

    /// The reference to the key naming the workspace, with its field: `None` when the spec
    /// lacks it (validation says so).
    pub fn workspace_key_ref(&self) -> Option<(&'a SecretKeyRef, &'static str)> {
        match self.braze.method {
            DeliveryMethod::CohortImport => {
                self.braze.data_import_key_secret_ref.as_ref().map(|r| (r, self.fields.data_import_key))
            }
            DeliveryMethod::Attribute => self.braze.api_key_secret_ref.as_ref().map(|r| (r, self.fields.rest_api_key)),
        }
    }

    /// The Braze keys the method reads, each with its field, the workspace's key first.
    pub fn key_refs(&self) -> Vec<(&'a SecretKeyRef, &'static str)> {
        let mut keys: Vec<_> = self.workspace_key_ref().into_iter().collect();
        if self.braze.method == DeliveryMethod::CohortImport
            && let Some(reference) = &self.braze.partner_api_key_secret_ref
        {
            keys.push((reference, self.fields.partner_key));
        }
        keys
    }
}

fn missing_ref(field: &'static str) -> KeyError {
    KeyError::NoReference { field }
}

/// Reads the keys an import's run needs, from the Secrets of its workspace — or from
/// `checks`, while the Secret watch sees their Secrets as they were read there.
pub async fn braze_keys(
    client: &kube::Client,
    checks: &SecretChecks,
    workspace: Workspace<'_>,
    partner_keys: &PartnerKeys,
) -> Result<BrazeKeys, KeyError> {
    let objects = KubeObjects::new(client.clone(), workspace.secret_namespace);
    let (braze, fields) = (workspace.braze, workspace.fields);
    if braze.method == DeliveryMethod::Attribute {
        let reference = braze.api_key_secret_ref.as_ref().ok_or_else(|| missing_ref(fields.rest_api_key))?;
        let api_key = cached_braze_key(&objects, checks, reference, fields.rest_api_key).await?;
        return Ok(BrazeKeys::RestApi { api_key });
    }
    let reference = braze.data_import_key_secret_ref.as_ref().ok_or_else(|| missing_ref(fields.data_import_key))?;
    let data_import_key = cached_braze_key(&objects, checks, reference, fields.data_import_key).await?;
    let partner_api_key = match &braze.partner_api_key_secret_ref {
        Some(reference) => cached_braze_key(&objects, checks, reference, fields.partner_key).await?,
        None => partner_keys.key_for(&braze.rest_endpoint).await?,
    };
    Ok(BrazeKeys::Partner { data_import_key, partner_api_key })
}

/// The Braze workspace of an import's key ([`super::conflict::workspace_of`]), the key read
/// as [`braze_keys`] reads it.
pub async fn data_import_workspace(
    client: &kube::Client,
    checks: &SecretChecks,
    workspace: Workspace<'_>,
) -> Result<String, KeyError> {
    let objects = KubeObjects::new(client.clone(), workspace.secret_namespace);
    let (reference, field) =
        workspace.workspace_key_ref().ok_or_else(|| missing_ref(workspace.fields.data_import_key))?;
    let key = cached_braze_key(&objects, checks, reference, field).await?;
    Ok(super::conflict::workspace_of(key.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_found_present_is_trusted_only_while_the_watch_sees_its_secret_unchanged() {
        let checks = SecretChecks::default();
        let key = SecretKeyRef { name: "braze".into(), key: "data-import-key".into() };
        checks.found("ns", &key, Some("7".into()));
        assert!(!checks.is_present("ns", &key), "the watch has not seen the Secret yet");
        checks.saw("ns", "braze", Some("7"));
        assert!(checks.is_present("ns", &key));
        assert!(!checks.is_present("other", &key), "per namespace");
        let other_key = SecretKeyRef { key: "other".into(), ..key.clone() };
        assert!(!checks.is_present("ns", &other_key), "per key");
        checks.saw("ns", "braze", Some("8"));
        assert!(!checks.is_present("ns", &key), "changed (or deleted) since it was read");
        checks.found("ns", &key, Some("8".into()));
        assert!(checks.is_present("ns", &key));
        checks.found("ns", &key, None);
        assert!(!checks.is_present("ns", &key), "read without a resourceVersion: not trusted");
    }

    #[test]
    fn a_braze_key_is_served_from_the_checks_only_at_the_version_the_watch_sees() {
        let checks = SecretChecks::default();
        let key = SecretKeyRef { name: "braze".into(), key: "data-import-key".into() };
        checks.found_value("ns", &key, Some("7".into()), SecretString::new("k1"));
        assert_eq!(checks.value("ns", &key), None, "the watch has not seen the Secret yet");
        checks.saw("ns", "braze", Some("7"));
        assert_eq!(checks.value("ns", &key).map(|v| v.expose().to_owned()).as_deref(), Some("k1"));
        assert!(checks.is_present("ns", &key));
        checks.saw("ns", "braze", Some("8"));
        assert_eq!(checks.value("ns", &key), None, "rotated: read afresh");
        checks.found("ns", &key, Some("8".into()));
        assert!(checks.is_present("ns", &key));
        assert_eq!(checks.value("ns", &key), None, "found present by a check that kept no value");
        checks.saw("ns", "braze", None);
        assert_eq!(checks.value("ns", &key), None, "deleted");
    }

    #[test]
    fn regions_come_from_braze_clusters_and_configuration() {
        let mut keys = PartnerKeys::default();
        assert_eq!(keys.region_of("https://rest.iad-03.braze.com").as_deref(), Some("us"));
        assert_eq!(keys.region_of("https://REST.fra-02.braze.eu/").as_deref(), Some("eu"));
        assert_eq!(keys.region_of("https://rest.iad-99.braze.com"), None);
        assert_eq!(keys.region_of("http://rest.iad-01.braze.com"), None, "http is not Braze");
        let (url, region) = parse_endpoint_region("http://127.0.0.1:8080/=US").unwrap();
        keys.extra_endpoints.insert(url, region);
        assert_eq!(keys.region_of("http://127.0.0.1:8080").as_deref(), Some("us"));
        assert!(parse_endpoint_region("no-equals").is_err());
    }

    #[tokio::test]
    async fn partner_keys_are_read_per_region_and_errors_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("us"), "us-partner-key\n").unwrap();
        let keys = PartnerKeys { dir: Some(dir.path().to_owned()), extra_endpoints: BTreeMap::new() };
        let key = keys.key_for("https://rest.iad-01.braze.com").await.unwrap();
        assert_eq!(key.expose(), "us-partner-key");

        let err = keys.key_for("https://rest.fra-01.braze.eu").await.unwrap_err();
        assert!(matches!(err, KeyError::PartnerKeyMissing { ref region, .. } if region == "eu"));
        assert!(err.to_string().contains("partnerApiKeySecretRef"), "{err}");
        assert_eq!(err.reason(), ReadyReason::SecretNotFound);

        let err = keys.key_for("https://braze.example.com").await.unwrap_err();
        assert!(err.to_string().contains("--braze-endpoint-region"), "{err}");

        // A rotated key is read at the next use.
        std::fs::write(dir.path().join("us"), "rotated").unwrap();
        assert_eq!(keys.key_for("https://rest.iad-01.braze.com").await.unwrap().expose(), "rotated");
    }
}
