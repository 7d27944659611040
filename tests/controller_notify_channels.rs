//! Slack and webhook run reports from the controller, on a real kube-apiserver, to real
//! local receivers (testkit::webhook): the documented payloads, each channel's `on` filter
//! and recovery notice, and a channel that fails noted in an Event and the status without
//! its URL — the run's result untouched.

mod controller_support;

use std::sync::Arc;
use std::time::Duration;

use cohort_operator::api::RunResult;
use cohort_operator::net::egress::EgressPolicy;
use cohort_operator::notify::{HttpConfig, HttpSender, Notifier};
use controller_support::*;
use serde_json::json;
use testkit::webhook::{Answer, Receiver};

const TOKEN: &str = "Bearer hook-token-9c1e77";

#[tokio::test]
async fn a_failed_run_reaches_slack_and_the_webhook_and_a_failing_channel_is_noted() {
    let env = Env::new("ctl-hooks").await;
    let slack = Receiver::slack().await;
    let hook = Receiver::webhook().await;
    env.put_secret("slack-hook", "url", &slack.url()).await;
    env.put_secret("report-hook", "url", &hook.url()).await;
    env.put_secret("report-hook-token", "token", TOKEN).await;
    let http = HttpSender::new(HttpConfig {
        total_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(100),
        policy: EgressPolicy::shared_default(),
        ..HttpConfig::default()
    })
    .unwrap();
    let operator = env.start_with(env.config(), Some(Arc::new(Notifier::new(env.client.clone(), None, http)))).await;

    // No `members` ConfigMap yet: the first run fails.
    let mut doc = env.import("hooked", "hooked", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["notifications"] = json!({
        "slack": { "urlSecretRef": { "name": "slack-hook", "key": "url" } },
        "webhook": {
            "urlSecretRef": { "name": "report-hook", "key": "url" },
            "headers": [{ "name": "Authorization", "valueSecretRef": { "name": "report-hook-token", "key": "token" } }],
            "on": ["Failed"]
        }
    });
    env.create(doc).await;
    env.request_run("hooked", "1").await;
    let status = env.wait_runs("hooked", 1).await.status.unwrap();
    let failed = &status.history[0];
    assert_eq!(failed.result, RunResult::Failed);

    let message = slack.wait_for(1, WAIT).await[0].json();
    assert_eq!(
        message["text"].as_str().unwrap(),
        format!(":x: Failed: Cohort hooked ({}/hooked), run {}", env.ns, failed.id)
    );
    assert!(message["blocks"].to_string().contains("*Reason*"), "{message}");
    let received = &hook.wait_for(1, WAIT).await[0];
    assert_eq!(received.header("authorization"), Some(TOKEN));
    assert_eq!(received.header("content-type"), Some("application/cloudevents+json; charset=utf-8"));
    let event = received.json();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "dev.cohorts.run.finished");
    assert_eq!(event["id"], failed.id.as_str());
    assert_eq!(event["source"], format!("/apis/cohorts.dev/v1alpha1/namespaces/{}/cohortimports/hooked", env.ns));
    assert_eq!(event["time"], failed.finished_at.unwrap().to_string());
    assert_eq!(event["data"]["run"]["result"], "Failed");
    assert_eq!(event["data"]["run"]["reason"], failed.message.as_str());

    // The source appears: the run succeeds, and the webhook (on: [Failed]) hears of the
    // recovery.
    env.put_members(&ids(0..3)).await;
    env.request_run("hooked", "2").await;
    let status = env.wait_runs("hooked", 2).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    let message = slack.wait_for(2, WAIT).await[1].json();
    assert!(
        message["text"].as_str().unwrap().starts_with(":white_check_mark: Succeeded (recovered): Cohort hooked"),
        "{message}"
    );
    let recovery = hook.wait_for(2, WAIT).await[1].json();
    assert_eq!(
        (recovery["data"]["run"]["result"].as_str(), recovery["data"]["recovered"].as_bool()),
        (Some("Succeeded"), Some(true))
    );

    // Slack removes the webhook: the next report fails; the run does not.
    slack.respond_always(Answer::Status { status: 404, body: "no_service", retry_after: None });
    env.put_members(&ids(0..4)).await;
    env.request_run("hooked", "3").await;
    let status = env
        .wait_status("hooked", "noting the lost report", |s| {
            s.history.len() == 3 && s.last_notification_error.is_some()
        })
        .await
        .status
        .unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(ready_reason(&status), Some("Succeeded"));
    let note = status.last_notification_error.unwrap();
    assert!(note.contains("slack not sent") && note.contains("HTTP 404 (no_service)"), "{note}");
    let event = env.wait_event("hooked", "NotificationFailed").await;
    for text in [&note, &event] {
        assert!(!text.contains(&slack.token()) && !text.contains("hook-token"), "no secret: {text}");
    }
    assert_eq!(hook.received().len(), 2, "a plain success is not for a webhook on [Failed]");
    operator.stop().await;
}

/// A receiver a tenant names may be an in-cluster service: what it answers must never be
/// readable in the import's status or Events (no echo), only the status code.
#[tokio::test]
async fn a_receivers_body_is_never_in_status_or_events() {
    const MARKER: &str = "internal-service-answer-7Qm2";
    let env = Env::new("ctl-no-echo").await;
    let hook = Receiver::webhook().await;
    hook.respond_always(Answer::Status { status: 403, body: MARKER, retry_after: None });
    env.put_secret("report-hook", "url", &hook.url()).await;
    env.put_members(&ids(0..2)).await;
    let http = HttpSender::new(HttpConfig {
        total_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(100),
        policy: EgressPolicy::shared_default(),
        ..HttpConfig::default()
    })
    .unwrap();
    let operator = env.start_with(env.config(), Some(Arc::new(Notifier::new(env.client.clone(), None, http)))).await;
    let mut doc = env.import("echo", "echo", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["notifications"] = json!({ "webhook": { "urlSecretRef": { "name": "report-hook", "key": "url" } } });
    env.create(doc).await;
    env.request_run("echo", "1").await;
    let import = env
        .wait_status("echo", "noting the refused report", |s| {
            s.history.len() == 1 && s.last_notification_error.is_some()
        })
        .await;
    let note = import.status.as_ref().unwrap().last_notification_error.clone().unwrap();
    assert!(note.contains("HTTP 403"), "{note}");
    let event = env.wait_event("echo", "NotificationFailed").await;
    let status = serde_json::to_string(&import.status).unwrap();
    for text in [&note, &event, &status] {
        assert!(!text.contains(MARKER), "the receiver's answer was echoed: {text}");
    }
    assert_eq!(hook.received().len(), 1);
    operator.stop().await;
}
