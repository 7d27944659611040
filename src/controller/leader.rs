//! Lease-based leader election (coordination.k8s.io/v1), through `kube-lease-manager`.
//!
//! Only the replica holding the Lease runs the controller; the others wait (`kube-lease-manager`
//! acquires the Lease). The holder renews it itself, several times per Lease duration, each
//! renewal bounded in time, and keeps the [`Fence`] open only until
//! `last successful renewal + duration − grace` ([`crate::fence`]): every Braze request and
//! snapshot write checks it. So a holder that cannot renew — it lost the Lease, or its
//! connection to the API server hangs — stops sending on its own clock, before another
//! replica can take the Lease; then it stops every run and returns. A replica that dies
//! simply stops renewing: another one takes the Lease once it has expired, finds the
//! interrupted runs in `.status.currentRun` and runs them (as a new attempt).

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tracing::{debug, info, warn};

use super::metrics::Metrics;
use crate::fence::{Fence, LeaseTiming};

/// Which Lease, and who we are.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub lease_name: String,
    pub lease_namespace: String,
    /// Unique among replicas, e.g. the pod name.
    pub identity: String,
    /// How long a Lease stays valid after its last renewal.
    pub lease_duration_seconds: u64,
    /// How long before its Lease can expire the holder stops sending (the fence closes);
    /// covers clock skew between replicas and a request in flight.
    pub renew_grace_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election on Lease {namespace}/{name} failed: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("lost the Lease {namespace}/{name}; stopped all runs so that the new leader alone runs imports")]
    Lost { namespace: String, name: String },
    #[error("leader election settings: {message}")]
    Settings { message: String },
}

impl LeaderElection {
    /// The Lease of one shard: `<lease>-<shard>`, so that each shard elects its own leader.
    pub fn for_shard(mut self, shard: Option<&str>) -> Self {
        if let Some(shard) = shard {
            self.lease_name = format!("{}-{shard}", self.lease_name);
        }
        self
    }

    async fn manager(&self, client: kube::Client) -> Result<LeaseManager, LeaderError> {
        LeaseManagerBuilder::new(client, &self.lease_name)
            .with_namespace(&self.lease_namespace)
            .with_identity(&self.identity)
            .with_duration(self.lease_duration_seconds)
            .with_grace(self.renew_grace_seconds)
            .with_field_manager(format!("{}-lease", crate::api::FIELD_MANAGER))
            .build()
            .await
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: kube_lease_manager::LeaseManagerError) -> LeaderError {
        LeaderError::Lease { namespace: self.lease_namespace.clone(), name: self.lease_name.clone(), source }
    }

    /// The Lease's duration and grace, checked.
    pub fn timing(&self) -> Result<LeaseTiming, LeaderError> {
        LeaseTiming::new(
            Duration::from_secs(self.lease_duration_seconds),
            Duration::from_secs(self.renew_grace_seconds),
        )
        .map_err(|message| LeaderError::Settings { message })
    }

    /// Waits for the Lease, then runs `lead` while holding it, keeping `fence` open only
    /// while the Lease is held with margin. Returns when `lead` ends (releasing the Lease)
    /// or when the Lease is lost or cannot be renewed in time (dropping `lead`, which stops
    /// it; the fence closed first, so nothing more is sent meanwhile).
    /// `stop` ends the wait for the Lease (`Ok(None)`): a standby stops when asked.
    pub async fn lead<F, T>(
        &self,
        client: kube::Client,
        metrics: &Metrics,
        fence: &Fence,
        stop: impl Future<Output = ()>,
        lead: F,
    ) -> Result<Option<T>, LeaderError>
    where
        F: Future<Output = T>,
    {
        let timing = self.timing()?;
        // The Lease's deadline is kept by a fence even when the caller's never closes (an
        // importer left unfenced): stepping down on time never depends on it.
        let fence = &if fence.is_leased() { fence.clone() } else { Fence::leased() };
        fence.close();
        let manager = self.manager(client.clone()).await?;
        let leases: Api<Lease> = Api::namespaced(client, &self.lease_namespace);
        info!(lease = %self.lease_name, identity = %self.identity, "waiting to lead");
        // A standby stops when asked (SIGTERM) while it waits; once leading, `lead` itself
        // watches `stop` and finishes its runs.
        let waited = async {
            while !manager.changed().await.map_err(|e| self.error(e))? {}
            Ok::<(), LeaderError>(())
        };
        tokio::select! {
            waited = waited => waited?,
            () = stop => {
                info!(lease = %self.lease_name, identity = %self.identity, "stopped while waiting to lead");
                return Ok(None);
            }
        }
        info!(lease = %self.lease_name, identity = %self.identity, "leading");
        metrics.leader.set(1);
        // Nothing starts before the first renewal opens the fence: a run must not begin
        // only to be refused its first write.
        let lead = std::pin::pin!(async {
            fence.opened().await;
            lead.await
        });
        let outcome = tokio::select! {
            value = lead => Some(value),
            lost = self.hold(&leases, timing, fence) => {
                if let Err(e) = lost {
                    warn!(error = %e, "stepping down");
                }
                None
            }
        };
        fence.close();
        metrics.leader.set(0);
        match outcome {
            Some(value) => {
                release(&manager, timing).await;
                Ok(Some(value))
            }
            None => Err(LeaderError::Lost { namespace: self.lease_namespace.clone(), name: self.lease_name.clone() }),
        }
    }

    /// Renews the Lease every [`LeaseTiming::renew_every`], each renewal bounded by
    /// [`LeaseTiming::renew_timeout`] and by the fence's deadline, moving the deadline on
    /// each success. Returns `Ok` when the Lease went to someone else, `Err` when the
    /// deadline passed without a successful renewal (the API server unreachable, or hanging).
    async fn hold(&self, leases: &Api<Lease>, timing: LeaseTiming, fence: &Fence) -> Result<(), LeaderError> {
        // Until the first renewal the fence is closed, yet the Lease is ours for at least a
        // window after it was acquired: that long, keep trying before stepping down.
        let acquired = timing.deadline(Instant::now());
        loop {
            let started = Instant::now();
            let deadline = fence.deadline().unwrap_or(acquired);
            let limit = timing.renew_timeout().min(deadline.saturating_duration_since(started));
            match tokio::time::timeout(limit, self.renew(leases)).await {
                Ok(Ok(Renewal::Held)) => fence.renewed(timing.deadline(started)),
                Ok(Ok(Renewal::Taken { holder })) => {
                    fence.close();
                    let holder = holder.unwrap_or_default();
                    warn!(lease = %self.lease_name, %holder, "the Lease went to another replica");
                    return Ok(());
                }
                Ok(Ok(Renewal::Raced)) => {
                    debug!(lease = %self.lease_name, "the Lease changed while renewing it; looking again")
                }
                Ok(Err(e)) => warn!(lease = %self.lease_name, error = %e, "renewing the Lease failed; retrying"),
                Err(_) => warn!(
                    lease = %self.lease_name, timeout = ?limit,
                    "renewing the Lease got no answer in time; retrying on a new connection"
                ),
            }
            let deadline = fence.deadline().unwrap_or(acquired);
            if Instant::now() >= deadline {
                fence.close();
                return Err(LeaderError::Lost {
                    namespace: self.lease_namespace.clone(),
                    name: self.lease_name.clone(),
                });
            }
            tokio::time::sleep_until((started + timing.renew_every()).min(deadline).into()).await;
        }
    }

    /// One renewal: the Lease is read, and its `renewTime` moved to now only if this replica
    /// still holds it and nobody wrote it since (the `resourceVersion` is the precondition).
    async fn renew(&self, leases: &Api<Lease>) -> Result<Renewal, kube::Error> {
        let lease = leases.get(&self.lease_name).await?;
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        if holder.as_deref() != Some(self.identity.as_str()) {
            return Ok(Renewal::Taken { holder });
        }
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": lease.metadata.resource_version },
            "spec": { "renewTime": MicroTime(jiff::Timestamp::now()) },
        });
        match leases.patch(&self.lease_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(Renewal::Held),
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(Renewal::Raced),
            Err(e) => Err(e),
        }
    }
}

/// What one renewal found.
enum Renewal {
    Held,
    /// Another replica holds the Lease now (or nobody: it was released).
    Taken {
        holder: Option<String>,
    },
    /// Written by someone else between the read and the write.
    Raced,
}

/// Gives the Lease up after leading, so a standby need not wait for it to expire; bounded
/// like a renewal, and only logged when it fails (the Lease then expires by itself).
async fn release(manager: &LeaseManager, timing: LeaseTiming) {
    match tokio::time::timeout(timing.renew_timeout(), manager.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "could not release the Lease; it expires by itself"),
        Err(_) => warn!("releasing the Lease timed out; it expires by itself"),
    }
}
