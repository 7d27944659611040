//! Running a statement on PostgreSQL for every stand-in: read-only, bounded by a timeout,
//! rows handed over a page at a time as the server's own text.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// A result column: its name as PostgreSQL reports it, and its type.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub pg_type: Type,
}

/// Rows of text cells; `None` is SQL NULL.
pub type Rows = Vec<Vec<Option<String>>>;

/// Why a statement did not produce rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryError {
    /// The database refused it: SQLSTATE, message, 1-based character position.
    Database { sqlstate: String, message: String, position: Option<u32> },
    /// It ran past its timeout and was cancelled.
    Timeout,
    /// The database could not be reached.
    Connection(String),
}

/// Runs `sql` in a read-only transaction and passes its rows to `page`, `page_rows` at a
/// time (the columns are known before the first page). `search_path` sets the schema.
pub async fn run_query(
    database_url: &str,
    sql: &str,
    search_path: Option<&str>,
    timeout: Duration,
    page_rows: usize,
    mut page: impl FnMut(&[Column], Rows) + Send,
) -> Result<(Vec<Column>, u64), QueryError> {
    let work = async {
        let (client, connection) =
            tokio_postgres::connect(database_url, NoTls).await.map_err(|e| QueryError::Connection(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let ms = timeout.as_millis().max(1);
        let mut setup = format!("SET statement_timeout = {ms}; START TRANSACTION READ ONLY;");
        if let Some(schema) = search_path {
            setup.push_str(&format!(" SET LOCAL search_path TO \"{}\";", schema.replace('"', "\"\"")));
        }
        client.batch_execute(&setup).await.map_err(|e| database_error(&e))?;
        let statement = client.prepare(sql).await.map_err(|e| database_error(&e))?;
        let columns: Vec<Column> = statement
            .columns()
            .iter()
            .map(|c| Column { name: c.name().to_owned(), pg_type: c.type_().clone() })
            .collect();
        client
            .execute(&format!("DECLARE sandbox_rows NO SCROLL CURSOR FOR {sql}"), &[])
            .await
            .map_err(|e| database_error(&e))?;
        let fetch = format!("FETCH FORWARD {} FROM sandbox_rows", page_rows.max(1));
        let mut total = 0u64;
        loop {
            let messages = client.simple_query(&fetch).await.map_err(|e| database_error(&e))?;
            let mut rows: Rows = Vec::new();
            for message in messages {
                if let SimpleQueryMessage::Row(row) = message {
                    rows.push((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect());
                }
            }
            let n = rows.len();
            total += n as u64;
            if n > 0 {
                page(&columns, rows);
            }
            if n < page_rows.max(1) {
                break;
            }
        }
        client.batch_execute("COMMIT").await.map_err(|e| database_error(&e))?;
        Ok((columns, total))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(done) => done,
        Err(_) => Err(QueryError::Timeout),
    }
}

fn database_error(e: &tokio_postgres::Error) -> QueryError {
    match e.as_db_error() {
        Some(db) if db.code().code() == "57014" => QueryError::Timeout,
        Some(db) => QueryError::Database {
            sqlstate: db.code().code().to_owned(),
            message: db.message().to_owned(),
            position: match db.position() {
                Some(tokio_postgres::error::ErrorPosition::Original(p)) => Some(*p),
                _ => None,
            },
        },
        None => QueryError::Connection(e.to_string()),
    }
}

/// A random UUID (version 4) for statement handles and ids.
pub fn uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Whether a name is what PostgreSQL makes of an unquoted identifier (lower-case letters,
/// digits, `_`): a warehouse that folds to upper case would report it upper-cased.
pub fn folded_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
}
