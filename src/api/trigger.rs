//! `CohortTrigger`: runs the imports it selects when a pipeline calls its webhook — Flux's
//! `Receiver`, for cohorts. The operator serves each trigger on its own port at the path
//! published in `status.webhookPath`; a call signed with the token from `spec.secretRef`
//! sets the run-requested annotation of every import the selector picks.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::SecretKeyRef;
use super::status::{date_time, optional_date_time};

/// Runs the CohortImports it selects when a pipeline (dbt Cloud, GitHub, a script) calls
/// its webhook.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cohorts.dev",
    version = "v1alpha1",
    kind = "CohortTrigger",
    namespaced,
    shortname = "cot",
    status = "CohortTriggerStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Last Delivery","type":"date","jsonPath":".status.lastDelivery.receivedAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Path","type":"string","priority":1,"jsonPath":".status.webhookPath"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CohortTriggerSpec {
    /// Who calls and how the call is signed: `Generic` (headers `X-Cohort-Timestamp` and
    /// `X-Cohort-Signature: sha256=HMAC(token, timestamp + "." + body)`), `GitHub`
    /// (`X-Hub-Signature-256`, as GitHub signs webhooks) or `DbtCloud` (`Authorization`, as
    /// dbt Cloud signs webhooks).
    #[serde(rename = "type")]
    pub kind: TriggerType,
    /// The Secret key holding the token (at least 16 characters): the webhook's signing
    /// secret, and part of the digest that makes the webhook path unguessable.
    pub secret_ref: SecretKeyRef,
    /// The CohortImports in this namespace a call runs, by label; `{}` selects them all.
    pub selector: LabelSelector,
    /// GitHub only: the `X-GitHub-Event` names that run the imports (e.g. `push`,
    /// `workflow_run`); empty: `push`. A dbt Cloud trigger runs them on `job.run.completed`
    /// with `runStatus: Success` only; a Generic one on every call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64)))]
    pub events: Vec<String>,
}

/// The sender a trigger expects, and so its signature scheme.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TriggerType {
    /// Any HTTP client that signs `timestamp.body` with HMAC-SHA256.
    Generic,
    /// A GitHub repository or organisation webhook (content type `application/json`).
    GitHub,
    /// A dbt Cloud job webhook.
    DbtCloud,
}

impl TriggerType {
    pub const fn as_str(self) -> &'static str {
        match self {
            TriggerType::Generic => "Generic",
            TriggerType::GitHub => "GitHub",
            TriggerType::DbtCloud => "DbtCloud",
        }
    }
}

/// What the operator observed of a trigger; written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CohortTriggerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the token is there and the webhook is served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where to send calls, on the operator's trigger port (the chart's `-triggers`
    /// Service): `/hook/` and a SHA-256 digest of the token, name and namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_path: Option<String>,
    /// The last call that ran imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery: Option<TriggerDelivery>,
    /// Deliveries accepted in the last 24 hours (at most 512, newest first): a call that
    /// repeats one, or was sent before the oldest of them, is a replay and runs nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    pub recent_deliveries: Vec<TriggerDelivery>,
    /// The newest sending time the trigger has forgotten: a delivery sent at or before it
    /// is refused as a possible replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub forgotten_before: Option<Timestamp>,
}

/// One accepted call.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerDelivery {
    /// dbt Cloud's `eventId`; for GitHub (whose delivery header is not signed) a digest of
    /// the body; for `Generic` the start of the call's signature.
    #[schemars(length(max = 80))]
    pub id: String,
    #[schemars(schema_with = "date_time")]
    pub received_at: Timestamp,
    /// When the sender says it sent it (signed): dbt Cloud's `timestamp`, a push's
    /// `repository.pushed_at`, the Generic timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub sent_at: Option<Timestamp>,
}
