//! Hand-overs between shards and replicas, as the controller sees them: which runner this
//! replica is, whether a run recorded by another runner may be resumed here
//! ([`super::shard::handoff`] decides, from the runner's Lease), and letting go of the runs
//! of imports that left this shard.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use tracing::{info, warn};

use super::clock::Clock;
use super::leader::LeaderElection;
use super::shard::{Handoff, LeaseState, Shard, handoff};
use crate::api::{CohortImport, CurrentRun, RunRunner};

/// What hand-overs need: who this replica is (its shard, Lease and name), the API server
/// (the old runner's Lease, the import read afresh) and the clock.
pub struct Handover {
    pub(super) client: kube::Client,
    /// `None`: this operator does not shard, and nothing is handed over.
    pub(super) shard: Option<Shard>,
    pub(super) leader_election: Option<LeaderElection>,
    pub(super) instance: Option<String>,
    pub(super) clock: Arc<dyn Clock>,
}

impl Handover {
    /// How this operator signs the runs it starts; `None` when it does not shard.
    pub(super) fn runner(&self) -> Option<RunRunner> {
        let shard = self.shard.as_ref()?;
        let election = self.leader_election.as_ref();
        Some(RunRunner {
            shard: shard.label(),
            lease: election.map(|e| format!("{}/{}", e.lease_namespace, e.lease_name)),
            identity: election.map_or_else(|| self.instance.clone().unwrap_or_default(), |e| e.identity.clone()),
        })
    }

    /// Whether `import` belongs to this operator's shard (always, without sharding).
    pub fn owns(&self, import: &CohortImport) -> bool {
        self.shard.as_ref().is_none_or(|s| s.owns(import))
    }

    /// `Some(requeue)` when `run`, recorded in `import`'s status, may still be running on
    /// the shard the import came from: it is not resumed here yet.
    pub(super) async fn handoff_wait(&self, import: &CohortImport, run: &CurrentRun) -> Option<Action> {
        let me = self.runner()?;
        let runner = run.runner();
        let lease = match runner.as_ref().and_then(|r| r.lease.clone()) {
            Some(name) if runner.as_ref().is_some_and(|r| r.lease != me.lease) => read_lease(&self.client, &name).await,
            _ => LeaseState::Missing,
        };
        let now = self.clock.now();
        match handoff(runner.as_ref(), &me, || lease, now) {
            Handoff::Resume => None,
            Handoff::Wait { why, retry_at } => {
                let namespace = import.namespace().unwrap_or_default();
                info!(%namespace, import = %import.name_any(), run_id = %run.id, %why, "run not resumed yet");
                let wait = Duration::try_from(retry_at.duration_since(now)).unwrap_or(Duration::from_secs(1));
                Some(Action::requeue(wait.max(Duration::from_secs(1))))
            }
        }
    }

    /// Reads `import` afresh: whether it is still this shard's, with its current run still
    /// signed by this operator. Checked when a run starts, before it sends anything.
    pub(super) async fn still_runs_here(&self, import: &CohortImport, run_id: &str) -> bool {
        let Some(me) = self.runner() else { return true };
        let api: Api<CohortImport> = Api::namespaced(self.client.clone(), &import.namespace().unwrap_or_default());
        match api.get_opt(&import.name_any()).await {
            Ok(Some(fresh)) => {
                let current = fresh.status.as_ref().and_then(|s| s.current_run.as_ref());
                fresh.uid() == import.uid()
                    && self.owns(&fresh)
                    && current.is_some_and(|run| run.id == run_id && run.runner().as_ref() == Some(&me))
            }
            Ok(None) => false,
            Err(e) => {
                warn!(error = %e, "cannot read the import to confirm this shard still runs it; not starting the run");
                false
            }
        }
    }
}

async fn read_lease(client: &kube::Client, name: &str) -> LeaseState {
    let Some((namespace, name)) = name.split_once('/') else { return LeaseState::Missing };
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(None) => LeaseState::Missing,
        Ok(Some(lease)) => {
            let spec = lease.spec.unwrap_or_default();
            let expires =
                spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| {
                    t.0 + jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)))
                });
            LeaseState::Held { holder: spec.holder_identity, expires }
        }
        // Unknown: assume the old runner is alive, and look again soon.
        Err(e) => {
            warn!(error = %e, lease = %name, "cannot read the old shard's Lease");
            LeaseState::Unknown
        }
    }
}
