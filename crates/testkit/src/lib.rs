//! Real services for tests, started on free loopback ports and stopped when dropped (or,
//! for process-wide instances, when the test process exits).

pub mod cluster;
pub mod postgres;
pub mod smtp;
pub mod webhook;
