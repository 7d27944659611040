//! The CRD on a real kube-apiserver: it installs, takes every example, and the server itself
//! rejects invalid specs with messages that name the field.

use cohort_operator::api::{self, BrazeDestination, CohortImport, CohortTrigger};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use testkit::cluster::Cluster;

fn example_documents() -> Vec<(String, Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut docs = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !value.is_null() {
                docs.push((path.file_name().unwrap().to_string_lossy().into_owned(), value));
            }
        }
    }
    docs
}

async fn create(client: &kube::Client, ns: &str, doc: &Value) -> Result<(), kube::Error> {
    let pp = PostParams::default();
    match doc["kind"].as_str().unwrap() {
        "Secret" => {
            Api::<Secret>::namespaced(client.clone(), ns)
                .create(&pp, &serde_json::from_value(doc.clone()).unwrap())
                .await?;
        }
        "ConfigMap" => {
            Api::<ConfigMap>::namespaced(client.clone(), ns)
                .create(&pp, &serde_json::from_value(doc.clone()).unwrap())
                .await?;
        }
        "CohortImport" => {
            Api::<CohortImport>::namespaced(client.clone(), ns)
                .create(&pp, &serde_json::from_value(doc.clone()).unwrap())
                .await?;
        }
        "CohortTrigger" => {
            Api::<CohortTrigger>::namespaced(client.clone(), ns)
                .create(&pp, &serde_json::from_value(doc.clone()).unwrap())
                .await?;
        }
        "BrazeDestination" => {
            Api::<BrazeDestination>::namespaced(client.clone(), ns)
                .create(&pp, &serde_json::from_value(doc.clone()).unwrap())
                .await?;
        }
        other => panic!("examples/ holds an unexpected kind {other}"),
    }
    Ok(())
}

/// A raw create that bypasses the Rust types, so invalid values reach the server as a user's
/// `kubectl apply` would send them.
async fn create_raw(client: &kube::Client, ns: &str, doc: Value) -> Result<(), kube::Error> {
    let resource = kube::api::ApiResource::erase::<CohortImport>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.map(|_| ())
}

fn valid_import(name: &str) -> Value {
    json!({
        "apiVersion": "cohorts.dev/v1alpha1",
        "kind": "CohortImport",
        "metadata": { "name": name },
        "spec": {
            "cohort": { "id": "c-1", "name": "Cohort one" },
            "source": { "inline": { "rows": [ { "id": "u1" } ] } },
            "identifiers": { "externalId": "id" },
            "destination": { "braze": {
                "restEndpoint": "https://rest.iad-01.braze.com",
                "partner": "kubit",
                "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
            } },
            "schedule": { "cadence": "Daily", "at": "06:30" }
        }
    })
}

#[tokio::test]
async fn crd_installs_accepts_examples_and_rejects_invalid_specs() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    cluster.install_crd(&api::crd()).await;
    cluster.install_crd(&api::trigger_crd()).await;
    cluster.install_crd(&api::destination_crd()).await;
    let ns = cluster.namespace("crd-e2e").await;

    // Every example is accepted as written.
    let docs = example_documents();
    assert!(docs.iter().filter(|(_, d)| d["kind"] == "CohortImport").count() >= 4);
    for (file, doc) in &docs {
        create(&client, &ns, doc)
            .await
            .unwrap_or_else(|e| panic!("examples/{file}: {} rejected: {e}", doc["metadata"]["name"]));
    }

    // Defaults are filled in by the server.
    let stored = Api::<CohortImport>::namespaced(client.clone(), &ns).get("beta-testers").await.unwrap();
    assert_eq!(stored.spec.history_limit, 10);
    assert_eq!(stored.spec.schedule.time_zone, "UTC");
    assert_eq!(stored.spec.deletion_policy, api::DeletionPolicy::Retain);

    // Invalid specs are refused by the server with a message naming the field.
    // (name, what makes it invalid, what the server's message must mention)
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation, &[&str])> = vec![
        ("at-25", Box::new(|v| v["spec"]["schedule"]["at"] = json!("25:00")), &["spec.schedule.at", "25:00"]),
        (
            "cadence-minutely",
            Box::new(|v| v["spec"]["schedule"]["cadence"] = json!("Minutely")),
            &["spec.schedule.cadence", "Minutely"],
        ),
        (
            "minute-60",
            Box::new(|v| v["spec"]["schedule"] = json!({ "cadence": "Hourly", "minute": 60 })),
            &["spec.schedule.minute"],
        ),
        (
            "webhook-header-name",
            Box::new(|v| {
                v["spec"]["notifications"] = json!({ "webhook": {
                    "urlSecretRef": { "name": "hooks", "key": "url" },
                    "headers": [{ "name": "Bad Header", "valueSecretRef": { "name": "hooks", "key": "token" } }]
                } });
            }),
            &["spec.notifications.webhook.headers.name", "Bad Header"],
        ),
        (
            "day-of-month-0",
            Box::new(|v| {
                v["spec"]["schedule"]["cadence"] = json!("Monthly");
                v["spec"]["schedule"]["dayOfMonth"] = json!(0);
            }),
            &["spec.schedule.dayOfMonth"],
        ),
        (
            "no-destination",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("destination");
            }),
            &["spec.destination", "Required"],
        ),
        (
            "braze-and-destination-ref",
            Box::new(|v| {
                v["spec"]["destination"]["destinationRef"] = json!({ "kind": "BrazeDestination", "name": "us" });
            }),
            &["spec.destination"],
        ),
        ("empty-destination", Box::new(|v| v["spec"]["destination"] = json!({})), &["spec.destination"]),
        (
            "destination-ref-kind",
            Box::new(|v| v["spec"]["destination"] = json!({ "destinationRef": { "kind": "Issuer", "name": "us" } })),
            &["spec.destination.destinationRef.kind", "Issuer"],
        ),
        ("history-limit-51", Box::new(|v| v["spec"]["historyLimit"] = json!(51)), &["spec.historyLimit"]),
        (
            "bad-secret-key",
            Box::new(|v| v["spec"]["destination"]["braze"]["dataImportKeySecretRef"]["key"] = json!("no spaces")),
            &["spec.destination.braze.dataImportKeySecretRef.key"],
        ),
        (
            "two-sources",
            Box::new(|v| v["spec"]["source"]["configMap"] = json!({ "name": "cm", "key": "k" })),
            &["spec.source"],
        ),
        ("empty-cohort-name", Box::new(|v| v["spec"]["cohort"]["name"] = json!("")), &["spec.cohort.name"]),
        ("bad-deletion-policy", Box::new(|v| v["spec"]["deletionPolicy"] = json!("Delete")), &["spec.deletionPolicy"]),
    ];
    for (name, mutate, expected) in cases {
        let mut doc = valid_import(name);
        mutate(&mut doc);
        let err = create_raw(&client, &ns, doc).await.expect_err(&format!("{name}: server accepted an invalid spec"));
        let message = err.to_string();
        for fragment in expected {
            assert!(message.contains(fragment), "{name}: message {message:?} does not mention {fragment:?}");
        }
    }

    // The unmodified base is valid: the failures above are the mutations' doing.
    create_raw(&client, &ns, valid_import("baseline")).await.expect("baseline accepted");
    // So is a reference alone in place of the inline workspace.
    let mut by_reference = valid_import("by-reference");
    by_reference["spec"]["destination"] =
        json!({ "destinationRef": { "kind": "ClusterBrazeDestination", "name": "us" } });
    create_raw(&client, &ns, by_reference).await.expect("a destinationRef alone is accepted");
}
