//! `kubectl cohort preview` and `cohort-operator preview -f` end to end on the real API
//! server with the Braze sandbox: a preview shows exactly the changes the next run then
//! makes, and the guard's verdict, while the sandbox receives nothing and nothing in the
//! cluster changes; an unapplied manifest is previewed, a bad one gets field errors. And a
//! dry run's bounded sample in status.

#[allow(dead_code)]
#[path = "support/controller.rs"]
mod controller_support;

use std::collections::BTreeMap;
use std::path::Path;

use cohort_operator::api::RunResult;
use controller_support::*;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

/// The output of the binary (as `kubectl cohort` when `plugin`), with its exit status.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn cli(env: &Env, plugin: bool, args: &[&str]) -> Output {
    let bin_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(binary(), bin_dir.path().join("kubectl-cohort")).unwrap();
    let path = format!("{}:{}", bin_dir.path().display(), std::env::var("PATH").unwrap_or_default());
    let mut command = if plugin {
        let mut c = tokio::process::Command::new("kubectl");
        c.arg("cohort");
        c
    } else {
        tokio::process::Command::new(binary())
    };
    // Not blocking: a controller may run on this test's runtime.
    let out = command
        .args(args)
        .env("PATH", &path)
        .env("KUBECONFIG", env.cluster.kubeconfig())
        .env("COHORT_SCRATCH_DIR", env.scratch.path())
        .output()
        .await
        .expect("the command runs");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// `kubectl cohort preview NAME -n NS -o json`, which must succeed.
async fn preview_json(env: &Env, name: &str) -> Value {
    let out = cli(env, true, &["preview", name, "-n", &env.ns, "-o", "json"]).await;
    assert!(out.ok, "preview failed: {}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// Every object of the namespace a run or a preview could touch, by kind and name, with its
/// resourceVersion; Events counted.
async fn cluster_state(env: &Env) -> (BTreeMap<String, String>, usize) {
    let lp = ListParams::default();
    let mut versions = BTreeMap::new();
    let mut put = |kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        let key = format!("{kind}/{}", meta.name.clone().unwrap_or_default());
        versions.insert(key, meta.resource_version.clone().unwrap_or_default());
    };
    for i in env.imports().list(&lp).await.unwrap() {
        put("CohortImport", &i.metadata);
    }
    for c in Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns).list(&lp).await.unwrap() {
        put("ConfigMap", &c.metadata);
    }
    for s in Api::<Secret>::namespaced(env.client.clone(), &env.ns).list(&lp).await.unwrap() {
        put("Secret", &s.metadata);
    }
    let events = Api::<Event>::namespaced(env.client.clone(), &env.ns).list(&lp).await.unwrap().items.len();
    (versions, events)
}

/// Waits until `reason` was reported on `name` `n` times (Events of one reason may be one
/// Event with a series count), so that the run's announcement is done before a state is taken.
async fn wait_events(env: &Env, name: &str, reason: &str, n: i32) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let events = Api::<Event>::namespaced(env.client.clone(), &env.ns).list(&ListParams::default()).await.unwrap();
        let seen: i32 = events
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        if seen >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name}: {reason} reported {seen} times, not {n}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn external(ids: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|id| format!("external_id:{id}")).collect();
    ids.sort();
    ids
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_preview_shows_the_next_runs_changes_and_the_guard_while_nothing_is_sent_or_written() {
    let env = Env::new("preview").await;
    env.put_members(&ids(0..50)).await;
    let operator = env.start().await;
    let mut doc = env.import("vip", "vip", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["removalGuard"] = json!({ "maxRemovalPercent": 20 });
    env.create(doc).await;
    env.wait_reason("vip", "Scheduled").await;
    env.request_run("vip", "first").await;
    env.wait_runs("vip", 1).await;
    assert_eq!(env.members("vip"), set(&ids(0..50)));
    wait_events(&env, "vip", "RunSucceeded", 1).await;
    // The operator is stopped, so anything that changes from here on is the preview's doing.
    operator.stop().await;

    // 5 leave, 5 join: within the guard.
    env.put_members(&ids(5..55)).await;
    let stats = env.sandbox.stats();
    let before = cluster_state(&env).await;
    let preview = preview_json(&env, "vip").await;
    assert_eq!(preview["applied"], true);
    assert_eq!((preview["cohortSize"].as_u64(), preview["previousSize"].as_u64()), (Some(50), Some(50)));
    assert_eq!((preview["adds"].as_u64(), preview["removes"].as_u64()), (Some(5), Some(5)));
    assert_eq!(preview["guard"], json!({ "verdict": "Proceed" }));
    let (adds, removes) = (strings(&preview["sampleAdds"]), strings(&preview["sampleRemoves"]));
    assert_eq!(adds, external(&ids(50..55)));
    assert_eq!(removes, external(&ids(0..5)));
    // The text form says the same, for people.
    let text = cli(&env, true, &["preview", "vip", "-n", &env.ns, "--sample", "2"]).await;
    assert!(text.ok, "{}", text.stderr);
    assert!(
        text.stdout.contains("Adds:           5\n") && text.stdout.contains("Removes:        5\n"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("Sample of adds (2 of 5):"), "{}", text.stdout);
    assert!(text.stdout.contains("Removal guard:  proceed"), "{}", text.stdout);
    assert_eq!(env.sandbox.stats(), stats, "the sandbox received nothing");
    assert_eq!(cluster_state(&env).await, before, "nothing in the cluster changed");

    // The next run makes exactly those changes.
    let operator = env.start().await;
    env.request_run("vip", "second").await;
    let status = env.wait_runs("vip", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!((run.result, run.added, run.removed), (RunResult::Succeeded, 5, 5), "{}", run.message);
    assert_eq!(env.members("vip"), set(&ids(5..55)));
    let sent = env.sandbox.stats();
    assert_eq!((sent.joined - stats.joined, sent.left - stats.left), (5, 5));
    wait_events(&env, "vip", "RunSucceeded", 2).await;
    operator.stop().await;

    // 25 of 50 would leave: over the 20% the guard allows; the preview says the run would block.
    env.put_members(&ids(30..55)).await;
    let stats = env.sandbox.stats();
    let before = cluster_state(&env).await;
    let preview = preview_json(&env, "vip").await;
    assert_eq!((preview["adds"].as_u64(), preview["removes"].as_u64()), (Some(0), Some(25)));
    assert_eq!(preview["guard"]["verdict"], "Block");
    assert_eq!(preview["guard"]["reason"], "TooManyRemovals");
    assert_eq!(preview["guard"]["maxRemovalPercent"], 20);
    let message = preview["guard"]["message"].as_str().unwrap();
    assert!(message.contains("would remove 25 of 50 members"), "{message}");
    assert_eq!(strings(&preview["sampleRemoves"]).len(), 10, "bounded by --sample's default");
    let text = cli(&env, true, &["preview", "vip", "-n", &env.ns]).await;
    assert!(text.stdout.contains("Removal guard:  WOULD BLOCK the run: would remove 25 of 50"), "{}", text.stdout);
    assert_eq!(env.sandbox.stats(), stats, "the sandbox received nothing");
    assert_eq!(cluster_state(&env).await, before, "nothing in the cluster changed");

    // And the run is blocked, as previewed.
    let operator = env.start().await;
    env.request_run("vip", "third").await;
    let status = env.wait_runs("vip", 3).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Blocked, "{}", status.history[0].message);
    assert_eq!(status.history[0].would_remove, Some(25));
    assert_eq!(env.members("vip"), set(&ids(5..55)), "nothing removed");
    operator.stop().await;

    // An import that does not exist is named.
    let out = cli(&env, true, &["preview", "nope", "-n", &env.ns]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains(&format!("CohortImport {}/nope not found", env.ns)), "{}", out.stderr);
}

fn write(dir: &Path, name: &str, doc: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(doc).unwrap()).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn preview_f_shows_an_unapplied_manifest_and_names_the_fields_of_a_bad_one() {
    let env = Env::new("preview-f").await;
    env.put_members(&ids(0..7)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut doc = env.import("fresh", "fresh", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["metadata"]["namespace"] = json!(env.ns);
    let file = write(dir.path(), "fresh.yaml", &doc);
    let stats = env.sandbox.stats();
    let before = cluster_state(&env).await;

    let out = cli(&env, false, &["preview", "-f", &file, "-o", "json"]).await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let preview: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((preview["namespace"].as_str(), preview["name"].as_str()), (Some(env.ns.as_str()), Some("fresh")));
    assert_eq!(preview["applied"], false);
    assert_eq!((preview["adds"].as_u64(), preview["removes"].as_u64()), (Some(7), Some(0)));
    assert_eq!(preview["previousSize"], 0);
    assert_eq!(strings(&preview["sampleAdds"]), external(&ids(0..7)));
    assert_eq!(env.sandbox.stats(), stats, "the sandbox received nothing");
    assert_eq!(cluster_state(&env).await, before, "nothing was created or changed");
    assert!(env.imports().get_opt("fresh").await.unwrap().is_none(), "the manifest was not applied");

    // A namespace that disagrees with the manifest's is refused.
    let out = cli(&env, false, &["preview", "-f", &file, "-n", "elsewhere"]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("metadata.namespace is") && out.stderr.contains("-n says"), "{}", out.stderr);

    // The controller's own rules, every broken one named with its fix.
    let mut bad = doc.clone();
    bad["spec"]["schedule"] = json!({ "cadence": "Daily", "at": "6:30pm" });
    bad["spec"]["identifiers"] = json!({});
    let out = cli(&env, false, &["preview", "-f", &write(dir.path(), "bad.yaml", &bad)]).await;
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stderr.contains("is not valid (2 problems); the controller would not run it"), "{}", out.stderr);
    assert!(out.stderr.contains("spec.schedule.at: \"6:30pm\" is not a wall time; write HH:MM"), "{}", out.stderr);
    assert!(out.stderr.contains("spec.identifiers: maps no identifier; set at least one of"), "{}", out.stderr);
    // A wrong type names its field path.
    let mut wrong = doc.clone();
    wrong["spec"]["schedule"]["cadence"] = json!("Dayly");
    let out = cli(&env, false, &["preview", "-f", &write(dir.path(), "wrong.yaml", &wrong)]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("spec.schedule.cadence: unknown variant `Dayly`"), "{}", out.stderr);
    assert_eq!(env.sandbox.stats(), stats);
    assert_eq!(cluster_state(&env).await, before);
}

#[tokio::test]
async fn preview_f_of_an_applied_import_diffs_against_its_snapshot() {
    let env = Env::new("preview-fa").await;
    env.put_members(&ids(0..10)).await;
    let operator = env.start().await;
    let mut doc = env.import("vip", "vip", json!({ "cadence": "Daily", "at": "06:30" }));
    env.create(doc.clone()).await;
    env.wait_reason("vip", "Scheduled").await;
    env.request_run("vip", "first").await;
    env.wait_runs("vip", 1).await;
    wait_events(&env, "vip", "RunSucceeded", 1).await;
    operator.stop().await;

    // The manifest changes the source to an inline list: 8 stay, 2 leave, 1 joins.
    let rows: Vec<Value> = ids(2..11).into_iter().map(|id| json!({ "id": id })).collect();
    doc["spec"]["source"] = json!({ "inline": { "rows": rows } });
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "vip.yaml", &doc);
    let before = cluster_state(&env).await;
    let out = cli(&env, true, &["preview", "-f", &file, "-n", &env.ns, "-o", "json"]).await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let preview: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(preview["applied"], true);
    assert_eq!((preview["adds"].as_u64(), preview["removes"].as_u64()), (Some(1), Some(2)));
    assert_eq!(strings(&preview["sampleRemoves"]), external(&ids(0..2)));
    assert_eq!(cluster_state(&env).await, before);
}

#[tokio::test]
async fn a_dry_run_records_a_bounded_sample_in_status_unless_turned_off() {
    let env = Env::new("dry-sample").await;
    env.put_members(&ids(0..30)).await;
    let operator = env.start().await;
    let mut doc = env.import("dry", "dry", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["dryRun"] = json!(true);
    env.create(doc).await;
    env.wait_reason("dry", "Scheduled").await;
    let stats = env.sandbox.stats();
    env.request_run("dry", "one").await;
    let status = env.wait_runs("dry", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::DryRun);
    let sample = status.last_dry_run.expect("status.lastDryRun");
    assert_eq!(sample.run_id, status.history[0].id);
    assert_eq!((sample.cohort_size, sample.would_add, sample.would_remove, sample.would_block), (30, 30, 0, false));
    assert_eq!(sample.sample_added, external(&ids(0..30))[..10], "the first 10 in key order");
    assert!(sample.sample_removed.is_empty());
    assert_eq!(env.sandbox.stats(), stats, "a dry run sends nothing");
    let history = cli(&env, false, &["history", "dry", "-n", &env.ns]).await;
    assert!(history.stdout.contains("would add 30 and remove 0 (30 members)"), "{}", history.stdout);
    assert!(history.stdout.contains("sample of adds: external_id:u0, external_id:u1, "), "{}", history.stdout);

    // Turned off: counts only.
    env.merge("dry", json!({ "spec": { "dryRunSample": false } })).await;
    env.request_run("dry", "two").await;
    let status = env.wait_runs("dry", 2).await.status.unwrap();
    let sample = status.last_dry_run.expect("status.lastDryRun");
    assert_eq!(sample.run_id, status.history[0].id);
    assert_eq!(sample.would_add, 30);
    assert!(sample.sample_added.is_empty() && sample.sample_removed.is_empty(), "{sample:?}");
    operator.stop().await;
}

/// An export on 127.0.0.1 that serves `ids` only with `Authorization: Bearer <token>`.
async fn export(token: &'static str, ids: Vec<String>) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let body = format!("id\n{}\n", ids.join("\n"));
    let router = axum::Router::new().route(
        "/members.csv",
        axum::routing::get(move |headers: HeaderMap| async move {
            let expected = format!("Bearer {token}");
            match headers.get("authorization").and_then(|v| v.to_str().ok()) {
                Some(given) if given == expected => (StatusCode::OK, body),
                _ => (StatusCode::UNAUTHORIZED, String::new()),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/members.csv", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// A kubeconfig like the cluster's, acting as `user` (kubeconfig's `as`: impersonation).
fn kubeconfig_as(env: &Env, dir: &Path, user: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(env.cluster.kubeconfig()).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for entry in config["users"].as_sequence_mut().unwrap() {
        entry["user"]["as"] = serde_yaml::Value::from(user);
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn preview_reads_source_secrets_with_the_users_own_rights() {
    const TOKEN: &str = "export-token-7c1d";
    let env = Env::new("preview-rbac").await;
    let url = export(TOKEN, ids(0..4)).await;
    env.put_secret("export", "token", TOKEN).await;
    let mut doc = env.import("web", "web", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["source"] = json!({ "http": {
        "url": url, "format": "Csv",
        "auth": { "bearerTokenSecretRef": { "name": "export", "key": "token" } }
    } });
    env.create(doc).await;

    // An administrator's preview reads the token through the Secret reader and the export.
    let preview = preview_json(&env, "web").await;
    assert_eq!((preview["adds"].as_u64(), preview["cohortSize"].as_u64()), (Some(4), Some(4)));

    // Someone who may read imports and ConfigMaps but not Secrets is refused by RBAC, told
    // which Secret, and never shown its value.
    let rbac = json!([
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
          "metadata": { "name": "previewer", "namespace": env.ns },
          "rules": [
              { "apiGroups": ["cohorts.dev"], "resources": ["cohortimports"], "verbs": ["get", "list"] },
              { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"] }
          ] },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": { "name": "previewer", "namespace": env.ns },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "previewer" },
          "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "previewer" }] }
    ]);
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(env.client.clone(), &env.ns);
    roles.create(&Default::default(), &serde_json::from_value(rbac[0].clone()).unwrap()).await.unwrap();
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(env.client.clone(), &env.ns);
    bindings.create(&Default::default(), &serde_json::from_value(rbac[1].clone()).unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_as(&env, dir.path(), "previewer");
    let out = tokio::process::Command::new(binary())
        .args(["preview", "web", "-n", &env.ns])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains(&format!("Secret {}/export", env.ns)), "{stderr}");
    assert!(stderr.contains("forbidden") || stderr.contains("Forbidden"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
}
