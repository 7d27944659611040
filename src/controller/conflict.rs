//! One active schedule per Braze cohort, and which objects an import refers to. Pure.
//!
//! Two imports aimed at the same cohort — the same REST endpoint, partner, cohort id and
//! Braze workspace — would undo each other's changes. Of the imports that *hold* the cohort
//! (see [`holds`]), the older one (by creation time, then namespace/name) keeps running; the
//! others are held in `Conflict` until it goes, is suspended or is re-aimed.
//!
//! The workspace is known by a one-way hash of the data import key ([`workspace_of`]),
//! which every run records in `status.brazeWorkspace`. Comparing those needs no Secret
//! reads of other imports (nor of other namespaces); the reconcile reads its own import's
//! key only when some other import holding the same cohort has a workspace to compare with.
//! An import whose workspace is not known yet (it has not run since this field was added,
//! or its key cannot be read) counts as the same workspace: when in doubt, hold.

use jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::api::{BrazeDestinationSpec, CohortImport, CohortImportSpec, DeliveryMethod};
use crate::braze::normalize_endpoint;
use crate::domain::validate::{Limits, validate_with};

/// Identifies one Braze cohort, but for the workspace (compared apart: it is in status).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CohortKey {
    pub endpoint: String,
    /// [`crate::api::BrazeDestinationSpec::route`]: the partner, or `users/track:<attribute>`.
    pub partner: String,
    /// The cohort id; empty for a Boolean attribute, which holds one cohort whatever its id.
    pub cohort_id: String,
}

impl CohortKey {
    /// The cohort of `spec`'s Braze workspace in force, inline or resolved: an import through a
    /// `destinationRef` has exactly the key of the same workspace written inline, so switching
    /// between the two keeps the snapshot and the cohort's owner. A reference not resolved has
    /// a key of its own, which no resolved import shares (a resolved endpoint is never empty).
    pub fn of(spec: &CohortImportSpec) -> Self {
        Self::with(spec.destination.braze(), spec)
    }

    /// The cohort `spec` imports into through `braze` (its workspace in force, `None`: a
    /// reference not resolved).
    pub fn with(braze: Option<&BrazeDestinationSpec>, spec: &CohortImportSpec) -> Self {
        let Some(braze) = braze else {
            let reference = spec.destination.destination_ref.as_ref();
            let named = reference.map(|r| format!("{}/{}", r.kind.as_str(), r.name)).unwrap_or_default();
            let partner = format!("unresolved:{named}");
            return CohortKey { endpoint: String::new(), partner, cohort_id: spec.cohort.id.clone() };
        };
        CohortKey {
            endpoint: normalize_endpoint(&braze.rest_endpoint),
            // Braze's paths are case-insensitive in practice; compare as such.
            partner: braze.route(),
            cohort_id: if braze.one_slot_per_route() { String::new() } else { spec.cohort.id.clone() },
        }
    }

    /// Whether `spec` imports into this cohort: [`CohortKey::of`] without building one for
    /// the partner path, since every reconcile compares its import with every other.
    pub fn is_of(&self, spec: &CohortImportSpec) -> bool {
        let Some(braze) = spec.destination.braze() else { return *self == Self::of(spec) };
        let Some(partner) = braze.partner.as_deref().filter(|_| braze.method == DeliveryMethod::CohortImport) else {
            return *self == Self::of(spec);
        };
        spec.cohort.id == self.cohort_id
            && partner.eq_ignore_ascii_case(&self.partner)
            && braze.rest_endpoint.trim().trim_end_matches('/').eq_ignore_ascii_case(&self.endpoint)
    }
}

impl std::fmt::Display for CohortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.partner.strip_prefix("users/track:") {
            Some(attribute) if self.cohort_id.is_empty() => {
                write!(f, "attribute {attribute:?} at {}", self.endpoint)
            }
            Some(attribute) => write!(f, "cohort {:?} in attribute {attribute:?} at {}", self.cohort_id, self.endpoint),
            None => write!(f, "cohort {:?} at {} (partner {})", self.cohort_id, self.endpoint, self.partner),
        }
    }
}

/// The workspace a data import key belongs to, as recorded in `status.brazeWorkspace`: the
/// first 64 bits of a SHA-256 of the key, in hex. A data import key is a long random token,
/// so the hash tells keys apart and cannot be turned back into the key.
pub fn workspace_of(data_import_key: &str) -> String {
    let digest =
        Sha256::new().chain_update(b"cohort-operator/braze-workspace/v1\0").chain_update(data_import_key).finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("w1-{hex}")
}

/// Creation time, namespace, name: the older wins.
fn seniority(import: &CohortImport) -> (Timestamp, String, String) {
    let created = import.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::MAX);
    (created, import.namespace().unwrap_or_default(), import.name_any())
}

/// Whether `import` holds its cohort against others: it may run (not suspended, its spec is
/// valid) and it has run (a run in progress or recorded). A suspended, invalid or new import
/// changes nothing in Braze, so it keeps nobody else from running.
pub fn holds(import: &CohortImport, limits: &Limits) -> bool {
    let status = import.status.as_ref();
    let has_run = status.is_some_and(|s| s.current_run.is_some() || s.last_run.is_some() || !s.history.is_empty());
    has_run && !import.spec.suspend && validate_with(&import.spec, limits).is_ok()
}

/// The imports that would own `me`'s cohort, if of `me`'s workspace, best first: every other
/// import (including those being deleted, which may still be removing members) aimed at the
/// same cohort that [`holds`] it — and, when `me` holds it too, is older.
pub fn contenders<'a>(
    me: &CohortImport,
    all: impl IntoIterator<Item = &'a CohortImport>,
    limits: &Limits,
) -> Vec<&'a CohortImport> {
    let key = CohortKey::of(&me.spec);
    let mine = seniority(me);
    let me_holds = holds(me, limits);
    // Namespace and name make seniorities unique, so `!=` never keeps `me` itself.
    let mut found: Vec<_> = all
        .into_iter()
        .filter(|other| key.is_of(&other.spec) && seniority(other) != mine)
        .filter(|other| (!me_holds || seniority(other) < mine) && holds(other, limits))
        .collect();
    found.sort_by_key(|other| seniority(other));
    found
}

/// Whether any contender's workspace is known: only then is `me`'s worth reading.
pub fn needs_workspace(contenders: &[&CohortImport]) -> bool {
    contenders.iter().any(|other| recorded_workspace(other).is_some())
}

fn recorded_workspace(import: &CohortImport) -> Option<&str> {
    import.status.as_ref().and_then(|s| s.braze_workspace.as_deref())
}

/// The import that owns `me`'s cohort when it is not `me`: the first of [`contenders`] in
/// `me`'s `workspace` (an unknown workspace, on either side, counts as the same), under the
/// default [`Limits`].
pub fn winner<'a>(
    me: &CohortImport,
    workspace: Option<&str>,
    all: impl IntoIterator<Item = &'a CohortImport>,
) -> Option<&'a CohortImport> {
    pick(contenders(me, all, &Limits::default()), workspace)
}

/// The first of `contenders` in `workspace`, as [`winner`].
pub fn pick<'a>(contenders: Vec<&'a CohortImport>, workspace: Option<&str>) -> Option<&'a CohortImport> {
    contenders.into_iter().find(|other| match (workspace, recorded_workspace(other)) {
        (Some(mine), Some(theirs)) => mine == theirs,
        _ => true,
    })
}

/// How a Conflict message names `winner` to the owner of `me`: by name in the same
/// namespace; otherwise not at all, so that no team learns of another's resources.
pub fn winner_label(me: &CohortImport, winner: &CohortImport) -> String {
    if winner.namespace() == me.namespace() {
        format!("{}/{}", winner.namespace().unwrap_or_default(), winner.name_any())
    } else {
        "an import in another namespace".to_owned()
    }
}

/// The kind of object an import reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Referenced {
    Secret,
    ConfigMap,
}

/// Names of the Secrets and ConfigMaps (in its own namespace) an import's spec names; a
/// shared destination's Secrets are the destination's (`super::destinations`).
pub fn references(spec: &CohortImportSpec) -> Vec<(Referenced, &str)> {
    let inline = spec.destination.braze.iter().flat_map(|braze| braze.secret_refs());
    let mut refs: Vec<(Referenced, &str)> = inline.map(|(_, r)| (Referenced::Secret, r.name.as_str())).collect();
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
            },
            "status": { "currentRun": { "id": "r1", "trigger": "Scheduled", "startedAt": created } }
        }))
        .unwrap()
    }

    /// `import` in `workspace`, by the hash its last run recorded.
    fn in_workspace(mut import: CohortImport, workspace: &str) -> CohortImport {
        import.status.get_or_insert_default().braze_workspace = Some(workspace_of(workspace));
        import
    }

    /// `import` by `method: Attribute` into attribute `name` of `shape`.
    fn by_attribute(mut import: CohortImport, name: &str, shape: crate::api::AttributeShape) -> CohortImport {
        let braze = import.spec.destination.braze.as_mut().unwrap();
        braze.method = DeliveryMethod::Attribute;
        braze.partner = None;
        braze.data_import_key_secret_ref = None;
        braze.api_key_secret_ref = Some(crate::api::SecretKeyRef { name: "rest".into(), key: "key".into() });
        braze.attribute = Some(crate::api::MembershipAttributeSpec { name: name.into(), shape });
        import
    }

    #[test]
    fn attribute_imports_own_a_cohort_id_in_an_array_and_a_whole_boolean_attribute() {
        use crate::api::AttributeShape::{Array, Boolean};
        let at = |cohort, name, shape| {
            by_attribute(
                import("ns", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", cohort),
                name,
                shape,
            )
        };
        let key = |i: &CohortImport| CohortKey::of(&i.spec);
        let partner = import("ns", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        assert_ne!(key(&at("vip", "cohorts", Array)), key(&partner), "methods never share a key");
        assert_ne!(key(&at("vip", "cohorts", Array)), key(&at("gold", "cohorts", Array)));
        assert_eq!(
            key(&at("vip", "in_vip", Boolean)),
            key(&at("gold", "in_vip", Boolean)),
            "one attribute, one cohort"
        );
        assert_eq!(
            key(&at("vip", "cohorts", Array)).to_string(),
            r#"cohort "vip" in attribute "cohorts" at https://rest.iad-01.braze.com"#
        );
        let all = [at("vip", "cohorts", Array), at("gold", "in_vip", Boolean), at("vip", "in_vip", Boolean), partner];
        for a in &all {
            for b in &all {
                assert_eq!(key(a).is_of(&b.spec), key(a) == key(b));
            }
        }
    }

    #[test]
    fn a_cohort_key_tells_its_imports_as_comparing_built_keys_does() {
        let endpoints =
            ["https://rest.iad-01.braze.com", " https://REST.iad-01.braze.com/ ", "https://rest.iad-02.braze.com"];
        let specs: Vec<CohortImport> = endpoints
            .iter()
            .flat_map(|e| ["vip", "VIP"].map(|c| import("ns", "a", "2026-01-01T00:00:00Z", e, c)))
            .chain(std::iter::once({
                let mut other = import("ns", "a", "2026-01-01T00:00:00Z", endpoints[0], "vip");
                other.spec.destination.braze.as_mut().unwrap().partner = Some("KUBIT".into());
                other
            }))
            .collect();
        for a in &specs {
            let key = CohortKey::of(&a.spec);
            for b in &specs {
                assert_eq!(key.is_of(&b.spec), key == CohortKey::of(&b.spec), "{key} / {}", CohortKey::of(&b.spec));
            }
        }
    }

    #[test]
    fn the_oldest_import_of_a_cohort_wins() {
        let a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let b = import("growth", "b", "2026-01-02T00:00:00Z", "https://REST.iad-01.braze.com/", "vip");
        let c = import("other", "c", "2026-01-03T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let d = import("growth", "d", "2025-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "other-cohort");
        let all = [a.clone(), b.clone(), c.clone(), d.clone()];
        let name = |i: &CohortImport| winner(i, None, &all).map(|w| w.name_any());
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
        assert!(winner(&a, None, &all).is_none());
        assert_eq!(winner(&b, None, &all).map(|w| w.name_any()), Some("a".into()));
    }

    #[test]
    fn another_endpoint_is_another_cohort() {
        let a = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let b = import("growth", "b", "2026-01-02T00:00:00Z", "https://rest.fra-01.braze.eu", "vip");
        assert!(winner(&b, None, &[a, b.clone()]).is_none());
    }

    #[test]
    fn another_workspace_is_another_cohort() {
        let a = import("team-a", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let a = in_workspace(a, "k1");
        let b = import("team-b", "b", "2026-01-02T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let all = [a.clone(), b.clone()];
        assert!(winner(&b, Some(&workspace_of("k2")), &all).is_none(), "another workspace");
        assert_eq!(winner(&b, Some(&workspace_of("k1")), &all).map(|w| w.name_any()), Some("a".into()));
        // Not known on one side: when in doubt, hold.
        assert!(winner(&b, None, &all).is_some());
        let unknown = import("team-a", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        assert!(winner(&b, Some(&workspace_of("k2")), &[unknown.clone(), b.clone()]).is_some());
        // The key is read only when there is a workspace to compare with.
        assert!(needs_workspace(&contenders(&b, &all, &Limits::default())));
        assert!(!needs_workspace(&contenders(&b, &[unknown, b.clone()], &Limits::default())));
    }

    #[test]
    fn the_workspace_hash_is_stable_one_way_and_short() {
        let key = "a3f1c2d4-5b6e-4f70-8a9b-0c1d2e3f4a5b";
        let hash = workspace_of(key);
        assert_eq!(hash, workspace_of(key));
        assert_ne!(hash, workspace_of("a3f1c2d4-5b6e-4f70-8a9b-0c1d2e3f4a5c"));
        assert_eq!(hash.len(), "w1-".len() + 16);
        assert!(!hash.contains(key) && !hash.contains("a3f1c2d4"), "{hash}");
    }

    #[test]
    fn suspended_invalid_and_new_imports_hold_nothing() {
        let older = |name| import("team-a", name, "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let me = import("team-b", "b", "2026-01-02T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let mut suspended = older("suspended");
        suspended.spec.suspend = true;
        let mut invalid = older("invalid");
        invalid.spec.schedule.day_of_week = Some(crate::api::DayOfWeek::Monday);
        let mut new = older("new");
        new.status = None;
        for other in [suspended, invalid, new] {
            assert!(!holds(&other, &Limits::default()), "{}", other.name_any());
            assert!(winner(&me, None, &[other.clone(), me.clone()]).is_none(), "{}", other.name_any());
        }
    }

    #[test]
    fn an_import_that_has_not_run_yields_to_a_younger_one_that_has() {
        let mut old_new = import("growth", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        old_new.status = None;
        let young = import("growth", "b", "2026-01-02T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let all = [old_new.clone(), young.clone()];
        assert_eq!(winner(&old_new, None, &all).map(|w| w.name_any()), Some("b".into()));
        assert!(winner(&young, None, &all).is_none());
    }

    #[test]
    fn a_conflict_names_only_an_import_of_the_same_namespace() {
        let a = import("team-a", "a", "2026-01-01T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let b = import("team-a", "b", "2026-01-02T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        let c = import("team-c", "c", "2026-01-03T00:00:00Z", "https://rest.iad-01.braze.com", "vip");
        assert_eq!(winner_label(&b, &a), "team-a/a");
        let label = winner_label(&c, &a);
        assert_eq!(label, "an import in another namespace");
        assert!(!label.contains("team-a"));
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
