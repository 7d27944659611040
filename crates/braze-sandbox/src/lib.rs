//! A local Braze for the partner cohort import endpoints and `/users/track` (membership by
//! custom attribute, with a REST API key): a real HTTP server for tests,
//! demos and benchmarks. See README.md for the wire and admin API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), braze_sandbox::SandboxError> {
//! use braze_sandbox::{DataImportKey, Partner, Sandbox, SandboxConfig, SandboxUser};
//! let sandbox = Sandbox::start(SandboxConfig {
//!     partners: vec![Partner { name: "acme".into(), api_key: "partner-key".into() }],
//!     data_import_keys: vec![DataImportKey { key: "import-key".into(), partners: vec![] }],
//!     users: vec![SandboxUser::identified("user-1")],
//!     ..SandboxConfig::default()
//! })
//! .await?;
//! println!("Braze REST endpoint: {}", sandbox.url());
//! # Ok(()) }
//! ```

pub mod bench;
pub mod faults;
pub mod seed;
pub mod server;
pub mod store;
pub mod track;
pub mod wire;

pub use faults::{Faults, RateLimit, ScriptedFault};
pub use server::{
    CohortSummary, DataImportKey, Partner, RequestRecord, RestApiKey, RunningSandbox, Sandbox, SandboxConfig,
    SandboxError, SandboxHandle, Stats, TrackStats, USERS_TRACK, users_track_rate_limit,
};
pub use store::{Alias, SandboxUser};
