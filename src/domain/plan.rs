//! What an import does next: run now, record a missed run, or wait — decided from the
//! schedule, the current time and what the status remembers. Pure: the controller gathers
//! the inputs (including `now`) and carries out the decision.
//!
//! The status keeps a *schedule cursor*: which schedule was in force (its [`identity`], a
//! hash of the normalised schedule that no rewording of its description changes) and
//! the newest scheduled run time already handled (run, recorded as missed, or passed over
//! by an edit). A scheduled run is due when the schedule's latest run at or before `now` is
//! newer than the cursor, so a run missed during downtime shows up once however many were
//! missed, and a run never happens twice.
//!
//! When the identity changes — the schedule was edited, the import was suspended or
//! resumed, a conflict began or ended — the cursor restarts at `now`: editing the spec never
//! starts a run by itself, and resuming does not catch up on runs skipped while suspended.
//! The cursor only moves when something happens, so an idle import's status stays the same.

use jiff::{SignedDuration, Timestamp};

use crate::api::{RunTrigger, ScheduleStatus};
use crate::domain::schedule::{Recurrence, Schedule, next_run_after, previous_run_at_or_before};

/// What the status remembers about scheduled runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleCursor {
    /// [`identity`] of the schedule in force, or a hold's name (`Suspended`, `Conflict`).
    pub identity: String,
    /// [`describe`] of the schedule in force, or the hold's name: for people only.
    pub description: String,
    /// The newest scheduled run time already handled; `None` before the first.
    pub handled_through: Option<Timestamp>,
}

impl ScheduleCursor {
    /// The cursor `.status.schedule` holds, for an import whose schedule is now `schedule`.
    ///
    /// Status written before identities existed names the schedule by its description only.
    /// When that is what [`describe`] says of `schedule` (or a hold's name), the cursor
    /// carries on under the identity: an upgrade neither runs a handled slot again nor
    /// passes over a due one. Any other description was another schedule, and does not match.
    pub fn stored(status: &ScheduleStatus, schedule: &Schedule) -> Self {
        let identity = match &status.identity {
            Some(identity) => identity.clone(),
            None if [Hold::Suspended, Hold::Conflict].iter().any(|h| h.name() == status.description) => {
                status.description.clone()
            }
            None if status.description == describe(schedule) => identity(schedule),
            None => format!("description:{}", status.description),
        };
        ScheduleCursor { identity, description: status.description.clone(), handled_through: status.handled_through }
    }

    /// What `.status.schedule` stores.
    pub fn to_status(&self) -> ScheduleStatus {
        ScheduleStatus {
            description: self.description.clone(),
            identity: Some(self.identity.clone()),
            handled_through: self.handled_through,
        }
    }
}

/// Why an import may not start runs right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// `spec.suspend: true`.
    Suspended,
    /// Another, older import owns the same Braze cohort.
    Conflict,
}

impl Hold {
    /// Its name, which is also its cursor identity and description.
    pub fn name(self) -> &'static str {
        match self {
            Hold::Suspended => "Suspended",
            Hold::Conflict => "Conflict",
        }
    }
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub now: Timestamp,
    /// `metadata.creationTimestamp`: the schedule has no runs before it.
    pub created: Timestamp,
    pub schedule: &'a Schedule,
    pub hold: Option<Hold>,
    /// How late a scheduled run may still start; older ones are recorded as missed.
    pub starting_deadline: SignedDuration,
    /// The value of a run request annotation (`cohorts.dev/run-requested-at` or Flux's
    /// `reconcile.fluxcd.io/requestedAt`); the controller passes only one not yet handled.
    pub run_request: Option<&'a str>,
    /// `.status.lastHandledRunRequest`.
    pub last_handled_run_request: Option<&'a str>,
    /// The id of the last run when it was blocked by the removal guard and the
    /// `cohorts.dev/approve-removals` annotation names it: run again, removals approved.
    pub approved_blocked_run: Option<&'a str>,
    /// `.status` cursor; `None` for a new import.
    pub cursor: Option<&'a ScheduleCursor>,
    /// Whether the import ever ran (or recorded a run): its first scheduled run is `Initial`.
    pub has_run_before: bool,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start a run now. `run_request` is the annotation value it handles, if any;
    /// `approved_removals` the blocked run whose removals it may make.
    Run { trigger: RunTrigger, run_request: Option<String>, approved_removals: Option<String> },
    /// The scheduled run at `slot` is past its starting deadline: record it as missed.
    RecordMissed { slot: Timestamp },
    /// Nothing to do until `next_run_at` (or a change, when `None`).
    Wait,
    /// Held; a pending run request, if any, waits for the hold to end.
    Held { hold: Hold, pending_request: bool },
}

/// The decision and the status values that go with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub decision: Decision,
    /// The cursor to store.
    pub cursor: ScheduleCursor,
    /// When the next scheduled run starts; `None` when none is due (held, or `Once` done).
    /// The controller wakes then.
    pub next_run_at: Option<Timestamp>,
}

/// A short description of a schedule, e.g. `Weekly on Monday at 06:30 (Europe/Lisbon)`.
///
/// Status written before [`identity`] existed is matched against this text (see
/// [`ScheduleCursor::stored`]); `descriptions_name_the_schedule` pins it for that reason.
pub fn describe(schedule: &Schedule) -> String {
    let zone = schedule.time_zone.iana_name().unwrap_or("UTC");
    let recurrence = describe_recurrence(&schedule.recurrence, zone);
    if schedule.run_on_create { format!("{recurrence}, first run on creation") } else { recurrence }
}

fn describe_recurrence(recurrence: &Recurrence, zone: &str) -> String {
    match *recurrence {
        Recurrence::Once { at: None } => format!("Once, soon after creation ({zone})"),
        Recurrence::Once { at: Some(at) } => format!("Once at {at} ({zone})"),
        Recurrence::Hourly { minute } => format!("Hourly at {minute} ({zone})"),
        Recurrence::Daily { at } => format!("Daily at {at} ({zone})"),
        Recurrence::Weekly { on, at } => format!("Weekly on {on:?} at {at} ({zone})"),
        Recurrence::Monthly { day, at } => format!("Monthly on day {} at {at} ({zone})", day.get()),
        Recurrence::Cron { ref expression } => format!("Cron {expression} ({zone})"),
    }
}

/// The schedule's identity: a hash of its normalised form, e.g. `s1-9f0c3a61d2b4e877`.
///
/// Equal schedules have equal identities in every version of the operator: the normal form
/// names each field explicitly, and the hash is FNV-1a (64 bit), a fixed published function
/// (unlike `std`'s hashers, whose output may change between Rust releases). A change to the
/// normal form must bump the `s1-` prefix and teach [`ScheduleCursor::stored`] the old one.
pub fn identity(schedule: &Schedule) -> String {
    let zone = schedule.time_zone.iana_name().unwrap_or("UTC");
    let normal = match &schedule.recurrence {
        Recurrence::Once { at: None } => format!("cadence=Once;tz={zone}"),
        Recurrence::Once { at: Some(at) } => format!("cadence=Once;at={at};tz={zone}"),
        Recurrence::Hourly { minute } => format!("cadence=Hourly;minute={};tz={zone}", minute.get()),
        Recurrence::Daily { at } => format!("cadence=Daily;at={at};tz={zone}"),
        Recurrence::Weekly { on, at } => format!("cadence=Weekly;day={on:?};at={at};tz={zone}"),
        Recurrence::Monthly { day, at } => format!("cadence=Monthly;day={};at={at};tz={zone}", day.get()),
        Recurrence::Cron { expression } => format!("cadence=Cron;expression={expression};tz={zone}"),
    };
    // Only when set, so that identities stored before the field existed stay equal.
    let normal = if schedule.run_on_create { format!("{normal};runOnCreate=true") } else { normal };
    format!("s1-{:016x}", fnv1a64(normal.as_bytes()))
}

/// FNV-1a, 64 bit (<http://www.isthe.com/chongo/tech/comp/fnv/>).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Decides what an import that has no run in progress does now.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let now = input.now;
    let (identity, description) = match input.hold {
        Some(hold) => (hold.name().to_owned(), hold.name().to_owned()),
        None => (identity(input.schedule), describe(input.schedule)),
    };
    let handled_through = match input.cursor {
        Some(cursor) if cursor.identity == identity => cursor.handled_through,
        // A changed schedule or a hold starting or ending: runs up to now are passed over.
        Some(_) => Some(now),
        None => None,
    };
    let cursor = ScheduleCursor { identity, description, handled_through };

    let pending_request =
        input.run_request.filter(|value| !value.is_empty() && Some(*value) != input.last_handled_run_request);

    if let Some(hold) = input.hold {
        return Plan {
            decision: Decision::Held { hold, pending_request: pending_request.is_some() },
            cursor,
            next_run_at: None,
        };
    }

    let schedule = input.schedule;
    let due_slot = previous_run_at_or_before(schedule, input.created, now)
        .filter(|&slot| handled_through.is_none_or(|through| slot > through));
    let next_run_at = next_run_after(schedule, input.created, now);

    let approved_removals = input.approved_blocked_run.map(str::to_owned);
    if pending_request.is_some() || approved_removals.is_some() {
        // One run serves the request, the approval and a scheduled run due now.
        let through = due_slot.or(cursor.handled_through);
        return Plan {
            decision: Decision::Run {
                trigger: RunTrigger::Manual,
                run_request: pending_request.map(str::to_owned),
                approved_removals,
            },
            cursor: ScheduleCursor { handled_through: through, ..cursor },
            next_run_at,
        };
    }

    let Some(slot) = due_slot else {
        return Plan { decision: Decision::Wait, cursor, next_run_at };
    };
    let cursor = ScheduleCursor { handled_through: Some(slot), ..cursor };
    // `Once` without `at`, and `runOnCreate`'s run at creation, mean "as soon as the operator
    // sees it": no deadline applies.
    let as_soon_as_possible = matches!(schedule.recurrence, Recurrence::Once { at: None })
        || (schedule.run_on_create && slot == input.created);
    if !as_soon_as_possible && now.duration_since(slot) > input.starting_deadline {
        return Plan { decision: Decision::RecordMissed { slot }, cursor, next_run_at };
    }
    let trigger = if input.has_run_before { RunTrigger::Scheduled } else { RunTrigger::Initial };
    Plan { decision: Decision::Run { trigger, run_request: None, approved_removals: None }, cursor, next_run_at }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::schedule::{DayOfMonth, WallTime};
    use jiff::tz::TimeZone;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn daily(at: &str) -> Schedule {
        Schedule::new(Recurrence::Daily { at: at.parse::<WallTime>().unwrap() }, TimeZone::UTC)
    }

    fn once(at: Option<&str>) -> Schedule {
        Schedule::new(Recurrence::Once { at: at.map(|a| a.parse().unwrap()) }, TimeZone::UTC)
    }

    const CREATED: &str = "2026-03-01T10:00:00Z";

    fn input<'a>(schedule: &'a Schedule, now: &str, cursor: Option<&'a ScheduleCursor>) -> PlanInput<'a> {
        PlanInput {
            now: ts(now),
            created: ts(CREATED),
            schedule,
            hold: None,
            starting_deadline: SignedDuration::from_hours(1),
            run_request: None,
            last_handled_run_request: None,
            approved_blocked_run: None,
            cursor,
            has_run_before: false,
        }
    }

    fn cursor(schedule: &Schedule, through: Option<&str>) -> ScheduleCursor {
        ScheduleCursor {
            identity: identity(schedule),
            description: describe(schedule),
            handled_through: through.map(ts),
        }
    }

    #[test]
    fn new_daily_import_waits_for_its_first_run_time() {
        let s = daily("06:30");
        let p = plan(&input(&s, "2026-03-01T10:00:01Z", None));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.next_run_at, Some(ts("2026-03-02T06:30:00Z")));
        assert_eq!(p.cursor, cursor(&s, None));
    }

    #[test]
    fn first_scheduled_run_is_initial_then_scheduled() {
        let s = daily("06:30");
        let p = plan(&input(&s, "2026-03-02T06:30:00Z", None));
        assert_eq!(
            p.decision,
            Decision::Run { trigger: RunTrigger::Initial, run_request: None, approved_removals: None }
        );
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-02T06:30:00Z")));
        assert_eq!(p.next_run_at, Some(ts("2026-03-03T06:30:00Z")));

        let c = p.cursor;
        let mut i = input(&s, "2026-03-03T06:30:05Z", Some(&c));
        i.has_run_before = true;
        assert_eq!(
            plan(&i).decision,
            Decision::Run { trigger: RunTrigger::Scheduled, run_request: None, approved_removals: None }
        );
    }

    #[test]
    fn a_handled_run_is_not_run_again() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let p = plan(&input(&s, "2026-03-02T07:00:00Z", Some(&c)));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.cursor, c, "the cursor does not move while idle");
        assert_eq!(p.next_run_at, Some(ts("2026-03-03T06:30:00Z")));
    }

    #[test]
    fn idle_plans_are_identical_across_an_hour() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let a = plan(&input(&s, "2026-03-02T08:00:00Z", Some(&c)));
        let b = plan(&input(&s, "2026-03-02T09:00:00Z", Some(&c)));
        assert_eq!(a, b);
    }

    #[test]
    fn missed_runs_within_the_deadline_run_once() {
        let s = daily("06:30");
        // Down from the 2nd to the 5th at 07:00: three runs missed, the last within an hour.
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let mut i = input(&s, "2026-03-05T07:00:00Z", Some(&c));
        i.has_run_before = true;
        let p = plan(&i);
        assert_eq!(
            p.decision,
            Decision::Run { trigger: RunTrigger::Scheduled, run_request: None, approved_removals: None }
        );
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-05T06:30:00Z")));
        // After that run, nothing is due until the next day.
        let c = p.cursor;
        let mut i = input(&s, "2026-03-05T07:10:00Z", Some(&c));
        i.has_run_before = true;
        assert_eq!(plan(&i).decision, Decision::Wait);
    }

    #[test]
    fn missed_runs_past_the_deadline_are_recorded_once() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let p = plan(&input(&s, "2026-03-05T09:00:00Z", Some(&c)));
        assert_eq!(p.decision, Decision::RecordMissed { slot: ts("2026-03-05T06:30:00Z") });
        assert_eq!(p.next_run_at, Some(ts("2026-03-06T06:30:00Z")));
        let c = p.cursor;
        assert_eq!(plan(&input(&s, "2026-03-05T09:00:01Z", Some(&c))).decision, Decision::Wait);
    }

    #[test]
    fn the_deadline_is_inclusive() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let p = plan(&input(&s, "2026-03-03T07:30:00Z", Some(&c)));
        assert!(matches!(p.decision, Decision::Run { .. }));
        let p = plan(&input(&s, "2026-03-03T07:30:01Z", Some(&c)));
        assert!(matches!(p.decision, Decision::RecordMissed { .. }));
    }

    #[test]
    fn once_without_at_runs_soon_after_creation_and_never_again() {
        let s = once(None);
        let p = plan(&input(&s, "2026-03-01T10:00:02Z", None));
        assert_eq!(
            p.decision,
            Decision::Run { trigger: RunTrigger::Initial, run_request: None, approved_removals: None }
        );
        assert_eq!(p.next_run_at, None);
        let c = p.cursor;
        let p = plan(&input(&s, "2026-03-09T00:00:00Z", Some(&c)));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.next_run_at, None);
    }

    #[test]
    fn once_without_at_has_no_deadline() {
        // The operator was down for a day when the import was created.
        let s = once(None);
        let p = plan(&input(&s, "2026-03-02T10:00:00Z", None));
        assert!(matches!(p.decision, Decision::Run { .. }));
    }

    #[test]
    fn once_at_runs_at_that_time() {
        let s = once(Some("12:00"));
        let p = plan(&input(&s, "2026-03-01T10:00:01Z", None));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.next_run_at, Some(ts("2026-03-01T12:00:00Z")));
        let p = plan(&input(&s, "2026-03-01T12:00:00Z", None));
        assert!(matches!(p.decision, Decision::Run { trigger: RunTrigger::Initial, .. }));
        assert_eq!(p.next_run_at, None);
    }

    #[test]
    fn editing_the_schedule_never_starts_a_run() {
        let old = daily("06:30");
        let new = daily("05:00");
        let c = cursor(&old, Some("2026-03-02T06:30:00Z"));
        // At 06:00 on the 3rd, 05:00 is past but was never due under the old schedule.
        let p = plan(&input(&new, "2026-03-03T06:00:00Z", Some(&c)));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.cursor, cursor(&new, Some("2026-03-03T06:00:00Z")));
        assert_eq!(p.next_run_at, Some(ts("2026-03-04T05:00:00Z")));
        // Stable afterwards.
        let c = p.cursor;
        assert_eq!(plan(&input(&new, "2026-03-03T06:30:00Z", Some(&c))).cursor, c);
    }

    #[test]
    fn editing_into_once_does_not_run() {
        let old = daily("06:30");
        let new = once(None);
        let c = cursor(&old, Some("2026-03-02T06:30:00Z"));
        let p = plan(&input(&new, "2026-03-03T06:00:00Z", Some(&c)));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.next_run_at, None);
    }

    #[test]
    fn suspended_imports_do_not_run_and_resume_without_catching_up() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let mut i = input(&s, "2026-03-02T12:00:00Z", Some(&c));
        i.hold = Some(Hold::Suspended);
        let p = plan(&i);
        assert_eq!(p.decision, Decision::Held { hold: Hold::Suspended, pending_request: false });
        assert_eq!(p.next_run_at, None);
        assert_eq!((p.cursor.identity.as_str(), p.cursor.description.as_str()), ("Suspended", "Suspended"));
        // Still suspended a day later: nothing changes.
        let suspended = p.cursor;
        let mut i = input(&s, "2026-03-03T12:00:00Z", Some(&suspended));
        i.hold = Some(Hold::Suspended);
        assert_eq!(plan(&i).cursor, suspended);
        // Resumed at 07:00 on the 4th: the 06:30 run that day is not caught up.
        let p = plan(&input(&s, "2026-03-04T07:00:00Z", Some(&suspended)));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.next_run_at, Some(ts("2026-03-05T06:30:00Z")));
    }

    #[test]
    fn a_run_request_runs_once_per_value() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let mut i = input(&s, "2026-03-02T12:00:00Z", Some(&c));
        i.run_request = Some("2026-03-02T12:00:00Z");
        let p = plan(&i);
        assert_eq!(
            p.decision,
            Decision::Run {
                trigger: RunTrigger::Manual,
                run_request: Some("2026-03-02T12:00:00Z".into()),
                approved_removals: None
            }
        );
        assert_eq!(p.cursor, c, "a manual run leaves the schedule alone");
        i.last_handled_run_request = Some("2026-03-02T12:00:00Z");
        assert_eq!(plan(&i).decision, Decision::Wait);
        i.run_request = Some("again");
        assert!(matches!(plan(&i).decision, Decision::Run { trigger: RunTrigger::Manual, .. }));
    }

    #[test]
    fn an_empty_run_request_is_ignored() {
        let s = daily("06:30");
        let mut i = input(&s, "2026-03-01T12:00:00Z", None);
        i.run_request = Some("");
        assert_eq!(plan(&i).decision, Decision::Wait);
    }

    #[test]
    fn a_request_and_a_due_run_make_one_run() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let mut i = input(&s, "2026-03-03T06:30:00Z", Some(&c));
        i.run_request = Some("x");
        let p = plan(&i);
        assert!(matches!(p.decision, Decision::Run { trigger: RunTrigger::Manual, .. }));
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-03T06:30:00Z")));
    }

    #[test]
    fn an_approved_blocked_run_runs_again_with_removals_approved() {
        let s = daily("06:30");
        let c = cursor(&s, Some("2026-03-02T06:30:00Z"));
        let mut i = input(&s, "2026-03-02T09:00:00Z", Some(&c));
        i.approved_blocked_run = Some("20260302-063000-ab12");
        i.has_run_before = true;
        let p = plan(&i);
        assert_eq!(
            p.decision,
            Decision::Run {
                trigger: RunTrigger::Manual,
                run_request: None,
                approved_removals: Some("20260302-063000-ab12".into())
            }
        );
        assert_eq!(p.cursor, c);
    }

    #[test]
    fn held_requests_wait() {
        let s = daily("06:30");
        let mut i = input(&s, "2026-03-01T12:00:00Z", None);
        i.run_request = Some("x");
        i.hold = Some(Hold::Conflict);
        let p = plan(&i);
        assert_eq!(p.decision, Decision::Held { hold: Hold::Conflict, pending_request: true });
        assert_eq!(p.cursor.identity, "Conflict");
    }

    #[test]
    fn descriptions_name_the_schedule() {
        let tz = TimeZone::get("Europe/Lisbon").unwrap();
        let weekly = Schedule::new(
            Recurrence::Weekly { on: jiff::civil::Weekday::Monday, at: "06:30".parse().unwrap() },
            tz.clone(),
        );
        assert_eq!(describe(&weekly), "Weekly on Monday at 06:30 (Europe/Lisbon)");
        let monthly =
            Schedule::new(Recurrence::Monthly { day: DayOfMonth::new(31).unwrap(), at: "23:00".parse().unwrap() }, tz);
        assert_eq!(describe(&monthly), "Monthly on day 31 at 23:00 (Europe/Lisbon)");
        assert_eq!(describe(&daily("06:30")), "Daily at 06:30 (UTC)");
    }

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn identities_are_stable_and_tell_schedules_apart() {
        // Pinned: status in every cluster holds these; a change re-bases every cursor.
        assert_eq!(identity(&daily("06:30")), format!("s1-{:016x}", fnv1a64(b"cadence=Daily;at=06:30;tz=UTC")));
        assert_eq!(identity(&daily("06:30")), identity(&daily("06:30")));
        assert_ne!(identity(&daily("06:30")), identity(&daily("06:31")));
        assert_ne!(identity(&once(None)), identity(&once(Some("06:30"))));
        let lisbon =
            Schedule::new(Recurrence::Daily { at: "06:30".parse().unwrap() }, TimeZone::get("Europe/Lisbon").unwrap());
        assert_ne!(identity(&daily("06:30")), identity(&lisbon));
        assert!(identity(&lisbon).starts_with("s1-") && identity(&lisbon).len() == 19);
    }

    /// Status as versions before identities wrote it: the description names the schedule.
    fn legacy(description: &str, through: &str) -> ScheduleStatus {
        ScheduleStatus { description: description.into(), identity: None, handled_through: Some(ts(through)) }
    }

    #[test]
    fn an_upgraded_cursor_does_not_run_a_handled_slot_again() {
        let s = daily("06:30");
        let stored = ScheduleCursor::stored(&legacy("Daily at 06:30 (UTC)", "2026-03-02T06:30:00Z"), &s);
        assert_eq!(stored.identity, identity(&s));
        let mut i = input(&s, "2026-03-02T06:45:00Z", Some(&stored));
        i.has_run_before = true;
        let p = plan(&i);
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-02T06:30:00Z")), "the cursor is kept, not reset to now");
        assert_eq!(p.cursor.to_status().identity, Some(identity(&s)), "the identity is written from now on");
    }

    #[test]
    fn an_upgraded_cursor_does_not_miss_a_due_slot() {
        // Upgraded while the 06:30 run on the 3rd was due (within the deadline): it runs.
        let s = daily("06:30");
        let stored = ScheduleCursor::stored(&legacy("Daily at 06:30 (UTC)", "2026-03-02T06:30:00Z"), &s);
        let mut i = input(&s, "2026-03-03T06:40:00Z", Some(&stored));
        i.has_run_before = true;
        let p = plan(&i);
        assert_eq!(
            p.decision,
            Decision::Run { trigger: RunTrigger::Scheduled, run_request: None, approved_removals: None }
        );
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-03T06:30:00Z")));
    }

    #[test]
    fn an_upgraded_hold_stays_held_and_another_description_is_another_schedule() {
        let s = daily("06:30");
        let held = ScheduleCursor::stored(&legacy("Suspended", "2026-03-02T06:30:00Z"), &s);
        let mut i = input(&s, "2026-03-03T12:00:00Z", Some(&held));
        i.hold = Some(Hold::Suspended);
        assert_eq!(plan(&i).cursor.handled_through, Some(ts("2026-03-02T06:30:00Z")));
        // The stored description is of the schedule before an edit: passed over, as before.
        let edited = ScheduleCursor::stored(&legacy("Daily at 05:00 (UTC)", "2026-03-02T05:00:00Z"), &s);
        let p = plan(&input(&s, "2026-03-03T06:40:00Z", Some(&edited)));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-03T06:40:00Z")));
    }

    #[test]
    fn a_reworded_description_keeps_the_cursor() {
        let s = daily("06:30");
        let status = ScheduleStatus {
            description: "Every day at 06:30 UTC".into(),
            identity: Some(identity(&s)),
            handled_through: Some(ts("2026-03-02T06:30:00Z")),
        };
        let p = plan(&input(&s, "2026-03-02T08:00:00Z", Some(&ScheduleCursor::stored(&status, &s))));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.cursor.handled_through, Some(ts("2026-03-02T06:30:00Z")));
        assert_eq!(p.cursor.description, "Daily at 06:30 (UTC)");
    }
}

#[cfg(test)]
mod hourly_and_run_on_create_tests {
    use super::*;
    use crate::domain::schedule::MinuteOfHour;
    use jiff::tz::TimeZone;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const CREATED: &str = "2026-03-01T10:00:00Z";

    fn hourly(minute: u8) -> Schedule {
        Schedule::new(Recurrence::Hourly { minute: MinuteOfHour::new(minute).unwrap() }, TimeZone::UTC)
    }

    fn input<'a>(schedule: &'a Schedule, now: &str, cursor: Option<&'a ScheduleCursor>) -> PlanInput<'a> {
        PlanInput {
            now: ts(now),
            created: ts(CREATED),
            schedule,
            hold: None,
            starting_deadline: SignedDuration::from_hours(1),
            run_request: None,
            last_handled_run_request: None,
            approved_blocked_run: None,
            cursor,
            has_run_before: false,
        }
    }

    fn run(trigger: RunTrigger) -> Decision {
        Decision::Run { trigger, run_request: None, approved_removals: None }
    }

    #[test]
    fn hourly_runs_at_its_minute_every_hour() {
        let s = hourly(15);
        let p = plan(&input(&s, "2026-03-01T10:00:01Z", None));
        assert_eq!(p.decision, Decision::Wait);
        assert_eq!(p.next_run_at, Some(ts("2026-03-01T10:15:00Z")));
        let p = plan(&input(&s, "2026-03-01T10:15:00Z", None));
        assert_eq!(p.decision, run(RunTrigger::Initial));
        assert_eq!(p.next_run_at, Some(ts("2026-03-01T11:15:00Z")));
        let mut i = input(&s, "2026-03-01T11:15:02Z", Some(&p.cursor));
        i.has_run_before = true;
        assert_eq!(plan(&i).decision, run(RunTrigger::Scheduled));
        // Down for three hours: the deadline (an hour) passed, so the newest slot is missed.
        let mut i = input(&s, "2026-03-01T14:20:00Z", Some(&p.cursor));
        i.has_run_before = true;
        assert_eq!(plan(&i).decision, run(RunTrigger::Scheduled), "14:15 is within the deadline");
        let mut i = input(&s, "2026-03-01T13:14:59Z", Some(&p.cursor));
        i.starting_deadline = SignedDuration::from_mins(30);
        assert_eq!(plan(&i).decision, Decision::RecordMissed { slot: ts("2026-03-01T12:15:00Z") });
    }

    #[test]
    fn run_on_create_runs_right_after_creation_once() {
        let s =
            Schedule::new(Recurrence::Daily { at: "06:30".parse().unwrap() }, TimeZone::UTC).with_run_on_create(true);
        let p = plan(&input(&s, "2026-03-01T10:00:02Z", None));
        assert_eq!(p.decision, run(RunTrigger::Initial));
        assert_eq!(p.cursor.handled_through, Some(ts(CREATED)));
        assert_eq!(p.next_run_at, Some(ts("2026-03-02T06:30:00Z")));
        // Seen again (an operator restart): nothing to do until the first slot.
        let mut again = input(&s, "2026-03-01T10:05:00Z", Some(&p.cursor));
        again.has_run_before = true;
        assert_eq!(plan(&again).decision, Decision::Wait);
        // An operator that was down at creation still runs it: no deadline for this run.
        let late = plan(&input(&s, "2026-03-01T23:00:00Z", None));
        assert_eq!(late.decision, run(RunTrigger::Initial));
    }

    #[test]
    fn descriptions_name_hourly_and_run_on_create() {
        assert_eq!(describe(&hourly(5)), "Hourly at :05 (UTC)");
        assert_eq!(describe(&hourly(45).with_run_on_create(true)), "Hourly at :45 (UTC), first run on creation");
    }
}
