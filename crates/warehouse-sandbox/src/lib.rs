//! Faithful local stand-ins for three warehouse SQL REST APIs, written from their public
//! documentation (`shared/notes/warehouse-sql-apis.md` summarises it), for the warehouse
//! sources' tests, the demo and benchmarks. Each runs the statement against a real
//! PostgreSQL and serves the rows with the real API's authentication, statement states and
//! pagination, and can inject the documented faults.

pub mod bigquery;
pub mod databricks;
pub mod keys;
pub mod pg;
mod serve;
pub mod snowflake;
