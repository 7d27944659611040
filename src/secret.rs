//! Secret values (Braze keys, warehouse URLs, tokens) that must never be printed.
//!
//! `SecretString` has no `Display`, a redacting `Debug`, and no `Serialize`, so it cannot
//! reach a log line, an error message, an Event or `.status` by accident; code that needs
//! the value calls [`SecretString::expose`] at the single place it is sent.
//!
//! Text that comes from elsewhere — a server's answer, a library's error — may still quote a
//! secret it was given; [`redact`] takes those out before the text goes anywhere.

use std::fmt;

/// What [`redact`] puts in place of a secret.
pub const REDACTED: &str = "<redacted>";

#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself; call only where it leaves the process (a request body, a header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// Replaces every occurrence of each secret in `text` with [`REDACTED`], longer secrets
/// first so that one containing another is replaced whole. Secrets shorter than `min_len`
/// bytes are left alone (see each caller for why); empty ones always are.
pub fn redact(text: &str, secrets: &[&str], min_len: usize) -> String {
    let mut sorted: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty() && s.len() >= min_len).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in sorted {
        if out.contains(secret) {
            out = out.replace(secret, REDACTED);
        }
    }
    out
}

/// An error and its causes, `a: b: c`, for libraries whose top message is vague. A cause
/// whose text the message already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_every_secret_longer_ones_first() {
        assert_eq!(redact("token abc123 and abc123", &["abc123"], 1), "token <redacted> and <redacted>");
        assert_eq!(redact("abc abcdef", &["abc", "abcdef", ""], 1), "<redacted> <redacted>");
        assert_eq!(redact("nothing", &[""], 1), "nothing");
        assert_eq!(redact("a b", &["a"], 3), "a b");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    #[test]
    fn error_chains_name_each_cause_once() {
        let e = Layer(
            "request failed: connection refused",
            Some(Box::new(Layer("connection refused", Some(Box::new(Layer("os error 111", None)))))),
        );
        assert_eq!(error_chain(&e), "request failed: connection refused: os error 111");
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretString::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
    }
}
