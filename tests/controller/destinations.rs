//! Shared destinations end to end, on a real kube-apiserver with the Braze sandbox: an
//! import through a `BrazeDestination` lands exactly as inline (switching keeps its snapshot);
//! a `ClusterBrazeDestination` serves the namespaces its selector picks and refuses the others
//! (sending nothing) until a namespace is labelled; a namespaced destination of another
//! namespace is never found; a key rotated in the destination's Secret is used at the next
//! run; destinations show `Ready`.

use std::time::Instant;

use crate::controller_support::*;
use cohort_operator::api::{
    BrazeDestination, ClusterBrazeDestination, CohortImport, CohortImportStatus, DestinationStatus,
    RUN_REQUESTED_ANNOTATION, RunResult,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// Operators configured for ClusterBrazeDestinations write the status of every one in the
/// cluster: the tests that start one take turns.
static CLUSTER_DESTINATIONS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WEEKLY: fn() -> Value = || json!({ "cadence": "Weekly", "dayOfWeek": "Monday", "at": "03:00" });

/// An import in `ns` of `rows` (external ids) into `cohort`, through `destination`.
fn import(name: &str, cohort: &str, rows: &[String], destination: Value) -> Value {
    let rows: Vec<Value> = rows.iter().map(|id| json!({ "id": id })).collect();
    json!({
        "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
        "metadata": { "name": name },
        "spec": {
            "cohort": { "id": cohort, "name": format!("Cohort {cohort}") },
            "source": { "inline": { "rows": rows } },
            "identifiers": { "externalId": "id" },
            "destination": destination,
            "schedule": WEEKLY(),
            "removalGuard": { "disabled": true }
        }
    })
}

fn reference(kind: &str, name: &str) -> Value {
    json!({ "destinationRef": { "kind": kind, "name": name } })
}

/// The workspace the sandbox serves, its data import key in Secret `secret` of `secret_ns`
/// (`None`: a namespaced destination's reference, which has no namespace).
fn workspace(env: &Env, secret: &str, secret_ns: Option<&str>) -> Value {
    let mut key = json!({ "name": secret, "key": "data-import-key" });
    if let Some(ns) = secret_ns {
        key["namespace"] = json!(ns);
    }
    json!({ "restEndpoint": env.sandbox.url(), "partner": PARTNER, "dataImportKeySecretRef": key })
}

async fn create_in(env: &Env, ns: &str, doc: Value) {
    let api: Api<CohortImport> = Api::namespaced(env.client.clone(), ns);
    api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.expect("import created");
}

/// The imports of a namespace other than the test's own, with the waits the tests need.
struct Imports(Api<CohortImport>);

impl Imports {
    fn of(env: &Env, ns: &str) -> Self {
        Imports(Api::namespaced(env.client.clone(), ns))
    }

    async fn get(&self, name: &str) -> CohortImport {
        self.0.get(name).await.expect("import exists")
    }

    async fn request_run(&self, name: &str, value: &str) {
        let patch = json!({ "metadata": { "annotations": { RUN_REQUESTED_ANNOTATION: value } } });
        self.0.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("import patched");
    }

    async fn wait_status(&self, name: &str, what: &str, cond: impl Fn(&CohortImportStatus) -> bool) -> CohortImport {
        let deadline = Instant::now() + WAIT;
        loop {
            let import = self.get(name).await;
            if import.status.as_ref().is_some_and(&cond) {
                return import;
            }
            assert!(Instant::now() < deadline, "{name}: not {what} within {WAIT:?}: {:?}", import.status);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn wait_reason(&self, name: &str, reason: &str) -> CohortImport {
        self.wait_status(name, reason, |s| ready_reason(s) == Some(reason)).await
    }

    /// Waits until the operator has reconciled `name` as it is now, run request included:
    /// a spec change it must acknowledge (`status.observedGeneration`) follows the request,
    /// and one import's reconciles never overlap, so the one that shows it saw both.
    async fn reconciled(&self, name: &str) -> CohortImport {
        let patch = json!({ "spec": { "historyLimit": 9 } });
        let patched = self.0.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("import patched");
        let generation = patched.metadata.generation;
        self.wait_status(name, "reconciled", |s| s.observed_generation == generation).await
    }

    async fn wait_runs(&self, name: &str, n: usize) -> CohortImport {
        self.wait_status(name, &format!("finished with {n} runs"), |s| {
            s.history.len() == n && s.current_run.is_none() && ready_reason(s) != Some("Running")
        })
        .await
    }
}

async fn put_destination(env: &Env, ns: &str, name: &str, spec: Value) {
    let doc = json!({ "apiVersion": "cohorts.dev/v1alpha1", "kind": "BrazeDestination",
                      "metadata": { "name": name }, "spec": spec });
    let api: Api<BrazeDestination> = Api::namespaced(env.client.clone(), ns);
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&doc)).await.expect("destination applies");
}

async fn put_cluster_destination(env: &Env, name: &str, spec: Value) {
    let doc = json!({ "apiVersion": "cohorts.dev/v1alpha1", "kind": "ClusterBrazeDestination",
                      "metadata": { "name": name }, "spec": spec });
    let api: Api<ClusterBrazeDestination> = Api::all(env.client.clone());
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&doc)).await.expect("destination applies");
}

async fn label(env: &Env, ns: &str, labels: Value) {
    let api: Api<Namespace> = Api::all(env.client.clone());
    api.patch(ns, &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "labels": labels } })))
        .await
        .expect("namespace labelled");
}

async fn put_secret_in(env: &Env, ns: &str, name: &str, value: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name },
        "stringData": { "data-import-key": value }
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), ns)
        .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&secret))
        .await
        .expect("Secret applies");
}

/// Waits until `status` says what `want` accepts, returning the `Ready` reason and message.
async fn wait_destination(
    what: &str,
    status: impl AsyncFn() -> Option<DestinationStatus>,
    want: impl Fn(&str, &str) -> bool,
) -> (String, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let shown = status().await;
        let ready = shown.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        if let Some(c) = ready
            && want(&c.reason, &c.message)
        {
            assert_eq!(c.status == "True", c.reason == "Ready", "{c:?}");
            return (c.reason.clone(), c.message.clone());
        }
        assert!(Instant::now() < deadline, "{what}: not as wanted within {WAIT:?}: {shown:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn namespaced_status(env: &Env, ns: &str, name: &str) -> Option<DestinationStatus> {
    let api: Api<BrazeDestination> = Api::namespaced(env.client.clone(), ns);
    api.get_opt(name).await.unwrap().and_then(|d| d.status)
}

async fn cluster_status(env: &Env, name: &str) -> Option<DestinationStatus> {
    let api: Api<ClusterBrazeDestination> = Api::all(env.client.clone());
    api.get_opt(name).await.unwrap().and_then(|d| d.status)
}

#[tokio::test]
async fn an_import_through_a_braze_destination_lands_exactly_like_inline_and_keeps_its_snapshot() {
    let env = Env::new("dest-same").await;
    put_destination(&env, &env.ns, "us", workspace(&env, "braze", None)).await;
    let operator = env.start().await;
    let ns = env.ns.clone();
    let (reason, _) =
        wait_destination("us", || namespaced_status(&env, &ns, "us"), |reason, _| reason == "Ready").await;
    assert_eq!(reason, "Ready");

    // Inline first: the whole cohort.
    env.create(import("vip", "vip", &ids(0..300), json!({ "braze": workspace(&env, "braze", None) }))).await;
    env.wait_reason("vip", "Scheduled").await;
    env.request_run("vip", "inline").await;
    let status = env.wait_runs("vip", 1).await.status.unwrap();
    assert_eq!((status.history[0].result, status.history[0].added), (RunResult::Succeeded, 300));
    let key = status.committed_snapshot.clone().expect("a commit").key;

    // The same workspace through the destination: the same cohort, the same snapshot, so
    // only the change is sent.
    let mut switched = import("vip", "vip", &ids(10..310), reference("BrazeDestination", "us"));
    switched["spec"]["destination"]["braze"] = Value::Null;
    env.merge("vip", json!({ "spec": switched["spec"].clone() })).await;
    env.request_run("vip", "through-destination").await;
    let status = env.wait_runs("vip", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!((run.cohort_size, run.added, run.removed), (300, 10, 10), "only the change: the snapshot was kept");
    assert_eq!(status.committed_snapshot.unwrap().key, key, "the inline destination's snapshot");
    assert_eq!(env.members("vip"), set(&ids(10..310)));
    operator.stop().await;
}

#[tokio::test]
async fn a_cluster_destination_serves_the_namespaces_it_selects_and_refuses_the_others_naming_the_rule() {
    let _turn = CLUSTER_DESTINATIONS.lock().await;
    let env = Env::new("dest-cluster").await;
    let (team, other) = (env.cluster.namespace("dest-team").await, env.cluster.namespace("dest-other").await);
    let selector = format!("{}-braze", env.ns);
    label(&env, &team, json!({ selector.clone(): "us" })).await;
    // The operator's namespace holds the key; the imports' namespaces hold nothing of Braze.
    let shared = format!("{}-shared", env.ns);
    let mut spec = workspace(&env, "braze", Some(&env.ns));
    spec["namespaceSelector"] = json!({ "matchLabels": { selector.clone(): "us" } });
    put_cluster_destination(&env, &shared, spec).await;
    // One naming a Secret outside the operator's namespace is never usable.
    let sneaky = format!("{}-sneaky", env.ns);
    let mut spec = workspace(&env, "braze", Some(&team));
    spec["namespaceSelector"] = json!({});
    put_cluster_destination(&env, &sneaky, spec).await;
    let config = cohort_operator::controller::Config {
        namespaces: vec![env.ns.clone(), team.clone(), other.clone()],
        destination_secret_namespace: Some(env.ns.clone()),
        ..env.config()
    };
    let operator = env.start_with(config, None).await;
    wait_destination(&shared, || cluster_status(&env, &shared), |reason, _| reason == "Ready").await;
    let (_, message) =
        wait_destination(&sneaky, || cluster_status(&env, &sneaky), |r, _| r == "SecretNamespaceNotAllowed").await;
    assert!(message.contains(&env.ns) && message.contains(&team), "{message}");

    let cluster_ref = reference("ClusterBrazeDestination", &shared);
    create_in(&env, &team, import("gold", "gold", &ids(0..50), cluster_ref.clone())).await;
    create_in(&env, &other, import("silver", "silver", &ids(0..50), cluster_ref.clone())).await;
    let (team_env, other_env) = (Imports::of(&env, &team), Imports::of(&env, &other));
    team_env.wait_reason("gold", "Scheduled").await;
    team_env.request_run("gold", "first").await;
    let run = team_env.wait_runs("gold", 1).await.status.unwrap().history[0].clone();
    assert_eq!((run.result, run.added), (RunResult::Succeeded, 50), "{}", run.message);
    assert_eq!(env.members("gold"), set(&ids(0..50)));

    // Not selected: refused, the message names the destination and its rule; nothing sent.
    let refused = other_env.wait_reason("silver", "DestinationNotAllowed").await;
    let message = ready(refused.status.as_ref().unwrap()).unwrap().message.clone();
    assert!(message.contains(&shared) && message.contains(&format!("{selector}=us")), "{message}");
    assert!(message.contains(&other), "{message}");
    other_env.request_run("silver", "refused").await;
    let still = other_env.reconciled("silver").await.status.unwrap();
    assert!(still.history.is_empty() && still.current_run.is_none(), "no run: {still:?}");
    assert!(env.members("silver").is_empty(), "nothing reached the sandbox");

    // Through the sneaky destination too: refused, whatever the selector allows.
    create_in(&env, &team, import("bronze", "bronze", &ids(0..5), reference("ClusterBrazeDestination", &sneaky))).await;
    team_env.wait_reason("bronze", "DestinationNotAllowed").await;

    // Labelled as the selector asks, the namespace is served (the Namespace watch wakes it).
    label(&env, &other, json!({ selector.clone(): "us" })).await;
    other_env.request_run("silver", "allowed").await;
    let run = other_env.wait_runs("silver", 1).await.status.unwrap().history[0].clone();
    assert_eq!((run.result, run.added), (RunResult::Succeeded, 50), "{}", run.message);
    assert_eq!(env.members("silver"), set(&ids(0..50)));
    assert!(env.members("bronze").is_empty());
    operator.stop().await;
}

#[tokio::test]
async fn a_braze_destination_of_another_namespace_is_never_usable() {
    let env = Env::new("dest-theirs").await;
    let mine = env.cluster.namespace("dest-mine").await;
    put_destination(&env, &env.ns, "us", workspace(&env, "braze", None)).await;
    let config = cohort_operator::controller::Config { namespaces: vec![env.ns.clone(), mine.clone()], ..env.config() };
    let operator = env.start_with(config, None).await;
    let mine_env = Imports::of(&env, &mine);
    create_in(&env, &mine, import("vip", "stolen", &ids(0..10), reference("BrazeDestination", "us"))).await;
    let refused = mine_env.wait_reason("vip", "DestinationNotFound").await;
    let message = ready(refused.status.as_ref().unwrap()).unwrap().message.clone();
    assert!(message.contains(&format!("namespace {mine}")), "{message}");
    assert!(!message.contains(&env.ns), "nothing of the other namespace: {message}");
    mine_env.request_run("vip", "try").await;
    assert!(mine_env.reconciled("vip").await.status.unwrap().history.is_empty());
    assert!(env.members("stolen").is_empty(), "nothing reached the sandbox");
    operator.stop().await;
}

#[tokio::test]
async fn a_key_rotated_in_the_destinations_secret_takes_effect_at_the_next_run() {
    let env = Env::new("dest-rotate").await;
    put_secret_in(&env, &env.ns, "rotating", "a-revoked-key").await;
    put_destination(&env, &env.ns, "us", workspace(&env, "rotating", None)).await;
    let operator = env.start().await;
    env.create(import("vip", "vip", &ids(0..20), reference("BrazeDestination", "us"))).await;
    env.wait_reason("vip", "Scheduled").await;
    env.request_run("vip", "old-key").await;
    let run = env.wait_runs("vip", 1).await.status.unwrap().history[0].clone();
    assert_eq!(run.result, RunResult::Failed, "{}", run.message);
    assert!(run.message.contains("401"), "Braze refused the old key: {}", run.message);
    assert!(!run.message.contains("a-revoked-key"), "a key never appears: {}", run.message);
    assert!(env.members("vip").is_empty());

    // Rotated in the one Secret: the next run reads it.
    put_secret_in(&env, &env.ns, "rotating", IMPORT_KEY).await;
    env.request_run("vip", "new-key").await;
    let run = env.wait_runs("vip", 2).await.status.unwrap().history[0].clone();
    assert_eq!((run.result, run.added), (RunResult::Succeeded, 20), "{}", run.message);
    assert_eq!(env.members("vip"), set(&ids(0..20)));
    operator.stop().await;
}

#[tokio::test]
async fn imports_of_one_cohort_through_a_cluster_destination_or_inline_are_held_in_conflict() {
    let _turn = CLUSTER_DESTINATIONS.lock().await;
    let env = Env::new("dest-conflict").await;
    let (team, other) = (env.cluster.namespace("dest-c-team").await, env.cluster.namespace("dest-c-other").await);
    let shared = format!("{}-shared", env.ns);
    let mut spec = workspace(&env, "braze", Some(&env.ns));
    spec["namespaceSelector"] = json!({});
    put_cluster_destination(&env, &shared, spec).await;
    put_secret_in(&env, &other, "braze", IMPORT_KEY).await;
    let config = cohort_operator::controller::Config {
        namespaces: vec![env.ns.clone(), team.clone(), other.clone()],
        destination_secret_namespace: Some(env.ns.clone()),
        ..env.config()
    };
    let operator = env.start_with(config, None).await;
    let cluster_ref = reference("ClusterBrazeDestination", &shared);
    create_in(&env, &team, import("first", "shared", &ids(0..10), cluster_ref.clone())).await;
    let (team_env, other_env) = (Imports::of(&env, &team), Imports::of(&env, &other));
    team_env.wait_reason("first", "Scheduled").await;
    team_env.request_run("first", "run").await;
    team_env.wait_runs("first", 1).await;

    // The same cohort, by reference and inline, from another namespace: both wait for the
    // older import, which is not named to them.
    create_in(&env, &other, import("by-ref", "shared", &ids(0..3), cluster_ref)).await;
    let inline = json!({ "braze": workspace(&env, "braze", None) });
    create_in(&env, &other, import("inline", "shared", &ids(0..3), inline)).await;
    for name in ["by-ref", "inline"] {
        let held = other_env.wait_reason(name, "Conflict").await;
        let message = ready(held.status.as_ref().unwrap()).unwrap().message.clone();
        assert!(message.contains("an import in another namespace") && !message.contains(&team), "{message}");
    }
    assert_eq!(env.members("shared"), set(&ids(0..10)), "only the owner sent");
    operator.stop().await;
}
