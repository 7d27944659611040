//! Why a Braze request was not accepted. Messages carry Braze's own words (keys redacted)
//! and what to do; they never contain a key.

use std::time::Duration;

/// A final failure of one request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrazeError {
    /// 401: a key is wrong, invalidated, or the partner is not enabled. Permanent until
    /// someone changes a key, so the run stops after the first one.
    #[error("Braze refused the keys (401: {message}): {}", reason.advice())]
    Unauthorized { reason: UnauthorizedReason, message: String },
    /// 403 on `/users/track`: the REST API key lacks the `users.track` permission, or the
    /// workspace may not use the REST API. Permanent until someone changes the key.
    #[error(
        "Braze refused the REST API key (403: {message}): give the key the users.track permission in Braze \
         under Settings → APIs and Identifiers → API Keys, or create a key that has it"
    )]
    Forbidden { message: String },
    /// 400: the request itself is wrong; sending it again cannot help.
    #[error("Braze rejected the request as malformed (400: {message}); not retried")]
    BadRequest { message: String },
    /// Any other status that retrying cannot fix (403, 404, a redirect…).
    #[error(
        "Braze answered {status} ({message}); not retried: check the REST endpoint and the \
         partner name"
    )]
    Rejected { status: u16, message: String },
    /// The run's retries are used up while Braze kept failing.
    #[error("gave up: the run's retry budget of {budget} retries is used up; last failure: {last}")]
    RetryBudgetExhausted { budget: u32, last: TransientFailure },
    /// One request failed on every attempt.
    #[error("gave up after {attempts} attempts; last failure: {last}")]
    AttemptsExhausted { attempts: u32, last: TransientFailure },
    /// Braze asked for a wait longer than a run holds on; the rest goes next run.
    #[error(
        "Braze's rate limit asks to wait {wait:?}, longer than the {max_wait:?} a run waits; \
         what was not sent goes in the next run"
    )]
    RateLimited { wait: Duration, max_wait: Duration },
    /// Not sent again because another request of the run failed for good.
    #[error("not retried: the run stopped after another request failed")]
    Abandoned,
    /// The operator's egress policy refuses the REST endpoint (its address, or where its
    /// name resolves); a person must fix the endpoint or the policy.
    #[error("not sent: {0}")]
    EgressDenied(String),
    /// Refused before sending: the target or the input is wrong.
    #[error("not sent: {0}")]
    InvalidRequest(String),
    /// Not sent, or given up on, because this replica no longer holds its Lease with margin.
    #[error("not sent: {0}")]
    Fenced(#[from] crate::fence::Fenced),
}

impl BrazeError {
    /// 400, 401 and the other refusals retrying cannot fix: a person must act.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Unauthorized { .. }
                | Self::Forbidden { .. }
                | Self::BadRequest { .. }
                | Self::Rejected { .. }
                | Self::EgressDenied(_)
        )
    }
}

/// A failure worth retrying.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransientFailure {
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connection(String),
}

/// Which key a 401 is about, read from Braze's documented messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnauthorizedReason {
    /// "Invalid Partner API key".
    PartnerApiKey,
    /// "Invalid client secret": the data import key.
    DataImportKey,
    /// "Partner not enabled for client with client secret: …".
    PartnerNotEnabled,
    /// A 401 on `/users/track`: the customer's REST API key.
    RestApiKey,
    /// A message Braze does not document.
    Unknown,
}

impl UnauthorizedReason {
    pub fn from_message(message: &str) -> Self {
        let m = message.to_ascii_lowercase();
        if m.contains("not enabled") {
            Self::PartnerNotEnabled
        } else if m.contains("partner api key") || m.contains("partner_api_key") {
            Self::PartnerApiKey
        } else if m.contains("client secret") || m.contains("client_secret") {
            Self::DataImportKey
        } else {
            Self::Unknown
        }
    }

    pub fn advice(self) -> &'static str {
        match self {
            Self::PartnerApiKey => "the partner API key is wrong or belongs to another cluster (US and EU keys differ)",
            Self::DataImportKey => {
                "the data import key is wrong or was invalidated; generate a new one in Braze under \
                 Partner Integrations → Technology Partners"
            }
            Self::PartnerNotEnabled => {
                "this partner is not enabled for the workspace of the data import key; enable it in \
                 Braze under Partner Integrations → Technology Partners"
            }
            Self::RestApiKey => {
                "the REST API key is wrong, was deleted, or belongs to another workspace; create one in Braze \
                 under Settings → APIs and Identifiers → API Keys with the users.track permission and put it in \
                 the Secret spec.destination.braze.apiKeySecretRef names"
            }
            Self::Unknown => "check the data import key and the partner API key",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braze_401_messages_name_the_key() {
        use UnauthorizedReason::*;
        assert_eq!(UnauthorizedReason::from_message("Invalid Partner API key"), PartnerApiKey);
        assert_eq!(UnauthorizedReason::from_message("Invalid client secret"), DataImportKey);
        assert_eq!(
            UnauthorizedReason::from_message("Partner not enabled for client with client secret: <redacted>"),
            PartnerNotEnabled
        );
        assert_eq!(UnauthorizedReason::from_message("nope"), Unknown);
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = BrazeError::Unauthorized {
            reason: UnauthorizedReason::DataImportKey,
            message: "Invalid client secret".into(),
        };
        let text = e.to_string();
        assert!(text.contains("401: Invalid client secret"), "{text}");
        assert!(text.contains("Technology Partners"), "{text}");
        assert!(e.is_permanent());
        let e = BrazeError::RetryBudgetExhausted {
            budget: 3,
            last: TransientFailure::Status { status: 503, message: "busy".into() },
        };
        assert!(e.to_string().contains("HTTP 503: busy"));
        assert!(!e.is_permanent());
    }
}
