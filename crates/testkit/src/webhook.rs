//! Local HTTP receivers for run reports, on loopback: a Slack incoming webhook and a plain
//! webhook endpoint. They record every request and answer as told.
//!
//! The Slack receiver imitates what Slack's documentation says an incoming webhook does:
//! the URL's secret path (`/services/T…/B…/<token>`) is the credential, an unknown one is
//! `404 no_service`; a body must be JSON (`application/json`) with a non-empty `text` or
//! `blocks`, else `400 no_text` / `400 invalid_payload`; Block Kit limits (at most 50
//! blocks, a section's text 3,000 characters, at most 10 fields of 2,000 each, a header's
//! text 150, at most 10 context elements) give `400 invalid_blocks`; a message accepted is
//! `200` with the body `ok`. Rate limiting (`429` with `Retry-After`) and outages (`5xx`)
//! are scripted by the test with [`Receiver::respond_next`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// An answer the test chooses for the next request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status and body, with `Retry-After: seconds` when given.
    Status { status: u16, body: &'static str, retry_after: Option<u64> },
    /// A redirect to `location`.
    Redirect { status: u16, location: String },
    /// No answer for this long (the client's timeout is what is tested).
    Hang(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Slack,
    Webhook,
}

struct Inner {
    kind: Kind,
    /// The secret path the receiver answers on.
    path: String,
    received: Vec<Received>,
    script: VecDeque<Answer>,
    /// After the script: what every request gets (`None`: the kind's normal answer).
    always: Option<Answer>,
}

/// A running receiver; stopped when dropped.
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// A Slack incoming webhook on 127.0.0.1.
    pub async fn slack() -> Receiver {
        Self::start(Kind::Slack, IpAddr::V4(Ipv4Addr::LOCALHOST)).await
    }

    /// A webhook endpoint on 127.0.0.1 answering `200` to every POST on its path.
    pub async fn webhook() -> Receiver {
        Self::start(Kind::Webhook, IpAddr::V4(Ipv4Addr::LOCALHOST)).await
    }

    /// A webhook endpoint on another loopback address (e.g. 127.0.0.2).
    pub async fn webhook_on(ip: IpAddr) -> Receiver {
        Self::start(Kind::Webhook, ip).await
    }

    async fn start(kind: Kind, ip: IpAddr) -> Receiver {
        // Unique enough for tests, and not a word any message would contain by chance.
        let token = format!("xoxtoken{:x}{:08x}", nanos(), std::process::id());
        let path = match kind {
            Kind::Slack => format!("/services/T0001/B0001/{token}"),
            Kind::Webhook => format!("/hooks/{token}"),
        };
        let inner =
            Arc::new(Mutex::new(Inner { kind, path, received: Vec::new(), script: VecDeque::new(), always: None }));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await.expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, inner, task }
    }

    /// The full URL, secret path included: what goes into the Secret.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.inner.lock().unwrap().path)
    }

    /// The secret part of the URL.
    pub fn token(&self) -> String {
        self.inner.lock().unwrap().path.rsplit('/').next().unwrap().to_owned()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers the next requests with `answers`, in order, then as usual.
    pub fn respond_next(&self, answers: impl IntoIterator<Item = Answer>) {
        self.inner.lock().unwrap().script.extend(answers);
    }

    /// Answers every request (after any scripted ones) with `answer`.
    pub fn respond_always(&self, answer: Answer) {
        self.inner.lock().unwrap().always = Some(answer);
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// Waits until `n` requests arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(tokio::time::Instant::now() < deadline, "{} of {n} requests within {timeout:?}", received.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (kind, path, answer) = {
        let mut inner = inner.lock().unwrap();
        inner.received.push(Received {
            method: method.to_string(),
            path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                .collect(),
            body: body.to_vec(),
        });
        let answer = inner.script.pop_front().or_else(|| inner.always.clone());
        (inner.kind, inner.path.clone(), answer)
    };
    match answer {
        Some(Answer::Status { status, body, retry_after }) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            if let Some(seconds) = retry_after {
                response.headers_mut().insert("retry-after", HeaderValue::from(seconds));
            }
            return response;
        }
        Some(Answer::Redirect { status, location }) => {
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            response.headers_mut().insert("location", HeaderValue::from_str(&location).unwrap());
            return response;
        }
        Some(Answer::Hang(how_long)) => {
            tokio::time::sleep(how_long).await;
            return (StatusCode::OK, "ok").into_response();
        }
        None => {}
    }
    if method != Method::POST || uri.path() != path {
        return (StatusCode::NOT_FOUND, "no_service").into_response();
    }
    match kind {
        Kind::Webhook => (StatusCode::OK, "").into_response(),
        Kind::Slack => match check_slack_message(&headers, &body) {
            Ok(()) => (StatusCode::OK, "ok").into_response(),
            Err(error) => (StatusCode::BAD_REQUEST, error).into_response(),
        },
    }
}

/// Slack's checks of an incoming-webhook message.
fn check_slack_message(headers: &HeaderMap, body: &[u8]) -> Result<(), &'static str> {
    let json_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err("invalid_payload");
    }
    let message: Value = serde_json::from_slice(body).map_err(|_| "invalid_payload")?;
    let message = message.as_object().ok_or("invalid_payload")?;
    let text = message.get("text").and_then(Value::as_str).unwrap_or_default();
    let blocks = message.get("blocks");
    if text.trim().is_empty() && blocks.is_none() {
        return Err("no_text");
    }
    let Some(blocks) = blocks else { return Ok(()) };
    let blocks = blocks.as_array().ok_or("invalid_blocks")?;
    if blocks.is_empty() || blocks.len() > 50 || !blocks.iter().all(block_ok) {
        return Err("invalid_blocks");
    }
    Ok(())
}

fn block_ok(block: &Value) -> bool {
    let chars = |v: &Value| v.as_str().map(|s| s.chars().count());
    let text_ok = |v: &Value, max: usize| {
        matches!(v["type"].as_str(), Some("mrkdwn" | "plain_text"))
            && chars(&v["text"]).is_some_and(|n| n >= 1 && n <= max)
    };
    match block["type"].as_str() {
        Some("section") => {
            let text = block.get("text");
            let fields = block.get("fields").and_then(Value::as_array);
            (text.is_some() || fields.is_some())
                && text.is_none_or(|t| text_ok(t, 3000))
                && fields.is_none_or(|f| !f.is_empty() && f.len() <= 10 && f.iter().all(|f| text_ok(f, 2000)))
        }
        Some("header") => {
            block["text"]["type"] == "plain_text" && chars(&block["text"]["text"]).is_some_and(|n| n <= 150)
        }
        Some("context") => block["elements"]
            .as_array()
            .is_some_and(|e| !e.is_empty() && e.len() <= 10 && e.iter().all(|e| text_ok(e, 3000))),
        Some("divider") => true,
        _ => false,
    }
}
