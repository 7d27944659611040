//! What Slack, webhook and PagerDuty receivers get: a Slack message, a CloudEvent and an
//! Events API v2 event. Pure.
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

/// PagerDuty's limits: `payload.summary` and `dedup_key`, in characters.
const PAGERDUTY_SUMMARY_MAX: usize = 1024;
const PAGERDUTY_DEDUP_KEY_MAX: usize = 255;

/// What a run tells PagerDuty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertAction {
    Trigger,
    Resolve,
}

/// `trigger` for a run that failed, was missed or blocked; `resolve` for one that completed.
pub fn alert_action(result: RunResult) -> AlertAction {
    match result {
        RunResult::Failed | RunResult::Missed | RunResult::Blocked => AlertAction::Trigger,
        RunResult::Succeeded | RunResult::DryRun => AlertAction::Resolve,
    }
}

/// The alert's dedup key: one per import, so a resolve closes what its trigger opened and
/// repeated triggers add to one alert. `cohorts.dev/NAMESPACE/NAME`, or with the name
/// hashed when that would pass PagerDuty's 255 characters.
pub fn pagerduty_dedup_key(namespace: &str, name: &str) -> String {
    let key = format!("cohorts.dev/{namespace}/{name}");
    if key.chars().count() <= PAGERDUTY_DEDUP_KEY_MAX {
        return key;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cohorts.dev/{namespace}/sha256-{hex}")
}

/// The Events API v2 event for the run in `notice` (PagerDuty's "Send an Alert Event").
pub fn pagerduty_event(n: &RunNotice, routing_key: &str) -> Value {
    let dedup_key = pagerduty_dedup_key(&n.namespace, &n.import_name);
    match alert_action(n.result) {
        AlertAction::Resolve => {
            json!({ "routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key })
        }
        AlertAction::Trigger => {
            let reason = n.reason.as_deref().map(one_line).filter(|r| !r.is_empty());
            let summary = match &reason {
                Some(reason) => format!("{}: {reason}", headline(n)),
                None => headline(n),
            };
            json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": dedup_key,
                "payload": {
                    "summary": summary.chars().take(PAGERDUTY_SUMMARY_MAX).collect::<String>(),
                    "source": format!("{}/{}", n.namespace, n.import_name),
                    "severity": if n.result == RunResult::Blocked { "warning" } else { "error" },
                    "timestamp": n.finished_at.to_string(),
                    "component": "cohort-import",
                    "group": n.namespace,
                    "class": result_label(n),
                    "custom_details": RunData::from(n),
                },
                "client": "cohort-operator",
            })
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

    #[test]
    fn pagerduty_triggers_on_trouble_and_resolves_on_success() {
        let failed = RunNotice { result: RunResult::Failed, reason: Some("source: HTTP 503".into()), ..notice() };
        let key = "k".repeat(32);
        let event = pagerduty_event(&failed, &key);
        assert_eq!(event["event_action"], "trigger");
        assert_eq!(event["routing_key"], key.as_str());
        assert_eq!(event["dedup_key"], format!("cohorts.dev/{}/{}", failed.namespace, failed.import_name));
        assert_eq!(event["payload"]["severity"], "error");
        assert!(event["payload"]["summary"].as_str().unwrap().ends_with("source: HTTP 503"), "{event}");
        assert_eq!(event["payload"]["source"], format!("{}/{}", failed.namespace, failed.import_name));
        assert_eq!(event["payload"]["custom_details"]["run"]["result"], "Failed");
        let blocked = pagerduty_event(&RunNotice { result: RunResult::Blocked, ..notice() }, &key);
        assert_eq!(blocked["payload"]["severity"], "warning");
        let resolved = pagerduty_event(&RunNotice { result: RunResult::Succeeded, ..notice() }, &key);
        assert_eq!(resolved.as_object().unwrap().len(), 3, "{resolved}");
        assert_eq!(
            (resolved["event_action"].as_str(), resolved["dedup_key"].clone()),
            (Some("resolve"), event["dedup_key"].clone())
        );
    }

    #[test]
    fn pagerduty_fields_stay_within_its_limits() {
        let long = RunNotice { result: RunResult::Failed, reason: Some("x".repeat(5000)), ..notice() };
        let event = pagerduty_event(&long, &"k".repeat(32));
        assert_eq!(event["payload"]["summary"].as_str().unwrap().chars().count(), 1024);
        let name = "n".repeat(253);
        let key = pagerduty_dedup_key(&"a".repeat(63), &name);
        assert!(key.chars().count() <= 255 && key.contains("sha256-"), "{key}");
        assert_ne!(key, pagerduty_dedup_key(&"a".repeat(63), &"m".repeat(253)));
    }
}
