//! What a run report says, and who wants one. Pure: no I/O.

use jiff::{SignedDuration, Timestamp, tz::TimeZone};

use crate::api::{EmailNotification, Notifications, NotifyOn, NotifyWhen, RunRecord, RunResult, RunTrigger};

/// One finished run, as the report tells it. Built by the controller from the run it just
/// recorded; carries no secret (the reason and hint must not contain one either).
#[derive(Clone, Debug, PartialEq)]
pub struct RunNotice {
    pub namespace: String,
    /// `metadata.name` of the `CohortImport`.
    pub import_name: String,
    /// `spec.cohort.name`, the display name.
    pub cohort_name: String,
    /// `spec.cohort.id`.
    pub cohort_id: String,
    /// The run's id in `.status.history`, e.g. `20261128-063000-a1b2`.
    pub run_id: String,
    pub result: RunResult,
    pub trigger: RunTrigger,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// `spec.schedule.timeZone`: every time in the report is shown in it.
    pub time_zone: TimeZone,
    /// Members in the source after normalisation and de-duplication.
    pub cohort_size: u64,
    pub added: u64,
    pub removed: u64,
    /// When the next scheduled run starts; `None` when none is due.
    pub next_run_at: Option<Timestamp>,
    /// Why the run failed or was blocked (the run record's message).
    pub reason: Option<String>,
    /// What to do about it. When `None`, the report gives a default for the result.
    pub hint: Option<String>,
    /// The first success after failed, blocked or missed runs (see [`is_recovery`]).
    pub recovered: bool,
    /// The result differs from the previous run's (see [`result_changed`]): what a channel
    /// with `when: Changed` waits for.
    pub changed: bool,
    /// `spec.dryRun`: nothing was sent to Braze; added/removed are what would have been.
    pub dry_run: bool,
}

impl RunNotice {
    /// Wall-clock length of the run; zero if the clock went backwards.
    pub fn duration(&self) -> SignedDuration {
        let d = self.finished_at.duration_since(self.started_at);
        if d.is_negative() { SignedDuration::ZERO } else { d }
    }
}

/// Whether `spec.notifications.email` asks for a report of this run.
///
/// `on` omitted means every result. Beyond the three results `on` can name:
/// - a recovery (`Succeeded` with `recovered`) is also sent to those who asked only for
///   `Failed` or `Blocked`: they were told about the trouble, so they hear it is over;
/// - `DryRun` counts as `Succeeded` (the preview completed);
/// - `Missed` counts as `Failed` (nothing was imported when it should have been).
///
/// An empty `on` list sends nothing.
pub fn should_notify(email: &EmailNotification, result: RunResult, recovered: bool) -> bool {
    wants(email.on.as_deref(), result, recovered)
}

/// Whether a channel with this `on` filter hears of the run: the rules of [`should_notify`],
/// the same for email, Slack and the webhook.
pub fn wants(on: Option<&[NotifyOn]>, result: RunResult, recovered: bool) -> bool {
    let wants = |result: NotifyOn| on.is_none_or(|list| list.contains(&result));
    match result {
        RunResult::Succeeded => {
            wants(NotifyOn::Succeeded) || (recovered && (wants(NotifyOn::Failed) || wants(NotifyOn::Blocked)))
        }
        RunResult::DryRun => wants(NotifyOn::Succeeded),
        RunResult::Failed | RunResult::Missed => wants(NotifyOn::Failed),
        RunResult::Blocked => wants(NotifyOn::Blocked),
    }
}

/// Whether a channel with this `on` filter and `when` hears of `notice`'s run: [`wants`],
/// and with `when: Changed` only a run whose result changed.
pub fn hears(on: Option<&[NotifyOn]>, when: NotifyWhen, notice: &RunNotice) -> bool {
    (when == NotifyWhen::Always || notice.changed) && wants(on, notice.result, notice.recovered)
}

/// Whether any channel of `spec.notifications` hears of the run.
pub fn any_channel_wants(notifications: &Notifications, result: RunResult, recovered: bool, changed: bool) -> bool {
    let email = notifications.email.as_ref().map(|c| (c.on.as_deref(), c.when));
    let slack = notifications.slack.as_ref().map(|c| (c.on.as_deref(), c.when));
    let webhook = notifications.webhook.as_ref().map(|c| (c.on.as_deref(), c.when));
    let pagerduty = notifications.pagerduty.as_ref().map(|c| (c.on.as_deref(), c.when));
    [email, slack, webhook, pagerduty]
        .into_iter()
        .flatten()
        .any(|(on, when)| (when == NotifyWhen::Always || changed) && wants(on, result, recovered))
}

/// The health a result stands for, for `when: Changed`: a dry run completed like a
/// success, a missed run failed to import like a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Healthy,
    Failing,
    Blocked,
}

fn health(result: RunResult) -> Health {
    match result {
        RunResult::Succeeded | RunResult::DryRun => Health::Healthy,
        RunResult::Failed | RunResult::Missed => Health::Failing,
        RunResult::Blocked => Health::Blocked,
    }
}

/// Whether a run with `result` changed the import's health since the previous run (the
/// newest of `previous`, `.status.history` before this run was added; none counts as
/// healthy): the first failure or block, a block turning into a failure or back, and the
/// recovery.
pub fn result_changed(result: RunResult, previous: &[RunRecord]) -> bool {
    let before = previous.first().map_or(Health::Healthy, |run| health(run.result));
    health(result) != before
}

/// Whether a run with `result` is the first success after trouble: the latest earlier run
/// that was not a dry run failed, was blocked or was missed. `previous` is
/// `.status.history` before this run was added, newest first.
pub fn is_recovery(result: RunResult, previous: &[RunRecord]) -> bool {
    if result != RunResult::Succeeded {
        return false;
    }
    previous
        .iter()
        .find(|run| run.result != RunResult::DryRun)
        .is_some_and(|run| matches!(run.result, RunResult::Failed | RunResult::Blocked | RunResult::Missed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::EmailAddress;

    fn email(on: Option<Vec<NotifyOn>>) -> EmailNotification {
        EmailNotification { to: vec![EmailAddress("team@example.com".into())], on, when: Default::default() }
    }

    fn record(result: RunResult) -> RunRecord {
        RunRecord {
            attempt: None,
            id: "r".into(),
            trigger: RunTrigger::Scheduled,
            started_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            finished_at: None,
            result,
            cohort_size: 0,
            added: 0,
            removed: 0,
            would_add: None,
            would_remove: None,
            message: String::new(),
        }
    }

    #[test]
    fn omitted_on_sends_every_result() {
        let e = email(None);
        for result in
            [RunResult::Succeeded, RunResult::Failed, RunResult::Blocked, RunResult::DryRun, RunResult::Missed]
        {
            assert!(should_notify(&e, result, false), "{result:?}");
        }
    }

    #[test]
    fn on_filters_results() {
        let e = email(Some(vec![NotifyOn::Failed]));
        assert!(should_notify(&e, RunResult::Failed, false));
        assert!(should_notify(&e, RunResult::Missed, false));
        assert!(!should_notify(&e, RunResult::Succeeded, false));
        assert!(!should_notify(&e, RunResult::Blocked, false));
        assert!(!should_notify(&e, RunResult::DryRun, false));

        let e = email(Some(vec![NotifyOn::Succeeded]));
        assert!(should_notify(&e, RunResult::Succeeded, false));
        assert!(should_notify(&e, RunResult::DryRun, false));
        assert!(!should_notify(&e, RunResult::Failed, false));

        let e = email(Some(vec![NotifyOn::Blocked]));
        assert!(should_notify(&e, RunResult::Blocked, false));
        assert!(!should_notify(&e, RunResult::Missed, false));
    }

    #[test]
    fn recovery_reaches_those_who_heard_of_the_trouble() {
        assert!(should_notify(&email(Some(vec![NotifyOn::Failed])), RunResult::Succeeded, true));
        assert!(should_notify(&email(Some(vec![NotifyOn::Blocked])), RunResult::Succeeded, true));
        assert!(!should_notify(&email(Some(vec![NotifyOn::Failed])), RunResult::Succeeded, false));
    }

    #[test]
    fn any_channel_that_wants_the_result_is_enough() {
        use crate::api::{SecretKeyRef, SlackNotification};
        let slack = |on| SlackNotification {
            url_secret_ref: SecretKeyRef { name: "s".into(), key: "k".into() },
            on,
            when: Default::default(),
        };
        let n = Notifications {
            email: Some(email(Some(vec![NotifyOn::Succeeded]))),
            slack: Some(slack(Some(vec![NotifyOn::Failed]))),
            webhook: None,
            pagerduty: None,
        };
        assert!(any_channel_wants(&n, RunResult::Failed, false, true));
        assert!(any_channel_wants(&n, RunResult::Succeeded, false, false));
        assert!(!any_channel_wants(&n, RunResult::Blocked, false, true));
        assert!(!any_channel_wants(&Notifications::default(), RunResult::Failed, false, true));
        // A channel waiting for changes does not want a repeated failure.
        let changed_only = Notifications {
            slack: Some(SlackNotification { when: NotifyWhen::Changed, ..slack(None) }),
            ..Notifications::default()
        };
        assert!(!any_channel_wants(&changed_only, RunResult::Failed, false, false));
        assert!(any_channel_wants(&changed_only, RunResult::Failed, false, true));
    }

    #[test]
    fn empty_on_sends_nothing() {
        let e = email(Some(vec![]));
        assert!(!should_notify(&e, RunResult::Failed, false));
        assert!(!should_notify(&e, RunResult::Succeeded, true));
    }

    #[test]
    fn a_change_is_a_new_health_since_the_previous_run() {
        use RunResult::*;
        assert!(!result_changed(Succeeded, &[]), "a first success is no news");
        assert!(result_changed(Failed, &[]), "a first run failing is");
        assert!(result_changed(Failed, &[record(Succeeded), record(Failed)]));
        assert!(!result_changed(Failed, &[record(Failed)]));
        assert!(!result_changed(Missed, &[record(Failed)]));
        assert!(result_changed(Blocked, &[record(Failed)]));
        assert!(result_changed(Succeeded, &[record(Failed), record(Failed)]));
        assert!(!result_changed(DryRun, &[record(Succeeded)]));
        assert!(!result_changed(Succeeded, &[record(DryRun), record(Failed)]), "the newest run decides");
    }

    #[test]
    fn a_changed_channel_hears_only_of_changes() {
        let notice = |result, changed| RunNotice { result, changed, ..crate::notify::render::tests::notice() };
        assert!(hears(None, NotifyWhen::Always, &notice(RunResult::Failed, false)));
        assert!(!hears(None, NotifyWhen::Changed, &notice(RunResult::Failed, false)));
        assert!(hears(None, NotifyWhen::Changed, &notice(RunResult::Failed, true)));
        // `on` still filters: a change to a result the channel does not want sends nothing.
        assert!(!hears(Some(&[NotifyOn::Failed]), NotifyWhen::Changed, &notice(RunResult::Blocked, true)));
    }

    #[test]
    fn recovery_is_the_first_success_after_trouble() {
        use RunResult::*;
        assert!(is_recovery(Succeeded, &[record(Failed), record(Succeeded)]));
        assert!(is_recovery(Succeeded, &[record(Blocked)]));
        assert!(is_recovery(Succeeded, &[record(Missed)]));
        // Dry runs in between do not hide the failure before them.
        assert!(is_recovery(Succeeded, &[record(DryRun), record(Failed)]));
        assert!(!is_recovery(Succeeded, &[record(Succeeded), record(Failed)]));
        assert!(!is_recovery(Succeeded, &[]));
        assert!(!is_recovery(Succeeded, &[record(DryRun)]));
        assert!(!is_recovery(Failed, &[record(Failed)]));
        assert!(!is_recovery(DryRun, &[record(Failed)]));
    }

    #[test]
    fn duration_never_negative() {
        let n = super::super::render::tests::notice();
        assert_eq!(n.duration(), SignedDuration::from_secs(134));
        let backwards = RunNotice { finished_at: n.started_at - SignedDuration::from_secs(5), ..n };
        assert_eq!(backwards.duration(), SignedDuration::ZERO);
    }
}
