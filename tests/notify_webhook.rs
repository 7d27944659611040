//! Slack, webhook and PagerDuty run reports against real local HTTP receivers
//! (testkit::webhook, testkit::pagerduty): the
//! documented payloads, retries on 429/5xx/connection errors within a time bound, no retry
//! of other answers, no redirects, the destination policy, and no secret in any error.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_operator::api::{RunResult, RunTrigger};
use cohort_operator::net::egress::{DenyFlag, EgressPolicy, EgressRule};
use cohort_operator::notify::http::Delivery;
use cohort_operator::notify::payload::{CLOUDEVENTS_CONTENT_TYPE, cloud_event, pagerduty_event, slack_message};
use cohort_operator::notify::{Channel, HttpConfig, HttpSender, NotifyError, RunNotice};
use cohort_operator::secret::SecretString;
use jiff::tz::TimeZone;
use reqwest::header::HeaderName;
use testkit::webhook::{Answer, Receiver};

const WAIT: Duration = Duration::from_secs(10);
const HEADER_SECRET: &str = "Bearer hdr-secret-6d1f2a";

fn notice(result: RunResult) -> RunNotice {
    RunNotice {
        namespace: "growth".into(),
        import_name: "churn-risk".into(),
        cohort_name: "Churn risk".into(),
        cohort_id: "churn-risk".into(),
        run_id: "20261128-063000-c3d4".into(),
        result,
        trigger: RunTrigger::Scheduled,
        started_at: "2026-11-28T06:30:00Z".parse().unwrap(),
        finished_at: "2026-11-28T06:30:09Z".parse().unwrap(),
        time_zone: TimeZone::get("Europe/Lisbon").unwrap(),
        cohort_size: 1200,
        added: 30,
        removed: 4,
        next_run_at: Some("2026-11-29T06:30:00Z".parse().unwrap()),
        reason: (result == RunResult::Failed).then(|| "source: ConfigMap growth/members not found".into()),
        hint: None,
        recovered: false,
        changed: false,
        dry_run: false,
    }
}

/// Fast retries and a short bound, so failures show within seconds.
fn config() -> HttpConfig {
    HttpConfig {
        connect_timeout: Duration::from_secs(2),
        attempt_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(6),
        retries: 3,
        retry_backoff: Duration::from_millis(100),
        policy: EgressPolicy::shared_default(),
    }
}

fn slack_delivery<'a>(url: &'a SecretString, n: &RunNotice) -> Delivery<'a> {
    Delivery {
        channel: Channel::Slack,
        url,
        origin: "Secret growth/hooks key slack",
        headers: &[],
        body_secrets: &[],
        content_type: "application/json",
        body: serde_json::to_vec(&slack_message(n)).unwrap(),
    }
}

fn webhook_delivery<'a>(
    url: &'a SecretString,
    headers: &'a [(HeaderName, SecretString)],
    n: &RunNotice,
) -> Delivery<'a> {
    Delivery {
        channel: Channel::Webhook,
        url,
        origin: "Secret growth/hooks key url",
        headers,
        body_secrets: &[],
        content_type: CLOUDEVENTS_CONTENT_TYPE,
        body: serde_json::to_vec(&cloud_event(n)).unwrap(),
    }
}

fn auth_header() -> Vec<(HeaderName, SecretString)> {
    vec![(HeaderName::from_static("authorization"), SecretString::new(HEADER_SECRET))]
}

/// No trace of the URL's secret path or a header value in the error, its Debug, or its
/// status note.
fn assert_no_secret(err: &NotifyError, receiver: &Receiver) {
    for text in [err.to_string(), format!("{err:?}"), err.status_note()] {
        assert!(!text.contains(&receiver.token()), "URL token in {text}");
        assert!(!text.contains("hdr-secret"), "header value in {text}");
    }
}

#[tokio::test]
async fn every_result_is_a_slack_message_slack_accepts() {
    let slack = Receiver::slack().await;
    let sender = HttpSender::new(config()).unwrap();
    let url = SecretString::new(slack.url());
    for result in [RunResult::Succeeded, RunResult::Failed, RunResult::Blocked, RunResult::DryRun, RunResult::Missed] {
        sender.post(&slack_delivery(&url, &notice(result))).await.unwrap_or_else(|e| panic!("{result:?}: {e}"));
    }
    let received = slack.wait_for(5, WAIT).await;
    let failed = received[1].json();
    let text = failed["text"].as_str().unwrap();
    assert_eq!(text, ":x: Failed: Churn risk (growth/churn-risk), run 20261128-063000-c3d4");
    let all = failed.to_string();
    for expected in [
        "*Members*\\n1,200",
        "*Added*\\n30",
        "*Removed*\\n4",
        "*Reason*\\nsource: ConfigMap growth/members not found",
        "*Next run*\\nSun 29 Nov 2026 06:30:00 WET (Europe/Lisbon)",
    ] {
        assert!(all.contains(expected), "{expected} missing from {all}");
    }
    assert_eq!(received[0].header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn the_webhook_gets_a_structured_cloudevent_with_its_secret_headers() {
    let hook = Receiver::webhook().await;
    let sender = HttpSender::new(config()).unwrap();
    let url = SecretString::new(hook.url());
    let headers = auth_header();
    sender.post(&webhook_delivery(&url, &headers, &notice(RunResult::Failed))).await.unwrap();
    let got = &hook.wait_for(1, WAIT).await[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.header("content-type"), Some("application/cloudevents+json; charset=utf-8"));
    assert_eq!(got.header("authorization"), Some(HEADER_SECRET));
    let event = got.json();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "dev.cohorts.run.finished");
    assert_eq!(event["source"], "/apis/cohorts.dev/v1alpha1/namespaces/growth/cohortimports/churn-risk");
    assert_eq!(event["id"], "20261128-063000-c3d4");
    assert_eq!(event["time"], "2026-11-28T06:30:09Z");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"]["run"]["result"], "Failed");
    assert_eq!(event["data"]["run"]["reason"], "source: ConfigMap growth/members not found");
    assert_eq!(event["data"]["cohort"]["id"], "churn-risk");
}

#[tokio::test]
async fn rate_limits_and_outages_are_retried_with_the_same_event() {
    let hook = Receiver::webhook().await;
    hook.respond_next([
        Answer::Status { status: 429, body: "slow down", retry_after: Some(1) },
        Answer::Status { status: 503, body: "maintenance", retry_after: None },
    ]);
    let sender = HttpSender::new(config()).unwrap();
    let url = SecretString::new(hook.url());
    let started = Instant::now();
    sender.post(&webhook_delivery(&url, &[], &notice(RunResult::Succeeded))).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was honoured");
    let received = hook.wait_for(3, WAIT).await;
    assert_eq!(received.len(), 3);
    let ids: Vec<_> = received.iter().map(|r| r.json()["id"].clone()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one event, delivered again: {ids:?}");
}

#[tokio::test]
async fn an_outage_gives_up_within_the_time_bound_and_says_why() {
    let hook = Receiver::webhook().await;
    hook.respond_always(Answer::Status { status: 500, body: "internal error", retry_after: None });
    let sender = HttpSender::new(HttpConfig { retries: 50, ..config() }).unwrap();
    let url = SecretString::new(hook.url());
    let headers = auth_header();
    let started = Instant::now();
    let err = sender.post(&webhook_delivery(&url, &headers, &notice(RunResult::Failed))).await.unwrap_err();
    assert!(started.elapsed() <= Duration::from_secs(7), "bounded: {:?}", started.elapsed());
    let NotifyError::Post { channel, host, attempts, last_error } = &err else { panic!("{err:?}") };
    assert_eq!((*channel, host.as_str()), (Channel::Webhook, "127.0.0.1"));
    assert!(*attempts >= 3 && (*attempts as usize) == hook.received().len(), "{attempts}");
    // The receiver's own words are never quoted: only the status (no echo).
    assert!(last_error.starts_with("HTTP 500;"), "{last_error}");
    assert!(!err.to_string().contains("internal error"), "{err}");
    assert_no_secret(&err, &hook);
}

#[tokio::test]
async fn a_receiver_that_hangs_is_cut_off_by_the_attempt_timeout() {
    let hook = Receiver::webhook().await;
    hook.respond_always(Answer::Hang(Duration::from_secs(30)));
    let sender = HttpSender::new(HttpConfig {
        attempt_timeout: Duration::from_millis(500),
        total_timeout: Duration::from_secs(2),
        ..config()
    })
    .unwrap();
    let url = SecretString::new(hook.url());
    let started = Instant::now();
    let err = sender.post(&webhook_delivery(&url, &[], &notice(RunResult::Failed))).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert!(err.to_string().contains("no answer in time"), "{err}");
    assert_no_secret(&err, &hook);
}

#[tokio::test]
async fn a_refusal_is_not_retried_and_names_slacks_answer() {
    let slack = Receiver::slack().await;
    let sender = HttpSender::new(config()).unwrap();
    // A webhook Slack removed: the URL's token is no longer known.
    let url = SecretString::new(slack.url().replace(&slack.token(), "xoxtokenrevoked00000000"));
    let err = sender.post(&slack_delivery(&url, &notice(RunResult::Failed))).await.unwrap_err();
    assert_eq!(slack.received().len(), 1, "a 404 is not retried");
    // Slack's documented code is named; nothing else of an answer is quoted.
    assert!(err.to_string().contains("failed after 1 attempt(s): HTTP 404 (no_service)"), "{err}");
    assert!(!err.to_string().contains("xoxtokenrevoked"), "{err}");
}

#[tokio::test]
async fn a_closed_port_is_retried_then_reported_without_the_url() {
    let hook = Receiver::webhook().await;
    let url = SecretString::new(hook.url());
    let token = hook.token();
    drop(hook);
    let sender = HttpSender::new(HttpConfig { total_timeout: Duration::from_secs(3), ..config() }).unwrap();
    let err = sender.post(&webhook_delivery(&url, &auth_header(), &notice(RunResult::Failed))).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("could not connect or send"), "{text}");
    assert!(matches!(err, NotifyError::Post { attempts, .. } if attempts > 1), "{err:?}");
    assert!(!text.contains(&token) && !format!("{err:?}").contains(&token), "{text}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = Receiver::webhook().await;
    let hook = Receiver::webhook().await;
    hook.respond_always(Answer::Redirect { status: 307, location: elsewhere.url() });
    let sender = HttpSender::new(config()).unwrap();
    let url = SecretString::new(hook.url());
    let err = sender.post(&webhook_delivery(&url, &[], &notice(RunResult::Failed))).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 307"), "{err}");
    assert!(elsewhere.received().is_empty(), "the report went nowhere else");
}

#[tokio::test]
async fn denied_destinations_are_refused_before_connecting() {
    // 127.0.0.2 stands in for a metadata address: the operator's deny list names it.
    let hook = Receiver::webhook_on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await;
    let policy = Arc::new(EgressPolicy::default().with_deny(FLAG, [rule("127.0.0.2/32")]));
    let sender = HttpSender::new(HttpConfig { policy, ..config() }).unwrap();
    let url = SecretString::new(hook.url());
    let err = sender.post(&webhook_delivery(&url, &[], &notice(RunResult::Failed))).await.unwrap_err();
    assert!(matches!(err, NotifyError::DeniedDestination { .. }), "{err:?}");
    assert!(
        err.to_string().contains(
            "report to 127.0.0.2: destination 127.0.0.2 refused by the operator's egress policy: it matches \
             --notification-deny-cidr 127.0.0.2; remove that rule"
        ),
        "{err}"
    );
    assert_no_secret(&err, &hook);

    // A name is judged by the addresses it resolves to.
    let policy = Arc::new(EgressPolicy::default().with_deny(FLAG, [rule("127.0.0.0/8"), rule("::1/128")]));
    let sender = HttpSender::new(HttpConfig { policy, ..config() }).unwrap();
    let by_name = SecretString::new(hook.url().replace("127.0.0.2", "localhost"));
    let err = sender.post(&webhook_delivery(&by_name, &[], &notice(RunResult::Failed))).await.unwrap_err();
    assert!(matches!(&err, NotifyError::DeniedDestination { host, .. } if host == "localhost"), "{err:?}");
    assert!(err.to_string().contains("destination localhost (address "), "{err}");
    assert!(hook.received().is_empty());
}

const FLAG: DenyFlag = DenyFlag::NotificationDenyCidr;

fn rule(text: &str) -> EgressRule {
    text.parse().unwrap()
}

#[tokio::test]
async fn plain_http_is_only_for_loopback_and_bad_urls_are_named_by_their_secret() {
    let sender = HttpSender::new(config()).unwrap();
    let url = SecretString::new("http://hooks.example.invalid/services/T1/B1/xoxtokenplain0000");
    let err = sender.post(&slack_delivery(&url, &notice(RunResult::Failed))).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the slack URL in Secret growth/hooks key slack uses http:// for host hooks.example.invalid; use https:// \
         (http:// is accepted only for loopback hosts)"
    );
    let url = SecretString::new("hooks.slack.com/services/T1/B1/xoxtokennoscheme00");
    let err = sender.post(&slack_delivery(&url, &notice(RunResult::Failed))).await.unwrap_err();
    assert!(err.to_string().starts_with("the slack URL in Secret growth/hooks key slack is not usable"), "{err}");
    assert!(!err.to_string().contains("xoxtoken"), "{err}");
    let hook = Receiver::webhook().await;
    let url = SecretString::new(hook.url());
    let bad = vec![(HeaderName::from_static("authorization"), SecretString::new("two\nlines"))];
    let err = sender.post(&webhook_delivery(&url, &bad, &notice(RunResult::Failed))).await.unwrap_err();
    assert!(matches!(err, NotifyError::InvalidHeader { .. }), "{err:?}");
    assert!(!err.to_string().contains("two"), "{err}");
}

/// A PagerDuty integration key: 32 characters.
const ROUTING_KEY: &str = "R0a1b2c3d4e5f60718293a4b5c6d7e8f";

fn pagerduty_delivery<'a>(url: &'a SecretString, key: &'a [SecretString], n: &RunNotice) -> Delivery<'a> {
    Delivery {
        channel: Channel::PagerDuty,
        url,
        origin: "--pagerduty-events-url",
        headers: &[],
        body_secrets: key,
        content_type: "application/json",
        body: serde_json::to_vec(&pagerduty_event(n, key[0].expose())).unwrap(),
    }
}

#[tokio::test]
async fn pagerduty_accepts_the_trigger_and_the_resolve_as_documented() {
    let pagerduty = testkit::pagerduty::PagerDuty::start().await;
    let key = [SecretString::new(pagerduty.integration())];
    let url = SecretString::new(pagerduty.url());
    let sender = HttpSender::new(config()).unwrap();
    sender.post(&pagerduty_delivery(&url, &key, &notice(RunResult::Failed))).await.unwrap();
    sender.post(&pagerduty_delivery(&url, &key, &notice(RunResult::Succeeded))).await.unwrap();
    assert_eq!(pagerduty.answered(), [202, 202], "valid events, as PagerDuty documents them");
    let alerts = pagerduty.alerts(key[0].expose());
    assert_eq!(alerts.len(), 1);
    assert!(alerts[0].resolved && alerts[0].triggers == 1, "{alerts:?}");
    assert_eq!(alerts[0].dedup_key, "cohorts.dev/growth/churn-risk");
}

#[tokio::test]
async fn a_pagerduty_answer_is_not_quoted_so_the_routing_key_never_shows() {
    let hook = Receiver::webhook().await;
    hook.respond_always(Answer::Status {
        status: 400,
        body: "invalid event: routing_key R0a1b2c3d4e5f60718293a4b5c6d7e8f is unknown",
        retry_after: None,
    });
    let url = SecretString::new(hook.url());
    let key = [SecretString::new(ROUTING_KEY.to_owned())];
    let err = HttpSender::new(config())
        .unwrap()
        .post(&pagerduty_delivery(&url, &key, &notice(RunResult::Failed)))
        .await
        .unwrap_err();
    assert_eq!(hook.received().len(), 1, "a 400 is not retried");
    let text = err.to_string();
    // No echo: the status only, never what the receiver said (which quoted the key).
    assert!(text.contains("pagerduty") && text.ends_with("HTTP 400"), "{text}");
    assert!(!text.contains("invalid event"), "{text}");
    assert!(!text.contains(ROUTING_KEY), "{text}");
    assert_no_secret(&err, &hook);
}
