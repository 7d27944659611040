//! The one SQL check the sources share: a query is one `SELECT` (or `WITH … SELECT`)
//! statement, lexed by its warehouse's own rules — where strings, quoted identifiers and
//! comments start and end — so that a `;` inside them is not taken for a second statement.
//! Pure; a guard against mistakes, not a security boundary (each source adds its own
//! read-only boundary where the warehouse offers one).

/// Why a query is not one SELECT statement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryProblem {
    #[error("holds no statement; write one SELECT (or WITH … SELECT) statement")]
    Empty,
    #[error("starts with {first:?}; the query must be one read-only SELECT (or WITH … SELECT) statement")]
    NotSelect { first: String },
    #[error(
        "holds more than one statement (text follows the `;` on line {line}); keep a single SELECT statement and remove what follows the `;`"
    )]
    MultipleStatements { line: usize },
    #[error("has a {what} opened on line {line} that is never closed; close it")]
    Unterminated { what: &'static str, line: usize },
}

/// The SQL dialect a query is written in: where strings, quoted identifiers and comments
/// start and end, so that a `;` inside them is not taken for the end of the statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SqlDialect {
    /// PostgreSQL and Redshift: `'…'` (`''` escapes; `E'…'` takes backslashes), `"…"`
    /// identifiers, `$tag$…$tag$` strings, nested `/* */` comments.
    Postgres,
    /// Snowflake: `'…'` with backslash or `''` escapes, `"…"` identifiers, `$$…$$` strings,
    /// `--` and `//` line comments.
    Snowflake,
    /// Databricks SQL (Spark): `'…'` and `"…"` strings with backslash escapes, `` `…` ``
    /// identifiers, nested `/* */` comments.
    Databricks,
    /// BigQuery GoogleSQL: `'…'` and `"…"` strings with backslash escapes (triple-quoted
    /// ones lex as adjacent strings), `` `…` `` identifiers, `--` and `#` line comments.
    BigQuery,
}

impl SqlDialect {
    fn backslash_escapes(self, prefixed_e: bool) -> bool {
        self != SqlDialect::Postgres || prefixed_e
    }

    fn double_quote_is_string(self) -> bool {
        matches!(self, SqlDialect::Databricks | SqlDialect::BigQuery)
    }

    fn backtick_identifiers(self) -> bool {
        matches!(self, SqlDialect::Databricks | SqlDialect::BigQuery)
    }

    fn nested_comments(self) -> bool {
        matches!(self, SqlDialect::Postgres | SqlDialect::Databricks)
    }

    fn line_comment_at(self, b: &[u8], i: usize) -> bool {
        let next = b.get(i + 1).copied();
        (b[i] == b'-' && next == Some(b'-'))
            || (self == SqlDialect::Snowflake && b[i] == b'/' && next == Some(b'/'))
            || (self == SqlDialect::BigQuery && b[i] == b'#')
    }
}

/// Checks that `query` is one statement starting with `SELECT` or `WITH` (after comments and
/// opening parentheses), lexed by `dialect`'s rules. A guard against mistakes; each source
/// adds its own read-only boundary where the warehouse offers one.
pub fn check_select(query: &str, dialect: SqlDialect) -> Result<(), QueryProblem> {
    let mut lexer = Lexer { b: query.as_bytes(), dialect, i: 0 };
    let mut first_word_seen = false;
    let mut statement_end: Option<usize> = None;
    while lexer.i < lexer.b.len() {
        if lexer.skip_blank()? {
            continue;
        }
        let c = lexer.b[lexer.i];
        // Anything else is statement text.
        if let Some(end) = statement_end {
            if c != b';' {
                return Err(QueryProblem::MultipleStatements { line: lexer.line_of(end) });
            }
            lexer.i += 1;
        } else if !first_word_seen {
            if c == b'(' {
                lexer.i += 1;
            } else {
                lexer.first_word()?;
                first_word_seen = true;
            }
        } else if c == b';' {
            statement_end = Some(lexer.i);
            lexer.i += 1;
        } else {
            lexer.skip_token()?;
        }
    }
    if first_word_seen { Ok(()) } else { Err(QueryProblem::Empty) }
}

/// A position in a query being lexed by one dialect's rules.
struct Lexer<'q> {
    b: &'q [u8],
    dialect: SqlDialect,
    i: usize,
}

fn ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

impl Lexer<'_> {
    fn line_of(&self, at: usize) -> usize {
        self.b[..at].iter().filter(|&&c| c == b'\n').count() + 1
    }

    fn unterminated(&self, what: &'static str) -> QueryProblem {
        QueryProblem::Unterminated { what, line: self.line_of(self.i) }
    }

    /// Skips whitespace or a comment at the position; whether there was one.
    fn skip_blank(&mut self) -> Result<bool, QueryProblem> {
        let (b, i) = (self.b, self.i);
        if b[i].is_ascii_whitespace() {
            self.i += 1;
        } else if self.dialect.line_comment_at(b, i) {
            self.i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = skip_block_comment(b, i, self.dialect.nested_comments());
            self.i = end.ok_or(QueryProblem::Unterminated { what: "comment /*", line: self.line_of(i) })?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// The statement's first word, which must be `SELECT` or `WITH`.
    fn first_word(&mut self) -> Result<(), QueryProblem> {
        let (b, i) = (self.b, self.i);
        let len = b[i..].iter().take_while(|&&c| ident_byte(c)).count().max(1);
        let word = String::from_utf8_lossy(&b[i..(i + len).min(b.len())]).into_owned();
        if !(word.eq_ignore_ascii_case("select") || word.eq_ignore_ascii_case("with")) {
            return Err(QueryProblem::NotSelect { first: word.chars().take(32).collect() });
        }
        self.i += len;
        Ok(())
    }

    /// Skips one piece of statement text: a quoted string or identifier whole, else a byte.
    fn skip_token(&mut self) -> Result<(), QueryProblem> {
        let (b, i, dialect) = (self.b, self.i, self.dialect);
        let skipped = match b[i] {
            b'\'' => {
                // E'…' (not part of a longer word) takes backslash escapes in PostgreSQL.
                let prefixed_e = i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e') && (i < 2 || !ident_byte(b[i - 2]));
                skip_quoted(b, i, b'\'', dialect.backslash_escapes(prefixed_e)).ok_or("string literal '")
            }
            b'"' if dialect.double_quote_is_string() => skip_quoted(b, i, b'"', true).ok_or("string literal \""),
            b'"' => skip_quoted(b, i, b'"', false).ok_or("quoted identifier \""),
            b'`' if dialect.backtick_identifiers() => skip_quoted(b, i, b'`', false).ok_or("quoted identifier `"),
            b'$' if matches!(dialect, SqlDialect::Postgres | SqlDialect::Snowflake)
                && (i == 0 || !(ident_byte(b[i - 1]) || b[i - 1] == b'$')) =>
            {
                self.skip_dollar_quoted().ok_or("dollar-quoted string")
            }
            _ => Ok(i + 1),
        };
        self.i = skipped.map_err(|what| self.unterminated(what))?;
        Ok(())
    }

    /// `$tag$…$tag$` (Snowflake: only `$$…$$`) at the position: the index after it, or after
    /// the `$` alone when it opens none (`$1` is a parameter, not a quote); `None` when it
    /// never closes.
    fn skip_dollar_quoted(&self) -> Option<usize> {
        let (b, i) = (self.b, self.i);
        let tag_len = if self.dialect == SqlDialect::Postgres {
            b[i + 1..].iter().take_while(|&&c| ident_byte(c)).count()
        } else {
            0
        };
        let closes = b.get(i + 1 + tag_len) == Some(&b'$');
        let tag_ok = tag_len == 0 || !b[i + 1].is_ascii_digit();
        if !(closes && tag_ok) {
            return Some(i + 1);
        }
        let delimiter = &b[i..i + tag_len + 2];
        let body = i + delimiter.len();
        let n = b[body..].windows(delimiter.len()).position(|w| w == delimiter)?;
        Some(body + n + delimiter.len())
    }
}

/// The index after the `/* */` comment starting at `start`, or `None` if it never closes.
fn skip_block_comment(b: &[u8], start: usize, nested: bool) -> Option<usize> {
    let mut i = start;
    let mut depth = 0usize;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (Some(b'/'), Some(b'*')) if nested || depth == 0 => {
                depth += 1;
                i += 2;
            }
            (Some(b'*'), Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            (Some(_), _) => i += 1,
            (None, _) => return None,
        }
    }
}

/// The index after the quoted text starting at `start` (a doubled quote is part of the
/// text), or `None` if it never closes.
fn skip_quoted(b: &[u8], start: usize, quote: u8, backslash_escapes: bool) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match b.get(i) {
            None => return None,
            Some(b'\\') if backslash_escapes => i += 2,
            Some(&c) if c == quote && b.get(i + 1) == Some(&quote) => i += 2,
            Some(&c) if c == quote => return Some(i + 1),
            Some(_) => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dialect_lexes_its_own_strings_and_comments() {
        let ok = |q: &str, d| assert_eq!(check_select(q, d), Ok(()), "{d:?}: {q}");
        let multiple = |q: &str, d| {
            assert!(matches!(check_select(q, d), Err(QueryProblem::MultipleStatements { .. })), "{d:?}: {q}")
        };
        // Snowflake: backslash escapes everywhere, `//` comments, $$ strings without tags.
        ok(r"SELECT 'it\'s; fine' // a; comment", SqlDialect::Snowflake);
        ok("SELECT $$a;b$$ AS x", SqlDialect::Snowflake);
        multiple(r"SELECT 'a\'; DROP TABLE t", SqlDialect::Postgres);
        // Databricks: "…" is a string, `…` an identifier.
        ok(r#"SELECT "a;b", `odd;name` FROM t"#, SqlDialect::Databricks);
        multiple("SELECT 1; SELECT 2", SqlDialect::Databricks);
        // BigQuery: `#` comments, backtick table paths.
        ok("SELECT x FROM `proj.ds.t` # trailing; comment", SqlDialect::BigQuery);
        assert_eq!(
            check_select("SELECT `a", SqlDialect::BigQuery),
            Err(QueryProblem::Unterminated { what: "quoted identifier `", line: 1 })
        );
        assert_eq!(
            check_select("MERGE INTO t USING s ON 1=1", SqlDialect::Snowflake),
            Err(QueryProblem::NotSelect { first: "MERGE".into() })
        );
        // Snowflake comments do not nest: `*/` closes the first `/*`.
        multiple("SELECT 1 /* a /* b */ ; SELECT 2", SqlDialect::Snowflake);
    }
}
