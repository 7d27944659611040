//! Lease-based leader election (coordination.k8s.io/v1), through `kube-lease-manager`.
//!
//! Only the replica holding the Lease runs the controller; the others wait. The holder
//! renews the Lease before it expires; if it cannot (it lost the Lease, or the API server
//! stopped answering), it stops every run at once and returns, so two replicas never run
//! imports together. A replica that dies simply stops renewing: another one takes the Lease
//! once it has expired, finds the interrupted runs in `.status.currentRun` and runs them.

use std::future::Future;

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tracing::{info, warn};

use super::metrics::Metrics;

/// Which Lease, and who we are.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub lease_name: String,
    pub lease_namespace: String,
    /// Unique among replicas, e.g. the pod name.
    pub identity: String,
    /// How long a Lease stays valid after its last renewal.
    pub lease_duration_seconds: u64,
    /// How long before expiry the holder renews; also the clock skew tolerated.
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

    /// Waits for the Lease, then runs `lead` while holding it. Returns when `lead` ends
    /// (releasing the Lease) or when the Lease is lost (dropping `lead`, which stops it).
    pub async fn run<F, T>(&self, client: kube::Client, metrics: &Metrics, lead: F) -> Result<T, LeaderError>
    where
        F: Future<Output = T>,
    {
        let manager = self.manager(client).await?;
        info!(lease = %self.lease_name, identity = %self.identity, "waiting to lead");
        while !manager.changed().await.map_err(|e| self.error(e))? {}
        info!(lease = %self.lease_name, identity = %self.identity, "leading");
        metrics.leader.set(1);
        let lead = std::pin::pin!(lead);
        let outcome = tokio::select! {
            value = lead => Some(value),
            lost = hold(&manager) => {
                if let Err(e) = lost {
                    warn!(error = %e, "cannot renew the Lease; stepping down");
                }
                None
            }
        };
        metrics.leader.set(0);
        match outcome {
            Some(value) => {
                if let Err(e) = manager.release().await {
                    warn!(error = %e, "could not release the Lease; it expires by itself");
                }
                Ok(value)
            }
            None => Err(LeaderError::Lost { namespace: self.lease_namespace.clone(), name: self.lease_name.clone() }),
        }
    }
}

/// Keeps renewing; returns `Ok` when the Lease went to someone else, `Err` when it could
/// not be renewed.
async fn hold(manager: &LeaseManager) -> Result<(), kube_lease_manager::LeaseManagerError> {
    while manager.changed().await? {}
    Ok(())
}
