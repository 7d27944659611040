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
fn the_trigger_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/cohorttriggers.cohorts.dev.yaml");
    let on_disk = std::fs::read_to_string(path).expect("crds/cohorttriggers.cohorts.dev.yaml exists");
    assert!(
        on_disk == cohort_operator::api::trigger_crd_yaml(),
        "crds/ drifted from the Rust types; regenerate with:\n  \
         cargo run -q -- crd --kind cohort-trigger > crds/cohorttriggers.cohorts.dev.yaml"
    );
}

#[test]
fn the_destination_crds_match_the_rust_types() {
    for (file, generated, kind) in [
        ("brazedestinations.cohorts.dev.yaml", cohort_operator::api::destination_crd_yaml(), "braze-destination"),
        (
            "clusterbrazedestinations.cohorts.dev.yaml",
            cohort_operator::api::cluster_destination_crd_yaml(),
            "cluster-braze-destination",
        ),
    ] {
        let path = format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR"));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            on_disk == generated,
            "crds/ drifted from the Rust types; regenerate with:\n  cargo run -q -- crd --kind {kind} > crds/{file}"
        );
    }
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

/// `docs/threat-model.md`: every row names at least one test, and every test it names
/// (`tests/FILE.rs::name` or `src/PATH.rs::name`) exists as a function in that file.
#[test]
fn the_threat_model_names_only_tests_that_exist() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/threat-model.md")).expect("docs/threat-model.md exists");
    let mut named = 0;
    for row in doc.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| power |") && !l.contains("|---")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        if matches!(cells.first().map(|c| c.trim_start_matches("| ")), Some("field" | "value" | "bytes")) {
            continue;
        }
        let tests = cells.last().expect("a row has cells");
        let refs: Vec<&str> = tests.split('`').filter(|t| t.contains(".rs::")).collect();
        assert!(!refs.is_empty(), "a row names no test: {row}");
        for reference in refs {
            let (file, name) = reference.split_once("::").expect("FILE::name");
            let source = std::fs::read_to_string(format!("{root}/{file}"))
                .unwrap_or_else(|e| panic!("{reference}: {file} cannot be read: {e}"));
            assert!(source.contains(&format!("fn {name}(")), "{reference}: no test of that name in {file}");
            named += 1;
        }
    }
    assert!(named > 40, "only {named} tests named");
}

/// Every top-level spec field and every source kind has a row in the threat model.
#[test]
fn every_spec_field_has_a_row_in_the_threat_model() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/threat-model.md")).expect("docs/threat-model.md exists");
    let crd: serde_json::Value = serde_json::to_value(cohort_operator::api::crd()).expect("the CRD serializes");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let mut fields: Vec<String> = spec.as_object().expect("spec properties").keys().cloned().collect();
    let sources = spec["source"]["properties"].as_object().expect("source kinds");
    fields.extend(sources.keys().map(|kind| format!("source.{kind}")));
    let braze = spec["destination"]["properties"]["braze"]["properties"].as_object().expect("braze fields");
    fields.extend(braze.keys().map(|field| format!("destination.braze.{field}")));
    let trigger: serde_json::Value =
        serde_json::to_value(cohort_operator::api::trigger_crd()).expect("the CRD serializes");
    let trigger_spec = &trigger["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let trigger_fields = trigger_spec.as_object().expect("trigger spec properties").keys();
    fields.extend(trigger_fields.map(|field| format!("CohortTrigger `spec.{field}")));
    let destination = spec["destination"]["properties"].as_object().expect("destination fields");
    fields.extend(destination.keys().map(|field| format!("destination.{field}")));
    for (kind, crd) in [
        ("BrazeDestination", cohort_operator::api::destination_crd()),
        ("ClusterBrazeDestination", cohort_operator::api::cluster_destination_crd()),
    ] {
        let crd = serde_json::to_value(crd).expect("the CRD serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let names = spec.as_object().expect("destination spec properties").keys();
        fields.extend(names.map(|field| format!("{kind} `spec.{field}")));
    }
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}")) && !doc.contains(f.as_str()) && !mentions_trigger_field(&doc, f))
        .collect();
    assert!(missing.is_empty(), "spec fields without a row in docs/threat-model.md: {missing:?}");
}

/// A field of another kind's row names it as "CohortTrigger `spec.a`, `spec.b`" (or
/// BrazeDestination, ClusterBrazeDestination).
fn mentions_trigger_field(doc: &str, field: &str) -> bool {
    let Some((kind, name)) = field.split_once(" `") else { return false };
    doc.lines().any(|l| {
        l.starts_with(&format!("| {kind} ")) && l.split(" | ").next().is_some_and(|c| c.contains(&format!("`{name}`")))
    })
}
