//! The domain core: plain functions and types, no Kubernetes client, no network, no clock.
//! Everything here is unit-tested without a cluster.
pub mod cron;
pub mod diff;
pub mod guard;
pub mod identifiers;
pub mod member;
pub mod plan;
pub mod retry;
pub mod schedule;
pub mod sql;
pub mod validate;
