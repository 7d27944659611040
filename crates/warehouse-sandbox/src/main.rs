//! `warehouse-sandbox`: serve the Snowflake and Databricks stand-ins on loopback over a
//! PostgreSQL database (for the demo), or write a key pair for Snowflake key-pair auth.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use warehouse_sandbox::databricks::{DatabricksConfig, RunningDatabricks};
use warehouse_sandbox::keys::RsaKeyPair;
use warehouse_sandbox::snowflake::{RunningSnowflake, SnowflakeConfig};

#[derive(Parser)]
#[command(name = "warehouse-sandbox", version)]
/// Local stand-ins for warehouse SQL REST APIs, backed by PostgreSQL.
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the stand-ins until interrupted.
    Serve(Box<ServeArgs>),
    /// Write `rsa_key.p8` (PKCS#8 PEM) and `rsa_key.pub` (base64 DER, as ALTER USER … SET
    /// RSA_PUBLIC_KEY takes it) into a directory.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// PostgreSQL database the statements run on.
    #[arg(long)]
    database_url: String,
    /// Serve the Snowflake SQL API here.
    #[arg(long)]
    snowflake_listen: Option<SocketAddr>,
    /// The Snowflake account, as the JWT names it (e.g. MYORG-MYACCOUNT).
    #[arg(long, default_value = "DEMO-ACCOUNT")]
    snowflake_account: String,
    /// The Snowflake user (upper-case).
    #[arg(long, default_value = "COHORT_READER")]
    snowflake_user: String,
    /// File holding the user's RSA_PUBLIC_KEY (base64 DER), as `keygen` writes it.
    #[arg(long)]
    snowflake_public_key: Option<PathBuf>,
    /// Rows per result partition (Snowflake) or chunk (Databricks).
    #[arg(long, default_value_t = 10_000)]
    partition_rows: usize,
    /// Serve the Databricks workspace (Statement Execution API, OAuth token endpoint) here.
    #[arg(long)]
    databricks_listen: Option<SocketAddr>,
    /// The Databricks SQL warehouse id statements must name.
    #[arg(long, default_value = "8f2a9c0d1e3b4a56")]
    databricks_warehouse_id: String,
    /// A Databricks personal access token accepted; repeat for several.
    #[arg(long = "databricks-token")]
    databricks_tokens: Vec<String>,
    /// A Databricks OAuth client (service principal), `CLIENT_ID=CLIENT_SECRET`; repeat for several.
    #[arg(long = "databricks-client", value_name = "ID=SECRET")]
    databricks_clients: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match Cli::parse().command {
        Command::Keygen { out } => {
            let key = RsaKeyPair::generate();
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("rsa_key.p8"), key.private_key_pem())?;
            std::fs::write(out.join("rsa_key.pub"), key.rsa_public_key())?;
            println!("{}", key.fingerprint());
            Ok(())
        }
        Command::Serve(args) => serve(*args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut running = Vec::new();
    if let Some(listen) = args.snowflake_listen {
        let path = args.snowflake_public_key.context("--snowflake-public-key is required with --snowflake-listen")?;
        let public_key = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut config =
            SnowflakeConfig::new(&args.snowflake_account, &args.snowflake_user, &public_key, &args.database_url);
        config.partition_rows = args.partition_rows;
        let snowflake = RunningSnowflake::start_on(config, listen).await?;
        println!("snowflake: {}", snowflake.url());
        running.push(snowflake);
    }
    let mut workspaces = Vec::new();
    if let Some(listen) = args.databricks_listen {
        let mut config = DatabricksConfig::new(&args.database_url, &args.databricks_warehouse_id);
        config.tokens = args.databricks_tokens.clone();
        for client in &args.databricks_clients {
            let (id, secret) = client.split_once('=').context("--databricks-client takes ID=SECRET")?;
            config.clients.push((id.to_owned(), secret.to_owned()));
        }
        config.chunk_rows = args.partition_rows;
        let databricks = RunningDatabricks::start_on(config, listen).await?;
        println!("databricks: {}", databricks.url());
        workspaces.push(databricks);
    }
    anyhow::ensure!(
        !running.is_empty() || !workspaces.is_empty(),
        "nothing to serve: give --snowflake-listen or --databricks-listen"
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
