//! `postgres`: a user-written `SELECT` on PostgreSQL or a Postgres-compatible warehouse.
//!
//! Rows are streamed through a server-side cursor, `fetchSize` rows per round trip, each
//! row handled as it arrives (not after the whole FETCH), so memory grows with neither the
//! cohort nor `fetchSize`; a row longer than `maxRowBytes` fails the run. Only statements that Redshift and similar
//! warehouses also accept are sent:
//!
//! 1. `SET statement_timeout = <ms>` (session level; Redshift accepts it). A server that
//!    refuses it is logged and the operator's own deadline still applies.
//! 2. `START TRANSACTION READ ONLY`: the query cannot write, whatever it says.
//! 3. `DECLARE cohort_members CURSOR FOR <query>` through the extended protocol, which
//!    takes exactly one statement, so the query cannot smuggle in a second one (`; COMMIT;
//!    …`) to escape the read-only transaction. Postgres only allows `SELECT` or `VALUES`
//!    there. No `NO SCROLL`/`WITH HOLD` options, which Redshift lacks.
//! 4. `FETCH FORWARD <fetchSize> FROM cohort_members` through the simple protocol, so every
//!    column arrives as the server's own text — `bigint`, `uuid`, `numeric`, `citext` all
//!    become the strings the database prints. FETCH repeats until one returns no row — not
//!    until the first short one: Redshift caps a single-node cluster's fetch at 1,000 rows,
//!    and a proxy may cap it too, so a short page says nothing about the end.
//! 5. `COMMIT`.
//!
//! `statementTimeoutSeconds` bounds the whole read on the client too: past it the query is
//! cancelled (a cancel request, as psql sends on Ctrl-C) and the run fails with a timeout.
//!
//! Every host is resolved by the operator and checked against its egress policy
//! ([`crate::net::egress`]) before anything connects; the driver connects to the checked address.
//!
//! TLS follows the URL's `sslmode` (`disable`, `prefer` — the default — or `require`),
//! through rustls with the platform's trusted roots; certificates are always verified.
//! The connection URL is a secret: it is never shown, and a message from the driver or the
//! server has the password replaced.

use std::sync::Arc;
use std::time::Duration;

use futures::{Future, StreamExt};
use rustls_platform_verifier::BuilderVerifierExt;
use tokio::time::Instant;
use tokio_postgres::config::Host;
use tokio_postgres::error::{ErrorPosition, SqlState};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, SimpleQueryMessage, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{BATCH_ROWS, BatchBuilder, MemberSource, MemberStream, REDACT_MIN_LEN, SourceContext, SourceError};
use crate::api::PostgresSource;
use crate::domain::identifiers::{ColumnPlan, IdentifierFields, SkipReason, Value};
use crate::net::egress::{EgressPolicy, ResolveError};
use crate::secret::{SecretString, error_chain, redact};

const CURSOR: &str = "cohort_members";
const DECLARE: &str = "DECLARE cohort_members CURSOR FOR ";
/// Connection attempts give up after this unless the URL sets `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct PostgresMembers {
    what: String,
    url: SecretString,
    /// The URL's password, to redact from the driver's and server's messages.
    password: Option<SecretString>,
    query: String,
    statement_timeout: Duration,
    fetch_size: u32,
    max_row_bytes: u64,
    fields: IdentifierFields,
    /// Where connections may go ([`crate::net::egress`]).
    egress: Arc<EgressPolicy>,
}

impl PostgresMembers {
    /// Reads the connection URL from its Secret and checks that it parses.
    pub async fn open(
        spec: &PostgresSource,
        fields: IdentifierFields,
        ctx: &impl SourceContext,
    ) -> Result<Self, SourceError> {
        let r = &spec.connection_secret_ref;
        let what = format!("postgres query (connection from Secret {}/{} key {})", ctx.namespace(), r.name, r.key);
        let url = ctx.secret_value(&r.name, &r.key).await?;
        Ok(Self::new(what, url, spec, fields)?.with_egress(ctx.egress()))
    }

    /// Connects only where `policy` allows (the default policy otherwise).
    pub fn with_egress(mut self, policy: Arc<EgressPolicy>) -> Self {
        self.egress = policy;
        self
    }

    /// A source over a URL already read (`what` names it in messages).
    pub fn new(
        what: String,
        url: SecretString,
        spec: &PostgresSource,
        fields: IdentifierFields,
    ) -> Result<Self, SourceError> {
        let mut source = PostgresMembers {
            what,
            url,
            password: None,
            // A trailing semicolon is natural to write and breaks DECLARE … FOR.
            query: spec.query.trim().trim_end_matches(';').trim_end().to_owned(),
            statement_timeout: Duration::from_secs(spec.statement_timeout_seconds.into()),
            fetch_size: spec.fetch_size.max(1),
            max_row_bytes: spec.max_row_bytes,
            fields,
            egress: EgressPolicy::shared_default(),
        };
        let config = source.config()?;
        source.password = config.get_password().and_then(|p| std::str::from_utf8(p).ok()).map(SecretString::new);
        if source.query.is_empty() {
            return Err(SourceError::Config { what: source.what, message: "postgres.query is empty".to_owned() });
        }
        Ok(source)
    }

    fn secrets(&self) -> Vec<&str> {
        [Some(&self.url), self.password.as_ref()].into_iter().flatten().map(SecretString::expose).collect()
    }

    fn config(&self) -> Result<tokio_postgres::Config, SourceError> {
        let mut config: tokio_postgres::Config = self.url.expose().parse().map_err(|e: tokio_postgres::Error| {
            SourceError::Config {
                what: self.what.clone(),
                message: format!(
                    "the Secret does not hold a valid connection URL (postgres://user:password@host:5432/db?sslmode=require): {}",
                    redact(&error_chain(&e), &[self.url.expose()], REDACT_MIN_LEN)
                ),
            }
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("cohort-operator");
        }
        Ok(config)
    }

    /// Connects where the egress policy allows: the URL's hosts are resolved here and
    /// checked, and the driver gets the checked addresses (`hostaddr`), so it never resolves
    /// a name itself (no DNS rebinding); TLS still verifies the certificate for the host name.
    async fn connect(
        &self,
        deadline: Instant,
        tls: &MakeRustlsConnect,
    ) -> Result<(Client, Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>), SourceError> {
        let config = self.within(deadline, self.checked_config()).await??;
        self.within(deadline, config.connect(tls.clone())).await?.map_err(|e| self.connect_error(&e))
    }

    /// [`Self::config`] with every TCP host pinned to the addresses the policy allows.
    async fn checked_config(&self) -> Result<tokio_postgres::Config, SourceError> {
        let mut config = self.config()?;
        let denied = |denied| SourceError::EgressDenied { what: self.what.clone(), denied };
        let hosts = config.get_hosts().to_vec();
        let given = config.get_hostaddrs().to_vec();
        if !given.is_empty() {
            // `hostaddr` in the URL: connected to as given, without DNS.
            for (i, addr) in given.iter().enumerate() {
                let host = match hosts.get(i) {
                    Some(Host::Tcp(name)) => name.clone(),
                    _ => addr.to_string(),
                };
                self.egress.check_addr(&host, *addr).map_err(denied)?;
            }
            return Ok(config);
        }
        let tcp = hosts.iter().filter(|h| matches!(h, Host::Tcp(_))).count();
        if tcp == 0 {
            return Ok(config); // Unix sockets only: nothing leaves the pod.
        }
        if tcp != hosts.len() {
            return Err(SourceError::Config {
                what: self.what.clone(),
                message: "the connection URL mixes Unix-socket and TCP hosts; use one kind".to_owned(),
            });
        }
        let ports = config.get_ports().to_vec();
        let port_of = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        // The first allowed address of each host goes beside it; further ones as hosts of
        // their own after the URL's, so the driver still tries every address.
        let mut more = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let Host::Tcp(name) = host else { continue };
            let addrs = self.egress.resolve(name, port_of(i)).await.map_err(|e| match e {
                ResolveError::Denied(d) => denied(d),
                lookup => SourceError::Connect { what: self.what.clone(), message: lookup.to_string() },
            })?;
            let Some((first, rest)) = addrs.split_first() else {
                return Err(SourceError::Connect {
                    what: self.what.clone(),
                    message: format!("{name} has no address"),
                });
            };
            config.hostaddr(first.ip());
            more.extend(rest.iter().map(|a| (name.clone(), port_of(i), a.ip())));
        }
        for (name, port, addr) in more {
            config.host(name).hostaddr(addr);
            if ports.len() > 1 {
                config.port(port);
            }
        }
        Ok(config)
    }

    fn connect_error(&self, e: &tokio_postgres::Error) -> SourceError {
        SourceError::Connect {
            what: self.what.clone(),
            message: redact(&self.describe_error(e), &self.secrets(), REDACT_MIN_LEN),
        }
    }

    fn query_error(&self, e: &tokio_postgres::Error) -> SourceError {
        if e.code() == Some(&SqlState::QUERY_CANCELED) {
            return self.timeout();
        }
        SourceError::Query {
            what: self.what.clone(),
            message: redact(&self.describe_error(e), &self.secrets(), REDACT_MIN_LEN),
        }
    }

    /// The server's words, with where in the user's query it points.
    fn describe_error(&self, e: &tokio_postgres::Error) -> String {
        let Some(db) = e.as_db_error() else { return error_chain(e) };
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(ErrorPosition::Original(at)) = db.position() {
            // Positions count characters of the statement sent, which starts with DECLARE.
            let prefix = DECLARE.chars().count() as u32;
            if *at > prefix {
                text.push_str(&format!(" (at character {} of the query)", at - prefix));
            }
        }
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        text
    }

    fn tls(&self) -> Result<MakeRustlsConnect, SourceError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_platform_verifier())
            .map_err(|e| SourceError::Connect { what: self.what.clone(), message: format!("TLS setup: {e}") })?
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    fn timeout(&self) -> SourceError {
        SourceError::Timeout { what: self.what.clone(), seconds: self.statement_timeout.as_secs() }
    }

    /// Waits for `step`, failing with a timeout past the read's deadline.
    async fn within<T>(&self, deadline: Instant, step: impl Future<Output = T>) -> Result<T, SourceError> {
        tokio::time::timeout_at(deadline, step).await.map_err(|_| self.timeout())
    }

    /// Waits for a statement on `client`; past the deadline, also asks the server to stop it:
    /// a server that refused `statement_timeout` would run on, and warehouses such as
    /// Redshift run the whole query at `DECLARE`, not only at `FETCH`.
    async fn statement<T>(
        &self,
        deadline: Instant,
        client: &Client,
        tls: &MakeRustlsConnect,
        step: impl Future<Output = T>,
    ) -> Result<T, SourceError> {
        match tokio::time::timeout_at(deadline, step).await {
            Ok(done) => Ok(done),
            Err(_) => {
                self.cancel(client, tls.clone()).await;
                Err(self.timeout())
            }
        }
    }

    /// Asks the server to stop the running statement; best effort, briefly.
    async fn cancel(&self, client: &Client, tls: MakeRustlsConnect) {
        let cancel = client.cancel_token();
        match tokio::time::timeout(Duration::from_secs(5), cancel.cancel_query(tls)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(source = %self.what, "cancelling the query failed: {}", redact(&error_chain(&e), &self.secrets(), REDACT_MIN_LEN))
            }
            Err(_) => tracing::warn!(source = %self.what, "cancelling the query timed out"),
        }
    }

    /// Fails when row number `n` is longer than `maxRowBytes` (its columns' text).
    fn check_row_size(&self, row: &tokio_postgres::SimpleQueryRow, n: u64) -> Result<(), SourceError> {
        let size: u64 = (0..row.len()).map(|i| row.try_get(i).ok().flatten().map_or(0, str::len) as u64).sum();
        if size <= self.max_row_bytes {
            return Ok(());
        }
        Err(SourceError::RowTooLarge {
            what: self.what.clone(),
            item: "row",
            location: format!("position {n} of the result"),
            limit: self.max_row_bytes,
            field: "postgres.maxRowBytes",
        })
    }

    fn column_plan(&self, columns: &[tokio_postgres::SimpleColumn]) -> Result<ColumnPlan, SourceError> {
        let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
        super::warehouse::column_plan(&self.what, &self.fields, &names)
    }
}

impl MemberSource for PostgresMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        Box::pin(async_stream::try_stream! {
            let deadline = Instant::now() + self.statement_timeout;
            let tls = self.tls()?;
            let (client, connection) = self.connect(deadline, &tls).await?;
            let what = self.what.clone();
            tokio::spawn(async move {
                // Ends when `client` is dropped; errors here surface as failed queries too.
                if let Err(e) = connection.await {
                    tracing::debug!(source = %what, "connection closed: {}", e.as_db_error().map_or("transport", |d| d.message()));
                }
            });

            let ms = self.statement_timeout.as_millis();
            if let Err(e) = self.statement(deadline, &client, &tls, client.simple_query(&format!("SET statement_timeout = {ms}"))).await? {
                tracing::warn!(source = %self.what, "the server refused statement_timeout ({}); only the operator's deadline applies", redact(&self.describe_error(&e), &self.secrets(), REDACT_MIN_LEN));
            }
            self.statement(deadline, &client, &tls, client.batch_execute("START TRANSACTION READ ONLY")).await?.map_err(|e| self.query_error(&e))?;
            let declare = format!("{DECLARE}{}", self.query);
            self.statement(deadline, &client, &tls, client.execute(declare.as_str(), &[])).await?.map_err(|e| self.query_error(&e))?;

            let fetch = format!("FETCH FORWARD {} FROM {CURSOR}", self.fetch_size);
            let mut plan: Option<ColumnPlan> = None;
            let mut read = 0u64;
            loop {
                let rows = self.statement(deadline, &client, &tls, client.simple_query_raw(&fetch)).await?;
                let rows = rows.map_err(|e| self.query_error(&e))?;
                let mut rows = std::pin::pin!(rows);
                let mut batch = BatchBuilder::default();
                let before = read;
                while let Some(message) = self.statement(deadline, &client, &tls, rows.next()).await? {
                    match message.map_err(|e| self.query_error(&e))? {
                        SimpleQueryMessage::RowDescription(columns) if plan.is_none() => {
                            plan = Some(self.column_plan(&columns)?);
                        }
                        SimpleQueryMessage::Row(row) => {
                            read += 1;
                            let plan = plan.as_ref().ok_or_else(|| SourceError::Query {
                                what: self.what.clone(),
                                message: "the server sent rows without describing their columns".to_owned(),
                            })?;
                            self.check_row_size(&row, read)?;
                            batch.push(self.fields.resolve_columns(plan, |i| match row.try_get(i) {
                                Ok(Some(text)) => Value::text(text),
                                Ok(None) => Value::Null,
                                // A database in SQL_ASCII can hold bytes that are not UTF-8.
                                Err(_) => Value::Rejected(SkipReason::InvalidUtf8),
                            }));
                            if batch.rows() as usize >= BATCH_ROWS {
                                yield batch.take();
                            }
                        }
                        _ => {}
                    }
                }
                if !batch.is_empty() {
                    yield batch.take();
                }
                // Only an empty FETCH ends the cursor: a short one may be a server's cap.
                if read == before {
                    break;
                }
            }
            self.statement(deadline, &client, &tls, client.batch_execute("COMMIT")).await?.map_err(|e| self.query_error(&e))?;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IdentifierMapping, SecretKeyRef};

    fn spec(query: &str) -> PostgresSource {
        PostgresSource {
            connection_secret_ref: SecretKeyRef { name: "wh".into(), key: "url".into() },
            query: query.into(),
            statement_timeout_seconds: 30,
            fetch_size: 100,
            max_row_bytes: 1 << 20,
        }
    }

    fn fields() -> IdentifierFields {
        IdentifierFields::from_mapping(&IdentifierMapping { external_id: Some("uid".into()), ..Default::default() })
            .unwrap()
    }

    #[test]
    fn a_bad_url_is_a_config_error_without_the_url() {
        let url = SecretString::new("postgres://u:hunter22@h:notaport/db");
        let err = PostgresMembers::new("pg".into(), url, &spec("SELECT 1"), fields()).unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(!err.to_string().contains("hunter22"), "{err}");
    }

    #[test]
    fn trailing_semicolons_are_dropped() {
        let url = SecretString::new("postgres://u@h/db");
        let source = PostgresMembers::new("pg".into(), url, &spec(" SELECT 1 AS uid ;\n"), fields()).unwrap();
        assert_eq!(source.query, "SELECT 1 AS uid");
        assert!(!format!("{source:?}").contains("postgres://"));
    }
}
