//! `spec.schedule` turned into a [`Schedule`]: which fields go with which cadence, a real
//! wall time, minute, day and time zone, and a cron expression no more frequent than the
//! operator allows. Every problem is reported at once, each with the field it is about
//! ([`ScheduleProblems`]); `domain::validate` adds them to the rest of the spec's.

use jiff::SignedDuration;
use jiff::civil::Weekday;
use jiff::tz::TimeZone;

use super::{DayOfMonth, MinuteOfHour, Recurrence, Schedule, WallTime};
use crate::api::{Cadence, DayOfWeek, ScheduleSpec};
use crate::domain::cron::{CronExpression, InvalidCron};

/// What is wrong with a field of `spec.schedule`, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleProblem {
    #[error("set only with cadence {needs:?} (cadence is {cadence:?}); remove it or change the cadence")]
    OnlyWithCadence { needs: Cadence, cadence: Cadence },
    #[error("required with cadence {cadence:?}; set it, e.g. {example}")]
    RequiredWithCadence { cadence: Cadence, example: &'static str },
    #[error("{value} is not a day of the month; use 1 to 31 (a month shorter than the day runs on its last day)")]
    DayOfMonth { value: u8 },
    #[error("{value:?} is not a wall time; write HH:MM from 00:00 to 23:59, e.g. \"06:00\"")]
    WallTime { value: String },
    #[error("{value} is not a minute of the hour; use 0 to 59, e.g. minute: 15")]
    Minute { value: u8 },
    #[error("{0}")]
    Cron(InvalidCron),
    #[error(
        "runs {shortest_minutes} minute(s) apart at its closest, more often than this operator allows (--min-cron-interval-minutes={min_minutes}); space the runs at least {min_minutes} minutes apart, e.g. \"*/{min_minutes} * * * *\""
    )]
    CronTooOften { shortest_minutes: i64, min_minutes: i64 },
    #[error("is not used with cadence Cron, whose expression names the times; remove `at`")]
    AtWithCron,
    #[error(
        "is not used with cadence Hourly, which runs at `minute` past every hour; remove `at` and set minute, e.g. minute: 15"
    )]
    AtWithHourly,
    #[error(
        "is only for recurring cadences; Once already runs soon after creation when `at` is omitted, so remove runOnCreate (or `at`)"
    )]
    RunOnCreateWithOnce,
    #[error("{name:?} is not an IANA time zone; use a name such as Europe/Lisbon, America/New_York or UTC")]
    TimeZone { name: String },
}

/// The problems found, each with its field path from the resource root.
pub type ScheduleProblems = Vec<(&'static str, ScheduleProblem)>;

/// The schedule `spec` describes, or every problem with it. `min_cron_interval` is the
/// operator's floor for a cron expression's closest two runs.
pub fn parse(spec: &ScheduleSpec, min_cron_interval: SignedDuration) -> Result<Schedule, ScheduleProblems> {
    let mut problems = ScheduleProblems::new();
    let cadence = spec.cadence;
    let at = at(spec, &mut problems);
    let minute = minute(spec, &mut problems);
    if spec.run_on_create && cadence == Cadence::Once {
        problems.push(("spec.schedule.runOnCreate", ScheduleProblem::RunOnCreateWithOnce));
    }
    let on = day_of_week(spec, &mut problems);
    let day = day_of_month(spec, &mut problems);
    let expression = expression(spec, min_cron_interval, &mut problems);
    let time_zone = TimeZone::get(&spec.time_zone).map_err(|_| {
        problems.push(("spec.schedule.timeZone", ScheduleProblem::TimeZone { name: spec.time_zone.clone() }));
    });
    let recurrence = match cadence {
        Cadence::Once => Some(Recurrence::Once { at }),
        Cadence::Hourly => minute.map(|minute| Recurrence::Hourly { minute }),
        Cadence::Daily => at.map(|at| Recurrence::Daily { at }),
        Cadence::Weekly => on.zip(at).map(|(on, at)| Recurrence::Weekly { on, at }),
        Cadence::Monthly => day.zip(at).map(|(day, at)| Recurrence::Monthly { day, at }),
        Cadence::Cron => expression.map(|expression| Recurrence::Cron { expression }),
    };
    match (recurrence, time_zone) {
        (Some(recurrence), Ok(time_zone)) if problems.is_empty() => {
            Ok(Schedule::new(recurrence, time_zone).with_run_on_create(spec.run_on_create))
        }
        _ => Err(problems),
    }
}

/// A field set with a cadence that does not use it, or missing with one that needs it.
fn misplaced(cadence: Cadence, needs: &[Cadence], set: bool, example: &'static str) -> Option<ScheduleProblem> {
    match (needs.contains(&cadence), set) {
        (true, false) => Some(ScheduleProblem::RequiredWithCadence { cadence, example }),
        (false, true) => Some(ScheduleProblem::OnlyWithCadence { needs: needs[0], cadence }),
        _ => None,
    }
}

/// `at`: a wall time, required with the daily cadences, optional with `Once`.
fn at(spec: &ScheduleSpec, problems: &mut ScheduleProblems) -> Option<WallTime> {
    const FIELD: &str = "spec.schedule.at";
    let parsed = spec.at.as_ref().and_then(|text| {
        let at = text.parse::<WallTime>().ok();
        if at.is_none() {
            problems.push((FIELD, ScheduleProblem::WallTime { value: text.clone() }));
        }
        at
    });
    let misplaced = match (spec.cadence, &spec.at) {
        (Cadence::Hourly, Some(_)) => Some(ScheduleProblem::AtWithHourly),
        (Cadence::Cron, Some(_)) => Some(ScheduleProblem::AtWithCron),
        (cadence @ (Cadence::Daily | Cadence::Weekly | Cadence::Monthly), None) => {
            Some(ScheduleProblem::RequiredWithCadence { cadence, example: "\"06:00\"" })
        }
        _ => None,
    };
    problems.extend(misplaced.map(|p| (FIELD, p)));
    parsed
}

/// `minute`: the minute of the hour, with `Hourly` only.
fn minute(spec: &ScheduleSpec, problems: &mut ScheduleProblems) -> Option<MinuteOfHour> {
    const FIELD: &str = "spec.schedule.minute";
    if let Some(p) = misplaced(spec.cadence, &[Cadence::Hourly], spec.minute.is_some(), "15") {
        problems.push((FIELD, p));
        return None;
    }
    let n = spec.minute?;
    let minute = MinuteOfHour::new(n);
    if minute.is_none() {
        problems.push((FIELD, ScheduleProblem::Minute { value: n }));
    }
    minute
}

/// `dayOfWeek`, with `Weekly` only.
fn day_of_week(spec: &ScheduleSpec, problems: &mut ScheduleProblems) -> Option<Weekday> {
    if let Some(p) = misplaced(spec.cadence, &[Cadence::Weekly], spec.day_of_week.is_some(), "Monday") {
        problems.push(("spec.schedule.dayOfWeek", p));
        return None;
    }
    spec.day_of_week.map(weekday)
}

/// `dayOfMonth`, with `Monthly` only.
fn day_of_month(spec: &ScheduleSpec, problems: &mut ScheduleProblems) -> Option<DayOfMonth> {
    const FIELD: &str = "spec.schedule.dayOfMonth";
    if let Some(p) = misplaced(spec.cadence, &[Cadence::Monthly], spec.day_of_month.is_some(), "1") {
        problems.push((FIELD, p));
        return None;
    }
    let n = spec.day_of_month?;
    let day = DayOfMonth::new(n);
    if day.is_none() {
        problems.push((FIELD, ScheduleProblem::DayOfMonth { value: n }));
    }
    day
}

/// `expression`, with `Cron` only, running no more often than `min_interval` allows.
fn expression(
    spec: &ScheduleSpec,
    min_interval: SignedDuration,
    problems: &mut ScheduleProblems,
) -> Option<CronExpression> {
    const FIELD: &str = "spec.schedule.expression";
    let set = spec.expression.is_some();
    if let Some(p) = misplaced(spec.cadence, &[Cadence::Cron], set, "\"30 6 * * MON-FRI\"") {
        problems.push((FIELD, p));
        return None;
    }
    let parsed = spec.expression.as_ref()?.parse::<CronExpression>().map_err(ScheduleProblem::Cron);
    let checked = parsed.and_then(|expression| match expression.shortest_interval() {
        Some(shortest) if shortest < min_interval => Err(ScheduleProblem::CronTooOften {
            shortest_minutes: shortest.as_mins(),
            min_minutes: min_interval.as_mins(),
        }),
        _ => Ok(expression),
    });
    checked.map_err(|p| problems.push((FIELD, p))).ok()
}

fn weekday(day: DayOfWeek) -> Weekday {
    match day {
        DayOfWeek::Monday => Weekday::Monday,
        DayOfWeek::Tuesday => Weekday::Tuesday,
        DayOfWeek::Wednesday => Weekday::Wednesday,
        DayOfWeek::Thursday => Weekday::Thursday,
        DayOfWeek::Friday => Weekday::Friday,
        DayOfWeek::Saturday => Weekday::Saturday,
        DayOfWeek::Sunday => Weekday::Sunday,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ScheduleSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_field() {
        let found = parse(
            &spec("cadence: Hourly\nat: \"25:00\"\ndayOfMonth: 3\nexpression: \"* * * * *\"\ntimeZone: Mars/Base"),
            SignedDuration::from_mins(5),
        )
        .unwrap_err();
        let fields: Vec<_> = found.iter().map(|(field, _)| *field).collect();
        assert_eq!(
            fields,
            [
                "spec.schedule.at",
                "spec.schedule.at",
                "spec.schedule.minute",
                "spec.schedule.dayOfMonth",
                "spec.schedule.expression",
                "spec.schedule.timeZone"
            ]
        );
        assert_eq!(found[0].1, ScheduleProblem::WallTime { value: "25:00".into() });
        assert_eq!(found[1].1, ScheduleProblem::AtWithHourly);
        assert_eq!(found[2].1, ScheduleProblem::RequiredWithCadence { cadence: Cadence::Hourly, example: "15" });
    }

    #[test]
    fn a_cron_expression_is_held_to_the_operators_floor() {
        let every_ten = spec("cadence: Cron\nexpression: \"*/10 * * * *\"\ntimeZone: UTC");
        assert!(parse(&every_ten, SignedDuration::from_mins(10)).is_ok());
        let found = parse(&every_ten, SignedDuration::from_mins(15)).unwrap_err();
        assert_eq!(
            found,
            [("spec.schedule.expression", ScheduleProblem::CronTooOften { shortest_minutes: 10, min_minutes: 15 })]
        );
    }

    #[test]
    fn a_valid_spec_is_its_schedule() {
        let weekly = parse(
            &spec("cadence: Weekly\ndayOfWeek: Friday\nat: \"06:30\"\ntimeZone: Europe/Lisbon\nrunOnCreate: true"),
            SignedDuration::from_mins(5),
        )
        .unwrap();
        let expected = Schedule::new(
            Recurrence::Weekly { on: Weekday::Friday, at: WallTime::new(6, 30).unwrap() },
            TimeZone::get("Europe/Lisbon").unwrap(),
        )
        .with_run_on_create(true);
        assert_eq!(weekly, expected);
    }
}
