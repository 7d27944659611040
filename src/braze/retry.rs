//! When to retry a Braze request and how long to wait first. Pure: the caller passes the
//! clock reading and the random number, so every rule is unit-tested without sleeping.

use std::time::Duration;

use jiff::Timestamp;

/// How hard the client tries before giving up.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry (before jitter); doubles on each further retry.
    pub base_delay: Duration,
    /// Longest backoff we choose ourselves.
    pub max_delay: Duration,
    /// Retries allowed across one run (one `send_changes` or `name_cohort` call), so a
    /// struggling Braze is not hammered by every batch retrying on its own.
    pub run_retry_budget: u32,
    /// Longest wait we accept when Braze names one (`Retry-After`, `x-ratelimit-reset`).
    /// Braze's limit is hourly, so a reset can be far away: rather than hold a run for an
    /// hour, the run stops and the next one sends what is left.
    pub max_server_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            run_retry_budget: 200,
            max_server_wait: Duration::from_secs(120),
        }
    }
}

/// What a response status means for the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Accepted,
    /// 408, 423 (resource locked), 429 and 5xx: Braze may take it later.
    Retry,
    /// Anything else (400, 401, 403, 404, 3xx…): sending it again cannot help.
    Permanent,
}

pub fn classify(status: u16) -> Disposition {
    match status {
        200..=299 => Disposition::Accepted,
        408 | 423 | 429 | 500..=599 => Disposition::Retry,
        _ => Disposition::Permanent,
    }
}

/// The wait before retry number `retry` (1 = the first retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDelay {
    Wait(Duration),
    /// Braze asked for a wait longer than `max_server_wait`.
    TooLong(Duration),
}

impl RetryPolicy {
    /// Exponential backoff with full jitter: uniform in `[0, min(max_delay, base·2^(retry-1))]`.
    /// `unit` is a random number in `[0, 1)`.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let exp = retry.saturating_sub(1).min(31);
        let ceiling = self.base_delay.saturating_mul(1u32 << exp).min(self.max_delay);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait before a retry: Braze's own hint when it gave one (plus up to one base delay
    /// of jitter, so parallel requests do not all return at the same instant), else
    /// [`Self::backoff`].
    pub fn delay(&self, retry: u32, server_hint: Option<Duration>, unit: f64) -> RetryDelay {
        match server_hint {
            Some(hint) if hint > self.max_server_wait => RetryDelay::TooLong(hint),
            Some(hint) => RetryDelay::Wait(hint + self.base_delay.min(self.max_delay).mul_f64(unit.clamp(0.0, 1.0))),
            None => RetryDelay::Wait(self.backoff(retry, unit)),
        }
    }
}

/// Whether an answer is Braze's rate limit speaking: a 429, or `x-ratelimit-remaining: 0`.
/// Only then are its wait headers honoured. Braze sends `x-ratelimit-reset` — the end of
/// its hourly window — on every answer, so on a 503 (or any other retryable status) it says
/// nothing about when Braze recovers: such answers keep the client's own bounded backoff
/// instead of waiting for the window, or failing as rate limited.
pub fn is_rate_limited(status: u16, ratelimit_remaining: Option<&str>) -> bool {
    status == 429 || ratelimit_remaining.is_some_and(|v| v.trim().parse::<u64>() == Ok(0))
}

/// Braze's wait hint from response headers: `Retry-After` (delta seconds or an HTTP date)
/// wins over `x-ratelimit-reset` (epoch seconds, Braze's REST convention). A reset smaller
/// than 10⁹ cannot be a present-day epoch, so it is read as delta seconds. Hints in the past
/// mean "now". Unparseable values are ignored: backoff applies.
pub fn server_wait_hint(retry_after: Option<&str>, ratelimit_reset: Option<&str>, now: Timestamp) -> Option<Duration> {
    let until = |at: Timestamp| {
        let nanos = at.as_nanosecond() - now.as_nanosecond();
        Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
    };
    if let Some(value) = retry_after.map(str::trim) {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(zoned) = jiff::fmt::rfc2822::parse(value) {
            return Some(until(zoned.timestamp()));
        }
    }
    let value = ratelimit_reset.map(str::trim)?;
    let reset: f64 = value.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
    if reset < 1e9 {
        return Some(Duration::from_secs_f64(reset));
    }
    let at = Timestamp::from_millisecond((reset * 1000.0) as i64).ok()?;
    Some(until(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            run_retry_budget: 10,
            max_server_wait: Duration::from_secs(60),
        }
    }

    #[test]
    fn statuses_are_classified_as_braze_documents_them() {
        for s in [200, 201, 202, 204] {
            assert_eq!(classify(s), Disposition::Accepted, "{s}");
        }
        for s in [408, 423, 429, 500, 502, 503, 504] {
            assert_eq!(classify(s), Disposition::Retry, "{s}");
        }
        for s in [301, 302, 400, 401, 403, 404, 413, 422] {
            assert_eq!(classify(s), Disposition::Permanent, "{s}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_spans_zero_to_ceiling() {
        let p = policy();
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(p.backoff(6, 1.0), Duration::from_secs(2));
        assert_eq!(p.backoff(1000, 1.0), Duration::from_secs(2));
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(200));
        // Out-of-range randoms are clamped, never negative or over the ceiling.
        assert_eq!(p.backoff(1, 7.0), Duration::from_millis(100));
        assert_eq!(p.backoff(1, -1.0), Duration::ZERO);
    }

    #[test]
    fn server_hint_is_honoured_with_a_little_jitter_and_refused_when_too_long() {
        let p = policy();
        assert_eq!(p.delay(1, Some(Duration::from_secs(3)), 0.0), RetryDelay::Wait(Duration::from_secs(3)));
        assert_eq!(p.delay(4, Some(Duration::from_secs(3)), 1.0), RetryDelay::Wait(Duration::from_millis(3100)));
        assert_eq!(p.delay(1, Some(Duration::from_secs(3600)), 0.5), RetryDelay::TooLong(Duration::from_secs(3600)));
        assert_eq!(p.delay(2, None, 1.0), RetryDelay::Wait(Duration::from_millis(200)));
    }

    #[test]
    fn only_a_rate_limit_answer_names_the_wait() {
        assert!(is_rate_limited(429, None));
        assert!(is_rate_limited(429, Some("12")));
        assert!(is_rate_limited(503, Some(" 0 ")));
        assert!(!is_rate_limited(503, Some("12")));
        assert!(!is_rate_limited(503, None));
        assert!(!is_rate_limited(500, Some("soon")));
        assert!(!is_rate_limited(423, Some("-1")));
    }

    #[test]
    fn wait_hints_are_read_from_either_header() {
        let now: Timestamp = "2024-05-01T12:00:00.250Z".parse().unwrap();
        let hint = |ra, reset| server_wait_hint(ra, reset, now);
        assert_eq!(hint(Some("7"), None), Some(Duration::from_secs(7)));
        assert_eq!(hint(Some(" 0 "), Some("1714564900")), Some(Duration::ZERO));
        assert_eq!(hint(Some("Wed, 01 May 2024 12:00:10 GMT"), None), Some(Duration::from_millis(9750)));
        // Epoch seconds, as Braze's REST API sends them.
        assert_eq!(hint(None, Some("1714564802")), Some(Duration::from_millis(1750)));
        // A reset in the past means retry now.
        assert_eq!(hint(None, Some("1714564000")), Some(Duration::ZERO));
        // Small values are delta seconds.
        assert_eq!(hint(None, Some("30")), Some(Duration::from_secs(30)));
        // Garbage is ignored; a bad Retry-After falls back to the reset header.
        assert_eq!(hint(Some("soon"), None), None);
        assert_eq!(hint(Some("soon"), Some("5")), Some(Duration::from_secs(5)));
        assert_eq!(hint(None, Some("-3")), None);
        assert_eq!(hint(None, Some("NaN")), None);
        assert_eq!(hint(None, None), None);
    }
}
