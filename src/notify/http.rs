//! POSTing a report to a Slack or webhook URL: bounded retries, a total time bound, the
//! operator's egress policy (through [`crate::net::HttpClient`], as sources), and no secret in
//! any message.
//!
//! No echo: what a receiver answers never reaches status, Events or logs as text. An error
//! names the HTTP status and, for Slack, one of Slack's documented error codes when the
//! answer is exactly that code; anything else a receiver says is dropped. Otherwise a
//! tenant could aim a report at an in-cluster service and read its answers in status.
//!
//! The URL itself is a secret (a Slack incoming-webhook URL *is* the credential; a webhook
//! URL may carry a token), so messages name only its host, and every text that comes from
//! elsewhere (reqwest's errors, the receiver's answer) is scrubbed of the URL, its path and
//! query, and the header values before it goes anywhere.
//!
//! Retried: connection errors, timeouts, 429 and 5xx (after `Retry-After` when the receiver
//! gives one and it fits the time left). Not retried: other answers (a 4xx will not change).
//! Redirects are not followed: a receiver could send the report somewhere else.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use super::error::{Channel, NotifyError};
use crate::net::HttpClient;
use crate::net::egress::{EgressPolicy, ResolveError, denied_in};
use crate::secret::{SecretString, error_chain, redact};

/// Limits of one delivery.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Longest wait to connect.
    pub connect_timeout: Duration,
    /// Longest one attempt may take, connection to the end of the answer.
    pub attempt_timeout: Duration,
    /// Longest a delivery may take, every attempt and wait included.
    pub total_timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub retry_backoff: Duration,
    /// Where reports may go: the operator's egress policy, plus `--notification-deny-cidr`.
    pub policy: Arc<EgressPolicy>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            retries: 3,
            retry_backoff: Duration::from_secs(1),
            policy: EgressPolicy::shared_default(),
        }
    }
}

/// One report to post. `url` and header values are secrets; `origin` names where the URL
/// came from (`Secret growth/hooks key slack`) for messages.
pub struct Delivery<'a> {
    pub channel: Channel,
    pub url: &'a SecretString,
    pub origin: &'a str,
    /// Header name and its value (from a Secret).
    pub headers: &'a [(HeaderName, SecretString)],
    /// Secrets inside `body` (PagerDuty's routing key), taken out of any answer quoted.
    pub body_secrets: &'a [SecretString],
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// Posts reports. Cheap to share: one connection pool for every import.
#[derive(Clone)]
pub struct HttpSender {
    client: HttpClient,
    config: HttpConfig,
}

impl std::fmt::Debug for HttpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSender").field("config", &self.config).finish_non_exhaustive()
    }
}

impl HttpSender {
    pub fn new(config: HttpConfig) -> Result<Self, reqwest::Error> {
        // Names are resolved under the policy at connection time too, so a name that changes
        // its answer after `check_url` gains nothing. No redirect is followed.
        let client = HttpClient::builder(&config.policy).connect_timeout(config.connect_timeout).build()?;
        Ok(Self { client, config })
    }

    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// Posts `delivery`, retrying what may pass on a later attempt, within
    /// [`HttpConfig::total_timeout`].
    pub async fn post(&self, delivery: &Delivery<'_>) -> Result<(), NotifyError> {
        let url = self.check_url(delivery).await?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let secrets = Secrets::of(delivery, &url);
        let deadline = Instant::now() + self.config.total_timeout;
        let attempts = self.config.retries + 1;
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = self.attempt(&url, delivery, left.min(self.config.attempt_timeout)).await;
            let retry_after = match outcome {
                Attempt::Delivered => return Ok(()),
                Attempt::Permanent(text) => {
                    let last_error = secrets.scrub(&text);
                    return Err(NotifyError::Post { channel: delivery.channel, host, attempts: attempt, last_error });
                }
                Attempt::Transient { error, retry_after } => {
                    last_error = secrets.scrub(&error);
                    retry_after
                }
            };
            if attempt == attempts {
                break;
            }
            let wait = retry_after.unwrap_or_default().max(self.backoff(attempt - 1));
            if Instant::now() + wait >= deadline {
                last_error.push_str(&format!(
                    "; gave up: the next attempt would end after the {} s time bound",
                    self.config.total_timeout.as_secs()
                ));
                return Err(NotifyError::Post { channel: delivery.channel, host, attempts: attempt, last_error });
            }
            tracing::warn!(channel = %delivery.channel, %host, attempt, error = %last_error, "report not delivered; retrying in {wait:?}");
            tokio::time::sleep(wait).await;
        }
        Err(NotifyError::Post { channel: delivery.channel, host, attempts, last_error })
    }

    /// Full jitter keeps several imports' retries from arriving together.
    fn backoff(&self, i: u32) -> Duration {
        let ceiling = self.config.retry_backoff.saturating_mul(1 << i.min(16));
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    async fn attempt(&self, url: &Url, delivery: &Delivery<'_>, timeout: Duration) -> Attempt {
        let request = match self.client.post(url.clone()) {
            Ok(request) => request,
            Err(denied) => return Attempt::Permanent(denied.to_string()),
        };
        let mut request =
            request.timeout(timeout).header(CONTENT_TYPE, delivery.content_type).body(delivery.body.clone());
        for (name, value) in delivery.headers {
            // Checked in `check_url`.
            let Ok(mut value) = HeaderValue::from_str(value.expose()) else { continue };
            value.set_sensitive(true);
            request = request.header(name, value);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                // The name now resolves only to denied addresses: no later attempt will pass.
                if let Some(denied) = denied_in(&e) {
                    return Attempt::Permanent(denied.to_string());
                }
                let what = if e.is_timeout() { "no answer in time" } else { "could not connect or send" };
                let error = format!("{what}: {}", error_chain(&e.without_url()));
                return Attempt::Transient { error, retry_after: None };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Delivered;
        }
        let retry_after = retry_after(&response);
        let error = match known_answer(response).await {
            Some(code) => format!("HTTP {} ({code})", status.as_u16()),
            None => format!("HTTP {}", status.as_u16()),
        };
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            Attempt::Transient { error, retry_after }
        } else {
            Attempt::Permanent(error)
        }
    }

    /// The URL, if it is one the operator may post to: http(s), https unless the host is
    /// loopback, header values that are one line, and a host whose every address the
    /// policy allows.
    async fn check_url(&self, delivery: &Delivery<'_>) -> Result<Url, NotifyError> {
        let (channel, origin) = (delivery.channel, delivery.origin.to_owned());
        let invalid =
            |reason: &str| NotifyError::InvalidUrl { channel, origin: origin.clone(), reason: reason.to_owned() };
        // url's parse errors describe the problem, never the input.
        let url = Url::parse(delivery.url.expose().trim()).map_err(|e| invalid(&e.to_string()))?;
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| invalid("it has no host"))?.to_owned();
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => return Err(NotifyError::InsecureUrl { channel, origin: origin.clone(), host }),
            _ => return Err(invalid("it is not an http(s) URL")),
        }
        for (name, value) in delivery.headers {
            if HeaderValue::from_str(value.expose()).is_err() {
                return Err(NotifyError::InvalidHeader { channel, name: name.to_string() });
            }
        }
        // An address in the URL is connected to as it is; a name is resolved here and again
        // when connecting. Unresolvable now: the attempts report it (DNS may come back).
        let port = url.port_or_known_default().unwrap_or(443);
        let verdict = match url.host() {
            Some(url::Host::Domain(name)) => match self.config.policy.resolve(name, port).await {
                Err(ResolveError::Denied(denied)) => Err(denied),
                Ok(_) | Err(ResolveError::Lookup { .. }) => Ok(()),
            },
            _ => self.config.policy.check_url(&url),
        };
        if let Err(denied) = verdict {
            return Err(NotifyError::DeniedDestination { channel, host, denied: denied.to_string() });
        }
        Ok(url)
    }
}

enum Attempt {
    Delivered,
    Transient { error: String, retry_after: Option<Duration> },
    Permanent(String),
}

/// `Retry-After` in seconds (the HTTP-date form is rare for webhooks and ignored).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds))
}

/// Slack's documented error codes for incoming webhooks (api.slack.com, "Handling
/// errors"): the whole answer is one of these words.
const SLACK_ERRORS: &[&str] = &[
    "invalid_payload",
    "user_not_found",
    "channel_not_found",
    "channel_is_archived",
    "action_prohibited",
    "posting_to_general_channel_denied",
    "no_service",
    "no_service_id",
    "no_team",
    "team_disabled",
    "invalid_token",
    "no_text",
    "missing_text_or_fallback_or_attachments",
    "too_many_attachments",
];

/// The answer, when it is exactly one of [`SLACK_ERRORS`]: the constant, never the
/// receiver's bytes. Reads at most 64 bytes.
async fn known_answer(mut response: reqwest::Response) -> Option<&'static str> {
    let mut body = Vec::new();
    while body.len() <= 64 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = std::str::from_utf8(&body).ok()?.trim();
    SLACK_ERRORS.iter().find(|code| **code == text).copied()
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The secret parts of a delivery, to take out of any text that leaves it.
struct Secrets(Vec<String>);

impl Secrets {
    fn of(delivery: &Delivery<'_>, url: &Url) -> Self {
        let mut parts = vec![delivery.url.expose().to_owned(), url.as_str().to_owned(), url.path().to_owned()];
        parts.extend(url.query().map(str::to_owned));
        parts.extend(url.password().map(str::to_owned));
        parts.extend(delivery.headers.iter().map(|(_, value)| value.expose().to_owned()));
        parts.extend(delivery.body_secrets.iter().map(|value| value.expose().to_owned()));
        Self(parts)
    }

    fn scrub(&self, text: &str) -> String {
        let secrets: Vec<&str> = self.0.iter().map(String::as_str).filter(|s| *s != "/").collect();
        // Parts shorter than 6 bytes (a path of `/x`) would scrub ordinary words.
        redact(text, &secrets, 6)
    }
}
