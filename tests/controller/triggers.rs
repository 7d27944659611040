//! CohortTrigger webhooks end to end on a real kube-apiserver: signed calls from each
//! supported sender (with the senders' documented example payloads) run exactly the
//! selected imports once; forged, replayed, oversized and misdirected calls run nothing;
//! a flood of calls leaves scheduled runs alone; and any replica may take a call while the
//! leader runs the import.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::controller_support::*;
use cohort_operator::api::{CohortImport, CohortTrigger, RunTrigger};
use cohort_operator::controller::metrics::Metrics;
use cohort_operator::trigger;
use cohort_operator::trigger::signature::sign;
use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

const TOKEN: &str = "7d0c7a1e5b3f4c2a9e8d6b4f2a1c3e5d";
const WEEKLY: fn() -> Value = || json!({ "cadence": "Weekly", "dayOfWeek": "Monday", "at": "03:00" });

/// dbt Cloud's documented example of a completed run ("Webhooks for your jobs"), verbatim
/// but for its `timestamp`, which [`dbt_completed`] sets to now (an event over a day old is
/// refused as a possible replay).
const DBT_COMPLETED: &str = r#"{
  "accountId": 1,
  "eventId": "wev_2L6ZDoilyiWzKkSA59Gmc2d7FDD",
  "timestamp": "2023-01-31T19:29:35.789265936Z",
  "eventType": "job.run.completed",
  "webhookName": "test",
  "data": {
    "jobId": "123",
    "jobName": "Daily Job (dbt build)",
    "runId": "12345",
    "environmentId": "1234",
    "environmentName": "Production",
    "dbtVersion": "",
    "projectName": "Snowflake Github Demo",
    "runReason": "",
    "runStartedAt": "2023-01-31T19:28:07Z",
    "runFinishedAt": "2023-01-31T19:29:32Z",
    "runStatus": "Success",
    "runStatusMessage": "None"
  }
}"#;

fn dbt_completed() -> String {
    DBT_COMPLETED.replace("2023-01-31T19:29:35.789265936Z", &Timestamp::now().to_string())
}

/// A trigger port serving the test's namespace.
struct Port {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for Port {
    fn drop(&mut self) {
        self._task.abort();
    }
}

async fn port(env: &Env) -> Port {
    let metrics = Arc::new(Metrics::new());
    let (addr, task) =
        trigger::serve(env.client.clone(), vec![env.ns.clone()], "127.0.0.1:0".parse().unwrap(), metrics.clone())
            .await
            .expect("the trigger port binds");
    Port { addr, metrics, _task: task }
}

fn triggers(env: &Env) -> Api<CohortTrigger> {
    Api::namespaced(env.client.clone(), &env.ns)
}

/// Creates trigger `name` of `kind` selecting `team=<team>` and waits for its path.
async fn create_trigger(env: &Env, name: &str, kind: &str, team: &str, events: &[&str]) -> String {
    let mut spec = json!({
        "type": kind,
        "secretRef": { "name": "hook-token", "key": "token" },
        "selector": { "matchLabels": { "team": team } }
    });
    if !events.is_empty() {
        spec["events"] = json!(events);
    }
    let doc = json!({ "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortTrigger", "metadata": { "name": name }, "spec": spec });
    triggers(env).create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.expect("trigger created");
    wait_trigger(env, name, "Ready").await.status.unwrap().webhook_path.expect("a webhook path")
}

async fn wait_trigger(env: &Env, name: &str, reason: &str) -> CohortTrigger {
    let api = triggers(env);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let trigger = api.get(name).await.unwrap();
        let shown = trigger.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        if shown.is_some_and(|c| c.reason == reason) {
            return trigger;
        }
        assert!(tokio::time::Instant::now() < deadline, "trigger {name} never {reason}: {:?}", trigger.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An import reading `members`, labelled `team`.
async fn labelled_import(env: &Env, name: &str, team: &str) {
    let mut doc = env.import(name, name, WEEKLY());
    doc["metadata"]["labels"] = json!({ "team": team });
    env.create(doc).await;
    env.wait_reason(name, "Scheduled").await;
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut request = client.post(format!("http://{addr}{path}")).body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let answer = request.send().await.expect("the trigger port answers");
    (answer.status().as_u16(), answer.text().await.unwrap())
}

fn generic_headers(body: &str, at: Timestamp) -> Vec<(&'static str, String)> {
    let ts = at.as_second().to_string();
    let signature = sign(TOKEN.as_bytes(), format!("{ts}.{body}").as_bytes());
    vec![("x-cohort-timestamp", ts), ("x-cohort-signature", format!("sha256={signature}"))]
}

fn runs(import: &CohortImport) -> usize {
    import.status.as_ref().map_or(0, |s| s.history.len())
}

/// Waits until the operator has nothing pending, then returns each import's run count.
async fn settled_runs(env: &Env, names: &[&str]) -> Vec<usize> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut counts = Vec::new();
    for name in names {
        let import = env.get(name).await;
        let status = import.status.as_ref();
        assert!(status.is_none_or(|s| s.current_run.is_none()), "{name} still running");
        counts.push(runs(&import));
    }
    counts
}

#[tokio::test]
async fn a_signed_generic_call_runs_exactly_the_selected_imports_once() {
    let env = Env::new("trg-generic").await;
    env.put_members(&ids(0..3)).await;
    env.put_secret("hook-token", "token", TOKEN).await;
    let operator = env.start().await;
    let port = port(&env).await;
    for (name, team) in [("growth-a", "growth"), ("growth-b", "growth"), ("ops", "ops")] {
        labelled_import(&env, name, team).await;
    }
    let path = create_trigger(&env, "warehouse-ready", "Generic", "growth", &[]).await;
    assert!(path.starts_with("/hook/") && path.len() == 70, "{path}");

    let body = r#"{"table":"analytics.cohorts","rows":3}"#;
    let headers = generic_headers(body, Timestamp::now());
    let (code, text) = post(port.addr, &path, &headers, body).await;
    assert_eq!(code, 202, "{text}");
    assert!(text.contains("runs requested: 2"), "{text}");
    for name in ["growth-a", "growth-b"] {
        let done = env.wait_runs(name, 1).await.status.unwrap();
        assert_eq!(done.history[0].trigger, RunTrigger::Manual);
        assert!(done.last_handled_run_request.as_deref().unwrap().contains("cohorttrigger/warehouse-ready"));
        assert_eq!(env.members(name), set(&ids(0..3)));
    }

    // The same call again is a replay; a forged one, an oversized one, an old one, one to
    // another path and one without a timestamp run nothing.
    let (code, text) = post(port.addr, &path, &headers, body).await;
    assert_eq!(code, 400, "replay: {text}");
    let forged = generic_headers(r#"{"rows":4}"#, Timestamp::now());
    assert_eq!(post(port.addr, &path, &forged, body).await.0, 401);
    let big = "x".repeat(300 * 1024);
    assert_eq!(post(port.addr, &path, &generic_headers(&big, Timestamp::now()), &big).await.0, 400);
    let old = generic_headers(body, Timestamp::now() - SignedDuration::from_mins(10));
    assert_eq!(post(port.addr, &path, &old, body).await.0, 400);
    let wrong = format!("/hook/{}", "0".repeat(64));
    assert_eq!(post(port.addr, &wrong, &generic_headers(body, Timestamp::now()), body).await.0, 404);
    assert_eq!(post(port.addr, &path, &headers[1..], body).await.0, 401);
    assert_eq!(settled_runs(&env, &["growth-a", "growth-b", "ops"]).await, [1, 1, 0]);

    // The trigger shows its last delivery; the port counts each outcome.
    let shown = triggers(&env).get("warehouse-ready").await.unwrap().status.unwrap();
    assert_eq!(shown.recent_deliveries.len(), 1);
    assert_eq!(shown.last_delivery.as_ref().map(|d| d.id.as_str()), Some(shown.recent_deliveries[0].id.as_str()));
    let outcomes = |result: &str| {
        port.metrics
            .trigger_deliveries
            .get_or_create(&cohort_operator::controller::metrics::ResultLabels { result: result.into() })
    };
    assert_eq!(outcomes("accepted").get(), 1);
    assert_eq!(outcomes("replayed").get(), 1);
    assert_eq!(outcomes("unauthorized").get(), 2);
    assert_eq!(outcomes("not_found").get(), 1);
    operator.stop().await;
}

#[tokio::test]
async fn github_and_dbt_cloud_calls_run_their_imports_with_each_senders_signature() {
    let env = Env::new("trg-senders").await;
    env.put_members(&ids(0..2)).await;
    env.put_secret("hook-token", "token", TOKEN).await;
    let operator = env.start().await;
    let port = port(&env).await;
    labelled_import(&env, "from-github", "repo").await;
    labelled_import(&env, "from-dbt", "dbt").await;
    let github = create_trigger(&env, "github", "GitHub", "repo", &["push"]).await;
    let dbt = create_trigger(&env, "dbt", "DbtCloud", "dbt", &[]).await;

    // GitHub: the ping on creation runs nothing; a push does. Headers as GitHub documents
    // them ("Webhook events and payloads", "Validating webhook deliveries").
    let push = format!(
        r#"{{"ref":"refs/heads/main","before":"6113728f27ae82c7b1a177c8d03f9e96e0adf246","after":"0000000000000000000000000000000000000000","repository":{{"id":186853002,"full_name":"Codertocat/Hello-World","pushed_at":{}}},"pusher":{{"name":"Codertocat"}}}}"#,
        Timestamp::now().as_second()
    );
    let push = push.as_str();
    let github_call = |event: &str, delivery: &str, body: &str| {
        vec![
            ("x-github-event", event.to_owned()),
            ("x-github-delivery", delivery.to_owned()),
            ("x-github-hook-id", "292430182".to_owned()),
            ("x-hub-signature-256", format!("sha256={}", sign(TOKEN.as_bytes(), body.as_bytes()))),
            ("content-type", "application/json".to_owned()),
        ]
    };
    let ping = r#"{"zen":"Keep it logically awesome.","hook_id":292430182}"#;
    let (code, _) = post(port.addr, &github, &github_call("ping", "ping-1", ping), ping).await;
    assert_eq!(code, 200);
    let (code, text) =
        post(port.addr, &github, &github_call("push", "72d3162e-cc78-11e3-81ab-4c9367dc0958", push), push).await;
    assert_eq!(code, 202, "{text}");
    env.wait_runs("from-github", 1).await;
    // An event the trigger does not list, GitHub's SHA-1 signature alone, a redelivery
    // (under another delivery id too: GitHub does not sign that header).
    let (code, _) = post(port.addr, &github, &github_call("issues", "another-delivery", push), push).await;
    assert_eq!(code, 200);
    let sha1_only = vec![
        ("x-github-event", "push".to_owned()),
        ("x-github-delivery", "d-sha1".to_owned()),
        ("x-hub-signature", "sha1=0123456789abcdef0123456789abcdef01234567".to_owned()),
    ];
    assert_eq!(post(port.addr, &github, &sha1_only, push).await.0, 401);
    let again = github_call("push", "72d3162e-cc78-11e3-81ab-4c9367dc0958", push);
    assert_eq!(post(port.addr, &github, &again, push).await.0, 400);
    let relabelled = github_call("push", "a-new-delivery-id", push);
    assert_eq!(post(port.addr, &github, &relabelled, push).await.0, 400);

    // dbt Cloud: its documented example of a completed, successful run; the same event
    // once more is a replay; a started run and an errored one run nothing.
    let signed = |body: &str| vec![("authorization", sign(TOKEN.as_bytes(), body.as_bytes()))];
    let completed = dbt_completed();
    let (code, text) = post(port.addr, &dbt, &signed(&completed), &completed).await;
    assert_eq!(code, 202, "{text}");
    env.wait_runs("from-dbt", 1).await;
    assert_eq!(post(port.addr, &dbt, &signed(&completed), &completed).await.0, 400);
    let errored = completed.replace("\"Success\"", "\"Error\"").replace("FDD", "FDE");
    assert_eq!(post(port.addr, &dbt, &signed(&errored), &errored).await.0, 200);
    let started = completed.replace("job.run.completed", "job.run.started").replace("FDD", "FDF");
    assert_eq!(post(port.addr, &dbt, &signed(&started), &started).await.0, 200);
    // The documented example as it stands (sent in 2023) is refused: it could be a replay.
    let (code, text) = post(port.addr, &dbt, &signed(DBT_COMPLETED), DBT_COMPLETED).await;
    assert_eq!(code, 400, "{text}");
    // Signed with GitHub's scheme at dbt's path: not dbt's signature.
    let (code, _) = post(port.addr, &dbt, &github_call("push", "x-1", &completed), &completed).await;
    assert_eq!(code, 401);

    assert_eq!(settled_runs(&env, &["from-github", "from-dbt"]).await, [1, 1]);
    operator.stop().await;
}

#[tokio::test]
async fn calls_while_a_run_waits_join_it_and_a_trigger_without_its_secret_serves_nothing() {
    let env = Env::new("trg-merge").await;
    env.put_members(&ids(0..2)).await;
    env.put_secret("hook-token", "token", TOKEN).await;
    // No operator yet: requests wait, as they would behind a busy run slot.
    let port = port(&env).await;
    let operator = env.start().await;
    labelled_import(&env, "queued", "growth").await;
    operator.stop().await;
    let path = create_trigger(&env, "merge", "Generic", "growth", &[]).await;
    for i in 0..3 {
        let body = format!("{{\"call\":{i}}}");
        let (code, text) = post(port.addr, &path, &generic_headers(&body, Timestamp::now()), &body).await;
        assert_eq!(code, 202, "{text}");
        let expected = if i == 0 { "runs requested: 1 (and 0" } else { "runs requested: 0 (and 1" };
        assert!(text.contains(expected), "call {i}: {text}");
    }
    let operator = env.start().await;
    env.wait_runs("queued", 1).await;
    assert_eq!(settled_runs(&env, &["queued"]).await, [1], "three calls while waiting: one run");
    operator.stop().await;

    // A trigger whose Secret is missing says so and serves no path.
    let doc = json!({ "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortTrigger", "metadata": { "name": "orphan" },
        "spec": { "type": "Generic", "secretRef": { "name": "absent", "key": "token" }, "selector": {} } });
    triggers(&env).create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.unwrap();
    let orphan = wait_trigger(&env, "orphan", "SecretNotFound").await;
    let status = orphan.status.unwrap();
    assert!(status.webhook_path.is_none());
    assert!(status.conditions[0].message.contains("spec.secretRef"), "{}", status.conditions[0].message);
    // A short token is refused, naming how to make a good one.
    env.put_secret("short", "token", "tooshort").await;
    let doc = json!({ "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortTrigger", "metadata": { "name": "short" },
        "spec": { "type": "Generic", "secretRef": { "name": "short", "key": "token" }, "selector": {} } });
    triggers(&env).create(&PostParams::default(), &serde_json::from_value(doc).unwrap()).await.unwrap();
    let short = wait_trigger(&env, "short", "TokenTooShort").await;
    assert!(!short.status.unwrap().conditions[0].message.contains("tooshort"), "the token is never shown");
}

#[tokio::test]
async fn a_flood_of_calls_leaves_scheduled_runs_alone_and_runs_nothing() {
    let env = Env::new("trg-flood").await;
    env.put_members(&ids(0..2)).await;
    env.put_secret("hook-token", "token", TOKEN).await;
    let operator = env.start().await;
    let port = port(&env).await;
    env.create(env.import("daily", "daily", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    labelled_import(&env, "target", "growth").await;
    let path = create_trigger(&env, "flooded", "Generic", "growth", &[]).await;
    let due = env.wait_status("daily", "next run", |s| s.next_run_at.is_some()).await.status.unwrap();

    // 16 callers send forged, misdirected and oversized calls while the daily run comes due.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..16 {
        let (stop, path) = (stop.clone(), path.clone());
        let addr = port.addr;
        callers.push(tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::<u16, usize>::new();
            let big = "y".repeat(270 * 1024);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let forged = generic_headers("{}", Timestamp::now());
                let (target, body) = match (caller + i) % 3 {
                    0 => (path.clone(), "{\"forged\":true}".to_owned()),
                    1 => (format!("/hook/{i:064}"), "{}".to_owned()),
                    _ => (path.clone(), big.clone()),
                };
                *codes.entry(post(addr, &target, &forged, &body).await.0).or_default() += 1;
                i += 1;
            }
            codes
        }));
    }
    env.clock.set(due.next_run_at.unwrap());
    let ran = env.wait_runs("daily", 1).await.status.unwrap();
    // A new import's first scheduled run is recorded as its initial run.
    assert_eq!(ran.history[0].trigger, RunTrigger::Initial);
    assert_eq!(ran.history[0].started_at.strftime("%H:%M").to_string(), "06:30");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for caller in callers {
        for (code, n) in caller.await.unwrap() {
            *codes.entry(code).or_default() += n;
        }
    }
    assert!(codes.keys().all(|c| [400, 401, 404, 429, 503].contains(c)), "{codes:?}");
    assert!(codes.values().sum::<usize>() > 100, "the flood was a flood: {codes:?}");
    assert_eq!(settled_runs(&env, &["target"]).await, [0], "nothing of the flood ran: {codes:?}");
    // The genuine caller still gets through once the flood stops (its rate is its own).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = "{}";
    let (code, text) = post(port.addr, &path, &generic_headers(body, Timestamp::now()), body).await;
    assert_eq!(code, 202, "{text}");
    env.wait_runs("target", 1).await;
    operator.stop().await;
}

#[tokio::test]
async fn any_replica_takes_a_call_and_the_leader_runs_the_import_once() {
    let env = Env::new("trg-replicas").await;
    env.put_members(&ids(0..2)).await;
    env.put_secret("hook-token", "token", TOKEN).await;
    let leader = env.start_with(env.leader_config("replica-a"), None).await;
    wait_until("replica-a leads", || leader.is_leader()).await;
    let standby = env.start_with(env.leader_config("replica-b"), None).await;
    // Each replica serves the port.
    let (port_a, port_b) = (port(&env).await, port(&env).await);
    labelled_import(&env, "shared", "growth").await;
    let path = create_trigger(&env, "both", "Generic", "growth", &[]).await;
    // Both ports know the path once each has read the trigger (an unsigned call: 401).
    for addr in [port_a.addr, port_b.addr] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while post(addr, &path, &[], "").await.0 != 401 {
            assert!(tokio::time::Instant::now() < deadline, "port {addr} never served the trigger");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The same delivery sent to both replicas at once runs the import once: both ask with
    // a value naming the delivery (or one sees it remembered), and it is remembered once.
    let body = r#"{"dag":"nightly_cohorts"}"#;
    let headers = generic_headers(body, Timestamp::now());
    let (a, b) = tokio::join!(post(port_a.addr, &path, &headers, body), post(port_b.addr, &path, &headers, body));
    assert!([a.0, b.0].contains(&202) && [a.0, b.0].iter().all(|c| [202, 400].contains(c)), "{a:?} {b:?}");
    env.wait_runs("shared", 1).await;
    assert_eq!(settled_runs(&env, &["shared"]).await, [1]);
    let memory = triggers(&env).get("both").await.unwrap().status.unwrap().recent_deliveries;
    assert_eq!(memory.len(), 1, "{memory:?}");
    // Afterwards either replica refuses it.
    for addr in [port_a.addr, port_b.addr] {
        assert_eq!(post(addr, &path, &headers, body).await.0, 400);
    }
    assert_eq!(settled_runs(&env, &["shared"]).await, [1]);
    assert!(!standby.is_leader());
    // A standby stops when asked, without waiting for the Lease it never got.
    tokio::time::timeout(Duration::from_secs(10), standby.stop()).await.expect("the standby stops when asked");
    leader.stop().await;
}

#[tokio::test]
async fn a_caller_that_never_sends_its_headers_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let env = Env::new("trg-silent").await;
    let port = port(&env).await;
    // Silent connections (a slow-loris) do not stop others from calling…
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(port.addr).await.unwrap());
    }
    let wrong = format!("/hook/{}", "0".repeat(64));
    let deadline = tokio::time::Instant::now() + WAIT;
    while post(port.addr, &wrong, &[], "").await.0 != 404 {
        assert!(tokio::time::Instant::now() < deadline, "the port never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // …and are closed once the header timeout (10 s) has passed.
    for mut connection in silent {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(20), connection.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "a silent connection was kept open: {read:?}");
    }
}
