//! The parts of a warehouse SQL source that do not depend on the warehouse: retry timing,
//! bounded page reads, the read-only statement check, column plans, and exact number
//! text. Kept apart so they can move into a shared `source/warehouse.rs` with the
//! Snowflake and Databricks sources unchanged.

use std::time::Duration;

use crate::domain::identifiers::{ColumnPlan, IdentifierFields};
use crate::domain::validate::Problem;
use crate::source::SourceError;

/// How often and how long a warehouse request is retried on a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// Ceiling of the first backoff; it doubles per retry up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 6, base_delay: Duration::from_millis(200), max_delay: Duration::from_secs(8) }
    }
}

impl RetryPolicy {
    /// Full-jitter exponential backoff before retry number `retry` (1 = the first retry):
    /// uniform in `[0, min(max_delay, base·2^(retry-1))]`. `unit` is random in `[0, 1)`.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.base_delay.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(self.max_delay);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Sleeps the backoff before retry number `retry`.
    pub async fn wait(&self, retry: u32) {
        tokio::time::sleep(self.backoff(retry, rand::random::<f64>())).await;
    }
}

/// Why a page body could not be read whole.
#[derive(Debug)]
pub enum BodyError {
    /// Larger than the limit; reading stopped there.
    TooLarge,
    Transport(reqwest::Error),
}

/// A response body, refused as soon as it passes `limit` bytes (by `Content-Length` or by
/// what arrived), so one hostile or broken page cannot exhaust memory.
pub async fn read_body_bounded(mut response: reqwest::Response, limit: u64) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::with_capacity(response.content_length().unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The statement check the controller also runs (`InvalidSpec`), repeated where the source
/// opens so a spec that skipped validation still cannot send a second statement.
pub fn read_only_statement(
    what: &str,
    field: &str,
    query: &str,
    check: fn(&str) -> Result<(), Problem>,
) -> Result<(), SourceError> {
    check(query).map_err(|problem| SourceError::Config { what: what.to_owned(), message: format!("{field} {problem}") })
}

/// Where each mapped identifier field is in the result's columns, or a config error naming
/// the missing one and the columns there are.
pub fn column_plan(what: &str, fields: &IdentifierFields, names: &[&str]) -> Result<ColumnPlan, SourceError> {
    fields.column_plan(names).map_err(|missing| SourceError::Config {
        what: what.to_owned(),
        message: format!(
            "the query returns no column {missing:?} named in identifiers (columns: {}); alias it in the SELECT or fix the mapping",
            names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// Longest exponent [`plain_decimal`] expands: a hostile `1E999999999` must not allocate
/// a gigabyte of zeros.
const MAX_EXPONENT: i64 = 1000;

/// A decimal number's text without exponent, leading zeros, trailing fractional zeros or
/// a trailing `.`: `"1.50E3"` → `"1500"`, `"0012.3400"` → `"12.34"`, `"-0.0"` → `"0"`,
/// `"1e-3"` → `"0.001"`. Exact (no floating point), so a 76-digit BIGNUMERIC or an id
/// beyond 2⁵³ keeps every digit. `None` when `text` is not a finite decimal number.
pub fn plain_decimal(text: &str) -> Option<String> {
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], parse_exponent(&unsigned[at + 1..])?),
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty()) || !all_digits(int_part) || !all_digits(frac_part) {
        return None;
    }
    // digits × 10^(point - len): place the point `point` digits from the left.
    let digits: String = format!("{int_part}{frac_part}");
    let point = int_part.len() as i64 + exponent;
    let (int_digits, frac_digits) = if point <= 0 {
        (String::new(), format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize)))
    } else if point as usize >= digits.len() {
        (format!("{digits}{}", "0".repeat(point as usize - digits.len())), String::new())
    } else {
        (digits[..point as usize].to_owned(), digits[point as usize..].to_owned())
    };
    let int_digits = int_digits.trim_start_matches('0');
    let frac_digits = frac_digits.trim_end_matches('0');
    let mut out = String::with_capacity(int_digits.len() + frac_digits.len() + 3);
    if negative && !(int_digits.is_empty() && frac_digits.is_empty()) {
        out.push('-');
    }
    out.push_str(if int_digits.is_empty() { "0" } else { int_digits });
    if !frac_digits.is_empty() {
        out.push('.');
        out.push_str(frac_digits);
    }
    Some(out)
}

fn parse_exponent(text: &str) -> Option<i64> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = text.parse().ok()?;
    (value.abs() <= MAX_EXPONENT).then_some(value)
}

/// A float's text with no exponent and no trailing `.0`, the shortest that reads back as
/// the same double: `"1.0E10"` → `"10000000000"`, `"2.5E-4"` → `"0.00025"`. `None` for
/// NaN and infinities, which no identifier can be.
pub fn plain_float(text: &str) -> Option<String> {
    let value: f64 = text.trim().parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    // Display never uses an exponent and prints the shortest round-tripping digits.
    let shown = format!("{value}");
    Some(if shown == "-0" { "0".to_owned() } else { shown })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_lose_exponents_and_padding_but_no_digit() {
        let cases = [
            ("1.50E3", "1500"),
            ("0012.3400", "12.34"),
            ("-0.0", "0"),
            ("1e-3", "0.001"),
            ("123456789012345678901234567890", "123456789012345678901234567890"),
            ("9007199254740993", "9007199254740993"),
            ("1.2345678901234567890123456789012345678E+37", "12345678901234567890123456789012345678"),
            ("5.000000000", "5"),
            ("-12.5e-1", "-1.25"),
            ("+7", "7"),
            (".5", "0.5"),
            ("5.", "5"),
            ("0", "0"),
        ];
        for (input, want) in cases {
            assert_eq!(plain_decimal(input).as_deref(), Some(want), "{input}");
        }
        for bad in ["", "-", ".", "1e", "1e+", "abc", "1.2.3", "1e99999999", "NaN", "1 2", "0x10"] {
            assert_eq!(plain_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn floats_print_the_shortest_exact_digits_without_exponent() {
        assert_eq!(plain_float("1.0E10").as_deref(), Some("10000000000"));
        assert_eq!(plain_float("2.5E-4").as_deref(), Some("0.00025"));
        assert_eq!(plain_float("3.14").as_deref(), Some("3.14"));
        assert_eq!(plain_float("100.0").as_deref(), Some("100"));
        assert_eq!(plain_float("-0.0").as_deref(), Some("0"));
        assert_eq!(plain_float("0.1").as_deref(), Some("0.1"));
        for bad in ["NaN", "Infinity", "-Infinity", "x"] {
            assert_eq!(plain_float(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_to_its_ceiling() {
        let p = RetryPolicy { attempts: 5, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        assert_eq!(p.backoff(1, 0.999_999), Duration::from_millis(100).mul_f64(0.999_999));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(p.backoff(30, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(2, 0.0), Duration::ZERO);
    }
}
