//! Keys in doubt are merged, never replaced.
//!
//! A run records the keys it is about to send on top of the keys in doubt already stored for
//! the same snapshot generation. A run that follows another normally re-sends every key the
//! other left in doubt anyway, so the union is what it sends; but two runs of one import can
//! overlap (an old leader cut off from the API server while the new one resumes the run), and
//! then the later record must not erase the earlier one: keys either run may have changed in
//! Braze stay in doubt until a commit settles them all.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::Path;

use super::format::{BodyWriter, read_body};
use super::{DoubtMeta, SnapshotError};
use crate::domain::diff::KeyCursor;

/// Writes to `out` the sorted union of the stored keys in doubt (`stored`, a body) and the
/// ones about to be recorded (the body in the file `ours`); returns how many keys it holds.
/// Fails with [`io::ErrorKind::InvalidData`] if either body is damaged or out of order.
pub fn merge_bodies(stored: File, ours: &Path, out: &Path) -> io::Result<u64> {
    let mut a = read_body(BufReader::with_capacity(64 * 1024, stored))?;
    let mut b = read_body(BufReader::with_capacity(64 * 1024, File::open(ours)?))?;
    let mut w = BodyWriter::new(BufWriter::with_capacity(64 * 1024, File::create(out)?))?;
    let mut last: Option<Vec<u8>> = None;
    loop {
        let order = match (a.key(), b.key()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(x), Some(y)) => x.cmp(y),
        };
        let key = match order {
            Ordering::Greater => b.key(),
            _ => a.key(),
        }
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
        if order != Ordering::Greater {
            a.advance()?;
        }
        if order != Ordering::Less {
            b.advance()?;
        }
        if last.as_ref().is_some_and(|l| *l >= key) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "keys in doubt out of order"));
        }
        w.push(&key)?;
        last = Some(key);
    }
    let (out, count) = w.finish()?;
    out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
    Ok(count)
}

/// [`merge_bodies`] for a store described as `what`, with the merged record's metadata:
/// `meta` with the union's key count. Damaged stored keys are reported as damage.
pub fn merge_record(
    what: &str,
    stored: File,
    meta: &DoubtMeta,
    ours: &Path,
    out: &Path,
) -> Result<DoubtMeta, SnapshotError> {
    match merge_bodies(stored, ours, out) {
        Ok(keys) => Ok(DoubtMeta { keys, ..meta.clone() }),
        Err(e) if e.raw_os_error().is_none() => {
            Err(SnapshotError::Corrupt { what: what.to_owned(), message: format!("the keys in doubt: {e}") })
        }
        Err(source) => Err(SnapshotError::Io { what: what.to_owned(), action: "merge the keys in doubt", source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(dir: &Path, name: &str, keys: &[&str]) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut w = BodyWriter::new(File::create(&path).unwrap()).unwrap();
        for k in keys {
            w.push(k.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn keys(path: &Path) -> Vec<String> {
        let mut r = read_body(File::open(path).unwrap()).unwrap();
        let mut out = Vec::new();
        while let Some(k) = r.key() {
            out.push(String::from_utf8(k.to_vec()).unwrap());
            r.advance().unwrap();
        }
        out
    }

    #[test]
    fn the_union_of_both_records_survives() {
        let dir = tempfile::tempdir().unwrap();
        let stored = body(dir.path(), "stored", &["a", "c", "e"]);
        let ours = body(dir.path(), "ours", &["b", "c", "f", "g"]);
        let out = dir.path().join("out");
        let n = merge_bodies(File::open(&stored).unwrap(), &ours, &out).unwrap();
        assert_eq!(n, 6);
        assert_eq!(keys(&out), ["a", "b", "c", "e", "f", "g"]);
        let empty = body(dir.path(), "empty", &[]);
        assert_eq!(merge_bodies(File::open(&empty).unwrap(), &ours, &out).unwrap(), 4);
        assert_eq!(keys(&out), ["b", "c", "f", "g"]);
    }

    #[tokio::test]
    async fn two_attempts_keys_both_stay_in_doubt_until_a_commit() {
        use crate::snapshot::SnapshotStore;
        use crate::snapshot::fs::FsSnapshotStore;
        use crate::snapshot::tests::{doubt, meta};
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path().join("snaps"), "ns_vip_uid");
        store.record_doubt(&doubt(0, 2), &body(dir.path(), "first", &["a", "c"])).await.unwrap();
        // A second attempt (a new leader) records its own keys: the first attempt's stay.
        store.record_doubt(&doubt(0, 2), &body(dir.path(), "second", &["b", "c"])).await.unwrap();
        let loaded = store.load(dir.path()).await.unwrap().doubt.unwrap();
        assert_eq!(loaded.meta.keys, 3);
        let merged = dir.path().join("merged");
        std::io::copy(&mut { loaded.body }, &mut File::create(&merged).unwrap()).unwrap();
        assert_eq!(keys(&merged), ["a", "b", "c"]);
        // A commit settles them all.
        store.commit(&meta(1, 1), &body(dir.path(), "snapshot", &["a"])).await.unwrap();
        assert!(store.load(dir.path()).await.unwrap().doubt.is_none());
        // Keys recorded on top of the new generation start afresh.
        store.record_doubt(&doubt(1, 1), &body(dir.path(), "third", &["z"])).await.unwrap();
        assert_eq!(store.load(dir.path()).await.unwrap().doubt.unwrap().meta.keys, 1);
    }

    #[test]
    fn damaged_input_is_an_error_not_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let ours = body(dir.path(), "ours", &["b"]);
        let damaged = dir.path().join("damaged");
        std::fs::write(&damaged, b"not a body").unwrap();
        let err = merge_bodies(File::open(&damaged).unwrap(), &ours, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::InvalidData | io::ErrorKind::Other), "{err}");
    }
}
