//! `cohort-operator`: the controller (`run`), the CRD (`crd`), and the commands people use
//! on imports (`trigger`, `history`, `suspend`, `resume`, `approve`, `preview`). Installed as
//! `kubectl-cohort`, the same binary is a kubectl plugin: `kubectl cohort trigger NAME -n NS`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use cohort_operator::braze::{BrazeClient, BrazeClientConfig, BudgetConfig, Budgets};
use cohort_operator::cli::{self, Target};
use cohort_operator::controller::clock::SystemClock;
use cohort_operator::controller::kube_api::{self, ApiLimits};
use cohort_operator::controller::leader::LeaderElection;
use cohort_operator::controller::metrics::Metrics;
use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use cohort_operator::controller::secrets::{PartnerKeys, parse_endpoint_region};
use cohort_operator::controller::shard::{Shard, ShardFlags};
use cohort_operator::controller::{self, Config, Dependencies};
use cohort_operator::fence::{Fence, LeaseTiming};
use cohort_operator::net::egress::{DenyFlag, EgressDefault, EgressPolicy, EgressRule};
use cohort_operator::notify::{HttpConfig, HttpSender, Notifier, Notify, SmtpArgs, SmtpNotifier};
use cohort_operator::source::AmbientIdentity;
use cohort_operator::source::warehouse;

/// Keeps analytics cohorts imported into Braze.
#[derive(Parser)]
#[command(name = "cohort-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: watch CohortImports and run their imports on schedule.
    // The command stays `run` (the chart and users call `cohort-operator run`); in the code
    // it is the controller, so it is not mistaken for an import run.
    #[command(name = "run")]
    Controller(Box<ControllerArgs>),
    /// Print a CustomResourceDefinition as YAML (CohortImport unless --kind says otherwise).
    Crd {
        /// Which CRD.
        #[arg(long, value_enum, default_value = "cohort-import")]
        kind: CrdKind,
        /// Print the field reference of both CRDs (Markdown) instead, as in docs/reference.md.
        #[arg(long)]
        reference: bool,
    },
    /// Run an import once, now (sets the cohorts.dev/run-requested-at annotation).
    Trigger {
        name: String,
        /// Wait for the run to finish and print its result.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Show an import's run history, newest first.
    History {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop an import's future runs (a run in progress finishes).
    Suspend {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Let a suspended import run again, from its next scheduled time.
    Resume {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Let a run blocked by the removal guard go ahead (runs the import again, approved).
    Approve {
        name: String,
        /// The blocked run's id (see `history`).
        run_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// After a run blocked because the snapshot was missing (SnapshotMissing): send the whole
    /// source to Braze as additions. Members who left while the snapshot was lost stay in
    /// the Braze cohort; set a new spec.cohort.id instead for an exact one.
    Resync {
        name: String,
        /// The blocked run's id; by default the one status names (`snapshotMissingRun`).
        run_id: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List the cohort snapshots kept as ConfigMaps, with the import holding each; those
    /// released by an import deleted with deletionPolicy Retain wait for an import of the
    /// same cohort.
    Snapshots {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show what the next run would do — counts, the removal guard's verdict, a sample of
    /// adds and removes — reading the source and the snapshot only: nothing is sent to Braze
    /// and nothing is written.
    Preview(Box<PreviewArgs>),
    /// Print this binary's version and the CohortImport API version it serves.
    Version,
}

#[derive(clap::Args)]
struct PreviewArgs {
    /// The applied CohortImport to preview.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    name: Option<String>,
    /// A CohortImport manifest, applied or not (`-` for standard input); checked as the
    /// controller checks it, and diffed against the snapshot of the import of its name.
    #[arg(short = 'f', long = "filename")]
    file: Option<PathBuf>,
    /// Ids listed per direction (at most 1000).
    #[arg(long, default_value_t = 10)]
    sample: usize,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: PreviewOutput,
    /// Scratch space for sorting a large cohort; the system temporary directory when unset.
    #[arg(long, env = "COHORT_SCRATCH_DIR")]
    scratch_dir: Option<PathBuf>,
    #[command(flatten)]
    target: Target,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CrdKind {
    CohortImport,
    CohortTrigger,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PreviewOutput {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SnapshotStoreArg {
    /// ConfigMaps in each import's namespace, one snapshot per Braze cohort.
    Cluster,
    /// One file per Braze cohort under --snapshot-dir.
    Filesystem,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EgressDefaultArg {
    /// Destinations no rule names are allowed (in-cluster services, private warehouses).
    Allow,
    /// Only what --egress-allow names.
    Deny,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Namespaces to watch, comma-separated; all when unset.
    #[arg(long, env = "COHORT_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "COHORT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address of the CohortTrigger webhooks (`POST /hook/...`), e.g. 0.0.0.0:9292; not
    /// served when unset. Every replica serves it.
    #[arg(long, env = "COHORT_TRIGGER_ADDR")]
    trigger_addr: Option<SocketAddr>,
    /// A scheduled run found this many seconds late (the operator was down) is recorded
    /// as missed instead of run.
    #[arg(long, env = "COHORT_STARTING_DEADLINE_SECONDS", default_value_t = 3600)]
    starting_deadline_seconds: u64,
    /// Times a run may start: one interrupted this often (e.g. the operator crashing on it)
    /// is not run again but recorded as Failed.
    #[arg(
        long,
        env = "COHORT_MAX_RUN_ATTEMPTS",
        default_value_t = 3,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_run_attempts: u32,
    /// Longest a run may take, in seconds, unless its spec.runTimeoutSeconds says otherwise;
    /// a run still going then ends Failed.
    #[arg(
        long,
        env = "COHORT_RUN_TIMEOUT_SECONDS",
        default_value_t = 21600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    run_timeout_seconds: u64,
    /// Shortest time between two runs of a `cadence: Cron` schedule, in minutes (1 to
    /// 1440); an expression that runs more often is refused as InvalidSpec.
    #[arg(
        long,
        env = "COHORT_MIN_CRON_INTERVAL_MINUTES",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=1440)
    )]
    min_cron_interval_minutes: u32,
    /// Directory of partner API keys, one file per Braze region (`us`, `eu`, `au`).
    #[arg(long, env = "COHORT_PARTNER_KEYS_DIR")]
    partner_keys_dir: Option<PathBuf>,
    /// A REST endpoint beyond Braze's list and its region, `URL=REGION`; repeatable.
    #[arg(long = "braze-endpoint-region", env = "COHORT_BRAZE_ENDPOINT_REGIONS", value_delimiter = ',', value_parser = parse_endpoint_region)]
    braze_endpoint_regions: Vec<(String, String)>,
    #[arg(long, env = "COHORT_SNAPSHOT_STORE", value_enum, default_value = "cluster")]
    snapshot_store: SnapshotStoreArg,
    /// Directory of the filesystem snapshot store.
    #[arg(long, env = "COHORT_SNAPSHOT_DIR", required_if_eq("snapshot_store", "filesystem"))]
    snapshot_dir: Option<PathBuf>,
    /// Scratch space for sorting cohorts; the system temporary directory when unset.
    #[arg(long, env = "COHORT_SCRATCH_DIR")]
    scratch_dir: Option<PathBuf>,
    /// Runs at once across all imports.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_RUNS", default_value_t = 16)]
    max_concurrent_runs: usize,
    /// Memory the operator may use in all, in MiB: split between the runs at once (each
    /// run's sort buffer is what is left of its share). Keep it under the pod's limit.
    #[arg(long, env = "COHORT_MEMORY_BUDGET_MIB", default_value_t = 384)]
    memory_budget_mib: usize,
    /// Braze requests per hour per destination (REST endpoint + partner + workspace),
    /// shared by every run of this process; Braze documents 250,000. Imports by attribute
    /// (`/users/track`) use that endpoint's own documented limit instead.
    #[arg(long, env = "COHORT_BRAZE_REQUESTS_PER_HOUR", default_value_t = 250_000)]
    braze_requests_per_hour: u32,
    /// Braze requests a destination may send at once after a quiet spell; by default the
    /// hour's budget, as Braze counts per hour.
    #[arg(long, env = "COHORT_BRAZE_BURST", default_value_t = 250_000)]
    braze_burst: u32,
    /// Longest one Braze request waits for its destination's budget before its run stops
    /// (the next run sends the rest).
    #[arg(long, env = "COHORT_BRAZE_MAX_BUDGET_WAIT_SECONDS", default_value_t = 3600)]
    braze_max_budget_wait_seconds: u64,
    /// Runs at once in one namespace (under --max-concurrent-runs): one team's slow imports
    /// never take every slot.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_RUNS_PER_NAMESPACE", default_value_t = 4)]
    max_concurrent_runs_per_namespace: usize,
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Run only while holding a Lease, so that replicas never run imports together.
    #[arg(long, env = "COHORT_LEADER_ELECTION")]
    leader_election: bool,
    #[arg(long, env = "COHORT_LEASE_NAME", default_value = "cohort-operator")]
    lease_name: String,
    /// Namespace of the Lease; the kubeconfig's namespace when unset.
    #[arg(long, env = "COHORT_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the Lease stays valid after a renewal; another replica may lead after that.
    #[arg(long, env = "COHORT_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// The leader stops sending to Braze and writing snapshots this long before its Lease
    /// could expire (clock skew between replicas, a request in flight); below the duration.
    #[arg(long, env = "COHORT_LEASE_RENEW_GRACE_SECONDS", default_value_t = 5)]
    lease_renew_grace_seconds: u64,
    /// Source and notification destinations to allow, comma-separated or repeated: a CIDR, an address, a host
    /// name or `*.domain`. Lifts the built-in denial of link-local and metadata addresses for
    /// what it names.
    #[arg(long = "egress-allow", env = "COHORT_EGRESS_ALLOW", value_delimiter = ',')]
    egress_allow: Vec<String>,
    /// Source and notification destinations to refuse, as --egress-allow; a deny rule always wins.
    #[arg(long = "egress-deny", env = "COHORT_EGRESS_DENY", value_delimiter = ',')]
    egress_deny: Vec<String>,
    /// What happens to a source or notification destination no rule names.
    #[arg(long, env = "COHORT_EGRESS_DEFAULT", value_enum, default_value = "allow")]
    egress_default: EgressDefaultArg,
    /// Namespaces whose imports may use the operator's own cloud identity (a BigQuery source
    /// without a key uses GKE Workload Identity), comma-separated, or `*` for all. Empty (the
    /// default): none; such imports are refused, saying what to set.
    #[arg(long = "ambient-identity-namespaces", env = "COHORT_AMBIENT_IDENTITY_NAMESPACES", value_delimiter = ',')]
    ambient_identity_namespaces: Vec<String>,
    /// Largest body of one warehouse page (a Snowflake partition, a Databricks chunk, a
    /// BigQuery page), in bytes after decompression; a spec's own cap only lowers it.
    #[arg(
        long,
        env = "COHORT_MAX_SOURCE_PAGE_BYTES",
        default_value_t = warehouse::DEFAULT_MAX_PAGE_BYTES,
        value_parser = clap::value_parser!(u64).range(1024..=warehouse::MAX_PAGE_BYTES_CEILING)
    )]
    max_source_page_bytes: u64,
    /// Watch Secrets (list, watch) to notice at once when a missing one appears. With
    /// false, Secrets are only read by name: at each run, and every few seconds while an
    /// import is SecretNotFound (for RBAC that grants `get` alone).
    #[arg(long, env = "COHORT_WATCH_SECRETS", default_value_t = true, action = clap::ArgAction::Set)]
    watch_secrets: bool,
    /// This operator's shard: it owns the imports labelled `cohorts.dev/shard=<shard>`, and
    /// elects its leader on the Lease `<lease-name>-<shard>`.
    #[arg(long, env = "COHORT_SHARD")]
    shard: Option<String>,
    /// This shard also owns imports without the label, or whose label names no shard in
    /// --shards. Exactly one shard of an installation should be the default.
    #[arg(long, env = "COHORT_SHARD_DEFAULT")]
    shard_default: bool,
    /// Every shard of the installation, comma-separated (needed by the default shard).
    #[arg(long, env = "COHORT_SHARDS", value_delimiter = ',')]
    shards: Vec<String>,
    /// Only imports matching this label selector (ANDed with --shard), e.g.
    /// `cohorts.dev/shard=a` or `!cohorts.dev/shard` as with Flux's sharding.
    #[arg(long, env = "COHORT_WATCH_LABEL_SELECTOR")]
    watch_label_selector: Option<String>,
    /// Kubernetes API requests a second this operator sends, sustained (client-go's QPS);
    /// 0: no limit.
    #[arg(long, env = "COHORT_KUBE_API_QPS", default_value_t = ApiLimits::DEFAULT.qps)]
    kube_api_qps: f32,
    /// Kubernetes API requests it may send at once after a quiet spell (client-go's Burst).
    #[arg(long, env = "COHORT_KUBE_API_BURST", default_value_t = ApiLimits::DEFAULT.burst)]
    kube_api_burst: u32,
    #[command(flatten)]
    smtp: SmtpArgs,
    /// Networks Slack and webhook reports may not go to, beyond the egress policy's
    /// (`--egress-*`, which reports follow too); comma-separated CIDRs, e.g. 10.0.0.0/8.
    #[arg(long = "notification-deny-cidr", env = "COHORT_NOTIFICATION_DENY_CIDRS", value_delimiter = ',')]
    notification_deny_cidrs: Vec<ipnet::IpNet>,
    /// PagerDuty's Events API v2 endpoint for `spec.notifications.pagerduty`; for PagerDuty's
    /// EU service region, https://events.eu.pagerduty.com/v2/enqueue.
    #[arg(long, env = "COHORT_PAGERDUTY_EVENTS_URL", default_value = cohort_operator::notify::fanout::PAGERDUTY_EVENTS_URL)]
    pagerduty_events_url: String,
}

fn main() -> anyhow::Result<()> {
    // As a kubectl plugin the binary is `kubectl-cohort`; show that name in help.
    let invoked_as = std::env::args_os()
        .next()
        .and_then(|a| PathBuf::from(a).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut command = <Cli as clap::CommandFactory>::command();
    if invoked_as.starts_with("kubectl-cohort") {
        command = command.bin_name("kubectl cohort").name("kubectl-cohort");
    }
    let matches = command.get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd { reference: true, .. } => print!("{}", cohort_operator::api::reference::markdown()),
        Command::Crd { kind: CrdKind::CohortImport, .. } => print!("{}", cohort_operator::api::crd_yaml()),
        Command::Crd { kind: CrdKind::CohortTrigger, .. } => print!("{}", cohort_operator::api::trigger_crd_yaml()),
        Command::Controller(args) => start_controller(*args).await?,
        Command::Trigger { name, wait, timeout_seconds, target } => {
            let (client, namespace) = target.client().await?;
            let value = cli::trigger(client.clone(), &namespace, &name).await?;
            println!("cohortimport {namespace}/{name}: run requested ({value})");
            if wait {
                let record =
                    cli::wait_for_request(client, &namespace, &name, &value, Duration::from_secs(timeout_seconds))
                        .await?;
                if let Some(run) = record {
                    println!("run {}: {:?} {}", run.id, run.result, run.message);
                }
            }
        }
        Command::History { name, target } => {
            let (client, namespace) = target.client().await?;
            print!("{}", cli::history(client, &namespace, &name).await?);
        }
        Command::Suspend { name, target } => {
            let (client, namespace) = target.client().await?;
            cli::set_suspend(client, &namespace, &name, true).await?;
            println!("cohortimport {namespace}/{name} suspended");
        }
        Command::Resume { name, target } => {
            let (client, namespace) = target.client().await?;
            cli::set_suspend(client, &namespace, &name, false).await?;
            println!("cohortimport {namespace}/{name} resumed");
        }
        Command::Approve { name, run_id, target } => {
            let (client, namespace) = target.client().await?;
            cli::approve(client, &namespace, &name, &run_id).await?;
            println!("cohortimport {namespace}/{name}: removals of run {run_id} approved");
        }
        Command::Resync { name, run_id, target } => {
            let (client, namespace) = target.client().await?;
            let run_id = cli::resync(client, &namespace, &name, run_id.as_deref()).await?;
            println!(
                "cohortimport {namespace}/{name}: resync of run {run_id} approved; members who left while the \
                 snapshot was lost stay in the Braze cohort"
            );
        }
        Command::Snapshots { all_namespaces, target } => {
            let (client, namespace) = target.client().await?;
            print!("{}", cli::snapshots(client, (!all_namespaces).then_some(namespace.as_str())).await?);
        }
        Command::Preview(args) => preview(*args).await?,
        Command::Version => println!("{}", version_line()),
    }
    Ok(())
}

/// `cohort-operator 0.2.0 (API cohorts.dev/v1alpha1)`: what a bug report or the krew
/// manifest needs to know.
fn version_line() -> String {
    use kube::Resource as _;
    let api = cohort_operator::api::CohortImport::api_version(&());
    format!("cohort-operator {} (API {api})", env!("CARGO_PKG_VERSION"))
}

/// Prints a preview; exits non-zero when it could not be made or the source failed.
async fn preview(args: PreviewArgs) -> anyhow::Result<()> {
    let (client, namespace) = args.target.client().await?;
    let options = cli::preview::PreviewOptions {
        sample: args.sample,
        scratch_dir: args.scratch_dir.unwrap_or_else(std::env::temp_dir),
    };
    let preview = match (&args.file, &args.name) {
        (Some(file), _) => {
            cli::preview::preview_file(client, &namespace, args.target.namespace.is_some(), file, &options).await?
        }
        (None, Some(name)) => cli::preview::preview_named(client, &namespace, name, &options).await?,
        (None, None) => anyhow::bail!("name an import, or give a manifest with -f"),
    };
    match args.output {
        PreviewOutput::Text => print!("{}", preview.text()),
        PreviewOutput::Json => println!("{}", serde_json::to_string_pretty(&preview)?),
    }
    if !preview.ok() {
        std::process::exit(2);
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        // Span fields (run_id, namespace, import) go into every line of a run.
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.init(),
    }
}

/// `cohort-operator run`: the controller, until a shutdown signal.
async fn start_controller(args: ControllerArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    // Refused before anything starts: a budget the runs cannot fit would be exceeded.
    let sort_bytes =
        cohort_operator::run::budget::sort_bytes_within(args.memory_budget_mib << 20, args.max_concurrent_runs)
            .map_err(anyhow::Error::msg)?;
    cohort_operator::run::budget::set_sort_bytes(sort_bytes);
    let egress_default = match args.egress_default {
        EgressDefaultArg::Allow => EgressDefault::Allow,
        EgressDefaultArg::Deny => EgressDefault::Deny,
    };
    let egress = EgressPolicy::new(
        egress_rules("--egress-allow", &args.egress_allow)?,
        egress_rules("--egress-deny", &args.egress_deny)?,
        egress_default,
    );
    tracing::info!(policy = %egress.summary(), "egress policy (sources, notifications and Braze)");
    let ambient = AmbientIdentity::from_list(&args.ambient_identity_namespaces).map_err(anyhow::Error::msg)?;
    let egress = Arc::new(egress);
    let notification_deny = args.notification_deny_cidrs.iter().map(|net| EgressRule::Net(net.trunc()));
    let notification_egress =
        Arc::new(egress.as_ref().clone().with_deny(DenyFlag::NotificationDenyCidr, notification_deny));
    let shard = Shard::from_flags(&ShardFlags {
        shard: args.shard.clone(),
        shard_default: args.shard_default,
        shards: args.shards.iter().filter(|s| !s.is_empty()).cloned().collect(),
        watch_label_selector: args.watch_label_selector.clone(),
    })
    .map_err(anyhow::Error::msg)?;
    if shard.is_some() && !args.leader_election {
        anyhow::bail!(
            "--shard and --watch-label-selector need --leader-election: an import moved between shards hands \
             its run over through the old shard's Lease"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let limits =
        kube_api::LimitLayer::new(ApiLimits { qps: args.kube_api_qps, burst: args.kube_api_burst }, metrics.clone())
            .context("--kube-api-qps / --kube-api-burst")?;
    let read_timeout = if args.leader_election {
        LeaseTiming::new(
            Duration::from_secs(args.lease_duration_seconds),
            Duration::from_secs(args.lease_renew_grace_seconds),
        )
        .map_err(|e| anyhow::anyhow!("--lease-duration-seconds / --lease-renew-grace-seconds: {e}"))?
        .api_read_timeout()
    } else {
        API_READ_TIMEOUT
    };
    let (client, run_client) = kube_clients(read_timeout, &limits).await?;
    // Closed whenever this replica does not hold its Lease with margin; never without election.
    let fence = if args.leader_election { Fence::leased() } else { Fence::unfenced() };
    let smtp = match args.smtp.into_config()? {
        Some(config) => Some(SmtpNotifier::new(config)?),
        None => None,
    };
    let http = HttpSender::new(HttpConfig { policy: notification_egress, ..HttpConfig::default() })?;
    let notifier: Option<Arc<dyn Notify>> =
        Some(Arc::new(Notifier::new(client.clone(), smtp, http).with_pagerduty_url(&args.pagerduty_events_url)));
    let budget = BudgetConfig {
        requests_per_hour: args.braze_requests_per_hour,
        burst: args.braze_burst,
        max_wait: Duration::from_secs(args.braze_max_budget_wait_seconds),
        ..BudgetConfig::default()
    };
    budget.validate().map_err(anyhow::Error::msg)?;
    // Each shard sends to the same workspaces: it takes its share of every destination's budget.
    let budget = budget.shared_by(budget_shares(&args.shard, &args.shards)?);
    let budgets = Arc::new(Budgets::new(budget).with_observer(metrics.clone()));
    let identity = args.identity.clone().unwrap_or_else(|| format!("{}-{:08x}", hostname(), rand::random::<u32>()));
    let braze_config =
        BrazeClientConfig { instance: Some(identity.clone()), egress: egress.clone(), ..BrazeClientConfig::default() };
    let braze = BrazeClient::new(braze_config)?.with_budgets(budgets);
    let snapshots = match args.snapshot_store {
        SnapshotStoreArg::Cluster => SnapshotStoreKind::Cluster,
        SnapshotStoreArg::Filesystem => SnapshotStoreKind::Filesystem(
            args.snapshot_dir.context("--snapshot-dir is required with --snapshot-store=filesystem")?,
        ),
    };
    let scratch = args.scratch_dir.unwrap_or_else(std::env::temp_dir);
    let importer = Arc::new(
        PipelineImporter::new(run_client, braze, snapshots, scratch)
            .with_egress(egress)
            .with_ambient_identity(ambient)
            .with_max_page_bytes(args.max_source_page_bytes)
            .with_fence(fence.clone()),
    );
    let leader_election = args.leader_election.then(|| {
        LeaderElection {
            lease_name: args.lease_name.clone(),
            lease_namespace: args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned()),
            identity: identity.clone(),
            lease_duration_seconds: args.lease_duration_seconds,
            renew_grace_seconds: args.lease_renew_grace_seconds,
        }
        .for_shard(args.shard.as_deref())
    });
    let namespaces: Vec<String> = args.watch_namespaces.into_iter().filter(|n| !n.is_empty()).collect();
    let _triggers = match args.trigger_addr {
        Some(addr) => {
            let (bound, task) =
                cohort_operator::trigger::serve(client.clone(), namespaces.clone(), addr, metrics.clone())
                    .await
                    .with_context(|| format!("--trigger-addr {addr}"))?;
            tracing::info!(%bound, "serving CohortTrigger webhooks");
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let config = Config {
        namespaces,
        starting_deadline: jiff::SignedDuration::from_secs(args.starting_deadline_seconds as i64),
        max_run_attempts: args.max_run_attempts,
        run_timeout: Duration::from_secs(args.run_timeout_seconds),
        limits: cohort_operator::domain::validate::Limits {
            min_cron_interval: jiff::SignedDuration::from_mins(i64::from(args.min_cron_interval_minutes)),
        },
        partner_keys: PartnerKeys {
            dir: args.partner_keys_dir,
            extra_endpoints: args.braze_endpoint_regions.into_iter().collect(),
        },
        leader_election,
        metrics_addr: Some(args.metrics_addr),
        instance: Some(identity),
        max_concurrent_runs: args.max_concurrent_runs,
        max_concurrent_runs_per_namespace: args.max_concurrent_runs_per_namespace,
        watch_secrets: args.watch_secrets,
        shard,
        fence,
        ..Config::default()
    };
    let deps = Dependencies { clock: Arc::new(SystemClock), importer, notifier, metrics };
    controller::serve(client, config, deps, shutdown_signal()).await?;
    Ok(())
}

/// Stops a task when the controller returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How many operators share each Braze destination's budget: the shards in `--shards`.
fn budget_shares(shard: &Option<String>, shards: &[String]) -> anyhow::Result<usize> {
    let named = shards.iter().filter(|s| !s.is_empty()).count();
    match shard {
        None => Ok(1),
        Some(_) if named == 0 => anyhow::bail!(
            "--shard needs --shards naming every shard of the installation: each shard takes 1/N of each Braze \
             destination's budget (--braze-requests-per-hour, --braze-burst), so that together they stay within it"
        ),
        Some(_) => Ok(named),
    }
}

/// Connecting to the API server never hangs a run, a reconcile or a Lease renewal.
const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read timeout of the runs' API requests without leader election (no Lease to keep).
const API_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Two clients from the kubeconfig (or the pod's service account), both with a connect
/// timeout. The controller's has no read timeout: its watches sit idle for minutes, and
/// kube's watcher bounds them itself (an idle timeout past the server's 290 s watch timeout).
/// The runs' client (snapshot reads and writes, source objects) has `read_timeout`: with
/// leader election half of `lease duration − grace` ([`LeaseTiming::api_read_timeout`]),
/// below the renew deadline, so a request hanging on a dead connection fails — and the next
/// one opens a new connection — well before the fence would close. Lease renewals go through
/// the controller's client, each bounded by a timeout of its own
/// ([`LeaseTiming::renew_timeout`]), so a hanging renewal never hides a lost Lease.
async fn kube_clients(
    read_timeout: Duration,
    limits: &kube_api::LimitLayer,
) -> anyhow::Result<(kube::Client, kube::Client)> {
    let mut config = kube::Config::infer().await.context("reading the Kubernetes client configuration")?;
    config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    // Both clients share one --kube-api-qps limit: it is the pod's.
    let controller = kube_api::with_layer(config.clone(), limits).context("connecting to the Kubernetes API")?;
    config.read_timeout = Some(read_timeout);
    // The timeout counts from each request, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    let runs = kube_api::with_layer(config, limits).context("connecting to the Kubernetes API")?;
    Ok((controller, runs))
}

/// The rules of one `--egress-*` flag; empty items (an empty environment variable) are none.
fn egress_rules(flag: &str, values: &[String]) -> anyhow::Result<Vec<EgressRule>> {
    values
        .iter()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.parse::<EgressRule>().map_err(|e| anyhow::anyhow!("{flag}: {e}")))
        .collect()
}

fn hostname() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "cohort-operator".to_owned())
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
