//! Run report emails (issue 7): after each finished run the controller asks [`should_notify`]
//! and, if so, hands a [`RunNotice`] to a [`Notify`] implementation.
//!
//! - [`notice`]: what a report says about a run, and who wants one. Pure.
//! - [`render`]: subject, plain-text and HTML bodies, the MIME message. Pure.
//! - [`smtp`]: the operator's SMTP settings and [`SmtpNotifier`], the only part with I/O.
//!
//! Sending never decides a run's result: [`Notify::notify`] is bounded in time and returns a
//! [`NotifyError`] the controller records (an Event and a note in status) and moves on.

mod error;
pub mod notice;
pub mod render;
pub mod smtp;

pub use error::{NOTIFICATION_FAILED_REASON, NotifyError};
pub use notice::{RunNotice, is_recovery, should_notify};
pub use render::{RenderedReport, compose, render};
pub use smtp::{Notify, SmtpArgs, SmtpConfig, SmtpConfigError, SmtpNotifier, SmtpTls};
