//! Row formats shared by the HTTP and ConfigMap sources: CSV with a header and NDJSON,
//! both read incrementally from an async reader, and a JSON document's array of rows.

use std::borrow::Cow;
use std::io;

use csv_async::{AsyncReaderBuilder, ByteRecord};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead};

use super::{BatchBuilder, MemberBatch};
use crate::domain::identifiers::{ColumnPlan, IdentifierFields, SkipReason, Value};

/// Why a body could not be read as rows. The caller adds which source and page.
#[derive(Debug)]
pub(crate) enum FormatError {
    /// The reader failed (transport, size limit, decompression).
    Io(io::Error),
    Malformed { format: &'static str, location: String, message: String },
    /// The mapping names a column the CSV header lacks.
    MissingColumn { column: String, header: Vec<String> },
}

impl FormatError {
    /// Text for a configuration error about a missing column.
    pub(crate) fn missing_column_message(column: &str, header: &[String]) -> String {
        format!(
            "the CSV header has no column {column:?} named in identifiers (columns: {}); fix the mapping or the export",
            header.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", ")
        )
    }
}

fn csv_error(e: csv_async::Error) -> FormatError {
    let line = e.position().map(|p| p.line());
    match e.into_kind() {
        csv_async::ErrorKind::Io(io) => FormatError::Io(io),
        csv_async::ErrorKind::UnequalLengths { pos, expected_len, len } => FormatError::Malformed {
            format: "CSV",
            location: format!("line {}", pos.map(|p| p.line()).unwrap_or_default()),
            message: format!("{len} fields where the header has {expected_len}"),
        },
        other => FormatError::Malformed {
            format: "CSV",
            location: line.map_or_else(|| "an unknown line".to_owned(), |l| format!("line {l}")),
            message: format!("{other:?}"),
        },
    }
}

/// CSV rows with a header naming the fields, read as they arrive.
pub(crate) struct CsvRows<R: AsyncRead + Unpin + Send> {
    reader: csv_async::AsyncReader<R>,
    plan: ColumnPlan,
    record: ByteRecord,
}

impl<R: AsyncRead + Unpin + Send> CsvRows<R> {
    /// Reads the header and finds the mapped columns. An empty body has no header and is an
    /// error, never an empty cohort.
    pub(crate) async fn new(input: R, fields: &IdentifierFields) -> Result<Self, FormatError> {
        // Not flexible: a row with a different number of fields is a broken export.
        let mut reader = AsyncReaderBuilder::new().has_headers(true).flexible(false).create_reader(input);
        let header: Vec<String> = reader
            .byte_headers()
            .await
            .map_err(csv_error)?
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let h = String::from_utf8_lossy(h);
                // Spreadsheet exports often start with a byte order mark.
                if i == 0 { h.trim_start_matches('\u{feff}').to_owned() } else { h.into_owned() }
            })
            .collect();
        if header.is_empty() || header.iter().all(|h| h.is_empty()) {
            return Err(FormatError::Malformed {
                format: "CSV",
                location: "line 1".to_owned(),
                message: "no header row (the body is empty)".to_owned(),
            });
        }
        let plan =
            fields.column_plan(&header).map_err(|column| FormatError::MissingColumn { column, header: header.clone() })?;
        Ok(CsvRows { reader, plan, record: ByteRecord::new() })
    }

    /// The next batch, or `None` at the end.
    pub(crate) async fn next_batch(
        &mut self,
        fields: &IdentifierFields,
        rows: usize,
    ) -> Result<Option<MemberBatch>, FormatError> {
        let mut batch = BatchBuilder::default();
        for _ in 0..rows {
            if !self.reader.read_byte_record(&mut self.record).await.map_err(csv_error)? {
                break;
            }
            let record = &self.record;
            batch.push(fields.resolve_columns(&self.plan, |i| record.get(i).map_or(Value::Null, Value::Bytes)));
        }
        Ok((!batch.is_empty()).then(|| batch.take()))
    }
}

/// A JSON value as an identifier: strings and numbers are text, null is missing.
pub(crate) fn json_value(v: Option<&serde_json::Value>) -> Value<'_> {
    match v {
        None | Some(serde_json::Value::Null) => Value::Null,
        Some(serde_json::Value::String(s)) => Value::Text(Cow::Borrowed(s)),
        Some(serde_json::Value::Number(n)) => Value::Text(Cow::Owned(n.to_string())),
        Some(_) => Value::Rejected(SkipReason::UnsupportedValue),
    }
}

/// One JSON object per line, read as the lines arrive. Blank lines are not rows.
pub(crate) struct NdjsonRows<R: AsyncBufRead + Unpin + Send> {
    reader: R,
    line: u64,
    buf: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin + Send> NdjsonRows<R> {
    pub(crate) fn new(reader: R) -> Self {
        NdjsonRows { reader, line: 0, buf: Vec::new() }
    }

    pub(crate) async fn next_batch(
        &mut self,
        fields: &IdentifierFields,
        rows: usize,
    ) -> Result<Option<MemberBatch>, FormatError> {
        let mut batch = BatchBuilder::default();
        let mut taken = 0;
        while taken < rows {
            self.buf.clear();
            if self.reader.read_until(b'\n', &mut self.buf).await.map_err(FormatError::Io)? == 0 {
                break;
            }
            self.line += 1;
            let line = self.buf.trim_ascii();
            if line.is_empty() {
                continue;
            }
            taken += 1;
            // One undecodable row is skipped and counted; it does not fail the export.
            if std::str::from_utf8(line).is_err() {
                batch.skip(SkipReason::InvalidUtf8);
                continue;
            }
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(line).map_err(|e| FormatError::Malformed {
                    format: "NDJSON",
                    location: format!("line {} column {}", self.line, e.column()),
                    message: if e.is_data() { "not a JSON object".to_owned() } else { e.to_string() },
                })?;
            batch.push(fields.resolve(|name| json_value(object.get(name))));
        }
        Ok((!batch.is_empty()).then(|| batch.take()))
    }
}

/// Parses a whole JSON body.
pub(crate) fn parse_json_document(body: &[u8]) -> Result<serde_json::Value, FormatError> {
    serde_json::from_slice(body).map_err(|e| FormatError::Malformed {
        format: "JSON",
        location: format!("line {} column {}", e.line(), e.column()),
        message: e.to_string(),
    })
}

/// The array of row objects at `pointer` (the whole document when `None`).
pub(crate) fn json_rows<'d>(
    doc: &'d serde_json::Value,
    pointer: Option<&str>,
) -> Result<&'d [serde_json::Value], FormatError> {
    let at = pointer.unwrap_or("");
    let shown = if at.is_empty() { "the top level" } else { at };
    match doc.pointer(at) {
        Some(serde_json::Value::Array(rows)) => Ok(rows),
        Some(other) => Err(FormatError::Malformed {
            format: "JSON",
            location: shown.to_owned(),
            message: format!("expected an array of rows, found {}", json_kind(other)),
        }),
        None => Err(FormatError::Malformed {
            format: "JSON",
            location: shown.to_owned(),
            message: "nothing there; fix jsonPointer".to_owned(),
        }),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Resolves rows of a JSON array in batches; `Err` names the first element that is not an
/// object.
pub(crate) fn json_batches<'d>(
    rows: &'d [serde_json::Value],
    pointer: Option<&'d str>,
    fields: &'d IdentifierFields,
) -> impl Iterator<Item = Result<MemberBatch, FormatError>> + 'd {
    rows.chunks(super::BATCH_ROWS).enumerate().map(move |(chunk, items)| {
        let mut batch = BatchBuilder::default();
        for (i, item) in items.iter().enumerate() {
            let serde_json::Value::Object(object) = item else {
                return Err(FormatError::Malformed {
                    format: "JSON",
                    location: format!("{}/{}", pointer.unwrap_or(""), chunk * super::BATCH_ROWS + i),
                    message: format!("expected a row object, found {}", json_kind(item)),
                });
            };
            batch.push(fields.resolve(|name| json_value(object.get(name))));
        }
        Ok(batch.take())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IdentifierMapping;
    use crate::domain::member::Member;

    fn ext(field: &str) -> IdentifierFields {
        IdentifierFields::from_mapping(&IdentifierMapping {
            external_id: Some(field.to_owned()),
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn csv_reads_mapped_columns_and_counts_bad_cells() {
        let body: &[u8] = b"\xef\xbb\xbfname,uid\r\na,u1\r\nb,\r\nc,\"u\"\"3\"\r\nd,\xff\xfe\r\n";
        let fields = ext("uid");
        let mut rows = CsvRows::new(body, &fields).await.unwrap();
        let batch = rows.next_batch(&fields, 100).await.unwrap().unwrap();
        assert_eq!(batch.members, vec![Member::ExternalId("u1".into()), Member::ExternalId("u\"3".into())]);
        assert_eq!(batch.skipped.get(SkipReason::Missing), 1);
        assert_eq!(batch.skipped.get(SkipReason::InvalidUtf8), 1);
        assert!(rows.next_batch(&fields, 100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn csv_errors_name_the_line_or_the_column() {
        let fields = ext("uid");
        let body: &[u8] = b"uid,x\n1,2\n3\n";
        let mut rows = CsvRows::new(body, &fields).await.unwrap();
        match rows.next_batch(&fields, 100).await {
            Err(FormatError::Malformed { location, message, .. }) => {
                assert_eq!(location, "line 3");
                assert_eq!(message, "1 fields where the header has 2");
            }
            other => panic!("expected a malformed error, got {other:?}"),
        }
        match CsvRows::new(&b"id,x\n1,2\n"[..], &fields).await {
            Err(FormatError::MissingColumn { column, header }) => {
                assert_eq!(column, "uid");
                assert_eq!(header, vec!["id", "x"]);
            }
            _ => panic!("expected a missing column"),
        }
        assert!(matches!(CsvRows::new(&b""[..], &fields).await, Err(FormatError::Malformed { .. })));
    }

    #[tokio::test]
    async fn ndjson_reads_lines_in_batches() {
        let body: &[u8] = b"{\"uid\":\"a\"}\n\n{\"uid\":7}\r\n{\"uid\":null}\n{\"uid\":{}}\n{\"uid\":\"\xff\"}\n{\"uid\":\"z\"}";
        let fields = ext("uid");
        let mut rows = NdjsonRows::new(body);
        let first = rows.next_batch(&fields, 2).await.unwrap().unwrap();
        assert_eq!(first.members, vec![Member::ExternalId("a".into()), Member::ExternalId("7".into())]);
        let second = rows.next_batch(&fields, 10).await.unwrap().unwrap();
        assert_eq!(second.members, vec![Member::ExternalId("z".into())]);
        assert_eq!(second.skipped.get(SkipReason::Missing), 1);
        assert_eq!(second.skipped.get(SkipReason::UnsupportedValue), 1);
        assert_eq!(second.skipped.get(SkipReason::InvalidUtf8), 1);
        assert!(rows.next_batch(&fields, 10).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn ndjson_errors_name_the_line() {
        let fields = ext("uid");
        let mut rows = NdjsonRows::new(&b"{\"uid\":\"a\"}\n{\"uid\": \"b\"\n"[..]);
        match rows.next_batch(&fields, 10).await {
            Err(FormatError::Malformed { location, .. }) => assert!(location.starts_with("line 2 "), "{location}"),
            other => panic!("expected malformed, got {other:?}"),
        }
        let mut rows = NdjsonRows::new(&b"[1]\n"[..]);
        assert!(matches!(rows.next_batch(&fields, 10).await, Err(FormatError::Malformed { .. })));
    }

    #[test]
    fn json_rows_at_a_pointer() {
        let fields = ext("uid");
        let doc = parse_json_document(br#"{"data":{"users":[{"uid":"a"},{"uid":1.5},{"other":1}]}}"#).unwrap();
        let rows = json_rows(&doc, Some("/data/users")).unwrap();
        let batches: Vec<_> = json_batches(rows, Some("/data/users"), &fields).collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].members, vec![Member::ExternalId("a".into()), Member::ExternalId("1.5".into())]);
        assert_eq!(batches[0].skipped.get(SkipReason::Missing), 1);
        assert!(matches!(json_rows(&doc, Some("/data")), Err(FormatError::Malformed { .. })));
        assert!(matches!(json_rows(&doc, Some("/nope")), Err(FormatError::Malformed { .. })));
        let doc = parse_json_document(br#"[{"uid":"a"}, 3]"#).unwrap();
        let err = json_batches(json_rows(&doc, None).unwrap(), None, &fields).find_map(Result::err).unwrap();
        assert!(matches!(err, FormatError::Malformed { location, .. } if location == "/1"));
        match parse_json_document(b"[{\"uid\": \"a\"},\n {\"uid\"") {
            Err(FormatError::Malformed { location, .. }) => assert!(location.starts_with("line 2 "), "{location}"),
            other => panic!("expected malformed, got {other:?}"),
        }
    }
}
