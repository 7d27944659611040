//! The run report: subject, plain-text and HTML bodies, and the MIME message. Pure.

use std::time::SystemTime;

use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use lettre::Message;
use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};

use super::error::NotifyError;
use super::notice::RunNotice;
use crate::api::{APPROVE_REMOVALS_ANNOTATION, EmailAddress, RUN_REQUESTED_ANNOTATION, RunResult, RunTrigger};

/// Prefix of every subject, so mail filters can sort reports.
pub const SUBJECT_PREFIX: &str = "[cohort-operator]";

/// What a report says, before it becomes a MIME message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedReport {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Subject and both bodies of the report on `notice`.
pub fn render(notice: &RunNotice) -> RenderedReport {
    let subject = format!("{SUBJECT_PREFIX} {}: {}", one_line(&notice.cohort_name), result_label(notice));
    let headline = headline(notice);
    let fields = fields(notice);
    let footer = format!("Sent by cohort-operator for CohortImport {}/{}.", notice.namespace, notice.import_name);

    let width = fields.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 1;
    let mut text = format!("{headline}\n\n");
    for (label, value) in &fields {
        text.push_str(&format!("{:<width$} {value}\n", format!("{label}:")));
    }
    text.push_str(&format!("\n-- \n{footer}\n"));

    let mut rows = String::new();
    for (label, value) in &fields {
        rows.push_str(&format!(
            "<tr><th align=\"left\" valign=\"top\" style=\"padding:2px 12px 2px 0\">{}</th>\
             <td style=\"padding:2px 0\">{}</td></tr>\n",
            escape_html(label),
            escape_html(value)
        ));
    }
    let html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n\
         <body style=\"font-family:sans-serif\">\n<p>{}</p>\n<table>\n{rows}</table>\n\
         <p style=\"color:#666\">{}</p>\n</body></html>\n",
        escape_html(&subject),
        escape_html(&headline),
        escape_html(&footer)
    );
    RenderedReport { subject, text, html }
}

/// The report as a `multipart/alternative` email from `from` to every address in `to`.
///
/// `Date` is the run's end, and `Message-ID` is derived from the run, so a retried send is
/// the same message to the receiving side.
pub fn compose(notice: &RunNotice, from: &Mailbox, to: &[EmailAddress]) -> Result<Message, NotifyError> {
    if to.is_empty() {
        return Err(NotifyError::NoRecipients);
    }
    let report = render(notice);
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(report.subject)
        .date(SystemTime::from(notice.finished_at))
        .message_id(Some(format!(
            "<run.{}.{}.{}@{}>",
            id_part(&notice.run_id),
            id_part(&notice.import_name),
            id_part(&notice.namespace),
            from.email.domain()
        )))
        // RFC 3834: machine-sent, so vacation responders stay quiet.
        .header(AutoSubmitted);
    for (index, address) in to.iter().enumerate() {
        let mailbox = address.0.parse::<Mailbox>().map_err(|e| NotifyError::InvalidRecipient {
            index,
            address: address.0.clone(),
            reason: e.to_string(),
        })?;
        builder = builder.to(mailbox);
    }
    builder
        .multipart(MultiPart::alternative_plain_html(report.text, report.html))
        .map_err(|e| NotifyError::Compose(e.to_string()))
}

#[derive(Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".to_owned())
    }
}

pub(super) fn result_label(notice: &RunNotice) -> &'static str {
    match notice.result {
        RunResult::Succeeded if notice.recovered => "Succeeded (recovered)",
        RunResult::Succeeded => "Succeeded",
        RunResult::Failed => "Failed",
        RunResult::Blocked => "Blocked",
        RunResult::DryRun => "Dry run",
        RunResult::Missed => "Missed",
    }
}

pub(super) fn headline(notice: &RunNotice) -> String {
    let cohort = format!("\u{201c}{}\u{201d}", one_line(&notice.cohort_name));
    match notice.result {
        RunResult::Succeeded if notice.recovered => format!(
            "The import of cohort {cohort} succeeded and is back to normal after earlier runs \
             did not."
        ),
        RunResult::Succeeded => format!("The import of cohort {cohort} succeeded."),
        RunResult::Failed => format!("The import of cohort {cohort} failed."),
        RunResult::Blocked => format!(
            "The removal guard stopped the import of cohort {cohort}: it would remove more \
             members than allowed, so no member was removed."
        ),
        RunResult::DryRun => format!(
            "Dry run of cohort {cohort}: the changes below were computed and nothing was sent \
             to Braze."
        ),
        RunResult::Missed => format!("A run of cohort {cohort} was missed: the operator could not start it in time."),
    }
}

fn fields(n: &RunNotice) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("Cohort", format!("{} (id {})", one_line(&n.cohort_name), one_line(&n.cohort_id))),
        ("Import", format!("{}/{}", n.namespace, n.import_name)),
        ("Result", result_label(n).to_owned()),
        ("Run", n.run_id.clone()),
        ("Trigger", trigger_label(n.trigger).to_owned()),
        ("Started", format_time(n.started_at, &n.time_zone)),
        ("Finished", format_time(n.finished_at, &n.time_zone)),
        ("Duration", format_duration(n.duration())),
    ];
    if n.result != RunResult::Missed {
        let (added, removed) = if n.dry_run || n.result == RunResult::DryRun {
            ("Would add", "Would remove")
        } else {
            ("Added", "Removed")
        };
        fields.push(("Cohort size", format!("{} members", group_digits(n.cohort_size))));
        fields.push((added, group_digits(n.added)));
        fields.push((removed, group_digits(n.removed)));
    }
    fields.push((
        "Next run",
        n.next_run_at.map(|t| format_time(t, &n.time_zone)).unwrap_or_else(|| "none scheduled".to_owned()),
    ));
    if matches!(n.result, RunResult::Failed | RunResult::Blocked | RunResult::Missed) {
        if let Some(reason) = n.reason.as_deref().filter(|r| !r.trim().is_empty()) {
            fields.push(("Reason", reason.trim().to_owned()));
        }
        fields.push(("What to do", n.hint.clone().unwrap_or_else(|| default_hint(n))));
    }
    fields
}

fn trigger_label(trigger: RunTrigger) -> &'static str {
    match trigger {
        RunTrigger::Initial => "Initial (first run of a new import)",
        RunTrigger::Scheduled => "Scheduled",
        RunTrigger::Manual => "Manual (run requested through the annotation)",
        RunTrigger::Retry => "Retry (of a failed run, spec.retry)",
    }
}

/// What to do when the controller has nothing more specific to say.
pub(super) fn default_hint(n: &RunNotice) -> String {
    let resource = format!("cohortimport {} -n {}", n.import_name, n.namespace);
    let run_now = format!(
        "kubectl annotate {resource} {RUN_REQUESTED_ANNOTATION}=\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\" --overwrite"
    );
    match n.result {
        RunResult::Blocked => format!(
            "Check that removing these {} members is intended, then approve this run: \
             kubectl annotate {resource} {APPROVE_REMOVALS_ANNOTATION}={} --overwrite. \
             If it is not intended, fix the source; the next run is checked again.",
            group_digits(n.removed),
            n.run_id
        ),
        RunResult::Missed => format!(
            "Check why the operator was not running. The next scheduled run catches up, or run \
             now: {run_now}"
        ),
        _ => format!(
            "See the events with kubectl describe {resource}, fix the cause, then wait for the \
             next scheduled run or run now: {run_now}"
        ),
    }
}

/// `Sat 28 Nov 2026 06:30:00 WET (Europe/Lisbon)`: the reader's wall clock, unambiguous.
pub(crate) fn format_time(at: Timestamp, tz: &TimeZone) -> String {
    let zoned = at.to_zoned(tz.clone());
    let local = zoned.strftime("%a %-d %b %Y %H:%M:%S %Z").to_string();
    match tz.iana_name() {
        Some(name) if !local.ends_with(name) => format!("{local} ({name})"),
        _ => local,
    }
}

/// `2m 14s`; sub-second runs in milliseconds.
pub(super) fn format_duration(d: SignedDuration) -> String {
    if d < SignedDuration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:#}", SignedDuration::from_secs(d.as_secs()))
    }
}

/// `12345678` → `12,345,678`.
pub(super) fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// User text in a subject or a table row: no line breaks or other control characters.
pub(super) fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_owned()
}

/// A Message-ID part: dot-atom characters only.
fn id_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn notice() -> RunNotice {
        RunNotice {
            namespace: "growth".into(),
            import_name: "power-users".into(),
            cohort_name: "Power users (last 30 days)".into(),
            cohort_id: "power-users-30d".into(),
            run_id: "20261128-063000-a1b2".into(),
            result: RunResult::Succeeded,
            trigger: RunTrigger::Scheduled,
            started_at: "2026-11-28T06:30:00Z".parse().unwrap(),
            finished_at: "2026-11-28T06:32:14Z".parse().unwrap(),
            time_zone: TimeZone::get("America/New_York").unwrap(),
            cohort_size: 1_234_567,
            added: 1_200,
            removed: 45,
            next_run_at: Some("2026-11-29T06:30:00Z".parse().unwrap()),
            reason: None,
            hint: None,
            recovered: false,
            changed: false,
            dry_run: false,
        }
    }

    #[test]
    fn success_report() {
        let r = render(&notice());
        assert_eq!(r.subject, "[cohort-operator] Power users (last 30 days): Succeeded");
        assert!(r.text.starts_with("The import of cohort \u{201c}Power users (last 30 days)\u{201d} succeeded.\n"));
        for expected in [
            "Cohort:      Power users (last 30 days) (id power-users-30d)\n",
            "Import:      growth/power-users\n",
            "Run:         20261128-063000-a1b2\n",
            "Trigger:     Scheduled\n",
            "Started:     Sat 28 Nov 2026 01:30:00 EST (America/New_York)\n",
            "Finished:    Sat 28 Nov 2026 01:32:14 EST (America/New_York)\n",
            "Duration:    2m 14s\n",
            "Cohort size: 1,234,567 members\n",
            "Added:       1,200\n",
            "Removed:     45\n",
            "Next run:    Sun 29 Nov 2026 01:30:00 EST (America/New_York)\n",
            "CohortImport growth/power-users",
        ] {
            assert!(r.text.contains(expected), "missing {expected:?} in\n{}", r.text);
        }
        assert!(!r.text.contains("Reason"));
        assert!(!r.text.contains("What to do"));
        assert!(r.html.contains("<th align=\"left\" valign=\"top\" style=\"padding:2px 12px 2px 0\">Cohort size</th><td style=\"padding:2px 0\">1,234,567 members</td>"));
        assert!(r.html.contains("Sat 28 Nov 2026 01:30:00 EST (America/New_York)"));
    }

    #[test]
    fn recovery_says_so() {
        let r = render(&RunNotice { recovered: true, ..notice() });
        assert_eq!(r.subject, "[cohort-operator] Power users (last 30 days): Succeeded (recovered)");
        assert!(r.text.contains("back to normal"));
    }

    #[test]
    fn failure_gives_reason_and_default_hint() {
        let r = render(&RunNotice {
            result: RunResult::Failed,
            reason: Some("source query failed: relation \"users\" does not exist".into()),
            next_run_at: None,
            ..notice()
        });
        assert_eq!(r.subject, "[cohort-operator] Power users (last 30 days): Failed");
        assert!(r.text.contains("Reason:      source query failed: relation \"users\" does not exist\n"));
        assert!(
            r.text.contains("What to do:  See the events with kubectl describe cohortimport power-users -n growth")
        );
        assert!(r.text.contains("cohorts.dev/run-requested-at="));
        assert!(r.text.contains("Next run:    none scheduled\n"));
        assert!(r.html.contains("relation &quot;users&quot; does not exist"));
    }

    #[test]
    fn block_tells_how_to_approve() {
        let r = render(&RunNotice {
            result: RunResult::Blocked,
            removed: 5_000,
            reason: Some("would remove 5000 of 6000 members (83%), over the 20% limit".into()),
            ..notice()
        });
        assert_eq!(r.subject, "[cohort-operator] Power users (last 30 days): Blocked");
        assert!(r.text.contains("no member was removed"));
        assert!(r.text.contains(
            "kubectl annotate cohortimport power-users -n growth cohorts.dev/approve-removals=20261128-063000-a1b2 --overwrite"
        ));
        assert!(r.text.contains("removing these 5,000 members"));
    }

    #[test]
    fn controller_hint_wins_over_default() {
        let r = render(&RunNotice {
            result: RunResult::Failed,
            hint: Some("Rotate the data import key in Secret braze-key.".into()),
            ..notice()
        });
        assert!(r.text.contains("What to do:  Rotate the data import key in Secret braze-key.\n"));
        assert!(!r.text.contains("kubectl describe"));
    }

    #[test]
    fn dry_run_and_missed() {
        let r = render(&RunNotice { result: RunResult::DryRun, dry_run: true, ..notice() });
        assert_eq!(r.subject, "[cohort-operator] Power users (last 30 days): Dry run");
        assert!(r.text.contains("Would add:    1,200\n"), "{}", r.text);
        assert!(r.text.contains("nothing was sent"));

        let r = render(&RunNotice { result: RunResult::Missed, ..notice() });
        assert_eq!(r.subject, "[cohort-operator] Power users (last 30 days): Missed");
        assert!(!r.text.contains("Cohort size"));
        assert!(r.text.contains("What to do: Check why the operator was not running."), "{}", r.text);
    }

    #[test]
    fn user_text_is_escaped_and_kept_on_one_line() {
        let r = render(&RunNotice {
            cohort_name: "<b>VIP</b> & \"friends\"\r\nBcc: evil@example.com".into(),
            result: RunResult::Failed,
            reason: Some("<script>alert(1)</script>".into()),
            ..notice()
        });
        assert_eq!(r.subject, "[cohort-operator] <b>VIP</b> & \"friends\"  Bcc: evil@example.com: Failed");
        assert!(!r.html.contains("<script>"));
        assert!(!r.html.contains("<b>VIP"));
        assert!(r.html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(r.html.contains("&lt;b&gt;VIP&lt;/b&gt; &amp; &quot;friends&quot;"));
    }

    #[test]
    fn times_use_the_import_time_zone() {
        let at: Timestamp = "2026-07-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            format_time(at, &TimeZone::get("Europe/Lisbon").unwrap()),
            "Wed 1 Jul 2026 13:00:00 WEST (Europe/Lisbon)"
        );
        assert_eq!(format_time(at, &TimeZone::UTC), "Wed 1 Jul 2026 12:00:00 UTC");
        assert_eq!(
            format_time(at, &TimeZone::get("Asia/Kolkata").unwrap()),
            "Wed 1 Jul 2026 17:30:00 IST (Asia/Kolkata)"
        );
    }

    #[test]
    fn durations_and_numbers() {
        assert_eq!(format_duration(SignedDuration::from_millis(250)), "250ms");
        assert_eq!(format_duration(SignedDuration::from_millis(59_900)), "59s");
        assert_eq!(format_duration(SignedDuration::from_secs(3 * 3600 + 5)), "3h 5s");
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(12_345_678), "12,345,678");
    }

    #[test]
    fn composed_message_has_headers_and_both_parts() {
        let from: Mailbox = "Cohort operator <cohorts@example.com>".parse().unwrap();
        let to = [EmailAddress("a@example.com".into()), EmailAddress("b@example.org".into())];
        let message = compose(&notice(), &from, &to).unwrap();
        let envelope = message.envelope();
        assert_eq!(envelope.from().unwrap().to_string(), "cohorts@example.com");
        let rcpt: Vec<String> = envelope.to().iter().map(|a| a.to_string()).collect();
        assert_eq!(rcpt, ["a@example.com", "b@example.org"]);
        let raw = String::from_utf8(message.formatted()).unwrap();
        assert!(raw.contains("Subject: [cohort-operator] Power users (last 30 days): Succeeded\r\n"), "{raw}");
        assert!(raw.contains("To: a@example.com, b@example.org\r\n"), "{raw}");
        assert!(raw.contains("Auto-Submitted: auto-generated\r\n"));
        assert!(raw.contains("Message-ID: <run.20261128-063000-a1b2.power-users.growth@example.com>\r\n"));
        assert!(raw.contains("Date: Sat, 28 Nov 2026 06:32:14 +0000\r\n"), "{raw}");
        assert!(raw.contains("Content-Type: multipart/alternative;"));
        assert!(raw.contains("Content-Type: text/plain; charset=utf-8"));
        assert!(raw.contains("Content-Type: text/html; charset=utf-8"));
    }

    #[test]
    fn compose_rejects_bad_recipients() {
        let from: Mailbox = "cohorts@example.com".parse().unwrap();
        assert_eq!(compose(&notice(), &from, &[]).unwrap_err(), NotifyError::NoRecipients);
        let err =
            compose(&notice(), &from, &[EmailAddress("ok@example.com".into()), EmailAddress("not an address@".into())])
                .unwrap_err();
        assert!(matches!(err, NotifyError::InvalidRecipient { index: 1, .. }), "{err:?}");
        assert!(err.to_string().contains("spec.notifications.email.to[1]"));
    }
}
