//! The snowflake API stand-in (to be written).
