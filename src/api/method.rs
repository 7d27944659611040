//! How membership reaches Braze (`spec.destination.braze.method`, a destination's
//! `spec.method` and `status.method`): a leaf the spec and the status both name.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `spec.destination.braze.method`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeliveryMethod {
    /// Braze's partner cohort import API (partner API key and data import key).
    #[default]
    CohortImport,
    /// A custom attribute through `/users/track` (the customer's REST API key).
    Attribute,
}

impl DeliveryMethod {
    pub(super) fn is_default(&self) -> bool {
        *self == Self::CohortImport
    }
}
