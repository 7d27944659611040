//! Fault injection for the Braze endpoints: a rate limit, random 5xx/423 answers, dropped
//! connections, added latency, and a script of faults for the next requests. Decisions are
//! pure given the random number and the clock, so they are unit-tested directly.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Faults to inject; all off by default. Faulted requests are never applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer 429 past this many requests per window, with `x-ratelimit-*` headers.
    pub rate_limit: Option<RateLimit>,
    /// Probability of a 5xx answer (500, 502, 503 or 504).
    pub server_error_rate: f64,
    /// Probability of 423 "resource locked".
    pub locked_rate: f64,
    /// Probability of closing the connection after reading the request, without answering.
    pub drop_rate: f64,
    /// Added to every answer.
    pub latency_ms: u64,
    /// Random extra latency, uniform in `[0, latency_jitter_ms]`.
    pub latency_jitter_ms: u64,
    /// Faults for the next requests, one each, in order, before any other fault applies.
    pub script: VecDeque<ScriptedFault>,
    /// `/users/track` only: attributes objects naming these external ids are answered as
    /// Braze answers objects it refuses — listed in the 201's `errors`
    /// ([`crate::track::ERR_REJECTED_BY_FAULT`]), not applied.
    pub reject_external_ids: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per window (both endpoints together).
    pub requests: u64,
    /// Window length; windows are aligned to the epoch so `x-ratelimit-reset` is exact.
    pub window_ms: u64,
    /// Also send `Retry-After` (Braze documents none; off by default).
    #[serde(default)]
    pub retry_after: bool,
}

/// One scripted fault: an HTTP status (`429`, `503`…), `"drop"`, `{"delay_ms": n}`
/// (answer normally after a delay — for client timeouts), or
/// `{"status": 503, "reset_after_s": 3600, "remaining": 10}`: a status carrying Braze's
/// `x-ratelimit-*` headers with a reset that far away (as Braze's hourly window sends them
/// on every answer, errors included).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScriptedFault {
    Status(u16),
    Drop(DropTag),
    Delay {
        delay_ms: u64,
    },
    WithRateLimit {
        status: u16,
        reset_after_s: u64,
        /// `x-ratelimit-remaining`; requests left in the window.
        #[serde(default = "default_remaining")]
        remaining: u64,
    },
}

fn default_remaining() -> u64 {
    RATE_LIMIT_HEADER_LIMIT / 2
}

/// `x-ratelimit-limit` of a [`ScriptedFault::WithRateLimit`]: Braze's default hourly limit.
const RATE_LIMIT_HEADER_LIMIT: u64 = 250_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropTag {
    Drop,
}

/// What happens to one Braze request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Pass {
        delay: Duration,
        ratelimit: Option<RateLimitHeaders>,
    },
    /// Answer with this status (and headers) instead of handling the request.
    Fail {
        status: u16,
        delay: Duration,
        ratelimit: Option<RateLimitHeaders>,
        retry_after: Option<u64>,
    },
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Epoch seconds at which the window ends.
    pub reset: u64,
}

/// Faults plus the rate-limit window counter.
#[derive(Debug, Default)]
pub struct FaultState {
    pub faults: Faults,
    window: u64,
    used: u64,
    /// The most requests any rate-limit window received, refused ones included.
    peak: u64,
}

impl FaultState {
    pub fn new(faults: Faults) -> Self {
        Self { faults, window: 0, used: 0, peak: 0 }
    }

    /// The most requests one rate-limit window received (429s included) since the faults
    /// were set or [`Self::reset_peak`]: what a client's own budget let through.
    pub fn peak_window_requests(&self) -> u64 {
        self.peak
    }

    pub fn reset_peak(&mut self) {
        self.peak = self.used;
    }

    /// Replaces the faults; the rate-limit window starts afresh.
    pub fn set(&mut self, faults: Faults) {
        *self = Self::new(faults);
    }

    /// Decides one request. `now_ms` is epoch milliseconds; `rand` yields numbers in `[0, 1)`.
    pub fn decide(&mut self, now_ms: u64, mut rand: impl FnMut() -> f64) -> Decision {
        let f = &self.faults;
        let mut delay = Duration::from_millis(f.latency_ms);
        if f.latency_jitter_ms > 0 {
            delay += Duration::from_millis((rand() * (f.latency_jitter_ms + 1) as f64) as u64);
        }
        let ratelimit = f.rate_limit.clone().map(|limit| {
            let window_ms = limit.window_ms.max(1);
            let window = now_ms / window_ms;
            if window != self.window {
                self.window = window;
                self.used = 0;
            }
            self.used += 1;
            self.peak = self.peak.max(self.used);
            let reset = ((window + 1) * window_ms).div_ceil(1000);
            let headers =
                RateLimitHeaders { limit: limit.requests, remaining: limit.requests.saturating_sub(self.used), reset };
            let over = self.used > limit.requests;
            let retry_after = limit.retry_after.then(|| reset.saturating_sub(now_ms / 1000).max(1));
            (headers, over, retry_after)
        });
        let headers = ratelimit.as_ref().map(|r| r.0);
        if let Some(fault) = self.faults.script.pop_front() {
            return match fault {
                ScriptedFault::Status(status) => {
                    Decision::Fail { status, delay, ratelimit: headers, retry_after: None }
                }
                ScriptedFault::Drop(_) => Decision::Drop,
                ScriptedFault::Delay { delay_ms } => {
                    Decision::Pass { delay: delay + Duration::from_millis(delay_ms), ratelimit: headers }
                }
                ScriptedFault::WithRateLimit { status, reset_after_s, remaining } => Decision::Fail {
                    status,
                    delay,
                    ratelimit: Some(RateLimitHeaders {
                        limit: RATE_LIMIT_HEADER_LIMIT,
                        remaining,
                        reset: now_ms / 1000 + reset_after_s,
                    }),
                    retry_after: None,
                },
            };
        }
        let f = &self.faults;
        if f.drop_rate > 0.0 && rand() < f.drop_rate {
            return Decision::Drop;
        }
        if let Some((headers, true, retry_after)) = ratelimit {
            return Decision::Fail { status: 429, delay, ratelimit: Some(headers), retry_after };
        }
        if f.locked_rate > 0.0 && rand() < f.locked_rate {
            return Decision::Fail { status: 423, delay, ratelimit: headers, retry_after: None };
        }
        if f.server_error_rate > 0.0 && rand() < f.server_error_rate {
            let status = [500, 502, 503, 504][((rand() * 4.0) as usize).min(3)];
            return Decision::Fail { status, delay, ratelimit: headers, retry_after: None };
        }
        Decision::Pass { delay, ratelimit: headers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_faults_pass_untouched() {
        let mut state = FaultState::default();
        assert_eq!(state.decide(0, || 0.0), Decision::Pass { delay: Duration::ZERO, ratelimit: None });
    }

    #[test]
    fn rate_limit_counts_per_aligned_window_and_names_the_reset() {
        let mut state = FaultState::new(Faults {
            rate_limit: Some(RateLimit { requests: 2, window_ms: 10_000, retry_after: true }),
            ..Faults::default()
        });
        let now = 1_700_000_003_000; // window [1_700_000_000, 1_700_000_010)
        let headers = |remaining| Some(RateLimitHeaders { limit: 2, remaining, reset: 1_700_000_010 });
        assert_eq!(state.decide(now, || 0.5), Decision::Pass { delay: Duration::ZERO, ratelimit: headers(1) });
        assert_eq!(state.decide(now, || 0.5), Decision::Pass { delay: Duration::ZERO, ratelimit: headers(0) });
        assert_eq!(
            state.decide(now + 500, || 0.5),
            Decision::Fail { status: 429, delay: Duration::ZERO, ratelimit: headers(0), retry_after: Some(7) }
        );
        // The next window admits requests again.
        assert!(matches!(state.decide(1_700_000_010_000, || 0.5), Decision::Pass { .. }));
        assert_eq!(state.peak_window_requests(), 3, "the refused request counts");
        state.reset_peak();
        assert_eq!(state.peak_window_requests(), 1, "the current window so far");
    }

    #[test]
    fn script_goes_first_in_order() {
        let faults: Faults = serde_json::from_str(r#"{"script":[429,"drop",{"delay_ms":5}]}"#).unwrap();
        let mut state = FaultState::new(faults);
        assert!(matches!(state.decide(0, || 0.9), Decision::Fail { status: 429, .. }));
        assert_eq!(state.decide(0, || 0.9), Decision::Drop);
        assert_eq!(state.decide(0, || 0.9), Decision::Pass { delay: Duration::from_millis(5), ratelimit: None });
        assert_eq!(state.decide(0, || 0.9), Decision::Pass { delay: Duration::ZERO, ratelimit: None });
    }

    #[test]
    fn probabilities_and_latency() {
        let mut state = FaultState::new(Faults {
            server_error_rate: 0.5,
            locked_rate: 0.1,
            drop_rate: 0.05,
            latency_ms: 3,
            latency_jitter_ms: 4,
            ..Faults::default()
        });
        // rand sequence: jitter, drop?, locked?, 5xx?, which 5xx
        let mut seq = [0.99, 0.9, 0.9, 0.2, 0.6].into_iter();
        assert_eq!(
            state.decide(0, || seq.next().unwrap()),
            Decision::Fail { status: 503, delay: Duration::from_millis(7), ratelimit: None, retry_after: None }
        );
        let mut seq = [0.0, 0.01].into_iter();
        assert_eq!(state.decide(0, || seq.next().unwrap()), Decision::Drop);
        let mut seq = [0.0, 0.9, 0.05].into_iter();
        assert!(matches!(state.decide(0, || seq.next().unwrap()), Decision::Fail { status: 423, .. }));
        let mut seq = [0.0, 0.9, 0.9, 0.9].into_iter();
        assert!(matches!(state.decide(0, || seq.next().unwrap()), Decision::Pass { .. }));
    }

    #[test]
    fn scripted_statuses_can_carry_a_distant_rate_limit_reset() {
        let faults: Faults = serde_json::from_str(
            r#"{"script":[{"status":503,"reset_after_s":3600},{"status":429,"reset_after_s":5,"remaining":0}]}"#,
        )
        .unwrap();
        let mut state = FaultState::new(faults);
        let headers = |remaining, reset| Some(RateLimitHeaders { limit: 250_000, remaining, reset });
        assert_eq!(
            state.decide(1_700_000_000_500, || 0.9),
            Decision::Fail {
                status: 503,
                delay: Duration::ZERO,
                ratelimit: headers(125_000, 1_700_003_600),
                retry_after: None
            }
        );
        assert_eq!(
            state.decide(1_700_000_000_500, || 0.9),
            Decision::Fail {
                status: 429,
                delay: Duration::ZERO,
                ratelimit: headers(0, 1_700_000_005),
                retry_after: None
            }
        );
    }

    #[test]
    fn unknown_fault_fields_are_refused() {
        assert!(serde_json::from_str::<Faults>(r#"{"error_rate":0.5}"#).is_err());
    }
}
