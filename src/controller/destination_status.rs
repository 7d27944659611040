//! The status of shared destinations: `Ready` when the spec is valid, every key Secret it
//! names holds its key, and the endpoint is known. One writer for both kinds
//! ([`write_status`]), from one reconcile ([`reconcile`]); like an import's, it reads whether
//! each key is there, never keeps a value.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use super::context::Context;
use super::secrets::{self, CheckedKey, KeyFields, Workspace};
use crate::api::{
    BrazeDestination, BrazeDestinationSpec, ClusterBrazeDestination, DeliveryMethod, DestinationKind,
    DestinationReason, DestinationStatus, READY, SecretNamespaceNotAllowed,
};
use crate::domain::validate::validate_workspace;
use crate::source::kube::KubeObjects;

/// How soon a destination is looked at again: a missing Secret may appear at any time (and
/// one present may go), and no Secret watch maps to destinations.
const RECHECK_NOT_READY: Duration = Duration::from_secs(30);
const RECHECK_READY: Duration = Duration::from_secs(300);

/// A destination's `Ready` condition, as computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub reason: DestinationReason,
    pub message: String,
}

impl Readiness {
    fn not(reason: DestinationReason, message: impl Into<String>) -> Self {
        Readiness { reason, message: message.into() }
    }
}

/// Whether the workspace can be used: `workspace` is the destination's spec as an import's
/// `braze` holds it (or why a ClusterBrazeDestination's Secrets are refused), its Secrets in
/// `secret_namespace`.
pub async fn readiness(
    ctx: &Context,
    kind: DestinationKind,
    workspace: Result<BrazeDestinationSpec, SecretNamespaceNotAllowed>,
    secret_namespace: &str,
) -> Readiness {
    let braze = match workspace {
        Ok(braze) => braze,
        Err(e) => return Readiness::not(DestinationReason::SecretNamespaceNotAllowed, e.to_string()),
    };
    if let Err(errors) = validate_workspace("spec", &braze) {
        return Readiness::not(DestinationReason::InvalidSpec, format!("Invalid spec: {errors}"));
    }
    let workspace = Workspace { braze: &braze, secret_namespace, fields: KeyFields::of(Some(kind)) };
    let objects = KubeObjects::new(ctx.client.clone(), secret_namespace);
    for (reference, field) in workspace.key_refs() {
        let key = CheckedKey { reference: reference.clone(), field, braze: true };
        if let Err(e) = secrets::check_key(&objects, &key, &ctx.secret_checks).await {
            let reason = match e.reason() {
                crate::api::ReadyReason::SecretReadFailed => DestinationReason::SecretReadFailed,
                _ => DestinationReason::SecretNotFound,
            };
            return Readiness::not(reason, e.to_string());
        }
    }
    if braze.method == DeliveryMethod::CohortImport && braze.partner_api_key_secret_ref.is_none() {
        let fix = "; or set spec.partnerApiKeySecretRef";
        if let Err(e) = ctx.config.partner_keys.key_for(&braze.rest_endpoint).await {
            let text = e.to_string().replace(", or set spec.destination.braze.partnerApiKeySecretRef", fix);
            return Readiness::not(DestinationReason::UnknownEndpoint, text);
        }
    }
    let message = match braze.method {
        DeliveryMethod::CohortImport => "the keys are present and the operator has the endpoint's partner key",
        DeliveryMethod::Attribute => "the REST API key is present",
    };
    Readiness { reason: DestinationReason::Ready, message: message.to_owned() }
}

/// Reconciles a namespaced `BrazeDestination`: its Secrets are in its own namespace.
pub async fn reconcile_namespaced(
    destination: Arc<BrazeDestination>,
    ctx: Arc<Context>,
) -> Result<Action, kube::Error> {
    let namespace = destination.namespace().unwrap_or_default();
    let kind = DestinationKind::BrazeDestination;
    let ready = readiness(&ctx, kind, Ok(destination.spec.clone()), &namespace).await;
    let api: Api<BrazeDestination> = Api::namespaced(ctx.client.clone(), &namespace);
    let method = destination.spec.method;
    write_status(&api, destination.as_ref(), destination.status.as_ref(), method, &ready).await?;
    Ok(recheck(&ready))
}

/// Reconciles a `ClusterBrazeDestination`: its Secrets only in the operator's destination
/// Secret namespace.
pub async fn reconcile_cluster(
    destination: Arc<ClusterBrazeDestination>,
    ctx: Arc<Context>,
) -> Result<Action, kube::Error> {
    let allowed = ctx.watched.catalog.secret_namespace.clone().unwrap_or_default();
    let workspace = destination.spec.workspace(&allowed);
    let ready = readiness(&ctx, DestinationKind::ClusterBrazeDestination, workspace, &allowed).await;
    let api: Api<ClusterBrazeDestination> = Api::all(ctx.client.clone());
    let method = destination.spec.method;
    write_status(&api, destination.as_ref(), destination.status.as_ref(), method, &ready).await?;
    Ok(recheck(&ready))
}

fn recheck(ready: &Readiness) -> Action {
    Action::requeue(if ready.reason == DestinationReason::Ready { RECHECK_READY } else { RECHECK_NOT_READY })
}

/// A failed status write is tried again soon.
pub fn error_policy<K>(destination: Arc<K>, error: &kube::Error, _ctx: Arc<Context>) -> Action
where
    K: Resource,
{
    warn!(name = %destination.meta().name.as_deref().unwrap_or_default(), %error, "destination status not written");
    Action::requeue(Duration::from_secs(10))
}

/// Writes `status.method`, `observedGeneration` and `Ready` when they differ from `shown`:
/// the one writer of both kinds' status.
async fn write_status<K>(
    api: &Api<K>,
    destination: &K,
    shown: Option<&DestinationStatus>,
    method: DeliveryMethod,
    ready: &Readiness,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let generation = destination.meta().generation;
    let status = if ready.reason == DestinationReason::Ready { "True" } else { "False" };
    let reason = ready.reason.as_str();
    let current = shown.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let same = current.is_some_and(|c| {
        c.status == status && c.reason == reason && c.message == ready.message && c.observed_generation == generation
    }) && shown.is_some_and(|s| s.method == Some(method) && s.observed_generation == generation);
    if same {
        return Ok(());
    }
    let since = match current {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(super::status::seconds(Timestamp::now())),
    };
    let condition = Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: ready.message.clone(),
        last_transition_time: since,
        observed_generation: generation,
    };
    let patch = json!({ "status": { "observedGeneration": generation, "method": method, "conditions": [condition] } });
    let name = destination.meta().name.clone().unwrap_or_default();
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    info!(destination = %name, reason, "destination status written");
    Ok(())
}
