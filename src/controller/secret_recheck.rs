//! Secrets read by name only (`--watch-secrets=false`).
//!
//! When the operator may only `get` Secrets — the chart's cluster-wide default, so that it
//! can never list every Secret in the cluster — nothing tells it when a missing Secret is
//! created. An import that is `SecretNotFound` then looks again on a short backoff: a
//! quarter of the time it has been waiting (a Secret created a moment after its import is
//! noticed within a second or two), between [`MIN_RECHECK`] and the configured cap. Runs
//! then read their Secrets afresh each time: nothing tells them a key they read is current
//! (with the watch, [`super::secrets::SecretChecks`] keeps the Braze keys by version).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::context::Config;
use crate::api::CohortImportStatus;
use crate::api::ReadyReason;

/// The shortest wait between two looks at a missing Secret.
pub const MIN_RECHECK: Duration = Duration::from_secs(1);

/// When to reconcile `status` again: `next` (the next run), or sooner when Secrets are
/// not watched and one is missing. Pure.
pub fn recheck_at(
    config: &Config,
    status: &CohortImportStatus,
    now: Timestamp,
    next: Option<Timestamp>,
) -> Option<Timestamp> {
    if config.watch_secrets {
        return next;
    }
    let Some(ready) = status.conditions.iter().find(|c| c.type_ == "Ready") else { return next };
    if ReadyReason::SecretNotFound != ready.reason.as_str() {
        return next;
    }
    let waiting = now.duration_since(ready.last_transition_time.0).max(SignedDuration::ZERO);
    let cap = config.missing_secret_recheck.max(MIN_RECHECK);
    let wait = Duration::try_from(waiting / 4).unwrap_or(Duration::ZERO).clamp(MIN_RECHECK, cap);
    let again = now + wait;
    Some(next.map_or(again, |n| n.min(again)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;

    fn status(reason: &str, since: &str) -> CohortImportStatus {
        CohortImportStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason.into(),
                message: String::new(),
                last_transition_time: Time(since.parse().unwrap()),
                observed_generation: None,
            }],
            ..Default::default()
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_missing_secret_is_looked_at_again_soon_then_less_often() {
        let config = Config { watch_secrets: false, ..Config::default() };
        let missing = status("SecretNotFound", "2026-11-29T00:00:00Z");
        let next_run = Some(ts("2026-11-30T06:00:00Z"));
        // Just missing: a second later.
        assert_eq!(
            recheck_at(&config, &missing, ts("2026-11-29T00:00:02Z"), next_run),
            Some(ts("2026-11-29T00:00:03Z"))
        );
        // Missing for a minute: 15 s later.
        assert_eq!(
            recheck_at(&config, &missing, ts("2026-11-29T00:01:00Z"), next_run),
            Some(ts("2026-11-29T00:01:15Z"))
        );
        // Missing for a day: at the cap.
        assert_eq!(
            recheck_at(&config, &missing, ts("2026-11-30T00:00:00Z"), next_run),
            Some(ts("2026-11-30T00:00:30Z"))
        );
        // A run due sooner comes first; an import with no next run still looks again.
        assert_eq!(recheck_at(&config, &missing, ts("2026-11-30T05:59:59Z"), next_run), next_run);
        assert_eq!(recheck_at(&config, &missing, ts("2026-11-29T00:00:00Z"), None), Some(ts("2026-11-29T00:00:01Z")));
    }

    #[test]
    fn only_without_a_watch_and_only_while_a_secret_is_missing() {
        let next = Some(ts("2026-11-30T06:00:00Z"));
        let now = ts("2026-11-29T00:00:10Z");
        let watching = Config::default();
        assert!(watching.watch_secrets);
        assert_eq!(recheck_at(&watching, &status("SecretNotFound", "2026-11-29T00:00:00Z"), now, next), next);
        let config = Config { watch_secrets: false, ..Config::default() };
        assert_eq!(recheck_at(&config, &status("Scheduled", "2026-11-29T00:00:00Z"), now, next), next);
        assert_eq!(recheck_at(&config, &CohortImportStatus::default(), now, None), None);
    }
}
