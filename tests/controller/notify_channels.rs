//! Slack and webhook run reports from the controller, on a real kube-apiserver, to real
//! local receivers (testkit::webhook): the documented payloads, each channel's `on` filter
//! and recovery notice, and a channel that fails noted in an Event and the status without
//! its URL — the run's result untouched.

use std::sync::Arc;
use std::time::Duration;

use crate::controller_support::*;
use cohort_operator::api::RunResult;
use cohort_operator::net::egress::EgressPolicy;
use cohort_operator::notify::{HttpConfig, HttpSender, Notifier};
use serde_json::json;
use testkit::pagerduty::{Alert, PagerDuty};
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

#[tokio::test]
async fn fail_fail_succeed_pages_once_resolves_once_and_a_changed_slack_hears_twice() {
    let env = Env::new("ctl-changed").await;
    let slack = Receiver::slack().await;
    let hook = Receiver::webhook().await;
    let pagerduty = PagerDuty::start().await;
    let routing_key = pagerduty.integration();
    env.put_secret("slack-hook", "url", &slack.url()).await;
    env.put_secret("report-hook", "url", &hook.url()).await;
    // Stored with a trailing newline, as `kubectl create secret --from-file` often does.
    env.put_secret("pagerduty", "routing-key", &format!("{routing_key}\n")).await;
    let http = HttpSender::new(HttpConfig {
        total_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(100),
        policy: EgressPolicy::shared_default(),
        ..HttpConfig::default()
    })
    .unwrap();
    let notifier = Notifier::new(env.client.clone(), None, http).with_pagerduty_url(&pagerduty.url());
    let operator = env.start_with(env.config(), Some(Arc::new(notifier))).await;

    // No `members` ConfigMap yet: runs fail (and are not retried: a missing ConfigMap does
    // not pass on its own). The webhook hears every run, Slack only the changes.
    let mut doc = env.import("flappy", "flappy", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["notifications"] = json!({
        "slack": { "urlSecretRef": { "name": "slack-hook", "key": "url" }, "when": "Changed" },
        "webhook": { "urlSecretRef": { "name": "report-hook", "key": "url" } },
        "pagerduty": { "routingKeySecretRef": { "name": "pagerduty", "key": "routing-key" } }
    });
    env.create(doc).await;
    let mut runs = Vec::new();
    for (n, expected) in [(1, RunResult::Failed), (2, RunResult::Failed), (3, RunResult::Succeeded)] {
        if n == 3 {
            env.put_members(&ids(0..3)).await;
        }
        env.request_run("flappy", &n.to_string()).await;
        let status = env.wait_runs("flappy", n).await.status.unwrap();
        assert_eq!(status.history[0].result, expected, "{}", status.history[0].message);
        runs.push(status.history[0].id.clone());
        // Each run's report is out (the webhook hears every run) before the next starts.
        let event = hook.wait_for(n, WAIT).await[n - 1].json();
        assert_eq!(event["id"], runs[n - 1].as_str());
    }
    let messages: Vec<String> =
        slack.wait_for(2, WAIT).await.iter().map(|m| m.json()["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].starts_with(":x: Failed") && messages[0].ends_with(&runs[0]), "{messages:?}");
    assert!(messages[1].starts_with(":white_check_mark: Succeeded (recovered)"), "{messages:?}");
    assert!(messages[1].contains(&runs[2]), "{messages:?}");
    assert_eq!(slack.received().len(), 2, "the second failure is no news");

    // PagerDuty (`when: Changed` by default): one trigger, one resolve, one alert opened and
    // resolved, under the import's dedup key; every request answered 202.
    let events = pagerduty.wait_for(2, WAIT).await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["trigger", "resolve"]);
    let dedup_key = format!("cohorts.dev/{}/flappy", env.ns);
    assert!(events.iter().all(|e| e.dedup_key == dedup_key && e.routing_key == routing_key), "{events:?}");
    let trigger = &events[0].body;
    assert_eq!(trigger["payload"]["severity"], "error");
    assert_eq!(trigger["payload"]["custom_details"]["run"]["id"], runs[0].as_str());
    assert_eq!(pagerduty.alerts(&routing_key), [Alert { dedup_key, triggers: 1, resolved: true }]);
    assert_eq!(pagerduty.answered(), [202, 202]);
    let status = env.get("flappy").await.status.unwrap();
    assert!(status.last_notification_error.is_none(), "{:?}", status.last_notification_error);
    operator.stop().await;
}
