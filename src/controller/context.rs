//! What every reconcile and run shares: the controller's [`Config`], its [`Dependencies`]
//! and the [`Context`] built from them. The context is a set of parts, each owning one
//! concern's state — the watched imports ([`Watched`]), hand-overs ([`Handover`]), status
//! writes ([`StatusWriter`]), telling people about a run's end ([`Reporter`]) — and a
//! function is given the part it uses, not the whole.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::SignedDuration;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::clock::Clock;
use super::events::Events;
use super::handover::Handover;
use super::importer::Importer;
use super::leader::LeaderElection;
use super::metrics::Metrics;
use super::record::Reporter;
use super::registry::RunRegistry;
use super::secrets::PartnerKeys;
use super::status::StatusWriter;
use super::watched::Watched;
use super::{admission, secrets, shard};
use crate::api::{CohortImport, CurrentRun, RunRunner};
use crate::domain::validate::Limits;
use crate::fence::Fence;
use crate::notify::Notify;

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// A scheduled run found later than this (the operator was down) is recorded as missed.
    pub starting_deadline: SignedDuration,
    pub partner_keys: PartnerKeys,
    /// `None`: run without leader election (a single replica).
    pub leader_election: Option<LeaderElection>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Names this replica in Events (e.g. the pod name).
    pub instance: Option<String>,
    /// Runs at once across all imports; more wait for a free slot.
    pub max_concurrent_runs: usize,
    /// Runs at once in one namespace, under `max_concurrent_runs`: one team's slow imports
    /// never take every slot.
    pub max_concurrent_runs_per_namespace: usize,
    /// Times a run may start: one interrupted this often (a crash loop) ends `Failed`.
    pub max_run_attempts: u32,
    /// Longest a run may take unless its `spec.runTimeoutSeconds` says otherwise.
    pub run_timeout: Duration,
    /// Longest a run report email may take.
    pub notification_timeout: Duration,
    /// Wait after a failed reconcile.
    pub error_requeue: Duration,
    /// Watch Secrets (by metadata) to reconcile an import when one it reads changes.
    /// `false` for RBAC that grants only `get`: see [`secret_recheck`].
    pub watch_secrets: bool,
    /// Without the watch, the longest wait between looks at a missing Secret.
    pub missing_secret_recheck: Duration,
    /// `None`: every import in the watched namespaces is ours (no sharding).
    pub shard: Option<shard::Shard>,
    /// With leader election, open only while this replica holds its Lease with margin
    /// ([`crate::fence`]); give the same [`Fence::leased`] to the importer's Braze client and
    /// snapshot store. The default never closes (a single replica).
    pub fence: Fence,
    /// Operator settings some spec rules depend on (`--min-cron-interval-minutes`).
    pub limits: Limits,
    /// The one namespace whose Secrets a ClusterBrazeDestination may name
    /// (`--destination-secret-namespace`); `None`: no cluster destination may name a Secret.
    pub destination_secret_namespace: Option<String>,
}

impl Config {
    /// This operator's shard (`--shard`), `""` without one: the shard label of its metrics.
    pub fn shard_name(&self) -> &str {
        self.shard.as_ref().and_then(|s| s.name.as_deref()).unwrap_or("")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespaces: Vec::new(),
            starting_deadline: SignedDuration::from_hours(1),
            partner_keys: PartnerKeys::default(),
            leader_election: None,
            metrics_addr: None,
            instance: None,
            max_concurrent_runs: 16,
            max_concurrent_runs_per_namespace: 4,
            max_run_attempts: 3,
            run_timeout: Duration::from_secs(6 * 3600),
            notification_timeout: Duration::from_secs(60),
            error_requeue: Duration::from_secs(10),
            watch_secrets: true,
            missing_secret_recheck: Duration::from_secs(30),
            shard: None,
            fence: Fence::unfenced(),
            limits: Limits::default(),
            destination_secret_namespace: None,
        }
    }
}

/// What the controller works with besides the API server.
#[derive(Clone)]
pub struct Dependencies {
    pub clock: Arc<dyn Clock>,
    pub importer: Arc<dyn Importer>,
    /// `None`: no SMTP server configured; imports asking for email get a status note.
    pub notifier: Option<Arc<dyn Notify>>,
    pub metrics: Arc<Metrics>,
}

/// Shared by every reconcile and run: the parts each room is given, and what the
/// reconcile itself reads.
pub struct Context {
    pub client: kube::Client,
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub importer: Arc<dyn Importer>,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub runs: Arc<RunRegistry>,
    /// The run slots (`max_concurrent_runs`, at most `max_concurrent_runs_per_namespace` of
    /// them per namespace), admitted round-robin by namespace.
    pub(super) admission: admission::Admission,
    /// The watched imports, their cohorts, conflicts, failed reconciles and wakers.
    pub watched: Watched,
    /// Which runner this replica is, and whether a run recorded elsewhere may resume here.
    pub handover: Handover,
    /// Writes status from the controller's copy of an import.
    pub status: StatusWriter,
    /// Tells people that a run ended: log, metrics, Events, the run report.
    pub reporter: Reporter,
    /// Imports that left this shard and whose run is being handed over.
    pub(super) releasing: Mutex<HashSet<ObjectRef<CohortImport>>>,
    /// Secret keys found present, until the Secret watch sees their Secret change.
    pub secret_checks: secrets::SecretChecks,
}

impl Context {
    /// Lets go of what this replica keeps about an import that is gone: its conflict, its
    /// failed reconciles and its per-import series. (Which run of it ended here is kept:
    /// a few bytes, and forgetting it for an import that is only out of sight for a moment
    /// could make a stale copy look like an interrupted run.)
    pub(super) fn forget(&self, import: &ObjectRef<CohortImport>) {
        self.watched.note_conflict(import, None);
        self.watched.note_reconcile(import, false);
        self.metrics.forget(import.namespace.as_deref().unwrap_or_default(), &import.name);
    }

    /// Called for every version of every import in the watched namespaces: an import that
    /// left this shard while this operator is its runner is let go — its run here stopped,
    /// then the runner cleared in status, so that its new shard resumes the run.
    pub(super) fn let_go_if_left(self: &Arc<Self>, import: &CohortImport) {
        let Some(me) = self.handover.runner() else { return };
        let runner = import.status.as_ref().and_then(|s| s.current_run.as_ref()).and_then(CurrentRun::runner);
        if self.handover.owns(import) || runner.as_ref() != Some(&me) {
            return;
        }
        let reference = ObjectRef::from_obj(import);
        if !self.releasing.lock().unwrap_or_else(|e| e.into_inner()).insert(reference.clone()) {
            return;
        }
        let (ctx, import) = (self.clone(), import.clone());
        self.runs.spawn_side(async move {
            ctx.let_go(&import, &me).await;
            ctx.releasing.lock().unwrap_or_else(|e| e.into_inner()).remove(&reference);
        });
    }

    async fn let_go(&self, import: &CohortImport, me: &RunRunner) {
        let reference = ObjectRef::from_obj(import);
        if self.runs.abort(&reference) {
            // Aborting is prompt (each task stops at its next await); the run is handed over
            // only once its tasks have stopped, however long that takes — said every minute.
            let mut next_warning = tokio::time::Instant::now() + Duration::from_secs(60);
            while self.runs.is_running(&reference) {
                if tokio::time::Instant::now() >= next_warning {
                    next_warning += Duration::from_secs(60);
                    warn!(namespace = ?reference.namespace, import = %reference.name, "a stopped run of an import that left this shard is still stopping; its hand-over waits for it");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let released = self
            .status
            .update(import, |status| match status.current_run.as_mut() {
                Some(run) if run.runner().as_ref() == Some(me) => {
                    run.set_runner(None);
                    true
                }
                _ => false,
            })
            .await;
        if released {
            let namespace = import.namespace().unwrap_or_default();
            info!(%namespace, import = %import.name_any(), "the import left this shard; its run is handed over");
        }
    }
}
