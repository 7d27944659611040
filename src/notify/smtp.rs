//! Sending run reports through the operator's SMTP server.
//!
//! The server is operator configuration (Helm values → environment), not part of any
//! `CohortImport`: teams choose recipients, the platform owns the relay and its password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::error::NotifyError;
use super::notice::RunNotice;
use super::render::compose;
use crate::api::{EmailAddress, Notifications};
use crate::secret::SecretString;

/// Sends the report of a finished run to the channels of `spec.notifications` that want it
/// (see [`super::wants`]). Implementations must be bounded in time and must not decide the
/// run's result: the controller records an `Err` and moves on. [`super::Notifier`] is the
/// operator's.
pub trait Notify: Send + Sync {
    fn notify<'a>(
        &'a self,
        notice: &'a RunNotice,
        notifications: &'a Notifications,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
}

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpTls {
    /// Plain text. Only for a relay on a trusted network, e.g. a sidecar or node-local MTA.
    None,
    /// Plain connection upgraded with STARTTLS, which is required (submission, port 587).
    #[value(name = "starttls")]
    StartTls,
    /// TLS from the first byte (SMTPS, port 465).
    Implicit,
}

impl SmtpTls {
    /// The port conventionally used with this mode.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::None => 25,
            SmtpTls::StartTls => 587,
            SmtpTls::Implicit => 465,
        }
    }
}

/// SMTP settings as command-line flags or environment variables; the operator binary
/// flattens this into its arguments and the Helm chart sets the variables.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "Run report email (SMTP)")]
pub struct SmtpArgs {
    /// SMTP server for run report emails. Reports are off when unset.
    #[arg(long = "smtp-host", env = "COHORT_SMTP_HOST")]
    pub smtp_host: Option<String>,
    /// Port; 587 for starttls, 465 for implicit, 25 for none when unset.
    #[arg(long = "smtp-port", env = "COHORT_SMTP_PORT")]
    pub smtp_port: Option<u16>,
    /// Connection protection.
    #[arg(long = "smtp-tls", env = "COHORT_SMTP_TLS", value_enum, default_value = "starttls")]
    pub smtp_tls: Option<SmtpTls>,
    /// User name for SMTP AUTH; requires a password.
    #[arg(long = "smtp-username", env = "COHORT_SMTP_USERNAME")]
    pub smtp_username: Option<String>,
    /// File holding the SMTP password, e.g. a mounted Secret key.
    #[arg(long = "smtp-password-file", env = "COHORT_SMTP_PASSWORD_FILE")]
    pub smtp_password_file: Option<PathBuf>,
    /// The SMTP password itself; prefer --smtp-password-file.
    #[arg(
        long = "smtp-password",
        env = "COHORT_SMTP_PASSWORD",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub smtp_password: Option<SecretString>,
    /// Sender of the reports, e.g. `Cohort operator <cohorts@example.com>`.
    #[arg(long = "smtp-from", env = "COHORT_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// PEM file of extra CA certificates trusted for the SMTP server (a private relay).
    #[arg(long = "smtp-ca-file", env = "COHORT_SMTP_CA_FILE")]
    pub smtp_ca_file: Option<PathBuf>,
    /// Longest wait for one send attempt, connection to last reply.
    #[arg(
        long = "smtp-timeout-seconds",
        env = "COHORT_SMTP_TIMEOUT_SECONDS",
        default_value = "10",
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub smtp_timeout_seconds: Option<u64>,
    /// Further attempts after a failed one, with doubling waits starting at one second.
    #[arg(
        long = "smtp-retries",
        env = "COHORT_SMTP_RETRIES",
        default_value = "3",
        value_parser = clap::value_parser!(u32).range(0..=10)
    )]
    pub smtp_retries: Option<u32>,
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::new(value))
}

/// Why the SMTP settings cannot be used. Names the setting and never holds its secret.
#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    #[error("COHORT_SMTP_HOST (--smtp-host) is empty; set the SMTP server's host name or unset it to turn reports off")]
    EmptyHost,
    #[error(
        "COHORT_SMTP_FROM (--smtp-from) is required when COHORT_SMTP_HOST is set; set the sender, e.g. `Cohort operator <cohorts@example.com>`"
    )]
    MissingFrom,
    #[error(
        "COHORT_SMTP_FROM (--smtp-from) {value:?} is not an email address ({reason}); use `Name <local@domain>` or `local@domain`"
    )]
    InvalidFrom { value: String, reason: String },
    #[error(
        "COHORT_SMTP_USERNAME (--smtp-username) is set but no password is; set COHORT_SMTP_PASSWORD_FILE to the mounted Secret key"
    )]
    MissingPassword,
    #[error("an SMTP password is set but COHORT_SMTP_USERNAME (--smtp-username) is not; set both or neither")]
    MissingUsername,
    #[error("both COHORT_SMTP_PASSWORD_FILE and COHORT_SMTP_PASSWORD are set; keep one (the file)")]
    TwoPasswords,
    #[error(
        "cannot read the SMTP password file {path:?} (COHORT_SMTP_PASSWORD_FILE): {source}; check the Secret is mounted there"
    )]
    ReadPasswordFile { path: PathBuf, source: std::io::Error },
    #[error("the SMTP password ({origin}) is empty; put the password in the Secret")]
    EmptyPassword { origin: &'static str },
    #[error(
        "cannot read the SMTP CA file {path:?} (COHORT_SMTP_CA_FILE): {source}; check the ConfigMap or Secret is mounted there"
    )]
    ReadCaFile { path: PathBuf, source: std::io::Error },
    #[error("the SMTP CA file {path:?} (COHORT_SMTP_CA_FILE) holds no usable PEM certificate: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error("cannot set up TLS for SMTP server {host}: {reason}")]
    Tls { host: String, reason: String },
}

/// Everything needed to send through the operator's SMTP server.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// User name and password for SMTP AUTH.
    pub credentials: Option<(String, SecretString)>,
    pub from: Mailbox,
    /// Extra trusted CA certificates (PEM), beyond the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Longest wait for one attempt, connection to last reply.
    pub timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub retry_backoff: Duration,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            // The password is a SecretString: redacted.
            .field("credentials", &self.credentials)
            .field("from", &self.from.to_string())
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| format!("<{} bytes>", pem.len())))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
    }
}

impl SmtpConfig {
    /// Defaults for everything but the server and the sender.
    pub fn new(host: impl Into<String>, port: u16, tls: SmtpTls, from: Mailbox) -> Self {
        Self {
            host: host.into(),
            port,
            tls,
            credentials: None,
            from,
            ca_pem: None,
            timeout: Duration::from_secs(10),
            retries: 3,
            retry_backoff: Duration::from_secs(1),
        }
    }

    /// The longest [`SmtpNotifier`] can take to give up: every attempt times out and every
    /// wait between them is taken.
    pub fn max_send_time(&self) -> Duration {
        let attempts = self.retries + 1;
        let waits: Duration = (0..self.retries).map(|i| self.backoff(i)).sum();
        self.timeout * attempts + waits
    }

    /// Wait after failed attempt number `i` (from zero).
    fn backoff(&self, i: u32) -> Duration {
        self.retry_backoff.saturating_mul(1 << i.min(16))
    }
}

impl SmtpArgs {
    /// The SMTP settings, or `None` when no host is set (reports off). Reads the password
    /// and CA files.
    pub fn into_config(self) -> Result<Option<SmtpConfig>, SmtpConfigError> {
        let Some(host) = self.smtp_host else { return Ok(None) };
        let host = host.trim().to_owned();
        if host.is_empty() {
            return Err(SmtpConfigError::EmptyHost);
        }
        let from_value = self.smtp_from.ok_or(SmtpConfigError::MissingFrom)?;
        let from = from_value
            .parse::<Mailbox>()
            .map_err(|e| SmtpConfigError::InvalidFrom { value: from_value.clone(), reason: e.to_string() })?;
        let password = match (self.smtp_password_file, self.smtp_password) {
            (Some(_), Some(_)) => return Err(SmtpConfigError::TwoPasswords),
            (Some(path), None) => Some(read_password_file(&path)?),
            (None, Some(password)) if password.is_empty() => {
                return Err(SmtpConfigError::EmptyPassword { origin: "COHORT_SMTP_PASSWORD" });
            }
            (None, password) => password,
        };
        let credentials = match (self.smtp_username, password) {
            (Some(user), Some(password)) => Some((user, password)),
            (Some(_), None) => return Err(SmtpConfigError::MissingPassword),
            (None, Some(_)) => return Err(SmtpConfigError::MissingUsername),
            (None, None) => None,
        };
        let ca_pem = match self.smtp_ca_file {
            Some(path) => Some(
                std::fs::read(&path)
                    .map_err(|source| SmtpConfigError::ReadCaFile { path: path.clone(), source })
                    .and_then(|pem| check_ca(&path, pem))?,
            ),
            None => None,
        };
        let tls = self.smtp_tls.unwrap_or(SmtpTls::StartTls);
        let mut config = SmtpConfig::new(host, self.smtp_port.unwrap_or(tls.default_port()), tls, from);
        config.credentials = credentials;
        config.ca_pem = ca_pem;
        if let Some(secs) = self.smtp_timeout_seconds {
            config.timeout = Duration::from_secs(secs);
        }
        if let Some(retries) = self.smtp_retries {
            config.retries = retries;
        }
        Ok(Some(config))
    }
}

fn read_password_file(path: &Path) -> Result<SecretString, SmtpConfigError> {
    let bytes =
        std::fs::read(path).map_err(|source| SmtpConfigError::ReadPasswordFile { path: path.to_owned(), source })?;
    let text = String::from_utf8(bytes).map_err(|_| SmtpConfigError::ReadPasswordFile {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
    })?;
    // `kubectl create secret --from-file` keeps the file's final newline; it is never part
    // of a password.
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(SmtpConfigError::EmptyPassword { origin: "COHORT_SMTP_PASSWORD_FILE" });
    }
    Ok(SecretString::new(password))
}

fn check_ca(path: &Path, pem: Vec<u8>) -> Result<Vec<u8>, SmtpConfigError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let invalid = |reason: String| SmtpConfigError::InvalidCa { path: path.to_owned(), reason };
    let certs =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid("no `-----BEGIN CERTIFICATE-----` block".to_owned()));
    }
    Certificate::from_pem(&pem).map_err(|e| invalid(e.to_string()))?;
    Ok(pem)
}

/// [`Notify`] through an SMTP server, with bounded attempts.
pub struct SmtpNotifier {
    config: SmtpConfig,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl fmt::Debug for SmtpNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The transport holds the password; the config redacts it.
        f.debug_struct("SmtpNotifier").field("config", &self.config).finish_non_exhaustive()
    }
}

impl SmtpNotifier {
    pub fn new(config: SmtpConfig) -> Result<Self, SmtpConfigError> {
        let tls_error = |e: lettre::transport::smtp::Error| SmtpConfigError::Tls {
            host: config.host.clone(),
            reason: e.to_string(),
        };
        let tls_parameters = || -> Result<TlsParameters, SmtpConfigError> {
            let mut builder = TlsParameters::builder(config.host.clone());
            if let Some(pem) = &config.ca_pem {
                builder = builder.add_root_certificate(Certificate::from_pem(pem).map_err(tls_error)?);
            }
            builder.build().map_err(tls_error)
        };
        let tls = match config.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(tls_parameters()?),
            SmtpTls::Implicit => Tls::Wrapper(tls_parameters()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.host.clone())
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout));
        if let Some((user, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        if config.tls == SmtpTls::None && config.credentials.is_some() {
            tracing::warn!(
                host = %config.host,
                "SMTP credentials will be sent without TLS (COHORT_SMTP_TLS=none)"
            );
        }
        Ok(Self { transport: builder.build(), config })
    }

    pub fn config(&self) -> &SmtpConfig {
        &self.config
    }

    /// Sends `message`, retrying transient failures with doubling waits. Gives up after
    /// `retries + 1` attempts, at most [`SmtpConfig::max_send_time`].
    pub async fn send(&self, message: &Message) -> Result<(), NotifyError> {
        let attempts = self.config.retries + 1;
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            // lettre's timeout bounds each socket operation; this bounds the whole exchange.
            match tokio::time::timeout(self.config.timeout, self.transport.send(message.clone())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => {
                    last_error = self.scrub(e.to_string());
                    // A 5xx reply (bad recipient, wrong password) will not change on retry.
                    if e.is_permanent() {
                        return Err(self.send_error(attempt, last_error));
                    }
                }
                Err(_) => {
                    last_error = format!("no complete exchange within {:?}", self.config.timeout);
                }
            }
            if attempt < attempts {
                let wait = self.config.backoff(attempt - 1);
                tracing::warn!(
                    host = %self.config.host,
                    port = self.config.port,
                    attempt,
                    error = %last_error,
                    "sending a run report failed; retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
        }
        Err(self.send_error(attempts, last_error))
    }

    fn send_error(&self, attempts: u32, last_error: String) -> NotifyError {
        NotifyError::Send { host: self.config.host.clone(), port: self.config.port, attempts, last_error }
    }

    /// Server replies are not ours to trust: make sure none echoes the password.
    fn scrub(&self, mut text: String) -> String {
        if let Some((_, password)) = &self.config.credentials
            && !password.is_empty()
        {
            text = text.replace(password.expose(), "<redacted>");
        }
        text
    }
}

impl SmtpNotifier {
    /// Emails the report on `notice` to `recipients`.
    pub async fn send_report(&self, notice: &RunNotice, recipients: &[EmailAddress]) -> Result<(), NotifyError> {
        let message = compose(notice, &self.config.from, recipients)?;
        self.send(&message).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        smtp: SmtpArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<SmtpConfig>, SmtpConfigError> {
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().smtp.into_config()
    }

    #[test]
    fn flags_flatten_into_a_command_line() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--smtp-password-file"));
        assert!(help.contains("COHORT_SMTP_HOST"));
    }

    #[test]
    fn no_host_means_reports_off() {
        assert!(parse(&[]).unwrap().is_none());
    }

    #[test]
    fn defaults_follow_the_tls_mode() {
        let c = parse(&["--smtp-host", "smtp.example.com", "--smtp-from", "Ops <ops@example.com>"]).unwrap().unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("smtp.example.com", 587, SmtpTls::StartTls));
        assert_eq!(c.from.email.to_string(), "ops@example.com");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.retries, 3);
        assert!(c.credentials.is_none());

        let c = parse(&["--smtp-host", "h", "--smtp-from", "a@b.c", "--smtp-tls", "implicit"]).unwrap().unwrap();
        assert_eq!((c.port, c.tls), (465, SmtpTls::Implicit));
        let c = parse(&["--smtp-host", "h", "--smtp-from", "a@b.c", "--smtp-tls", "none", "--smtp-port", "2525"])
            .unwrap()
            .unwrap();
        assert_eq!((c.port, c.tls), (2525, SmtpTls::None));
    }

    #[test]
    fn password_comes_from_a_file_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret-pa55\n").unwrap();
        let c = parse(&[
            "--smtp-host",
            "h",
            "--smtp-from",
            "a@b.c",
            "--smtp-username",
            "ops",
            "--smtp-password-file",
            path.to_str().unwrap(),
        ])
        .unwrap()
        .unwrap();
        let (user, password) = c.credentials.as_ref().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("ops", "s3cret-pa55"));
        assert!(!format!("{c:?}").contains("s3cret-pa55"));
        let notifier = SmtpNotifier::new(c).unwrap();
        assert!(!format!("{notifier:?}").contains("s3cret-pa55"));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let missing = parse(&["--smtp-host", "h"]).unwrap_err();
        assert!(matches!(missing, SmtpConfigError::MissingFrom));
        assert!(missing.to_string().contains("COHORT_SMTP_FROM"));

        let err = parse(&["--smtp-host", "h", "--smtp-from", "not an address"]).unwrap_err();
        assert!(err.to_string().contains("COHORT_SMTP_FROM"), "{err}");

        let err = parse(&["--smtp-host", "h", "--smtp-from", "a@b.c", "--smtp-username", "u"]).unwrap_err();
        assert!(matches!(err, SmtpConfigError::MissingPassword));

        let err = parse(&["--smtp-host", "h", "--smtp-from", "a@b.c", "--smtp-password", "hunter2"]).unwrap_err();
        assert!(matches!(err, SmtpConfigError::MissingUsername));
        assert!(!err.to_string().contains("hunter2"));

        let err = parse(&[
            "--smtp-host",
            "h",
            "--smtp-from",
            "a@b.c",
            "--smtp-username",
            "u",
            "--smtp-password-file",
            "/nonexistent/smtp-password",
        ])
        .unwrap_err();
        assert!(matches!(err, SmtpConfigError::ReadPasswordFile { .. }));
        assert!(err.to_string().contains("/nonexistent/smtp-password"));

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let err =
            parse(&["--smtp-host", "h", "--smtp-from", "a@b.c", "--smtp-ca-file", ca.to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, SmtpConfigError::InvalidCa { .. }), "{err:?}");
    }

    #[test]
    fn send_time_is_bounded() {
        let mut c = SmtpConfig::new("h", 25, SmtpTls::None, "a@b.c".parse().unwrap());
        c.timeout = Duration::from_secs(10);
        c.retries = 3;
        c.retry_backoff = Duration::from_secs(1);
        assert_eq!(c.max_send_time(), Duration::from_secs(40 + 1 + 2 + 4));
        c.retries = 0;
        assert_eq!(c.max_send_time(), Duration::from_secs(10));
    }
}
