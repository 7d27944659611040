//! `crds/` must be exactly what the Rust types generate.

#[test]
fn crds_dir_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/cohortimports.cohorts.dev.yaml");
    let on_disk = std::fs::read_to_string(path).expect("crds/cohortimports.cohorts.dev.yaml exists");
    let generated = cohort_operator::api::crd_yaml();
    assert!(
        on_disk == generated,
        "crds/ drifted from the Rust types; regenerate with:\n  \
         cargo run -q -- crd > crds/cohortimports.cohorts.dev.yaml"
    );
}
