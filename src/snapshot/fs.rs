//! A snapshot kept as one file on a volume, for cohorts too large for etcd.
//!
//! File: `COHSNAP\n` ‖ u32 LE length ‖ [`SnapshotMeta`] as JSON ‖ compressed body. A commit
//! writes `<name>.snapshot.tmp`, fsyncs it, renames it over `<name>.snapshot` and fsyncs
//! the directory, so a crash leaves the old snapshot or the new one, never a mix; a stale
//! `.tmp` is overwritten by the next commit.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::{SnapshotError, SnapshotMeta, SnapshotStore, StoredSnapshot, previous_generation};

const MAGIC: &[u8; 8] = b"COHSNAP\n";
/// A header longer than this is damage, not metadata.
const MAX_META_BYTES: u32 = 64 * 1024;

/// Snapshots as files in a directory, one per import.
#[derive(Clone, Debug)]
pub struct FsSnapshotStore {
    path: PathBuf,
    tmp: PathBuf,
}

impl FsSnapshotStore {
    /// The snapshot of import `name` (e.g. `<namespace>_<name>_<uid>`) in `dir`. Characters
    /// other than `[A-Za-z0-9._-]` in `name` become `_`.
    pub fn new(dir: impl Into<PathBuf>, name: &str) -> Self {
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
            .collect();
        let dir = dir.into();
        Self { path: dir.join(format!("{safe}.snapshot")), tmp: dir.join(format!("{safe}.snapshot.tmp")) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn what(&self) -> String {
        self.path.display().to_string()
    }

    fn io(&self, action: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io { what: self.what(), action, source }
    }

    /// Opens the file and reads its header; `None` when there is no snapshot.
    fn open(&self) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("open")(e)),
        };
        let meta = read_header(&mut file, &self.what())?;
        Ok(Some(StoredSnapshot { meta, body: file }))
    }

    fn commit_blocking(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        let found = self.open()?.map(|s| s.meta.generation);
        if found != previous_generation(meta) {
            return Err(SnapshotError::Conflict {
                what: self.what(),
                expected: previous_generation(meta).unwrap_or(0),
                found: found.unwrap_or(0),
            });
        }
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(self.io("create the directory"))?;
        }
        let header = serde_json::to_vec(meta).expect("snapshot metadata serializes");
        let tmp = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.tmp)
            .map_err(self.io("create the temporary file"))?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        let mut source = File::open(body).map_err(self.io("open the new body"))?;
        (|| {
            out.write_all(MAGIC)?;
            out.write_all(&(header.len() as u32).to_le_bytes())?;
            out.write_all(&header)?;
            io::copy(&mut source, &mut out)?;
            out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()
        })()
        .map_err(self.io("write the temporary file"))?;
        fs::rename(&self.tmp, &self.path).map_err(self.io("rename the temporary file"))?;
        // The rename is durable only once the directory is.
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(self.io("sync the directory"))?;
        }
        Ok(())
    }
}

fn read_header(file: &mut File, what: &str) -> Result<SnapshotMeta, SnapshotError> {
    let corrupt = |message: String| SnapshotError::Corrupt { what: what.to_owned(), message };
    let mut head = [0u8; 12];
    file.read_exact(&mut head).map_err(|e| corrupt(format!("header: {e}")))?;
    if &head[..8] != MAGIC {
        return Err(corrupt("not a cohort snapshot file".into()));
    }
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if len > MAX_META_BYTES {
        return Err(corrupt(format!("metadata of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| corrupt(format!("metadata: {e}")))?;
    let meta: SnapshotMeta = serde_json::from_slice(&json).map_err(|e| corrupt(format!("metadata: {e}")))?;
    meta.check(what)?;
    // The file is now positioned at the body.
    debug_assert_eq!(file.stream_position().ok(), Some(12 + u64::from(len)));
    Ok(meta)
}

#[async_trait::async_trait]
impl SnapshotStore for FsSnapshotStore {
    fn describe(&self) -> String {
        self.what()
    }

    async fn load(&self, _scratch: &Path) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.open()).await.expect("snapshot open does not panic")
    }

    async fn commit(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        let (this, meta, body) = (self.clone(), meta.clone(), body.to_owned());
        tokio::task::spawn_blocking(move || this.commit_blocking(&meta, &body))
            .await
            .expect("snapshot commit does not panic")
    }

    async fn delete(&self) -> Result<(), SnapshotError> {
        for path in [&self.path, &self.tmp] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io("delete")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::diff::KeyCursor;
    use crate::snapshot::format::{BodyWriter, read_body};
    use crate::snapshot::tests::meta;

    fn body(dir: &Path, keys: &[&str]) -> PathBuf {
        let path = dir.join(format!("body-{}", keys.len()));
        let mut w = BodyWriter::new(File::create(&path).unwrap()).unwrap();
        for k in keys {
            w.push(k.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn keys(s: StoredSnapshot) -> Vec<String> {
        let mut r = read_body(s.body).unwrap();
        let mut out = Vec::new();
        while let Some(k) = r.key() {
            out.push(String::from_utf8(k.to_vec()).unwrap());
            r.advance().unwrap();
        }
        out
    }

    #[tokio::test]
    async fn commits_replace_the_snapshot_generation_by_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path().join("snaps"), "growth_vip/uid");
        assert!(store.path().ends_with("snaps/growth_vip_uid.snapshot"));
        assert!(store.load(dir.path()).await.unwrap().is_none());

        store.commit(&meta(1, 2), &body(dir.path(), &["a", "b"])).await.unwrap();
        let s = store.load(dir.path()).await.unwrap().unwrap();
        assert_eq!(s.meta, meta(1, 2));
        assert_eq!(keys(s), ["a", "b"]);

        // A commit that does not follow the stored generation is refused and changes nothing.
        let err = store.commit(&meta(1, 1), &body(dir.path(), &["z"])).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Conflict { expected: 0, found: 1, .. }), "{err}");
        let err = store.commit(&meta(3, 1), &body(dir.path(), &["z"])).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Conflict { expected: 2, found: 1, .. }), "{err}");

        store.commit(&meta(2, 3), &body(dir.path(), &["a", "c", "d"])).await.unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().unwrap()), ["a", "c", "d"]);

        store.delete().await.unwrap();
        assert!(store.load(dir.path()).await.unwrap().is_none());
        store.delete().await.unwrap();
    }

    #[tokio::test]
    async fn a_leftover_temporary_file_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path(), "x");
        store.commit(&meta(1, 1), &body(dir.path(), &["a"])).await.unwrap();
        fs::write(dir.path().join("x.snapshot.tmp"), b"half a snap").unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().unwrap()), ["a"]);
        store.commit(&meta(2, 2), &body(dir.path(), &["a", "b"])).await.unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().unwrap()), ["a", "b"]);
    }

    #[tokio::test]
    async fn damaged_files_are_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path(), "x");
        fs::write(store.path(), b"COHSNAP\n\xff\xff\xff\xff").unwrap();
        let err = store.load(dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("damaged") && err.to_string().contains("delete it"), "{err}");
        fs::write(store.path(), b"something else entirely").unwrap();
        assert!(matches!(store.load(dir.path()).await, Err(SnapshotError::Corrupt { .. })));
    }
}
