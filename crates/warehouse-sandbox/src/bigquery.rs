//! The bigquery API stand-in (to be written).
