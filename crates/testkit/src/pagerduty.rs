//! A loopback imitation of PagerDuty's Events API v2 (`POST /v2/enqueue`), written from
//! PagerDuty's public documentation ("Send an Alert Event", "Events API v2 Overview"):
//!
//! - the body is JSON, at most 512 KB; anything else is `400` with
//!   `{"status":"invalid event","message":"Event object is invalid","errors":[…]}`;
//! - `routing_key` is required and is 32 characters (the integration key), `event_action` is
//!   `trigger`, `acknowledge` or `resolve`, and `dedup_key`, when given, is at most 255
//!   characters;
//! - a `trigger` needs `payload.summary` (at most 1,024 characters), `payload.source` and
//!   `payload.severity` (`critical`, `error`, `warning` or `info`); without a `dedup_key`
//!   one is generated; `acknowledge` and `resolve` need the `dedup_key`;
//! - an accepted event is `202` with `{"status":"success","message":"Event
//!   processed","dedup_key":…}`;
//! - alerts: a `trigger` opens the alert of its `(routing_key, dedup_key)` or adds to the
//!   open one; `resolve` closes it, and is dropped when none is open (as PagerDuty drops
//!   it); a later `trigger` opens a new alert.
//!
//! Only routing keys the test registers are known; events for others are accepted (202, as
//! PagerDuty does: routing is asynchronous) but open no alert. Outages and rate limits are
//! scripted with [`PagerDuty::respond_next`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Largest body accepted, as documented ("Events API payloads are limited to 512 KB").
pub const MAX_BODY: usize = 512 * 1024;

/// One event PagerDuty accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub routing_key: String,
    pub action: String,
    pub dedup_key: String,
    /// The whole body as sent.
    pub body: Value,
}

/// One alert, opened by a trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub dedup_key: String,
    /// Triggers applied to it (the first opened it).
    pub triggers: usize,
    pub resolved: bool,
}

#[derive(Default)]
struct Inner {
    known_keys: HashSet<String>,
    accepted: Vec<Event>,
    /// Every request's status, accepted or not.
    answered: Vec<u16>,
    /// Per routing key, its alerts in order of opening.
    alerts: BTreeMap<String, Vec<Alert>>,
    /// Statuses (with their `Retry-After`) for the next requests.
    script: VecDeque<(u16, Option<u64>)>,
    generated: u64,
}

/// A running imitation on 127.0.0.1; stopped when dropped.
pub struct PagerDuty {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PagerDuty {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PagerDuty {
    pub async fn start() -> PagerDuty {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v2/enqueue", axum::routing::post(enqueue))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        PagerDuty { addr, inner, task }
    }

    /// The events endpoint, `http://127.0.0.1:PORT/v2/enqueue`.
    pub fn url(&self) -> String {
        format!("http://{}/v2/enqueue", self.addr)
    }

    /// A new integration's routing key (32 characters), whose alerts are kept.
    pub fn integration(&self) -> String {
        let mut inner = self.inner.lock().unwrap();
        let key = format!("R{:031x}", nanos() ^ (inner.known_keys.len() as u128));
        inner.known_keys.insert(key.clone());
        key
    }

    /// Answers the next requests with these statuses (`Retry-After` seconds when given).
    pub fn respond_next(&self, answers: impl IntoIterator<Item = (u16, Option<u64>)>) {
        self.inner.lock().unwrap().script.extend(answers);
    }

    /// Events accepted (202), in order.
    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().unwrap().accepted.clone()
    }

    /// The status of every request, in order.
    pub fn answered(&self) -> Vec<u16> {
        self.inner.lock().unwrap().answered.clone()
    }

    /// The alerts of `routing_key`, in order of opening.
    pub fn alerts(&self, routing_key: &str) -> Vec<Alert> {
        self.inner.lock().unwrap().alerts.get(routing_key).cloned().unwrap_or_default()
    }

    /// Waits until `n` events were accepted; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} PagerDuty events within {timeout:?}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn enqueue(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let mut inner = inner.lock().unwrap();
    let (status, answer, retry_after) = match inner.script.pop_front() {
        Some((status, retry_after)) => (status, json!({ "status": "error", "message": "scripted" }), retry_after),
        None => match accept(&mut inner, &headers, &body) {
            Ok(event) => {
                let answer = json!({ "status": "success", "message": "Event processed", "dedup_key": event.dedup_key });
                inner.accepted.push(event);
                (202, answer, None)
            }
            Err(errors) => (
                400,
                json!({ "status": "invalid event", "message": "Event object is invalid", "errors": errors }),
                None,
            ),
        },
    };
    inner.answered.push(status);
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(answer)).into_response();
    if let Some(seconds) = retry_after {
        response.headers_mut().insert("retry-after", seconds.into());
    }
    response
}

/// The event in `body`, applied to the alerts; or every reason it is invalid.
fn accept(inner: &mut Inner, headers: &HeaderMap, body: &[u8]) -> Result<Event, Vec<String>> {
    let json_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
    if !json_type {
        return Err(vec!["Content-Type must be application/json".into()]);
    }
    let body: Value = serde_json::from_slice(body).map_err(|_| vec!["Event object is not valid JSON".to_owned()])?;
    let errors = problems(&body);
    if !errors.is_empty() {
        return Err(errors);
    }
    let routing_key = body["routing_key"].as_str().unwrap().to_owned();
    let action = body["event_action"].as_str().unwrap().to_owned();
    let dedup_key = match body["dedup_key"].as_str() {
        Some(key) => key.to_owned(),
        None => {
            inner.generated += 1;
            format!("{:032x}", nanos() + u128::from(inner.generated))
        }
    };
    if inner.known_keys.contains(&routing_key) {
        apply(inner.alerts.entry(routing_key.clone()).or_default(), &action, &dedup_key);
    }
    Ok(Event { routing_key, action, dedup_key, body })
}

/// What the documentation says makes an event invalid.
fn problems(body: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    match body["routing_key"].as_str() {
        None => errors.push("'routing_key' is missing or blank".to_owned()),
        Some(key) if key.chars().count() != 32 => {
            errors.push("Length of 'routing_key' is incorrect (should be 32 characters)".to_owned())
        }
        Some(_) => {}
    }
    let action = body["event_action"].as_str().unwrap_or_default();
    if !["trigger", "acknowledge", "resolve"].contains(&action) {
        errors.push("'event_action' is invalid (must be one of: trigger, acknowledge, resolve)".to_owned());
    }
    match &body["dedup_key"] {
        Value::Null => {
            if action != "trigger" {
                errors.push("'dedup_key' is required for acknowledge and resolve events".to_owned());
            }
        }
        Value::String(key) if key.chars().count() > 255 => {
            errors.push("Length of 'dedup_key' is too long (maximum is 255 characters)".to_owned())
        }
        Value::String(_) => {}
        _ => errors.push("'dedup_key' must be a string".to_owned()),
    }
    if action == "trigger" {
        let payload = &body["payload"];
        match payload["summary"].as_str() {
            None | Some("") => errors.push("'payload.summary' is missing or blank".to_owned()),
            Some(s) if s.chars().count() > 1024 => {
                errors.push("Length of 'payload.summary' is too long (maximum is 1024 characters)".to_owned())
            }
            Some(_) => {}
        }
        if payload["source"].as_str().is_none_or(str::is_empty) {
            errors.push("'payload.source' is missing or blank".to_owned());
        }
        if !["critical", "error", "warning", "info"].contains(&payload["severity"].as_str().unwrap_or_default()) {
            errors.push("'payload.severity' is invalid (must be one of: critical, error, warning, info)".to_owned());
        }
    }
    errors
}

/// A trigger opens an alert or adds to the open one; a resolve closes the open one, and is
/// dropped without one; an acknowledge changes nothing kept here.
fn apply(alerts: &mut Vec<Alert>, action: &str, dedup_key: &str) {
    let open = alerts.iter_mut().find(|a| a.dedup_key == dedup_key && !a.resolved);
    match (action, open) {
        ("trigger", Some(alert)) => alert.triggers += 1,
        ("trigger", None) => alerts.push(Alert { dedup_key: dedup_key.to_owned(), triggers: 1, resolved: false }),
        ("resolve", Some(alert)) => alert.resolved = true,
        _ => {}
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(pd: &PagerDuty, content_type: &str, body: String) -> (u16, Value) {
        let client = reqwest_free::Client;
        client.post(&pd.url(), content_type, body).await
    }

    /// A minimal HTTP/1.1 client over a TCP stream, so the imitation is tested without
    /// the operator's own HTTP stack.
    mod reqwest_free {
        use serde_json::Value;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        pub struct Client;

        impl Client {
            pub async fn post(&self, url: &str, content_type: &str, body: String) -> (u16, Value) {
                let rest = url.strip_prefix("http://").unwrap();
                let (host, path) = rest.split_once('/').unwrap();
                let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
                let request = format!(
                    "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(request.as_bytes()).await.unwrap();
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await.unwrap();
                let text = String::from_utf8_lossy(&answer);
                let status = text[9..12].parse().unwrap();
                let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
                (status, serde_json::from_str(body).unwrap_or(Value::Null))
            }
        }
    }

    fn trigger(key: &str) -> Value {
        json!({
            "routing_key": key, "event_action": "trigger", "dedup_key": "import-1",
            "payload": { "summary": "Example alert", "source": "ns/import-1", "severity": "error" }
        })
    }

    #[tokio::test]
    async fn accepts_documented_events_and_keeps_alerts() {
        let pd = PagerDuty::start().await;
        let key = pd.integration();
        assert_eq!(key.len(), 32);
        let (status, answer) = post(&pd, "application/json", trigger(&key).to_string()).await;
        assert_eq!(status, 202);
        assert_eq!(answer, json!({ "status": "success", "message": "Event processed", "dedup_key": "import-1" }));
        post(&pd, "application/json", trigger(&key).to_string()).await;
        let resolve = json!({ "routing_key": key, "event_action": "resolve", "dedup_key": "import-1" });
        assert_eq!(post(&pd, "application/json", resolve.to_string()).await.0, 202);
        assert_eq!(pd.alerts(&key), [Alert { dedup_key: "import-1".into(), triggers: 2, resolved: true }]);
        // A resolve with no open alert is accepted and dropped.
        assert_eq!(post(&pd, "application/json", resolve.to_string()).await.0, 202);
        assert_eq!(pd.alerts(&key).len(), 1);
        assert_eq!(pd.events().len(), 4);
    }

    #[tokio::test]
    async fn refuses_invalid_events_with_the_documented_answer() {
        let pd = PagerDuty::start().await;
        let key = pd.integration();
        let cases = [
            json!({ "routing_key": "short", "event_action": "trigger", "payload": trigger(&key)["payload"] }),
            json!({ "routing_key": key, "event_action": "explode", "dedup_key": "k" }),
            json!({ "routing_key": key, "event_action": "resolve" }),
            json!({ "routing_key": key, "event_action": "trigger", "payload": { "summary": "x", "source": "s" } }),
            json!({ "routing_key": key, "event_action": "trigger", "dedup_key": "k".repeat(256),
                    "payload": trigger(&key)["payload"] }),
            json!({ "routing_key": key, "event_action": "trigger",
                    "payload": { "summary": "x".repeat(1025), "source": "s", "severity": "info" } }),
        ];
        for case in cases {
            let (status, answer) = post(&pd, "application/json", case.to_string()).await;
            assert_eq!(status, 400, "{case}");
            assert_eq!(answer["status"], "invalid event");
            assert!(!answer["errors"].as_array().unwrap().is_empty());
        }
        assert_eq!(post(&pd, "text/plain", trigger(&key).to_string()).await.0, 400);
        assert_eq!(post(&pd, "application/json", "{".into()).await.0, 400);
        let huge = json!({ "routing_key": key, "event_action": "trigger", "dedup_key": "k",
                           "payload": { "summary": "x", "source": "s", "severity": "info", "custom_details": "y".repeat(MAX_BODY) } });
        assert_eq!(post(&pd, "application/json", huge.to_string()).await.0, 413);
        assert!(pd.events().is_empty() && pd.alerts(&key).is_empty());
    }
}
