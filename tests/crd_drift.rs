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

#[test]
fn field_reference_matches_the_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md");
    let on_disk = std::fs::read_to_string(path).expect("docs/reference.md exists");
    assert!(
        on_disk == cohort_operator::api::reference::markdown(),
        "docs/reference.md drifted from the CRD; regenerate with:\n  \
         cargo run -q -- crd --reference > docs/reference.md"
    );
}
