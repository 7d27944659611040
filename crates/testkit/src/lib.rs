//! Real services for tests, started on free loopback ports and stopped when dropped (or,
//! for process-wide instances, when the test process exits); and [`bench`], what benchmarks
//! that measure their work in a child process share.

pub mod bench;
pub mod cluster;
pub mod pagerduty;
pub mod postgres;
pub mod smtp;
pub mod webhook;
