//! Retrying a failed run before the next scheduled one (`spec.retry`), decided without I/O.
//!
//! A run that failed in a way that can pass on its own is tried again after a backoff that
//! doubles with each retry (from `backoffSeconds`, at most `maxBackoffSeconds`), shortened by
//! up to a quarter — the jitter — so that imports that failed together (a warehouse outage)
//! do not all retry in the same second. The jitter comes from a hash of the failed run's id
//! and the retry's number, not from a random generator: the same failure always gives the
//! same retry time, so the decision stays pure and testable, and an operator that restarts
//! computes what status already says.
//!
//! A retry never runs at or after the next scheduled run: the slot wins (it runs anyway, as
//! a run of its own), so a retry that would come that late is not made.

use jiff::{SignedDuration, Timestamp};

use super::plan::fnv1a64;
use crate::api::RetrySpec;

/// A retry to make: which one (1 for the first) and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub attempt: u32,
    /// Whole seconds, as status keeps times.
    pub at: Timestamp,
}

/// A run that failed, as the retry decision sees it.
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a> {
    /// The failed run's id: the jitter's seed.
    pub run_id: &'a str,
    pub finished_at: Timestamp,
    /// Retries already made of the run that first failed: 0 when the failed run was not a
    /// retry, else the failed retry's number.
    pub retries_done: u32,
    /// Whether the failure can pass on its own (a source or Braze unavailable, a timeout, an
    /// interrupted run), rather than need a person.
    pub transient: bool,
    /// The next scheduled run, if any.
    pub next_slot: Option<Timestamp>,
}

/// The retry `failure` gets under `policy`, if any.
pub fn next_retry(policy: &RetrySpec, failure: &Failure<'_>) -> Option<Retry> {
    if !failure.transient || failure.retries_done >= u32::from(policy.limit) {
        return None;
    }
    let attempt = failure.retries_done + 1;
    let at = failure.finished_at.checked_add(backoff(policy, attempt, failure.run_id)).ok()?;
    let retry = Retry { attempt, at: ceil_second(at)? };
    before_slot(retry.at, failure.next_slot).then_some(retry)
}

/// A retry status recorded, if it still holds under `policy` (which may have been edited
/// since) and before the next scheduled run.
pub fn still_pending(policy: &RetrySpec, retry: Retry, next_slot: Option<Timestamp>) -> Option<Retry> {
    (retry.attempt <= u32::from(policy.limit) && before_slot(retry.at, next_slot)).then_some(retry)
}

/// The wait before retry `attempt` of the run `run_id`: `backoffSeconds` × 2^(attempt − 1),
/// at most `maxBackoffSeconds`, less a jitter of up to a quarter of it.
pub fn backoff(policy: &RetrySpec, attempt: u32, run_id: &str) -> SignedDuration {
    let nominal = nominal_millis(policy, attempt);
    let seed = fnv1a64(format!("{run_id}/{attempt}").as_bytes());
    let jitter = seed % (nominal / 4 + 1);
    SignedDuration::from_millis(i64::try_from(nominal - jitter).unwrap_or(i64::MAX))
}

/// The wait before retry `attempt` without jitter, in milliseconds.
fn nominal_millis(policy: &RetrySpec, attempt: u32) -> u64 {
    let first = u64::from(policy.backoff_seconds) * 1000;
    let max = u64::from(policy.max_backoff_seconds.max(policy.backoff_seconds)) * 1000;
    let factor = 1u64.checked_shl(attempt.saturating_sub(1)).unwrap_or(u64::MAX);
    first.saturating_mul(factor).min(max)
}

fn before_slot(at: Timestamp, next_slot: Option<Timestamp>) -> bool {
    next_slot.is_none_or(|slot| at < slot)
}

/// `at` rounded up to a whole second: never earlier than the backoff says.
fn ceil_second(at: Timestamp) -> Option<Timestamp> {
    let second = at.as_second() + i64::from(at.subsec_nanosecond() > 0);
    Timestamp::from_second(second).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn policy(limit: u8, backoff_seconds: u32, max_backoff_seconds: u32) -> RetrySpec {
        RetrySpec { limit, backoff_seconds, max_backoff_seconds }
    }

    fn failure(retries_done: u32) -> Failure<'static> {
        Failure {
            run_id: "20260302-063000-a1b2",
            finished_at: ts("2026-03-02T06:31:00Z"),
            retries_done,
            transient: true,
            next_slot: Some(ts("2026-03-03T06:30:00Z")),
        }
    }

    #[test]
    fn the_defaults_retry_three_times_from_a_minute_up_to_an_hour() {
        let p = RetrySpec::default();
        assert_eq!((p.limit, p.backoff_seconds, p.max_backoff_seconds), (3, 60, 3600));
        let waits: Vec<i64> = (1..=3).map(|n| backoff(&p, n, "r1").as_millis() as i64).collect();
        for (n, (wait, nominal)) in waits.iter().zip([60_000, 120_000, 240_000]).enumerate() {
            assert!((nominal * 3 / 4..=nominal).contains(wait), "retry {}: {wait} ms", n + 1);
        }
    }

    #[test]
    fn each_retry_waits_longer_up_to_the_maximum() {
        let p = policy(10, 60, 600);
        let nominal: Vec<u64> = (1..=6).map(|n| nominal_millis(&p, n)).collect();
        assert_eq!(nominal, [60_000, 120_000, 240_000, 480_000, 600_000, 600_000]);
        for n in 1..=10 {
            assert!(backoff(&p, n, "r1") <= SignedDuration::from_secs(600));
        }
    }

    #[test]
    fn the_jitter_is_the_same_for_the_same_run_and_differs_between_runs() {
        let p = policy(3, 3600, 3600);
        assert_eq!(backoff(&p, 1, "run-a"), backoff(&p, 1, "run-a"));
        let waits: std::collections::BTreeSet<_> =
            (0..20).map(|i| backoff(&p, 1, &format!("20260302-063000-{i:04x}"))).collect();
        assert!(waits.len() > 15, "imports that failed together spread out: {waits:?}");
    }

    #[test]
    fn a_failure_is_retried_until_the_limit() {
        let p = policy(2, 60, 3600);
        let first = next_retry(&p, &failure(0)).unwrap();
        assert_eq!(first.attempt, 1);
        let wait = first.at.duration_since(ts("2026-03-02T06:31:00Z"));
        assert!(wait >= SignedDuration::from_secs(45) && wait <= SignedDuration::from_secs(60), "{wait:?}");
        assert_eq!(first.at.subsec_nanosecond(), 0, "whole seconds, as status keeps them");
        assert_eq!(next_retry(&p, &failure(1)).map(|r| r.attempt), Some(2));
        assert_eq!(next_retry(&p, &failure(2)), None, "the limit is reached");
        assert_eq!(next_retry(&policy(0, 60, 3600), &failure(0)), None, "limit 0 turns retries off");
    }

    #[test]
    fn a_failure_that_needs_a_person_is_not_retried() {
        let f = Failure { transient: false, ..failure(0) };
        assert_eq!(next_retry(&RetrySpec::default(), &f), None);
    }

    #[test]
    fn the_next_scheduled_run_wins_over_a_later_retry() {
        let hourly = Failure { next_slot: Some(ts("2026-03-02T07:00:00Z")), ..failure(0) };
        assert_eq!(next_retry(&policy(3, 3600, 3600), &hourly), None, "a retry at 07:16+ would pass the slot");
        assert!(next_retry(&policy(3, 60, 3600), &hourly).is_some());
        let once = Failure { next_slot: None, ..failure(0) };
        assert!(next_retry(&policy(3, 86400, 86400), &once).is_some(), "no next run: nothing to wait for");
    }

    #[test]
    fn a_recorded_retry_lapses_when_the_policy_or_the_schedule_moves_past_it() {
        let retry = Retry { attempt: 2, at: ts("2026-03-02T08:00:00Z") };
        let slot = Some(ts("2026-03-03T06:30:00Z"));
        assert_eq!(still_pending(&policy(3, 60, 3600), retry, slot), Some(retry));
        assert_eq!(still_pending(&policy(1, 60, 3600), retry, slot), None, "limit lowered");
        assert_eq!(still_pending(&policy(3, 60, 3600), retry, Some(ts("2026-03-02T07:00:00Z"))), None);
    }

    proptest! {
        #[test]
        fn a_retry_comes_after_the_failure_within_its_backoff_and_before_the_slot(
            limit in 0u8..=10,
            backoff_seconds in 1u32..=86_400,
            max_backoff_seconds in 1u32..=604_800,
            retries_done in 0u32..=12,
            run_id in "[0-9a-f-]{1,24}",
            finished in 1_700_000_000i64..1_900_000_000,
            finished_nanos in 0i32..1_000_000_000,
            slot_after in proptest::option::of(1i64..2_000_000),
        ) {
            let p = policy(limit, backoff_seconds, max_backoff_seconds);
            let finished_at = Timestamp::new(finished, finished_nanos).unwrap();
            let next_slot = slot_after.map(|s| Timestamp::from_second(finished + s).unwrap());
            let f = Failure { run_id: &run_id, finished_at, retries_done, transient: true, next_slot };
            let retry = next_retry(&p, &f);
            prop_assert_eq!(retry, next_retry(&p, &f), "pure: the same failure, the same retry");
            match retry {
                None => {
                    let wait = backoff(&p, retries_done + 1, &run_id);
                    prop_assert!(
                        retries_done >= u32::from(limit)
                            || next_slot.is_some_and(|slot| finished_at + wait >= slot - SignedDuration::from_secs(1))
                    );
                }
                Some(r) => {
                    prop_assert_eq!(r.attempt, retries_done + 1);
                    prop_assert!(r.attempt <= u32::from(limit));
                    prop_assert!(next_slot.is_none_or(|slot| r.at < slot), "the slot wins");
                    let nominal = nominal_millis(&p, r.attempt) as i64;
                    let waited = r.at.duration_since(finished_at).as_millis() as i64;
                    prop_assert!(waited >= nominal - nominal / 4, "{} < 3/4 of {}", waited, nominal);
                    prop_assert!(waited < nominal + 1000, "{} > {}", waited, nominal);
                    prop_assert!(nominal <= i64::from(max_backoff_seconds.max(backoff_seconds)) * 1000);
                    prop_assert_eq!(r.at.subsec_nanosecond(), 0);
                }
            }
        }

        #[test]
        fn nominal_waits_never_shrink_from_one_retry_to_the_next(
            backoff_seconds in 1u32..=86_400,
            max_backoff_seconds in 1u32..=604_800,
            attempt in 1u32..=70,
        ) {
            let p = policy(10, backoff_seconds, max_backoff_seconds);
            prop_assert!(nominal_millis(&p, attempt) <= nominal_millis(&p, attempt + 1));
        }
    }
}
