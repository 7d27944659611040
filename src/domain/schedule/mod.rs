//! When imports run: a [`Schedule`] and the instants it names.
//!
//! A schedule names local wall times in an IANA time zone. Each run date (every day, one
//! weekday, or one day of the month) gives one run at the wall time `at`, turned into an
//! instant this way:
//!
//! - a wall time that exists once runs then;
//! - a wall time skipped by a forward shift (spring forward) runs at the first instant after
//!   the gap, which is the transition itself: `02:30` on the day New York skips
//!   02:00–03:00 runs at 03:00 EDT. (jiff's `compatible` disambiguation would give 03:30, the
//!   wall time moved by the gap's length; the transition is used instead so a run is never
//!   later than needed.)
//! - a wall time repeated by a backward shift (fall back) runs once, at its first
//!   occurrence.
//! - a daily run pushed by a gap onto the next local day (only when a whole day is skipped,
//!   as Samoa did on 2011-12-30, or a gap spans midnight) is merged into that day's own
//!   run, so a daily schedule never runs twice in one local day.
//!
//! A monthly schedule on day 29–31 runs on the last day of shorter months (31 → 30 April,
//! 28 or 29 February).
//!
//! An hourly schedule runs whenever the zone's clock shows minute `MM` (second 0). It follows
//! the clock, not a fixed UTC minute, because in zones offset by 30 or 45 minutes
//! (Asia/Kolkata, Asia/Kathmandu) those differ. Around a shift this means: an hour the clock
//! skips (spring forward) has no run, and an hour it shows twice (fall back) runs twice, once
//! in each occurrence — so where shifts are whole hours, runs stay exactly 60 minutes apart.
//! With Lord Howe's 30-minute shift they are 30 or 90 minutes apart once, around the shift.
//! (The skipped-wall-time rule of the daily cadences would add a run at the transition, a
//! few minutes before the next hour's own run.)
//!
//! A cron schedule ([`Recurrence::Cron`], the expression's rules in [`super::cron`]) runs at
//! every wall time its expression matches, turned into an instant by the same rule as the
//! daily cadences: a skipped wall time runs at the first instant after the gap, a repeated
//! one once, at its first occurrence. So on the day New York skips 02:00–03:00,
//! `*/15 * * * *` runs at 01:45 EST and then once at the transition (03:00 EDT, standing for
//! 02:00–02:45 and 03:00 itself); on the day it repeats 01:00–02:00, it runs 01:00–01:45 EDT
//! and not again until 02:00 EST, an hour and a quarter later. Unlike `Daily`, a run pushed
//! past midnight by a gap is not merged into the next day's runs (a cron expression has no
//! notion of one run a day).
//!
//! `run_on_create` adds one run at the anchor (the creation time) to a recurring schedule:
//! the first run happens right after the resource is created instead of at the first slot.
//!
//! Runs are bounded below by an anchor, the resource's creation time: a schedule has no
//! runs before it, as a CronJob does not run for times before it existed. `Once` has a
//! single run: at the anchor itself without `at` ("as soon as possible"), otherwise at the
//! first occurrence of `at` at or after the anchor.
//!
//! The controller wakes at [`next_run_after`]`(now)` and is due when
//! [`previous_run_at_or_before`]`(now)` is newer than the run it last started; a run missed
//! during downtime therefore shows up once, however many were missed.
//!
//! Everything here is pure: the current time is always a parameter.

pub mod spec;

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp, ToSpan};

use super::cron::CronExpression;

/// A local wall time, minute precision (`HH:MM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime {
    hour: i8,
    minute: i8,
}

impl WallTime {
    /// `None` unless `hour` is 0–23 and `minute` 0–59.
    pub fn new(hour: i8, minute: i8) -> Option<Self> {
        ((0..24).contains(&hour) && (0..60).contains(&minute)).then_some(Self { hour, minute })
    }

    pub fn hour(self) -> i8 {
        self.hour
    }

    pub fn minute(self) -> i8 {
        self.minute
    }

    pub fn time(self) -> Time {
        Time::constant(self.hour, self.minute, 0, 0)
    }
}

/// Text that is not `HH:MM` from `00:00` to `23:59`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a wall time HH:MM from 00:00 to 23:59")]
pub struct InvalidWallTime;

impl FromStr for WallTime {
    type Err = InvalidWallTime;

    /// Exactly two digits, a colon, two digits: the form the CRD schema documents.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() != 5 || b[2] != b':' {
            return Err(InvalidWallTime);
        }
        let two = |hi: u8, lo: u8| {
            (hi.is_ascii_digit() && lo.is_ascii_digit()).then(|| ((hi - b'0') * 10 + (lo - b'0')) as i8)
        };
        let hour = two(b[0], b[1]).ok_or(InvalidWallTime)?;
        let minute = two(b[3], b[4]).ok_or(InvalidWallTime)?;
        WallTime::new(hour, minute).ok_or(InvalidWallTime)
    }
}

impl fmt::Display for WallTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

/// A day of the month, 1–31.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DayOfMonth(i8);

impl DayOfMonth {
    pub fn new(day: u8) -> Option<Self> {
        (1..=31).contains(&day).then_some(Self(day as i8))
    }

    pub fn get(self) -> u8 {
        self.0 as u8
    }

    /// This day in `date`'s month, or the month's last day when the month is shorter.
    fn in_month_of(self, date: Date) -> Date {
        let day = self.0.min(date.days_in_month());
        date.first_of_month().with().day(day).build().expect("day within the month")
    }
}

/// A minute of the hour, 0–59: when an hourly schedule runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MinuteOfHour(i8);

impl MinuteOfHour {
    pub fn new(minute: u8) -> Option<Self> {
        (minute < 60).then_some(Self(minute as i8))
    }

    pub fn get(self) -> u8 {
        self.0 as u8
    }

    /// Seconds from the start of a local hour to this minute.
    fn seconds(self) -> i64 {
        i64::from(self.0) * 60
    }
}

impl fmt::Display for MinuteOfHour {
    /// `:MM`, as a clock shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ":{:02}", self.0)
    }
}

/// Which dates have a run, and at what wall time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recurrence {
    /// A single run: at the anchor (creation time) without `at`, else the first `at` at or
    /// after the anchor.
    Once {
        at: Option<WallTime>,
    },
    /// Every time the zone's clock shows `minute` past the hour.
    Hourly {
        minute: MinuteOfHour,
    },
    Daily {
        at: WallTime,
    },
    Weekly {
        on: Weekday,
        at: WallTime,
    },
    /// On `day`, or the last day of months shorter than `day`.
    Monthly {
        day: DayOfMonth,
        at: WallTime,
    },
    /// At every wall time a five-field cron expression matches.
    Cron {
        expression: CronExpression,
    },
}

/// A recurrence in a time zone. Build one from the API's `ScheduleSpec` with
/// `domain::validate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub recurrence: Recurrence,
    pub time_zone: TimeZone,
    /// One extra run at the anchor (creation time), before the first slot.
    pub run_on_create: bool,
}

impl Schedule {
    pub fn new(recurrence: Recurrence, time_zone: TimeZone) -> Self {
        Self { recurrence, time_zone, run_on_create: false }
    }

    /// The same schedule with (or without) a run at creation.
    pub fn with_run_on_create(self, run_on_create: bool) -> Self {
        Self { run_on_create, ..self }
    }
}

impl Recurrence {
    /// The wall time runs are at; `None` for a `Once` without one.
    fn at(&self) -> Option<WallTime> {
        match *self {
            Recurrence::Once { at } => at,
            Recurrence::Hourly { .. } | Recurrence::Cron { .. } => None,
            Recurrence::Daily { at } | Recurrence::Weekly { at, .. } | Recurrence::Monthly { at, .. } => Some(at),
        }
    }
}

/// How many run dates a search looks at before giving up; only reached at the edge of
/// jiff's supported range (years ±9999), where `None` is returned.
const SEARCH_LIMIT: usize = 16;

/// The earliest run strictly after `after`, or `None` when there is none (a `Once` run
/// already past). `created` is the resource's creation time: no run is before it.
pub fn next_run_after(schedule: &Schedule, created: Timestamp, after: Timestamp) -> Option<Timestamp> {
    let slot = next_slot_after(schedule, created, after);
    let on_create = (schedule.run_on_create && created > after).then_some(created);
    match (on_create, slot) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The latest run at or before `t`, or `None` when there is none (before creation, or a
/// `Once` run still ahead).
pub fn previous_run_at_or_before(schedule: &Schedule, created: Timestamp, t: Timestamp) -> Option<Timestamp> {
    let slot = previous_slot_at_or_before(schedule, created, t);
    let on_create = (schedule.run_on_create && created <= t).then_some(created);
    slot.max(on_create)
}

/// [`next_run_after`] without the run at creation.
fn next_slot_after(schedule: &Schedule, created: Timestamp, after: Timestamp) -> Option<Timestamp> {
    let tz = &schedule.time_zone;
    let step = &schedule.recurrence;
    if let Recurrence::Once { at } = *step {
        return once(tz, at, created).filter(|&run| run > after);
    }
    if let Recurrence::Hourly { minute } = *step {
        // Runs are whole seconds: the first at or after `after` + 1 ns is the first after it.
        let from = after.max(created - SignedDuration::from_nanos(1));
        return hourly_at_or_after(tz, minute, from.checked_add(SignedDuration::from_nanos(1)).ok()?);
    }
    if let Recurrence::Cron { expression } = step {
        return cron_after(tz, expression, after.max(created - SignedDuration::from_nanos(1)));
    }
    // Two days of slack: a run's local date can precede the local date of `after` (folds,
    // gaps pushing a run forward), never by more than a day.
    let from = tz.to_datetime(after.max(created)).date().checked_sub(2.days()).ok()?;
    let mut date = first_run_date_on_or_after(step, from)?;
    for _ in 0..SEARCH_LIMIT {
        if let Some(run) = run_on(schedule, date)
            && run > after
            && run >= created
        {
            return Some(run);
        }
        date = first_run_date_on_or_after(step, date.tomorrow().ok()?)?;
    }
    None
}

/// [`previous_run_at_or_before`] without the run at creation.
fn previous_slot_at_or_before(schedule: &Schedule, created: Timestamp, t: Timestamp) -> Option<Timestamp> {
    let tz = &schedule.time_zone;
    let step = &schedule.recurrence;
    if let Recurrence::Once { at } = *step {
        return once(tz, at, created).filter(|&run| run <= t);
    }
    if t < created {
        return None;
    }
    if let Recurrence::Hourly { minute } = *step {
        return hourly_at_or_before(tz, minute, t).filter(|&run| run >= created);
    }
    if let Recurrence::Cron { expression } = step {
        return cron_at_or_before(tz, expression, t).filter(|&run| run >= created);
    }
    let from = tz.to_datetime(t).date().checked_add(2.days()).ok()?;
    let mut date = last_run_date_on_or_before(step, from)?;
    for _ in 0..SEARCH_LIMIT {
        if let Some(run) = run_on(schedule, date)
            && run <= t
        {
            return (run >= created).then_some(run);
        }
        date = last_run_date_on_or_before(step, date.yesterday().ok()?)?;
    }
    None
}

/// The first instant at or after `from` at which `tz`'s clock shows `minute` past the hour.
///
/// Between two transitions the offset is fixed, so the runs are every 3600 s from the first
/// one; the search walks from one such stretch to the next.
fn hourly_at_or_after(tz: &TimeZone, minute: MinuteOfHour, mut from: Timestamp) -> Option<Timestamp> {
    for _ in 0..SEARCH_LIMIT {
        let offset = i64::from(tz.to_offset(from).seconds());
        let end = tz.following(from).map(|t| t.timestamp()).find(|&t| t > from);
        let mut second = from.as_second();
        if Timestamp::from_second(second).ok()? < from {
            second += 1;
        }
        let run = second + (minute.seconds() - (second + offset)).rem_euclid(3600);
        let run = Timestamp::from_second(run).ok()?;
        match end {
            Some(end) if run >= end => from = end,
            _ => return Some(run),
        }
    }
    None
}

/// The last instant at or before `to` at which `tz`'s clock shows `minute` past the hour.
fn hourly_at_or_before(tz: &TimeZone, minute: MinuteOfHour, mut to: Timestamp) -> Option<Timestamp> {
    for _ in 0..SEARCH_LIMIT {
        let offset = i64::from(tz.to_offset(to).seconds());
        // The transition that put this offset in force (`preceding` may exclude `to` itself).
        let start =
            tz.preceding(to.checked_add(SignedDuration::from_nanos(1)).ok()?).map(|t| t.timestamp()).find(|&t| t <= to);
        let mut second = to.as_second();
        if Timestamp::from_second(second).ok()? > to {
            second -= 1;
        }
        let run = second - (second + offset - minute.seconds()).rem_euclid(3600);
        let run = Timestamp::from_second(run).ok()?;
        match start {
            Some(start) if run < start => to = start.checked_sub(SignedDuration::from_nanos(1)).ok()?,
            _ => return Some(run),
        }
    }
    None
}

/// How many matching wall times a cron search looks at before giving up: a fold of a day
/// (the longest any zone has had) holds at most 1440 that run earlier.
const CRON_SEARCH_LIMIT: usize = 1442;

/// The first cron run strictly after `after`.
///
/// A wall time runs at [`instant_of`] it, which never decreases as the wall time grows: so
/// the first matching wall time after `after`'s own whose instant is after `after` is the
/// answer. Only in a fold are matching wall times passed over (their first occurrence is
/// already behind).
fn cron_after(tz: &TimeZone, expression: &CronExpression, after: Timestamp) -> Option<Timestamp> {
    let mut wall = expression.next_after(tz.to_datetime(after))?;
    for _ in 0..CRON_SEARCH_LIMIT {
        let run = instant_of(tz, wall)?;
        if run > after {
            return Some(run);
        }
        wall = expression.next_after(wall)?;
    }
    None
}

/// The last cron run at or before `t`.
///
/// A wall time later than `t`'s own runs at or before `t` only when `t` is in the second
/// occurrence of a fold and the wall time's first occurrence is behind it, so the search
/// starts that far ahead: by the largest backward shift in the day before `t`.
fn cron_at_or_before(tz: &TimeZone, expression: &CronExpression, t: Timestamp) -> Option<Timestamp> {
    let ahead = tz.to_datetime(t).checked_add(fold_reach(tz, t)).ok()?;
    let mut wall = expression.previous_at_or_before(ahead)?;
    for _ in 0..CRON_SEARCH_LIMIT {
        let run = instant_of(tz, wall)?;
        if run <= t {
            return Some(run);
        }
        wall = expression.previous_at_or_before(wall.checked_sub(SignedDuration::from_secs(1)).ok()?)?;
    }
    None
}

/// How far `tz`'s clock shows a later time before `t` than at `t`, within the day before:
/// the largest offset in force then, less the offset at `t` (zero without a backward shift).
fn fold_reach(tz: &TimeZone, t: Timestamp) -> SignedDuration {
    let now = tz.to_offset(t).seconds();
    let day_before = t - SignedDuration::from_hours(24);
    let most = tz
        .preceding(t.checked_add(SignedDuration::from_nanos(1)).unwrap_or(t))
        .map(|transition| transition.timestamp())
        .take_while(|&at| at > day_before)
        .take(SEARCH_LIMIT)
        .map(|at| tz.to_offset(at - SignedDuration::from_nanos(1)).seconds())
        .max()
        .unwrap_or(now);
    SignedDuration::from_secs(i64::from((most - now).max(0)))
}

/// The single run of a `Once` schedule.
fn once(tz: &TimeZone, at: Option<WallTime>, created: Timestamp) -> Option<Timestamp> {
    let Some(at) = at else { return Some(created) };
    let mut date = tz.to_datetime(created).date().yesterday().ok()?;
    for _ in 0..4 {
        if let Some(run) = instant_of(tz, date.to_datetime(at.time()))
            && run >= created
        {
            return Some(run);
        }
        date = date.tomorrow().ok()?;
    }
    None
}

/// The run for run date `date` of a recurring schedule, if it has one of its own.
fn run_on(schedule: &Schedule, date: Date) -> Option<Timestamp> {
    let tz = &schedule.time_zone;
    let run = instant_of(tz, date.to_datetime(schedule.recurrence.at()?.time()))?;
    if matches!(schedule.recurrence, Recurrence::Daily { .. }) && tz.to_datetime(run).date() != date {
        // Pushed onto a later day by a gap; that day's own run stands for it.
        return None;
    }
    Some(run)
}

fn first_run_date_on_or_after(recurrence: &Recurrence, date: Date) -> Option<Date> {
    match *recurrence {
        Recurrence::Once { .. } | Recurrence::Hourly { .. } | Recurrence::Cron { .. } | Recurrence::Daily { .. } => {
            Some(date)
        }
        Recurrence::Weekly { on, .. } => date.checked_add(i64::from(date.weekday().until(on)).days()).ok(),
        Recurrence::Monthly { day, .. } => {
            let this_month = day.in_month_of(date);
            if this_month >= date {
                Some(this_month)
            } else {
                let next_month = date.last_of_month().tomorrow().ok()?;
                Some(day.in_month_of(next_month))
            }
        }
    }
}

fn last_run_date_on_or_before(recurrence: &Recurrence, date: Date) -> Option<Date> {
    match *recurrence {
        Recurrence::Once { .. } | Recurrence::Hourly { .. } | Recurrence::Cron { .. } | Recurrence::Daily { .. } => {
            Some(date)
        }
        Recurrence::Weekly { on, .. } => date.checked_sub(i64::from(on.until(date.weekday())).days()).ok(),
        Recurrence::Monthly { day, .. } => {
            let this_month = day.in_month_of(date);
            if this_month <= date {
                Some(this_month)
            } else {
                let previous_month = date.first_of_month().yesterday().ok()?;
                Some(day.in_month_of(previous_month))
            }
        }
    }
}

/// The instant a local wall time runs at: itself when it exists once, its first occurrence
/// when it exists twice, the end of the gap (the transition instant) when it is skipped.
fn instant_of(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    let ambiguous = tz.to_ambiguous_timestamp(dt);
    match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        // The offset in force before a backward shift is the larger one, so the earlier
        // instant.
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the offset after the shift, a skipped wall time names an instant
            // shortly before the transition; the transition is the next one into `after`.
            let before_gap = after.to_timestamp(dt).ok()?;
            tz.following(before_gap)
                .take(4)
                .find(|transition| transition.offset() == after)
                .map(|transition| transition.timestamp())
                .or_else(|| ambiguous.later().ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;
    use proptest::prelude::*;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn at(s: &str) -> WallTime {
        s.parse().unwrap()
    }

    fn daily(zone: &str, wall: &str) -> Schedule {
        Schedule::new(Recurrence::Daily { at: at(wall) }, tz(zone))
    }

    fn weekly(zone: &str, on: Weekday, wall: &str) -> Schedule {
        Schedule::new(Recurrence::Weekly { on, at: at(wall) }, tz(zone))
    }

    fn monthly(zone: &str, day: u8, wall: &str) -> Schedule {
        Schedule::new(Recurrence::Monthly { day: DayOfMonth::new(day).unwrap(), at: at(wall) }, tz(zone))
    }

    /// A creation time long before every table case.
    fn long_ago() -> Timestamp {
        ts("2000-01-01T00:00:00Z")
    }

    fn next(s: &Schedule, after: &str) -> String {
        next_run_after(s, long_ago(), ts(after)).unwrap().to_string()
    }

    fn prev(s: &Schedule, t: &str) -> String {
        previous_run_at_or_before(s, long_ago(), ts(t)).unwrap().to_string()
    }

    #[test]
    fn wall_time_parses_only_hh_mm() {
        assert_eq!(at("00:00"), WallTime::new(0, 0).unwrap());
        assert_eq!(at("23:59"), WallTime::new(23, 59).unwrap());
        assert_eq!(at("07:05").to_string(), "07:05");
        for bad in ["24:00", "7:05", "07:5", "07-05", "07:60", " 07:05", "", "0a:00", "07:05:00"] {
            assert_eq!(bad.parse::<WallTime>(), Err(InvalidWallTime), "{bad:?}");
        }
    }

    #[test]
    fn day_of_month_is_1_to_31() {
        assert!(DayOfMonth::new(0).is_none());
        assert!(DayOfMonth::new(32).is_none());
        assert_eq!(DayOfMonth::new(31).unwrap().get(), 31);
    }

    #[test]
    fn utc_daily_day_boundary() {
        let s = daily("UTC", "00:00");
        // Exactly at a run: the next one is a day later (strictly after).
        assert_eq!(next(&s, "2024-06-01T00:00:00Z"), "2024-06-02T00:00:00Z");
        assert_eq!(next(&s, "2024-05-31T23:59:59.999999999Z"), "2024-06-01T00:00:00Z");
        assert_eq!(prev(&s, "2024-06-01T00:00:00Z"), "2024-06-01T00:00:00Z");
        assert_eq!(prev(&s, "2024-05-31T23:59:59Z"), "2024-05-31T00:00:00Z");
        let late = daily("UTC", "23:59");
        assert_eq!(next(&late, "2024-12-31T23:59:00Z"), "2025-01-01T23:59:00Z");
        assert_eq!(next(&late, "2024-12-31T23:58:59Z"), "2024-12-31T23:59:00Z");
    }

    #[test]
    fn lisbon_day_boundary_uses_local_midnight() {
        // Summer: Lisbon is UTC+1, so local midnight is 23:00Z the day before.
        let s = daily("Europe/Lisbon", "00:00");
        assert_eq!(next(&s, "2024-07-01T22:59:59Z"), "2024-07-01T23:00:00Z");
        assert_eq!(next(&s, "2024-07-01T23:00:00Z"), "2024-07-02T23:00:00Z");
        // Winter: UTC+0.
        assert_eq!(next(&s, "2024-01-01T00:00:00Z"), "2024-01-02T00:00:00Z");
    }

    #[test]
    fn lisbon_gap_runs_at_transition() {
        // 2024-03-31 01:00 WET → 02:00 WEST: 01:30 does not exist.
        let s = daily("Europe/Lisbon", "01:30");
        assert_eq!(next(&s, "2024-03-30T12:00:00Z"), "2024-03-31T01:00:00Z");
        let run = ts("2024-03-31T01:00:00Z").to_zoned(tz("Europe/Lisbon"));
        assert_eq!(run.time(), Time::constant(2, 0, 0, 0));
        assert_eq!(next(&s, "2024-03-31T01:00:00Z"), "2024-04-01T00:30:00Z");
    }

    #[test]
    fn lisbon_fold_runs_once_at_first_occurrence() {
        // 2024-10-27 02:00 WEST → 01:00 WET: 01:30 happens at 00:30Z and again at 01:30Z.
        let s = daily("Europe/Lisbon", "01:30");
        assert_eq!(next(&s, "2024-10-26T12:00:00Z"), "2024-10-27T00:30:00Z");
        assert_eq!(next(&s, "2024-10-27T00:30:00Z"), "2024-10-28T01:30:00Z");
        assert_eq!(prev(&s, "2024-10-27T01:45:00Z"), "2024-10-27T00:30:00Z");
    }

    #[test]
    fn new_york_gap_and_fold() {
        // 2024-03-10 02:00 EST → 03:00 EDT. jiff's `compatible` would say 03:30 EDT.
        let s = daily("America/New_York", "02:30");
        assert_eq!(next(&s, "2024-03-09T12:00:00Z"), "2024-03-10T07:00:00Z");
        assert_eq!(next(&s, "2024-03-10T07:00:00Z"), "2024-03-11T06:30:00Z");
        // 2024-11-03 02:00 EDT → 01:00 EST: 01:30 EDT is 05:30Z, 01:30 EST is 06:30Z.
        let s = daily("America/New_York", "01:30");
        assert_eq!(next(&s, "2024-11-02T12:00:00Z"), "2024-11-03T05:30:00Z");
        assert_eq!(next(&s, "2024-11-03T05:30:00Z"), "2024-11-04T06:30:00Z");
        assert_eq!(prev(&s, "2024-11-03T06:30:00Z"), "2024-11-03T05:30:00Z");
        // A wall time next to the gap is untouched.
        let s = daily("America/New_York", "03:00");
        assert_eq!(next(&s, "2024-03-09T12:00:00Z"), "2024-03-10T07:00:00Z");
    }

    #[test]
    fn lord_howe_half_hour_shifts() {
        // 2024-10-06 02:00 +10:30 → 02:30 +11: 02:15 does not exist; the transition is
        // 02:00 +10:30 = 15:30Z the day before.
        let s = daily("Australia/Lord_Howe", "02:15");
        assert_eq!(next(&s, "2024-10-05T00:00:00Z"), "2024-10-05T15:30:00Z");
        assert_eq!(next(&s, "2024-10-05T15:30:00Z"), "2024-10-06T15:15:00Z");
        // 2024-04-07 02:00 +11 → 01:30 +10:30: 01:45 happens at 14:45Z and 15:15Z.
        let s = daily("Australia/Lord_Howe", "01:45");
        assert_eq!(next(&s, "2024-04-06T00:00:00Z"), "2024-04-06T14:45:00Z");
        assert_eq!(next(&s, "2024-04-06T14:45:00Z"), "2024-04-07T15:15:00Z");
    }

    #[test]
    fn monthly_day_31_runs_on_shorter_months_last_day() {
        let s = monthly("UTC", 31, "09:00");
        assert_eq!(next(&s, "2024-03-31T09:00:00Z"), "2024-04-30T09:00:00Z");
        assert_eq!(next(&s, "2024-04-30T09:00:00Z"), "2024-05-31T09:00:00Z");
        assert_eq!(next(&s, "2024-02-01T00:00:00Z"), "2024-02-29T09:00:00Z");
        assert_eq!(next(&s, "2023-02-01T00:00:00Z"), "2023-02-28T09:00:00Z");
        assert_eq!(prev(&s, "2024-05-30T00:00:00Z"), "2024-04-30T09:00:00Z");
        assert_eq!(prev(&s, "2024-03-01T00:00:00Z"), "2024-02-29T09:00:00Z");
    }

    #[test]
    fn monthly_day_29_and_30_in_february() {
        let s29 = monthly("UTC", 29, "00:00");
        assert_eq!(next(&s29, "2023-02-01T00:00:00Z"), "2023-02-28T00:00:00Z");
        assert_eq!(next(&s29, "2024-02-01T00:00:00Z"), "2024-02-29T00:00:00Z");
        assert_eq!(next(&s29, "2024-02-29T00:00:00Z"), "2024-03-29T00:00:00Z");
        let s30 = monthly("UTC", 30, "00:00");
        assert_eq!(next(&s30, "2024-01-30T00:00:00Z"), "2024-02-29T00:00:00Z");
        assert_eq!(next(&s30, "2100-02-01T00:00:00Z"), "2100-02-28T00:00:00Z");
        assert_eq!(next(&s30, "2000-02-01T00:00:00Z"), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn monthly_in_new_york_across_the_year_end() {
        let s = monthly("America/New_York", 1, "06:00");
        assert_eq!(next(&s, "2024-12-02T00:00:00Z"), "2025-01-01T11:00:00Z");
        assert_eq!(next(&s, "2025-06-01T09:59:59Z"), "2025-06-01T10:00:00Z");
    }

    #[test]
    fn weekly_runs_on_the_named_day() {
        // 2024-01-01 is a Monday.
        let s = weekly("UTC", Weekday::Monday, "06:00");
        assert_eq!(next(&s, "2024-01-01T05:59:59Z"), "2024-01-01T06:00:00Z");
        assert_eq!(next(&s, "2024-01-01T06:00:00Z"), "2024-01-08T06:00:00Z");
        assert_eq!(next(&s, "2023-12-30T00:00:00Z"), "2024-01-01T06:00:00Z");
        assert_eq!(prev(&s, "2024-01-07T23:59:59Z"), "2024-01-01T06:00:00Z");
        // Sunday in Lisbon across the spring-forward gap (2024-03-31 is a Sunday).
        let s = weekly("Europe/Lisbon", Weekday::Sunday, "01:15");
        assert_eq!(next(&s, "2024-03-25T00:00:00Z"), "2024-03-31T01:00:00Z");
        assert_eq!(next(&s, "2024-03-31T01:00:00Z"), "2024-04-07T00:15:00Z");
        // Sunday in Lord Howe (UTC+11 in January), local day ahead of UTC.
        let s = weekly("Australia/Lord_Howe", Weekday::Sunday, "08:00");
        assert_eq!(next(&s, "2024-01-06T00:00:00Z"), "2024-01-06T21:00:00Z");
    }

    #[test]
    fn samoa_skipped_day() {
        // Pacific/Apia skipped 2011-12-30: 2011-12-29 24:00 -10 became 2011-12-31 00:00 +14.
        let daily = daily("Pacific/Apia", "10:00");
        assert_eq!(next(&daily, "2011-12-29T20:00:00Z"), "2011-12-30T20:00:00Z");
        // The daily run of the missing day merges into Dec 31's run.
        assert_eq!(prev(&daily, "2011-12-30T19:59:59Z"), "2011-12-29T20:00:00Z");
        // A weekly Friday run still happens, at the first instant after the gap.
        let friday = weekly("Pacific/Apia", Weekday::Friday, "10:00");
        assert_eq!(next(&friday, "2011-12-24T00:00:00Z"), "2011-12-30T10:00:00Z");
    }

    #[test]
    fn runs_start_at_creation() {
        let s = daily("UTC", "06:00");
        let created = ts("2024-05-01T06:00:01Z");
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-05-01T12:00:00Z")), None);
        assert_eq!(next_run_after(&s, created, ts("2024-04-01T00:00:00Z")), Some(ts("2024-05-02T06:00:00Z")));
        // A run exactly at creation counts.
        let created = ts("2024-05-01T06:00:00Z");
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-05-01T12:00:00Z")), Some(created));
    }

    #[test]
    fn once_without_at_runs_at_creation() {
        let s = Schedule::new(Recurrence::Once { at: None }, tz("UTC"));
        let created = ts("2024-05-01T10:00:00Z");
        assert_eq!(next_run_after(&s, created, ts("2024-05-01T09:00:00Z")), Some(created));
        assert_eq!(next_run_after(&s, created, created), None);
        assert_eq!(previous_run_at_or_before(&s, created, created), Some(created));
        assert_eq!(previous_run_at_or_before(&s, created, ts("2030-01-01T00:00:00Z")), Some(created));
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-05-01T09:59:59Z")), None);
    }

    #[test]
    fn once_with_at_runs_at_its_first_occurrence_after_creation() {
        let created = ts("2024-05-01T10:00:00Z");
        let later_today = Schedule::new(Recurrence::Once { at: Some(at("11:00")) }, tz("UTC"));
        assert_eq!(next_run_after(&later_today, created, created), Some(ts("2024-05-01T11:00:00Z")));
        let tomorrow = Schedule::new(Recurrence::Once { at: Some(at("09:00")) }, tz("UTC"));
        assert_eq!(next_run_after(&tomorrow, created, created), Some(ts("2024-05-02T09:00:00Z")));
        assert_eq!(next_run_after(&tomorrow, created, ts("2024-05-02T09:00:00Z")), None);
        assert_eq!(
            previous_run_at_or_before(&tomorrow, created, ts("2024-06-01T00:00:00Z")),
            Some(ts("2024-05-02T09:00:00Z"))
        );
        // In New York, 02:30 on the spring-forward day runs at the transition.
        let gap = Schedule::new(Recurrence::Once { at: Some(at("02:30")) }, tz("America/New_York"));
        assert_eq!(
            next_run_after(&gap, ts("2024-03-10T01:00:00Z"), ts("2024-03-10T01:00:00Z")),
            Some(ts("2024-03-10T07:00:00Z"))
        );
    }

    // ---- properties ----

    const ZONES: &[&str] = &[
        "UTC",
        "Europe/Lisbon",
        "America/New_York",
        "Australia/Lord_Howe",
        "Pacific/Apia",
        "America/Sao_Paulo",
        "Asia/Kathmandu",
        "Asia/Kolkata",
        "America/St_Johns",
        "Pacific/Chatham",
    ];

    fn weekday() -> impl Strategy<Value = Weekday> {
        (0i8..7).prop_map(|n| Weekday::from_monday_zero_offset(n).unwrap())
    }

    fn wall_time() -> impl Strategy<Value = WallTime> {
        // Weight the hours where shifts happen.
        let hour = prop_oneof![0i8..4, 22i8..24, 0i8..24];
        let minute = prop_oneof![Just(0i8), Just(30), Just(45), 0i8..60];
        (hour, minute).prop_map(|(h, m)| WallTime::new(h, m).unwrap())
    }

    fn recurring() -> impl Strategy<Value = Recurrence> {
        prop_oneof![
            wall_time().prop_map(|at| Recurrence::Daily { at }),
            (weekday(), wall_time()).prop_map(|(on, at)| Recurrence::Weekly { on, at }),
            (1u8..=31, wall_time()).prop_map(|(d, at)| Recurrence::Monthly { day: DayOfMonth::new(d).unwrap(), at }),
        ]
    }

    fn minute_of_hour() -> impl Strategy<Value = MinuteOfHour> {
        prop_oneof![Just(0u8), Just(15), Just(30), Just(45), 0u8..60].prop_map(|m| MinuteOfHour::new(m).unwrap())
    }

    fn any_recurrence() -> impl Strategy<Value = Recurrence> {
        prop_oneof![
            4 => recurring(),
            1 => minute_of_hour().prop_map(|minute| Recurrence::Hourly { minute }),
            1 => proptest::option::of(wall_time()).prop_map(|at| Recurrence::Once { at }),
        ]
    }

    /// Brute-force reference for hourly runs: the first whole minute at or after `from`
    /// whose local time is `minute` past the hour. (Every offset since 1995 is whole minutes,
    /// so runs fall on whole UTC minutes.)
    fn reference_hourly(tz: &TimeZone, minute: MinuteOfHour, from: Timestamp) -> Timestamp {
        let mut t = Timestamp::from_second(from.as_second().div_euclid(60) * 60).unwrap();
        while t < from {
            t += SignedDuration::from_mins(1);
        }
        loop {
            let local = tz.to_datetime(t);
            if local.minute() as u8 == minute.get() && local.second() == 0 {
                return t;
            }
            t += SignedDuration::from_mins(1);
        }
    }

    /// An instant up to three hours before one of `tz`'s transitions.
    fn before_a_shift() -> impl Strategy<Value = (TimeZone, Timestamp)> {
        (zone(), instant(), 0i64..10_800).prop_map(|(tz, base, before)| {
            let shift = tz.following(base).next().map_or(base, |t| t.timestamp());
            (tz, shift - SignedDuration::from_secs(before))
        })
    }

    fn zone() -> impl Strategy<Value = TimeZone> {
        proptest::sample::select(ZONES).prop_map(tz)
    }

    /// Instants from 1995 to 2045, to the second.
    fn instant() -> impl Strategy<Value = Timestamp> {
        (788_918_400i64..2_366_755_200).prop_map(|s| Timestamp::from_second(s).unwrap())
    }

    /// (creation, now) with now at or after creation, by up to ~400 days.
    fn created_and_now() -> impl Strategy<Value = (Timestamp, Timestamp)> {
        (instant(), 0i64..35_000_000)
            .prop_map(|(created, secs)| (created, created.checked_add(SignedDuration::from_secs(secs)).unwrap()))
    }

    /// A schedule case aimed at a time zone shift: `at` within three hours of a transition's
    /// local time, `now` up to three days before it, creation up to a year before `now`.
    fn near_a_shift() -> impl Strategy<Value = (Recurrence, TimeZone, Timestamp, Timestamp)> {
        (zone(), instant(), -180i64..180, 0i64..259_200, 0i64..31_536_000, recurring()).prop_map(
            |(tz, base, minutes, before, age, r)| {
                let shift = tz.following(base).next().map_or(base, |t| t.timestamp());
                let local = tz.to_datetime(shift).time();
                let wall = local.wrapping_add(SignedDuration::from_mins(minutes));
                let at = WallTime::new(wall.hour(), wall.minute()).unwrap();
                let r = match r {
                    Recurrence::Daily { .. }
                    | Recurrence::Once { .. }
                    | Recurrence::Hourly { .. }
                    | Recurrence::Cron { .. } => Recurrence::Daily { at },
                    Recurrence::Weekly { .. } => {
                        // On the weekday of the shift, so the run meets it.
                        Recurrence::Weekly { on: tz.to_datetime(shift).weekday(), at }
                    }
                    Recurrence::Monthly { .. } => {
                        let day = tz.to_datetime(shift).day() as u8;
                        Recurrence::Monthly { day: DayOfMonth::new(day).unwrap(), at }
                    }
                };
                let now = shift - SignedDuration::from_secs(before);
                let created = now - SignedDuration::from_secs(age);
                (r, tz, created, now)
            },
        )
    }

    /// Brute-force reference for when a wall time runs: search the instants whose local
    /// time is `dt`; if none, the first instant whose local time is past `dt`.
    fn reference_instant(tz: &TimeZone, dt: DateTime) -> Timestamp {
        let as_utc = dt.to_zoned(TimeZone::UTC).unwrap().timestamp();
        let hours = |h: i64| SignedDuration::from_hours(h);
        // Offsets in force within a day and a half either side, every 15 minutes.
        let mut offsets: Vec<_> =
            (0..=(36 * 4 * 2)).map(|q| tz.to_offset(as_utc - hours(36) + SignedDuration::from_mins(15 * q))).collect();
        offsets.sort_by_key(|o| o.seconds());
        offsets.dedup();
        let exact: Option<Timestamp> =
            offsets.iter().filter_map(|o| o.to_timestamp(dt).ok()).filter(|t| tz.to_datetime(*t) == dt).min();
        if let Some(t) = exact {
            return t;
        }
        // In a gap: binary search the instant local time passes dt, to the nanosecond.
        let (mut lo, mut hi) = (as_utc - hours(30), as_utc + hours(30));
        assert!(tz.to_datetime(lo) < dt && tz.to_datetime(hi) > dt);
        while hi.duration_since(lo) > SignedDuration::from_nanos(1) {
            let mid = lo + hi.duration_since(lo) / 2;
            if tz.to_datetime(mid) > dt { hi = mid } else { lo = mid }
        }
        hi
    }

    fn is_run_date(r: &Recurrence, d: Date) -> bool {
        match *r {
            Recurrence::Once { .. }
            | Recurrence::Hourly { .. }
            | Recurrence::Cron { .. }
            | Recurrence::Daily { .. } => true,
            Recurrence::Weekly { on, .. } => d.weekday() == on,
            Recurrence::Monthly { day, .. } => d.day() == (day.get() as i8).min(d.days_in_month()),
        }
    }

    fn wall(r: &Recurrence) -> WallTime {
        r.at().unwrap_or(WallTime::new(0, 0).unwrap())
    }

    /// Every run of a recurring schedule from local date `from` to `to`, by stepping days.
    fn reference_runs(s: &Schedule, from: Date, to: Date) -> Vec<Timestamp> {
        let mut runs = Vec::new();
        let mut d = from;
        while d <= to {
            if is_run_date(&s.recurrence, d) {
                let run = reference_instant(&s.time_zone, d.to_datetime(wall(&s.recurrence).time()));
                let pushed = s.time_zone.to_datetime(run).date() != d;
                if !(pushed && matches!(s.recurrence, Recurrence::Daily { .. })) {
                    runs.push(run);
                }
            }
            d = d.tomorrow().unwrap();
        }
        runs
    }

    /// The next `runs` runs after `now` fall on strictly increasing local dates.
    fn one_run_per_local_day(
        s: &Schedule,
        created: Timestamp,
        now: Timestamp,
        runs: usize,
    ) -> Result<(), TestCaseError> {
        let mut t = now;
        let mut last_day: Option<Date> = None;
        for _ in 0..runs {
            let run = next_run_after(s, created, t).unwrap();
            let day = s.time_zone.to_datetime(run).date();
            if let Some(last) = last_day {
                prop_assert!(day > last, "two runs on {day} or out of order");
            }
            last_day = Some(day);
            t = run;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn next_is_strictly_after_and_not_before_creation(
            r in any_recurrence(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let s = Schedule::new(r.clone(), tz);
            if let Some(next) = next_run_after(&s, created, now) {
                prop_assert!(next > now);
                prop_assert!(next >= created);
            } else {
                prop_assert!(matches!(r, Recurrence::Once { .. }), "recurring schedules always have a next run");
            }
        }

        #[test]
        fn next_is_the_earliest_run(
            r in recurring(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let s = Schedule::new(r, tz.clone());
            let next = next_run_after(&s, created, now).unwrap();
            let from = tz.to_datetime(created.min(now)).date().checked_sub(3.days()).unwrap();
            let to = tz.to_datetime(next).date().tomorrow().unwrap();
            let reference = reference_runs(&s, from, to)
                .into_iter()
                .filter(|&run| run > now && run >= created)
                .min();
            prop_assert_eq!(Some(next), reference);
        }

        #[test]
        fn next_is_the_earliest_run_near_a_shift((r, tz, created, now) in near_a_shift()) {
            let s = Schedule::new(r, tz.clone());
            let mut t = now;
            // The next few runs, which cross the shift.
            for _ in 0..4 {
                let next = next_run_after(&s, created, t).unwrap();
                let from = tz.to_datetime(t).date().checked_sub(3.days()).unwrap();
                let to = tz.to_datetime(next).date().tomorrow().unwrap();
                let reference = reference_runs(&s, from, to)
                    .into_iter()
                    .filter(|&run| run > t && run >= created)
                    .min();
                prop_assert_eq!(Some(next), reference);
                prop_assert_eq!(previous_run_at_or_before(&s, created, next), Some(next));
                t = next;
            }
        }

        #[test]
        fn daily_never_runs_twice_in_a_local_day_near_a_shift((r, tz, created, now) in near_a_shift()) {
            one_run_per_local_day(&Schedule::new(r, tz), created, now, 5)?;
        }

        #[test]
        fn previous_is_the_latest_run(
            r in recurring(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let s = Schedule::new(r, tz.clone());
            let from = tz.to_datetime(created).date().checked_sub(3.days()).unwrap();
            let to = tz.to_datetime(now).date().checked_add(3.days()).unwrap();
            let reference = reference_runs(&s, from, to)
                .into_iter()
                .filter(|&run| run <= now && run >= created)
                .max();
            prop_assert_eq!(previous_run_at_or_before(&s, created, now), reference);
        }

        #[test]
        fn next_and_previous_agree(
            r in any_recurrence(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let s = Schedule::new(r, tz);
            if let Some(prev) = previous_run_at_or_before(&s, created, now) {
                prop_assert!(prev <= now && prev >= created);
                // No run between the previous and now; the previous one is a run.
                prop_assert_eq!(next_run_after(&s, created, prev), next_run_after(&s, created, now));
                let just_before = prev - SignedDuration::from_nanos(1);
                prop_assert_eq!(next_run_after(&s, created, just_before), Some(prev));
            }
            if let Some(next) = next_run_after(&s, created, now) {
                prop_assert_eq!(previous_run_at_or_before(&s, created, next), Some(next));
            }
        }

        #[test]
        fn runs_fall_on_their_wall_time_and_day(
            r in recurring(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let s = Schedule::new(r.clone(), tz.clone());
            let mut t = now;
            for _ in 0..6 {
                let run = next_run_after(&s, created, t).unwrap();
                let local = tz.to_datetime(run);
                if local.time() == wall(&r).time() {
                    prop_assert!(is_run_date(&r, local.date()));
                } else {
                    // Only a skipped wall time moves: the run is a forward shift, and the
                    // wall time on the run's local date or the day before falls in a gap.
                    let before = tz.to_offset(run - SignedDuration::from_nanos(1));
                    prop_assert!(tz.to_offset(run) > before, "moved run {run} is not at a forward shift");
                    let skipped = |d: Date| matches!(
                        tz.to_ambiguous_timestamp(d.to_datetime(wall(&r).time())).offset(),
                        AmbiguousOffset::Gap { .. }
                    );
                    prop_assert!(skipped(local.date()) || skipped(local.date().yesterday().unwrap()));
                }
                t = run;
            }
        }

        #[test]
        fn hourly_runs_whenever_the_clock_shows_its_minute(
            minute in minute_of_hour(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let s = Schedule::new(Recurrence::Hourly { minute }, tz.clone());
            let next = next_run_after(&s, created, now).unwrap();
            let from = now.max(created - SignedDuration::from_nanos(1)) + SignedDuration::from_nanos(1);
            prop_assert_eq!(next, reference_hourly(&tz, minute, from));
        }

        #[test]
        fn hourly_near_a_shift((tz, now) in before_a_shift(), minute in minute_of_hour()) {
            let s = Schedule::new(Recurrence::Hourly { minute }, tz.clone());
            let created = now - SignedDuration::from_hours(30 * 24);
            let mut t = now;
            for _ in 0..6 {
                let run = next_run_after(&s, created, t).unwrap();
                prop_assert_eq!(run, reference_hourly(&tz, minute, t + SignedDuration::from_nanos(1)));
                prop_assert_eq!(previous_run_at_or_before(&s, created, run), Some(run));
                let prev = previous_run_at_or_before(&s, created, run - SignedDuration::from_nanos(1)).unwrap();
                // The clock moved a whole number of hours between consecutive runs (none in a
                // fold), so where shifts are whole hours the gap is 60 minutes.
                let shift = i64::from(tz.to_offset(run).seconds() - tz.to_offset(prev).seconds());
                let gap = run.duration_since(prev).as_secs();
                prop_assert!(gap > 0 && (gap + shift) % 3600 == 0, "{prev} → {run}, shift {shift}");
                if shift % 3600 == 0 {
                    prop_assert_eq!(gap, 3600);
                }
                t = run;
            }
        }

        #[test]
        fn run_on_create_runs_once_at_creation_then_as_before(
            r in any_recurrence(), tz in zone(), (created, now) in created_and_now(),
        ) {
            let plain = Schedule::new(r, tz);
            let s = plain.clone().with_run_on_create(true);
            prop_assert_eq!(next_run_after(&s, created, created - SignedDuration::from_nanos(1)), Some(created));
            prop_assert_eq!(previous_run_at_or_before(&s, created, now).map(|p| p >= created), Some(true));
            prop_assert_eq!(next_run_after(&s, created, now), next_run_after(&plain, created, now));
        }

        #[test]
        fn daily_never_runs_twice_in_a_local_day(
            at in wall_time(), tz in zone(), (created, now) in created_and_now(),
        ) {
            one_run_per_local_day(&Schedule::new(Recurrence::Daily { at }, tz), created, now, 30)?;
        }
    }

    fn hourly(zone: &str, minute: u8) -> Schedule {
        Schedule::new(Recurrence::Hourly { minute: MinuteOfHour::new(minute).unwrap() }, tz(zone))
    }

    /// The next `n` runs after `after`.
    fn runs(s: &Schedule, after: &str, n: usize) -> Vec<String> {
        let mut t = ts(after);
        (0..n)
            .map(|_| {
                t = next_run_after(s, long_ago(), t).unwrap();
                t.to_string()
            })
            .collect()
    }

    #[test]
    fn minute_of_hour_is_0_to_59() {
        assert_eq!(MinuteOfHour::new(0).unwrap().get(), 0);
        assert_eq!(MinuteOfHour::new(59).unwrap().to_string(), ":59");
        assert!(MinuteOfHour::new(60).is_none());
    }

    #[test]
    fn hourly_runs_at_its_minute() {
        let s = hourly("UTC", 15);
        assert_eq!(next(&s, "2024-06-01T10:14:59Z"), "2024-06-01T10:15:00Z");
        assert_eq!(next(&s, "2024-06-01T10:15:00Z"), "2024-06-01T11:15:00Z");
        assert_eq!(next(&s, "2024-12-31T23:15:00.5Z"), "2025-01-01T00:15:00Z");
        assert_eq!(prev(&s, "2024-06-01T10:15:00Z"), "2024-06-01T10:15:00Z");
        assert_eq!(prev(&s, "2024-06-01T10:14:59.999Z"), "2024-06-01T09:15:00Z");
        // No run before creation; one exactly at creation counts.
        let created = ts("2024-06-01T10:20:00Z");
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-06-01T11:00:00Z")), None);
        assert_eq!(next_run_after(&s, created, ts("2024-05-01T00:00:00Z")), Some(ts("2024-06-01T11:15:00Z")));
        let created = ts("2024-06-01T10:15:00Z");
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-06-01T11:00:00Z")), Some(created));
    }

    #[test]
    fn hourly_follows_the_clock_of_half_and_quarter_hour_zones() {
        // Kolkata is UTC+5:30: :15 local is :45 UTC.
        assert_eq!(next(&hourly("Asia/Kolkata", 15), "2024-06-01T10:00:00Z"), "2024-06-01T10:45:00Z");
        // Kathmandu is UTC+5:45: :00 local is :15 UTC.
        assert_eq!(next(&hourly("Asia/Kathmandu", 0), "2024-06-01T10:00:00Z"), "2024-06-01T10:15:00Z");
        assert_eq!(prev(&hourly("Asia/Kathmandu", 0), "2024-06-01T10:14:59Z"), "2024-06-01T09:15:00Z");
    }

    #[test]
    fn hourly_across_new_york_shifts_stays_an_hour_apart() {
        // 2024-03-10 02:00 EST → 03:00 EDT: no 02:30 on the clock, 01:30 EST → 03:30 EDT.
        let s = hourly("America/New_York", 30);
        assert_eq!(
            runs(&s, "2024-03-10T05:00:00Z", 3),
            ["2024-03-10T05:30:00Z", "2024-03-10T06:30:00Z", "2024-03-10T07:30:00Z"]
        );
        // 2024-11-03 02:00 EDT → 01:00 EST: 01:30 runs in both occurrences.
        assert_eq!(
            runs(&s, "2024-11-03T04:00:00Z", 4),
            ["2024-11-03T04:30:00Z", "2024-11-03T05:30:00Z", "2024-11-03T06:30:00Z", "2024-11-03T07:30:00Z"]
        );
        assert_eq!(prev(&s, "2024-11-03T06:29:59Z"), "2024-11-03T05:30:00Z");
        // At the minute of the transition itself.
        let s = hourly("America/New_York", 0);
        assert_eq!(
            runs(&s, "2024-11-03T04:30:00Z", 3),
            ["2024-11-03T05:00:00Z", "2024-11-03T06:00:00Z", "2024-11-03T07:00:00Z"]
        );
    }

    #[test]
    fn hourly_across_lord_howe_half_hour_shifts() {
        // 2024-10-06 02:00 +10:30 → 02:30 +11 (15:30Z): 02:15 never shows, so 01:15 (14:45Z)
        // is followed by 03:15 (16:15Z), 90 minutes later.
        assert_eq!(
            runs(&hourly("Australia/Lord_Howe", 15), "2024-10-05T14:00:00Z", 2),
            ["2024-10-05T14:45:00Z", "2024-10-05T16:15:00Z"]
        );
        // :30 shows at the transition itself (02:30 +11), 30 minutes after 01:30 +10:30.
        assert_eq!(
            runs(&hourly("Australia/Lord_Howe", 30), "2024-10-05T14:00:00Z", 3),
            ["2024-10-05T15:00:00Z", "2024-10-05T15:30:00Z", "2024-10-05T16:30:00Z"]
        );
        // 2024-04-07 02:00 +11 → 01:30 +10:30 (15:00Z): 01:45 shows twice, 30 minutes apart.
        assert_eq!(
            runs(&hourly("Australia/Lord_Howe", 45), "2024-04-06T14:00:00Z", 3),
            ["2024-04-06T14:45:00Z", "2024-04-06T15:15:00Z", "2024-04-06T16:15:00Z"]
        );
        assert_eq!(prev(&hourly("Australia/Lord_Howe", 45), "2024-04-06T15:14:59Z"), "2024-04-06T14:45:00Z");
    }

    #[test]
    fn run_on_create_adds_one_run_at_creation() {
        let created = ts("2024-05-01T10:00:00Z");
        let s = daily("UTC", "06:00").with_run_on_create(true);
        assert_eq!(next_run_after(&s, created, ts("2024-05-01T09:00:00Z")), Some(created));
        assert_eq!(next_run_after(&s, created, created), Some(ts("2024-05-02T06:00:00Z")));
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-05-01T12:00:00Z")), Some(created));
        assert_eq!(previous_run_at_or_before(&s, created, ts("2024-05-01T09:59:59Z")), None);
        assert_eq!(
            previous_run_at_or_before(&s, created, ts("2024-05-02T06:00:00Z")),
            Some(ts("2024-05-02T06:00:00Z"))
        );
        // Created on a slot: one run, not two.
        let on_slot = ts("2024-05-01T06:00:00Z");
        assert_eq!(next_run_after(&s, on_slot, on_slot), Some(ts("2024-05-02T06:00:00Z")));
        let s = hourly("UTC", 15).with_run_on_create(true);
        assert_eq!(next_run_after(&s, created, ts("2024-05-01T09:59:59Z")), Some(created));
        assert_eq!(next_run_after(&s, created, created), Some(ts("2024-05-01T10:15:00Z")));
    }

    #[test]
    fn daily_around_every_shift_of_the_table_zones() {
        // Two years of Daily runs at wall times near every shift: consecutive runs are a day
        // apart, give or take the shift, so none is skipped or doubled.
        for zone in ["Europe/Lisbon", "America/New_York", "Australia/Lord_Howe"] {
            for wall in ["00:00", "00:30", "01:00", "01:30", "01:45", "02:00", "02:15", "02:30", "03:00"] {
                let s = daily(zone, wall);
                let mut t = ts("2023-01-01T00:00:00Z");
                let mut last: Option<Timestamp> = None;
                while t < ts("2025-01-01T00:00:00Z") {
                    let run = next_run_after(&s, long_ago(), t).unwrap();
                    if let Some(last) = last {
                        let gap = run.duration_since(last);
                        assert!(
                            gap >= SignedDuration::from_hours(22) && gap <= SignedDuration::from_hours(26),
                            "{zone} {wall}: {last} → {run}"
                        );
                    }
                    last = Some(run);
                    t = run;
                }
            }
        }
    }

    // ---- cron ----

    fn cron(zone: &str, expression: &str) -> Schedule {
        Schedule::new(Recurrence::Cron { expression: expression.parse().unwrap() }, tz(zone))
    }

    #[test]
    fn cron_runs_at_matching_wall_times() {
        let s = cron("Europe/Lisbon", "*/20 9-10 * * MON-FRI");
        // 2024-06-07 is a Friday; Lisbon is UTC+1 in June.
        assert_eq!(
            runs(&s, "2024-06-07T08:00:00Z", 7),
            [
                "2024-06-07T08:20:00Z",
                "2024-06-07T08:40:00Z",
                "2024-06-07T09:00:00Z",
                "2024-06-07T09:20:00Z",
                "2024-06-07T09:40:00Z",
                "2024-06-10T08:00:00Z",
                "2024-06-10T08:20:00Z",
            ]
        );
        assert_eq!(prev(&s, "2024-06-09T12:00:00Z"), "2024-06-07T09:40:00Z");
        assert_eq!(prev(&s, "2024-06-07T08:20:00Z"), "2024-06-07T08:20:00Z");
    }

    #[test]
    fn cron_skipped_wall_times_run_once_at_the_end_of_the_gap() {
        // 2024-03-10 02:00 EST → 03:00 EDT (07:00Z): 02:00–02:45 and 03:00 run once, at 03:00 EDT.
        let s = cron("America/New_York", "*/15 * * * *");
        assert_eq!(
            runs(&s, "2024-03-10T06:40:00Z", 3),
            ["2024-03-10T06:45:00Z", "2024-03-10T07:00:00Z", "2024-03-10T07:15:00Z"]
        );
        // A daily 02:30 runs at the transition, as `Daily` does.
        assert_eq!(next(&cron("America/New_York", "30 2 * * *"), "2024-03-09T12:00:00Z"), "2024-03-10T07:00:00Z");
    }

    #[test]
    fn cron_repeated_wall_times_run_once_at_their_first_occurrence() {
        // 2024-11-03 02:00 EDT → 01:00 EST (06:00Z): 01:00–01:45 run in EDT only.
        let s = cron("America/New_York", "*/15 * * * *");
        assert_eq!(
            runs(&s, "2024-11-03T05:40:00Z", 3),
            ["2024-11-03T05:45:00Z", "2024-11-03T07:00:00Z", "2024-11-03T07:15:00Z"]
        );
        assert_eq!(prev(&s, "2024-11-03T06:50:00Z"), "2024-11-03T05:45:00Z");
        assert_eq!(prev(&s, "2024-11-03T06:59:59Z"), "2024-11-03T05:45:00Z");
        let daily = cron("America/New_York", "30 1 * * *");
        assert_eq!(next(&daily, "2024-11-02T12:00:00Z"), "2024-11-03T05:30:00Z");
        assert_eq!(next(&daily, "2024-11-03T05:30:00Z"), "2024-11-04T06:30:00Z");
    }

    #[test]
    fn cron_in_kathmandu_and_lord_howe() {
        // Kathmandu is UTC+5:45: 06:00 local is 00:15Z.
        assert_eq!(next(&cron("Asia/Kathmandu", "0 6 * * *"), "2024-06-01T00:00:00Z"), "2024-06-01T00:15:00Z");
        // Lord Howe 2024-10-06 02:00 +10:30 → 02:30 +11 (15:30Z): 02:00 and 02:15 run once at
        // the transition, which is also 02:30's own run.
        assert_eq!(
            runs(&cron("Australia/Lord_Howe", "*/15 * * * *"), "2024-10-05T15:00:00Z", 3),
            ["2024-10-05T15:15:00Z", "2024-10-05T15:30:00Z", "2024-10-05T15:45:00Z"]
        );
        // 2024-04-07 02:00 +11 → 01:30 +10:30 (15:00Z): 01:30 and 01:45 run only at +11.
        let s = cron("Australia/Lord_Howe", "*/15 * * * *");
        assert_eq!(
            runs(&s, "2024-04-06T14:20:00Z", 3),
            ["2024-04-06T14:30:00Z", "2024-04-06T14:45:00Z", "2024-04-06T15:30:00Z"]
        );
    }

    /// A cron expression and, field by field, what it matches: the reference the properties
    /// check the search against. Day-of-month and day-of-week are either `*` or lists, so the
    /// rule for both set (a day matching either) is unambiguous.
    #[derive(Clone, Debug)]
    struct CronCase {
        text: String,
        minutes: Vec<bool>,
        hours: Vec<bool>,
        days: Option<Vec<bool>>,
        months: Vec<bool>,
        weekdays: Option<Vec<bool>>,
    }

    impl CronCase {
        fn matches(&self, t: DateTime) -> bool {
            let day = match (&self.days, &self.weekdays) {
                (None, None) => true,
                (Some(d), None) => d[t.day() as usize],
                (None, Some(w)) => w[t.weekday().to_sunday_zero_offset() as usize],
                (Some(d), Some(w)) => d[t.day() as usize] || w[t.weekday().to_sunday_zero_offset() as usize],
            };
            self.minutes[t.minute() as usize] && self.hours[t.hour() as usize] && self.months[t.month() as usize] && day
        }
    }

    /// `(text, set)` of one numeric field from `lo` to `hi`: `*`, `*/n`, a range or a list.
    fn numeric_field(lo: u8, hi: u8, steps: bool) -> impl Strategy<Value = (String, Vec<bool>)> {
        let size = hi as usize + 1;
        let all = (0..size).map(|v| v >= lo as usize).collect::<Vec<_>>();
        let star = Just(("*".to_owned(), all));
        let step = (2u8..=(hi - lo).max(2)).prop_map(move |n| {
            (
                format!("*/{n}"),
                (0..size).map(|v| v >= lo as usize && (v - lo as usize).is_multiple_of(n as usize)).collect(),
            )
        });
        let range = (lo..=hi, lo..=hi).prop_map(move |(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            (format!("{a}-{b}"), (0..size).map(|v| (a as usize..=b as usize).contains(&v)).collect())
        });
        let list = proptest::collection::btree_set(lo..=hi, 1..4).prop_map(move |set| {
            let text = set.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
            (text, (0..size).map(|v| set.contains(&(v as u8))).collect())
        });
        if steps {
            prop_oneof![2 => star, 3 => step, 2 => range, 2 => list].boxed()
        } else {
            prop_oneof![3 => star, 1 => range, 2 => list].boxed()
        }
    }

    fn day_field(lo: u8, hi: u8) -> impl Strategy<Value = (String, Option<Vec<bool>>)> {
        let size = hi as usize + 1;
        prop_oneof![
            3 => Just(("*".to_owned(), None)),
            1 => proptest::collection::btree_set(lo..=hi, 1..8).prop_map(move |set| {
                let text = set.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
                (text, Some((0..size).map(|v| set.contains(&(v as u8))).collect()))
            }),
        ]
    }

    fn cron_case() -> impl Strategy<Value = CronCase> {
        let hours = prop_oneof![
            numeric_field(0, 23, true),
            (0u8..4, 0u8..5).prop_map(|(a, n)| {
                let b = (a + n).min(23);
                (format!("{a}-{b}"), (0..24).map(|v| (a..=b).contains(&v)).collect())
            })
        ];
        (numeric_field(0, 59, true), hours, day_field(1, 31), numeric_field(1, 12, false), day_field(0, 6)).prop_map(
            |((mt, minutes), (ht, hours), (dt, days), (mot, months), (wt, weekdays))| CronCase {
                text: format!("{mt} {ht} {dt} {mot} {wt}"),
                minutes,
                hours,
                days,
                months,
                weekdays,
            },
        )
    }

    /// Brute-force reference, independent of the search: walk the UTC minutes from two days
    /// before `from` to `to`; a minute is a run when its wall time matches and the clock
    /// shows that wall time for the first time, or when the clock jumped forward onto it
    /// over a matching wall time. (Every offset since 1995 is whole minutes, and so is every
    /// transition.)
    fn reference_cron(case: &CronCase, tz: &TimeZone, from: Timestamp, to: Timestamp) -> Vec<Timestamp> {
        let minute = SignedDuration::from_mins(1);
        let mut t =
            Timestamp::from_second(from.as_second().div_euclid(60) * 60).unwrap() - SignedDuration::from_hours(48);
        let mut seen = std::collections::HashSet::new();
        let mut previous = tz.to_datetime(t - minute);
        let mut runs = Vec::new();
        while t <= to {
            let wall = tz.to_datetime(t);
            let first = seen.insert(wall);
            let mut skipped = previous + minute;
            let mut over_a_gap = false;
            while skipped < wall {
                over_a_gap |= case.matches(skipped);
                skipped += minute;
            }
            if t > from && ((first && case.matches(wall)) || over_a_gap) {
                runs.push(t);
            }
            previous = wall;
            t += minute;
        }
        runs
    }

    /// An instant and a zone: near one of the zone's shifts, or anywhere.
    fn cron_moment() -> impl Strategy<Value = (TimeZone, Timestamp)> {
        prop_oneof![3 => before_a_shift(), 1 => (zone(), instant())]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn cron_runs_are_the_reference_runs(case in cron_case(), (tz, now) in cron_moment()) {
            let expression: CronExpression = match case.text.parse() {
                Ok(e) => e,
                // A generated date that never exists (31 in April only): refused, nothing to run.
                Err(crate::domain::cron::InvalidCron::NeverRuns) => return Ok(()),
                Err(e) => return Err(TestCaseError::fail(format!("{}: {e}", case.text))),
            };
            let s = Schedule::new(Recurrence::Cron { expression }, tz.clone());
            let created = now - SignedDuration::from_hours(24 * 30);
            let to = now + SignedDuration::from_hours(8);
            let reference = reference_cron(&case, &tz, now, to);
            let mut found = Vec::new();
            let mut t = now;
            while let Some(run) = next_run_after(&s, created, t).filter(|&run| run <= to) {
                found.push(run);
                t = run;
            }
            prop_assert_eq!(&found, &reference, "{} in {:?} from {}", case.text, tz.iana_name(), now);
            // The previous run agrees at each run, just before it, and at the window's end.
            for (i, &run) in reference.iter().enumerate() {
                prop_assert_eq!(previous_run_at_or_before(&s, created, run), Some(run));
                if i > 0 {
                    let before = previous_run_at_or_before(&s, created, run - SignedDuration::from_nanos(1));
                    prop_assert_eq!(before, Some(reference[i - 1]));
                }
            }
            if let Some(&last) = reference.last() {
                prop_assert_eq!(previous_run_at_or_before(&s, created, to), Some(last));
            }
        }
    }
}
