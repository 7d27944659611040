//! One active schedule per Braze cohort, and which objects an import refers to. Pure.
//!
//! Two imports aimed at the same cohort — the same REST endpoint, partner and cohort id —
//! would undo each other's changes. The older one (by creation time, then namespace/name)
//! keeps running; the others are held in `Conflict` until it goes or is re-aimed.

use jiff::Timestamp;
use kube::ResourceExt;

use super::secrets::normalize_endpoint;
use crate::api::{CohortImport, CohortImportSpec};

/// Identifies one Braze cohort.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CohortKey {
    pub endpoint: String,
    pub partner: String,
    pub cohort_id: String,
}

impl CohortKey {
    pub fn of(spec: &CohortImportSpec) -> Self {
        let braze = &spec.destination.braze;
        CohortKey {
            endpoint: normalize_endpoint(&braze.rest_endpoint),
            // Braze's paths are case-insensitive in practice; compare as such.
            partner: braze.partner.to_ascii_lowercase(),
            cohort_id: spec.cohort.id.clone(),
        }
    }
}

impl std::fmt::Display for CohortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cohort {:?} at {} (partner {})", self.cohort_id, self.endpoint, self.partner)
    }
}

/// Creation time, namespace, name: the older wins.
fn seniority(import: &CohortImport) -> (Timestamp, String, String) {
    let created = import.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::MAX);
    (created, import.namespace().unwrap_or_default(), import.name_any())
}

/// The import that owns `me`'s cohort when it is not `me`: the most senior of all imports
/// (including those being deleted, which may still be removing members) with the same key.
pub fn winner<'a>(me: &CohortImport, all: impl IntoIterator<Item = &'a CohortImport>) -> Option<&'a CohortImport> {
    let key = CohortKey::of(&me.spec);
    let mine = seniority(me);
    // Namespace and name make seniorities unique, so `<` never picks `me` itself.
    all.into_iter()
        .filter(|other| seniority(other) < mine && CohortKey::of(&other.spec) == key)
        .min_by_key(|other| seniority(other))
}

/// The kind of object an import reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Referenced {
    Secret,
    ConfigMap,
}

/// Names of the Secrets and ConfigMaps (in its own namespace) an import reads.
pub fn references(spec: &CohortImportSpec) -> Vec<(Referenced, &str)> {
    let mut refs = vec![(Referenced::Secret, spec.destination.braze.data_import_key_secret_ref.name.as_str())];
    if let Some(r) = &spec.destination.braze.partner_api_key_secret_ref {
        refs.push((Referenced::Secret, r.name.as_str()));
    }
    if let Some(cm) = &spec.source.config_map {
        refs.push((Referenced::ConfigMap, cm.name.as_str()));
    }
    refs.extend(source_secrets(spec).into_iter().map(|s| (Referenced::Secret, s.name)));
    refs
}

/// One Secret key a source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceSecret<'a> {
    /// The spec field that names it, for messages.
    pub field: &'static str,
    pub name: &'a str,
    pub key: &'a str,
}

/// Every Secret key the import's source reads.
pub fn source_secrets(spec: &CohortImportSpec) -> Vec<SourceSecret<'_>> {
    let mut refs = Vec::new();
    let mut push = |field, name, key| refs.push(SourceSecret { field, name, key });
    if let Some(pg) = &spec.source.postgres {
        push("spec.source.postgres.connectionSecretRef", &pg.connection_secret_ref.name, &pg.connection_secret_ref.key);
    }
    if let Some(r) = spec.source.bigquery.as_ref().and_then(|bq| bq.service_account_key_secret_ref.as_ref()) {
        push("spec.source.bigquery.serviceAccountKeySecretRef", &r.name, &r.key);
    }
    if let Some(auth) = spec.source.http.as_ref().and_then(|h| h.auth.as_ref()) {
        if let Some(r) = &auth.bearer_token_secret_ref {
            push("spec.source.http.auth.bearerTokenSecretRef", &r.name, &r.key);
        }
        if let Some(b) = &auth.basic {
            for key in [&b.username_key, &b.password_key] {
                push("spec.source.http.auth.basic", &b.secret_name, key);
            }
        }
        if let Some(h) = &auth.header {
            push("spec.source.http.auth.header.valueSecretRef", &h.value_secret_ref.name, &h.value_secret_ref.key);
        }
    }
    if let Some(c) = spec.source.snowflake.as_ref().map(|s| &s.credentials) {
        for key in
            [Some(&c.account_key), Some(&c.user_key), Some(&c.private_key_key), c.private_key_passphrase_key.as_ref()]
                .into_iter()
                .flatten()
        {
            push("spec.source.snowflake.credentials", &c.secret_name, key);
        }
    }
    if let Some(auth) = spec.source.databricks.as_ref().map(|d| &d.auth) {
        if let Some(r) = &auth.token_secret_ref {
            push("spec.source.databricks.auth.tokenSecretRef", &r.name, &r.key);
        }
        if let Some(o) = &auth.oauth {
            for key in [&o.client_id_key, &o.client_secret_key] {
                push("spec.source.databricks.auth.oauth", &o.secret_name, key);
            }
        }
    }
    refs
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn import(ns: &str, name: &str, created: &str, endpoint: &str, cohort: &str) -> CohortImport {
        serde_json::from_value(json!({
            "apiVersion": "cohorts.dev/v1alpha1",
            "kind": "CohortImport",
            "metadata": { "name": name, "namespace": ns, "uid": format!("{ns}-{name}"), "creationTimestamp": created },
            "spec": {
                "cohort": { "id": cohort, "name": "Cohort" },
                "source": { "configMap": { "name": "members", "key": "ids" } },
                "identifiers": { "externalId": "id" },
                "destination": { "braze": {
                    "restEndpoint": endpoint,
                    "partner": "kubit",
                    "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
                } },
                "schedule": { "cadence": "Daily", "at": "06:30" }
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_oldest_import_of_a_cohort_wins() {
        let a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let b = import("growth", "b", "2026-01-02T00:00:00Z", "https://REST.iad-01.braze.com/", "vip");
        let c = import("other", "c", "2026-01-03T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let d = import("growth", "d", "2025-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "other-cohort");
        let all = [a.clone(), b.clone(), c.clone(), d.clone()];
        let name = |i: &CohortImport| winner(i, &all).map(|w| w.name_any());
        assert_eq!(name(&a), None);
        assert_eq!(name(&b), Some("a".into()));
        assert_eq!(name(&c), Some("a".into()));
        assert_eq!(name(&d), None);
    }

    #[test]
    fn same_creation_time_is_decided_by_namespace_and_name() {
        let a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let b = import("growth", "b", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let all = [b.clone(), a.clone()];
        assert!(winner(&a, &all).is_none());
        assert_eq!(winner(&b, &all).map(|w| w.name_any()), Some("a".into()));
    }

    #[test]
    fn another_endpoint_is_another_cohort() {
        let a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let b = import("growth", "b", "2026-01-02T00:00:00Z", "https://rest.fra-01.braze.eu", "vip");
        assert!(winner(&b, &[a, b.clone()]).is_none());
    }

    #[test]
    fn references_list_every_secret_and_config_map() {
        let a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        assert_eq!(references(&a.spec), vec![(Referenced::Secret, "braze"), (Referenced::ConfigMap, "members")]);
    }

    #[test]
    fn an_http_source_with_basic_auth_reads_two_keys_of_one_secret() {
        let mut a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        a.spec.source.config_map = None;
        a.spec.source.http = Some(
            serde_json::from_value(json!({
                "url": "https://export.example.com/members.csv",
                "format": "Csv",
                "auth": { "basic": { "secretName": "export", "usernameKey": "user", "passwordKey": "password" } }
            }))
            .unwrap(),
        );
        let field = "spec.source.http.auth.basic";
        assert_eq!(
            source_secrets(&a.spec),
            vec![
                SourceSecret { field, name: "export", key: "user" },
                SourceSecret { field, name: "export", key: "password" },
            ]
        );
        let secrets: Vec<_> = references(&a.spec).into_iter().map(|(_, name)| name).collect();
        assert_eq!(secrets, ["braze", "export", "export"]);
    }

    #[test]
    fn warehouse_sources_list_every_key_they_read() {
        let mut a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        a.spec.source.config_map = None;
        a.spec.source.snowflake = Some(
            serde_json::from_value(json!({
                "credentials": { "secretName": "sf", "privateKeyPassphraseKey": "pass" },
                "query": "SELECT 1"
            }))
            .unwrap(),
        );
        let keys: Vec<_> = source_secrets(&a.spec).into_iter().map(|s| (s.name, s.key)).collect();
        assert_eq!(keys, [("sf", "account"), ("sf", "user"), ("sf", "privateKey"), ("sf", "pass")]);
        a.spec.source.snowflake = None;
        a.spec.source.databricks = Some(
            serde_json::from_value(json!({
                "host": "https://dbc-1.cloud.databricks.com",
                "warehouseId": "abc",
                "auth": { "oauth": { "secretName": "sp" } },
                "query": "SELECT 1"
            }))
            .unwrap(),
        );
        let keys: Vec<_> = source_secrets(&a.spec).into_iter().map(|s| (s.field, s.name, s.key)).collect();
        let field = "spec.source.databricks.auth.oauth";
        assert_eq!(keys, [(field, "sp", "clientId"), (field, "sp", "clientSecret")]);
    }
}
