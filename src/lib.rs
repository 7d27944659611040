//! cohort-operator: keeps analytics cohorts imported into Braze.
//!
//! - [`api`]: the `CohortImport` custom resource (Kubernetes types only).
//! - [`domain`]: pure logic — schedules, members, diffs, validation, run planning. No I/O.

pub mod api;
pub mod braze;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod fence;
pub mod notify;
pub mod run;
pub mod secret;
pub mod snapshot;
pub mod source;
