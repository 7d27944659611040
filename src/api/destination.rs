//! Shared Braze destinations: the namespaced `BrazeDestination` (its spec is
//! [`super::BrazeDestinationSpec`], exactly what an import's `spec.destination.braze` holds)
//! and the cluster-scoped `ClusterBrazeDestination`, referenced from imports by
//! `spec.destination.destinationRef` — cert-manager's `Issuer` and `ClusterIssuer`.
//!
//! A namespaced destination is usable only by the imports of its own namespace and reads its
//! Secrets there. A cluster destination is usable by the imports of the namespaces its
//! `namespaceSelector` selects, and reads its Secrets only in the operator's destination
//! Secret namespace (`--destination-secret-namespace`), which each reference names
//! explicitly: whoever may create a ClusterBrazeDestination could otherwise point the
//! operator at any Secret in the cluster and send it to an endpoint of their choosing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::{
    BrazeDestinationSpec, DATA_KEY_PATTERN, DeliveryMethod, MembershipAttributeSpec, OBJECT_NAME_PATTERN, SecretKeyRef,
};
use super::status::DestinationStatus;

/// A Braze workspace shared by the imports of the namespaces it selects.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cohorts.dev",
    version = "v1alpha1",
    kind = "ClusterBrazeDestination",
    plural = "clusterbrazedestinations",
    shortname = "cbzd",
    status = "DestinationStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".status.method"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.restEndpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterBrazeDestinationSpec {
    /// The namespaces whose imports may use this destination, by their labels, e.g.
    /// `matchLabels: {cohorts.dev/braze-us: "true"}`; `{}` selects every namespace. An
    /// import in another namespace is refused (`Ready=False`, reason
    /// `DestinationNotAllowed`) and nothing is sent.
    pub namespace_selector: LabelSelector,
    /// The customer's REST endpoint, e.g. `https://rest.iad-01.braze.com`.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^https?://[^\s/?#]+/?$"))]
    pub rest_endpoint: String,
    /// How membership reaches Braze, as in an import's `spec.destination.braze.method`.
    #[serde(default)]
    pub method: DeliveryMethod,
    /// `CohortImport` only: the partner path segment, `{restEndpoint}/partners/{partner}/cohorts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub partner: Option<String>,
    /// `CohortImport` only: the customer's data import key (`client_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_import_key_secret_ref: Option<NamespacedSecretKeyRef>,
    /// `CohortImport` only: overrides the operator's partner API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_api_key_secret_ref: Option<NamespacedSecretKeyRef>,
    /// `Attribute` only: the customer's REST API key, with the `users.track` permission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<NamespacedSecretKeyRef>,
    /// `Attribute` only: the custom attribute that holds membership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<MembershipAttributeSpec>,
}

/// A key of a Secret in a named namespace: for a ClusterBrazeDestination, the operator's
/// destination Secret namespace and no other.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedSecretKeyRef {
    /// The Secret's namespace: must be the operator's `--destination-secret-namespace`
    /// (chart: `clusterDestinations.secretNamespace`, the release namespace when empty).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// The key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub key: String,
}

/// Why a ClusterBrazeDestination's Secret references cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field} names namespace {namespace:?}; a ClusterBrazeDestination reads Secrets only in the operator's \
     destination Secret namespace {allowed:?}: move the Secret there and name that namespace"
)]
pub struct SecretNamespaceNotAllowed {
    pub field: &'static str,
    pub namespace: String,
    pub allowed: String,
}

impl ClusterBrazeDestinationSpec {
    /// The workspace as an import's `braze` holds it, its Secrets all in `allowed` (the
    /// operator's destination Secret namespace); any reference elsewhere is refused.
    pub fn workspace(&self, allowed: &str) -> Result<BrazeDestinationSpec, SecretNamespaceNotAllowed> {
        let local = |field: &'static str, r: &Option<NamespacedSecretKeyRef>| match r {
            None => Ok(None),
            Some(r) if r.namespace == allowed => Ok(Some(SecretKeyRef { name: r.name.clone(), key: r.key.clone() })),
            Some(r) => {
                Err(SecretNamespaceNotAllowed { field, namespace: r.namespace.clone(), allowed: allowed.into() })
            }
        };
        Ok(BrazeDestinationSpec {
            rest_endpoint: self.rest_endpoint.clone(),
            method: self.method,
            partner: self.partner.clone(),
            data_import_key_secret_ref: local("spec.dataImportKeySecretRef", &self.data_import_key_secret_ref)?,
            partner_api_key_secret_ref: local("spec.partnerApiKeySecretRef", &self.partner_api_key_secret_ref)?,
            api_key_secret_ref: local("spec.apiKeySecretRef", &self.api_key_secret_ref)?,
            attribute: self.attribute.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_destination_reads_secrets_only_in_the_allowed_namespace() {
        let spec: ClusterBrazeDestinationSpec = serde_json::from_value(serde_json::json!({
            "namespaceSelector": { "matchLabels": { "braze": "us" } },
            "restEndpoint": "https://rest.iad-01.braze.com",
            "partner": "kubit",
            "dataImportKeySecretRef": { "namespace": "cohort-system", "name": "braze", "key": "k" }
        }))
        .unwrap();
        let workspace = spec.workspace("cohort-system").unwrap();
        assert_eq!(workspace.data_import_key_secret_ref, Some(SecretKeyRef { name: "braze".into(), key: "k".into() }));
        assert_eq!(workspace.method, DeliveryMethod::CohortImport);
        let refused = spec.workspace("other").unwrap_err();
        assert_eq!(refused.field, "spec.dataImportKeySecretRef");
        assert!(refused.to_string().contains("\"cohort-system\"") && refused.to_string().contains("\"other\""));
    }
}
