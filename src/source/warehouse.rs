//! What the SQL-over-REST warehouse sources (Snowflake, Databricks, BigQuery) share.
//! (PostgreSQL shares [`column_plan`].)
//!
//! Every warehouse runs one statement and answers with pages of rows whose cells are text
//! (or JSON null) plus a schema naming each column's type. Each source implements only its
//! wire protocol ([`Protocol`]: submit, poll, fetch a page, cancel — one request each); the
//! one read loop, [`read`], drives all three the same way. Its parts:
//!
//! - [`checked_query`]: the query is one `SELECT`/`WITH` statement in the warehouse's own
//!   lexical rules (the check `validate` runs for PostgreSQL, see [`check_select`]);
//! - [`RowMapper`]: the identifier mapping over the statement's columns, each cell passed
//!   through [`exact_text`] (or the warehouse's own [`PageRows::Kind`]) so that numbers
//!   arrive as Braze expects (`12345`, never `1.2345E4` or `12345.0`);
//! - [`Backoff`]: the one retry scheme — jittered exponential waits for the documented
//!   transient answers (429, 503, "still running"), bounded in attempts and by the
//!   statement's deadline ([`Backoff::delay_or_unavailable`], [`sleep_within`]);
//! - [`read_body`] / [`read_body_bounded`]: one page's body, refused past a byte cap
//!   ([`PageLimit`]), so a run never holds more than one page;
//! - [`Quoting`]: what of a server's answer an error may quote — a vendor's own words only
//!   from the vendor's API domain, elsewhere its short codes ([`code`]) alone; [`json_error`]
//!   says what was wrong with a JSON answer without quoting it.
//!
//! Nothing here knows a warehouse's wire format; each source maps its schema to column
//! kinds and its errors to [`SourceError`].

use std::borrow::Cow;
use std::time::Duration;

use tokio::time::Instant;

use super::{BATCH_ROWS, BatchBuilder, MemberBatch, REDACT_MIN_LEN, SourceError};

mod driver;
mod rows;
use crate::domain::identifiers::{ColumnPlan, IdentifierFields, SkipReason, Value};
use crate::domain::sql::{SqlDialect, check_select};
use crate::net::HttpClient;
use crate::secret::redact;
pub(crate) use driver::{Failure, Next, Page, Progress, Protocol, Reading, ResultSet, Transient, read};
pub use rows::CompactRows;

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
        Ok(v) => Value::Text(Cow::Owned(plain_f64(v))),
        Err(_) => Value::Rejected(SkipReason::UnsupportedValue),
    }
}

/// A float's text with no exponent and no trailing `.0`, the shortest that reads back as
/// the same double: `"1.0E10"` → `"10000000000"`, `"2.5E-4"` → `"0.00025"`. `None` for
/// NaN and infinities, which no identifier can be. (BigQuery's FLOAT64; the other
/// warehouses go through [`exact_text`], which also refuses integers past 2^53.)
pub fn plain_float(text: &str) -> Option<String> {
    let value: f64 = text.trim().parse().ok()?;
    value.is_finite().then(|| plain_f64(value))
}

/// Rust writes floats in plain decimal, the shortest form that reads back the same; `-0`
/// is `0`.
fn plain_f64(value: f64) -> String {
    if value == 0.0 { "0".to_owned() } else { format!("{value}") }
}

/// Longest exponent [`plain_decimal`] expands: a hostile `1E999999999` must not allocate
/// a gigabyte of zeros.
const MAX_EXPONENT: i64 = 1000;

/// A decimal number's text without exponent, leading zeros, trailing fractional zeros or
/// a trailing `.`: `"1.50E3"` → `"1500"`, `"0012.3400"` → `"12.34"`, `"-0.0"` → `"0"`,
/// `"1e-3"` → `"0.001"`. Exact (no floating point, digit manipulation only), so a 76-digit
/// BIGNUMERIC or an id beyond 2⁵³ keeps every digit. `None` when `text` is not a finite
/// decimal number.
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

/// Where each mapped identifier field is among a result's columns, or a configuration error
/// naming the missing one and the columns the statement returns.
pub fn column_plan(what: &str, fields: &IdentifierFields, names: &[&str]) -> Result<ColumnPlan, SourceError> {
    fields.column_plan(names).map_err(|missing| SourceError::Config {
        what: what.to_owned(),
        message: format!(
            "the query returns no column {missing:?} named in identifiers (columns: {}); \
             alias it in the SELECT (names are case-sensitive) or fix the mapping",
            names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// One page's rows as a warehouse answered them, cell by cell: Snowflake's and Databricks'
/// arrays of strings ([`CompactRows`]), BigQuery's `{"f":[{"v":…}]}` rows. `Kind` is what
/// a column's schema type says of turning its cells into identifier text.
pub trait PageRows {
    type Kind;

    /// Rows in the page.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first row whose number of cells is not `width`, and that number.
    fn misfit(&self, width: usize) -> Option<(usize, usize)>;

    /// Cell `column` of row `row` as identifier text (only once [`PageRows::misfit`] said
    /// every row has the schema's cells).
    fn value(&self, row: usize, column: usize, kind: &Self::Kind) -> Value<'_>;
}

impl PageRows for CompactRows {
    type Kind = ColumnType;

    fn len(&self) -> usize {
        CompactRows::len(self)
    }

    fn misfit(&self, width: usize) -> Option<(usize, usize)> {
        match self.ragged() {
            Some(_) if self.width() != width => Some((0, self.width())),
            Some(ragged) => Some(ragged),
            None if !self.is_empty() && self.width() != width => Some((0, self.width())),
            None => None,
        }
    }

    fn value(&self, row: usize, column: usize, kind: &ColumnType) -> Value<'_> {
        exact_text(self.cell(row, column), kind)
    }
}

/// The identifier mapping over one statement's columns; `K` is what each column's type says
/// of its cells ([`ColumnType`], or a warehouse's own, see [`PageRows::Kind`]).
#[derive(Clone, Debug)]
pub struct RowMapper<K = ColumnType> {
    fields: IdentifierFields,
    plan: ColumnPlan,
    kinds: Vec<K>,
}

impl<K> RowMapper<K> {
    /// Finds the mapped columns among `columns` (name, kind); a missing one is a
    /// configuration error naming the columns the statement returns.
    pub fn new(what: &str, fields: &IdentifierFields, columns: Vec<(String, K)>) -> Result<Self, SourceError> {
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        let plan = column_plan(what, fields, &names)?;
        Ok(RowMapper { fields: fields.clone(), plan, kinds: columns.into_iter().map(|(_, k)| k).collect() })
    }

    /// Cells every row must have.
    pub fn width(&self) -> usize {
        self.kinds.len()
    }

    /// Resolves a page's rows a batch of [`BATCH_ROWS`] at a time, so one large page never
    /// becomes one large batch. A page whose rows do not all have the schema's number of
    /// cells is a malformed answer before any batch (`location` names the page).
    pub fn batches<'a, R: PageRows<Kind = K>>(
        &'a self,
        what: &str,
        format: &'static str,
        location: &str,
        rows: &'a R,
    ) -> Result<impl Iterator<Item = MemberBatch> + 'a, SourceError> {
        if let Some((row, cells)) = rows.misfit(self.width()) {
            return Err(SourceError::Malformed {
                what: what.to_owned(),
                format,
                location: format!("{location}, row {row}"),
                message: format!("{cells} cells where the schema has {} columns", self.width()),
            });
        }
        Ok((0..rows.len()).step_by(BATCH_ROWS).map(move |first| {
            let mut batch = BatchBuilder::default();
            for row in first..(first + BATCH_ROWS).min(rows.len()) {
                batch.push(self.fields.resolve_columns(&self.plan, |c| rows.value(row, c, &self.kinds[c])));
            }
            batch.take()
        }))
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
        let ceiling = exponential_ceiling(self.base, self.max, self.attempts);
        // Half fixed, half random: never hammer, never synchronise.
        let wait = ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0);
        Some(server_hint.map_or(wait, |hint| hint.min(Duration::from_secs(300)).max(wait)))
    }

    /// The wait before the next retry, or — the retries used up — the source's
    /// `Unavailable` error carrying `detail`, the last transient answer.
    pub fn delay_or_unavailable(
        &mut self,
        hint: Option<Duration>,
        what: &str,
        detail: String,
    ) -> Result<Duration, SourceError> {
        self.next_delay(hint).ok_or_else(|| SourceError::Unavailable {
            what: what.to_owned(),
            attempts: self.attempts + 1,
            detail,
        })
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// `base·2^(retry-1)`, at most `max`: the longest wait before retry number `retry` (1 = the
/// first retry).
fn exponential_ceiling(base: Duration, max: Duration, retry: u32) -> Duration {
    base.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(max)
}

/// Sleeps `wait`, unless waking would be at or past the statement's `deadline`: then fails
/// at once with `timeout()` rather than sleeping into it.
pub async fn sleep_within(
    wait: Duration,
    deadline: Instant,
    timeout: impl FnOnce() -> SourceError,
) -> Result<(), SourceError> {
    if Instant::now() + wait >= deadline {
        return Err(timeout());
    }
    tokio::time::sleep(wait).await;
    Ok(())
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

/// The operator's default ceiling on one page's body (`--max-source-page-bytes`): above a
/// Databricks inline result (25 MiB at most) and a BigQuery page (10 MB), and low enough that
/// a page at the ceiling, parsed into [`CompactRows`], stays well inside the chart's memory
/// limit.
pub const DEFAULT_MAX_PAGE_BYTES: u64 = 32 * 1024 * 1024;
/// The highest `--max-source-page-bytes` accepted: [`CompactRows`] counts in 31 bits.
pub const MAX_PAGE_BYTES_CEILING: u64 = 1 << 30;
/// Bytes of an error answer's body read (its message, its error code); the rest is never read.
pub const ERROR_BODY_BYTES: u64 = 4 * 1024;

/// The most bytes one page's body may have: the spec's cap (`field`), never above the
/// operator's ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimit {
    pub bytes: u64,
    /// The spec field that set it, or `None` when the operator's ceiling is lower.
    pub field: Option<&'static str>,
}

impl PageLimit {
    /// The lower of the spec's `spec_bytes` (in `field`) and the operator's `ceiling`.
    pub fn new(field: &'static str, spec_bytes: u64, ceiling: u64) -> Self {
        if spec_bytes <= ceiling {
            PageLimit { bytes: spec_bytes, field: Some(field) }
        } else {
            PageLimit { bytes: ceiling, field: None }
        }
    }

    /// The error for `part` of `what` over this limit, naming who set it.
    pub fn exceeded(&self, what: &str, part: &str) -> SourceError {
        let (what, part, limit) = (what.to_owned(), part.to_owned(), self.bytes);
        match self.field {
            Some(field) => SourceError::PageTooLarge { what, part, field, limit },
            None => SourceError::PageOverCeiling { what, part, limit },
        }
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
/// what arrived, after decompression), so one hostile or broken page cannot exhaust memory.
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

/// [`read_body_bounded`] with the source's errors: `part` names the page for messages
/// ("partition 3"), `limit` says who set the limit.
pub async fn read_body(
    what: &str,
    part: &str,
    limit: PageLimit,
    response: reqwest::Response,
) -> Result<Vec<u8>, SourceError> {
    read_body_bounded(response, limit.bytes).await.map_err(|e| match e {
        BodyError::TooLarge => limit.exceeded(what, part),
        BodyError::Transport(e) => SourceError::Query {
            what: what.to_owned(),
            message: format!("reading {part} failed: {}", crate::secret::error_chain(&e)),
        },
    })
}

/// The first [`ERROR_BODY_BYTES`] of an error answer's body (what arrives within
/// `wait`); the rest is never read. An answer that breaks off gives what came.
pub async fn read_error_body(mut response: reqwest::Response, wait: Duration) -> Vec<u8> {
    let mut body = Vec::new();
    let read = async {
        while (body.len() as u64) < ERROR_BODY_BYTES {
            let Ok(Some(chunk)) = response.chunk().await else { break };
            let room = ERROR_BODY_BYTES as usize - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    body
}

/// What of a server's answer an error message (status, Events, reports) may quote.
///
/// Whoever can read an import's status must not read what a host a tenant named answered:
/// a custom endpoint can be an in-cluster service. The vendor's own API domain is not one,
/// so its messages ("Object 'X' does not exist") are quoted, redacted and cut; from any
/// other host — a custom endpoint, a proxy, a local stand-in — only the status and short
/// codes ([`code`]) are shown, never free text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quoting {
    /// The host is under one of the vendor's API domains.
    Vendor,
    /// Any other host.
    CodesOnly,
}

impl Quoting {
    /// `Vendor` when `url`'s host is one of `vendor_domains` or under one.
    pub fn of(url: &reqwest::Url, vendor_domains: &[&str]) -> Self {
        let host = url.host_str().unwrap_or_default().trim_end_matches('.').to_ascii_lowercase();
        let vendor =
            vendor_domains.iter().any(|d| host == *d || host.strip_suffix(d).is_some_and(|rest| rest.ends_with('.')));
        if vendor { Quoting::Vendor } else { Quoting::CodesOnly }
    }

    /// A message from the answer as it may be shown: at most 300 characters on one line,
    /// `secrets` redacted, from the vendor; otherwise a note that it is not quoted.
    pub fn message(self, text: &str, secrets: &[&str]) -> String {
        match self {
            Quoting::Vendor => {
                let text: String = text.chars().take(4096).collect();
                let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
                redact(&text, secrets, REDACT_MIN_LEN).chars().take(300).collect()
            }
            Quoting::CodesOnly => "the host is not the vendor's, so its message is not quoted".to_owned(),
        }
    }
}

/// A code from an answer (an error code, an SQLSTATE, an OAuth `error`) when it is a short
/// token — letters, digits, `_`, `.`, `-`, at most 64 — so quoting it shows no free text.
pub fn code(text: &str) -> Option<&str> {
    let text = text.trim();
    let token = text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    (token && !text.is_empty() && text.len() <= 64).then_some(text)
}

/// What was wrong with a JSON answer, without quoting it (serde's own message can quote a
/// string of the answer): its kind and where.
pub fn json_error(error: &serde_json::Error) -> String {
    let what = match error.classify() {
        serde_json::error::Category::Io => "could not be read",
        serde_json::error::Category::Syntax => "is not JSON",
        serde_json::error::Category::Data => "has another shape than expected",
        serde_json::error::Category::Eof => "is cut off",
    };
    format!("the answer {what} (line {}, column {})", error.line(), error.column())
}

/// A random UUID (version 4), for idempotent resubmission (`requestId`).
pub fn request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// A request that failed before an answer: what to say of it when it is worth retrying,
/// or the egress policy's refusal (a name that resolved to a denied address, a redirect
/// to one), which no retry changes.
pub fn transport(what: &str, error: &reqwest::Error) -> Result<String, SourceError> {
    match crate::net::egress::denied_in(error) {
        Some(denied) => Err(SourceError::EgressDenied { what: what.to_owned(), denied: denied.clone() }),
        None => Ok(crate::secret::error_chain(error)),
    }
}

/// The HTTP client of a warehouse source ([`HttpClient`]: every connection under the
/// operator's egress policy — the API, a token endpoint, an external result link), with a
/// read timeout above the longest server-side wait the source asks for. It follows no
/// redirect: these APIs never redirect, and one would carry the bearer token elsewhere.
pub fn http_client(
    what: &str,
    read_timeout: Duration,
    egress: &std::sync::Arc<crate::net::egress::EgressPolicy>,
) -> Result<HttpClient, SourceError> {
    HttpClient::builder(egress).connect_timeout(Duration::from_secs(15)).read_timeout(read_timeout).build().map_err(
        |e| SourceError::Config {
            what: what.to_owned(),
            message: format!("cannot build the HTTP client: {}", crate::secret::error_chain(&e)),
        },
    )
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
        let rows: CompactRows = serde_json::from_str(r#"[["7.0",null],[null,"d-1"],[null,null],["  ",""]]"#).unwrap();
        let batches: Vec<MemberBatch> = mapper.batches("wh", "JSON", "page 0", &rows).unwrap().collect();
        assert_eq!(batches[0].members, vec![Member::ExternalId("7".into()), Member::DeviceId("d-1".into())]);
        assert_eq!(batches[0].skipped.get(SkipReason::Missing), 2);
        let short: CompactRows = serde_json::from_str(r#"[["1"]]"#).unwrap();
        let err = mapper.batches("wh", "JSON", "page 2", &short).err().unwrap();
        assert!(err.to_string().contains("page 2, row 0: 1 cells where the schema has 2 columns"), "{err}");
        let err = RowMapper::new("wh", &fields, vec![("id".to_owned(), ColumnType::Text)]).unwrap_err();
        assert!(err.to_string().contains("no column \"ID\""), "{err}");
    }

    #[test]
    fn a_spec_can_lower_the_operators_page_ceiling_but_never_raise_it() {
        let ceiling = DEFAULT_MAX_PAGE_BYTES;
        assert_eq!(
            PageLimit::new("maxChunkBytes", 1 << 20, ceiling),
            PageLimit { bytes: 1 << 20, field: Some("maxChunkBytes") }
        );
        assert_eq!(PageLimit::new("maxChunkBytes", 256 << 20, ceiling), PageLimit { bytes: ceiling, field: None });
        let err = PageLimit::new("maxChunkBytes", u64::MAX, 1024).exceeded("wh", "chunk 3");
        assert_eq!(err.reason(), "SourceFailed");
        assert!(
            err.to_string().starts_with("wh: chunk 3 is larger than the operator's ceiling of 1024 bytes"),
            "{err}"
        );
        let err = PageLimit::new("maxChunkBytes", 10, 1024).exceeded("wh", "chunk 3");
        assert_eq!(
            err.to_string(),
            "wh: chunk 3 is larger than maxChunkBytes (10 bytes); raise maxChunkBytes or select fewer columns"
        );
    }

    #[test]
    fn large_pages_map_in_batches_and_ragged_rows_are_malformed() {
        let fields =
            IdentifierFields::from_mapping(&IdentifierMapping { external_id: Some("ID".into()), ..Default::default() })
                .unwrap();
        let mapper = RowMapper::new("wh", &fields, vec![("ID".to_owned(), ColumnType::Text)]).unwrap();
        let json = format!("[{}]", (0..25_001).map(|i| format!("[\"u{i}\"]")).collect::<Vec<_>>().join(","));
        let rows: CompactRows = serde_json::from_str(&json).unwrap();
        let sizes: Vec<u64> = mapper.batches("wh", "JSON", "chunk 0", &rows).unwrap().map(|b| b.rows()).collect();
        assert_eq!(sizes, vec![10_000, 10_000, 5_001]);
        let ragged: CompactRows = serde_json::from_str(r#"[["a"],["b","c"]]"#).unwrap();
        let err = mapper.batches("wh", "JSON", "chunk 2", &ragged).err().unwrap();
        assert!(err.to_string().contains("chunk 2, row 1: 2 cells where the schema has 1 columns"), "{err}");
        let wide: CompactRows = serde_json::from_str(r#"[["a","b"]]"#).unwrap();
        assert!(mapper.batches("wh", "JSON", "chunk 2", &wide).err().unwrap().to_string().contains("row 0: 2 cells"));
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
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(1), 1);
        assert!(b.delay_or_unavailable(None, "wh", "HTTP 503".into()).is_ok());
        let err = b.delay_or_unavailable(None, "wh", "HTTP 503".into()).unwrap_err();
        assert_eq!(err.to_string(), "wh: still unavailable after 2 attempts: HTTP 503; the next run tries again");
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_is_a_timeout_at_once() {
        let timeout = || SourceError::Timeout { what: "wh".into(), seconds: 1 };
        let soon = Instant::now() + Duration::from_millis(50);
        let started = Instant::now();
        let err = sleep_within(Duration::from_secs(60), soon, timeout).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1) && err.reason() == "SourceFailed", "{err}");
        sleep_within(Duration::from_millis(1), Instant::now() + Duration::from_secs(60), timeout).await.unwrap();
    }

    #[test]
    fn queries_are_checked_in_the_warehouse_dialect() {
        let q = checked_query("wh", "snowflake.query", "SELECT 'a\\';b' AS x ; \n", SqlDialect::Snowflake).unwrap();
        assert_eq!(q, "SELECT 'a\\';b' AS x");
        let err = checked_query("wh", "databricks.query", "DELETE FROM t", SqlDialect::Databricks).unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(err.to_string().contains("databricks.query: starts with \"DELETE\""), "{err}");
        assert!(request_id().len() == 36 && request_id() != request_id());
    }

    #[test]
    fn only_the_vendors_own_domain_is_quoted_and_codes_are_short_tokens() {
        let vendor = Quoting::of(
            &reqwest::Url::parse("https://acme.snowflakecomputing.com/x").unwrap(),
            &["snowflakecomputing.com"],
        );
        assert_eq!(vendor, Quoting::Vendor);
        assert_eq!(vendor.message("  token  abc123 \n here", &["abc123"]), "token <redacted> here");
        for other in
            ["https://snowflakecomputing.com.evil.test/", "https://evilsnowflakecomputing.com/", "http://127.0.0.1:1/"]
        {
            let quoting = Quoting::of(&reqwest::Url::parse(other).unwrap(), &["snowflakecomputing.com"]);
            assert_eq!(quoting, Quoting::CodesOnly, "{other}");
            assert!(!quoting.message("secret-marker", &[]).contains("secret-marker"));
        }
        assert_eq!(code(" 002003 "), Some("002003"));
        assert_eq!(code("TABLE_OR_VIEW_NOT_FOUND"), Some("TABLE_OR_VIEW_NOT_FOUND"));
        assert_eq!(code("two words"), None);
        assert_eq!(code(&"x".repeat(65)), None);
        let err = serde_json::from_str::<u64>("\"secret-marker\"").unwrap_err();
        assert!(!json_error(&err).contains("secret-marker"), "{}", json_error(&err));
    }
}
