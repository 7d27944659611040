//! Why a run report was not sent. Never carries a secret: SMTP errors are reduced to text
//! with the password scrubbed before they get here.

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
}

impl NotifyError {
    /// A short line for `.status` (the run's result stands; this only says the email is lost).
    pub fn status_note(&self) -> String {
        // Status stays small: the full text goes to the Event.
        crate::run::report::truncate(
            format!("run report email not sent: {self}"),
            crate::api::MAX_RUN_MESSAGE_CHARS,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_note_fits_the_run_message_limit() {
        let e = NotifyError::Send {
            host: "smtp.example.com".into(),
            port: 587,
            attempts: 4,
            last_error: "x".repeat(1000),
        };
        let note = e.status_note();
        assert!(note.starts_with("run report email not sent: sending the run report"));
        assert_eq!(note.chars().count(), crate::api::MAX_RUN_MESSAGE_CHARS);
    }
}
