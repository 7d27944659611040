//! The Kubernetes API of the operator in `cohorts.dev/v1alpha1`: `CohortImport`,
//! `CohortTrigger`, `BrazeDestination` and `ClusterBrazeDestination`.

mod destination;
mod method;
pub mod reference;
mod spec;
mod status;
mod trigger;

pub use destination::*;
pub use spec::*;
pub use status::*;
pub use trigger::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Setting this annotation to a new value runs the import once (Flux's convention).
pub const RUN_REQUESTED_ANNOTATION: &str = "cohorts.dev/run-requested-at";
/// Flux's "reconcile now" annotation (`flux reconcile`, Flux UIs): a new value runs the import
/// once too, independently of [`RUN_REQUESTED_ANNOTATION`].
pub const FLUX_RECONCILE_ANNOTATION: &str = "reconcile.fluxcd.io/requestedAt";
/// Naming a blocked run's id here lets that run remove members past the guard.
pub const APPROVE_REMOVALS_ANNOTATION: &str = "cohorts.dev/approve-removals";
/// Naming the id of a run blocked because the snapshot was missing lets that run send the
/// whole source to Braze as additions (a resync).
pub const APPROVE_RESYNC_ANNOTATION: &str = "cohorts.dev/approve-resync";
/// Field manager for everything the operator writes.
pub const FIELD_MANAGER: &str = "cohort-operator";
/// Finalizer that lets `deletionPolicy` act before the resource goes.
pub const FINALIZER: &str = "cohorts.dev/cleanup";

/// The CohortImport CRD as the API server should hold it.
pub fn crd() -> CustomResourceDefinition {
    tidy(CohortImport::crd())
}

/// The CohortTrigger CRD as the API server should hold it.
pub fn trigger_crd() -> CustomResourceDefinition {
    tidy(CohortTrigger::crd())
}

/// The BrazeDestination CRD as the API server should hold it.
pub fn destination_crd() -> CustomResourceDefinition {
    tidy(BrazeDestination::crd())
}

/// The ClusterBrazeDestination CRD as the API server should hold it.
pub fn cluster_destination_crd() -> CustomResourceDefinition {
    tidy(ClusterBrazeDestination::crd())
}

fn tidy(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    // schemars lists `null` among the values of an optional enum; `nullable: true` already
    // says that, and kubectl's client-side validation rejects a null enum value.
    let mut json = serde_json::to_value(crd).expect("the CRD serializes");
    drop_null_enum_values(&mut json);
    serde_json::from_value(json).expect("the CRD deserializes")
}

fn drop_null_enum_values(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(drop_null_enum_values);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_enum_values),
        _ => {}
    }
}

/// The CohortImport CRD as YAML, exactly what `crds/cohortimports.cohorts.dev.yaml` holds.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd()).expect("the CRD serializes")
}

/// The CohortTrigger CRD as YAML, exactly what `crds/cohorttriggers.cohorts.dev.yaml` holds.
pub fn trigger_crd_yaml() -> String {
    serde_yaml::to_string(&trigger_crd()).expect("the CRD serializes")
}

/// The BrazeDestination CRD as YAML, exactly what `crds/brazedestinations.cohorts.dev.yaml` holds.
pub fn destination_crd_yaml() -> String {
    serde_yaml::to_string(&destination_crd()).expect("the CRD serializes")
}

/// The ClusterBrazeDestination CRD as YAML, exactly what
/// `crds/clusterbrazedestinations.cohorts.dev.yaml` holds.
pub fn cluster_destination_crd_yaml() -> String {
    serde_yaml::to_string(&cluster_destination_crd()).expect("the CRD serializes")
}

#[cfg(test)]
mod tests {
    /// Every watched import is kept in the controller's store (10,000 in
    /// `controller_scale`), one allocation each: kinds most imports leave unset are boxed
    /// (`SourceSpec`) so that it stays in jemalloc's 2 KiB size class, not the 4 KiB one.
    #[test]
    fn an_import_in_memory_fits_in_2_kib_with_its_arc() {
        let arc_counts = 2 * std::mem::size_of::<usize>();
        let size = std::mem::size_of::<super::CohortImport>() + arc_counts;
        assert!(size <= 2048, "a CohortImport takes {size} bytes in an Arc");
    }
}
