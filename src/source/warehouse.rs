//! What the SQL-over-REST warehouse sources (Snowflake, Databricks, BigQuery) share.
//!
//! Each warehouse answers a statement with pages of rows whose cells are text (or JSON
//! null) plus a schema naming each column's type. This module turns that into members the
//! same way for every warehouse:
//!
//! - [`checked_query`]: the query is one `SELECT`/`WITH` statement in the warehouse's own
//!   lexical rules (the check `validate` runs for PostgreSQL, see [`check_select`]);
//! - [`RowMapper`]: the identifier mapping over the statement's columns, each cell passed
//!   through [`exact_text`] so that numbers arrive as Braze expects (`12345`, never `1.2345E4`
//!   or `12345.0`);
//! - [`Backoff`]: jittered exponential waits for the documented transient answers (429, 503,
//!   "still running"), bounded in attempts;
//! - [`read_body`]: one page's body, refused past a byte cap, so a run never holds more than
//!   one page;
//! - [`excerpt`]: a short, redacted quote of a server's answer for error messages.
//!
//! Nothing here knows a warehouse's wire format; each source maps its schema to
//! [`ColumnType`] and its errors to [`SourceError`].

use std::borrow::Cow;
use std::time::Duration;

use futures::StreamExt;

use super::{BatchBuilder, MemberBatch, REDACT_MIN_LEN, SourceError};
use crate::domain::identifiers::{ColumnPlan, IdentifierFields, SkipReason, Value};
use crate::domain::validate::{SqlDialect, check_select};
use crate::secret::redact;

/// `User-Agent` of every warehouse request (Snowflake requires one, in RFC 7231 form).
pub const USER_AGENT: &str = concat!("cohort-operator/", env!("CARGO_PKG_VERSION"));

/// The query as it is sent: checked to be one `SELECT`/`WITH` statement, trailing `;` and
/// blanks removed (several APIs count a trailing `;` as a second, empty statement).
pub fn checked_query(what: &str, field: &str, query: &str, dialect: SqlDialect) -> Result<String, SourceError> {
    check_select(query, dialect)
        .map_err(|problem| SourceError::Config { what: what.to_owned(), message: format!("{field}: {problem}") })?;
    Ok(query.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace()).to_owned())
}

/// What a column holds, as far as turning its cells into identifier text goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// Strings, dates, times, binary as the warehouse renders them: taken as they are.
    Text,
    /// Exact numbers (integers, decimals, Snowflake `FIXED`/`DECFLOAT`): written out in plain
    /// decimal, without exponent and without a fractional part that is only zeros.
    Exact,
    /// Binary floating point (`FLOAT`, `DOUBLE`, `REAL`): an integral value up to 2^53 is
    /// written as an integer; a larger one is no longer exact and is skipped.
    Float,
    /// A JSON document (Snowflake `VARIANT`): a JSON string gives its text, a JSON number its
    /// plain form, anything else is skipped.
    Json,
    /// Arrays, maps, structs, objects: no identifier can be read from them.
    Unsupported,
}

/// A cell of `ty` as identifier text (see [`ColumnType`]); `None` is SQL NULL.
pub fn exact_text<'a>(cell: Option<&'a str>, ty: &ColumnType) -> Value<'a> {
    let Some(text) = cell else { return Value::Null };
    match ty {
        ColumnType::Text => Value::text(text),
        ColumnType::Exact => match plain_decimal(text) {
            Some(plain) if plain == text => Value::text(text),
            Some(plain) => Value::Text(Cow::Owned(plain)),
            // Not a number after all (a warehouse rendering we do not know): as it is.
            None => Value::text(text),
        },
        ColumnType::Float => float_text(text),
        ColumnType::Json => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::String(s)) => Value::Text(Cow::Owned(s)),
            Ok(serde_json::Value::Number(n)) => {
                let n = n.to_string();
                Value::Text(Cow::Owned(plain_decimal(&n).unwrap_or(n)))
            }
            Ok(serde_json::Value::Null) => Value::Null,
            _ => Value::Rejected(SkipReason::UnsupportedValue),
        },
        ColumnType::Unsupported => Value::Rejected(SkipReason::UnsupportedValue),
    }
}

fn float_text(text: &str) -> Value<'static> {
    const EXACT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Value::Text(Cow::Owned(String::new()));
    }
    match trimmed.parse::<f64>() {
        Ok(v) if !v.is_finite() => Value::Rejected(SkipReason::UnsupportedValue),
        Ok(v) if v.fract() == 0.0 && v.abs() > EXACT_LIMIT => Value::Rejected(SkipReason::UnsupportedValue),
        // Rust writes floats in plain decimal, shortest form that reads back the same.
        Ok(0.0) => Value::Text(Cow::Borrowed("0")),
        Ok(v) => Value::Text(Cow::Owned(format!("{v}"))),
        Err(_) => Value::Rejected(SkipReason::UnsupportedValue),
    }
}

/// A decimal number (`-12.50`, `1.2345E+4`, `+7`) in plain form without exponent and
/// without trailing fractional zeros (`-12.5`, `12345`, `7`), by digit manipulation only;
/// `None` if `text` is not a decimal number.
pub fn plain_decimal(text: &str) -> Option<String> {
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || exponent.abs() > 1000
    {
        return None;
    }
    let digits: String = format!("{int}{frac}");
    // The decimal point sits after `point` digits of `digits`.
    let point = int.len() as i64 + exponent;
    let (mut int_part, mut frac_part) = if point <= 0 {
        (String::new(), format!("{}{digits}", "0".repeat((-point) as usize)))
    } else if point as usize >= digits.len() {
        (format!("{digits}{}", "0".repeat(point as usize - digits.len())), String::new())
    } else {
        (digits[..point as usize].to_owned(), digits[point as usize..].to_owned())
    };
    let trimmed_int = int_part.trim_start_matches('0');
    int_part = if trimmed_int.is_empty() { "0".to_owned() } else { trimmed_int.to_owned() };
    frac_part.truncate(frac_part.trim_end_matches('0').len());
    let zero = int_part == "0" && frac_part.is_empty();
    let mut out = String::with_capacity(int_part.len() + frac_part.len() + 2);
    if negative && !zero {
        out.push('-');
    }
    out.push_str(&int_part);
    if !frac_part.is_empty() {
        out.push('.');
        out.push_str(&frac_part);
    }
    Some(out)
}

/// The identifier mapping over one statement's columns.
#[derive(Clone, Debug)]
pub struct RowMapper {
    fields: IdentifierFields,
    plan: ColumnPlan,
    types: Vec<ColumnType>,
    width: usize,
}

impl RowMapper {
    /// Finds the mapped columns among `columns` (name, type); a missing one is a
    /// configuration error naming the columns the statement returns.
    pub fn new(what: &str, fields: &IdentifierFields, columns: Vec<(String, ColumnType)>) -> Result<Self, SourceError> {
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        let plan = fields.column_plan(&names).map_err(|missing| SourceError::Config {
            what: what.to_owned(),
            message: format!(
                "the query returns no column {missing:?} named in identifiers (columns: {}); \
                 alias it in the SELECT (names are case-sensitive) or fix the mapping",
                names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            ),
        })?;
        let width = columns.len();
        Ok(RowMapper { fields: fields.clone(), plan, types: columns.into_iter().map(|(_, t)| t).collect(), width })
    }

    /// Cells every row must have.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Resolves rows into one batch; a row with the wrong number of cells is a malformed
    /// answer (`location` names the page), not a skipped row.
    pub fn batch<R: AsRef<[Option<S>]>, S: AsRef<str>>(
        &self,
        what: &str,
        format: &'static str,
        location: &str,
        rows: &[R],
    ) -> Result<MemberBatch, SourceError> {
        let mut batch = BatchBuilder::default();
        for (i, row) in rows.iter().enumerate() {
            let row = row.as_ref();
            if row.len() != self.width {
                return Err(SourceError::Malformed {
                    what: what.to_owned(),
                    format,
                    location: format!("{location}, row {i}"),
                    message: format!("{} cells where the schema has {} columns", row.len(), self.width),
                });
            }
            batch.push(self.fields.resolve_columns(&self.plan, |c| {
                exact_text(row[c].as_ref().map(|s| <S as AsRef<str>>::as_ref(s)), &self.types[c])
            }));
        }
        Ok(batch.take())
    }
}

/// Jittered exponential backoff over a bounded number of attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
    max_attempts: u32,
}

impl Backoff {
    /// `max_attempts` retries at most, waits from `base` doubling up to `max`.
    pub fn new(base: Duration, max: Duration, max_attempts: u32) -> Self {
        Backoff { base, max, attempts: 0, max_attempts }
    }

    /// For transient HTTP answers (429, 503, …): 8 retries, 0.5 s up to 30 s.
    pub fn transient() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30), 8)
    }

    /// Retries used so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next wait (the server's `Retry-After` when longer), or `None` when the retries
    /// are used up.
    pub fn next_delay(&mut self, server_hint: Option<Duration>) -> Option<Duration> {
        if self.attempts >= self.max_attempts {
            return None;
        }
        self.attempts += 1;
        let ceiling = self.base.saturating_mul(1u32 << (self.attempts - 1).min(20)).min(self.max);
        // Half fixed, half random: never hammer, never synchronise.
        let wait = ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0);
        Some(server_hint.map_or(wait, |hint| hint.min(Duration::from_secs(300)).max(wait)))
    }

    /// Waits [`Self::next_delay`]; `false` when the retries are used up.
    pub async fn wait(&mut self, server_hint: Option<Duration>) -> bool {
        match self.next_delay(server_hint) {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// Polling a statement that is still running: 0.2 s growing to 5 s, bounded by the
/// statement's deadline rather than a count.
pub fn polling() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5), u32::MAX)
}

/// `Retry-After` in seconds, when the server sent one.
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A response body, read as it arrives and refused once it passes `limit` bytes (after
/// decompression). `part` names the page for messages ("partition 3"), `field` the spec
/// field that raises the limit.
pub async fn read_body(
    what: &str,
    part: &str,
    field: &'static str,
    limit: u64,
    response: reqwest::Response,
) -> Result<Vec<u8>, SourceError> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(SourceError::PageTooLarge { what: what.to_owned(), part: part.to_owned(), field, limit });
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| SourceError::Query {
            what: what.to_owned(),
            message: format!("reading {part} failed: {}", crate::secret::error_chain(&e)),
        })?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(SourceError::PageTooLarge { what: what.to_owned(), part: part.to_owned(), field, limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// At most 300 characters of a server's answer, on one line, with `secrets` redacted.
pub fn excerpt(body: &[u8], secrets: &[&str]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    redact(&text, secrets, REDACT_MIN_LEN).chars().take(300).collect()
}

/// A random UUID (version 4), for idempotent resubmission (`requestId`).
pub fn request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The HTTP client of a warehouse source: rustls, gzip, the operator's `User-Agent`, and a
/// read timeout above the longest server-side wait the source asks for.
/// Every name is resolved through the operator's egress policy ([`super::egress`]), so no
/// connection — the API, a token endpoint, an external result link — reaches a denied address.
pub fn http_client(
    what: &str,
    read_timeout: Duration,
    egress: &std::sync::Arc<super::egress::EgressPolicy>,
) -> Result<reqwest::Client, SourceError> {
    reqwest::Client::builder()
        .dns_resolver(super::egress::EgressResolver(egress.clone()))
        .no_proxy()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(read_timeout)
        .user_agent(USER_AGENT)
        // Redirects would carry the bearer token elsewhere; these APIs never redirect.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| SourceError::Config {
            what: what.to_owned(),
            message: format!("cannot build the HTTP client: {}", crate::secret::error_chain(&e)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IdentifierMapping;
    use crate::domain::member::Member;

    #[test]
    fn exact_numbers_lose_exponents_and_zero_fractions() {
        for (input, expected) in [
            ("12345", "12345"),
            ("12345.00", "12345"),
            ("-12.50", "-12.5"),
            ("1.2345E+4", "12345"),
            ("1.2345e4", "12345"),
            ("12345678901234567890123456789012345678", "12345678901234567890123456789012345678"),
            ("1.5E-3", "0.0015"),
            ("-0.0", "0"),
            ("007", "7"),
            ("+3", "3"),
            ("1E40", "10000000000000000000000000000000000000000"),
        ] {
            assert_eq!(plain_decimal(input).as_deref(), Some(expected), "{input}");
        }
        for bad in ["", "-", "abc", "1.2.3", "1e", "0x10", "1e99999"] {
            assert_eq!(plain_decimal(bad), None, "{bad}");
        }
    }

    #[test]
    fn cells_become_identifier_text_by_column_type() {
        let text = |cell: &str, ty| match exact_text(Some(cell), &ty) {
            Value::Text(t) => Ok(t.into_owned()),
            Value::Rejected(r) => Err(Some(r)),
            _ => Err(None),
        };
        assert_eq!(text("00042", ColumnType::Text), Ok("00042".into()));
        assert_eq!(text("42.000", ColumnType::Exact), Ok("42".into()));
        assert_eq!(text("1.23456789E9", ColumnType::Float), Ok("1234567890".into()));
        assert_eq!(text("1234567890.0", ColumnType::Float), Ok("1234567890".into()));
        assert_eq!(text("0.1", ColumnType::Float), Ok("0.1".into()));
        assert_eq!(text("1e16", ColumnType::Float), Err(Some(SkipReason::UnsupportedValue)));
        assert_eq!(text("NaN", ColumnType::Float), Err(Some(SkipReason::UnsupportedValue)));
        assert_eq!(text("\"u-1\"", ColumnType::Json), Ok("u-1".into()));
        assert_eq!(text("12.0", ColumnType::Json), Ok("12".into()));
        assert_eq!(text("{\"a\":1}", ColumnType::Json), Err(Some(SkipReason::UnsupportedValue)));
        assert_eq!(text("[1]", ColumnType::Unsupported), Err(Some(SkipReason::UnsupportedValue)));
        assert_eq!(exact_text(None, &ColumnType::Exact), Value::Null);
    }

    #[test]
    fn rows_resolve_through_the_mapping_and_wrong_widths_are_malformed() {
        let fields = IdentifierFields::from_mapping(&IdentifierMapping {
            external_id: Some("ID".into()),
            device_id: Some("DEVICE".into()),
            ..Default::default()
        })
        .unwrap();
        let columns = vec![("ID".to_owned(), ColumnType::Exact), ("DEVICE".to_owned(), ColumnType::Text)];
        let mapper = RowMapper::new("wh", &fields, columns).unwrap();
        let rows: Vec<Vec<Option<&str>>> =
            vec![vec![Some("7.0"), None], vec![None, Some("d-1")], vec![None, None], vec![Some("  "), Some("")]];
        let batch = mapper.batch("wh", "JSON", "page 0", &rows).unwrap();
        assert_eq!(batch.members, vec![Member::ExternalId("7".into()), Member::DeviceId("d-1".into())]);
        assert_eq!(batch.skipped.get(SkipReason::Missing), 2);
        let short: Vec<Vec<Option<&str>>> = vec![vec![Some("1")]];
        let err = mapper.batch("wh", "JSON", "page 2", &short).unwrap_err();
        assert!(err.to_string().contains("page 2, row 0: 1 cells where the schema has 2 columns"), "{err}");
        let err = RowMapper::new("wh", &fields, vec![("id".to_owned(), ColumnType::Text)]).unwrap_err();
        assert!(err.to_string().contains("no column \"ID\""), "{err}");
    }

    #[test]
    fn backoff_grows_and_stops() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400), 3);
        let waits: Vec<_> = std::iter::from_fn(|| b.next_delay(None)).collect();
        assert_eq!(waits.len(), 3);
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[2] >= Duration::from_millis(200) && waits[2] <= Duration::from_millis(400));
        b.reset();
        assert_eq!(b.next_delay(Some(Duration::from_secs(2))), Some(Duration::from_secs(2)));
    }

    #[test]
    fn queries_are_checked_in_the_warehouse_dialect() {
        let q = checked_query("wh", "snowflake.query", "SELECT 'a\\';b' AS x ; \n", SqlDialect::Snowflake).unwrap();
        assert_eq!(q, "SELECT 'a\\';b' AS x");
        let err = checked_query("wh", "databricks.query", "DELETE FROM t", SqlDialect::Databricks).unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(err.to_string().contains("databricks.query: starts with \"DELETE\""), "{err}");
        assert!(request_id().len() == 36 && request_id() != request_id());
        assert_eq!(excerpt(b"  token  abc123 \n here", &["abc123"]), "token <redacted> here");
    }
}
