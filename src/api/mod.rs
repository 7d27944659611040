//! The Kubernetes API of the operator: `CohortImport` in `cohorts.dev/v1alpha1`.

mod spec;
mod status;

pub use spec::*;
pub use status::*;

use kube::CustomResourceExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Setting this annotation to a new value runs the import once (Flux's convention).
pub const RUN_REQUESTED_ANNOTATION: &str = "cohorts.dev/run-requested-at";
/// Naming a blocked run's id here lets that run remove members past the guard.
pub const APPROVE_REMOVALS_ANNOTATION: &str = "cohorts.dev/approve-removals";
/// Field manager for everything the operator writes.
pub const FIELD_MANAGER: &str = "cohort-operator";
/// Finalizer that lets `deletionPolicy` act before the resource goes.
pub const FINALIZER: &str = "cohorts.dev/cleanup";

/// The CRD as the API server should hold it.
pub fn crd() -> CustomResourceDefinition {
    CohortImport::crd()
}

/// The CRD as YAML, exactly what `crds/` holds.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd()).expect("the CRD serializes")
}
