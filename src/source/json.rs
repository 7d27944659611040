//! A JSON document's rows, streamed element by element in bounded memory.
//!
//! The document is walked with serde's visitors over a reader: only the path down to the
//! array of rows (`jsonPointer`) and to the pagination values is descended into; every
//! other part is skipped without being kept (serde's `IgnoredAny`). Each array element is
//! mapped to a member as soon as it is parsed, keeping only the mapped fields' values, and
//! the members leave in batches through `emit`. So memory is one row and one batch,
//! whatever the size of the document.
//!
//! A [`Meter`] under the parser counts the bytes of the element (or key, or captured value)
//! being read: past `max_row_bytes` the read fails, and the caller reports which limit and
//! which spec field raises it. The same reader follows the nesting of every byte, on the
//! rows' path or off it, and fails past [`MAX_DEPTH`] levels: skipping a value keeps one byte
//! per open level (serde's `IgnoredAny` on serde_json), so `[[[[…` must not be skipped
//! unbounded. What is skipped is kept nowhere else; its bytes count in the caller's whole-body
//! limit (`maxBytes`).

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::rc::Rc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::formats::FormatError;
use super::{BATCH_ROWS, BatchBuilder, MemberBatch};
use crate::domain::identifiers::{IdentifierFields, SkipReason, Value};

/// A value read at a pagination pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    /// A string, or a number as JSON writes it.
    Text(String),
    Null,
    /// Anything else: its kind, for the message.
    Other(&'static str),
}

/// Most arrays and objects open at once, anywhere in a document.
pub(crate) const MAX_DEPTH: u32 = 64;

/// The consumer of batches is gone: stop reading.
#[derive(Debug)]
pub(crate) struct Cancelled;

/// What to read from one document.
pub(crate) struct JsonPlan<'a> {
    /// RFC 6901 pointer to the array of rows; `""` for the whole document.
    pub rows: &'a str,
    /// Pointers whose values are wanted (pagination); each answer is `None` when absent.
    pub captures: &'a [&'a str],
    pub fields: &'a IdentifierFields,
    /// Longest row (array element), object key or captured value, in bytes.
    pub max_row_bytes: u64,
}

/// Reads the rows of the document in `input`, calling `emit` with each batch. Returns the
/// value at each of `plan.captures`.
pub(crate) fn read_rows(
    input: impl Read,
    plan: &JsonPlan<'_>,
    emit: impl FnMut(MemberBatch) -> Result<(), Cancelled>,
) -> Result<Vec<Option<Scalar>>, FormatError> {
    let meter = Meter::default();
    let reader = Metered {
        inner: BufReader::with_capacity(64 * 1024, input),
        meter: meter.clone(),
        limit: plan.max_row_bytes,
        nesting: Nesting::default(),
    };
    let mut state = Walk {
        rows: tokens(plan.rows),
        captures: plan.captures.iter().map(|p| (tokens(p), None)).collect(),
        path: Vec::new(),
        fields: plan.fields,
        names: plan.fields.field_names().into_iter().map(str::to_owned).collect(),
        meter,
        limit: plan.max_row_bytes,
        pointer: plan.rows.to_owned(),
        batch: BatchBuilder::default(),
        emit,
        rows_found: false,
        failure: None,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let walked = Node(&mut state).deserialize(&mut de).and_then(|()| de.end());
    if let Some(failure) = state.failure.take() {
        return Err(failure);
    }
    walked.map_err(|e| syntax_error(e, &state))?;
    if !state.rows_found {
        return Err(malformed(shown(plan.rows), "nothing there; fix jsonPointer".to_owned()));
    }
    if !state.batch.is_empty() {
        let batch = state.batch.take();
        (state.emit)(batch).map_err(|Cancelled| FormatError::Io(io::Error::other("the reader stopped")))?;
    }
    Ok(state.captures.into_iter().map(|(_, v)| v).collect())
}

fn malformed(location: String, message: String) -> FormatError {
    FormatError::Malformed { format: "JSON", location, message }
}

fn shown(pointer: &str) -> String {
    if pointer.is_empty() { "the top level".to_owned() } else { pointer.to_owned() }
}

/// A parser error: an I/O error keeps its cause (size limits, transport), the rest say where.
fn syntax_error<F>(e: serde_json::Error, walk: &Walk<'_, F>) -> FormatError {
    let location = format!("line {} column {}", e.line(), e.column());
    if e.is_io() {
        let io: io::Error = e.into();
        if io.get_ref().is_some_and(|inner| inner.is::<RowTooLong>()) {
            let at = format!("{} ({})", walk.location(), location);
            return FormatError::RowTooLarge { format: "JSON", location: at, limit: walk.limit };
        }
        if io.get_ref().is_some_and(|inner| inner.is::<TooDeep>()) {
            return malformed(
                format!("{} ({})", walk.location(), location),
                format!("arrays and objects nest deeper than {MAX_DEPTH} levels; the operator reads no deeper"),
            );
        }
        return FormatError::Io(io);
    }
    malformed(location, e.to_string())
}

/// RFC 6901 tokens of a pointer (`~1` is `/`, `~0` is `~`).
fn tokens(pointer: &str) -> Vec<String> {
    pointer.split('/').skip(1).map(|t| t.replace("~1", "/").replace("~0", "~")).collect()
}

/// Bytes read since the last checkpoint, and whether a limit applies to them.
#[derive(Clone, Default)]
struct Meter(Rc<Cell<(u64, bool)>>);

impl Meter {
    /// Starts counting a new row, key or value against the limit.
    fn arm(&self) {
        self.0.set((0, true));
    }

    /// Stops counting: what follows is skipped without being kept.
    fn disarm(&self) {
        self.0.set((0, false));
    }
}

/// Marks a read that went past the row limit.
#[derive(Debug)]
struct RowTooLong;

impl fmt::Display for RowTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON row is longer than the row limit")
    }
}

impl std::error::Error for RowTooLong {}

/// Marks a document nested deeper than [`MAX_DEPTH`].
#[derive(Debug)]
struct TooDeep;

impl fmt::Display for TooDeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JSON nested deeper than {MAX_DEPTH} levels")
    }
}

impl std::error::Error for TooDeep {}

/// How many arrays and objects are open, from the bytes read so far (brackets inside
/// strings do not count).
#[derive(Default)]
struct Nesting {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl Nesting {
    /// Follows `byte`; `false` when it opens one level too many.
    fn follow(&mut self, byte: u8) -> bool {
        match (self.in_string, self.escaped, byte) {
            (true, true, _) => self.escaped = false,
            (true, false, b'\\') => self.escaped = true,
            (true, false, b'"') | (false, _, b'"') => self.in_string = !self.in_string,
            (false, _, b'[' | b'{') => self.depth += 1,
            (false, _, b']' | b'}') => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
        self.depth <= MAX_DEPTH
    }
}

/// Counts the bytes the parser takes (it reads them one at a time from the buffer below)
/// and fails the read past the limit, before the parser could keep them; fails too when
/// they nest deeper than [`MAX_DEPTH`].
struct Metered<R> {
    inner: BufReader<R>,
    meter: Meter,
    limit: u64,
    nesting: Nesting,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (count, armed) = self.meter.0.get();
        if armed && count >= self.limit {
            return Err(io::Error::other(RowTooLong));
        }
        // Never more than the limit allows, so one read cannot overshoot it.
        let room = if armed { (self.limit - count).min(buf.len() as u64) as usize } else { buf.len() };
        let n = self.inner.read(&mut buf[..room])?;
        if !buf[..n].iter().all(|&b| self.nesting.follow(b)) {
            return Err(io::Error::other(TooDeep));
        }
        self.meter.0.set((count + n as u64, armed));
        Ok(n)
    }
}

/// The walk's state, shared by every visitor on the way down.
struct Walk<'f, F> {
    rows: Vec<String>,
    captures: Vec<(Vec<String>, Option<Scalar>)>,
    /// Tokens from the root to the value being visited.
    path: Vec<String>,
    fields: &'f IdentifierFields,
    names: Vec<String>,
    meter: Meter,
    limit: u64,
    pointer: String,
    batch: BatchBuilder,
    emit: F,
    rows_found: bool,
    /// Why the walk stopped, when it was not the parser's own error.
    failure: Option<FormatError>,
}

impl<F> Walk<'_, F> {
    /// The pointer of the value being read.
    fn location(&self) -> String {
        if self.path.is_empty() { "the top level".to_owned() } else { format!("/{}", self.path.join("/")) }
    }
}

impl<F: FnMut(MemberBatch) -> Result<(), Cancelled>> Walk<'_, F> {
    /// The value at the current path matters: it is, or leads to, a target.
    fn wanted(&self, path: &[String]) -> bool {
        self.rows.starts_with(path) || self.captures.iter().any(|(c, _)| c.starts_with(path))
    }

    fn over_limit(&self) -> bool {
        let (count, armed) = self.meter.0.get();
        armed && count > self.limit
    }

    fn fail<E: de::Error>(&mut self, failure: FormatError) -> E {
        self.failure = Some(failure);
        E::custom("stopped")
    }

    /// Fails the walk when the row, key or value just read went past the limit.
    fn check_limit<E: de::Error>(&mut self) -> Result<(), E> {
        if self.over_limit() {
            let at = self.location();
            return Err(self.fail(FormatError::RowTooLarge { format: "JSON", location: at, limit: self.limit }));
        }
        Ok(())
    }

    fn capture(&mut self, value: Scalar) {
        let path = &self.path;
        if let Some((_, slot)) = self.captures.iter_mut().find(|(c, _)| c == path) {
            *slot = Some(value);
        }
    }

    fn is_capture(&self) -> bool {
        self.captures.iter().any(|(c, _)| *c == self.path)
    }

    fn push_row<E: de::Error>(&mut self, row: Result<crate::domain::member::Member, SkipReason>) -> Result<(), E> {
        self.batch.push(row);
        if self.batch.rows() as usize >= BATCH_ROWS {
            let batch = self.batch.take();
            if (self.emit)(batch).is_err() {
                return Err(self.fail(FormatError::Io(io::Error::other("the reader stopped"))));
            }
        }
        Ok(())
    }
}

/// A value somewhere on the way to the targets.
struct Node<'w, 'f, F>(&'w mut Walk<'f, F>);

impl<'de, F: FnMut(MemberBatch) -> Result<(), Cancelled>> DeserializeSeed<'de> for Node<'_, '_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de, F: FnMut(MemberBatch) -> Result<(), Cancelled>> Visitor<'de> for Node<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let walk = self.0;
        if walk.path == walk.rows {
            walk.rows_found = true;
            return read_array(walk, seq);
        }
        if walk.is_capture() {
            walk.capture(Scalar::Other("an array"));
        }
        let mut index = 0u64;
        loop {
            walk.path.push(index.to_string());
            let more = if walk.wanted(&walk.path) {
                walk.meter.arm();
                seq.next_element_seed(Node(&mut *walk))?.is_some()
            } else {
                walk.meter.disarm();
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            walk.path.pop();
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let walk = self.0;
        if walk.path == walk.rows {
            return Err(walk.fail(malformed(shown(&walk.pointer), "expected an array of rows, found an object".into())));
        }
        if walk.is_capture() {
            walk.capture(Scalar::Other("an object"));
        }
        loop {
            walk.meter.arm();
            let Some(key) = map.next_key::<String>()? else { return Ok(()) };
            walk.check_limit()?;
            walk.path.push(key);
            if walk.wanted(&walk.path) {
                walk.meter.arm();
                map.next_value_seed(Node(&mut *walk))?;
            } else {
                walk.meter.disarm();
                map.next_value::<IgnoredAny>()?;
            }
            walk.path.pop();
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(Scalar::Text(v.to_owned()), "a string")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(Scalar::Text(v.to_string()), "a number")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(Scalar::Text(v.to_string()), "a number")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(Scalar::Text(float_text(v)), "a number")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar(Scalar::Other("a boolean"), "a boolean")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(Scalar::Null, "null")
    }
}

impl<F: FnMut(MemberBatch) -> Result<(), Cancelled>> Node<'_, '_, F> {
    fn scalar<E: de::Error>(self, value: Scalar, kind: &str) -> Result<(), E> {
        let walk = self.0;
        walk.check_limit()?;
        if walk.path == walk.rows {
            return Err(walk.fail(malformed(shown(&walk.pointer), format!("expected an array of rows, found {kind}"))));
        }
        walk.capture(value);
        Ok(())
    }
}

/// A number as `serde_json::Value` prints it.
fn float_text(v: f64) -> String {
    serde_json::Number::from_f64(v).map_or_else(|| v.to_string(), |n| n.to_string())
}

/// The array of rows: each element becomes a member (or a skip) as soon as it is read.
fn read_array<'de, A, F>(walk: &mut Walk<'_, F>, mut seq: A) -> Result<(), A::Error>
where
    A: SeqAccess<'de>,
    F: FnMut(MemberBatch) -> Result<(), Cancelled>,
{
    let mut index = 0u64;
    loop {
        walk.meter.arm();
        walk.path.push(index.to_string());
        let Some(values) = seq.next_element_seed(Row(&mut *walk))? else {
            walk.path.pop();
            return Ok(());
        };
        walk.check_limit()?;
        walk.path.pop();
        let fields = walk.fields;
        let row =
            fields.resolve(|name| values.iter().rev().find(|(n, _)| n == name).map_or(Value::Null, |(_, v)| v.clone()));
        walk.push_row(row)?;
        index += 1;
    }
}

/// One row: the values of the mapped fields, in the order met.
struct Row<'w, 'f, F>(&'w mut Walk<'f, F>);

impl<'de, F: FnMut(MemberBatch) -> Result<(), Cancelled>> DeserializeSeed<'de> for Row<'_, '_, F> {
    type Value = Vec<(String, Value<'static>)>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<F: FnMut(MemberBatch) -> Result<(), Cancelled>> Row<'_, '_, F> {
    fn not_an_object<E: de::Error>(self, kind: &str) -> E {
        let walk = self.0;
        let location = walk.location();
        walk.fail(malformed(location, format!("expected a row object, found {kind}")))
    }
}

impl<'de, F: FnMut(MemberBatch) -> Result<(), Cancelled>> Visitor<'de> for Row<'_, '_, F> {
    type Value = Vec<(String, Value<'static>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let walk = self.0;
        let mut values = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            walk.check_limit()?;
            if walk.names.contains(&key) {
                let value = map.next_value::<Field>()?;
                values.push((key, value.0));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
            walk.check_limit()?;
        }
        Ok(values)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.not_an_object("an array"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(self.not_an_object("a string"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(self.not_an_object("a number"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(self.not_an_object("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(self.not_an_object("a number"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(self.not_an_object("a boolean"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(self.not_an_object("null"))
    }
}

/// A mapped field's value: strings and numbers are text, null is missing, anything else
/// cannot be an identifier (and is skipped over without being kept).
struct Field(Value<'static>);

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(CellVisitor)
    }
}

struct CellVisitor;

impl<'de> Visitor<'de> for CellVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an identifier")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
        Ok(Field(Value::Text(v.to_owned().into())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Field, E> {
        Ok(Field(Value::Text(v.into())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Field, E> {
        Ok(Field(Value::Text(v.to_string().into())))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Field, E> {
        Ok(Field(Value::Text(v.to_string().into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Field, E> {
        Ok(Field(Value::Text(float_text(v).into())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Field, E> {
        Ok(Field(Value::Null))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field, E> {
        Ok(Field(Value::Rejected(SkipReason::UnsupportedValue)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field(Value::Rejected(SkipReason::UnsupportedValue)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field(Value::Rejected(SkipReason::UnsupportedValue)))
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

    /// Reads `doc`; returns the batches and the captured values.
    fn read(
        doc: &[u8],
        rows: &str,
        captures: &[&str],
        limit: u64,
    ) -> Result<(Vec<MemberBatch>, Vec<Option<Scalar>>), FormatError> {
        let fields = ext("uid");
        let plan = JsonPlan { rows, captures, fields: &fields, max_row_bytes: limit };
        let mut batches = Vec::new();
        let captured = read_rows(doc, &plan, |b| {
            batches.push(b);
            Ok(())
        })?;
        Ok((batches, captured))
    }

    #[test]
    fn rows_at_a_pointer_and_pagination_values() {
        let doc = br#"{"meta":{"skip":[1,{"a":"b"}],"next":"/p2"},"data":{"users":[{"uid":"a","x":[1]},{"uid":1.5},
            {"other":1},{"uid":{"deep":1}},{"uid":true},{"uid":12345678901234567890}]},"cursor":7}"#;
        let (batches, captured) =
            read(doc, "/data/users", &["/meta/next", "/cursor", "/nope", "/meta/skip"], 1024).unwrap();
        assert_eq!(batches.len(), 1);
        let members = &batches[0].members;
        assert_eq!(
            members,
            &vec![
                Member::ExternalId("a".into()),
                Member::ExternalId("1.5".into()),
                Member::ExternalId("12345678901234567890".into())
            ]
        );
        assert_eq!(batches[0].skipped.get(SkipReason::Missing), 1);
        assert_eq!(batches[0].skipped.get(SkipReason::UnsupportedValue), 2);
        assert_eq!(
            captured,
            vec![
                Some(Scalar::Text("/p2".into())),
                Some(Scalar::Text("7".into())),
                None,
                Some(Scalar::Other("an array"))
            ]
        );
    }

    #[test]
    fn wrong_shapes_name_where_they_are() {
        let err = |doc: &[u8], rows: &str| match read(doc, rows, &[], 1024) {
            Err(FormatError::Malformed { location, message, .. }) => (location, message),
            other => panic!("expected malformed, got {other:?}"),
        };
        assert_eq!(err(br#"[{"uid":"a"}, 3]"#, "").0, "/1");
        assert_eq!(err(br#"{"data":{"users":1}}"#, "/data").1, "expected an array of rows, found an object");
        assert_eq!(err(br#"{"data":{"users":1}}"#, "/data/users").1, "expected an array of rows, found a number");
        assert_eq!(err(br#"{"data":{}}"#, "/nope"), ("/nope".into(), "nothing there; fix jsonPointer".into()));
        assert_eq!(err(br#"{"a":1}"#, "").0, "the top level");
        let (location, _) = err(b"[{\"uid\": \"a\"},\n {\"uid\"", "");
        assert!(location.starts_with("line 2 "), "{location}");
        assert!(err(br#"[] []"#, "").1.contains("trailing"));
        // Array indices in the pointer, and escaped tokens.
        let (batches, _) = read(br#"{"a/b":[{"x":1},[{"uid":"z"}]]}"#, "/a~1b/1", &[], 1024).unwrap();
        assert_eq!(batches[0].members, vec![Member::ExternalId("z".into())]);
    }

    #[test]
    fn a_row_over_the_limit_fails_before_it_is_kept() {
        let long = "x".repeat(100_000);
        let doc = format!(r#"{{"users":[{{"uid":"a"}},{{"uid":"{long}"}}]}}"#);
        match read(doc.as_bytes(), "/users", &[], 1024) {
            Err(FormatError::RowTooLarge { format: "JSON", location, limit: 1024 }) => {
                assert!(location.starts_with("/users/1 (line 1 column"), "{location}")
            }
            other => panic!("expected a row too large, got {other:?}"),
        }
        // So does an endless key of the wrapper, and a captured value.
        let doc = format!(r#"{{"{long}":1,"users":[]}}"#);
        assert!(matches!(read(doc.as_bytes(), "/users", &[], 1024), Err(FormatError::RowTooLarge { .. })));
        let doc = format!(r#"{{"next":"{long}","users":[]}}"#);
        assert!(matches!(read(doc.as_bytes(), "/users", &["/next"], 1024), Err(FormatError::RowTooLarge { .. })));
        // Values off the path are skipped without being kept, whatever their size.
        let doc = format!(r#"{{"blob":"{long}","more":[{{"k":"{long}"}}],"users":[{{"uid":"a"}}]}}"#);
        let (batches, _) = read(doc.as_bytes(), "/users", &[], 1024).unwrap();
        assert_eq!(batches[0].members, vec![Member::ExternalId("a".into())]);
    }

    #[test]
    fn deep_nesting_is_refused_on_and_off_the_rows_path() {
        let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        // Off the path: skipped, but no deeper than MAX_DEPTH.
        let ok = format!(r#"{{"skip":{},"s":"[[[[{{{{","users":[{{"uid":"a"}}]}}"#, deep(MAX_DEPTH as usize - 1));
        let (batches, _) = read(ok.as_bytes(), "/users", &[], 1024).unwrap();
        assert_eq!(batches[0].members, vec![Member::ExternalId("a".into())]);
        for doc in [
            format!(r#"{{"skip":{},"users":[]}}"#, deep(10_000_000)),
            format!(r#"{{"users":[{{"uid":"a","x":{}}}]}}"#, deep(100)),
            format!(r#"{{"a":{{"b":{}}},"users":[]}}"#, deep(70)),
        ] {
            match read(doc.as_bytes(), "/users", &[], 1 << 20) {
                Err(FormatError::Malformed { message, .. }) => {
                    assert!(message.contains("nest deeper than 64 levels"), "{message}")
                }
                other => panic!("expected too deep, got {other:?}"),
            }
        }
    }

    #[test]
    fn batches_leave_as_the_rows_are_read_and_a_stopped_reader_ends_the_walk() {
        let rows: Vec<String> = (0..25_000).map(|i| format!(r#"{{"uid":"u{i}"}}"#)).collect();
        let doc = format!("[{}]", rows.join(","));
        let (batches, _) = read(doc.as_bytes(), "", &[], 1024).unwrap();
        assert_eq!(batches.iter().map(|b| b.members.len()).collect::<Vec<_>>(), vec![10_000, 10_000, 5_000]);
        let fields = ext("uid");
        let plan = JsonPlan { rows: "", captures: &[], fields: &fields, max_row_bytes: 1024 };
        let mut calls = 0;
        let stopped = read_rows(doc.as_bytes(), &plan, |_| {
            calls += 1;
            Err(Cancelled)
        });
        assert!(matches!(stopped, Err(FormatError::Io(_))));
        assert_eq!(calls, 1);
    }
}
