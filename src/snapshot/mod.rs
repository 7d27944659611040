//! Snapshots: what Braze received in the last successful run of an import.
//!
//! A snapshot is a [`SnapshotMeta`] and a body: the sorted, de-duplicated member keys of
//! the cohort as Braze has it, front-coded and zstd-compressed ([`format`]). Stores keep one
//! snapshot per import and replace it whole, atomically:
//!
//! - [`cluster::ClusterSnapshotStore`] (the default): ConfigMaps in the import's namespace.
//! - [`fs::FsSnapshotStore`]: a file on a volume, for cohorts too large for etcd.
//!
//! Both key a snapshot by its Braze cohort ([`snapshot_key`]: namespace, endpoint, partner,
//! cohort id), not by the `CohortImport` object, so an import deleted with
//! `deletionPolicy: Retain` and applied again continues from it.
//!
//! Beside the snapshot, a store keeps the keys *in doubt* ([`DoubtMeta`]): a run records
//! the keys it is about to send before sending them, and a commit clears them. A run that
//! stops half-way leaves them recorded, so the next run re-sends them the way its own
//! source says, whatever the half-finished run did — even when the source changed between.
//!
//! A large run also records its plan with its keys in doubt, and checkpoints which of its
//! sends Braze accepted ([`plan`]), so the next run does not send them again.
//!
//! Every commit carries the next [`SnapshotMeta::generation`]; a store refuses a commit
//! whose generation does not follow the stored one, so two runs racing on one import
//! cannot both advance it.

use std::io;
use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::CommittedSnapshot;

pub mod cluster;
pub mod doubt;
pub mod fenced;
pub mod format;
pub mod fs;
pub mod plan;

/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Facts about a stored snapshot, kept beside its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMeta {
    /// [`FORMAT_VERSION`] of the body.
    pub format: u32,
    /// 1 for the first snapshot of an import, then one more per commit.
    pub generation: u64,
    /// The Braze `cohort_id` the members were sent to.
    pub cohort_id: String,
    /// The display name last posted to Braze.
    pub cohort_name: String,
    /// The `created_at` posted with the name, kept so renames post the same one.
    pub cohort_created_at: Timestamp,
    /// Keys in the body.
    pub members: u64,
    /// [`crate::run::identifier_fingerprint`] of the mapping the members were read with.
    pub identifier_fingerprint: String,
    /// The run that committed it.
    pub run_id: String,
    pub committed_at: Timestamp,
    /// [`MemberDigest`] of the body's keys; absent in snapshots of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Keys whose state in Braze is unknown: the changes a run was about to send when it
/// stopped. Recorded before a run sends anything; valid only on top of the snapshot
/// generation it names (a later commit settles every key in it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DoubtMeta {
    pub format: u32,
    /// The snapshot generation the run diffed against (0: none).
    pub base_generation: u64,
    pub cohort_id: String,
    /// Keys in the body.
    pub keys: u64,
    /// The run that recorded it.
    pub run_id: String,
    pub recorded_at: Timestamp,
}

/// A stored snapshot, opened for reading.
#[derive(Debug)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta,
    /// Positioned at the start of the compressed body; read it with [`format::read_body`].
    pub body: std::fs::File,
}

/// Stored keys in doubt, opened for reading.
#[derive(Debug)]
pub struct StoredDoubt {
    pub meta: DoubtMeta,
    /// A compressed body, like a snapshot's.
    pub body: std::fs::File,
}

/// What a store holds for an import.
#[derive(Debug, Default)]
pub struct Loaded {
    /// `None` before the first successful run.
    pub snapshot: Option<StoredSnapshot>,
    /// Keys a run since that snapshot may have changed in Braze.
    pub doubt: Option<StoredDoubt>,
    /// The plan recorded with those keys, with its last checkpoint.
    pub plan: Option<plan::StoredPlan>,
}

impl Loaded {
    pub fn generation(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.generation)
    }
}

/// Where an import's snapshot lives.
#[async_trait::async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Where, for messages: `ConfigMaps cohort-snapshot-<uid>* in growth`, a file path.
    fn describe(&self) -> String;

    /// Opens the current snapshot and the keys in doubt on top of it. Stores that keep
    /// bodies remotely copy them into unnamed temporary files under `scratch`.
    async fn load(&self, scratch: &Path) -> Result<Loaded, SnapshotError>;

    /// Records keys in doubt (the body as written by [`format::BodyWriter`]), merged with any
    /// recorded before (two attempts' keys both stay in doubt until a commit). Fails with [`SnapshotError::Conflict`] unless the stored snapshot
    /// generation is `meta.base_generation`.
    async fn record_doubt(&self, meta: &DoubtMeta, body: &Path) -> Result<(), SnapshotError>;

    /// [`Self::record_doubt`], and with the keys in doubt `plan` and its body (the file
    /// `plan_body`), in the same write — only if nothing was written to the store since it
    /// was last loaded (another attempt recording its keys meanwhile is found so), else the
    /// keys alone. Any plan stored before is dropped either way. Whether `plan` was
    /// recorded; then [`Self::checkpoint`] records its progress.
    async fn record_doubt_with_plan(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: &plan::PlanMeta,
        plan_body: &Path,
    ) -> Result<bool, SnapshotError>;

    /// Records `progress` for the plan `plan` this store recorded, only if the store still
    /// holds it; else [`SnapshotError::Overtaken`] (another attempt recorded its keys, or a
    /// commit came): the run then stops sending. Trouble reaching the store, a head that
    /// kept changing while it still held the plan included, is [`SnapshotError::Kube`] or
    /// [`SnapshotError::Io`], which the caller may try again.
    async fn checkpoint(&self, plan: &plan::PlanMeta, progress: &plan::Progress) -> Result<(), SnapshotError>;

    /// Replaces the snapshot with `meta` and the body in the file `body`, all or nothing,
    /// and clears the keys in doubt (and any plan). Fails with [`SnapshotError::Conflict`] unless
    /// `meta.generation` is one more than the stored generation (or 1 when none is stored).
    async fn commit(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError>;

    /// Forgets the snapshot and the keys in doubt, so the next run sends every member again.
    async fn delete(&self) -> Result<(), SnapshotError>;

    /// The import holding the snapshot goes (`deletionPolicy: Retain`) and the snapshot
    /// stays, for an import of the same cohort created later. Nothing to do where stores
    /// have no holders.
    async fn release(&self) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// The key the store settled on at load, when it may differ from the one it was given
    /// (the cluster store's alternate key); recorded in `status.committedSnapshot.key`.
    fn key(&self) -> Option<String> {
        None
    }
}

/// Why a snapshot could not be read or written. `what` is [`SnapshotStore::describe`].
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {what}: {action} failed: {source}")]
    Io { what: String, action: &'static str, source: io::Error },
    #[error(
        "snapshot {what} is damaged ({message}); what Braze holds is unknown: approve a resync \
         (cohort-operator resync) or set a new spec.cohort.id"
    )]
    Corrupt { what: String, message: String },
    #[error(
        "snapshot {what} is held by CohortImport {holder}, which imports the same cohort (another Braze \
         workspace?); give this import another spec.cohort.id"
    )]
    Held { what: String, holder: String },
    #[error(
        "snapshot {what} was written by a newer operator (format {found}, this one reads \
         {FORMAT_VERSION}); upgrade the operator"
    )]
    NewerFormat { what: String, found: u32 },
    #[error(
        "snapshot {what} moved on while this run worked (expected generation {expected}, \
         found {found}): another run of this import committed first; this run's changes are \
         re-checked on the next run"
    )]
    Conflict { what: String, expected: u64, found: u64 },
    #[error(
        "snapshot {what}: another attempt of this run recorded its keys in doubt meanwhile, so this one stopped \
         sending (what it sent is re-checked by the next run)"
    )]
    Overtaken { what: String },
    #[error("snapshot {what}: the Kubernetes API refused to {action}: {message}")]
    Kube { what: String, action: &'static str, message: String },
    #[error("snapshot {what}: not written: {source}")]
    Fenced { what: String, source: crate::fence::Fenced },
}

impl SnapshotMeta {
    /// Checks what a reader relies on.
    pub fn check(&self, what: &str) -> Result<(), SnapshotError> {
        check_format(self.format, what)?;
        if self.generation == 0 {
            return Err(SnapshotError::Corrupt { what: what.to_owned(), message: "generation 0".into() });
        }
        Ok(())
    }
}

impl DoubtMeta {
    pub fn check(&self, what: &str) -> Result<(), SnapshotError> {
        check_format(self.format, what)
    }
}

pub(crate) fn check_format(format: u32, what: &str) -> Result<(), SnapshotError> {
    if format > FORMAT_VERSION {
        return Err(SnapshotError::NewerFormat { what: what.to_owned(), found: format });
    }
    if format == 0 {
        return Err(SnapshotError::Corrupt { what: what.to_owned(), message: "format 0".into() });
    }
    Ok(())
}

/// A streaming SHA-256 of a member set: each key, in the order written (sorted), prefixed
/// by its length, so a set is told apart from any other however its keys are cut.
#[derive(Clone, Debug, Default)]
pub struct MemberDigest(Sha256);

impl MemberDigest {
    pub fn push(&mut self, key: &[u8]) {
        self.0.update((key.len() as u64).to_le_bytes());
        self.0.update(key);
    }

    /// `sha256:` and 64 hex digits.
    pub fn finish(self) -> String {
        let hex: String = self.0.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// The key a cohort's snapshot is stored under: a hash of the namespace, the normalised
/// REST endpoint, the partner and the cohort id (`s1-` and 16 hex digits). A snapshot
/// belongs to the Braze cohort, not to one `CohortImport` object: an import deleted with
/// `deletionPolicy: Retain` and applied again (a new uid) finds it.
pub fn snapshot_key(namespace: &str, endpoint: &str, partner: &str, cohort_id: &str) -> String {
    let mut hash = Sha256::new();
    for part in ["cohort-operator/snapshot/v1", namespace, endpoint, partner, cohort_id] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    let hex: String = hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("s1-{hex}")
}

/// Why the store does not hold what status says Braze holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// No snapshot at all, while status records a commit.
    Gone { expected: u64 },
    /// An older generation than status records (a restore, a switch of store).
    Older { expected: u64, found: u64 },
    /// The generation status records, but other members (a store replaced or edited).
    Different { generation: u64 },
    /// The store could not be read as a snapshot.
    Damaged { message: String },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Gone { expected } => {
                write!(f, "the snapshot is gone (status records generation {expected} committed)")
            }
            Missing::Older { expected, found } => write!(
                f,
                "the snapshot is older than status records (generation {found}, status records {expected}):                  it was restored or replaced"
            ),
            Missing::Different { generation } => write!(
                f,
                "the snapshot's members differ from what status records for generation {generation}: it was                  replaced"
            ),
            Missing::Damaged { message } => write!(f, "the snapshot cannot be read: {message}"),
        }
    }
}

/// Whether a store holding `found` (`None`: nothing) still holds what `expected` (status's
/// `committedSnapshot`, for this snapshot key) says was committed. A newer generation is
/// fine: a run committed and stopped before status recorded it. Pure.
pub fn verify(expected: Option<&CommittedSnapshot>, found: Option<&SnapshotMeta>) -> Result<(), Missing> {
    let Some(expected) = expected else {
        // Nothing recorded yet (a first run, or status of an earlier version).
        return Ok(());
    };
    let Some(found) = found else {
        return Err(Missing::Gone { expected: expected.generation });
    };
    if found.generation < expected.generation {
        return Err(Missing::Older { expected: expected.generation, found: found.generation });
    }
    let digests_differ = match (&expected.digest, &found.digest) {
        (Some(e), Some(f)) => e != f,
        _ => false,
    };
    if found.generation == expected.generation && (found.members != expected.members || digests_differ) {
        return Err(Missing::Different { generation: found.generation });
    }
    Ok(())
}

/// The generation a commit of `meta` expects to replace: `None` for the first.
fn previous_generation(meta: &SnapshotMeta) -> Option<u64> {
    meta.generation.checked_sub(1).filter(|&g| g > 0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn doubt(base_generation: u64, keys: u64) -> DoubtMeta {
        DoubtMeta {
            format: FORMAT_VERSION,
            base_generation,
            cohort_id: "vip".into(),
            keys,
            run_id: "run-x".into(),
            recorded_at: "2026-01-02T00:00:00Z".parse().unwrap(),
        }
    }

    pub fn meta(generation: u64, members: u64) -> SnapshotMeta {
        SnapshotMeta {
            format: FORMAT_VERSION,
            generation,
            cohort_id: "vip".into(),
            cohort_name: "VIP users".into(),
            cohort_created_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            members,
            identifier_fingerprint: "external_id=user_id".into(),
            run_id: format!("run-{generation}"),
            committed_at: "2026-01-02T00:00:00Z".parse().unwrap(),
            digest: None,
        }
    }

    fn committed(generation: u64, members: u64, digest: Option<&str>) -> CommittedSnapshot {
        CommittedSnapshot { key: "s1-x".into(), generation, members, digest: digest.map(str::to_owned) }
    }

    #[test]
    fn a_store_is_checked_against_what_status_says_was_committed() {
        let stored = SnapshotMeta { digest: Some("sha256:aa".into()), ..meta(3, 10) };
        // Nothing recorded (first run, earlier version): anything goes.
        assert_eq!(verify(None, None), Ok(()));
        assert_eq!(verify(None, Some(&stored)), Ok(()));
        assert_eq!(verify(Some(&committed(3, 10, Some("sha256:aa"))), Some(&stored)), Ok(()));
        assert_eq!(verify(Some(&committed(3, 10, None)), Some(&stored)), Ok(()), "no digest recorded");
        assert_eq!(verify(Some(&committed(2, 7, Some("sha256:bb"))), Some(&stored)), Ok(()), "newer: a run committed");
        assert_eq!(verify(Some(&committed(3, 10, None)), None), Err(Missing::Gone { expected: 3 }));
        assert_eq!(verify(Some(&committed(5, 10, None)), Some(&stored)), Err(Missing::Older { expected: 5, found: 3 }));
        assert_eq!(
            verify(Some(&committed(3, 10, Some("sha256:bb"))), Some(&stored)),
            Err(Missing::Different { generation: 3 })
        );
        assert_eq!(verify(Some(&committed(3, 11, None)), Some(&stored)), Err(Missing::Different { generation: 3 }));
        assert!(Missing::Gone { expected: 3 }.to_string().contains("generation 3"));
    }

    #[test]
    fn digests_and_keys_tell_sets_and_cohorts_apart() {
        let digest = |keys: &[&[u8]]| {
            let mut d = MemberDigest::default();
            keys.iter().for_each(|k| d.push(k));
            d.finish()
        };
        assert_eq!(digest(&[b"ab", b"c"]), digest(&[b"ab", b"c"]));
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]), "length-prefixed");
        assert!(digest(&[]).starts_with("sha256:") && digest(&[]).len() == 71);
        let key = snapshot_key("growth", "https://rest.iad-01.braze.com", "kubit", "vip");
        assert!(key.starts_with("s1-") && key.len() == 19, "{key}");
        assert_eq!(key, snapshot_key("growth", "https://rest.iad-01.braze.com", "kubit", "vip"));
        assert_ne!(key, snapshot_key("growth", "https://rest.iad-01.braze.com", "kubit", "vip2"));
        assert_ne!(key, snapshot_key("other", "https://rest.iad-01.braze.com", "kubit", "vip"));
    }

    #[test]
    fn meta_round_trips_as_json_and_refuses_newer_formats() {
        let m = meta(3, 10);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"cohortCreatedAt\":\"2026-01-01T00:00:00Z\""), "{json}");
        assert_eq!(serde_json::from_str::<SnapshotMeta>(&json).unwrap(), m);
        assert!(m.check("x").is_ok());
        let newer = SnapshotMeta { format: FORMAT_VERSION + 1, ..m };
        let err = newer.check("x").unwrap_err();
        assert!(err.to_string().contains("upgrade the operator"), "{err}");
        assert_eq!(previous_generation(&meta(1, 0)), None);
        assert_eq!(previous_generation(&meta(2, 0)), Some(1));
    }
}
