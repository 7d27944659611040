//! `deletionPolicy: RemoveMembers`: remove from the Braze cohort every member an import
//! sent — its snapshot, and the keys in doubt a failed run may have added — then forget the
//! snapshot. Sent through the same path as a run's changes ([`super::send_changes_from`]).

use std::fs::File;
use std::io;
use std::path::Path;

use tokio::sync::mpsc;

use super::send_changes_from;
use crate::api::CommittedSnapshot;
use crate::braze::{BrazeClient, BrazeError, Change, CohortTarget};
use crate::domain::diff::KeyCursor;
use crate::domain::member::Member;
use crate::snapshot::format::read_body;
use crate::snapshot::{Missing, SnapshotError, SnapshotStore, verify};

/// Why the members could not all be removed. The snapshot stays until they are.
#[derive(Debug, thiserror::Error)]
pub enum RemovalError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("reading the snapshot failed: {0}")]
    Read(io::Error),
    #[error("Braze did not accept every removal ({accepted} accepted): {error}")]
    Refused { accepted: u64, error: BrazeError },
    #[error("Braze accepted {accepted} removals of {planned}")]
    Incomplete { accepted: u64, planned: u64 },
    /// The store holds no snapshot (or keys in doubt resting on a snapshot it no longer has):
    /// whom the import sent is unknown, so no one is removed. Whether that means "nothing was
    /// ever sent" is for the caller to decide from what status recorded.
    #[error("no snapshot in {what}: the members this import sent are not recorded anywhere")]
    NoSnapshot { what: String },
    /// [`RemovalError::NoSnapshot`], while status shows members were sent (`evidence`).
    #[error(
        "the snapshot in {what} is gone, but {evidence}: the operator cannot tell which members it sent, so it \
         removes no one (Braze cannot list a cohort's members)"
    )]
    SnapshotLost { what: String, evidence: String },
    /// The store holds a snapshot, but not the one status says was committed (an older one,
    /// restored): removing its members would leave the later ones in Braze.
    #[error(
        "{missing} ({what}): removing its members would leave others this import sent in the Braze cohort, so \
         it removes no one"
    )]
    NotCommitted { what: String, missing: Missing },
}

/// Removes every member `snapshots` holds from `target`'s cohort, then deletes the
/// snapshot. Returns how many were removed; [`RemovalError::NoSnapshot`] when the store
/// holds no snapshot, [`RemovalError::NotCommitted`] when it holds another than `expected`
/// (`status.committedSnapshot`) says was committed.
pub async fn remove_all_members(
    snapshots: &dyn SnapshotStore,
    braze: &BrazeClient,
    target: &CohortTarget,
    scratch: &Path,
    expected: Option<&CommittedSnapshot>,
) -> Result<u64, RemovalError> {
    let loaded = snapshots.load(scratch).await?;
    if let Some(found) = &loaded.snapshot
        && let Err(missing) = verify(expected, Some(&found.meta))
    {
        return Err(RemovalError::NotCommitted { what: snapshots.describe(), missing });
    }
    // Keys in doubt resting on a snapshot that is gone: removing only them would report
    // success while the snapshot's members stay.
    let doubt_base = loaded.doubt.as_ref().map_or(0, |d| d.meta.base_generation);
    if loaded.snapshot.is_none() && (loaded.doubt.is_none() || doubt_base > 0) {
        return Err(RemovalError::NoSnapshot { what: snapshots.describe() });
    }
    let bodies: Vec<File> = loaded.snapshot.map(|s| s.body).into_iter().chain(loaded.doubt.map(|d| d.body)).collect();
    let removed = if bodies.is_empty() { 0 } else { send_removals(braze, target, bodies).await? };
    snapshots.delete().await?;
    Ok(removed)
}

/// Sends every member of the sorted `bodies` as a removal; how many, or why Braze did not
/// accept them all.
async fn send_removals(braze: &BrazeClient, target: &CohortTarget, bodies: Vec<File>) -> Result<u64, RemovalError> {
    let (sent, read) = send_changes_from(braze, target, move |tx| read_union(bodies, tx)).await;
    if let Some(error) = sent.stopped {
        return Err(RemovalError::Refused { accepted: sent.totals.removed, error });
    }
    let planned = read.map_err(RemovalError::Read)?;
    if sent.totals.removed != planned {
        return Err(RemovalError::Incomplete { accepted: sent.totals.removed, planned });
    }
    Ok(planned)
}

/// Merges sorted snapshot bodies into one sorted stream of removals without repeats.
/// Returns how many were read.
fn read_union(bodies: Vec<File>, tx: mpsc::Sender<Vec<Change>>) -> io::Result<u64> {
    let mut readers = Vec::new();
    for body in bodies {
        readers.push(read_body(body)?);
    }
    let mut chunk = Vec::with_capacity(super::SEND_CHUNK);
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
        let member =
            Member::from_key_bytes(&key).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        chunk.push(Change::remove(member));
        count += 1;
        if chunk.len() == super::SEND_CHUNK && tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
            return Ok(count); // the sender stopped; it reports why
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
    Ok(count)
}
