//! The ConfigMap source and the Secret/ConfigMap reader against a real kube-apiserver.

use cohort_operator::api::{IdentifierMapping, SourceSpec};
use cohort_operator::domain::identifiers::SkipReason;
use cohort_operator::domain::member::{Member, MemberKey};
use cohort_operator::source::kube::KubeObjects;
use cohort_operator::source::{CohortRead, ObjectKind, SourceContext, SourceError, open_source_spec, read_cohort};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use testkit::cluster::Cluster;

const LARGE: usize = 50_000;

async fn setup() -> (kube::Client, String) {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("source-cm").await;
    let client = cluster.client().await;
    let mut large = String::new();
    for i in 0..LARGE {
        large.push_str(&format!("user-{i:05}\n"));
    }
    let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "cohort" },
        "data": {
            "ids": "u1\n  u2\r\n\nu1\n",
            "users.csv": "email,uid\ne3,u3\ne4,\ne5,u5\n",
            "broken.csv": "uid,email\nu1,e1\nu2\n",
            "large": large,
        },
        // "u6\n\xff\xfe\n": the second line is not UTF-8.
        "binaryData": { "raw": "dTYK//4K" },
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&PostParams::default(), &config_map).await.unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "warehouse" },
        "stringData": { "url": "postgres://reader:pw@db.internal:5432/analytics\n" },
        // Invalid UTF-8.
        "data": { "binary": "//4=" },
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();
    (client, ns)
}

async fn read(
    objects: &KubeObjects,
    config_map: serde_json::Value,
    identifiers: serde_json::Value,
) -> Result<CohortRead, SourceError> {
    let spec: SourceSpec = serde_json::from_value(serde_json::json!({ "configMap": config_map })).unwrap();
    let identifiers: IdentifierMapping = serde_json::from_value(identifiers).unwrap();
    let source = open_source_spec(&spec, &identifiers, objects).await?;
    read_cohort(source.as_ref()).await
}

fn external(ids: &[&str]) -> Vec<MemberKey> {
    let mut keys: Vec<MemberKey> = ids.iter().map(|id| Member::ExternalId((*id).into()).key()).collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn config_maps_as_lines_csv_and_binary_data() {
    let (client, ns) = setup().await;
    let objects = KubeObjects::new(client, &ns);
    let uid = serde_json::json!({ "externalId": "uid" });
    let id = serde_json::json!({ "externalId": "id" });

    let lines = read(&objects, serde_json::json!({ "name": "cohort", "key": "ids" }), id.clone()).await.unwrap();
    assert_eq!(lines.members, external(&["u1", "u2"]));
    assert_eq!((lines.rows, lines.duplicates, lines.skipped.get(SkipReason::Missing)), (4, 1, 1));

    let csv = read(&objects, serde_json::json!({ "name": "cohort", "key": "users.csv", "format": "Csv" }), uid.clone())
        .await
        .unwrap();
    assert_eq!(csv.members, external(&["u3", "u5"]));
    assert_eq!(csv.skipped.get(SkipReason::Missing), 1);

    let raw = read(&objects, serde_json::json!({ "name": "cohort", "key": "raw", "column": "uid" }), uid.clone())
        .await
        .unwrap();
    assert_eq!(raw.members, external(&["u6"]));
    assert_eq!(raw.skipped.get(SkipReason::InvalidUtf8), 1);

    let large = read(&objects, serde_json::json!({ "name": "cohort", "key": "large" }), id.clone()).await.unwrap();
    assert_eq!(large.rows, LARGE as u64);
    assert_eq!(large.members.len(), LARGE);
}

#[tokio::test]
async fn missing_objects_and_bad_csv_are_errors_that_say_where() {
    let (client, ns) = setup().await;
    let objects = KubeObjects::new(client, &ns);
    let uid = serde_json::json!({ "externalId": "uid" });

    let err = read(&objects, serde_json::json!({ "name": "absent", "key": "ids", "column": "uid" }), uid.clone())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SourceError::ObjectNotFound { kind: ObjectKind::ConfigMap, namespace: ns.clone(), name: "absent".into() }
    );
    assert_eq!(err.reason(), "ConfigMapNotFound");

    let err = read(&objects, serde_json::json!({ "name": "cohort", "key": "nope", "column": "uid" }), uid.clone())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("ConfigMap {ns}/cohort has no key \"nope\": add it or fix the key in the spec")
    );

    let err =
        read(&objects, serde_json::json!({ "name": "cohort", "key": "broken.csv", "format": "Csv" }), uid.clone())
            .await
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("ConfigMap {ns}/cohort key broken.csv: malformed CSV at line 3: 1 fields where the header has 2")
    );

    let err = read(
        &objects,
        serde_json::json!({ "name": "cohort", "key": "users.csv", "format": "Csv" }),
        serde_json::json!({ "deviceId": "device" }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("no column \"device\""), "{err}");
}

#[tokio::test]
async fn secrets_are_read_as_text_without_a_trailing_newline() {
    let (client, ns) = setup().await;
    let objects = KubeObjects::new(client, &ns);
    let url = objects.secret_value("warehouse", "url").await.unwrap();
    assert_eq!(url.expose(), "postgres://reader:pw@db.internal:5432/analytics");
    assert!(!format!("{url:?}").contains("reader:pw"));

    let err = objects.secret_value("warehouse", "password").await.unwrap_err();
    assert_eq!(err.reason(), "SecretNotFound");
    assert_eq!(
        err.to_string(),
        format!("Secret {ns}/warehouse has no key \"password\": add it or fix the key in the spec")
    );
    let err = objects.secret_value("warehouse", "binary").await.unwrap_err();
    assert!(matches!(err, SourceError::KeyNotText { .. }), "{err:?}");
    let err = objects.secret_value("absent", "url").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Secret {ns}/absent not found: create it in the import's namespace or fix the name in the spec")
    );
}

#[tokio::test]
async fn a_forbidden_read_names_the_object() {
    let (_, ns) = setup().await;
    // A service account with no role may not read ConfigMaps.
    let nobody = Cluster::shared().client_as(Some(&format!("system:serviceaccount:{ns}:nobody"))).await;
    let objects = KubeObjects::new(nobody, &ns);
    let err = objects.config_map_value("cohort", "ids").await.unwrap_err();
    match &err {
        SourceError::ObjectRead { kind: ObjectKind::ConfigMap, namespace, name, message } => {
            assert_eq!((namespace.as_str(), name.as_str()), (ns.as_str(), "cohort"));
            assert!(message.contains("forbidden"), "{message}");
        }
        other => panic!("expected a read error, got {other:?}"),
    }
}
