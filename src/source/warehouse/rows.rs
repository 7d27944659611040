//! One warehouse page's rows — a JSON array of arrays of strings or nulls — kept compact.
//!
//! Parsed the ordinary way (`Vec<Vec<Option<String>>>`), a page of one-character ids takes
//! about ten times its JSON: a vector per row and an allocation per cell. [`CompactRows`]
//! keeps every cell's text in one buffer and one `u32` per cell, so a page takes at most
//! about its own size again, whatever its shape; the rows are then mapped a batch at a time
//! ([`super::RowMapper::batches`]).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

/// The high bit of a cell's end marks SQL NULL.
const NULL: u32 = 1 << 31;

/// The rows of one page: each cell's text, or SQL NULL.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CompactRows {
    /// Every cell's text, one after the other.
    text: String,
    /// Where each cell's text ends in `text` (row-major), [`NULL`] set for a null cell.
    ends: Vec<u32>,
    /// Cells in each row: the first row's count.
    width: usize,
    rows: usize,
    /// The first row whose number of cells differs from the first row's: (row, cells).
    ragged: Option<(usize, usize)>,
}

impl fmt::Debug for CompactRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompactRows").field("rows", &self.rows).field("width", &self.width).finish_non_exhaustive()
    }
}

impl CompactRows {
    /// Rows read.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Cells a row has (every row: see [`CompactRows::ragged`]).
    pub fn width(&self) -> usize {
        self.width
    }

    /// The first row whose number of cells differs from the first row's, and that number.
    pub fn ragged(&self) -> Option<(usize, usize)> {
        self.ragged
    }

    /// Cell `column` of row `row`; `None` is SQL NULL. Only while [`CompactRows::ragged`] is
    /// `None`; panics out of range.
    pub fn cell(&self, row: usize, column: usize) -> Option<&str> {
        let at = row * self.width + column;
        let start = if at == 0 { 0 } else { (self.ends[at - 1] & !NULL) as usize };
        let end = self.ends[at];
        (end & NULL == 0).then(|| &self.text[start..end as usize])
    }

    fn push(&mut self, cell: Option<&str>) -> Result<(), &'static str> {
        if let Some(text) = cell {
            self.text.push_str(text);
        }
        let end = u32::try_from(self.text.len()).ok().filter(|e| e & NULL == 0).ok_or("a page over 2 GiB of text")?;
        self.ends.push(if cell.is_some() { end } else { end | NULL });
        Ok(())
    }

    /// Closes a row of `cells` cells.
    fn end_row(&mut self, cells: usize) {
        if self.rows == 0 {
            self.width = cells;
        } else if cells != self.width && self.ragged.is_none() {
            self.ragged = Some((self.rows, cells));
        }
        self.rows += 1;
    }
}

impl<'de> de::Deserialize<'de> for CompactRows {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_seq(RowsVisitor)
    }
}

struct RowsVisitor;

impl<'de> Visitor<'de> for RowsVisitor {
    type Value = CompactRows;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CompactRows, A::Error> {
        let mut rows = CompactRows::default();
        while seq.next_element_seed(Row(&mut rows))?.is_some() {}
        Ok(rows)
    }
}

/// One row: an array of cells.
struct Row<'r>(&'r mut CompactRows);

impl<'de> DeserializeSeed<'de> for Row<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Row<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row (an array of strings or nulls)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let rows = self.0;
        if rows.ragged.is_some() {
            // The page is malformed (the caller says where): the rest is only counted.
            while seq.next_element::<de::IgnoredAny>()?.is_some() {}
            rows.rows += 1;
            return Ok(());
        }
        let mut cells = 0;
        while seq.next_element_seed(Cell(&mut *rows))?.is_some() {
            cells += 1;
        }
        rows.end_row(cells);
        Ok(())
    }
}

/// One cell: a string or null.
struct Cell<'r>(&'r mut CompactRows);

impl<'de> DeserializeSeed<'de> for Cell<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Cell<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push(Some(v)).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.push(None).map_err(E::custom)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_read_back_as_written_and_nulls_stay_null() {
        let rows: CompactRows = serde_json::from_str(r#"[["a",null,""],["b\"c","é",null]]"#).unwrap();
        assert_eq!((rows.len(), rows.width(), rows.ragged()), (2, 3, None));
        assert_eq!([rows.cell(0, 0), rows.cell(0, 1), rows.cell(0, 2)], [Some("a"), None, Some("")]);
        assert_eq!([rows.cell(1, 0), rows.cell(1, 1), rows.cell(1, 2)], [Some("b\"c"), Some("é"), None]);
        let empty: CompactRows = serde_json::from_str("[]").unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn a_ragged_row_is_reported_and_numbers_are_refused() {
        let rows: CompactRows = serde_json::from_str(r#"[["a","b"],["c"],["d","e","f"]]"#).unwrap();
        assert_eq!((rows.ragged(), rows.len()), (Some((1, 1)), 3));
        assert!(serde_json::from_str::<CompactRows>(r#"[["a", 1]]"#).is_err());
        assert!(serde_json::from_str::<CompactRows>(r#"{"a":1}"#).is_err());
    }

    #[test]
    fn a_page_of_short_cells_takes_about_its_own_size() {
        let json = format!("[{}]", (0..100_000).map(|i| format!("[\"{}\"]", i % 10)).collect::<Vec<_>>().join(","));
        let rows: CompactRows = serde_json::from_str(&json).unwrap();
        let held = rows.text.capacity() + rows.ends.capacity() * 4;
        assert!(held <= json.len() * 2, "{held} bytes held for {} bytes of JSON", json.len());
        assert_eq!(rows.cell(99_999, 0), Some("9"));
    }
}
