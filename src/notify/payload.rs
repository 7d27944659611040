//! What Slack and webhook receivers get: a Slack message and a CloudEvent. Pure.
//!
//! - Slack: an incoming-webhook message, Block Kit blocks plus `text` (what notifications
//!   and clients without blocks show). User text (cohort names, reasons) is escaped, so a
//!   cohort named `<!channel>` cannot ping a channel, and cut to Block Kit's limits.
//! - Webhook: a CloudEvents 1.0 event in structured mode (the whole event is the JSON body,
//!   `Content-Type: application/cloudevents+json`), `type` [`RUN_FINISHED_TYPE`], `source`
//!   the import's API path, `id` the run's id (a retried delivery is the same event, so a
//!   receiver can drop duplicates), `time` the run's end, and the run record as `data`.

use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value, json};

use super::notice::RunNotice;
use super::render::{default_hint, format_duration, format_time, group_digits, headline, one_line, result_label};
use crate::api::{RunResult, RunTrigger};

/// The CloudEvents `type` of every run report.
pub const RUN_FINISHED_TYPE: &str = "dev.cohorts.run.finished";
/// Structured-mode content type (CloudEvents JSON format, section 3.1).
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// Block Kit limits: a section's text, one field's text, fields per section.
const SECTION_TEXT_MAX: usize = 3000;
const FIELD_TEXT_MAX: usize = 2000;

/// The CloudEvent for the run in `notice`.
pub fn cloud_event(notice: &RunNotice) -> Value {
    json!({
        "specversion": "1.0",
        "type": RUN_FINISHED_TYPE,
        "source": format!(
            "/apis/cohorts.dev/v1alpha1/namespaces/{}/cohortimports/{}",
            notice.namespace, notice.import_name
        ),
        "id": notice.run_id,
        "time": notice.finished_at.to_string(),
        "subject": notice.cohort_id,
        "datacontenttype": "application/json",
        // An extension attribute, so brokers (Knative triggers, Event Grid filters) can
        // route on the result without reading `data`.
        "runresult": notice.result,
        "data": RunData::from(notice),
    })
}

/// `data` of the CloudEvent: the run record and the import it belongs to.
#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunData<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub cohort: CohortData<'a>,
    pub run: RunRecordData<'a>,
    /// The first success after failed, blocked or missed runs.
    pub recovered: bool,
    /// `spec.dryRun`: nothing was sent; `added`/`removed` are what would have been.
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<String>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct CohortData<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunRecordData<'a> {
    pub id: &'a str,
    pub trigger: RunTrigger,
    pub result: RunResult,
    pub started_at: String,
    pub finished_at: String,
    pub duration_seconds: f64,
    pub cohort_size: u64,
    pub added: u64,
    pub removed: u64,
    /// Why a run failed, was blocked or was missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl<'a> From<&'a RunNotice> for RunData<'a> {
    fn from(n: &'a RunNotice) -> Self {
        let trouble = matches!(n.result, RunResult::Failed | RunResult::Blocked | RunResult::Missed);
        RunData {
            namespace: &n.namespace,
            name: &n.import_name,
            cohort: CohortData { id: &n.cohort_id, name: &n.cohort_name },
            run: RunRecordData {
                id: &n.run_id,
                trigger: n.trigger,
                result: n.result,
                started_at: n.started_at.to_string(),
                finished_at: n.finished_at.to_string(),
                duration_seconds: n.duration().as_secs_f64(),
                cohort_size: n.cohort_size,
                added: n.added,
                removed: n.removed,
                reason: n.reason.as_deref().filter(|_| trouble),
                hint: trouble.then(|| n.hint.clone().unwrap_or_else(|| default_hint(n))),
            },
            recovered: n.recovered,
            dry_run: n.dry_run || n.result == RunResult::DryRun,
            next_run_at: n.next_run_at.map(|t: Timestamp| t.to_string()),
        }
    }
}

/// The Slack incoming-webhook message for the run in `notice`.
pub fn slack_message(n: &RunNotice) -> Value {
    let title = format!("{}: {}", result_label(n), one_line(&n.cohort_name));
    let text = format!("{} {title} ({}/{}), run {}", emoji(n), n.namespace, n.import_name, n.run_id);
    let mut blocks = vec![
        section(&format!("{} *{}*", emoji(n), escape(&headline(n)))),
        json!({ "type": "section", "fields": fields(n) }),
    ];
    if matches!(n.result, RunResult::Failed | RunResult::Blocked | RunResult::Missed) {
        if let Some(reason) = n.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
            blocks.push(section(&format!("*Reason*\n{}", escape(reason))));
        }
        let hint = n.hint.clone().unwrap_or_else(|| default_hint(n));
        blocks.push(section(&format!("*What to do*\n{}", escape(&hint))));
    }
    blocks.push(json!({
        "type": "context",
        "elements": [{
            "type": "mrkdwn",
            "text": cut(
                &format!(
                    "cohort-operator · CohortImport {}/{} · run {} · took {}",
                    n.namespace, n.import_name, n.run_id, format_duration(n.duration())
                ),
                FIELD_TEXT_MAX
            ),
        }],
    }));
    json!({ "text": cut(&escape(&text), SECTION_TEXT_MAX), "blocks": blocks })
}

fn fields(n: &RunNotice) -> Vec<Value> {
    let (added, removed) =
        if n.dry_run || n.result == RunResult::DryRun { ("Would add", "Would remove") } else { ("Added", "Removed") };
    let next = n.next_run_at.map(|t| format_time(t, &n.time_zone)).unwrap_or_else(|| "none scheduled".to_owned());
    let mut fields = vec![
        ("Result", result_label(n).to_owned()),
        ("Cohort", format!("{} (id {})", one_line(&n.cohort_name), one_line(&n.cohort_id))),
    ];
    if n.result != RunResult::Missed {
        fields.push(("Members", group_digits(n.cohort_size)));
        fields.push((added, group_digits(n.added)));
        fields.push((removed, group_digits(n.removed)));
    }
    fields.push(("Next run", next));
    // A section holds at most 10 fields; there are at most 6.
    fields
        .into_iter()
        .map(|(label, value)| {
            json!({ "type": "mrkdwn", "text": cut(&format!("*{label}*\n{}", escape(&value)), FIELD_TEXT_MAX) })
        })
        .collect()
}

fn section(text: &str) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": cut(text, SECTION_TEXT_MAX) } })
}

fn emoji(n: &RunNotice) -> &'static str {
    match n.result {
        RunResult::Succeeded => ":white_check_mark:",
        RunResult::DryRun => ":mag:",
        RunResult::Failed => ":x:",
        RunResult::Blocked => ":no_entry:",
        RunResult::Missed => ":warning:",
    }
}

/// Slack's three control characters in text: `&`, `<`, `>` (links, mentions).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// At most `max` characters, the last one `…` when cut. Never splits an `&amp;`-style
/// escape (a cut escape would show as text).
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    if let Some(amp) = out.rfind('&')
        && !out[amp..].contains(';')
    {
        out.truncate(amp);
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::render::tests::notice;

    #[test]
    fn cloud_event_is_a_structured_cloudevents_1_0_event() {
        let e = cloud_event(&notice());
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], "dev.cohorts.run.finished");
        assert_eq!(e["source"], "/apis/cohorts.dev/v1alpha1/namespaces/growth/cohortimports/power-users");
        assert_eq!(e["id"], "20261128-063000-a1b2");
        assert_eq!(e["time"], "2026-11-28T06:32:14Z");
        assert_eq!(e["datacontenttype"], "application/json");
        assert_eq!(e["runresult"], "Succeeded");
        let data = &e["data"];
        assert_eq!(data["namespace"], "growth");
        assert_eq!(data["cohort"], json!({ "id": "power-users-30d", "name": "Power users (last 30 days)" }));
        assert_eq!(data["run"]["result"], "Succeeded");
        assert_eq!(data["run"]["trigger"], "Scheduled");
        assert_eq!(data["run"]["cohortSize"], 1_234_567);
        assert_eq!(data["run"]["durationSeconds"], 134.0);
        assert_eq!(data["nextRunAt"], "2026-11-29T06:30:00Z");
        assert!(data["run"].get("reason").is_none() && data["run"].get("hint").is_none());
        // Every attribute name is one CloudEvents allows: lower-case letters and digits.
        for key in e.as_object().unwrap().keys() {
            assert!(key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{key}");
        }
    }

    #[test]
    fn a_failed_run_carries_its_reason_and_what_to_do() {
        let n = RunNotice { result: RunResult::Failed, reason: Some("source: HTTP 503".into()), ..notice() };
        let data = &cloud_event(&n)["data"]["run"];
        assert_eq!(data["reason"], "source: HTTP 503");
        assert!(data["hint"].as_str().unwrap().contains("kubectl describe cohortimport power-users -n growth"));
    }

    #[test]
    fn slack_message_has_text_and_blocks_within_limits() {
        let n = RunNotice {
            result: RunResult::Failed,
            cohort_name: "<!channel> & friends".into(),
            reason: Some("x".repeat(5000)),
            ..notice()
        };
        let m = slack_message(&n);
        let text = m["text"].as_str().unwrap();
        assert!(text.starts_with(":x: Failed: &lt;!channel&gt; &amp; friends (growth/power-users)"), "{text}");
        let blocks = m["blocks"].as_array().unwrap();
        assert!(blocks.len() <= 50);
        let json = m.to_string();
        assert!(!json.contains("<!channel>"), "user text is escaped: {json}");
        for block in blocks {
            if let Some(t) = block["text"]["text"].as_str() {
                assert!(t.chars().count() <= SECTION_TEXT_MAX);
            }
            for field in block["fields"].as_array().into_iter().flatten() {
                assert!(field["text"].as_str().unwrap().chars().count() <= FIELD_TEXT_MAX);
            }
        }
        let fields = blocks[1]["fields"].as_array().unwrap();
        let labels: Vec<&str> =
            fields.iter().map(|f| f["text"].as_str().unwrap().split('\n').next().unwrap()).collect();
        assert_eq!(labels, ["*Result*", "*Cohort*", "*Members*", "*Added*", "*Removed*", "*Next run*"]);
        assert!(json.contains("*Reason*") && json.contains("*What to do*"));
    }

    #[test]
    fn cut_keeps_escapes_whole() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "ab…");
        assert_eq!(cut("a&amp;b", 4), "a…");
    }
}
