//! Real services for tests, started on free loopback ports and stopped on drop.
