//! The ground floor of every outbound request the operator makes for a tenant.
//!
//! - [`egress`]: where the operator may connect — the policy (`--egress-*`), pure, and the
//!   resolver that applies it to names.
//! - [`http`]: the one HTTP client builder. Sources, warehouse result links and token
//!   endpoints, notifications and Braze all build their clients with it, so each gets the
//!   same egress checks (on the name, on every URL, on every redirect, and on the address
//!   actually connected to), no proxy, timeouts and redirect rules.
//!
//! Nothing here knows about imports, sources or Braze: the layers above depend on it, never
//! the other way round.

pub mod egress;
pub mod http;

pub use http::{Credentials, HttpClient, HttpClientBuilder, MAX_REDIRECTS, USER_AGENT};
