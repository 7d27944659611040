//! What every test that talks to Braze starts with: the Braze sandbox on loopback, knowing
//! one partner and one data import key, and the [`CohortTarget`] a run sends to. Included
//! by the test files that need it (`#[path = "support/braze.rs"] mod braze_support;`) and
//! by benchmarks (`#[path = "../tests/support/braze.rs"]`).
#![allow(dead_code)]

use braze_sandbox::{DataImportKey, Partner, RestApiKey, RunningSandbox, Sandbox, SandboxConfig, SandboxUser};
use cohort_operator::api::AttributeShape;
use cohort_operator::braze::{CohortTarget, MembershipAttribute};
use cohort_operator::secret::SecretString;

/// The partner and keys a sandbox accepts.
#[derive(Clone, Copy, Debug)]
pub struct BrazeKeys {
    pub partner: &'static str,
    pub partner_key: &'static str,
    pub import_key: &'static str,
}

/// The REST API key (with `users.track`) every test sandbox accepts on `/users/track`.
pub const REST_API_KEY: &str = "rest-api-key-7c1d";

/// The settings of a sandbox that accepts `keys` (the data import key for any partner) and
/// [`REST_API_KEY`], and knows `users`, for a caller that adds to them before [`start`].
pub fn sandbox_config(keys: BrazeKeys, users: Vec<SandboxUser>) -> SandboxConfig {
    SandboxConfig {
        partners: vec![Partner { name: keys.partner.into(), api_key: keys.partner_key.into() }],
        data_import_keys: vec![DataImportKey { key: keys.import_key.into(), partners: vec![] }],
        rest_api_keys: vec![RestApiKey::users_track(REST_API_KEY)],
        users,
        ..SandboxConfig::default()
    }
}

/// A sandbox on a free loopback port.
pub async fn start(config: SandboxConfig) -> RunningSandbox {
    Sandbox::start(config).await.expect("sandbox starts")
}

/// A sandbox that accepts `keys` and knows `users`.
pub async fn start_sandbox(keys: BrazeKeys, users: Vec<SandboxUser>) -> RunningSandbox {
    start(sandbox_config(keys, users)).await
}

/// Where a run sends cohort `cohort_id`'s changes: `sandbox`, with `keys`.
pub fn target(sandbox: &RunningSandbox, keys: BrazeKeys, cohort_id: &str) -> CohortTarget {
    target_at(sandbox.url(), keys, cohort_id)
}

/// [`target`] for a sandbox known by its URL (in a child process of a benchmark).
pub fn target_at(url: String, keys: BrazeKeys, cohort_id: &str) -> CohortTarget {
    CohortTarget::partner(
        url,
        keys.partner,
        SecretString::new(keys.partner_key),
        SecretString::new(keys.import_key),
        cohort_id,
    )
}

/// Where a run writes cohort `cohort_id` as attribute `name` of `shape`, with `api_key`.
pub fn attribute_target(
    url: String,
    api_key: &str,
    name: &str,
    shape: AttributeShape,
    cohort_id: &str,
) -> CohortTarget {
    let attribute = MembershipAttribute { name: name.into(), shape };
    CohortTarget::attribute(url, SecretString::new(api_key), attribute, cohort_id)
}
