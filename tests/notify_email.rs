//! Run report emails through a real SMTP server (aiosmtpd, started by testkit): what
//! arrives for each result, AUTH, STARTTLS and implicit TLS, and that a server that is down
//! or silent costs a bounded time and an error, never a panic.

use std::time::{Duration, Instant};

use cohort_operator::api::{EmailAddress, RunResult, RunTrigger};
use cohort_operator::notify::{NotifyError, RunNotice, SmtpConfig, SmtpNotifier, SmtpTls};
use cohort_operator::secret::SecretString;
use jiff::tz::TimeZone;
use testkit::smtp::{ReceivedMessage, ServerTls, SmtpServer, SmtpServerOptions};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "pa55-w0rd-never-shown";

fn notice(result: RunResult) -> RunNotice {
    RunNotice {
        namespace: "growth".into(),
        import_name: "power-users".into(),
        cohort_name: "Power users <30 days> & friends".into(),
        cohort_id: "power-users-30d".into(),
        run_id: "20260701-063000-a1b2".into(),
        result,
        trigger: RunTrigger::Scheduled,
        started_at: "2026-07-01T05:30:00Z".parse().unwrap(),
        finished_at: "2026-07-01T05:31:05Z".parse().unwrap(),
        time_zone: TimeZone::get("Europe/Lisbon").unwrap(),
        cohort_size: 1_234_567,
        added: 1_200,
        removed: 45,
        next_run_at: Some("2026-07-02T05:30:00Z".parse().unwrap()),
        reason: None,
        hint: None,
        recovered: false,
        changed: false,
        dry_run: false,
    }
}

fn config(server: &SmtpServer, tls: SmtpTls) -> SmtpConfig {
    let mut config = SmtpConfig::new(
        server.host(),
        server.port(),
        tls,
        "Cohort operator <cohorts@ops.example.com>".parse().unwrap(),
    );
    config.timeout = Duration::from_secs(5);
    config.retries = 1;
    config.retry_backoff = Duration::from_millis(50);
    config.ca_pem = server.ca_pem().map(|pem| pem.as_bytes().to_vec());
    config
}

fn to(addresses: &[&str]) -> Vec<EmailAddress> {
    addresses.iter().map(|a| EmailAddress((*a).to_owned())).collect()
}

/// What every report carries, whatever the result.
fn assert_common(message: &ReceivedMessage, recipients: &[&str]) {
    assert_eq!(message.envelope_from, "cohorts@ops.example.com");
    assert_eq!(message.envelope_to, recipients);
    assert_eq!(message.header("From"), Some("\"Cohort operator\" <cohorts@ops.example.com>"));
    assert_eq!(message.header("To"), Some(recipients.join(", ").as_str()));
    assert_eq!(message.header("Auto-Submitted"), Some("auto-generated"));
    assert_eq!(message.header("Message-ID"), Some("<run.20260701-063000-a1b2.power-users.growth@ops.example.com>"));
    assert_eq!(message.header("Date"), Some("Wed, 01 Jul 2026 05:31:05 +0000"));
    assert_eq!(message.content_type, "multipart/alternative");
    let types: Vec<&str> = message.parts.iter().map(|p| p.content_type.as_str()).collect();
    assert_eq!(types, ["text/plain", "text/html"]);

    let text = message.text_body().unwrap();
    let html = message.html_body().unwrap();
    for expected in [
        "Import:      growth/power-users",
        "Run:         20260701-063000-a1b2",
        "Trigger:     Scheduled",
        // 05:30 UTC in Lisbon's summer time.
        "Started:     Wed 1 Jul 2026 06:30:00 WEST (Europe/Lisbon)",
        "Finished:    Wed 1 Jul 2026 06:31:05 WEST (Europe/Lisbon)",
        "Duration:    1m 5s",
        "Cohort size: 1,234,567 members",
        "Added:       1,200",
        "Removed:     45",
        "Next run:    Thu 2 Jul 2026 06:30:00 WEST (Europe/Lisbon)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert!(text.contains("Power users <30 days> & friends (id power-users-30d)"), "{text}");
    assert!(html.contains("Power users &lt;30 days&gt; &amp; friends (id power-users-30d)"), "{html}");
    assert!(!html.contains("<30 days>"));
    assert!(html.contains("Wed 1 Jul 2026 06:30:00 WEST (Europe/Lisbon)"));
    assert!(html.contains("1,234,567 members"));
    assert!(!String::from_utf8_lossy(&message.raw).contains(PASSWORD));
}

#[tokio::test]
async fn each_result_arrives_with_recipients_headers_and_content() {
    let server = SmtpServer::start();
    let notifier = SmtpNotifier::new(config(&server, SmtpTls::None)).unwrap();

    let success = notice(RunResult::Succeeded);
    let failure = RunNotice {
        reason: Some("source query failed: relation \"users\" does not exist".into()),
        next_run_at: Some("2026-07-02T05:30:00Z".parse().unwrap()),
        ..notice(RunResult::Failed)
    };
    let block = RunNotice {
        reason: Some("would remove 45 of 60 members (75%), over the 20% limit".into()),
        ..notice(RunResult::Blocked)
    };
    let recovery = RunNotice { recovered: true, ..notice(RunResult::Succeeded) };

    let one = ["team@example.com"];
    let two = ["team@example.com", "oncall@example.org"];
    notifier.send_report(&success, &to(&one)).await.unwrap();
    notifier.send_report(&failure, &to(&two)).await.unwrap();
    notifier.send_report(&block, &to(&one)).await.unwrap();
    notifier.send_report(&recovery, &to(&two)).await.unwrap();

    let messages = server.wait_for_messages_async(4, WAIT).await;
    assert_eq!(messages.len(), 4);

    let m = &messages[0];
    assert_common(m, &one);
    assert_eq!(m.subject().unwrap(), "[cohort-operator] Power users <30 days> & friends: Succeeded");
    let text = m.text_body().unwrap();
    assert!(text.starts_with("The import of cohort \u{201c}Power users <30 days> & friends\u{201d} succeeded."));
    assert!(!text.contains("Reason:") && !text.contains("What to do:"));

    let m = &messages[1];
    assert_common(m, &two);
    assert_eq!(m.subject().unwrap(), "[cohort-operator] Power users <30 days> & friends: Failed");
    let text = m.text_body().unwrap();
    assert!(text.contains("Reason:      source query failed: relation \"users\" does not exist"), "{text}");
    assert!(text.contains("What to do:  See the events with kubectl describe cohortimport power-users -n growth"));
    assert!(m.html_body().unwrap().contains("relation &quot;users&quot; does not exist"));

    let m = &messages[2];
    assert_common(m, &one);
    assert_eq!(m.subject().unwrap(), "[cohort-operator] Power users <30 days> & friends: Blocked");
    let text = m.text_body().unwrap();
    assert!(text.contains("Reason:      would remove 45 of 60 members (75%), over the 20% limit"));
    assert!(text.contains(
        "kubectl annotate cohortimport power-users -n growth cohorts.dev/approve-removals=20260701-063000-a1b2 --overwrite"
    ));

    let m = &messages[3];
    assert_common(m, &two);
    assert_eq!(m.subject().unwrap(), "[cohort-operator] Power users <30 days> & friends: Succeeded (recovered)");
    assert!(m.text_body().unwrap().contains("back to normal"));
}

/// A server that requires AUTH as `operator` with [`PASSWORD`].
fn server_with_auth(tls: ServerTls) -> SmtpServer {
    SmtpServer::start_with(SmtpServerOptions { tls, credentials: Some(("operator".into(), PASSWORD.into())) })
}

/// Sends the report of a `result` run with the right password; the first message that
/// arrives came from the authenticated user.
async fn send_authenticated(server: &SmtpServer, tls: SmtpTls, result: RunResult) -> ReceivedMessage {
    let mut c = config(server, tls);
    c.credentials = Some(("operator".into(), SecretString::new(PASSWORD)));
    SmtpNotifier::new(c).unwrap().send_report(&notice(result), &to(&["team@example.com"])).await.unwrap();
    let message = server.wait_for_messages_async(1, WAIT).await.remove(0);
    assert_eq!(message.auth_login.as_deref(), Some("operator"));
    assert_common(&message, &["team@example.com"]);
    message
}

#[tokio::test]
async fn authenticates_without_ever_showing_the_password() {
    let server = server_with_auth(ServerTls::None);
    send_authenticated(&server, SmtpTls::None, RunResult::Succeeded).await;

    // A wrong password is a permanent refusal: one attempt, and the error names the server,
    // not the password.
    let wrong = "wrong-".to_owned() + PASSWORD;
    let mut bad = config(&server, SmtpTls::None);
    bad.credentials = Some(("operator".into(), SecretString::new(wrong.clone())));
    bad.retries = 3;
    let notifier = SmtpNotifier::new(bad).unwrap();
    let err = notifier.send_report(&notice(RunResult::Failed), &to(&["team@example.com"])).await.unwrap_err();
    match &err {
        NotifyError::Send { host, port, attempts, last_error } => {
            assert_eq!((host.as_str(), *port, *attempts), ("127.0.0.1", server.port(), 1));
            assert!(last_error.contains("535"), "{last_error}");
        }
        other => panic!("expected a send error, got {other:?}"),
    }
    for shown in [err.to_string(), format!("{err:?}"), err.status_note(), format!("{notifier:?}")] {
        assert!(!shown.contains(PASSWORD), "{shown}");
    }
    assert_eq!(server.messages().len(), 1, "the refused message must not arrive");
}

async fn send_over_tls(server_tls: ServerTls, client_tls: SmtpTls) {
    let server = server_with_auth(server_tls);
    let message = send_authenticated(&server, client_tls, RunResult::Blocked).await;
    assert!(message.tls, "the message must arrive over TLS");

    // Without the private CA the server's certificate is not trusted, and nothing is sent.
    let mut untrusted = config(&server, client_tls);
    untrusted.ca_pem = None;
    untrusted.retries = 0;
    let err = SmtpNotifier::new(untrusted)
        .unwrap()
        .send_report(&notice(RunResult::Blocked), &to(&["team@example.com"]))
        .await
        .unwrap_err();
    assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn starttls_with_a_private_ca() {
    send_over_tls(ServerTls::StartTls, SmtpTls::StartTls).await;
}

#[tokio::test]
async fn implicit_tls_with_a_private_ca() {
    send_over_tls(ServerTls::Implicit, SmtpTls::Implicit).await;
}

#[tokio::test]
async fn server_down_gives_an_error_after_bounded_retries() {
    let mut server = SmtpServer::start();
    server.stop();
    let mut c = config(&server, SmtpTls::None);
    c.retries = 2;
    c.timeout = Duration::from_secs(2);
    let bound = c.max_send_time();
    let notifier = SmtpNotifier::new(c).unwrap();

    let started = Instant::now();
    let err = notifier.send_report(&notice(RunResult::Succeeded), &to(&["team@example.com"])).await.unwrap_err();
    assert!(started.elapsed() <= bound, "took {:?}, bound {bound:?}", started.elapsed());
    match &err {
        NotifyError::Send { port, attempts, last_error, .. } => {
            assert_eq!((*port, *attempts), (server.port(), 3));
            assert!(last_error.contains("refused"), "{last_error}");
        }
        other => panic!("expected a send error, got {other:?}"),
    }
    assert!(err.to_string().contains(&format!("127.0.0.1:{}", server.port())));
    assert!(err.status_note().starts_with("run report email not sent:"));
}

#[tokio::test]
async fn silent_server_costs_at_most_the_timeouts() {
    // Accepts connections (the kernel's backlog) but never greets.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut c = SmtpConfig::new("127.0.0.1", port, SmtpTls::None, "cohorts@ops.example.com".parse().unwrap());
    c.timeout = Duration::from_millis(500);
    c.retries = 1;
    c.retry_backoff = Duration::from_millis(50);
    let bound = c.max_send_time();
    let notifier = SmtpNotifier::new(c).unwrap();

    let started = Instant::now();
    let err = notifier.send_report(&notice(RunResult::Failed), &to(&["team@example.com"])).await.unwrap_err();
    let took = started.elapsed();
    assert!(took <= bound + Duration::from_millis(500), "took {took:?}, bound {bound:?}");
    assert!(matches!(err, NotifyError::Send { attempts: 2, .. }), "{err:?}");
    drop(silent);
}
