//! Whether a webhook call is genuine, and what it asks for — pure: the headers, the body,
//! the token and the time in; a [`Verdict`] or a [`Refusal`] out. Each sender's scheme is
//! its documented one:
//!
//! - `Generic`: `X-Cohort-Timestamp: <unix seconds>` and `X-Cohort-Signature: sha256=<hex>`,
//!   HMAC-SHA256 with the token over `<timestamp>.<body>`; a timestamp more than
//!   [`GENERIC_TOLERANCE`] from now is refused, so a captured call cannot be replayed later.
//! - `GitHub`: `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 over the body;
//!   `X-GitHub-Event` names the event (GitHub's "Validating webhook deliveries"). GitHub
//!   signs neither that header nor `X-GitHub-Delivery`, so the delivery is named by a digest
//!   of the body, and the body must be the event's: a `push` carries `ref` and its time
//!   (`repository.pushed_at`), another event its object under its own name with
//!   `updated_at` or `created_at`; a `workflow_run` runs imports only once completed
//!   successfully.
//! - `DbtCloud`: `Authorization: <hex>`, HMAC-SHA256 over the body; the JSON body carries
//!   `eventId`, `timestamp`, `eventType` and `data.runStatus` (dbt Cloud's "Webhooks for
//!   your jobs").
//!
//! A [`Delivery`] carries the sender's time when it has one; [`super::deliver`] refuses one
//! older than what it remembers against replays.
//!
//! The signature is checked before anything else of the call is read, in constant time
//! ([`hmac::Mac::verify_slice`]); nothing of an unauthenticated body is parsed.

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::TriggerType;

/// How far a `Generic` call's timestamp may be from now, either way.
pub const GENERIC_TOLERANCE: SignedDuration = SignedDuration::from_mins(5);
/// Shortest token a trigger accepts: it keys the signatures and the webhook path.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Longest delivery id kept (GitHub's are UUIDs, dbt Cloud's about 30 characters).
const MAX_DELIVERY_ID_CHARS: usize = 64;

/// The dbt Cloud event that says a job's data is there, when its run succeeded.
const DBT_CLOUD_COMPLETED: &str = "job.run.completed";

/// A genuine call that runs the selected imports.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Identifies the delivery against replays; covered by the signature.
    pub id: String,
    /// When the sender says it sent it (signed), if it says.
    pub sent_at: Option<Timestamp>,
}

/// A genuine call.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Run(Delivery),
    /// Genuine, but not an event that runs imports (GitHub's `ping`, an event the trigger
    /// does not list, a dbt Cloud run that did not complete successfully).
    Ignore(Ignored),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    Ping,
    EventNotListed,
    DbtRunNotCompleted,
    DbtRunNotSucceeded,
    WorkflowNotSucceeded,
}

impl Ignored {
    pub const fn message(self) -> &'static str {
        match self {
            Ignored::Ping => "pong: the webhook is reachable; a ping runs nothing",
            Ignored::EventNotListed => "ignored: the trigger's spec.events does not list this event",
            Ignored::DbtRunNotCompleted => "ignored: only job.run.completed runs imports",
            Ignored::DbtRunNotSucceeded => "ignored: the dbt Cloud run did not succeed",
            Ignored::WorkflowNotSucceeded => "ignored: only a completed, successful workflow run runs imports",
        }
    }
}

/// Why a call is refused. Messages are the operator's own: nothing of the call is quoted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("the signature does not match the body and the trigger's token")]
    BadSignature,
    #[error("the call is too old or too far in the future (its timestamp); a replay is refused")]
    Stale,
    #[error("malformed call: {0}")]
    Malformed(&'static str),
}

impl Refusal {
    /// 401 for a call that is not proven genuine, 400 for a genuine one that is wrong.
    pub const fn unauthorized(&self) -> bool {
        matches!(self, Refusal::MissingHeader(_) | Refusal::BadSignature)
    }
}

/// The trigger's side of the check.
pub struct Expectation<'a> {
    pub kind: TriggerType,
    pub token: &'a [u8],
    /// `spec.events` (GitHub); empty: `push` only.
    pub events: &'a [String],
}

/// Checks one call against `expected` at `now`.
pub fn verify(
    expected: &Expectation<'_>,
    headers: &HeaderMap,
    body: &[u8],
    now: Timestamp,
) -> Result<Verdict, Refusal> {
    match expected.kind {
        TriggerType::Generic => generic(expected.token, headers, body, now),
        TriggerType::GitHub => github(expected, headers, body),
        TriggerType::DbtCloud => dbt_cloud(expected.token, headers, body),
    }
}

fn generic(token: &[u8], headers: &HeaderMap, body: &[u8], now: Timestamp) -> Result<Verdict, Refusal> {
    let signature = header(headers, "x-cohort-signature")?;
    let timestamp = header(headers, "x-cohort-timestamp")?;
    let signature = signature.strip_prefix("sha256=").ok_or(Refusal::BadSignature)?;
    let mut signed = Vec::with_capacity(timestamp.len() + 1 + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let mac = check(token, &signed, signature)?;
    let seconds: i64 = timestamp.parse().map_err(|_| Refusal::Malformed("X-Cohort-Timestamp is not Unix seconds"))?;
    let sent = Timestamp::from_second(seconds).map_err(|_| Refusal::Stale)?;
    if now.duration_since(sent).abs() > GENERIC_TOLERANCE {
        return Err(Refusal::Stale);
    }
    // The MAC is unique to this timestamp and body: it names the delivery.
    Ok(Verdict::Run(Delivery { id: format!("generic-{}", &hex(&mac)[..32]), sent_at: Some(sent) }))
}

fn github(expected: &Expectation<'_>, headers: &HeaderMap, body: &[u8]) -> Result<Verdict, Refusal> {
    let signature = header(headers, "x-hub-signature-256")?;
    let signature = signature.strip_prefix("sha256=").ok_or(Refusal::BadSignature)?;
    check(expected.token, body, signature)?;
    let event = header(headers, "x-github-event").map_err(|_| Refusal::Malformed("no X-GitHub-Event header"))?;
    if event == "ping" {
        return Ok(Verdict::Ignore(Ignored::Ping));
    }
    let listed = if expected.events.is_empty() { event == "push" } else { expected.events.iter().any(|e| e == event) };
    if !listed {
        return Ok(Verdict::Ignore(Ignored::EventNotListed));
    }
    // X-GitHub-Event is not signed: the body must be that event's (a push's `ref`, another
    // event's object under its own name), and say when it happened, so that a captured
    // body can neither be relabelled nor replayed once forgotten.
    let payload: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| Refusal::Malformed("the body is not a GitHub webhook payload"))?;
    let sent_at = if event == "push" {
        payload.get("ref").and_then(serde_json::Value::as_str).and(time(&payload["repository"]["pushed_at"]))
    } else {
        let object = &payload[event];
        time(&object["updated_at"]).or_else(|| time(&object["created_at"]))
    };
    let Some(sent_at) = sent_at else {
        return Err(Refusal::Malformed("the body is not that event's, or says not when it happened"));
    };
    if event == "workflow_run"
        && (payload["action"] != "completed" || payload["workflow_run"]["conclusion"] != "success")
    {
        return Ok(Verdict::Ignore(Ignored::WorkflowNotSucceeded));
    }
    let digest = Sha256::digest(body);
    Ok(Verdict::Run(Delivery { id: format!("github-{}", &hex(&digest)[..32]), sent_at: Some(sent_at) }))
}

/// A GitHub time: Unix seconds (a push's `pushed_at`) or RFC 3339 (everywhere else).
fn time(value: &serde_json::Value) -> Option<Timestamp> {
    match value {
        serde_json::Value::Number(n) => n.as_i64().and_then(|s| Timestamp::from_second(s).ok()),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The parts of a dbt Cloud webhook body the trigger reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DbtCloudEvent {
    event_id: String,
    timestamp: Timestamp,
    event_type: String,
    #[serde(default)]
    data: DbtCloudRun,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DbtCloudRun {
    #[serde(default)]
    run_status: Option<String>,
}

/// dbt Cloud signs the body only: its `eventId` is the delivery and its `timestamp` the
/// time, both checked against replays by [`super::deliver`].
fn dbt_cloud(token: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<Verdict, Refusal> {
    let signature = header(headers, "authorization")?;
    check(token, body, signature)?;
    let event: DbtCloudEvent =
        serde_json::from_slice(body).map_err(|_| Refusal::Malformed("the body is not a dbt Cloud webhook event"))?;
    if event.event_type != DBT_CLOUD_COMPLETED {
        return Ok(Verdict::Ignore(Ignored::DbtRunNotCompleted));
    }
    if event.data.run_status.as_deref() != Some("Success") {
        return Ok(Verdict::Ignore(Ignored::DbtRunNotSucceeded));
    }
    let id = delivery_id(&event.event_id)?;
    Ok(Verdict::Run(Delivery { id, sent_at: Some(event.timestamp) }))
}

fn header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, Refusal> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).ok_or(Refusal::MissingHeader(name))
}

/// HMAC-SHA256 of `message` under `token` equals the hex `signature`, compared in constant
/// time; returns the MAC's bytes.
fn check(token: &[u8], message: &[u8], signature: &str) -> Result<Vec<u8>, Refusal> {
    let expected = decode_hex(signature).ok_or(Refusal::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(token).map_err(|_| Refusal::BadSignature)?;
    mac.update(message);
    mac.verify_slice(&expected).map_err(|_| Refusal::BadSignature)?;
    Ok(expected)
}

/// A sender's delivery id, kept in status: short and plain, or refused.
fn delivery_id(id: &str) -> Result<String, Refusal> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > MAX_DELIVERY_ID_CHARS || !id.chars().all(plain) {
        return Err(Refusal::Malformed("the delivery id is empty, over 64 characters or not [A-Za-z0-9._-]"));
    }
    Ok(id.to_owned())
}

/// Hex digits only: `u8::from_str_radix` alone would take `+a` for `0a`, a second spelling
/// of one signature.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// Hex HMAC-SHA256 of `message` under `token`: what a sender puts in its signature header.
pub fn sign(token: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes any key length");
    mac.update(message);
    hex(&mac.finalize().into_bytes())
}

/// The path a trigger is served at: Flux's receiver formula, `/hook/` and the SHA-256 of
/// token, name and namespace — unguessable without the token, different per trigger.
pub fn webhook_path(token: &[u8], name: &str, namespace: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(token);
    digest.update(name.as_bytes());
    digest.update(namespace.as_bytes());
    format!("/hook/{}", hex(&digest.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"a-token-of-thirty-two-characters";

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn expect(kind: TriggerType, events: &[String]) -> Expectation<'_> {
        Expectation { kind, token: TOKEN, events }
    }

    fn now() -> Timestamp {
        "2023-01-31T19:30:00Z".parse().unwrap()
    }

    /// dbt Cloud's documented example of a completed run ("Webhooks for your jobs").
    const DBT_COMPLETED: &str = r#"{"accountId":1,"eventId":"wev_2L6ZDoilyiWzKkSA59Gmc2d7FDD","timestamp":"2023-01-31T19:29:35.789265936Z","eventType":"job.run.completed","webhookName":"test","data":{"jobId":"123","jobName":"Daily Job (dbt build)","runId":"12345","environmentId":"1234","environmentName":"Production","dbtVersion":"","projectName":"Snowflake Github Demo","runReason":"","runStartedAt":"2023-01-31T19:28:07Z","runFinishedAt":"2023-01-31T19:29:32Z","runStatus":"Success","runStatusMessage":"None"}}"#;

    #[test]
    fn generic_calls_are_checked_by_signature_and_time() {
        let body = b"{\"table\":\"cohorts\"}";
        let ts = now().as_second().to_string();
        let sig = sign(TOKEN, format!("{ts}.{}", std::str::from_utf8(body).unwrap()).as_bytes());
        let good = headers(&[("x-cohort-timestamp", ts.clone()), ("x-cohort-signature", format!("sha256={sig}"))]);
        let verdict = verify(&expect(TriggerType::Generic, &[]), &good, body, now()).unwrap();
        let id = format!("generic-{}", &sig[..32]);
        assert_eq!(
            verdict,
            Verdict::Run(Delivery { id, sent_at: Some(Timestamp::from_second(now().as_second()).unwrap()) })
        );
        // Another spelling of the same signature is not a second delivery: it is refused.
        let plus = format!("sha256=+{}", &sig[1..]);
        if sig.starts_with('0') {
            let respelled = headers(&[("x-cohort-timestamp", ts.clone()), ("x-cohort-signature", plus)]);
            assert_eq!(verify(&expect(TriggerType::Generic, &[]), &respelled, body, now()), Err(Refusal::BadSignature));
        }
        assert_eq!(decode_hex("+a"), None);
        // Another body, another key, a late arrival, no timestamp.
        assert_eq!(verify(&expect(TriggerType::Generic, &[]), &good, b"{}", now()), Err(Refusal::BadSignature));
        let wrong = Expectation { token: b"another-token-entirely", ..expect(TriggerType::Generic, &[]) };
        assert_eq!(verify(&wrong, &good, body, now()), Err(Refusal::BadSignature));
        let later = now() + SignedDuration::from_mins(6);
        assert_eq!(verify(&expect(TriggerType::Generic, &[]), &good, body, later), Err(Refusal::Stale));
        let bare = headers(&[("x-cohort-signature", format!("sha256={sig}"))]);
        let refused = verify(&expect(TriggerType::Generic, &[]), &bare, body, now()).unwrap_err();
        assert!(refused.unauthorized(), "{refused}");
    }

    #[test]
    fn github_pushes_run_and_pings_do_not() {
        let body = br#"{"ref":"refs/heads/main","repository":{"full_name":"octo/analytics","pushed_at":1675193375}}"#;
        let sig = format!("sha256={}", sign(TOKEN, body));
        let call = |event: &str| {
            headers(&[
                ("x-hub-signature-256", sig.clone()),
                ("x-github-event", event.to_owned()),
                ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_owned()),
            ])
        };
        let Ok(Verdict::Run(push)) = verify(&expect(TriggerType::GitHub, &[]), &call("push"), body, now()) else {
            panic!("a push runs")
        };
        assert!(push.id.starts_with("github-"), "{push:?}");
        assert_eq!(push.sent_at, Some(Timestamp::from_second(1_675_193_375).unwrap()));
        let ping = verify(&expect(TriggerType::GitHub, &[]), &call("ping"), body, now()).unwrap();
        assert_eq!(ping, Verdict::Ignore(Ignored::Ping));
        // Without spec.events only pushes run; with it, only those listed.
        let issues = verify(&expect(TriggerType::GitHub, &[]), &call("issues"), body, now()).unwrap();
        assert_eq!(issues, Verdict::Ignore(Ignored::EventNotListed));
        let listed = ["workflow_run".to_owned()];
        let run =
            br#"{"action":"completed","workflow_run":{"conclusion":"success","updated_at":"2023-01-31T19:29:00Z"}}"#;
        let run_call = headers(&[
            ("x-hub-signature-256", format!("sha256={}", sign(TOKEN, run))),
            ("x-github-event", "workflow_run".to_owned()),
        ]);
        let workflow = verify(&expect(TriggerType::GitHub, &listed), &run_call, run, now()).unwrap();
        assert!(matches!(workflow, Verdict::Run(Delivery { sent_at: Some(_), .. })));
        // A push body relabelled as the listed event is not that event's.
        let relabelled = verify(&expect(TriggerType::GitHub, &listed), &call("workflow_run"), body, now());
        assert!(matches!(relabelled, Err(Refusal::Malformed(_))));
        // The event header is not signed: a signed body that is no push is not run as one.
        let zen = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
        let relabelled = headers(&[
            ("x-hub-signature-256", format!("sha256={}", sign(TOKEN, zen))),
            ("x-github-event", "push".to_owned()),
        ]);
        assert!(matches!(
            verify(&expect(TriggerType::GitHub, &[]), &relabelled, zen, now()),
            Err(Refusal::Malformed(_))
        ));
        // GitHub's older SHA-1 header alone is not enough.
        let sha1 = headers(&[("x-hub-signature", "sha1=0000".into()), ("x-github-event", "push".into())]);
        assert_eq!(
            verify(&expect(TriggerType::GitHub, &[]), &sha1, body, now()),
            Err(Refusal::MissingHeader("x-hub-signature-256"))
        );
    }

    #[test]
    fn dbt_cloud_runs_only_after_a_successful_job_run() {
        let call = |body: &str| headers(&[("authorization", sign(TOKEN, body.as_bytes()))]);
        let run = verify(&expect(TriggerType::DbtCloud, &[]), &call(DBT_COMPLETED), DBT_COMPLETED.as_bytes(), now());
        let sent_at = Some("2023-01-31T19:29:35.789265936Z".parse().unwrap());
        assert_eq!(run, Ok(Verdict::Run(Delivery { id: "wev_2L6ZDoilyiWzKkSA59Gmc2d7FDD".into(), sent_at })));
        let errored = DBT_COMPLETED.replace("\"Success\"", "\"Error\"");
        let ignored = verify(&expect(TriggerType::DbtCloud, &[]), &call(&errored), errored.as_bytes(), now());
        assert_eq!(ignored, Ok(Verdict::Ignore(Ignored::DbtRunNotSucceeded)));
        let started = DBT_COMPLETED.replace("job.run.completed", "job.run.started");
        let ignored = verify(&expect(TriggerType::DbtCloud, &[]), &call(&started), started.as_bytes(), now());
        assert_eq!(ignored, Ok(Verdict::Ignore(Ignored::DbtRunNotCompleted)));
        // Signed by someone else: the body is never parsed.
        let forged = headers(&[("authorization", sign(b"not-the-token-at-all", b"{}"))]);
        assert_eq!(verify(&expect(TriggerType::DbtCloud, &[]), &forged, b"{}", now()), Err(Refusal::BadSignature));
    }

    #[test]
    fn delivery_ids_stay_plain_and_paths_depend_on_every_part() {
        assert!(delivery_id(&"x".repeat(65)).is_err());
        assert!(delivery_id("a b").is_err());
        let path = webhook_path(TOKEN, "nightly", "team-a");
        assert!(path.starts_with("/hook/") && path.len() == 6 + 64, "{path}");
        assert_ne!(path, webhook_path(TOKEN, "nightly", "team-b"));
        assert_ne!(path, webhook_path(b"another-token-entirely", "nightly", "team-a"));
        assert_eq!(decode_hex("zz"), None);
    }
}
