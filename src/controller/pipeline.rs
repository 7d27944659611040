//! The [`Importer`] the operator runs with: sources ([`crate::source`]) read through the
//! Kubernetes API, the import pipeline ([`crate::run::run_import`]), the Braze client, and
//! a snapshot store (ConfigMaps in the import's namespace, or files on a volume).

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::ResourceExt;

use super::conflict::{CohortKey, workspace_of};
use super::importer::{ImportError, Importer};
use super::secrets::{BrazeKeys, KeyError};
use crate::api::{AttributeShape, CohortImport, CohortImportSpec, CurrentRun, RunRecord, RunResult};
use crate::braze::{BrazeClient, CohortTarget, MembershipAttribute};
use crate::domain::guard::RemovalApproval;
use crate::domain::validate::ValidSpec;
use crate::fence::Fence;
use crate::net::egress::EgressPolicy;
use crate::run::{ImportRun, RunDeps, RunReport, identifier_fingerprint, remove_all_members, run_import};
use crate::snapshot::cluster::{ClusterSnapshotStore, DEFAULT_INLINE_BYTES};
use crate::snapshot::fenced::FencedStore;
use crate::snapshot::fs::FsSnapshotStore;
use crate::snapshot::{SnapshotError, SnapshotStore, snapshot_key};
use crate::source::kube::KubeObjects;
use crate::source::{AmbientIdentity, open_source};

/// Where snapshots are kept, one per Braze cohort ([`snapshot_key`]).
#[derive(Clone, Debug)]
pub enum SnapshotStoreKind {
    /// ConfigMaps in the import's namespace.
    Cluster,
    /// One file per cohort in this directory (a PersistentVolume): `<namespace>_<key>`.
    Filesystem(PathBuf),
}

/// The snapshot key of the cohort `spec` imports into, in `import`'s namespace: the one
/// `status.committedSnapshot` names when it is this cohort's (the cohort's key, or the
/// import's alternate to it), else the cohort's.
pub fn cohort_snapshot_key(import: &CohortImport, spec: &CohortImportSpec) -> String {
    let cohort = CohortKey::of(spec);
    let key =
        snapshot_key(&import.namespace().unwrap_or_default(), &cohort.endpoint, &cohort.partner, &cohort.cohort_id);
    let committed = import.status.as_ref().and_then(|s| s.committed_snapshot.as_ref()).map(|c| c.key.as_str());
    match committed {
        Some(stored) if stored == key || *stored == alternate_key(&key, import) => stored.to_owned(),
        _ => key,
    }
}

/// The key `import` keeps its snapshot under when the cohort's key holds another Braze
/// workspace's (two imports of one cohort id in one namespace, two workspaces).
fn alternate_key(key: &str, import: &CohortImport) -> String {
    let uid = import.uid().unwrap_or_default();
    format!("{key}-{}", &uid[..uid.len().min(8)])
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
    /// The namespaces whose sources may use the operator's own cloud identity.
    ambient: Arc<AmbientIdentity>,
    /// The operator's ceiling on one warehouse page (`--max-source-page-bytes`).
    max_page_bytes: u64,
    /// Braze requests and snapshot writes are made only while it is open.
    fence: Fence,
}

impl PipelineImporter {
    pub fn new(client: kube::Client, braze: BrazeClient, snapshots: SnapshotStoreKind, scratch_dir: PathBuf) -> Self {
        PipelineImporter {
            client,
            braze,
            snapshots,
            scratch_dir,
            egress: EgressPolicy::shared_default(),
            ambient: Arc::default(),
            max_page_bytes: crate::source::warehouse::DEFAULT_MAX_PAGE_BYTES,
            fence: Fence::unfenced(),
        }
    }

    /// Lends the operator's own cloud identity to the sources of `ambient`'s namespaces.
    pub fn with_ambient_identity(mut self, ambient: AmbientIdentity) -> Self {
        self.ambient = Arc::new(ambient);
        self
    }

    /// Sends to Braze and writes snapshots only while `fence` is open: give it the
    /// controller's [`crate::controller::Config::fence`] when leader election is on.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.braze = self.braze.with_fence(fence.clone());
        self.fence = fence;
        self
    }

    /// Sources connect only where `policy` allows (the default policy otherwise).
    pub fn with_egress(mut self, policy: Arc<EgressPolicy>) -> Self {
        self.egress = policy;
        self
    }

    /// No warehouse page body over `bytes` is read, whatever a spec says.
    pub fn with_max_page_bytes(mut self, bytes: u64) -> Self {
        self.max_page_bytes = bytes;
        self
    }

    /// The snapshot of the cohort `spec` imports into, written only while this replica holds
    /// its Lease ([`FencedStore`]).
    fn store(
        &self,
        import: &CohortImport,
        spec: &CohortImportSpec,
        keys: Option<&BrazeKeys>,
    ) -> Result<Box<dyn SnapshotStore>, SnapshotError> {
        Ok(Box::new(FencedStore::new(self.unfenced_store(import, spec, keys)?, self.fence.clone())))
    }

    /// The snapshot of the cohort `spec` imports into (a snapshot an earlier version kept
    /// for `import` is moved over on first load), for the Braze workspace of `keys` when
    /// they were read.
    fn unfenced_store(
        &self,
        import: &CohortImport,
        spec: &CohortImportSpec,
        keys: Option<&BrazeKeys>,
    ) -> Result<Box<dyn SnapshotStore>, SnapshotError> {
        let key = cohort_snapshot_key(import, spec);
        let namespace = import.namespace().unwrap_or_default();
        Ok(match &self.snapshots {
            SnapshotStoreKind::Cluster => {
                let cohort = CohortKey::of(spec).to_string();
                let workspace = keys.map(|k| workspace_of(k.workspace_key().expose()));
                let alternate = alternate_key(&key, import);
                // A small cohort's snapshot and keys in doubt live in the head: a run that
                // changes something reads it once and updates it twice.
                let store = ClusterSnapshotStore::new(self.client.clone(), import, &key, &cohort)?
                    .with_inline_bytes(DEFAULT_INLINE_BYTES);
                // Only an import that ran before can have a snapshot an earlier version kept
                // by its uid: a first run saves the look.
                let ran = import.status.as_ref().is_some_and(|s| {
                    s.last_run.is_some() || !s.history.is_empty() || s.last_successful_run_at.is_some()
                });
                let store = if ran { store } else { store.without_legacy() };
                Box::new(store.with_alternate(&alternate, workspace.as_deref()))
            }
            SnapshotStoreKind::Filesystem(dir) => {
                let legacy = format!("{namespace}_{}_{}", import.name_any(), import.uid().unwrap_or_default());
                Box::new(FsSnapshotStore::new(dir, &format!("{namespace}_{key}")).with_legacy(&legacy))
            }
        })
    }

    /// Where a run sends: `rest_endpoint` is the validated spec's parsed endpoint when there
    /// is one (a run), the spec as written otherwise (deleting an import whose spec may no
    /// longer be valid).
    fn target(spec: &CohortImportSpec, rest_endpoint: String, keys: BrazeKeys) -> Result<CohortTarget, ImportError> {
        let braze = spec.destination.braze().ok_or(KeyError::NoReference { field: "spec.destination" })?;
        let cohort_id = spec.cohort.id.clone();
        match (keys, &braze.attribute) {
            (BrazeKeys::Partner { data_import_key, partner_api_key }, _) => {
                let partner = braze.partner.clone().unwrap_or_default();
                Ok(CohortTarget::partner(rest_endpoint, partner, partner_api_key, data_import_key, cohort_id))
            }
            (BrazeKeys::RestApi { api_key }, Some(a)) => {
                let attribute = MembershipAttribute { name: a.name.clone(), shape: a.shape };
                // A Boolean attribute is the cohort in Braze: a new spec.cohort.id changes
                // nothing there, so it must not start the snapshot afresh either.
                let cohort_id = match a.shape {
                    AttributeShape::Boolean => a.name.clone(),
                    AttributeShape::Array => cohort_id,
                };
                Ok(CohortTarget::attribute(rest_endpoint, api_key, attribute, cohort_id))
            }
            (BrazeKeys::RestApi { .. }, None) => {
                Err(ImportError::Keys(KeyError::NoReference { field: "spec.destination.braze.attribute" }))
            }
        }
    }

    async fn run_once(
        &self,
        import: &CohortImport,
        valid: &ValidSpec,
        current: &CurrentRun,
        keys: BrazeKeys,
    ) -> Result<RunReport, ImportError> {
        let namespace = import.namespace().unwrap_or_default();
        let spec = &valid.spec;
        let objects = KubeObjects::new(self.client.clone(), namespace.clone())
            .with_egress(self.egress.clone())
            .with_ambient_identity(self.ambient.clone())
            .with_max_page_bytes(self.max_page_bytes);
        let source = open_source(&valid.source, &valid.identifiers, &objects).await?;
        let store = self.store(import, spec, Some(&keys))?;
        let target = Self::target(spec, valid.braze_endpoint.as_str().trim_end_matches('/').to_owned(), keys)?;
        let mut run =
            ImportRun::new(current.id.clone(), current.trigger, &namespace, &import.name_any(), &spec.cohort.name);
        run.identifier_fingerprint = identifier_fingerprint(&spec.identifiers);
        run.removal_guard = spec.removal_guard.clone();
        run.dry_run = spec.dry_run;
        if !spec.dry_run_sample {
            run.sample_size = 0; // `spec.dryRunSample: false`: no ids in status
        }
        run.snapshot_key = cohort_snapshot_key(import, spec);
        // Status from before commits were recorded has none: that run records it.
        run.expected_snapshot = import
            .status
            .as_ref()
            .and_then(|s| s.committed_snapshot.clone())
            .filter(|committed| committed.key == run.snapshot_key);
        run.resync = current.approved_resync.clone();
        run.scratch_dir = self.scratch_dir.clone();
        run.started_at = current.started_at;
        run.approval = current
            .approved_removals
            .as_ref()
            .map(|id| RemovalApproval { run_id: id.clone(), removals: approved_removals(import, id) });
        let deps =
            RunDeps { members: source.members(), snapshots: store.as_ref(), braze: &self.braze, target: &target };
        Ok(run_import(&run, deps).await)
    }

    /// Removes every member the snapshot holds — and the members in doubt, which a failed
    /// run may have added — then forgets the snapshot.
    async fn remove_all(&self, import: &CohortImport, keys: BrazeKeys) -> Result<u64, ImportError> {
        let store = self.store(import, &import.spec, Some(&keys))?;
        let braze = import.spec.destination.braze().ok_or(KeyError::NoReference { field: "spec.destination" })?;
        let target = Self::target(&import.spec, braze.rest_endpoint.clone(), keys)?;
        let key = cohort_snapshot_key(import, &import.spec);
        let committed = import.status.as_ref().and_then(|s| s.committed_snapshot.as_ref()).filter(|c| c.key == key);
        Ok(remove_all_members(store.as_ref(), &self.braze, &target, &self.scratch_dir, committed).await?)
    }
}

/// The removals a blocked run reported: what its approval lets through.
fn approved_removals(import: &CohortImport, run_id: &str) -> u64 {
    let status = import.status.as_ref();
    status
        .into_iter()
        .flat_map(|s| s.last_run.iter().chain(s.history.iter()))
        .find(|r| r.id == run_id && r.result == RunResult::Blocked)
        .map_or(0, RunRecord::planned_removals)
}

impl Importer for PipelineImporter {
    fn run<'a>(
        &'a self,
        import: &'a CohortImport,
        spec: &'a ValidSpec,
        run: &'a CurrentRun,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<RunReport, ImportError>> {
        Box::pin(self.run_once(import, spec, run, keys))
    }

    fn remove_members<'a>(
        &'a self,
        import: &'a CohortImport,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<u64, ImportError>> {
        Box::pin(self.remove_all(import, keys))
    }

    fn forget<'a>(&'a self, import: &'a CohortImport) -> BoxFuture<'a, Result<(), ImportError>> {
        // The snapshot belongs to the cohort: it stays for an import of it created later.
        Box::pin(async move { Ok(self.store(import, &import.spec, None)?.release().await?) })
    }
}
