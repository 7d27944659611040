//! The command line's shape: every command, flag and environment variable (clap), in one
//! place; [`super::controller`] turns the controller's flags into its configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cli::Target;
use crate::controller::kube_api::ApiLimits;
use crate::controller::secrets::parse_endpoint_region;
use crate::notify::SmtpArgs;
use crate::source::warehouse;

/// Keeps analytics cohorts imported into Braze.
#[derive(Parser)]
#[command(name = "cohort-operator", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
pub struct PreviewArgs {
    /// The applied CohortImport to preview.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub name: Option<String>,
    /// A CohortImport manifest, applied or not (`-` for standard input); checked as the
    /// controller checks it, and diffed against the snapshot of the import of its name.
    #[arg(short = 'f', long = "filename")]
    pub file: Option<PathBuf>,
    /// Ids listed per direction (at most 1000).
    #[arg(long, default_value_t = 10)]
    pub sample: usize,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: PreviewOutput,
    /// Scratch space for sorting a large cohort; the system temporary directory when unset.
    #[arg(long, env = "COHORT_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CrdKind {
    CohortImport,
    CohortTrigger,
    BrazeDestination,
    ClusterBrazeDestination,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PreviewOutput {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SnapshotStoreArg {
    /// ConfigMaps in each import's namespace, one snapshot per Braze cohort.
    Cluster,
    /// One file per Braze cohort under --snapshot-dir.
    Filesystem,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EgressDefaultArg {
    /// Destinations no rule names are allowed (in-cluster services, private warehouses).
    Allow,
    /// Only what --egress-allow names.
    Deny,
}

#[derive(clap::Args)]
pub struct ControllerArgs {
    /// Namespaces to watch, comma-separated; all when unset.
    #[arg(long, env = "COHORT_WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "COHORT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of the CohortTrigger webhooks (`POST /hook/...`), e.g. 0.0.0.0:9292; not
    /// served when unset. Every replica serves it.
    #[arg(long, env = "COHORT_TRIGGER_ADDR")]
    pub trigger_addr: Option<SocketAddr>,
    /// A scheduled run found this many seconds late (the operator was down) is recorded
    /// as missed instead of run.
    #[arg(long, env = "COHORT_STARTING_DEADLINE_SECONDS", default_value_t = 3600)]
    pub starting_deadline_seconds: u64,
    /// Times a run may start: one interrupted this often (e.g. the operator crashing on it)
    /// is not run again but recorded as Failed.
    #[arg(
        long,
        env = "COHORT_MAX_RUN_ATTEMPTS",
        default_value_t = 3,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_run_attempts: u32,
    /// Longest a run may take, in seconds, unless its spec.runTimeoutSeconds says otherwise;
    /// a run still going then ends Failed.
    #[arg(
        long,
        env = "COHORT_RUN_TIMEOUT_SECONDS",
        default_value_t = 21600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub run_timeout_seconds: u64,
    /// Shortest time between two runs of a `cadence: Cron` schedule, in minutes (1 to
    /// 1440); an expression that runs more often is refused as InvalidSpec.
    #[arg(
        long,
        env = "COHORT_MIN_CRON_INTERVAL_MINUTES",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=1440)
    )]
    pub min_cron_interval_minutes: u32,
    /// Directory of partner API keys, one file per Braze region (`us`, `eu`, `au`).
    #[arg(long, env = "COHORT_PARTNER_KEYS_DIR")]
    pub partner_keys_dir: Option<PathBuf>,
    /// A REST endpoint beyond Braze's list and its region, `URL=REGION`; repeatable.
    #[arg(long = "braze-endpoint-region", env = "COHORT_BRAZE_ENDPOINT_REGIONS", value_delimiter = ',', value_parser = parse_endpoint_region)]
    pub braze_endpoint_regions: Vec<(String, String)>,
    #[arg(long, env = "COHORT_SNAPSHOT_STORE", value_enum, default_value = "cluster")]
    pub snapshot_store: SnapshotStoreArg,
    /// Directory of the filesystem snapshot store.
    #[arg(long, env = "COHORT_SNAPSHOT_DIR", required_if_eq("snapshot_store", "filesystem"))]
    pub snapshot_dir: Option<PathBuf>,
    /// Scratch space for sorting cohorts; the system temporary directory when unset.
    #[arg(long, env = "COHORT_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Runs at once across all imports.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_RUNS", default_value_t = 16)]
    pub max_concurrent_runs: usize,
    /// Memory the operator may use in all, in MiB: split between the runs at once (each
    /// run's sort buffer is what is left of its share). Keep it under the pod's limit.
    #[arg(long, env = "COHORT_MEMORY_BUDGET_MIB", default_value_t = 384)]
    pub memory_budget_mib: usize,
    /// Braze requests per hour per destination (REST endpoint + partner + workspace),
    /// shared by every run of this process; Braze documents 250,000. Imports by attribute
    /// (`/users/track`) use that endpoint's own documented limit instead.
    #[arg(long, env = "COHORT_BRAZE_REQUESTS_PER_HOUR", default_value_t = 250_000)]
    pub braze_requests_per_hour: u32,
    /// Braze requests a destination may send at once after a quiet spell; by default the
    /// hour's budget, as Braze counts per hour.
    #[arg(long, env = "COHORT_BRAZE_BURST", default_value_t = 250_000)]
    pub braze_burst: u32,
    /// Longest one Braze request waits for its destination's budget before its run stops
    /// (the next run sends the rest).
    #[arg(long, env = "COHORT_BRAZE_MAX_BUDGET_WAIT_SECONDS", default_value_t = 3600)]
    pub braze_max_budget_wait_seconds: u64,
    /// Runs at once in one namespace (under --max-concurrent-runs): one team's slow imports
    /// never take every slot.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_RUNS_PER_NAMESPACE", default_value_t = 4)]
    pub max_concurrent_runs_per_namespace: usize,
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Run only while holding a Lease, so that replicas never run imports together.
    #[arg(long, env = "COHORT_LEADER_ELECTION")]
    pub leader_election: bool,
    #[arg(long, env = "COHORT_LEASE_NAME", default_value = "cohort-operator")]
    pub lease_name: String,
    /// Namespace of the Lease; the kubeconfig's namespace when unset.
    #[arg(long, env = "COHORT_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Turns ClusterBrazeDestinations on: the one namespace whose Secrets they may name (each
    /// reference names it explicitly). Unset: off — none is watched or usable, and the
    /// operator needs no cluster-wide read of Namespaces. Keep tenants' workloads out of it.
    #[arg(long, env = "COHORT_DESTINATION_SECRET_NAMESPACE")]
    pub destination_secret_namespace: Option<String>,
    /// This replica's identity in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the Lease stays valid after a renewal; another replica may lead after that.
    #[arg(long, env = "COHORT_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// The leader stops sending to Braze and writing snapshots this long before its Lease
    /// could expire (clock skew between replicas, a request in flight); below the duration.
    #[arg(long, env = "COHORT_LEASE_RENEW_GRACE_SECONDS", default_value_t = 5)]
    pub lease_renew_grace_seconds: u64,
    /// Source and notification destinations to allow, comma-separated or repeated: a CIDR, an address, a host
    /// name or `*.domain`. Lifts the built-in denial of link-local and metadata addresses for
    /// what it names.
    #[arg(long = "egress-allow", env = "COHORT_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Vec<String>,
    /// Source and notification destinations to refuse, as --egress-allow; a deny rule always wins.
    #[arg(long = "egress-deny", env = "COHORT_EGRESS_DENY", value_delimiter = ',')]
    pub egress_deny: Vec<String>,
    /// What happens to a source or notification destination no rule names.
    #[arg(long, env = "COHORT_EGRESS_DEFAULT", value_enum, default_value = "allow")]
    pub egress_default: EgressDefaultArg,
    /// Namespaces whose imports may use the operator's own cloud identity (a BigQuery source
    /// without a key uses GKE Workload Identity), comma-separated, or `*` for all. Empty (the
    /// default): none; such imports are refused, saying what to set.
    #[arg(long = "ambient-identity-namespaces", env = "COHORT_AMBIENT_IDENTITY_NAMESPACES", value_delimiter = ',')]
    pub ambient_identity_namespaces: Vec<String>,
    /// Largest body of one warehouse page (a Snowflake partition, a Databricks chunk, a
    /// BigQuery page), in bytes after decompression; a spec's own cap only lowers it.
    #[arg(
        long,
        env = "COHORT_MAX_SOURCE_PAGE_BYTES",
        default_value_t = warehouse::DEFAULT_MAX_PAGE_BYTES,
        value_parser = clap::value_parser!(u64).range(1024..=warehouse::MAX_PAGE_BYTES_CEILING)
    )]
    pub max_source_page_bytes: u64,
    /// Watch Secrets (list, watch) to notice at once when a missing one appears. With
    /// false, Secrets are only read by name: at each run, and every few seconds while an
    /// import is SecretNotFound (for RBAC that grants `get` alone).
    #[arg(long, env = "COHORT_WATCH_SECRETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_secrets: bool,
    /// This operator's shard: it owns the imports labelled `cohorts.dev/shard=<shard>`, and
    /// elects its leader on the Lease `<lease-name>-<shard>`.
    #[arg(long, env = "COHORT_SHARD")]
    pub shard: Option<String>,
    /// This shard also owns imports without the label, or whose label names no shard in
    /// --shards. Exactly one shard of an installation should be the default.
    #[arg(long, env = "COHORT_SHARD_DEFAULT")]
    pub shard_default: bool,
    /// Every shard of the installation, comma-separated (needed by the default shard).
    #[arg(long, env = "COHORT_SHARDS", value_delimiter = ',')]
    pub shards: Vec<String>,
    /// Only imports matching this label selector (ANDed with --shard), e.g.
    /// `cohorts.dev/shard=a` or `!cohorts.dev/shard` as with Flux's sharding.
    #[arg(long, env = "COHORT_WATCH_LABEL_SELECTOR")]
    pub watch_label_selector: Option<String>,
    /// Kubernetes API requests a second this operator sends, sustained (client-go's QPS);
    /// 0: no limit.
    #[arg(long, env = "COHORT_KUBE_API_QPS", default_value_t = ApiLimits::DEFAULT.qps)]
    pub kube_api_qps: f32,
    /// Kubernetes API requests it may send at once after a quiet spell (client-go's Burst).
    #[arg(long, env = "COHORT_KUBE_API_BURST", default_value_t = ApiLimits::DEFAULT.burst)]
    pub kube_api_burst: u32,
    #[command(flatten)]
    pub smtp: SmtpArgs,
    /// Networks Slack and webhook reports may not go to, beyond the egress policy's
    /// (`--egress-*`, which reports follow too); comma-separated CIDRs, e.g. 10.0.0.0/8.
    #[arg(long = "notification-deny-cidr", env = "COHORT_NOTIFICATION_DENY_CIDRS", value_delimiter = ',')]
    pub notification_deny_cidrs: Vec<ipnet::IpNet>,
    /// PagerDuty's Events API v2 endpoint for `spec.notifications.pagerduty`; for PagerDuty's
    /// EU service region, https://events.eu.pagerduty.com/v2/enqueue.
    #[arg(long, env = "COHORT_PAGERDUTY_EVENTS_URL", default_value = crate::notify::fanout::PAGERDUTY_EVENTS_URL)]
    pub pagerduty_events_url: String,
}
