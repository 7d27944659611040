//! Why a run report was not sent. Never carries a secret: SMTP errors are reduced to text
//! with the password scrubbed before they get here; Slack and webhook errors name the URL's
//! host and the Secret it came from, never the URL.

use std::fmt;

/// Reason on the Kubernetes Event the controller records when a report is not sent.
pub const NOTIFICATION_FAILED_REASON: &str = "NotificationFailed";

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NotifyError {
    #[error("spec.notifications.email.to is empty; list at least one recipient")]
    NoRecipients,
    #[error(
        "spec.notifications.email.to[{index}] {address:?} is not a usable email address ({reason}); \
         fix the address in the CohortImport"
    )]
    InvalidRecipient { index: usize, address: String, reason: String },
    #[error("could not build the run report email: {0}")]
    Compose(String),
    #[error(
        "sending the run report through SMTP server {host}:{port} failed after {attempts} \
         attempt(s): {last_error}; check the operator's SMTP settings (COHORT_SMTP_*) and that \
         the server accepts mail from it"
    )]
    Send { host: String, port: u16, attempts: u32, last_error: String },
    #[error("spec.notifications.email is set, but the operator has no SMTP server configured (--smtp-host)")]
    NoSmtp,
    /// A Secret the channel needs is missing or unreadable (the text names it, never its data).
    #[error("spec.notifications.{channel}: {message}")]
    Secret { channel: Channel, message: String },
    #[error("the {channel} URL in {origin} is not usable ({reason}); store the full https:// URL there")]
    InvalidUrl { channel: Channel, origin: String, reason: String },
    #[error(
        "the {channel} URL in {origin} uses http:// for host {host}; use https:// (http:// is accepted only for loopback hosts)"
    )]
    InsecureUrl { channel: Channel, origin: String, host: String },
    #[error("refusing to send the {channel} report to {host}: {denied}")]
    DeniedDestination { channel: Channel, host: String, denied: String },
    #[error(
        "the value of webhook header {name} is not a valid header value (one line of visible text); fix its Secret"
    )]
    InvalidHeader { channel: Channel, name: String },
    #[error("posting the run report to {channel} at {host} failed after {attempts} attempt(s): {last_error}")]
    Post { channel: Channel, host: String, attempts: u32, last_error: String },
    /// Several channels, each with its failure; channels not listed were sent.
    #[error("{}", channel_failures(.0))]
    Channels(Vec<ChannelFailure>),
}

/// Where a run report goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Email,
    Slack,
    Webhook,
    PagerDuty,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Email => "email",
            Channel::Slack => "slack",
            Channel::Webhook => "webhook",
            Channel::PagerDuty => "pagerduty",
        })
    }
}

/// One channel's failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelFailure {
    pub channel: Channel,
    pub error: NotifyError,
}

fn channel_failures(failures: &[ChannelFailure]) -> String {
    failures.iter().map(|f| format!("{} not sent: {}", f.channel, f.error)).collect::<Vec<_>>().join("; ")
}

impl NotifyError {
    /// The channel a single failure is about; `None` for several.
    fn channel(&self) -> Option<Channel> {
        match self {
            NotifyError::Channels(_) => None,
            NotifyError::Secret { channel, .. }
            | NotifyError::InvalidUrl { channel, .. }
            | NotifyError::InsecureUrl { channel, .. }
            | NotifyError::DeniedDestination { channel, .. }
            | NotifyError::InvalidHeader { channel, .. }
            | NotifyError::Post { channel, .. } => Some(*channel),
            NotifyError::NoRecipients
            | NotifyError::InvalidRecipient { .. }
            | NotifyError::Compose(_)
            | NotifyError::Send { .. }
            | NotifyError::NoSmtp => Some(Channel::Email),
        }
    }

    /// A short line for `.status` (the run's result stands; this only says the report is lost).
    pub fn status_note(&self) -> String {
        // Status stays small: the full text goes to the Event.
        let text = match self.channel() {
            None => format!("run report {self}"),
            Some(channel) => format!("run report {channel} not sent: {self}"),
        };
        crate::run::report::truncate(text, crate::api::MAX_RUN_MESSAGE_CHARS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_note_fits_the_run_message_limit() {
        let e =
            NotifyError::Send { host: "smtp.example.com".into(), port: 587, attempts: 4, last_error: "x".repeat(1000) };
        let note = e.status_note();
        assert!(note.starts_with("run report email not sent: sending the run report"));
        assert_eq!(note.chars().count(), crate::api::MAX_RUN_MESSAGE_CHARS);
    }

    #[test]
    fn status_notes_name_each_failed_channel() {
        let post = NotifyError::Post {
            channel: Channel::Slack,
            host: "hooks.slack.com".into(),
            attempts: 1,
            last_error: "HTTP 404: no_service".into(),
        };
        assert_eq!(
            post.status_note(),
            "run report slack not sent: posting the run report to slack at hooks.slack.com failed after 1 \
             attempt(s): HTTP 404: no_service"
        );
        let both = NotifyError::Channels(vec![
            ChannelFailure { channel: Channel::Email, error: NotifyError::NoSmtp },
            ChannelFailure { channel: Channel::Slack, error: post },
        ]);
        let note = both.status_note();
        assert!(note.starts_with("run report email not sent: spec.notifications.email is set"), "{note}");
        assert!(note.contains("; slack not sent: posting the run report to slack"), "{note}");
    }
}
