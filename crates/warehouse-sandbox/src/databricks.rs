//! The databricks API stand-in (to be written).
