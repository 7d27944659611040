//! Cron expressions for `cadence: Cron`: the five standard fields, parsed and matched by
//! [croner], evaluated on a zone's wall clock (civil date and time, no time zone).
//!
//! The fields are `minute hour day-of-month month day-of-week`, with `*`, lists (`1,15`),
//! ranges (`1-5`), steps (`*/15`, `0-30/10`) and English names (`JAN`, `MON`), and the
//! nicknames `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and
//! `@hourly` (the syntax a Kubernetes CronJob takes). When day-of-month and day-of-week are
//! both other than `*`, a day matching either runs (Vixie cron's rule). croner's own
//! extensions (seconds, years, `L`, `W`, `#`) are refused, so an expression means here what
//! it means in a CronJob.
//!
//! Turning the wall times into instants (gaps, folds) is [`super::schedule`]'s work; this
//! module never sees a time zone. Everything here is pure.

use std::fmt;
use std::str::FromStr;

use croner::parser::{CronParser, Seconds, Year};
use jiff::SignedDuration;
use jiff::civil::{Date, DateTime, Time};

/// Longest expression accepted, in bytes (the CRD schema holds the same bound).
pub const MAX_EXPRESSION_LEN: usize = 128;

/// A valid cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronExpression {
    /// The text as written, trimmed: shown in `kubectl get` and in the schedule's identity.
    text: String,
    /// Boxed: croner's parsed pattern is large, and a `Recurrence` holds this.
    cron: Box<croner::Cron>,
}

/// Why text is not a cron expression. Each names what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCron {
    #[error("is empty; write five fields, minute hour day-of-month month day-of-week, e.g. \"30 6 * * 1-5\"")]
    Empty,
    #[error("is longer than {MAX_EXPRESSION_LEN} characters; write a shorter expression")]
    TooLong,
    #[error(
        "has {count} fields; write exactly five, minute hour day-of-month month day-of-week, e.g. \"30 6 * * 1-5\" (seconds and years are not supported)"
    )]
    FieldCount { count: usize },
    #[error("uses {what}, an extension of some cron implementations; use the standard five-field syntax")]
    Extension { what: &'static str },
    #[error("is not a cron expression ({reason}); write e.g. \"*/15 * * * *\" or \"30 6 * * MON-FRI\"")]
    Syntax { reason: String },
    #[error("never matches a date (e.g. 30 February); pick a day that exists")]
    NeverRuns,
}

impl FromStr for CronExpression {
    type Err = InvalidCron;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(InvalidCron::Empty);
        }
        if text.len() > MAX_EXPRESSION_LEN {
            return Err(InvalidCron::TooLong);
        }
        check_standard(text)?;
        let parser =
            CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).dom_and_dow(false).build();
        // croner knows every nickname but `@midnight`, which is `@daily`.
        let pattern = if text.eq_ignore_ascii_case("@midnight") { "@daily" } else { text };
        let cron = parser.parse(pattern).map_err(|e| InvalidCron::Syntax { reason: e.to_string() })?;
        // One space between fields, so that re-spacing is not a new schedule.
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let expression = CronExpression { text, cron: Box::new(cron) };
        if expression.first_run_day().is_none() {
            return Err(InvalidCron::NeverRuns);
        }
        Ok(expression)
    }
}

/// Five fields (or a nickname) without croner's extensions.
fn check_standard(text: &str) -> Result<(), InvalidCron> {
    if let Some(nickname) = text.strip_prefix('@') {
        let known = ["yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly"];
        return if known.iter().any(|k| k.eq_ignore_ascii_case(nickname)) {
            Ok(())
        } else {
            Err(InvalidCron::Syntax { reason: format!("unknown nickname; use one of @{}", known.join(", @")) })
        };
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(InvalidCron::FieldCount { count: fields.len() });
    }
    let upper = |i: usize| fields[i].to_ascii_uppercase();
    if upper(2).contains('L') || upper(4).contains('L') {
        return Err(InvalidCron::Extension { what: "L (last day)" });
    }
    if upper(2).contains('W') {
        return Err(InvalidCron::Extension { what: "W (nearest weekday)" });
    }
    if fields[4].contains('#') {
        return Err(InvalidCron::Extension { what: "# (nth weekday of the month)" });
    }
    if fields.iter().any(|f| f.contains('?')) {
        return Err(InvalidCron::Extension { what: "? (no specific value); write *" });
    }
    Ok(())
}

impl fmt::Display for CronExpression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl CronExpression {
    /// The expression as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the wall time `t` (to the minute; seconds must be 0) matches.
    pub fn matches(&self, t: DateTime) -> bool {
        t.second() == 0 && t.subsec_nanosecond() == 0 && self.cron.is_time_matching(&t).unwrap_or(false)
    }

    /// The first matching wall time strictly after `t`; `None` past year 9999.
    pub fn next_after(&self, t: DateTime) -> Option<DateTime> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// The last matching wall time at or before `t`; `None` before year 1.
    pub fn previous_at_or_before(&self, t: DateTime) -> Option<DateTime> {
        let whole = t.with().subsec_nanosecond(0).build().ok()?;
        self.cron.find_previous_occurrence(&whole, true).ok()
    }

    /// The shortest time between two consecutive matches on the wall clock, when it is under
    /// a day; `None` when runs are a day or more apart. (A time zone shift can bring two runs
    /// closer once; `spec.schedule`'s docs say so.)
    pub fn shortest_interval(&self) -> Option<SignedDuration> {
        let day = self.first_run_day()?;
        let minutes = self.minutes_of_day(day);
        let (&first, &last) = (minutes.first()?, minutes.last()?);
        let within_day = minutes.windows(2).map(|w| w[1] - w[0]).min();
        let across_midnight = 1440 - last + first;
        let shortest = match within_day {
            Some(within) if within <= across_midnight => within,
            _ if across_midnight < 1440 && self.has_consecutive_days(first) => across_midnight,
            within => within?,
        };
        Some(SignedDuration::from_mins(shortest))
    }

    /// The first date from 2000-01-01 with a match, within one 400-year cycle (after which
    /// dates and weekdays repeat).
    fn first_run_day(&self) -> Option<Date> {
        let start = Date::constant(2000, 1, 1).to_datetime(Time::midnight());
        let first = self.cron.find_next_occurrence(&start, true).ok()?;
        (first.year() < 2400).then(|| first.date())
    }

    /// The minutes of the day (0–1439) that match on a matching `day`: the minute and hour
    /// fields do not depend on the date.
    fn minutes_of_day(&self, day: Date) -> Vec<i64> {
        (0..1440).filter(|&m| self.matches_at(day, m)).collect()
    }

    fn matches_at(&self, day: Date, minute_of_day: i64) -> bool {
        let time = Time::constant((minute_of_day / 60) as i8, (minute_of_day % 60) as i8, 0, 0);
        self.matches(day.to_datetime(time))
    }

    /// Whether two consecutive dates match. Whether a date matches depends on its month, day,
    /// weekday and (for 29 February) the year being a leap year; 2001–2029 holds every
    /// combination of two consecutive dates, so it is enough to look there.
    fn has_consecutive_days(&self, minute_of_day: i64) -> bool {
        let mut day = Date::constant(2000, 12, 31);
        let mut previous = self.matches_at(day, minute_of_day);
        while day < Date::constant(2030, 1, 1) {
            day = day.tomorrow().expect("within jiff's range");
            let matches = self.matches_at(day, minute_of_day);
            if previous && matches {
                return true;
            }
            previous = matches;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(s: &str) -> CronExpression {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn dt(s: &str) -> DateTime {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_standard_syntax() {
        for ok in [
            "* * * * *",
            "*/15 * * * *",
            "30 6 * * MON-FRI",
            "0 0 1 jan *",
            "0 9 1,15 * *",
            "5-10/5 */2 * * 0,7",
            "@daily",
            "@HOURLY",
            "@midnight",
            "0 0 29 2 *",
        ] {
            cron(ok);
        }
        assert_eq!(cron("  0  6 * *\t* ").as_str(), "0 6 * * *");
    }

    #[test]
    fn refuses_what_is_not_standard_with_the_fix() {
        let err = |s: &str| s.parse::<CronExpression>().unwrap_err();
        assert_eq!(err(""), InvalidCron::Empty);
        assert_eq!(err("0 0 6 * * *"), InvalidCron::FieldCount { count: 6 });
        assert_eq!(err("0 6 * *"), InvalidCron::FieldCount { count: 4 });
        assert!(matches!(err("0 6 L * *"), InvalidCron::Extension { .. }));
        assert!(matches!(err("0 6 15W * *"), InvalidCron::Extension { .. }));
        assert!(matches!(err("0 6 * * 5#2"), InvalidCron::Extension { .. }));
        assert!(matches!(err("0 6 * * 5L"), InvalidCron::Extension { .. }));
        assert!(matches!(err("0 6 ? * MON"), InvalidCron::Extension { .. }));
        assert!(matches!(err("61 * * * *"), InvalidCron::Syntax { .. }));
        assert!(matches!(err("@reboot"), InvalidCron::Syntax { .. }));
        assert_eq!(err("0 0 30 2 *"), InvalidCron::NeverRuns);
        assert_eq!(err("0 0 31 4,6,9,11 *"), InvalidCron::NeverRuns);
        assert_eq!(err(&"1,".repeat(70)), InvalidCron::TooLong);
        assert!(err("0 0 6 * * *").to_string().contains("exactly five"));
    }

    #[test]
    fn finds_wall_times_either_side() {
        let c = cron("*/15 9-17 * * MON-FRI");
        // 2024-06-07 is a Friday.
        assert_eq!(c.next_after(dt("2024-06-07T17:45")), Some(dt("2024-06-10T09:00")));
        assert_eq!(c.next_after(dt("2024-06-07T09:00")), Some(dt("2024-06-07T09:15")));
        assert_eq!(c.next_after(dt("2024-06-07T09:00:00.5")), Some(dt("2024-06-07T09:15")));
        assert_eq!(c.previous_at_or_before(dt("2024-06-07T09:15")), Some(dt("2024-06-07T09:15")));
        assert_eq!(c.previous_at_or_before(dt("2024-06-07T09:15:00.7")), Some(dt("2024-06-07T09:15")));
        assert_eq!(c.previous_at_or_before(dt("2024-06-10T08:59")), Some(dt("2024-06-07T17:45")));
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_set() {
        // Vixie cron: the 13th, or any Friday.
        let c = cron("0 0 13 * FRI");
        assert!(c.matches(dt("2024-06-13T00:00"))); // a Thursday
        assert!(c.matches(dt("2024-06-14T00:00"))); // a Friday
        assert!(!c.matches(dt("2024-06-12T00:00")));
    }

    #[test]
    fn shortest_interval_on_the_wall_clock() {
        let mins = |s: &str| cron(s).shortest_interval().map(|d| d.as_secs() / 60);
        assert_eq!(mins("* * * * *"), Some(1));
        assert_eq!(mins("*/5 * * * *"), Some(5));
        assert_eq!(mins("0,50 * * * *"), Some(10));
        assert_eq!(mins("0 * * * *"), Some(60));
        assert_eq!(mins("@hourly"), Some(60));
        assert_eq!(mins("@midnight"), None);
        assert_eq!(mins("0,59 0,23 * * *"), Some(1)); // 23:59 then 00:00
        assert_eq!(mins("0,59 0,23 1 * *"), Some(59)); // no two consecutive days
        assert_eq!(mins("0,59 0,23 1,31 * *"), Some(1)); // 31 January then 1 February
        assert_eq!(mins("0,59 0,23 29 2 *"), Some(59)); // a leap day only
        assert_eq!(mins("0,59 0,23 29 2 FRI"), Some(1)); // Thursday then Friday
        assert_eq!(mins("59 23 * * *"), None);
        assert_eq!(mins("0 6 * * MON"), None);
    }
}
