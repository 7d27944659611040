//! Braze's partner cohort import API (naming a cohort and changing its members), and
//! membership as a custom attribute through `/users/track`.
//!
//! - [`attributes`]: the `/users/track` wire format, its limits and per-object errors (pure).
//! - [`batch`]: packing changes into requests of at most 1,000 identifiers (pure).
//! - [`retry`]: which answers to retry and how long to wait (pure).
//! - [`wire`]: request bodies and lenient reading of answers, with key redaction (pure).
//! - [`budget`]: one request budget per destination, shared by every run (token bucket).
//! - [`client`]: the HTTP client: bounded concurrency, keep-alive, retries, run reports.

pub mod attributes;
pub mod batch;
pub mod budget;
pub mod client;
pub mod error;
pub mod retry;
pub mod wire;

pub use attributes::{MembershipAttribute, Rejected};
pub use batch::{Batch, Change, IdCounts, MAX_IDS_PER_REQUEST};
pub use budget::{BudgetConfig, BudgetObserver, Budgets};
pub use client::{
    BrazeClient, BrazeClientConfig, ChangesReport, ChangesTotals, CohortTarget, Delivery, RequestOutcome,
};
pub use error::{BrazeError, TransientFailure, UnauthorizedReason};
pub use retry::RetryPolicy;

/// A REST endpoint as one text, whatever its case and trailing slash:
/// `https://REST.iad-01.braze.com/` → `https://rest.iad-01.braze.com`.
pub fn normalize_endpoint(endpoint: &str) -> String {
    endpoint.trim().trim_end_matches('/').to_ascii_lowercase()
}
