//! Shared destinations: resolving an import's `spec.destination.destinationRef`.
//!
//! cert-manager's `issuerRef`: a `BrazeDestination` is looked for in the import's own
//! namespace only (a reference has no namespace field, so a destination in another namespace
//! cannot even be named), a `ClusterBrazeDestination` anywhere, but it serves only the
//! namespaces its `namespaceSelector` selects. A resolved import carries its workspace in
//! `spec.destination.resolved` for one reconcile ([`Catalog::effective`]); everything after
//! (validation, cohort keys, Secret reads, runs) sees exactly what the same workspace written
//! inline gives, so switching between the two keeps the cohort's snapshot and owner.
//!
//! Resolution is pure ([`resolve`]); the [`Catalog`] feeds it from watches of the
//! destinations and of Namespace labels (metadata only), so every reconcile — and every
//! lookup of another import's cohort — resolves from memory, never from the API server.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};

use super::conflict::CohortKey;
use crate::api::{
    BrazeDestination, BrazeDestinationSpec, ClusterBrazeDestination, CohortImport, DestinationKind, DestinationRef,
    ReadyReason, ResolvedDestination, SecretNamespaceNotAllowed,
};

/// Why an import may not use the destination it names. Messages name the destination and
/// the rule, never a Secret's value, and nothing of another namespace's resources.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "spec.destination.destinationRef names BrazeDestination {name:?}, which does not exist in namespace \
         {namespace}: create it there (a BrazeDestination serves only the imports of its own namespace), or \
         reference a ClusterBrazeDestination"
    )]
    NamespacedNotFound { name: String, namespace: String },
    #[error(
        "spec.destination.destinationRef names ClusterBrazeDestination {name:?}, which does not exist: ask a \
         cluster administrator for it, or fix the name"
    )]
    ClusterNotFound { name: String },
    #[error(
        "spec.destination.destinationRef names ClusterBrazeDestination {name:?}, but this operator serves no \
         ClusterBrazeDestination (it runs without --destination-secret-namespace; chart: \
         clusterDestinations.enabled): use a BrazeDestination of this namespace or destination.braze, or ask \
         the operator's administrators to turn them on"
    )]
    ClusterDestinationsOff { name: String },
    #[error(
        "ClusterBrazeDestination {name:?} does not allow namespace {namespace}: its spec.namespaceSelector \
         ({selector}) does not select this namespace's labels; nothing is sent. Label the namespace as the \
         selector asks (a cluster administrator's decision), or use another destination"
    )]
    NamespaceNotSelected { name: String, namespace: String, selector: String },
    #[error(
        "ClusterBrazeDestination {name:?} has an invalid spec.namespaceSelector ({message}): it allows no namespace"
    )]
    InvalidSelector { name: String, message: String },
    #[error("ClusterBrazeDestination {name:?} cannot be used: {cause}")]
    SecretNamespace { name: String, cause: SecretNamespaceNotAllowed },
}

impl Refusal {
    /// The import's `Ready` reason.
    pub fn reason(&self) -> ReadyReason {
        match self {
            Refusal::NamespacedNotFound { .. } | Refusal::ClusterNotFound { .. } => ReadyReason::DestinationNotFound,
            Refusal::ClusterDestinationsOff { .. }
            | Refusal::NamespaceNotSelected { .. }
            | Refusal::InvalidSelector { .. }
            | Refusal::SecretNamespace { .. } => ReadyReason::DestinationNotAllowed,
        }
    }
}

/// What [`resolve`] looks at: the destination the reference names, if it exists, and the
/// labels of the import's namespace.
pub struct Found<'a> {
    pub namespaced: Option<&'a BrazeDestination>,
    pub cluster: Option<&'a ClusterBrazeDestination>,
    /// The import's Namespace's labels (`None`: the Namespace is not known).
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// The operator's destination Secret namespace (`--destination-secret-namespace`);
    /// `None`: no ClusterBrazeDestination may name a Secret.
    pub secret_namespace: Option<&'a str>,
}

/// The workspace `reference` names for an import in `namespace`, or why it may not use it.
pub fn resolve(namespace: &str, reference: &DestinationRef, found: &Found<'_>) -> Result<ResolvedDestination, Refusal> {
    let name = reference.name.clone();
    match reference.kind {
        DestinationKind::BrazeDestination => {
            // Looked up by the import's namespace: one in another namespace is never found.
            let destination = found
                .namespaced
                .filter(|d| d.namespace().as_deref() == Some(namespace) && d.name_any() == name)
                .ok_or_else(|| Refusal::NamespacedNotFound { name: name.clone(), namespace: namespace.to_owned() })?;
            Ok(ResolvedDestination {
                braze: destination.spec.clone(),
                secret_namespace: namespace.to_owned(),
                kind: reference.kind,
                name,
            })
        }
        DestinationKind::ClusterBrazeDestination => {
            let Some(secret_namespace) = found.secret_namespace else {
                return Err(Refusal::ClusterDestinationsOff { name });
            };
            let destination = found
                .cluster
                .filter(|d| d.name_any() == name)
                .ok_or_else(|| Refusal::ClusterNotFound { name: name.clone() })?;
            allowed(destination, namespace, found.namespace_labels)?;
            let braze = destination
                .spec
                .workspace(secret_namespace)
                .map_err(|cause| Refusal::SecretNamespace { name: name.clone(), cause })?;
            Ok(ResolvedDestination { braze, secret_namespace: secret_namespace.to_owned(), kind: reference.kind, name })
        }
    }
}

/// Whether `destination`'s `namespaceSelector` selects `namespace` (whose labels are
/// `labels`; an unknown Namespace is selected by nothing, not even `{}`).
fn allowed(
    destination: &ClusterBrazeDestination,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Result<(), Refusal> {
    let name = destination.name_any();
    let selector = Selector::try_from(destination.spec.namespace_selector.clone())
        .map_err(|e| Refusal::InvalidSelector { name: name.clone(), message: e.to_string() })?;
    if labels.is_some_and(|labels| selector.matches(labels)) {
        return Ok(());
    }
    let shown = selector.to_string();
    let selector = if shown.is_empty() { "{}, every namespace".to_owned() } else { shown };
    Err(Refusal::NamespaceNotSelected { name, namespace: namespace.to_owned(), selector })
}

/// Why an import's reference could not be resolved in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// The watches of destinations and Namespaces have not listed everything yet.
    NotSynced,
    Refused(Refusal),
}

/// The destinations and Namespace labels, as the watches last saw them.
#[derive(Clone)]
pub struct Catalog {
    /// One store per watched scope (a namespace, or all), as the imports are watched.
    pub namespaced: Vec<Store<BrazeDestination>>,
    pub cluster: Store<ClusterBrazeDestination>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub secret_namespace: Option<String>,
}

impl Catalog {
    /// Whether every store that is watched has listed once (without a destination Secret
    /// namespace, ClusterBrazeDestinations and Namespaces are not watched at all).
    pub fn is_synced(&self) -> bool {
        let ready = |wait: futures::future::BoxFuture<'_, bool>| wait.now_or_never().unwrap_or(false);
        let cluster_synced = || {
            ready(self.cluster.wait_until_ready().map(|r| r.is_ok()).boxed())
                && ready(self.namespaces.wait_until_ready().map(|r| r.is_ok()).boxed())
        };
        self.namespaced.iter().all(|s| ready(s.wait_until_ready().map(|r| r.is_ok()).boxed()))
            && (self.secret_namespace.is_none() || cluster_synced())
    }

    /// `import` as a reconcile works with it: itself when its destination is inline, a copy
    /// carrying the resolved workspace when it names a shared one.
    pub fn effective(&self, import: &Arc<CohortImport>) -> Result<Arc<CohortImport>, Unresolved> {
        let Some(reference) = import.spec.destination.destination_ref.as_ref() else { return Ok(import.clone()) };
        if import.spec.destination.braze.is_some() {
            // Both set: validation says so (InvalidSpec).
            return Ok(import.clone());
        }
        if !self.is_synced() {
            return Err(Unresolved::NotSynced);
        }
        let resolved = self.resolve(import, reference).map_err(Unresolved::Refused)?;
        let mut effective = CohortImport::clone(import);
        effective.spec.destination.resolved = Some(Box::new(resolved));
        Ok(Arc::new(effective))
    }

    /// [`Self::effective`] for a lookup of another import: `None` when it cannot be resolved
    /// (it cannot run, so it holds no cohort).
    pub fn effective_or_none(&self, import: &Arc<CohortImport>) -> Option<Arc<CohortImport>> {
        self.effective(import).ok()
    }

    /// The cohort `import` imports into: through the workspace its destination names as far
    /// as the stores know it (without the namespace rule, which [`Self::effective`] applies).
    pub fn cohort_key(&self, import: &CohortImport) -> CohortKey {
        if import.spec.destination.braze.is_some() {
            return CohortKey::of(&import.spec);
        }
        let workspace = self.workspace_of(import);
        CohortKey::with(workspace.as_ref().map(|(braze, _)| braze), &import.spec)
    }

    /// Whether `import`'s shared destination reads Secret `namespace`/`name`.
    pub fn reads_secret(&self, import: &CohortImport, namespace: &str, name: &str) -> bool {
        self.workspace_of(import).is_some_and(|(braze, secrets)| {
            secrets == namespace && braze.secret_refs().iter().any(|(_, r)| r.name == name)
        })
    }

    /// The workspace `import`'s `destinationRef` names and the namespace of its Secrets, if
    /// the destination exists.
    fn workspace_of(&self, import: &CohortImport) -> Option<(BrazeDestinationSpec, String)> {
        let reference = import.spec.destination.destination_ref.as_ref()?;
        let namespace = import.namespace().unwrap_or_default();
        match reference.kind {
            DestinationKind::BrazeDestination => {
                let key = ObjectRef::new(&reference.name).within(&namespace);
                let found = self.namespaced.iter().find_map(|store| store.get(&key))?;
                Some((found.spec.clone(), namespace))
            }
            DestinationKind::ClusterBrazeDestination => {
                let found = self.cluster.get(&ObjectRef::new(&reference.name))?;
                let allowed = self.secret_namespace.clone().unwrap_or_default();
                found.spec.workspace(&allowed).ok().map(|braze| (braze, allowed))
            }
        }
    }

    fn resolve(&self, import: &CohortImport, reference: &DestinationRef) -> Result<ResolvedDestination, Refusal> {
        let namespace = import.namespace().unwrap_or_default();
        let namespaced = match reference.kind {
            DestinationKind::BrazeDestination => {
                let key = ObjectRef::new(&reference.name).within(&namespace);
                self.namespaced.iter().find_map(|store| store.get(&key))
            }
            DestinationKind::ClusterBrazeDestination => None,
        };
        let cluster = match reference.kind {
            DestinationKind::ClusterBrazeDestination => self.cluster.get(&ObjectRef::new(&reference.name)),
            DestinationKind::BrazeDestination => None,
        };
        let ns = self.namespaces.get(&ObjectRef::new(&namespace));
        let found = Found {
            namespaced: namespaced.as_deref(),
            cluster: cluster.as_deref(),
            namespace_labels: ns.as_ref().map(|n| n.labels()),
            secret_namespace: self.secret_namespace.as_deref(),
        };
        resolve(&namespace, reference, &found)
    }
}

/// Whether `import` names the destination `kind`/`name` (a namespaced one: in `namespace`).
pub fn names(import: &CohortImport, kind: DestinationKind, name: &str, namespace: Option<&str>) -> bool {
    let Some(reference) = import.spec.destination.destination_ref.as_ref() else { return false };
    reference.kind == kind
        && reference.name == name
        && (kind == DestinationKind::ClusterBrazeDestination || import.namespace().as_deref() == namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn import(ns: &str, destination: serde_json::Value) -> Arc<CohortImport> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
                "metadata": { "name": "vip", "namespace": ns },
                "spec": {
                    "cohort": { "id": "vip", "name": "VIP" },
                    "source": { "inline": { "rows": [] } },
                    "identifiers": { "externalId": "id" },
                    "destination": destination,
                    "schedule": { "cadence": "Once" }
                }
            }))
            .unwrap(),
        )
    }

    fn workspace() -> serde_json::Value {
        json!({
            "restEndpoint": "https://REST.iad-01.braze.com/",
            "partner": "Kubit",
            "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
        })
    }

    fn namespaced(ns: &str, name: &str) -> BrazeDestination {
        let mut d = BrazeDestination::new(name, serde_json::from_value(workspace()).unwrap());
        d.metadata.namespace = Some(ns.into());
        d
    }

    fn cluster(name: &str, selector: serde_json::Value, secret_ns: &str) -> ClusterBrazeDestination {
        let mut spec = workspace();
        spec["namespaceSelector"] = selector;
        spec["dataImportKeySecretRef"]["namespace"] = json!(secret_ns);
        ClusterBrazeDestination::new(name, serde_json::from_value(spec).unwrap())
    }

    fn reference(kind: &str, name: &str) -> serde_json::Value {
        json!({ "destinationRef": { "kind": kind, "name": name } })
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn found<'a>(
        namespaced: Option<&'a BrazeDestination>,
        cluster: Option<&'a ClusterBrazeDestination>,
        labels: Option<&'a BTreeMap<String, String>>,
    ) -> Found<'a> {
        Found { namespaced, cluster, namespace_labels: labels, secret_namespace: Some("cohort-system") }
    }

    /// `import` with what `reference` resolved to, as [`Catalog::effective`] makes it.
    fn resolved(import: &CohortImport, found: &Found<'_>) -> Result<CohortImport, Refusal> {
        let reference = import.spec.destination.destination_ref.as_ref().unwrap();
        let resolved = resolve(&import.namespace().unwrap(), reference, found)?;
        let mut effective = import.clone();
        effective.spec.destination.resolved = Some(Box::new(resolved));
        Ok(effective)
    }

    #[test]
    fn a_reference_resolves_to_exactly_the_inline_workspace_and_its_cohort_key() {
        let inline = import("growth", json!({ "braze": workspace() }));
        let local = namespaced("growth", "us");
        let via_namespaced =
            resolved(&import("growth", reference("BrazeDestination", "us")), &found(Some(&local), None, None)).unwrap();
        let shared = cluster("shared-us", json!({ "matchLabels": { "braze": "us" } }), "cohort-system");
        let team = labels(&[("braze", "us")]);
        let via_cluster = resolved(
            &import("growth", reference("ClusterBrazeDestination", "shared-us")),
            &found(None, Some(&shared), Some(&team)),
        )
        .unwrap();
        for effective in [&via_namespaced, &via_cluster] {
            assert_eq!(effective.spec.destination.braze(), inline.spec.destination.braze());
            assert_eq!(CohortKey::of(&effective.spec), CohortKey::of(&inline.spec), "the same cohort, so one owner");
            assert_eq!(
                crate::controller::pipeline::cohort_snapshot_key(effective, &effective.spec),
                crate::controller::pipeline::cohort_snapshot_key(&inline, &inline.spec),
                "switching inline → reference keeps the snapshot"
            );
        }
        assert_eq!(via_namespaced.spec.destination.secret_namespace("growth"), "growth");
        assert_eq!(via_cluster.spec.destination.secret_namespace("growth"), "cohort-system");
        assert_eq!(inline.spec.destination.secret_namespace("growth"), "growth");
        let unresolved = import("growth", reference("BrazeDestination", "us"));
        assert_ne!(CohortKey::of(&unresolved.spec), CohortKey::of(&inline.spec), "unresolved shares no cohort");
    }

    #[test]
    fn a_namespaced_destination_of_another_namespace_is_never_found() {
        let theirs = namespaced("team-a", "us");
        let mine = import("team-b", reference("BrazeDestination", "us"));
        let refused = resolved(&mine, &found(Some(&theirs), None, None)).unwrap_err();
        assert_eq!(refused.reason(), ReadyReason::DestinationNotFound);
        assert!(refused.to_string().contains("namespace team-b"), "{refused}");
        assert!(!refused.to_string().contains("team-a"), "nothing of the other namespace: {refused}");
    }

    #[test]
    fn a_cluster_destination_serves_only_the_namespaces_its_selector_selects() {
        let shared = cluster("shared-us", json!({ "matchLabels": { "braze": "us" } }), "cohort-system");
        let mine = import("team-b", reference("ClusterBrazeDestination", "shared-us"));
        let other = labels(&[("braze", "eu")]);
        for labels in [Some(&other), None] {
            let refused = resolved(&mine, &found(None, Some(&shared), labels)).unwrap_err();
            assert_eq!(refused.reason(), ReadyReason::DestinationNotAllowed);
            let text = refused.to_string();
            assert!(text.contains("shared-us") && text.contains("braze=us") && text.contains("team-b"), "{text}");
        }
        let everyone = cluster("everyone", json!({}), "cohort-system");
        let any = labels(&[]);
        let mine = import("team-b", reference("ClusterBrazeDestination", "everyone"));
        assert!(resolved(&mine, &found(None, Some(&everyone), Some(&any))).is_ok(), "{{}} selects every namespace");
        let missing = resolved(&mine, &found(None, None, Some(&any))).unwrap_err();
        assert_eq!(missing.reason(), ReadyReason::DestinationNotFound);
    }

    #[test]
    fn a_cluster_destination_naming_a_secret_elsewhere_is_refused() {
        let sneaky = cluster("sneaky", json!({}), "team-a");
        let mine = import("team-b", reference("ClusterBrazeDestination", "sneaky"));
        let any = labels(&[]);
        let refused = resolved(&mine, &found(None, Some(&sneaky), Some(&any))).unwrap_err();
        assert_eq!(refused.reason(), ReadyReason::DestinationNotAllowed);
        assert!(refused.to_string().contains("cohort-system"), "{refused}");
        let none = Found { secret_namespace: None, ..found(None, Some(&sneaky), Some(&any)) };
        let off = resolved(&mine, &none).unwrap_err();
        assert!(matches!(off, Refusal::ClusterDestinationsOff { .. }), "{off}");
        assert_eq!(off.reason(), ReadyReason::DestinationNotAllowed);
        assert!(off.to_string().contains("--destination-secret-namespace"), "{off}");
    }

    #[test]
    fn names_matches_kind_name_and_for_a_namespaced_destination_its_namespace() {
        let mine = import("growth", reference("BrazeDestination", "us"));
        assert!(names(&mine, DestinationKind::BrazeDestination, "us", Some("growth")));
        assert!(!names(&mine, DestinationKind::BrazeDestination, "us", Some("other")));
        assert!(!names(&mine, DestinationKind::ClusterBrazeDestination, "us", None));
        let inline = import("growth", json!({ "braze": workspace() }));
        assert!(!names(&inline, DestinationKind::BrazeDestination, "us", Some("growth")));
    }

    #[test]
    fn without_cluster_destinations_only_the_namespaced_stores_must_have_listed() {
        use kube::runtime::{reflector, watcher};
        let (namespaced, mut writer) = reflector::store::<BrazeDestination>();
        let (cluster, _cluster_writer) = reflector::store::<ClusterBrazeDestination>();
        let (namespaces, _namespaces_writer) = reflector::store();
        let mut catalog = Catalog { namespaced: vec![namespaced], cluster, namespaces, secret_namespace: None };
        assert!(!catalog.is_synced(), "the namespaced destinations have not listed yet");
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(catalog.is_synced(), "off: the cluster destinations and Namespaces are never watched");
        catalog.secret_namespace = Some("cohort-system".into());
        assert!(!catalog.is_synced(), "on: they must have listed too");
    }
}
