//! `cohort-operator run`: the controller's flags turned into its configuration and its
//! parts (clients, Braze budget, notifiers, importer, trigger port), then the controller
//! until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::args::{ControllerArgs, EgressDefaultArg, LogFormat, SnapshotStoreArg};
use crate::braze::{BrazeClient, BrazeClientConfig, BudgetConfig, Budgets};
use crate::controller::clock::SystemClock;
use crate::controller::kube_api::{self, ApiLimits};
use crate::controller::leader::LeaderElection;
use crate::controller::metrics::Metrics;
use crate::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
use crate::controller::secrets::PartnerKeys;
use crate::controller::shard::{Shard, ShardFlags};
use crate::controller::{self, Config, Dependencies};
use crate::fence::{Fence, LeaseTiming};
use crate::net::egress::{DenyFlag, EgressDefault, EgressPolicy, EgressRule};
use crate::notify::{HttpConfig, HttpSender, Notifier, Notify, SmtpNotifier};
use crate::source::AmbientIdentity;

pub fn init_logging(format: LogFormat) {
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
pub async fn start_controller(mut args: ControllerArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    // Refused before anything starts: a budget the runs cannot fit would be exceeded.
    let sort_bytes = crate::run::budget::sort_bytes_within(args.memory_budget_mib << 20, args.max_concurrent_runs)
        .map_err(anyhow::Error::msg)?;
    crate::run::budget::set_sort_bytes(sort_bytes);
    let policies = Policies::from_args(&args)?;
    let shard = shard_of(&args)?;
    let metrics = Arc::new(Metrics::new());
    let clients = kube_clients(read_timeout(&args)?, &api_limits(&args, &metrics)?).await?;
    let KubeClients { controller: client, runs: run_client } = clients;
    let identity = args.identity.clone().unwrap_or_else(|| format!("{}-{:08x}", hostname(), rand::random::<u32>()));
    let leader_election = leader_election(&args, &client, &identity);
    // Closed whenever this replica does not hold its Lease with margin; never without election.
    let fence = match &leader_election {
        Some(e) => Fence::for_lease(format!("{}/{}", e.lease_namespace, e.lease_name)),
        None => Fence::unfenced(),
    };
    let notifier = notifier(&mut args, client.clone(), &policies)?;
    let braze = braze_client(&args, &metrics, &identity, &policies)?;
    let importer = importer(&mut args, run_client, braze, policies, &fence)?;
    let namespaces: Vec<String> =
        std::mem::take(&mut args.watch_namespaces).into_iter().filter(|n| !n.is_empty()).collect();
    let _triggers = serve_triggers(&args, &client, &namespaces, &metrics).await?;
    let destination_secret_namespace = args.destination_secret_namespace.clone();
    let config = Config {
        namespaces,
        leader_election,
        instance: Some(identity),
        shard,
        fence,
        destination_secret_namespace,
        ..config(args)
    };
    let deps = Dependencies { clock: Arc::new(SystemClock), importer, notifier, metrics };
    controller::serve(client, config, deps, shutdown_signal()).await?;
    Ok(())
}

/// Where sources, reports and Braze may connect, and whose imports may use the operator's
/// cloud identity.
struct Policies {
    egress: Arc<EgressPolicy>,
    /// The egress policy and `--notification-deny-cidr`.
    notifications: Arc<EgressPolicy>,
    ambient: AmbientIdentity,
}

impl Policies {
    fn from_args(args: &ControllerArgs) -> anyhow::Result<Self> {
        let default = match args.egress_default {
            EgressDefaultArg::Allow => EgressDefault::Allow,
            EgressDefaultArg::Deny => EgressDefault::Deny,
        };
        let egress = EgressPolicy::new(
            egress_rules("--egress-allow", &args.egress_allow)?,
            egress_rules("--egress-deny", &args.egress_deny)?,
            default,
        );
        tracing::info!(policy = %egress.summary(), "egress policy (sources, notifications and Braze)");
        let ambient = AmbientIdentity::from_list(&args.ambient_identity_namespaces).map_err(anyhow::Error::msg)?;
        let denied = args.notification_deny_cidrs.iter().map(|net| EgressRule::Net(net.trunc()));
        let notifications = Arc::new(egress.clone().with_deny(DenyFlag::NotificationDenyCidr, denied));
        Ok(Policies { egress: Arc::new(egress), notifications, ambient })
    }
}

fn shard_of(args: &ControllerArgs) -> anyhow::Result<Option<Shard>> {
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
    Ok(shard)
}

fn api_limits(args: &ControllerArgs, metrics: &Arc<Metrics>) -> anyhow::Result<kube_api::LimitLayer> {
    kube_api::LimitLayer::new(ApiLimits { qps: args.kube_api_qps, burst: args.kube_api_burst }, metrics.clone())
        .context("--kube-api-qps / --kube-api-burst")
}

/// The runs' API read timeout: with leader election, below the Lease's renew deadline.
fn read_timeout(args: &ControllerArgs) -> anyhow::Result<Duration> {
    if !args.leader_election {
        return Ok(API_READ_TIMEOUT);
    }
    let timing = LeaseTiming::new(
        Duration::from_secs(args.lease_duration_seconds),
        Duration::from_secs(args.lease_renew_grace_seconds),
    )
    .map_err(|e| anyhow::anyhow!("--lease-duration-seconds / --lease-renew-grace-seconds: {e}"))?;
    Ok(timing.api_read_timeout())
}

fn notifier(
    args: &mut ControllerArgs,
    client: kube::Client,
    policies: &Policies,
) -> anyhow::Result<Option<Arc<dyn Notify>>> {
    let smtp = match std::mem::take(&mut args.smtp).into_config()? {
        Some(config) => Some(SmtpNotifier::new(config)?),
        None => None,
    };
    let http = HttpSender::new(HttpConfig { policy: policies.notifications.clone(), ..HttpConfig::default() })?;
    Ok(Some(Arc::new(Notifier::new(client, smtp, http).with_pagerduty_url(&args.pagerduty_events_url))))
}

fn braze_client(
    args: &ControllerArgs,
    metrics: &Arc<Metrics>,
    identity: &str,
    policies: &Policies,
) -> anyhow::Result<BrazeClient> {
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
    let config = BrazeClientConfig {
        instance: Some(identity.to_owned()),
        egress: policies.egress.clone(),
        ..BrazeClientConfig::default()
    };
    Ok(BrazeClient::new(config)?.with_budgets(budgets))
}

fn importer(
    args: &mut ControllerArgs,
    run_client: kube::Client,
    braze: BrazeClient,
    policies: Policies,
    fence: &Fence,
) -> anyhow::Result<Arc<PipelineImporter>> {
    let snapshots = match args.snapshot_store {
        SnapshotStoreArg::Cluster => SnapshotStoreKind::Cluster,
        SnapshotStoreArg::Filesystem => SnapshotStoreKind::Filesystem(
            args.snapshot_dir.take().context("--snapshot-dir is required with --snapshot-store=filesystem")?,
        ),
    };
    let scratch = args.scratch_dir.take().unwrap_or_else(std::env::temp_dir);
    Ok(Arc::new(
        PipelineImporter::new(run_client, braze, snapshots, scratch)
            .with_egress(policies.egress)
            .with_ambient_identity(policies.ambient)
            .with_max_page_bytes(args.max_source_page_bytes)
            .with_fence(fence.clone()),
    ))
}

fn leader_election(args: &ControllerArgs, client: &kube::Client, identity: &str) -> Option<LeaderElection> {
    args.leader_election.then(|| {
        LeaderElection {
            lease_name: args.lease_name.clone(),
            lease_namespace: args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned()),
            identity: identity.to_owned(),
            lease_duration_seconds: args.lease_duration_seconds,
            renew_grace_seconds: args.lease_renew_grace_seconds,
        }
        .for_shard(args.shard.as_deref())
    })
}

/// The CohortTrigger port, when `--trigger-addr` is set; stopped when the result is dropped.
async fn serve_triggers(
    args: &ControllerArgs,
    client: &kube::Client,
    namespaces: &[String],
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<AbortOnDrop>> {
    let Some(addr) = args.trigger_addr else { return Ok(None) };
    let (bound, task) = crate::trigger::serve(client.clone(), namespaces.to_vec(), addr, metrics.clone())
        .await
        .with_context(|| format!("--trigger-addr {addr}"))?;
    tracing::info!(%bound, "serving CohortTrigger webhooks");
    Ok(Some(AbortOnDrop(task)))
}

/// The rest of the controller's configuration, straight from its flags.
fn config(args: ControllerArgs) -> Config {
    Config {
        starting_deadline: jiff::SignedDuration::from_secs(args.starting_deadline_seconds as i64),
        max_run_attempts: args.max_run_attempts,
        run_timeout: Duration::from_secs(args.run_timeout_seconds),
        limits: crate::domain::validate::Limits {
            min_cron_interval: jiff::SignedDuration::from_mins(i64::from(args.min_cron_interval_minutes)),
        },
        partner_keys: PartnerKeys {
            dir: args.partner_keys_dir,
            extra_endpoints: args.braze_endpoint_regions.into_iter().collect(),
        },
        metrics_addr: Some(args.metrics_addr),
        max_concurrent_runs: args.max_concurrent_runs,
        max_concurrent_runs_per_namespace: args.max_concurrent_runs_per_namespace,
        watch_secrets: args.watch_secrets,
        ..Config::default()
    }
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
async fn kube_clients(read_timeout: Duration, limits: &kube_api::LimitLayer) -> anyhow::Result<KubeClients> {
    let mut config = kube::Config::infer().await.context("reading the Kubernetes client configuration")?;
    config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    // Both clients share one --kube-api-qps limit: it is the pod's.
    let controller = kube_api::with_layer(config.clone(), limits).context("connecting to the Kubernetes API")?;
    config.read_timeout = Some(read_timeout);
    // The timeout counts from each request, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    let runs = kube_api::with_layer(config, limits).context("connecting to the Kubernetes API")?;
    Ok(KubeClients { controller, runs })
}

/// The operator's Kubernetes clients, under one limit.
struct KubeClients {
    /// Reconciles, watches, status, Events, Leases.
    controller: kube::Client,
    /// Runs' snapshot reads and writes, with a read timeout below the Lease's deadline.
    runs: kube::Client,
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
