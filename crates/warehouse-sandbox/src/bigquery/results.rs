//! Runs a query job's SQL on PostgreSQL and renders the result as BigQuery's REST API
//! does: a schema of `{name, type, mode}` and rows `{"f":[{"v":…}]}` where every leaf is a
//! string or null [BQ-GOVALUE] — INTEGER as decimal text, FLOAT in BigQuery's Java-style
//! rendering (`"1.0E10"`, `"100.0"`), NUMERIC as PostgreSQL prints it, BOOLEAN
//! `"true"/"false"`, arrays as REPEATED `{"v":[{"v":…}]}`; anything else as STRING text.
//!
//! The SQL runs in a read-only transaction through a cursor, 10,000 rows a fetch; each
//! rendered row is kept as its JSON text, so a million-row result costs tens of MB.

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Kind, Type};
use tokio_postgres::{NoTls, SimpleQueryMessage};

use super::ApiError;

/// A complete job's result.
pub struct ResultSet {
    /// `[{"name":…,"type":…,"mode":…}, …]` as JSON text.
    pub schema_json: String,
    /// Each row's `{"f":[…]}` JSON text.
    pub rows: Vec<Box<str>>,
    /// Bytes of every rendered value: what "bytes processed" is modelled as.
    pub bytes: u64,
}

/// How one column renders.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Render {
    Integer,
    Float,
    Numeric,
    Boolean,
    Text,
}

impl Render {
    fn of(t: &Type) -> (Render, &'static str) {
        match *t {
            Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => (Render::Integer, "INTEGER"),
            Type::FLOAT4 | Type::FLOAT8 => (Render::Float, "FLOAT"),
            Type::NUMERIC => (Render::Numeric, "NUMERIC"),
            Type::BOOL => (Render::Boolean, "BOOLEAN"),
            Type::DATE => (Render::Text, "DATE"),
            Type::BYTEA => (Render::Text, "BYTES"),
            _ => (Render::Text, "STRING"),
        }
    }

    fn value(self, text: &str) -> String {
        match self {
            Render::Float => java_double(text),
            Render::Boolean => if text == "t" { "true" } else { "false" }.to_owned(),
            _ => text.to_owned(),
        }
    }
}

/// A column: its rendering, and whether it is an array (mode REPEATED).
#[derive(Clone, Copy, Debug)]
struct Column {
    render: Render,
    repeated: bool,
}

/// Runs `sql` and renders every row. PostgreSQL errors become BigQuery's: syntax and
/// semantic errors `invalidQuery` (400), a missing table `notFound` (404), a refused
/// privilege `accessDenied` (403).
pub async fn run(postgres_url: &str, sql: &str) -> Result<ResultSet, ApiError> {
    let (client, connection) = tokio_postgres::connect(postgres_url, NoTls)
        .await
        .map_err(|e| ApiError::new(500, "backendError", &format!("the stand-in's PostgreSQL is unreachable: {e}")))?;
    tokio::spawn(connection);
    client.batch_execute("START TRANSACTION READ ONLY").await.map_err(|e| pg_error(&e))?;
    let statement = client.prepare(sql).await.map_err(|e| pg_error(&e))?;
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for c in statement.columns() {
        let (element, repeated) = match c.type_().kind() {
            Kind::Array(inner) => (inner.clone(), true),
            _ => (c.type_().clone(), false),
        };
        let (render, bq_type) = Render::of(&element);
        let mode = if repeated { "REPEATED" } else { "NULLABLE" };
        fields.push(serde_json::json!({ "name": c.name(), "type": bq_type, "mode": mode }));
        columns.push(Column { render, repeated });
    }
    client.execute(&format!("DECLARE job_result NO SCROLL CURSOR FOR {sql}"), &[]).await.map_err(|e| pg_error(&e))?;
    let mut result = ResultSet { schema_json: serde_json::Value::from(fields).to_string(), rows: Vec::new(), bytes: 0 };
    loop {
        let messages = client.simple_query("FETCH FORWARD 10000 FROM job_result").await.map_err(|e| pg_error(&e))?;
        let before = result.rows.len();
        for message in &messages {
            if let SimpleQueryMessage::Row(row) = message {
                let (json, bytes) = render_row(&columns, |i| row.get(i));
                result.bytes += bytes;
                result.rows.push(json.into_boxed_str());
            }
        }
        if result.rows.len() - before < 10_000 {
            break;
        }
    }
    client.batch_execute("COMMIT").await.map_err(|e| pg_error(&e))?;
    Ok(result)
}

/// One row as `{"f":[{"v":…},…]}`, and the bytes of its values.
fn render_row<'a>(columns: &[Column], cell: impl Fn(usize) -> Option<&'a str>) -> (String, u64) {
    let mut out = String::from("{\"f\":[");
    let mut bytes = 0u64;
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"v\":");
        match cell(i) {
            None => out.push_str("null"),
            Some(text) if column.repeated => {
                let elements: Vec<serde_json::Value> = parse_array(text)
                    .into_iter()
                    .map(|e| serde_json::json!({ "v": e.map(|e| column.render.value(&e)) }))
                    .collect();
                bytes += text.len() as u64;
                out.push_str(&serde_json::Value::from(elements).to_string());
            }
            Some(text) => {
                let value = column.render.value(text);
                bytes += value.len() as u64;
                out.push_str(&serde_json::Value::from(value).to_string());
            }
        }
        out.push('}');
    }
    out.push_str("]}");
    (out, bytes)
}

/// The elements of a one-dimensional PostgreSQL array literal, `{a,"b c",NULL}`.
fn parse_array(text: &str) -> Vec<Option<String>> {
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    let mut out = Vec::new();
    if inner.is_empty() {
        return out;
    }
    let (mut current, mut quoted, mut was_quoted, mut chars) = (String::new(), false, false, inner.chars());
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '\\' if quoted => current.extend(chars.next()),
            ',' if !quoted => {
                out.push(if !was_quoted && current == "NULL" { None } else { Some(std::mem::take(&mut current)) });
                current.clear();
                was_quoted = false;
            }
            c => current.push(c),
        }
    }
    out.push(if !was_quoted && current == "NULL" { None } else { Some(current) });
    out
}

/// A double as BigQuery's REST API (Java's `Double.toString`) prints it: plain with at
/// least one decimal for 10⁻³ ≤ |x| < 10⁷, else `d.dddE±n`.
pub fn java_double(text: &str) -> String {
    let Ok(v) = text.trim().parse::<f64>() else { return text.to_owned() };
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let a = v.abs();
    if a == 0.0 || (1e-3..1e7).contains(&a) {
        let plain = format!("{v}");
        return if plain.contains('.') { plain } else { format!("{plain}.0") };
    }
    let sci = format!("{v:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} has an exponent");
    let mantissa = if mantissa.contains('.') { mantissa.to_owned() } else { format!("{mantissa}.0") };
    format!("{mantissa}E{exponent}")
}

fn pg_error(e: &tokio_postgres::Error) -> ApiError {
    let Some(db) = e.as_db_error() else {
        return ApiError::new(500, "backendError", &format!("the stand-in's PostgreSQL failed: {e}"));
    };
    let position = match db.position() {
        Some(tokio_postgres::error::ErrorPosition::Original(p)) => format!(" at [1:{p}]"),
        _ => String::new(),
    };
    let code = db.code();
    if *code == SqlState::UNDEFINED_TABLE {
        ApiError::new(404, "notFound", &format!("Not found: Table {}", db.message()))
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        ApiError::new(403, "accessDenied", &format!("Access Denied: {}", db.message()))
    } else if code.code().starts_with("42") || *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        ApiError::new(400, "invalidQuery", &format!("Syntax error: {}{position}", db.message()))
    } else {
        ApiError::new(400, "invalidQuery", &format!("Query error: {}{position}", db.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_print_as_bigquery_prints_them() {
        assert_eq!(java_double("100"), "100.0");
        assert_eq!(java_double("3.14"), "3.14");
        assert_eq!(java_double("1e+10"), "1.0E10");
        assert_eq!(java_double("12345678901"), "1.2345678901E10");
        assert_eq!(java_double("0.00025"), "2.5E-4");
        assert_eq!(java_double("-0"), "-0.0");
        assert_eq!(java_double("NaN"), "NaN");
        assert_eq!(java_double("-Infinity"), "-Infinity");
    }

    #[test]
    fn arrays_and_rows_render_as_f_and_v() {
        assert_eq!(
            parse_array("{a,\"b c\",NULL,\"NULL\"}"),
            vec![Some("a".into()), Some("b c".into()), None, Some("NULL".into())]
        );
        assert_eq!(parse_array("{}"), Vec::<Option<String>>::new());
        let columns =
            [Column { render: Render::Integer, repeated: false }, Column { render: Render::Text, repeated: true }];
        let cells = [Some("42"), Some("{x,y}")];
        let (json, _) = render_row(&columns, |i| cells[i]);
        assert_eq!(json, r#"{"f":[{"v":"42"},{"v":[{"v":"x"},{"v":"y"}]}]}"#);
        let (json, _) = render_row(&columns, |_| None);
        assert_eq!(json, r#"{"f":[{"v":null},{"v":null}]}"#);
    }
}
