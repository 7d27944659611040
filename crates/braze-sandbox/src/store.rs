//! The sandbox's workspace: users, and cohorts of them. In memory, behind fine-grained
//! locks: the user index is read-mostly, and each cohort has its own lock, so requests to
//! different cohorts never wait for each other.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::wire::ChangeObject;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// A user alias.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Alias {
    pub alias_name: String,
    pub alias_label: String,
}

/// A Braze user profile. Identified users have an `external_id`; a user who was anonymous
/// and later identified keeps their device ids, but Braze no longer matches them by those.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Alias>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_ids: Vec<String>,
}

impl SandboxUser {
    pub fn identified(external_id: impl Into<String>) -> Self {
        Self { external_id: Some(external_id.into()), ..Self::default() }
    }

    pub fn anonymous(device_id: impl Into<String>) -> Self {
        Self { device_ids: vec![device_id.into()], ..Self::default() }
    }

    pub fn alias(name: impl Into<String>, label: impl Into<String>) -> Self {
        Self { aliases: vec![Alias { alias_name: name.into(), alias_label: label.into() }], ..Self::default() }
    }
}

/// Users and how Braze matches them.
#[derive(Default)]
pub struct Users {
    records: Vec<SandboxUser>,
    by_external_id: FastMap<String, u32>,
    /// label → name → user, so lookups borrow both strings.
    by_alias: FastMap<String, FastMap<String, u32>>,
    /// Device ids of anonymous users only.
    by_anonymous_device: FastMap<String, u32>,
}

impl Users {
    /// Users saved by the sandbox itself, indices kept as they were.
    pub fn from_records(records: Vec<SandboxUser>) -> Self {
        let mut users = Self { records, ..Self::default() };
        for index in 0..users.records.len() {
            users.index(index as u32);
        }
        users
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, index: u32) -> Option<&SandboxUser> {
        self.records.get(index as usize)
    }

    pub fn records(&self) -> &[SandboxUser] {
        &self.records
    }

    /// Adds a user, or merges it into the one it names: the user with its external id, else
    /// with one of its aliases, else the anonymous user with one of its device ids (giving
    /// that user an external id identifies them: their device ids stop matching).
    pub fn upsert(&mut self, user: SandboxUser) -> u32 {
        let existing = user
            .external_id
            .as_ref()
            .and_then(|id| self.by_external_id.get(id))
            .or_else(|| user.aliases.iter().find_map(|a| self.alias(&a.alias_name, &a.alias_label)))
            .or_else(|| user.device_ids.iter().find_map(|d| self.by_anonymous_device.get(d)))
            .copied();
        let index = match existing {
            Some(index) => {
                let record = &mut self.records[index as usize];
                if record.external_id.is_none() {
                    record.external_id = user.external_id;
                }
                for alias in user.aliases {
                    if !record.aliases.contains(&alias) {
                        record.aliases.push(alias);
                    }
                }
                for device in user.device_ids {
                    if !record.device_ids.contains(&device) {
                        record.device_ids.push(device);
                    }
                }
                index
            }
            None => {
                let index = u32::try_from(self.records.len()).expect("fewer than 4 billion users");
                self.records.push(user);
                index
            }
        };
        self.index(index);
        index
    }

    fn index(&mut self, index: u32) {
        let record = &self.records[index as usize];
        if let Some(id) = &record.external_id {
            self.by_external_id.insert(id.clone(), index);
            for device in &record.device_ids {
                if self.by_anonymous_device.get(device) == Some(&index) {
                    self.by_anonymous_device.remove(device);
                }
            }
        } else {
            for device in &record.device_ids {
                self.by_anonymous_device.insert(device.clone(), index);
            }
        }
        for alias in &record.aliases {
            self.by_alias.entry(alias.alias_label.clone()).or_default().insert(alias.alias_name.clone(), index);
        }
    }

    pub fn by_external_id(&self, id: &str) -> Option<u32> {
        self.by_external_id.get(id).copied()
    }

    pub fn by_device_id(&self, id: &str) -> Option<u32> {
        self.by_anonymous_device.get(id).copied()
    }

    fn alias(&self, name: &str, label: &str) -> Option<&u32> {
        self.by_alias.get(label).and_then(|names| names.get(name))
    }

    pub fn by_alias(&self, name: &str, label: &str) -> Option<u32> {
        self.alias(name, label).copied()
    }

    /// The users a request names, in order, with whether each leaves the cohort; and how
    /// many identifiers matched nobody.
    pub fn resolve(&self, changes: &[ChangeObject<'_>]) -> (Vec<(u32, bool)>, u64) {
        let mut matched = Vec::with_capacity(changes.iter().map(ChangeObject::id_count).sum());
        let mut unmatched = 0;
        for change in changes {
            let remove = change.remove();
            let mut push = |user: Option<u32>| match user {
                Some(user) => matched.push((user, remove)),
                None => unmatched += 1,
            };
            for id in change.user_ids.iter().flatten() {
                push(self.by_external_id(&id.0));
            }
            for alias in change.aliases.iter().flatten() {
                push(self.by_alias(&alias.alias_name, &alias.alias_label));
            }
            for id in change.device_ids.iter().flatten() {
                push(self.by_device_id(&id.0));
            }
        }
        (matched, unmatched)
    }
}

/// One cohort of one partner.
#[derive(Debug, Default)]
pub struct Cohort {
    /// `None` until the name endpoint was called for it.
    pub name: Option<String>,
    pub created_at: Option<String>,
    pub members: FastSet<u32>,
}

impl Cohort {
    /// Applies resolved changes in order (a later change of the same user wins); returns
    /// how many users joined and left.
    pub fn apply(&mut self, changes: &[(u32, bool)]) -> (u64, u64) {
        let (mut joined, mut left) = (0, 0);
        for &(user, remove) in changes {
            if remove {
                left += u64::from(self.members.remove(&user));
            } else {
                joined += u64::from(self.members.insert(user));
            }
        }
        (joined, left)
    }
}

pub type CohortRef = Arc<Mutex<Cohort>>;

/// partner → cohort id → cohort.
#[derive(Default)]
pub struct Cohorts {
    map: RwLock<FastMap<String, FastMap<String, CohortRef>>>,
}

impl Cohorts {
    pub fn get(&self, partner: &str, cohort_id: &str) -> Option<CohortRef> {
        self.map.read().get(partner).and_then(|c| c.get(cohort_id)).cloned()
    }

    pub fn get_or_create(&self, partner: &str, cohort_id: &str) -> CohortRef {
        if let Some(cohort) = self.get(partner, cohort_id) {
            return cohort;
        }
        let mut map = self.map.write();
        map.entry(partner.to_owned()).or_default().entry(cohort_id.to_owned()).or_default().clone()
    }

    /// Every (partner, cohort id, cohort), sorted.
    pub fn all(&self) -> Vec<(String, String, CohortRef)> {
        let map = self.map.read();
        let mut all: Vec<_> = map
            .iter()
            .flat_map(|(p, cohorts)| cohorts.iter().map(move |(id, c)| (p.clone(), id.clone(), c.clone())))
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Envelope, users_request};

    fn store() -> Users {
        let mut users = Users::default();
        users.upsert(SandboxUser::identified("e1"));
        users.upsert(SandboxUser::alias("n1", "crm"));
        users.upsert(SandboxUser::anonymous("d-anon"));
        // Was anonymous on d-old, then identified as e2.
        users.upsert(SandboxUser::anonymous("d-old"));
        users.upsert(SandboxUser {
            external_id: Some("e2".into()),
            device_ids: vec!["d-old".into()],
            ..Default::default()
        });
        users
    }

    #[test]
    fn matching_follows_braze() {
        let users = store();
        assert_eq!(users.len(), 4, "identifying an anonymous user merges, not adds");
        assert_eq!(users.by_external_id("e1"), Some(0));
        assert_eq!(users.by_alias("n1", "crm"), Some(1));
        assert_eq!(users.by_alias("n1", "other"), None);
        assert_eq!(users.by_device_id("d-anon"), Some(2));
        assert_eq!(users.by_device_id("d-old"), None, "identified users do not match by device id");
        assert_eq!(users.by_external_id("e2"), Some(3));
        assert_eq!(users.get(3).unwrap().device_ids, ["d-old"]);
    }

    #[test]
    fn requests_resolve_in_order_and_count_unknown_ids() {
        let users = store();
        let body = br#"{"cohort_id":"c","cohort_changes":[
            {"user_ids":["e1","ghost"],"aliases":[{"alias_name":"n1","alias_label":"crm"}],"device_ids":["d-anon","d-old"]},
            {"user_ids":["e1"],"should_remove":true}]}"#;
        let env = Envelope::parse(body).unwrap();
        let req = users_request(&env).unwrap();
        let (matched, unmatched) = users.resolve(&req.changes);
        assert_eq!(matched, [(0, false), (1, false), (2, false), (0, true)]);
        assert_eq!(unmatched, 2);
        let mut cohort = Cohort::default();
        assert_eq!(cohort.apply(&matched), (3, 1));
        let mut members: Vec<_> = cohort.members.iter().copied().collect();
        members.sort();
        assert_eq!(members, [1, 2], "the later remove of e1 wins");
        assert_eq!(cohort.apply(&[(1, false), (0, true)]), (0, 0), "no-ops count nothing");
    }

    #[test]
    fn cohorts_are_per_partner() {
        let cohorts = Cohorts::default();
        cohorts.get_or_create("a", "c").lock().name = Some("A".into());
        assert!(cohorts.get("b", "c").is_none());
        cohorts.get_or_create("b", "c");
        let all = cohorts.all();
        assert_eq!(all.iter().map(|(p, c, _)| format!("{p}/{c}")).collect::<Vec<_>>(), ["a/c", "b/c"]);
        assert_eq!(all[0].2.lock().name.as_deref(), Some("A"));
    }
}
