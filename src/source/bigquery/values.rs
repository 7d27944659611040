//! BigQuery cells (`{"v": …}`) to identifier text, by the column's schema type.
//!
//! Leaf values arrive as strings (or null) whatever the type [BQ-GOVALUE]. An identifier
//! must arrive in Braze exactly as the user's systems write it, so numbers are normalised:
//! INT64 is passed as given (it exceeds a double's precision); FLOAT64 loses the exponent
//! and trailing `.0` that BigQuery's rendering carries (`"1.0E10"` → `"10000000000"`);
//! NUMERIC/BIGNUMERIC are made plain exactly, digit by digit. TIMESTAMP is asked for as
//! integer microseconds since the epoch; the older float-seconds form is converted to the
//! same. REPEATED and RECORD columns cannot be an identifier: mapping one is refused when
//! the schema arrives, with the SQL that fixes it.

use std::borrow::Cow;

use super::wire::Field;
use crate::domain::identifiers::{SkipReason, Value};
use crate::source::warehouse::{plain_decimal, plain_float};

/// How a column's cells become text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    Int64,
    Float64,
    /// NUMERIC and BIGNUMERIC.
    Decimal,
    Timestamp,
    Bool,
    /// STRING, BYTES (base64), DATE, TIME, DATETIME, GEOGRAPHY, JSON, INTERVAL, RANGE…:
    /// the text as given.
    Text,
    /// An ARRAY (mode REPEATED).
    Repeated,
    /// A STRUCT.
    Record,
}

impl ColumnKind {
    pub fn of(field: &Field) -> ColumnKind {
        if field.mode.as_deref().is_some_and(|m| m.eq_ignore_ascii_case("REPEATED")) {
            return ColumnKind::Repeated;
        }
        match field.field_type.to_ascii_uppercase().as_str() {
            "INTEGER" | "INT64" => ColumnKind::Int64,
            "FLOAT" | "FLOAT64" => ColumnKind::Float64,
            "NUMERIC" | "BIGNUMERIC" | "DECIMAL" | "BIGDECIMAL" => ColumnKind::Decimal,
            "TIMESTAMP" => ColumnKind::Timestamp,
            "BOOLEAN" | "BOOL" => ColumnKind::Bool,
            "RECORD" | "STRUCT" => ColumnKind::Record,
            _ => ColumnKind::Text,
        }
    }

    /// Why a column of this kind cannot hold an identifier, with the fix.
    pub fn unusable(self, column: &str) -> Option<String> {
        match self {
            ColumnKind::Repeated => Some(format!(
                "column {column:?} is REPEATED (an ARRAY), but an identifier is one value per row; \
                 UNNEST it in the query or select one element, e.g. {column}[SAFE_OFFSET(0)]"
            )),
            ColumnKind::Record => Some(format!(
                "column {column:?} is a RECORD (STRUCT), but an identifier is one value; \
                 select one of its fields, e.g. {column}.id AS {column}_id"
            )),
            _ => None,
        }
    }

    /// The identifier text of one cell. A value that cannot be the column's type (a
    /// non-finite float, an object in a scalar column) is rejected as unsupported.
    pub fn text(self, v: &serde_json::Value) -> Value<'_> {
        let raw: Cow<'_, str> = match v {
            serde_json::Value::Null => return Value::Null,
            serde_json::Value::String(s) => Cow::Borrowed(s),
            serde_json::Value::Number(n) => Cow::Owned(n.to_string()),
            serde_json::Value::Bool(b) if self == ColumnKind::Bool => Cow::Borrowed(if *b { "true" } else { "false" }),
            _ => return Value::Rejected(SkipReason::UnsupportedValue),
        };
        let converted = match self {
            ColumnKind::Int64 if is_integer(&raw) => return Value::Text(raw),
            ColumnKind::Int64 | ColumnKind::Decimal => plain_decimal(&raw),
            ColumnKind::Float64 => plain_float(&raw),
            ColumnKind::Timestamp if is_integer(&raw) => return Value::Text(raw),
            ColumnKind::Timestamp => microseconds(&raw),
            ColumnKind::Bool | ColumnKind::Text => return Value::Text(raw),
            ColumnKind::Repeated | ColumnKind::Record => None,
        };
        // An empty cell is missing, not malformed.
        match converted {
            Some(text) => Value::Text(Cow::Owned(text)),
            None if raw.trim().is_empty() => Value::Null,
            None => Value::Rejected(SkipReason::UnsupportedValue),
        }
    }
}

/// `-?[0-9]+` with no leading `+`: INT64's own rendering.
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Float seconds since the epoch (`"1.561017697269367E9"`) as integer microseconds, exactly.
fn microseconds(seconds: &str) -> Option<String> {
    let plain = plain_decimal(seconds)?;
    let (negative, unsigned) = plain.strip_prefix('-').map_or((false, plain.as_str()), |u| (true, u));
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let micros = format!("{int}{frac:0<6}");
    let (whole, rest) = micros.split_at(int.len() + 6);
    // Finer than a microsecond is not a TIMESTAMP BigQuery can hold.
    if rest.bytes().any(|b| b != b'0') {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    Some(match (negative, whole.is_empty()) {
        (_, true) => "0".to_owned(),
        (true, false) => format!("-{whole}"),
        (false, false) => whole.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(t: &str, mode: Option<&str>) -> Field {
        Field { name: "c".into(), field_type: t.into(), mode: mode.map(str::to_owned) }
    }

    fn text(kind: ColumnKind, v: serde_json::Value) -> Option<String> {
        match kind.text(&v) {
            Value::Text(t) => Some(t.into_owned()),
            Value::Null => None,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn numbers_arrive_as_braze_expects() {
        assert_eq!(text(ColumnKind::Int64, json!("9007199254740993")).as_deref(), Some("9007199254740993"));
        assert_eq!(text(ColumnKind::Int64, json!("-42")).as_deref(), Some("-42"));
        assert_eq!(text(ColumnKind::Float64, json!("1.0E10")).as_deref(), Some("10000000000"));
        assert_eq!(text(ColumnKind::Float64, json!("12345.0")).as_deref(), Some("12345"));
        assert_eq!(text(ColumnKind::Float64, json!("2.5E-4")).as_deref(), Some("0.00025"));
        assert_eq!(text(ColumnKind::Decimal, json!("123.4500")).as_deref(), Some("123.45"));
        assert_eq!(
            text(
                ColumnKind::Decimal,
                json!("57896044618658097711785492504343953926634992332820282019728.792003956564819967")
            )
            .as_deref(),
            Some("57896044618658097711785492504343953926634992332820282019728.792003956564819967")
        );
        assert_eq!(text(ColumnKind::Decimal, json!("1E+3")).as_deref(), Some("1000"));
    }

    #[test]
    fn timestamps_are_microseconds_either_way() {
        assert_eq!(text(ColumnKind::Timestamp, json!("1561017697269367")).as_deref(), Some("1561017697269367"));
        assert_eq!(text(ColumnKind::Timestamp, json!("1.561017697269367E9")).as_deref(), Some("1561017697269367"));
        assert_eq!(text(ColumnKind::Timestamp, json!("-1.5")).as_deref(), Some("-1500000"));
        assert_eq!(text(ColumnKind::Timestamp, json!("0.0")).as_deref(), Some("0"));
    }

    #[test]
    fn nulls_blanks_and_nonsense() {
        assert_eq!(ColumnKind::Text.text(&json!(null)), Value::Null);
        assert_eq!(text(ColumnKind::Text, json!("  ")).as_deref(), Some("  "));
        assert_eq!(ColumnKind::Float64.text(&json!("")), Value::Null);
        assert_eq!(ColumnKind::Float64.text(&json!("NaN")), Value::Rejected(SkipReason::UnsupportedValue));
        assert_eq!(ColumnKind::Int64.text(&json!({"f": []})), Value::Rejected(SkipReason::UnsupportedValue));
        assert_eq!(ColumnKind::Text.text(&json!(true)), Value::Rejected(SkipReason::UnsupportedValue));
        assert_eq!(text(ColumnKind::Bool, json!(true)).as_deref(), Some("true"));
    }

    #[test]
    fn kinds_follow_type_and_mode_in_either_spelling() {
        assert_eq!(ColumnKind::of(&field("INT64", None)), ColumnKind::Int64);
        assert_eq!(ColumnKind::of(&field("INTEGER", Some("NULLABLE"))), ColumnKind::Int64);
        assert_eq!(ColumnKind::of(&field("FLOAT", Some("REQUIRED"))), ColumnKind::Float64);
        assert_eq!(ColumnKind::of(&field("BIGNUMERIC", None)), ColumnKind::Decimal);
        assert_eq!(ColumnKind::of(&field("STRING", Some("REPEATED"))), ColumnKind::Repeated);
        assert_eq!(ColumnKind::of(&field("STRUCT", None)), ColumnKind::Record);
        assert_eq!(ColumnKind::of(&field("GEOGRAPHY", None)), ColumnKind::Text);
        let why = ColumnKind::Repeated.unusable("tags").unwrap();
        assert!(why.contains("UNNEST") && why.contains("tags[SAFE_OFFSET(0)]"), "{why}");
        assert!(ColumnKind::Record.unusable("user").unwrap().contains("user.id"));
        assert_eq!(ColumnKind::Text.unusable("x"), None);
    }
}
