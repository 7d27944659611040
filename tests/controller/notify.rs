//! Run report emails from the controller (issue 7), on a real kube-apiserver with a real
//! SMTP server: a report after a run; a failure to send is an Event and a status note and
//! never the run's result.

use std::sync::Arc;
use std::time::Duration;

use crate::controller_support::*;
use cohort_operator::api::RunResult;
use cohort_operator::notify::{HttpConfig, HttpSender, Notifier, SmtpConfig, SmtpNotifier, SmtpTls};
use serde_json::json;
use testkit::smtp::SmtpServer;

#[tokio::test]
async fn each_finished_run_is_reported_and_a_failed_email_is_noted() {
    let env = Env::new("ctl-notify").await;
    env.put_members(&ids(0..3)).await;
    let mut server = SmtpServer::start();
    let mut smtp =
        SmtpConfig::new("127.0.0.1", server.port(), SmtpTls::None, "cohorts@ops.example.com".parse().unwrap());
    smtp.retries = 0;
    smtp.timeout = Duration::from_secs(5);
    let http = HttpSender::new(HttpConfig::default()).unwrap();
    let notifier = Arc::new(Notifier::new(env.client.clone(), Some(SmtpNotifier::new(smtp).unwrap()), http));
    let operator = env.start_with(env.config(), Some(notifier)).await;

    let mut doc = env.import("mailed", "mailed", json!({ "cadence": "Daily", "at": "06:30" }));
    doc["spec"]["notifications"] = json!({ "email": { "to": ["team@example.com"] } });
    env.create(doc).await;
    env.request_run("mailed", "1").await;
    let status = env.wait_runs("mailed", 1).await.status.unwrap();
    let run = &status.history[0];
    let messages = server.wait_for_messages_async(1, WAIT).await;
    let subject = messages[0].subject().unwrap_or_default();
    assert!(subject.contains("Cohort mailed"), "{subject}");
    let body = messages[0].text_body().unwrap_or_default();
    assert!(body.contains(&run.id), "the report names the run: {body}");
    assert!(status.last_notification_error.is_none());

    // The SMTP server goes away: the run still succeeds; the failure is noted.
    server.stop();
    env.put_members(&ids(0..4)).await;
    env.request_run("mailed", "2").await;
    let status = env
        .wait_status("mailed", "noting the failed email", |s| {
            s.history.len() == 2 && s.last_notification_error.is_some()
        })
        .await
        .status
        .unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(ready_reason(&status), Some("Succeeded"));
    let note = status.last_notification_error.unwrap();
    assert!(note.contains(&status.history[0].id), "{note}");
    env.wait_event("mailed", "NotificationFailed").await;
    operator.stop().await;
}

#[tokio::test]
async fn an_import_asking_for_email_without_smtp_configured_is_told_so() {
    let env = Env::new("ctl-nosmtp").await;
    env.put_members(&ids(0..2)).await;
    let operator = env.start().await;
    let mut doc = env.import("unmailed", "unmailed", json!({ "cadence": "Once" }));
    doc["spec"]["notifications"] = json!({ "email": { "to": ["team@example.com"] } });
    env.create(doc).await;
    let status = env
        .wait_status("unmailed", "noting the missing SMTP server", |s| s.last_notification_error.is_some())
        .await
        .status
        .unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert!(status.last_notification_error.unwrap().contains("--smtp-host"));
    operator.stop().await;
}
