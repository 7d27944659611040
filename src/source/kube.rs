//! [`SourceContext`] over the Kubernetes API: Secrets and ConfigMaps in one namespace.
//!
//! This is the operator's one reader of Secret values: sources read through it, and so do
//! the controller's Braze keys and its check that an import's Secrets exist
//! ([`crate::controller::secrets`]), so a check and a run never read a value differently.

use ::kube::Client;
use ::kube::api::Api;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};

use std::sync::Arc;

use super::{ObjectKind, SourceContext, SourceError};
use crate::net::egress::EgressPolicy;
use crate::secret::SecretString;
use crate::source::AmbientIdentity;

/// Reads Secrets and ConfigMaps of the import's namespace.
#[derive(Clone)]
pub struct KubeObjects {
    client: Client,
    namespace: String,
    egress: Arc<EgressPolicy>,
    ambient: Arc<AmbientIdentity>,
    max_page_bytes: u64,
}

impl KubeObjects {
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        KubeObjects {
            client,
            namespace: namespace.into(),
            egress: EgressPolicy::shared_default(),
            ambient: Arc::default(),
            max_page_bytes: super::warehouse::DEFAULT_MAX_PAGE_BYTES,
        }
    }

    /// Sources opened with this context may use the operator's own cloud identity only if
    /// `ambient` names the namespace ([`AmbientIdentity`]).
    pub fn with_ambient_identity(mut self, ambient: Arc<AmbientIdentity>) -> Self {
        self.ambient = ambient;
        self
    }

    /// The operator's ceiling on a warehouse page (see [`SourceContext::max_page_bytes`]).
    pub fn with_max_page_bytes(mut self, bytes: u64) -> Self {
        self.max_page_bytes = bytes;
        self
    }

    /// Sources opened with this context connect only where `policy` allows.
    pub fn with_egress(mut self, policy: Arc<EgressPolicy>) -> Self {
        self.egress = policy;
        self
    }

    async fn get<K>(&self, kind: ObjectKind, name: &str) -> Result<K, SourceError>
    where
        K: ::kube::Resource<Scope = ::kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.get_opt(name).await {
            Ok(Some(object)) => Ok(object),
            Ok(None) => {
                Err(SourceError::ObjectNotFound { kind, namespace: self.namespace.clone(), name: name.to_owned() })
            }
            // API errors name the object and the reason (Forbidden, …), never its data.
            Err(e) => Err(SourceError::ObjectRead {
                kind,
                namespace: self.namespace.clone(),
                name: name.to_owned(),
                message: e.to_string(),
            }),
        }
    }

    /// [`SourceContext::secret_value`] and the Secret's `resourceVersion` as read.
    pub async fn secret_value_at(&self, name: &str, key: &str) -> Result<(SecretString, Option<String>), SourceError> {
        let secret: Secret = self.get(ObjectKind::Secret, name).await?;
        let version = secret.metadata.resource_version.clone();
        let bytes = secret
            .data
            .and_then(|mut data| data.remove(key))
            .ok_or_else(|| self.key_error(ObjectKind::Secret, name, key, false))?;
        let text = String::from_utf8(bytes.0).map_err(|_| self.key_error(ObjectKind::Secret, name, key, true))?;
        // A trailing newline is almost always `echo` or an editor, never part of a key. Other
        // white space is kept: a password may end with a space.
        let trimmed = text.trim_end_matches(['\n', '\r']);
        Ok((SecretString::new(trimmed), version))
    }

    fn key_error(&self, kind: ObjectKind, name: &str, key: &str, not_text: bool) -> SourceError {
        let (namespace, name, key) = (self.namespace.clone(), name.to_owned(), key.to_owned());
        if not_text {
            SourceError::KeyNotText { kind, namespace, name, key }
        } else {
            SourceError::KeyNotFound { kind, namespace, name, key }
        }
    }
}

impl SourceContext for KubeObjects {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn secret_value(&self, name: &str, key: &str) -> Result<SecretString, SourceError> {
        Ok(self.secret_value_at(name, key).await?.0)
    }

    async fn config_map_value(&self, name: &str, key: &str) -> Result<Vec<u8>, SourceError> {
        let config_map: ConfigMap = self.get(ObjectKind::ConfigMap, name).await?;
        if let Some(text) = config_map.data.as_ref().and_then(|d| d.get(key)) {
            return Ok(text.clone().into_bytes());
        }
        config_map
            .binary_data
            .and_then(|mut d| d.remove(key))
            .map(|b| b.0)
            .ok_or_else(|| self.key_error(ObjectKind::ConfigMap, name, key, false))
    }

    fn egress(&self) -> Arc<EgressPolicy> {
        self.egress.clone()
    }

    fn ambient_identity_allowed(&self) -> bool {
        self.ambient.allows(&self.namespace)
    }

    fn max_page_bytes(&self) -> u64 {
        self.max_page_bytes
    }
}
