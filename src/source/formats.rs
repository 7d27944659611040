//! Row formats shared by the HTTP and ConfigMap sources: CSV with a header and NDJSON,
//! both read incrementally from an async reader with a cap on the length of one row
//! (a JSON document's rows are in [`super::json`]).

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use csv_async::{AsyncReaderBuilder, ByteRecord};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, ReadBuf};

use super::{BatchBuilder, MemberBatch};
use crate::domain::identifiers::{ColumnPlan, IdentifierFields, SkipReason, Value};

/// Why a body could not be read as rows. The caller adds which source and page.
#[derive(Debug)]
pub(crate) enum FormatError {
    /// The reader failed (transport, size limit, decompression).
    Io(io::Error),
    Malformed {
        format: &'static str,
        location: String,
        message: String,
    },
    /// The mapping names a column the CSV header lacks.
    MissingColumn {
        column: String,
        header: Vec<String>,
    },
    /// One row (a CSV record, an NDJSON line, a JSON array element) is longer than `limit`.
    RowTooLarge {
        format: &'static str,
        location: String,
        limit: u64,
    },
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

fn csv_error(e: csv_async::Error, limit: u64, at_line: u64) -> FormatError {
    let line = e.position().map(|p| p.line());
    match e.into_kind() {
        csv_async::ErrorKind::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<RowTooLong>()) => {
            FormatError::RowTooLarge { format: "CSV", location: format!("line {at_line}"), limit }
        }
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

/// Marks a read that went past the length limit of one row.
#[derive(Debug)]
pub(crate) struct RowTooLong;

impl std::fmt::Display for RowTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a row is longer than the row limit")
    }
}

impl std::error::Error for RowTooLong {}

/// Bytes csv-async buffers ahead of the record it parses.
const CSV_BUFFER: usize = 8 * 1024;

/// Fails a read when the bytes of the current record read so far (counted from the
/// record's start, which [`CsvRows`] marks by zeroing `since`) pass the limit plus one parser
/// buffer: the record cannot be shorter. Line ends outside quotes are not counted — blank
/// lines are skipped by the parser and take no memory — but everything inside quotes is,
/// newlines included, as the parser keeps it.
struct RowGuard<R> {
    inner: R,
    since: Arc<AtomicU64>,
    limit: u64,
    in_quotes: bool,
}

impl<R: AsyncRead + Unpin> AsyncRead for RowGuard<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.since.load(Ordering::Relaxed) > this.limit.saturating_add(CSV_BUFFER as u64) {
            return Poll::Ready(Err(io::Error::other(RowTooLong)));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let mut kept = 0u64;
            for &b in &buf.filled()[before..] {
                match b {
                    // A doubled quote inside quotes toggles twice: still inside.
                    b'"' => this.in_quotes = !this.in_quotes,
                    b'\n' | b'\r' if !this.in_quotes => continue,
                    _ => {}
                }
                kept += 1;
            }
            this.since.fetch_add(kept, Ordering::Relaxed);
        }
        poll
    }
}

/// CSV rows with a header naming the fields, read as they arrive; no record (header
/// included) may be longer than `max_row_bytes`.
pub(crate) struct CsvRows<R: AsyncRead + Unpin + Send> {
    reader: csv_async::AsyncReader<RowGuard<R>>,
    plan: ColumnPlan,
    record: ByteRecord,
    since: Arc<AtomicU64>,
    limit: u64,
}

impl<R: AsyncRead + Unpin + Send> CsvRows<R> {
    /// Reads the header and finds the mapped columns. An empty body has no header and is an
    /// error, never an empty cohort.
    pub(crate) async fn new(input: R, fields: &IdentifierFields, max_row_bytes: u64) -> Result<Self, FormatError> {
        let since = Arc::new(AtomicU64::new(0));
        let guarded = RowGuard { inner: input, since: since.clone(), limit: max_row_bytes, in_quotes: false };
        // Not flexible: a row with a different number of fields is a broken export.
        let mut reader = AsyncReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .buffer_capacity(CSV_BUFFER)
            .create_reader(guarded);
        let header: Vec<String> = reader
            .byte_headers()
            .await
            .map_err(|e| csv_error(e, max_row_bytes, 1))?
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
        let plan = fields
            .column_plan(&header)
            .map_err(|column| FormatError::MissingColumn { column, header: header.clone() })?;
        since.store(0, Ordering::Relaxed);
        Ok(CsvRows { reader, plan, record: ByteRecord::new(), since, limit: max_row_bytes })
    }

    /// The next batch, or `None` at the end.
    pub(crate) async fn next_batch(
        &mut self,
        fields: &IdentifierFields,
        rows: usize,
    ) -> Result<Option<MemberBatch>, FormatError> {
        let mut batch = BatchBuilder::default();
        for _ in 0..rows {
            let line = self.reader.position().line();
            let read = self.reader.read_byte_record(&mut self.record).await;
            if !read.map_err(|e| csv_error(e, self.limit, line))? {
                break;
            }
            self.since.store(0, Ordering::Relaxed);
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

/// Appends the next line (its `\n` included) to `buf`; 0 at the end of input. Fails with
/// [`RowTooLong`] once the line passes `limit` bytes, without keeping more of it.
async fn read_line_capped<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>, limit: u64) -> io::Result<usize> {
    let mut read = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(read);
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if (buf.len() + take) as u64 > limit.saturating_add(1) {
            return Err(io::Error::other(RowTooLong));
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(take);
        read += take;
        if done {
            return Ok(read);
        }
    }
}

/// One JSON object per line, read as the lines arrive. Blank lines are not rows; no line
/// may be longer than `max_row_bytes` (its newline aside).
pub(crate) struct NdjsonRows<R: AsyncBufRead + Unpin + Send> {
    reader: R,
    line: u64,
    buf: Vec<u8>,
    limit: u64,
}

impl<R: AsyncBufRead + Unpin + Send> NdjsonRows<R> {
    pub(crate) fn new(reader: R, max_row_bytes: u64) -> Self {
        NdjsonRows { reader, line: 0, buf: Vec::new(), limit: max_row_bytes }
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
            let read = match read_line_capped(&mut self.reader, &mut self.buf, self.limit).await {
                Ok(read) => read,
                Err(e) if e.get_ref().is_some_and(|inner| inner.is::<RowTooLong>()) => {
                    let location = format!("line {}", self.line + 1);
                    return Err(FormatError::RowTooLarge { format: "NDJSON", location, limit: self.limit });
                }
                Err(e) => return Err(FormatError::Io(e)),
            };
            if read == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IdentifierMapping;
    use crate::domain::member::Member;

    fn ext(field: &str) -> IdentifierFields {
        IdentifierFields::from_mapping(&IdentifierMapping { external_id: Some(field.to_owned()), ..Default::default() })
            .unwrap()
    }

    #[tokio::test]
    async fn csv_reads_mapped_columns_and_counts_bad_cells() {
        let body: &[u8] = b"\xef\xbb\xbfname,uid\r\na,u1\r\nb,\r\nc,\"u\"\"3\"\r\nd,\xff\xfe\r\n";
        let fields = ext("uid");
        let mut rows = CsvRows::new(body, &fields, 1 << 20).await.unwrap();
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
        let mut rows = CsvRows::new(body, &fields, 1 << 20).await.unwrap();
        match rows.next_batch(&fields, 100).await {
            Err(FormatError::Malformed { location, message, .. }) => {
                assert_eq!(location, "line 3");
                assert_eq!(message, "1 fields where the header has 2");
            }
            other => panic!("expected a malformed error, got {other:?}"),
        }
        match CsvRows::new(&b"id,x\n1,2\n"[..], &fields, 1 << 20).await {
            Err(FormatError::MissingColumn { column, header }) => {
                assert_eq!(column, "uid");
                assert_eq!(header, vec!["id", "x"]);
            }
            _ => panic!("expected a missing column"),
        }
        assert!(matches!(CsvRows::new(&b""[..], &fields, 1 << 20).await, Err(FormatError::Malformed { .. })));
    }

    #[tokio::test]
    async fn ndjson_reads_lines_in_batches() {
        let body: &[u8] =
            b"{\"uid\":\"a\"}\n\n{\"uid\":7}\r\n{\"uid\":null}\n{\"uid\":{}}\n{\"uid\":\"\xff\"}\n{\"uid\":\"z\"}";
        let fields = ext("uid");
        let mut rows = NdjsonRows::new(body, 1 << 20);
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
        let mut rows = NdjsonRows::new(&b"{\"uid\":\"a\"}\n{\"uid\": \"b\"\n"[..], 1 << 20);
        match rows.next_batch(&fields, 10).await {
            Err(FormatError::Malformed { location, .. }) => assert!(location.starts_with("line 2 "), "{location}"),
            other => panic!("expected malformed, got {other:?}"),
        }
        let mut rows = NdjsonRows::new(&b"[1]\n"[..], 1 << 20);
        assert!(matches!(rows.next_batch(&fields, 10).await, Err(FormatError::Malformed { .. })));
    }

    #[tokio::test]
    async fn rows_longer_than_the_cap_fail_naming_the_line() {
        let fields = ext("uid");
        let long = "x".repeat(100_000);
        let body = format!("uid\nu1\n{long}\nu3\n");
        let mut rows = CsvRows::new(body.as_bytes(), &fields, 1024).await.unwrap();
        match rows.next_batch(&fields, 100).await {
            Err(FormatError::RowTooLarge { format: "CSV", location, limit: 1024 }) => assert_eq!(location, "line 3"),
            other => panic!("expected a row too large, got {other:?}"),
        }
        // A header without end is a row too.
        let header = format!("uid,{long}\n");
        assert!(matches!(CsvRows::new(header.as_bytes(), &fields, 1024).await, Err(FormatError::RowTooLarge { .. })));
        // Blank lines take no memory and do not count; a quoted field's line ends do.
        let blank = format!("uid\nu1\n{}u2\n", "\n".repeat(100_000));
        let mut rows = CsvRows::new(blank.as_bytes(), &fields, 1024).await.unwrap();
        assert_eq!(rows.next_batch(&fields, 100).await.unwrap().unwrap().rows(), 2);
        let quoted = format!("uid\n\"{}\"\n", "\n".repeat(100_000));
        let mut rows = CsvRows::new(quoted.as_bytes(), &fields, 1024).await.unwrap();
        assert!(matches!(rows.next_batch(&fields, 100).await, Err(FormatError::RowTooLarge { .. })));
        // Just under the cap passes.
        let fine = format!("uid\n{}\n", "y".repeat(1000));
        let mut rows = CsvRows::new(fine.as_bytes(), &fields, 1024).await.unwrap();
        assert_eq!(rows.next_batch(&fields, 100).await.unwrap().unwrap().rows(), 1);

        let body = format!("{{\"uid\":\"a\"}}\n{{\"uid\":\"{long}\"}}\n");
        let mut rows = NdjsonRows::new(body.as_bytes(), 1024);
        match rows.next_batch(&fields, 100).await {
            Err(FormatError::RowTooLarge { format: "NDJSON", location, .. }) => assert_eq!(location, "line 2"),
            other => panic!("expected a row too large, got {other:?}"),
        }
        let exact = format!("{{\"uid\":\"{}\"}}\r\n", "z".repeat(1014));
        assert_eq!(exact.len(), 1026);
        let mut rows = NdjsonRows::new(exact.as_bytes(), 1025);
        assert_eq!(rows.next_batch(&fields, 100).await.unwrap().unwrap().rows(), 1);
    }
}
