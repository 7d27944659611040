//! What the watches keep for every reconcile: the imports each controller sees (and, with
//! sharding, every shard's), their cohort indexes, the conflicts held, the failed reconciles
//! in a row, and the wakers that ask a controller to reconcile an import again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::cohort_index::CohortIndex;
use super::conflict;
use super::destinations::{self, Catalog};
use crate::api::{CohortImport, DestinationKind};

/// The watched imports and what this replica remembers about them.
pub struct Watched {
    /// With sharding, conflicts are decided from every shard's imports.
    pub(super) sharded: bool,
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
    /// Failed reconciles in a row, per import: how far [`super::reconcile::error_policy`]
    /// backs off.
    pub(super) reconcile_failures: Mutex<HashMap<ObjectRef<CohortImport>, u32>>,
    /// The shared destinations and Namespace labels, for resolving `destinationRef`s.
    pub catalog: Catalog,
}

impl Watched {
    /// The imports of `cohort` in the watched namespaces, whichever shard owns them: what
    /// conflict detection compares (with sharding, their status is left out). Every reconcile
    /// asks, so the index says where to look and each store's copy says whether it is so.
    pub fn imports_of(&self, cohort: &conflict::CohortKey) -> Vec<Arc<CohortImport>> {
        let (stores, indexes) =
            if self.sharded { (&self.every_shard, &self.every_shard_cohorts) } else { (&self.stores, &self.cohorts) };
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
