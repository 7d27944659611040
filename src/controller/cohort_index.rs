//! Which imports each cohort has: every reconcile asks for the imports of its cohort (one
//! active schedule per cohort), and scanning the whole store for them cost two thirds of
//! the operator's CPU at 10,000 imports (`controller_scale`, README). The index is kept
//! from the same watch events as the store, right after the store applied each one, so it
//! says what the store says; a change then wakes the imports of its cohort
//! ([`super::watched::Watched::affected_by_change`]), which look again.
//!
//! Lookups still read each import from the store and compare its cohort there
//! ([`super::watched::Watched::imports_of`]): the index only narrows where to look.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::conflict::CohortKey;
use super::destinations::Catalog;
use crate::api::CohortImport;

/// The imports of each cohort in one store, as of the watch events applied so far.
#[derive(Default)]
pub struct CohortIndex {
    state: Mutex<State>,
    /// Resolves the shared destinations imports name; without it such an import keys as
    /// unresolved.
    catalog: Option<Catalog>,
}

#[derive(Default)]
struct State {
    current: Cohorts,
    /// A re-list in progress: the store swaps to what it lists once it is done.
    relisting: Option<Cohorts>,
}

#[derive(Default)]
struct Cohorts {
    /// A list, not a set: a cohort has one import but for conflicts, and a set of one
    /// allocates room for four (10,000 imports: 3 MiB more, `controller_scale`).
    by_cohort: HashMap<CohortKey, Vec<ObjectRef<CohortImport>>>,
    cohort_of: HashMap<ObjectRef<CohortImport>, CohortKey>,
}

impl Cohorts {
    /// Files `import` under `cohort`; returns the cohort it was filed under before, if another.
    fn insert(&mut self, import: &CohortImport, cohort: CohortKey) -> Option<CohortKey> {
        let reference = reference_to(import);
        let before = self.cohort_of.get(&reference).cloned();
        if before.as_ref() == Some(&cohort) {
            return None;
        }
        self.remove(&reference);
        // Not there: `remove` took it out of the cohort it was filed under. Room for one
        // (a first push would make room for four).
        self.by_cohort.entry(cohort.clone()).or_insert_with(|| Vec::with_capacity(1)).push(reference.clone());
        self.cohort_of.insert(reference, cohort);
        before
    }

    fn remove(&mut self, reference: &ObjectRef<CohortImport>) {
        let Some(cohort) = self.cohort_of.remove(reference) else { return };
        if let Some(imports) = self.by_cohort.get_mut(&cohort) {
            imports.retain(|import| import != reference);
            if imports.is_empty() {
                self.by_cohort.remove(&cohort);
            }
        }
    }
}

/// A reference by namespace and name only: all a store lookup compares, and the index holds
/// one per import twice (10,000 imports, a few MiB less than with `resourceVersion` and uid).
fn reference_to(import: &CohortImport) -> ObjectRef<CohortImport> {
    let reference = ObjectRef::new(&import.name_any());
    match import.namespace() {
        Some(namespace) => reference.within(&namespace),
        None => reference,
    }
}

impl CohortIndex {
    /// An index that keys imports naming a shared destination by the workspace `catalog`
    /// resolves it to.
    pub fn resolving(catalog: Catalog) -> Self {
        CohortIndex { state: Mutex::default(), catalog: Some(catalog) }
    }

    /// The cohort `import` is filed under.
    pub fn key_of(&self, import: &CohortImport) -> CohortKey {
        match &self.catalog {
            Some(catalog) => catalog.cohort_key(import),
            None => CohortKey::of(&import.spec),
        }
    }

    /// Files `import` again, after the destination it names changed (or appeared, or went);
    /// returns the cohort it was filed under before when that changed. An import the index
    /// does not hold stays out.
    pub fn rekey(&self, import: &CohortImport) -> Option<CohortKey> {
        let cohort = self.key_of(import);
        let reference = reference_to(import);
        let mut state = self.lock();
        if let Some(listed) = state.relisting.as_mut().filter(|l| l.cohort_of.contains_key(&reference)) {
            listed.insert(import, cohort.clone());
        }
        if !state.current.cohort_of.contains_key(&reference) {
            return None;
        }
        state.current.insert(import, cohort)
    }

    /// Follows one watch event, as the reflector's store does: a re-list (`Init` …
    /// `InitDone`) replaces the whole index when it is done, dropping imports deleted while
    /// the watch was down.
    pub fn apply(&self, event: &watcher::Event<CohortImport>) {
        match event {
            watcher::Event::Apply(import) => {
                let cohort = self.key_of(import);
                self.lock().current.insert(import, cohort);
            }
            watcher::Event::InitApply(import) => {
                let cohort = self.key_of(import);
                self.lock().relisting.get_or_insert_with(Cohorts::default).insert(import, cohort);
            }
            watcher::Event::Delete(import) => self.lock().current.remove(&reference_to(import)),
            watcher::Event::Init => self.lock().relisting = Some(Cohorts::default()),
            watcher::Event::InitDone => {
                let mut state = self.lock();
                if let Some(listed) = state.relisting.take() {
                    state.current = listed;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The imports the index has for `cohort`.
    pub fn imports_of(&self, cohort: &CohortKey) -> Vec<ObjectRef<CohortImport>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.current.by_cohort.get(cohort).map(|imports| imports.to_vec()).unwrap_or_default()
    }

    /// How many imports the index holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).current.cohort_of.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(name: &str, cohort: &str) -> CohortImport {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
            "metadata": { "name": name, "namespace": "team" },
            "spec": {
                "cohort": { "id": cohort, "name": cohort },
                "source": { "inline": { "rows": [] } },
                "identifiers": { "externalId": "id" },
                "destination": { "braze": {
                    "restEndpoint": "https://rest.iad-01.braze.com", "partner": "kubit",
                    "dataImportKeySecretRef": { "name": "braze", "key": "data-import-key" }
                } },
                "schedule": { "cadence": "Once" }
            }
        }))
        .unwrap()
    }

    fn names(index: &CohortIndex, cohort: &str) -> Vec<String> {
        let mut names: Vec<_> =
            index.imports_of(&CohortKey::of(&import("any", cohort).spec)).into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn imports_are_found_by_their_cohort_and_follow_a_change_of_it() {
        let index = CohortIndex::default();
        index.apply(&watcher::Event::Apply(import("a", "c1")));
        index.apply(&watcher::Event::Apply(import("b", "c1")));
        index.apply(&watcher::Event::Apply(import("c", "c2")));
        assert_eq!(names(&index, "c1"), ["a", "b"]);
        assert_eq!(names(&index, "c2"), ["c"]);
        assert!(names(&index, "c3").is_empty());

        index.apply(&watcher::Event::Apply(import("b", "c2")));
        assert_eq!(names(&index, "c1"), ["a"]);
        assert_eq!(names(&index, "c2"), ["b", "c"]);

        index.apply(&watcher::Event::Delete(import("a", "c1")));
        assert!(names(&index, "c1").is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn the_same_cohort_spelled_differently_is_one_cohort() {
        let index = CohortIndex::default();
        let mut other = import("b", "c1");
        let braze = other.spec.destination.braze.as_mut().unwrap();
        braze.partner = Some("KUBIT".into());
        braze.rest_endpoint = "https://REST.iad-01.braze.com/".into();
        index.apply(&watcher::Event::Apply(import("a", "c1")));
        index.apply(&watcher::Event::Apply(other));
        assert_eq!(names(&index, "c1"), ["a", "b"]);
    }

    #[test]
    fn a_relist_replaces_the_index_once_done_dropping_imports_deleted_meanwhile() {
        let index = CohortIndex::default();
        index.apply(&watcher::Event::Apply(import("a", "c1")));
        index.apply(&watcher::Event::Apply(import("gone", "c1")));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(import("a", "c1")));
        index.apply(&watcher::Event::InitApply(import("new", "c2")));
        // Until the re-list is done, the store (and so the index) shows the old state.
        assert_eq!(names(&index, "c1"), ["a", "gone"]);
        assert!(names(&index, "c2").is_empty());
        index.apply(&watcher::Event::InitDone);
        assert_eq!(names(&index, "c1"), ["a"]);
        assert_eq!(names(&index, "c2"), ["new"]);
        assert_eq!(index.len(), 2);
    }
}
