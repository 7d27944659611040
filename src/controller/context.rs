//! What every reconcile and run shares: the controller's [`Config`], its [`Dependencies`]
//! and the [`Context`] built from them (the watches' stores, the run slots and registry,
//! what this replica remembers about imports), with the few questions every room asks of it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::SignedDuration;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::clock::Clock;
use super::cohort_index::CohortIndex;
use super::destinations::{self, Catalog};
use super::events::Events;
use super::importer::Importer;
use super::leader::LeaderElection;
use super::metrics::Metrics;
use super::registry::RunRegistry;
use super::secrets::PartnerKeys;
use super::{admission, conflict, secrets, shard, status};
use crate::api::{CohortImport, DestinationKind};
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

/// Shared by every reconcile and run.
pub struct Context {
    pub client: kube::Client,
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub importer: Arc<dyn Importer>,
    pub notifier: Option<Arc<dyn Notify>>,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub runs: RunRegistry,
    /// The run slots (`max_concurrent_runs`, at most `max_concurrent_runs_per_namespace` of
    /// them per namespace), admitted round-robin by namespace.
    pub(super) admission: admission::Admission,
    /// The imports each controller sees (one per watched namespace, or one for all).
    pub(super) stores: Vec<Store<CohortImport>>,
    /// Each store's imports by cohort (what conflict detection looks up when unsharded).
    pub(super) cohorts: Vec<Arc<CohortIndex>>,
    /// Asks a controller to reconcile one import (after a run ends), by namespace.
    pub(super) wakers: Vec<(Option<String>, mpsc::UnboundedSender<ObjectRef<CohortImport>>)>,
    /// Import held in `Conflict` → the import that owns its cohort.
    pub(super) conflicts: Mutex<HashMap<ObjectRef<CohortImport>, ObjectRef<CohortImport>>>,
    /// With sharding: every shard's imports in the watched namespaces (status left out).
    pub(super) every_shard: Vec<Store<CohortImport>>,
    /// Each of those stores' imports by cohort.
    pub(super) every_shard_cohorts: Vec<Arc<CohortIndex>>,
    /// Imports that left this shard and whose run is being handed over.
    pub(super) releasing: Mutex<HashSet<ObjectRef<CohortImport>>>,
    /// Failed reconciles in a row, per import: how far [`reconcile::error_policy`] backs off.
    pub(super) reconcile_failures: Mutex<HashMap<ObjectRef<CohortImport>, u32>>,
    /// Secret keys found present, until the Secret watch sees their Secret change.
    pub secret_checks: secrets::SecretChecks,
    /// The shared destinations and Namespace labels, for resolving `destinationRef`s.
    pub catalog: Catalog,
}

impl Context {
    /// The imports of `cohort` in the watched namespaces, whichever shard owns them: what
    /// conflict detection compares (with sharding, their status is left out). Every reconcile
    /// asks, so the index says where to look and each store's copy says whether it is so.
    pub fn imports_of(&self, cohort: &conflict::CohortKey) -> Vec<Arc<CohortImport>> {
        let (stores, indexes) = if self.config.shard.is_some() {
            (&self.every_shard, &self.every_shard_cohorts)
        } else {
            (&self.stores, &self.cohorts)
        };
        let found = stores.iter().zip(indexes).flat_map(|(store, index)| {
            index.imports_of(cohort).into_iter().filter_map(|reference| store.get(&reference))
        });
        // Each as its reconcile sees it: an import through a shared destination it may not
        // use (or that is gone) cannot run, so it holds no cohort.
        found
            .filter_map(|import| self.catalog.effective(&import).ok())
            .filter(|import| cohort.is_of(&import.spec))
            .collect()
    }

    /// The controller's copy of `import`, as its watch last delivered it.
    pub fn cached(&self, import: &CohortImport) -> Option<Arc<CohortImport>> {
        let reference = ObjectRef::from_obj(import);
        self.stores.iter().find_map(|store| store.get(&reference))
    }

    /// Lets `change` edit `import`'s status and writes it ([`status::update`]).
    pub async fn update_status(
        &self,
        import: &CohortImport,
        change: impl FnMut(&mut crate::api::CohortImportStatus) -> bool,
    ) -> bool {
        let api = Api::namespaced(self.client.clone(), &import.namespace().unwrap_or_default());
        status::update(&api, self.cached(import), import, change).await
    }

    /// This operator's shard (`--shard`), `""` without one: the shard label of its metrics.
    pub fn shard_name(&self) -> &str {
        self.config.shard.as_ref().and_then(|s| s.name.as_deref()).unwrap_or("")
    }

    /// Reconciles `import` soon.
    pub fn wake(&self, import: ObjectRef<CohortImport>) {
        let sender = self
            .wakers
            .iter()
            .find(|(ns, _)| ns.is_none() || ns.as_deref() == import.namespace.as_deref())
            .map(|(_, tx)| tx);
        if let Some(tx) = sender {
            let _ = tx.send(import);
        }
    }

    /// Counts a failed reconcile of `import` (`true`) or clears the count; returns it.
    pub(super) fn note_reconcile(&self, import: &ObjectRef<CohortImport>, failed: bool) -> u32 {
        let mut failures = self.reconcile_failures.lock().unwrap_or_else(|e| e.into_inner());
        if !failed {
            failures.remove(import);
            return 0;
        }
        let count = failures.entry(import.clone()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// Lets go of what this replica keeps about an import that is gone: its conflict, its
    /// failed reconciles and its per-import series. (Which run of it ended here is kept:
    /// a few bytes, and forgetting it for an import that is only out of sight for a moment
    /// could make a stale copy look like an interrupted run.)
    pub(super) fn forget(&self, import: &ObjectRef<CohortImport>) {
        self.note_conflict(import, None);
        self.note_reconcile(import, false);
        self.metrics.forget(import.namespace.as_deref().unwrap_or_default(), &import.name);
    }

    pub(super) fn note_conflict(&self, import: &ObjectRef<CohortImport>, winner: Option<ObjectRef<CohortImport>>) {
        let mut conflicts = self.conflicts.lock().unwrap_or_else(|e| e.into_inner());
        match winner {
            Some(w) => conflicts.insert(import.clone(), w),
            None => conflicts.remove(import),
        };
    }

    /// Imports that should look again when `changed` changes: those aimed at the same
    /// cohort, and those held in conflict by it.
    pub(super) fn affected_by(&self, changed: &CohortImport) -> Vec<ObjectRef<CohortImport>> {
        self.affected_by_change(&Changed::of(changed, false, self.catalog.cohort_key(changed)))
    }

    /// A shared destination changed (or appeared, or went; `name` `None`: every one of `kind`
    /// was listed again): the imports naming it are filed under their cohort again and look
    /// again, and so do the imports of the cohorts they left and joined.
    pub(super) fn destination_changed(&self, kind: DestinationKind, name: Option<&str>, namespace: Option<&str>) {
        let named = |import: &CohortImport| match name {
            Some(name) => destinations::names(import, kind, name, namespace),
            None => import.spec.destination.destination_ref.as_ref().is_some_and(|r| r.kind == kind),
        };
        let indexed =
            self.stores.iter().zip(&self.cohorts).chain(self.every_shard.iter().zip(&self.every_shard_cohorts));
        let mut woken = Vec::new();
        for (store, index) in indexed {
            for import in store.state().into_iter().filter(|i| named(i)) {
                let reference = ObjectRef::from_obj(import.as_ref());
                if let Some(left) = index.rekey(&import) {
                    woken.extend(self.affected_by_change(&Changed {
                        import: reference.clone(),
                        cohort: left,
                        deleted: false,
                    }));
                }
                woken.extend(self.affected_by_change(&Changed::of(&import, false, index.key_of(&import))));
                woken.push(reference);
            }
        }
        self.wake_all(woken);
    }

    /// A Namespace's labels may have changed: its imports through a ClusterBrazeDestination
    /// (whose `namespaceSelector` decides) look again, and so do the imports of their cohorts.
    pub(super) fn namespace_changed(&self, namespace: &str) {
        let mut woken = Vec::new();
        for store in &self.stores {
            let through_cluster = |i: &Arc<CohortImport>| {
                i.namespace().as_deref() == Some(namespace)
                    && i.spec
                        .destination
                        .destination_ref
                        .as_ref()
                        .is_some_and(|r| r.kind == DestinationKind::ClusterBrazeDestination)
            };
            for import in store.state().into_iter().filter(through_cluster) {
                woken.extend(self.affected_by_change(&Changed::of(&import, false, self.catalog.cohort_key(&import))));
                woken.push(ObjectRef::from_obj(import.as_ref()));
            }
        }
        self.wake_all(woken);
    }

    fn wake_all(&self, mut imports: Vec<ObjectRef<CohortImport>>) {
        imports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        imports.dedup();
        imports.into_iter().for_each(|import| self.wake(import));
    }

    pub(super) fn affected_by_change(&self, changed: &Changed) -> Vec<ObjectRef<CohortImport>> {
        let me = changed.import.clone();
        let mut refs: Vec<_> = self
            .imports_of(&changed.cohort)
            .iter()
            .map(|other| ObjectRef::from_obj(other.as_ref()))
            .filter(|r| *r != me)
            .collect();
        let conflicts = self.conflicts.lock().unwrap_or_else(|e| e.into_inner());
        refs.extend(conflicts.iter().filter(|(_, winner)| **winner == me).map(|(loser, _)| loser.clone()));
        refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        refs.dedup();
        refs
    }
}

/// An import the controller's own watch saw change (or go), once its store has the change.
pub(super) struct Changed {
    pub(super) import: ObjectRef<CohortImport>,
    pub(super) cohort: conflict::CohortKey,
    pub(super) deleted: bool,
}

impl Changed {
    pub(super) fn of(import: &CohortImport, deleted: bool, cohort: conflict::CohortKey) -> Self {
        Changed { import: ObjectRef::from_obj(import), cohort, deleted }
    }
}
