//! `braze-sandbox`: serve a local Braze for the partner cohort import endpoints, or
//! measure its capacity (`braze-sandbox bench`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use braze_sandbox::bench::{self, BenchConfig};
use braze_sandbox::seed::{generated_users, parse_user_spec, read_users_file};
use braze_sandbox::{DataImportKey, Faults, Partner, RateLimit, RestApiKey, Sandbox, SandboxConfig};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "braze-sandbox", version, args_conflicts_with_subcommands = true)]
/// A local stand-in for Braze's partner cohort import API (see the crate's README.md).
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Measure requests/s and ids/s with 1,000-id bodies.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (loopback unless you mean otherwise).
    #[arg(long, default_value = "127.0.0.1:4010", env = "BRAZE_SANDBOX_LISTEN")]
    listen: SocketAddr,
    /// A partner and its API key, `NAME=KEY`; repeat for several (or US and EU keys).
    #[arg(long = "partner", value_name = "NAME=KEY", required = true)]
    partners: Vec<String>,
    /// A data import key, optionally limited to partners: `KEY` or `KEY=partner1,partner2`.
    #[arg(long = "data-import-key", value_name = "KEY[=PARTNERS]", required = true)]
    data_import_keys: Vec<String>,
    /// A REST API key `/users/track` accepts (with the `users.track` permission); repeat
    /// for several.
    #[arg(long = "rest-api-key", value_name = "KEY")]
    rest_api_keys: Vec<String>,
    /// Users file: JSON array of users, or CSV (`.csv`) with external_id, alias_name,
    /// alias_label, device_id columns.
    #[arg(long)]
    users: Option<PathBuf>,
    /// One user, e.g. `external_id:u1,device_id:d1` or `alias_name:n,alias_label:l`.
    #[arg(long = "user", value_name = "SPEC")]
    user_specs: Vec<String>,
    /// Also seed N identified users `user-0` … `user-{N-1}`.
    #[arg(long, default_value_t = 0)]
    generated_users: u32,
    /// Keep cohorts and users in this JSON file across restarts.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Faults at start, as the JSON `PUT /sandbox/faults` takes.
    #[arg(long, value_name = "JSON")]
    faults: Option<String>,
    /// Rate limit: `REQUESTS/SECONDS`, e.g. `100/1`.
    #[arg(long, value_name = "N/SECS")]
    rate_limit: Option<String>,
    /// Probability of a 5xx answer.
    #[arg(long, default_value_t = 0.0)]
    server_error_rate: f64,
    /// Probability of a 423 answer.
    #[arg(long, default_value_t = 0.0)]
    locked_rate: f64,
    /// Probability of dropping the connection without answering.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Latency added to every Braze answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// A running sandbox to measure (loopback only); default: start one in this process.
    #[arg(long)]
    url: Option<String>,
    /// With --url: the partner and keys it was started with.
    #[arg(long, default_value = "bench")]
    partner: String,
    #[arg(long, default_value = "bench-partner-key")]
    partner_api_key: String,
    #[arg(long, default_value = "bench-import-key")]
    data_import_key: String,
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Upper bound on the run, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Users seeded in the in-process sandbox.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "braze_sandbox=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Bench(args)) => {
            let result = bench::run(&BenchConfig {
                url: args.url,
                partner: args.partner,
                partner_api_key: args.partner_api_key,
                data_import_key: args.data_import_key,
                requests: args.requests,
                max_duration: Duration::from_secs(args.seconds),
                concurrency: args.concurrency,
                users: args.users,
            })
            .await?;
            println!("{result}");
            Ok(())
        }
        None => serve(cli.serve).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let partners = args
        .partners
        .iter()
        .map(|p| match p.split_once('=') {
            Some((name, key)) if !name.is_empty() && !key.is_empty() => {
                Ok(Partner { name: name.into(), api_key: key.into() })
            }
            _ => bail!("--partner takes NAME=KEY"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let data_import_keys = args
        .data_import_keys
        .iter()
        .map(|k| match k.split_once('=') {
            Some((key, partners)) => DataImportKey {
                key: key.into(),
                partners: partners.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect(),
            },
            None => DataImportKey { key: k.clone(), partners: vec![] },
        })
        .collect();
    let mut users = match &args.users {
        Some(path) => read_users_file(path)?,
        None => Vec::new(),
    };
    for spec in &args.user_specs {
        users.push(parse_user_spec(spec)?);
    }
    users.extend(generated_users("user-", args.generated_users));
    let mut faults: Faults = match &args.faults {
        Some(json) => serde_json::from_str(json).context("--faults")?,
        None => Faults::default(),
    };
    if let Some(limit) = &args.rate_limit {
        let (n, secs) = limit.split_once('/').context("--rate-limit takes REQUESTS/SECONDS")?;
        faults.rate_limit = Some(RateLimit {
            requests: n.parse().context("--rate-limit requests")?,
            window_ms: (secs.parse::<f64>().context("--rate-limit seconds")? * 1000.0) as u64,
            retry_after: false,
        });
    }
    faults.server_error_rate = faults.server_error_rate.max(args.server_error_rate);
    faults.locked_rate = faults.locked_rate.max(args.locked_rate);
    faults.drop_rate = faults.drop_rate.max(args.drop_rate);
    faults.latency_ms = faults.latency_ms.max(args.latency_ms);
    let sandbox = Sandbox::start(SandboxConfig {
        listen: args.listen,
        partners,
        data_import_keys,
        users,
        state_file: args.state,
        faults,
        rest_api_keys: args.rest_api_keys.iter().map(RestApiKey::users_track).collect(),
        ..SandboxConfig::default()
    })
    .await?;
    println!("braze-sandbox listening on {} ({} users)", sandbox.url(), sandbox.user_count());
    shutdown_signal().await;
    sandbox.shutdown().await.context("saving the state file")?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
