//! Run reports: after each finished run the controller asks [`any_channel_wants`] and, if
//! so, hands a [`RunNotice`] and the import's `spec.notifications` to a [`Notify`]
//! implementation — the operator's is [`Notifier`], which sends every channel that wants
//! the run (email, Slack, a CloudEvents webhook) at once and reports each failure.
//!
//! - [`notice`]: what a report says about a run, and who wants one. Pure.
//! - [`render`]: subject, plain-text and HTML bodies, the MIME message. Pure.
//! - [`payload`]: the Slack message and the CloudEvent. Pure.
//! - [`smtp`]: the operator's SMTP settings and [`SmtpNotifier`].
//! - [`http`]: [`HttpSender`], posting to Slack and webhook URLs with bounded retries, under
//!   the operator's egress policy (`crate::net::egress`).
//! - [`fanout`]: [`Notifier`], reading each channel's Secrets and sending.
//!
//! Sending never decides a run's result: [`Notify::notify`] is bounded in time and returns a
//! [`NotifyError`] the controller records (an Event and a note in status) and moves on.

mod error;
pub mod fanout;
pub mod http;
pub mod notice;
pub mod payload;
pub mod render;
pub mod smtp;

pub use error::{Channel, ChannelFailure, NOTIFICATION_FAILED_REASON, NotifyError};
pub use fanout::Notifier;
pub use http::{HttpConfig, HttpSender};
pub use notice::{RunNotice, any_channel_wants, hears, is_recovery, result_changed, should_notify, wants};
pub use render::{RenderedReport, compose, render};
pub use smtp::{Notify, SmtpArgs, SmtpConfig, SmtpConfigError, SmtpNotifier, SmtpTls};
