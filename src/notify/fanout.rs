//! [`Notifier`]: every channel an import names — email, Slack, webhook, PagerDuty — for one
//! run, each with its own `on` and `when` filters, all at once, every failure reported.
//!
//! Secrets (Slack and webhook URLs, header values) are read from the import's namespace at
//! each run, like the data import key, so a rotated Secret is used by the next report.

use std::sync::Arc;

use futures::future::{BoxFuture, join4};
use reqwest::header::HeaderName;

use super::error::{Channel, ChannelFailure, NotifyError};
use super::http::{Delivery, HttpSender};
use super::notice::{RunNotice, hears};
use super::payload::{CLOUDEVENTS_CONTENT_TYPE, cloud_event, pagerduty_event, slack_message};
use super::smtp::{Notify, SmtpNotifier};
use crate::api::{Notifications, PagerDutyNotification, SecretKeyRef, SlackNotification, WebhookNotification};
use crate::secret::SecretString;
use crate::source::SourceContext;
use crate::source::kube::KubeObjects;

/// Sends each finished run's report to every channel that wants it.
#[derive(Clone)]
pub struct Notifier {
    client: kube::Client,
    /// `None`: no SMTP server configured; imports asking for email are told so.
    email: Option<Arc<SmtpNotifier>>,
    http: HttpSender,
    /// PagerDuty's Events API v2 endpoint (`--pagerduty-events-url`).
    pagerduty_url: SecretString,
}

/// PagerDuty's Events API v2 endpoint (the US service region's; the EU region's is
/// `https://events.eu.pagerduty.com/v2/enqueue`).
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// The length of a PagerDuty integration key (routing key), as its documentation gives it.
const ROUTING_KEY_LEN: usize = 32;

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("email", &self.email).field("http", &self.http).finish_non_exhaustive()
    }
}

impl Notifier {
    pub fn new(client: kube::Client, email: Option<SmtpNotifier>, http: HttpSender) -> Self {
        Self {
            client,
            email: email.map(Arc::new),
            http,
            pagerduty_url: SecretString::from(PAGERDUTY_EVENTS_URL.to_owned()),
        }
    }

    /// The same notifier, sending PagerDuty events to `url` instead of PagerDuty's default.
    pub fn with_pagerduty_url(self, url: &str) -> Self {
        Self { pagerduty_url: SecretString::from(url.to_owned()), ..self }
    }

    async fn email(&self, notice: &RunNotice, n: &Notifications) -> Option<Result<(), NotifyError>> {
        let email = n.email.as_ref().filter(|c| hears(c.on.as_deref(), c.when, notice))?;
        Some(match &self.email {
            None => Err(NotifyError::NoSmtp),
            Some(smtp) => smtp.send_report(notice, &email.to).await,
        })
    }

    async fn slack(&self, notice: &RunNotice, n: &Notifications) -> Option<Result<(), NotifyError>> {
        let slack = n.slack.as_ref().filter(|c| hears(c.on.as_deref(), c.when, notice))?;
        Some(self.send_slack(notice, slack).await)
    }

    async fn webhook(&self, notice: &RunNotice, n: &Notifications) -> Option<Result<(), NotifyError>> {
        let webhook = n.webhook.as_ref().filter(|c| hears(c.on.as_deref(), c.when, notice))?;
        Some(self.send_webhook(notice, webhook).await)
    }

    async fn pagerduty(&self, notice: &RunNotice, n: &Notifications) -> Option<Result<(), NotifyError>> {
        let pagerduty = n.pagerduty.as_ref().filter(|c| hears(c.on.as_deref(), c.when, notice))?;
        Some(self.send_pagerduty(notice, pagerduty).await)
    }

    async fn send_pagerduty(&self, notice: &RunNotice, pagerduty: &PagerDutyNotification) -> Result<(), NotifyError> {
        let secrets = KubeObjects::new(self.client.clone(), notice.namespace.clone());
        let secret = &pagerduty.routing_key_secret_ref;
        let stored = read(&secrets, Channel::PagerDuty, secret).await?;
        let routing_key = SecretString::from(stored.expose().trim().to_owned());
        if routing_key.expose().chars().count() != ROUTING_KEY_LEN {
            let message = format!(
                "Secret {}/{} key {:?} is not a PagerDuty integration key ({ROUTING_KEY_LEN} characters); store the Events API v2 integration's key there",
                notice.namespace, secret.name, secret.key
            );
            return Err(NotifyError::Secret { channel: Channel::PagerDuty, message });
        }
        let body = pagerduty_event(notice, routing_key.expose());
        let delivery = Delivery {
            channel: Channel::PagerDuty,
            url: &self.pagerduty_url,
            origin: "--pagerduty-events-url",
            headers: &[],
            body_secrets: std::slice::from_ref(&routing_key),
            content_type: "application/json",
            body: serde_json::to_vec(&body).expect("JSON values serialize"),
        };
        self.http.post(&delivery).await
    }

    async fn send_slack(&self, notice: &RunNotice, slack: &SlackNotification) -> Result<(), NotifyError> {
        let secrets = KubeObjects::new(self.client.clone(), notice.namespace.clone());
        let url = read(&secrets, Channel::Slack, &slack.url_secret_ref).await?;
        let origin = origin(&notice.namespace, &slack.url_secret_ref);
        let delivery = Delivery {
            channel: Channel::Slack,
            url: &url,
            origin: &origin,
            headers: &[],
            body_secrets: &[],
            content_type: "application/json",
            body: serde_json::to_vec(&slack_message(notice)).expect("JSON values serialize"),
        };
        self.http.post(&delivery).await
    }

    async fn send_webhook(&self, notice: &RunNotice, webhook: &WebhookNotification) -> Result<(), NotifyError> {
        let secrets = KubeObjects::new(self.client.clone(), notice.namespace.clone());
        let url = read(&secrets, Channel::Webhook, &webhook.url_secret_ref).await?;
        let mut headers = Vec::with_capacity(webhook.headers.len());
        for header in &webhook.headers {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| NotifyError::InvalidHeader { channel: Channel::Webhook, name: header.name.clone() })?;
            headers.push((name, read(&secrets, Channel::Webhook, &header.value_secret_ref).await?));
        }
        let origin = origin(&notice.namespace, &webhook.url_secret_ref);
        let delivery = Delivery {
            channel: Channel::Webhook,
            url: &url,
            origin: &origin,
            headers: &headers,
            body_secrets: &[],
            content_type: CLOUDEVENTS_CONTENT_TYPE,
            body: serde_json::to_vec(&cloud_event(notice)).expect("JSON values serialize"),
        };
        self.http.post(&delivery).await
    }
}

impl Notify for Notifier {
    fn notify<'a>(
        &'a self,
        notice: &'a RunNotice,
        notifications: &'a Notifications,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            // At once: a slow channel does not hold up the others, and the whole report
            // takes as long as its slowest channel (each bounded in time).
            let (email, slack, webhook, pagerduty) = join4(
                self.email(notice, notifications),
                self.slack(notice, notifications),
                self.webhook(notice, notifications),
                self.pagerduty(notice, notifications),
            )
            .await;
            let failures: Vec<ChannelFailure> = [
                (Channel::Email, email),
                (Channel::Slack, slack),
                (Channel::Webhook, webhook),
                (Channel::PagerDuty, pagerduty),
            ]
            .into_iter()
            .filter_map(|(channel, sent)| match sent {
                Some(Err(error)) => Some(ChannelFailure { channel, error }),
                _ => None,
            })
            .collect();
            if failures.is_empty() { Ok(()) } else { Err(NotifyError::Channels(failures)) }
        })
    }
}

/// `Secret growth/hooks key slack`: where a URL came from, for messages.
fn origin(namespace: &str, secret: &SecretKeyRef) -> String {
    format!("Secret {namespace}/{} key {}", secret.name, secret.key)
}

async fn read(secrets: &KubeObjects, channel: Channel, secret: &SecretKeyRef) -> Result<SecretString, NotifyError> {
    let value = secrets
        .secret_value(&secret.name, &secret.key)
        .await
        .map_err(|e| NotifyError::Secret { channel, message: e.to_string() })?;
    if value.is_empty() {
        let message = format!("Secret {}/{} key {:?} is empty", secrets.namespace(), secret.name, secret.key);
        return Err(NotifyError::Secret { channel, message });
    }
    Ok(value)
}
