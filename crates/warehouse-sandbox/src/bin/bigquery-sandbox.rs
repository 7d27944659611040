//! `bigquery-sandbox`: serve the local BigQuery stand-in (token endpoint, metadata server,
//! jobs.query / getQueryResults) over a PostgreSQL database, for the demo and benchmarks.
//!
//! It makes a service account with a fresh RSA key and writes that account's key file
//! (its `token_uri` pointing here) to `--write-key`, ready to go into a Secret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use warehouse_sandbox::bigquery::oauth::TestServiceAccount;
use warehouse_sandbox::bigquery::{BigQueryConfig, RunningBigQuery};

#[derive(Parser)]
#[command(name = "bigquery-sandbox", version)]
/// A local stand-in for BigQuery's REST API and Google's token endpoints.
struct Cli {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:4020")]
    listen: SocketAddr,
    /// Where queries run, `postgres://…`.
    #[arg(long)]
    postgres_url: String,
    /// The project jobs run in.
    #[arg(long, default_value = "demo-analytics")]
    project: String,
    /// Where jobs run, e.g. `EU` or `europe-west1`.
    #[arg(long, default_value = "EU")]
    location: String,
    /// The service account whose key is made.
    #[arg(long, default_value = "cohort-reader@demo-analytics.iam.gserviceaccount.com")]
    account: String,
    /// Write that account's key file here.
    #[arg(long)]
    write_key: PathBuf,
    /// Also serve metadata-server tokens for this account (Workload Identity).
    #[arg(long)]
    metadata_identity: bool,
    /// Lifetime of issued access tokens.
    #[arg(long, default_value_t = 3600)]
    token_lifetime_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let cli = Cli::parse();
    let account = TestServiceAccount::generate(&cli.account);
    let mut config = BigQueryConfig::new(&cli.postgres_url, &cli.project, &cli.location);
    config.accounts.push(account.registered());
    config.metadata_identity = cli.metadata_identity.then(|| cli.account.clone());
    config.token_lifetime = Duration::from_secs(cli.token_lifetime_seconds);
    let running = RunningBigQuery::start(config, cli.listen).await.context("cannot listen")?;
    std::fs::write(&cli.write_key, running.key_json(&account)).context("cannot write the key file")?;
    eprintln!("bigquery-sandbox: serving project {} ({}) at {}", cli.project, cli.location, running.url());
    running.wait().await;
    Ok(())
}
