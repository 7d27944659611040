//! Many teams, one operator, on a real kube-apiserver with the Braze sandbox: an import of
//! another namespace holds a cohort only when it really would undo this one's changes.

use crate::controller_support::*;
use braze_sandbox::DataImportKey;
use cohort_operator::api::{CohortImport, RunResult};
use cohort_operator::controller::Config;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};

const OTHER_KEY: &str = "import-key-of-workspace-b";

/// Applies `doc` (a Secret or ConfigMap named `name`) in `ns`.
async fn apply<K>(env: &Env, ns: &str, name: &str, doc: Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(doc).unwrap();
    Api::<K>::namespaced(env.client.clone(), ns)
        .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&object))
        .await
        .expect("object applies");
}

/// Waits until `cond` holds for import `name` in `ns`.
async fn wait_in(
    env: &Env,
    ns: &str,
    name: &str,
    what: &str,
    cond: impl Fn(&CohortImport) -> bool + Send + 'static,
) -> CohortImport {
    let api: Api<CohortImport> = Api::namespaced(env.client.clone(), ns);
    let found = tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, move |i: Option<&CohortImport>| i.is_some_and(&cond)),
    )
    .await;
    match found {
        Ok(found) => found.expect("watching the import").expect("the import exists"),
        Err(_) => panic!("{ns}/{name}: not {what} within {WAIT:?}: {:?}", api.get(name).await.map(|i| i.status)),
    }
}

fn runs(n: usize) -> impl Fn(&CohortImport) -> bool + Send + 'static {
    move |i| i.status.as_ref().is_some_and(|s| s.history.len() == n && s.current_run.is_none())
}

#[tokio::test]
async fn another_namespaces_suspended_or_other_workspace_import_holds_nothing_and_is_not_named() {
    let env = Env::new("ctl-tenant-a").await;
    let other = env.cluster.namespace("ctl-tenant-b").await;
    env.sandbox.set_data_import_keys(vec![
        DataImportKey { key: IMPORT_KEY.into(), partners: vec![] },
        DataImportKey { key: OTHER_KEY.into(), partners: vec![] },
    ]);
    env.put_members(&ids(0..3)).await;
    // Team B: one Secret for its own workspace, one for team A's (a shared workspace).
    for (name, key) in [("braze", OTHER_KEY), ("braze-a", IMPORT_KEY)] {
        let doc = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name },
                          "stringData": { "data-import-key": key } });
        apply::<Secret>(&env, &other, name, doc).await;
    }
    let members = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "members" },
                          "data": { "ids": ids(0..3).join("\n") } });
    apply::<ConfigMap>(&env, &other, "members", members).await;
    let config = Config { namespaces: vec![env.ns.clone(), other.clone()], ..env.config() };
    let operator = env.start_with(config, None).await;
    let theirs: Api<CohortImport> = Api::namespaced(env.client.clone(), &other);
    let create = |name: &str, secret: &str| {
        let mut doc = env.import(name, "shared", json!({ "cadence": "Daily", "at": "06:30" }));
        doc["spec"]["destination"]["braze"]["dataImportKeySecretRef"]["name"] = json!(secret);
        let theirs = theirs.clone();
        async move { theirs.create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.unwrap() }
    };
    let request = |name: &'static str| {
        let theirs = theirs.clone();
        async move {
            let patch = json!({ "metadata": { "annotations": { "cohorts.dev/run-requested-at": name } } });
            theirs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
    };

    // Team B, first: an import of another workspace, and one of team A's workspace that
    // then is suspended. Both ran, so both once held the cohort.
    create("elsewhere", "braze").await;
    create("sleeper", "braze-a").await;
    for name in ["elsewhere", "sleeper"] {
        request(name).await;
        let ran = wait_in(&env, &other, name, "run once", runs(1)).await.status.unwrap();
        assert_eq!(ran.history[0].result, RunResult::Succeeded, "{}", ran.history[0].message);
        let workspace = ran.braze_workspace.expect("the run records its workspace");
        assert!(!workspace.contains(OTHER_KEY) && !workspace.contains(IMPORT_KEY), "{workspace}");
    }
    let patch = json!({ "spec": { "suspend": true } });
    theirs.patch("sleeper", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_in(&env, &other, "sleeper", "Suspended", |i| i.status.as_ref().and_then(ready_reason) == Some("Suspended"))
        .await;

    // Team A's younger import of the same cohort id is held by neither, and runs.
    env.create(env.import("ours", "shared", json!({ "cadence": "Daily", "at": "07:30" }))).await;
    env.request_run("ours", "1").await;
    let status = env.wait_runs("ours", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    let mentions = |text: &str| text.contains(&other) || text.contains("elsewhere") || text.contains("sleeper");
    let said = serde_json::to_string(&status).unwrap();
    assert!(!mentions(&said), "team B is not named in team A's status: {said}");
    for (reason, note) in env.events("ours").await {
        assert_ne!(reason, "Conflict");
        assert!(!mentions(&note), "team B is not named in team A's Events: {note}");
    }

    // A real conflict across namespaces — team B's new import into team A's workspace, while
    // team A's holds the cohort — is held, and team A's import is not named to team B.
    create("rival", "braze-a").await;
    request("rival").await;
    let held =
        wait_in(&env, &other, "rival", "Conflict", |i| i.status.as_ref().and_then(ready_reason) == Some("Conflict"))
            .await;
    let message = ready(held.status.as_ref().unwrap()).unwrap().message.clone();
    assert!(message.contains("an import in another namespace"), "{message}");
    assert!(!message.contains(&env.ns) && !message.contains("ours"), "{message}");
    assert!(held.status.unwrap().history.is_empty(), "the rival never ran");
    operator.stop().await;
}

#[tokio::test]
async fn a_run_that_crashes_the_operator_every_time_ends_failed_after_its_attempts() {
    let env = Env::new("ctl-attempts").await;
    env.put_members(&ids(0..2500)).await;
    // A slow Braze keeps every attempt going until the "crash".
    env.sandbox.set_faults(braze_sandbox::Faults { latency_ms: 3000, ..braze_sandbox::Faults::default() });
    let mut operator = env.start().await;
    env.create(env.import("crashy", "crashy", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.request_run("crashy", "1").await;
    for attempt in 1..=3u32 {
        let what = format!("running attempt {attempt}");
        let running = env
            .wait_status("crashy", &what, move |s| s.current_run.as_ref().is_some_and(|r| r.attempt == attempt))
            .await;
        assert_eq!(ready_reason(running.status.as_ref().unwrap()), Some("Running"));
        if attempt > 1 {
            // The resumed run's warning follows its status write: seen before the next crash.
            env.wait_event("crashy", "RunInterrupted").await;
        }
        operator.kill().await;
        operator = env.start().await;
    }
    let status = env.wait_runs("crashy", 1).await.status.unwrap();
    let record = &status.history[0];
    assert_eq!(record.result, RunResult::Failed);
    assert!(record.message.contains("interrupted on each of its 3 attempts"), "{}", record.message);
    assert!(record.message.contains("--max-run-attempts"), "{}", record.message);
    assert_eq!(ready_reason(&status), Some("Failed"));
    assert!(status.next_run_at.is_some(), "the schedule goes on");
    env.wait_event("crashy", "RunFailed").await;
    let interrupted = env.events("crashy").await.into_iter().filter(|(r, _)| r == "RunInterrupted").count();
    assert!(interrupted >= 1, "each restart warned");
    operator.stop().await;
}

#[tokio::test]
async fn a_run_over_its_deadline_fails_naming_the_field() {
    let env = Env::new("ctl-deadline").await;
    env.put_members(&ids(0..2500)).await;
    // Each Braze request takes 3 s; the run may take 1 s.
    env.sandbox.set_faults(braze_sandbox::Faults { latency_ms: 3000, ..braze_sandbox::Faults::default() });
    let operator = env.start().await;
    let mut doc = env.import("slow", "slow", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["runTimeoutSeconds"] = json!(1);
    env.create(doc).await;
    env.request_run("slow", "1").await;
    let status = env.wait_runs("slow", 1).await.status.unwrap();
    let record = &status.history[0];
    assert_eq!(record.result, RunResult::Failed);
    assert!(record.message.starts_with("deadline exceeded"), "{}", record.message);
    assert!(record.message.contains("after 1 s (spec.runTimeoutSeconds)"), "{}", record.message);
    // A run over its deadline may pass next time: retried (spec.retry's defaults) — unless
    // a person steps in first, as here.
    assert!(status.next_retry_at.is_some(), "a retry is scheduled");
    env.wait_reason("slow", "RetryScheduled").await;

    // Given time, the next run converges: everyone is in the cohort.
    env.sandbox.set_faults(braze_sandbox::Faults::default());
    env.merge("slow", json!({ "spec": { "runTimeoutSeconds": 600 } })).await;
    env.request_run("slow", "2").await;
    let status = env.wait_runs("slow", 2).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(env.members("slow"), set(&ids(0..2500)));
    operator.stop().await;
}

/// An HTTP export that never ends: a CSV header, then one id every 200 ms, for as long as
/// the reader stays. Returns its URL and how many connections it has served.
async fn trickling_export() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/members.csv", listener.local_addr().unwrap());
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/csv\r\ntransfer-encoding: chunked\r\n\r\n";
                let chunk = |s: String| format!("{:x}\r\n{s}\r\n", s.len()).into_bytes();
                let mut out = head.as_bytes().to_vec();
                out.extend(chunk("id\n".into()));
                let mut n = 0u64;
                while stream.write_all(&out).await.is_ok() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    out = chunk(format!("t{n}\n"));
                    n += 1;
                }
            });
        }
    });
    (url, connections)
}

#[tokio::test]
async fn two_namespaces_with_trickling_exports_do_not_delay_a_third() {
    use std::sync::atomic::Ordering;
    let env = Env::new("ctl-fair-c").await;
    env.put_members(&ids(0..3)).await;
    let (url, connections) = trickling_export().await;
    let mut slow = Vec::new();
    for prefix in ["ctl-fair-a", "ctl-fair-b"] {
        let ns = env.cluster.namespace(prefix).await;
        let doc = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "braze" },
                          "stringData": { "data-import-key": IMPORT_KEY } });
        apply::<Secret>(&env, &ns, "braze", doc).await;
        slow.push(ns);
    }
    // Three slots in all, one a namespace: each slow namespace holds one, the third is free.
    let namespaces = [vec![env.ns.clone()], slow.clone()].concat();
    let config = Config { namespaces, max_concurrent_runs: 3, max_concurrent_runs_per_namespace: 1, ..env.config() };
    let operator = env.start_with(config, None).await;
    for ns in &slow {
        let api: Api<CohortImport> = Api::namespaced(env.client.clone(), ns);
        for i in 0..2 {
            let name = format!("slow-{i}");
            let mut doc = env.import(&name, &format!("{ns}-{i}"), json!({ "cadence": "Daily", "at": "06:30" }));
            doc["spec"]["source"] = json!({ "http": { "url": url, "format": "Csv" } });
            doc["metadata"]["annotations"] = json!({ "cohorts.dev/run-requested-at": "now" });
            api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.unwrap();
        }
    }
    // Both slow namespaces are reading (one run each: the cap), and stay so.
    let deadline = std::time::Instant::now() + WAIT;
    while connections.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "the slow exports were not read within {WAIT:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The third namespace's import runs at once, while the slow ones trickle on.
    env.create(env.import("quick", "quick", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.request_run("quick", "1").await;
    let status = env.wait_runs("quick", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(env.members("quick"), set(&ids(0..3)));
    assert_eq!(connections.load(Ordering::SeqCst), 2, "each slow namespace reads one export at a time");
    for ns in &slow {
        let api: Api<CohortImport> = Api::namespaced(env.client.clone(), ns);
        for i in 0..2 {
            let import = api.get(&format!("slow-{i}")).await.unwrap();
            assert!(import.status.unwrap().history.is_empty(), "{ns}/slow-{i} is still going or waiting");
        }
    }
    operator.stop().await;
}

/// One run slot in all; workspace A's budget allows one request every 2 s. A's run waits for
/// budget between its requests — and gives its slot away meanwhile, so workspace B's import
/// starts, runs and finishes while A's run is still going.
#[tokio::test]
async fn a_throttled_workspace_does_not_delay_another_workspaces_run_start() {
    use cohort_operator::braze::{BrazeClient, BrazeClientConfig, BudgetConfig, Budgets};
    use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
    let env = Env::new("ctl-throttled").await;
    env.sandbox.set_data_import_keys(vec![
        DataImportKey { key: IMPORT_KEY.into(), partners: vec![] },
        DataImportKey { key: OTHER_KEY.into(), partners: vec![] },
    ]);
    env.put_members(&ids(0..6000)).await;
    env.put_secret("braze-b", "data-import-key", OTHER_KEY).await;
    let few = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "few" },
                      "data": { "ids": ids(0..3).join("\n") } });
    apply::<ConfigMap>(&env, &env.ns, "few", few).await;
    // Every destination: 1,800 requests an hour (one per 2 s), two at once.
    let budgets = Budgets::new(BudgetConfig { requests_per_hour: 1800, burst: 2, ..BudgetConfig::default() });
    let braze = BrazeClient::new(BrazeClientConfig::default()).unwrap().with_budgets(std::sync::Arc::new(budgets));
    let importer =
        PipelineImporter::new(env.client.clone(), braze, SnapshotStoreKind::Cluster, env.scratch.path().to_owned());
    let config = Config { max_concurrent_runs: 1, ..env.config() };
    let operator = env.start_importing(config, None, std::sync::Arc::new(importer)).await;

    // A: 6,000 members, so a naming and six membership requests: ten seconds of budget.
    env.create(env.import("throttled", "throttled", json!({ "cadence": "Once" }))).await;
    wait_until("A's run sending", || env.sandbox.stats().users_requests >= 1).await;

    // B, another workspace with three members: two requests, within its own budget.
    let mut doc = env.import("other", "other", json!({ "cadence": "Once" }));
    doc["spec"]["destination"]["braze"]["dataImportKeySecretRef"]["name"] = json!("braze-b");
    doc["spec"]["source"]["configMap"]["name"] = json!("few");
    env.create(doc).await;
    let other = env.wait_runs("other", 1).await.status.unwrap();
    assert_eq!(other.history[0].result, RunResult::Succeeded, "{}", other.history[0].message);
    let throttled = env.get("throttled").await.status.unwrap();
    assert!(
        throttled.current_run.is_some() && throttled.history.is_empty(),
        "B ran while A's run was still waiting for its budget"
    );
    assert_eq!(env.members("other"), set(&ids(0..3)));

    // A takes its slot back and finishes: nothing lost.
    let status = env.wait_runs("throttled", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(env.members("throttled"), set(&ids(0..6000)));
    operator.stop().await;
}
