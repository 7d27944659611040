//! The [`Importer`] the operator runs with: sources ([`crate::source`]) read through the
//! Kubernetes API, the import pipeline ([`crate::run::run_import`]), the Braze client, and
//! a snapshot store (ConfigMaps in the import's namespace, or files on a volume).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use kube::ResourceExt;
use tokio::sync::mpsc;

use super::importer::{Importer, RunJob, RunOutcome};
use super::secrets::BrazeKeys;
use crate::api::{CohortImport, RunResult};
use crate::braze::{BrazeClient, Change, CohortTarget};
use crate::domain::diff::KeyCursor;
use crate::domain::guard::RemovalApproval;
use crate::domain::member::Member;
use crate::run::{ImportRun, RunDeps, RunError, identifier_fingerprint, run_import};
use crate::snapshot::cluster::ClusterSnapshotStore;
use crate::snapshot::format::read_body;
use crate::snapshot::fs::FsSnapshotStore;
use crate::snapshot::{SnapshotError, SnapshotStore};
use crate::source::egress::EgressPolicy;
use crate::source::kube::KubeObjects;
use crate::source::open_source;

/// Where snapshots are kept.
#[derive(Clone, Debug)]
pub enum SnapshotStoreKind {
    /// ConfigMaps owned by the import, in its namespace.
    Cluster,
    /// One file per import in this directory (a PersistentVolume).
    Filesystem(PathBuf),
}

/// Runs imports for real.
pub struct PipelineImporter {
    client: kube::Client,
    braze: BrazeClient,
    snapshots: SnapshotStoreKind,
    /// Sort spills and snapshot bodies in the making.
    scratch_dir: PathBuf,
    /// Where sources may connect.
    egress: Arc<EgressPolicy>,
}

impl PipelineImporter {
    pub fn new(client: kube::Client, braze: BrazeClient, snapshots: SnapshotStoreKind, scratch_dir: PathBuf) -> Self {
        PipelineImporter { client, braze, snapshots, scratch_dir, egress: EgressPolicy::shared_default() }
    }

    /// Sources connect only where `policy` allows (the default policy otherwise).
    pub fn with_egress(mut self, policy: Arc<EgressPolicy>) -> Self {
        self.egress = policy;
        self
    }

    fn store(&self, import: &CohortImport) -> Result<Box<dyn SnapshotStore>, SnapshotError> {
        Ok(match &self.snapshots {
            SnapshotStoreKind::Cluster => Box::new(ClusterSnapshotStore::new(self.client.clone(), import)?),
            SnapshotStoreKind::Filesystem(dir) => {
                let name = format!(
                    "{}_{}_{}",
                    import.namespace().unwrap_or_default(),
                    import.name_any(),
                    import.uid().unwrap_or_default()
                );
                Box::new(FsSnapshotStore::new(dir, &name))
            }
        })
    }

    fn target(import: &CohortImport, keys: BrazeKeys) -> CohortTarget {
        let braze = &import.spec.destination.braze;
        CohortTarget {
            rest_endpoint: braze.rest_endpoint.clone(),
            partner: braze.partner.clone(),
            partner_api_key: keys.partner_api_key,
            data_import_key: keys.data_import_key,
            cohort_id: import.spec.cohort.id.clone(),
        }
    }

    async fn run_once(&self, import: &CohortImport, job: &RunJob, keys: BrazeKeys) -> RunOutcome {
        let namespace = import.namespace().unwrap_or_default();
        let spec = &import.spec;
        let objects = KubeObjects::new(self.client.clone(), namespace.clone()).with_egress(self.egress.clone());
        let source = match open_source(&spec.source, &spec.identifiers, &objects).await {
            Ok(source) => source,
            Err(e) => return RunOutcome::failed(job, e.reason(), format!("reading the source failed: {e}")),
        };
        let store = match self.store(import) {
            Ok(store) => store,
            Err(e) => return RunOutcome::failed(job, "SnapshotFailed", e.to_string()),
        };
        let target = Self::target(import, keys);
        let mut run = ImportRun::new(job.run_id.clone(), job.trigger, &namespace, &import.name_any(), &spec.cohort.name);
        run.identifier_fingerprint = identifier_fingerprint(&spec.identifiers);
        run.removal_guard = spec.removal_guard.clone();
        run.dry_run = spec.dry_run;
        run.scratch_dir = self.scratch_dir.clone();
        run.started_at = job.started_at;
        run.approval = job.approved_removals.as_ref().map(|id| RemovalApproval {
            run_id: id.clone(),
            removals: approved_removals(import, id),
        });
        let deps = RunDeps { members: source.members(), snapshots: store.as_ref(), braze: &self.braze, target: &target };
        let report = run_import(&run, deps).await;
        let reason = match &report.error {
            Some(RunError::Source(e)) => Some(e.reason().to_owned()),
            _ => None,
        };
        RunOutcome {
            record: report.to_record(),
            reason,
            hint: report.hint.clone(),
            braze_responses: report.braze_responses.clone(),
        }
    }

    /// Removes every member the snapshot holds — and the members in doubt, which a failed
    /// run may have added — then forgets the snapshot.
    async fn remove_all(&self, import: &CohortImport, keys: BrazeKeys) -> Result<u64, String> {
        let store = self.store(import).map_err(|e| e.to_string())?;
        let loaded = store.load(&self.scratch_dir).await.map_err(|e| e.to_string())?;
        let bodies: Vec<std::fs::File> =
            loaded.snapshot.map(|s| s.body).into_iter().chain(loaded.doubt.map(|d| d.body)).collect();
        let removed = if bodies.is_empty() { 0 } else { self.send_removals(import, keys, bodies).await? };
        store.delete().await.map_err(|e| e.to_string())?;
        Ok(removed)
    }

    /// Sends every member of the sorted `bodies` to Braze as a removal; returns how many,
    /// or why Braze did not accept them all.
    async fn send_removals(&self, import: &CohortImport, keys: BrazeKeys, bodies: Vec<std::fs::File>) -> Result<u64, String> {
        let (tx, rx) = mpsc::channel::<Vec<Change>>(2);
        let reader = tokio::task::spawn_blocking(move || read_union(bodies, tx));
        let changes = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
            .flat_map(futures::stream::iter);
        let sent = self.braze.send_changes(&Self::target(import, keys), changes).await;
        let read = reader.await.map_err(|e| format!("reading the snapshot failed: {e}"))?;
        if let Some(error) = sent.stopped {
            return Err(format!("Braze did not accept every removal ({} accepted): {error}", sent.totals.removed));
        }
        let planned = read.map_err(|e| format!("reading the snapshot failed: {e}"))?;
        if sent.totals.removed != planned {
            return Err(format!("Braze accepted {} removals of {planned}", sent.totals.removed));
        }
        Ok(planned)
    }
}

/// The removals a blocked run reported: what its approval lets through.
fn approved_removals(import: &CohortImport, run_id: &str) -> u64 {
    let status = import.status.as_ref();
    status
        .into_iter()
        .flat_map(|s| s.last_run.iter().chain(s.history.iter()))
        .find(|r| r.id == run_id && r.result == RunResult::Blocked)
        .map_or(0, |r| r.removed)
}

/// Merges sorted snapshot bodies into one sorted stream of removals without repeats.
/// Returns how many were read.
fn read_union(bodies: Vec<std::fs::File>, tx: mpsc::Sender<Vec<Change>>) -> io::Result<u64> {
    let mut readers = Vec::new();
    for body in bodies {
        readers.push(read_body(body)?);
    }
    let mut chunk = Vec::with_capacity(1000);
    let mut count = 0u64;
    // The smallest key, copied out of its reader before the readers holding it advance.
    let mut key = Vec::new();
    while let Some(smallest) = readers.iter().filter_map(|r| r.key()).min() {
        key.clear();
        key.extend_from_slice(smallest);
        for reader in readers.iter_mut() {
            if reader.key() == Some(key.as_slice()) {
                reader.advance()?;
            }
        }
        let member = Member::from_key_bytes(&key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        chunk.push(Change::remove(member));
        count += 1;
        if chunk.len() == 1000 && tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
            return Ok(count); // the sender stopped; it reports why
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
    Ok(count)
}

impl Importer for PipelineImporter {
    fn run<'a>(&'a self, import: &'a CohortImport, job: &'a RunJob, keys: BrazeKeys) -> BoxFuture<'a, RunOutcome> {
        Box::pin(self.run_once(import, job, keys))
    }

    fn remove_members<'a>(&'a self, import: &'a CohortImport, keys: BrazeKeys) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(self.remove_all(import, keys))
    }

    fn forget<'a>(&'a self, import: &'a CohortImport) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let store = self.store(import).map_err(|e| e.to_string())?;
            store.delete().await.map_err(|e| e.to_string())
        })
    }
}
