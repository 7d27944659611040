//! cohort-operator: keeps analytics cohorts imported into Braze.
//!
//! - [`api`]: the `CohortImport` custom resource (Kubernetes types only).
//! - [`domain`]: pure logic — schedules, members, diffs, validation, run planning. No I/O.
//! - [`net`]: the ground floor of every outbound HTTP request: the egress policy and the one
//!   client builder that applies it.
//! - [`trigger`]: `CohortTrigger` webhooks — a pipeline's signed call becomes an import's run
//!   request.

/// jemalloc for every program that links the operator — the binary, and the tests and
/// benchmarks that run its controller — so what they measure is what ships. At 10,000
/// imports glibc's per-thread arenas fragment (peak RSS 201.6 MiB against jemalloc's
/// 153.6 MiB in `controller_scale`; mimalloc kept 260 MiB), and the release image is a
/// static musl binary, whose own malloc is slow with many threads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod api;
pub mod braze;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod fence;
pub mod net;
pub mod notify;
pub mod run;
pub mod secret;
pub mod snapshot;
pub mod source;
pub mod trigger;
