//! A snapshot kept as files on a volume, for cohorts too large for etcd.
//!
//! `<name>.snapshot`: `COHSNAP\n` ‖ u32 LE length ‖ [`SnapshotMeta`] as JSON ‖ compressed
//! body. `<name>.doubt`: the same with `COHDOUB\n` and a [`DoubtMeta`]. Each is written to
//! `<file>.tmp`, fsynced, renamed over the old one, and the directory fsynced, so a crash
//! leaves the old file or the new one, never a mix; a stale `.tmp` is overwritten by the
//! next write. A doubt file whose base generation is not the snapshot's is stale (a commit
//! happened since) and ignored.
//!
//! A run's plan ([`super::plan`]) is `<name>.plan` (`COHPLAN\n`, a [`PlanMeta`], its body),
//! valid only with the keys in doubt it was recorded with: it is written before them, so a
//! crash between leaves a plan that belongs to no keys in doubt, which is ignored. Its
//! checkpoints are `<name>.progress` (`COHPROG\n` and a [`ProgressRecord`]), replaced the same
//! way, and valid only for the plan they name (a new plan leaves the last one's in place:
//! deleting it first would let a crash between leave that plan with its first permit).
//! "Nothing was written since the load" compares the keys in doubt and the checkpoint the
//! load found with those stored now. Checking that and then writing is two steps here, as
//! every check of this store is: one process writes a volume's snapshots (the leader,
//! whose fence bounds its writes).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::plan::{PlanMeta, Progress, StoredPlan};
use super::{
    DoubtMeta, Loaded, SnapshotError, SnapshotMeta, SnapshotStore, StoredDoubt, StoredSnapshot, previous_generation,
};

const SNAPSHOT_MAGIC: &[u8; 8] = b"COHSNAP\n";
const DOUBT_MAGIC: &[u8; 8] = b"COHDOUB\n";
const PLAN_MAGIC: &[u8; 8] = b"COHPLAN\n";
const PROGRESS_MAGIC: &[u8; 8] = b"COHPROG\n";

/// A checkpoint of the plan `run_id` recorded at `recorded_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressRecord {
    pub run_id: String,
    pub recorded_at: Timestamp,
    pub progress: Progress,
}
/// A header longer than this is damage, not metadata.
const MAX_META_BYTES: u32 = 64 * 1024;

/// Snapshots as files in a directory, one pair per cohort.
#[derive(Debug)]
pub struct FsSnapshotStore {
    snapshot: PathBuf,
    doubt: PathBuf,
    plan: PathBuf,
    progress: PathBuf,
    /// The files of an earlier version (keyed by the import), moved here on first load.
    legacy: Option<(PathBuf, PathBuf)>,
    /// What the last load found, to tell whether anything was written since.
    loaded: Mutex<Option<Seen>>,
}

/// The keys in doubt and the checkpoint a load found (`None`: none).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    doubt: Option<DoubtMeta>,
    progress: Option<ProgressRecord>,
}

impl Clone for FsSnapshotStore {
    fn clone(&self) -> Self {
        Self { loaded: Mutex::default(), legacy: self.legacy.clone(), ..Self::new_paths(self.snapshot.clone()) }
    }
}

impl FsSnapshotStore {
    /// The snapshot `name` (the operator uses the cohort's [`super::snapshot_key`]) in
    /// `dir`. Characters other than `[A-Za-z0-9._-]` in `name` become `_`.
    pub fn new(dir: impl Into<PathBuf>, name: &str) -> Self {
        let (snapshot, _) = Self::paths(&dir.into(), name);
        Self::new_paths(snapshot)
    }

    fn new_paths(snapshot: PathBuf) -> Self {
        let doubt = snapshot.with_extension("doubt");
        let (plan, progress) = (snapshot.with_extension("plan"), snapshot.with_extension("progress"));
        Self { snapshot, doubt, plan, progress, legacy: None, loaded: Mutex::default() }
    }

    fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
            .collect();
        (dir.join(format!("{safe}.snapshot")), dir.join(format!("{safe}.doubt")))
    }

    /// Also moves the files an earlier version kept under `name` (`<namespace>_<name>_<uid>`)
    /// in the same directory over to this snapshot, when it has none yet.
    pub fn with_legacy(mut self, name: &str) -> Self {
        let dir = self.snapshot.parent().map(Path::to_owned).unwrap_or_default();
        self.legacy = Some(Self::paths(&dir, name)).filter(|(s, _)| *s != self.snapshot);
        self
    }

    /// Renames the legacy files into place (keys in doubt first: a snapshot never lands
    /// without them), unless this snapshot exists already.
    fn move_legacy(&self) -> Result<(), SnapshotError> {
        let Some((snapshot, doubt)) = &self.legacy else { return Ok(()) };
        if self.snapshot.exists() || !snapshot.exists() {
            return Ok(());
        }
        if doubt.exists() {
            fs::rename(doubt, &self.doubt).map_err(self.io("move the keys in doubt of an earlier version"))?;
        }
        fs::rename(snapshot, &self.snapshot).map_err(self.io("move the snapshot of an earlier version"))?;
        let dir = self.snapshot.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(self.io("sync the directory"))
    }

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.snapshot
    }

    fn what(&self) -> String {
        self.snapshot.display().to_string()
    }

    fn io(&self, action: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io { what: self.what(), action, source }
    }

    fn open_snapshot(&self) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let Some((meta, body)) = open::<SnapshotMeta>(&self.snapshot, SNAPSHOT_MAGIC)? else {
            return Ok(None);
        };
        meta.check(&self.what())?;
        Ok(Some(StoredSnapshot { meta, body }))
    }

    fn load_blocking(&self) -> Result<Loaded, SnapshotError> {
        self.move_legacy()?;
        let snapshot = self.open_snapshot()?;
        let generation = snapshot.as_ref().map_or(0, |s| s.meta.generation);
        let doubt = match open::<DoubtMeta>(&self.doubt, DOUBT_MAGIC)? {
            Some((meta, body)) if meta.base_generation == generation => {
                meta.check(&self.what())?;
                Some(StoredDoubt { meta, body })
            }
            _ => None,
        };
        let seen = Seen { doubt: doubt.as_ref().map(|d| d.meta.clone()), progress: self.stored_progress()? };
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
        let plan = match &doubt {
            Some(d) => self.open_plan(&d.meta)?,
            None => None,
        };
        Ok(Loaded { snapshot, doubt, plan })
    }

    /// The plan recorded with the keys in doubt `doubt`, with its last checkpoint.
    fn open_plan(&self, doubt: &DoubtMeta) -> Result<Option<StoredPlan>, SnapshotError> {
        let Some((mut meta, mut body)) = open::<PlanMeta>(&self.plan, PLAN_MAGIC)? else { return Ok(None) };
        if !meta.belongs_to(doubt) {
            return Ok(None);
        }
        if let Some((record, _)) = open::<ProgressRecord>(&self.progress, PROGRESS_MAGIC)?
            && record.run_id == meta.run_id
            && record.recorded_at == meta.recorded_at
        {
            meta.progress = record.progress;
        }
        if let Err(e) = meta.check(&self.what(), doubt) {
            tracing::warn!(snapshot = %self.what(), error = %e, "ignoring a checkpoint that does not check out");
            return Ok(None);
        }
        let offset = body.stream_position().map_err(self.io("read the plan"))?;
        Ok(Some(StoredPlan { meta, body, offset }))
    }

    /// The checkpoint stored now, whichever plan it belongs to.
    fn stored_progress(&self) -> Result<Option<ProgressRecord>, SnapshotError> {
        Ok(open::<ProgressRecord>(&self.progress, PROGRESS_MAGIC)?.map(|(record, _)| record))
    }

    /// The keys in doubt stored now, if on `generation`.
    fn stored_doubt(&self, generation: u64) -> Result<Option<(DoubtMeta, File)>, SnapshotError> {
        Ok(open::<DoubtMeta>(&self.doubt, DOUBT_MAGIC)?.filter(|(m, _)| m.base_generation == generation))
    }

    fn record_doubt_and_plan(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: Option<(&PlanMeta, &Path)>,
    ) -> Result<bool, SnapshotError> {
        let found = self.stored_generation()?;
        if found != meta.base_generation {
            return Err(SnapshotError::Conflict { what: self.what(), expected: meta.base_generation, found });
        }
        let stored = self.stored_doubt(found)?;
        let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).take();
        let now = Seen { doubt: stored.as_ref().map(|(m, _)| m.clone()), progress: self.stored_progress()? };
        let unchanged = loaded.is_some_and(|l| l == now);
        // Merged with the keys in doubt already recorded on this generation, never replacing them.
        let merged = body.with_extension("merged");
        let (meta, doubt_body) = match stored {
            Some((_, file)) => (super::doubt::merge_record(&self.what(), file, meta, body, &merged)?, merged.as_path()),
            None => (meta.clone(), body),
        };
        // A plan covers every key in doubt, or it is not recorded.
        let plan = plan.filter(|(p, _)| unchanged && p.check(&self.what(), &meta).is_ok());
        let written = (|| {
            // The plan first: until the keys in doubt it belongs to are written, it belongs to none.
            // The last plan's checkpoint stays: it names that plan, never this one.
            if let Some((plan, plan_body)) = plan {
                self.replace(&self.plan, PLAN_MAGIC, plan, plan_body)?;
            }
            self.replace(&self.doubt, DOUBT_MAGIC, &meta, doubt_body)?;
            if plan.is_none() {
                // Tidiness: it belongs to keys in doubt no longer stored.
                remove(&self.plan).map_err(self.io("delete a plan"))?;
            }
            Ok(plan.is_some())
        })();
        let _ = fs::remove_file(&merged);
        written
    }

    fn checkpoint_blocking(&self, plan: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
        let doubt = self.stored_doubt(self.stored_generation()?)?;
        let ours = doubt.is_some_and(|(d, _)| plan.belongs_to(&d))
            && open::<PlanMeta>(&self.plan, PLAN_MAGIC)?.is_some_and(|(p, _)| p.belongs_to_plan(plan));
        if !ours {
            return Err(SnapshotError::Overtaken { what: self.what() });
        }
        let record =
            ProgressRecord { run_id: plan.run_id.clone(), recorded_at: plan.recorded_at, progress: progress.clone() };
        let empty = tempfile::NamedTempFile::new_in(self.snapshot.parent().unwrap_or(Path::new(".")))
            .map_err(self.io("create a temporary file"))?;
        self.replace(&self.progress, PROGRESS_MAGIC, &record, empty.path())
    }

    fn stored_generation(&self) -> Result<u64, SnapshotError> {
        Ok(self.open_snapshot()?.map_or(0, |s| s.meta.generation))
    }

    fn commit_blocking(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        let found = self.open_snapshot()?.map(|s| s.meta.generation);
        if found != previous_generation(meta) {
            return Err(SnapshotError::Conflict {
                what: self.what(),
                expected: previous_generation(meta).unwrap_or(0),
                found: found.unwrap_or(0),
            });
        }
        self.replace(&self.snapshot, SNAPSHOT_MAGIC, meta, body)?;
        // Stale from now on (their base generation is gone); removing them is tidiness.
        for path in [&self.doubt, &self.plan, &self.progress] {
            remove(path).map_err(self.io("delete the keys in doubt"))?;
        }
        Ok(())
    }

    /// Writes `magic ‖ meta ‖ body` to `path` through a temporary file and a rename.
    fn replace(&self, path: &Path, magic: &[u8; 8], meta: &impl Serialize, body: &Path) -> Result<(), SnapshotError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(self.io("create the directory"))?;
        let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or_default()));
        let header = serde_json::to_vec(meta).expect("snapshot metadata serializes");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(self.io("create a temporary file"))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut source = File::open(body).map_err(self.io("open the new body"))?;
        (|| {
            out.write_all(magic)?;
            out.write_all(&(header.len() as u32).to_le_bytes())?;
            out.write_all(&header)?;
            io::copy(&mut source, &mut out)?;
            out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()
        })()
        .map_err(self.io("write a temporary file"))?;
        fs::rename(&tmp, path).map_err(self.io("rename a temporary file"))?;
        // The rename is durable only once the directory is.
        File::open(dir).and_then(|d| d.sync_all()).map_err(self.io("sync the directory"))
    }
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Opens `path` and reads its header; the file is left positioned at the body.
fn open<M: DeserializeOwned>(path: &Path, magic: &[u8; 8]) -> Result<Option<(M, File)>, SnapshotError> {
    let what = path.display().to_string();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SnapshotError::Io { what, action: "open", source }),
    };
    let corrupt = |message: String| SnapshotError::Corrupt { what: what.clone(), message };
    let mut head = [0u8; 12];
    file.read_exact(&mut head).map_err(|e| corrupt(format!("header: {e}")))?;
    if &head[..8] != magic {
        return Err(corrupt("not a cohort snapshot file".into()));
    }
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if len > MAX_META_BYTES {
        return Err(corrupt(format!("metadata of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| corrupt(format!("metadata: {e}")))?;
    let meta = serde_json::from_slice(&json).map_err(|e| corrupt(format!("metadata: {e}")))?;
    Ok(Some((meta, file)))
}

/// Runs file work on this task, never on a detached thread: a run that is cancelled must
/// not leave a write going on behind the next run's back. On a multi-threaded runtime the
/// worker hands its other tasks over first.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[async_trait::async_trait]
impl SnapshotStore for FsSnapshotStore {
    fn describe(&self) -> String {
        self.what()
    }

    async fn load(&self, _scratch: &Path) -> Result<Loaded, SnapshotError> {
        blocking(|| self.load_blocking())
    }

    async fn record_doubt(&self, meta: &DoubtMeta, body: &Path) -> Result<(), SnapshotError> {
        blocking(|| self.record_doubt_and_plan(meta, body, None)).map(|_| ())
    }

    async fn record_doubt_with_plan(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: &PlanMeta,
        plan_body: &Path,
    ) -> Result<bool, SnapshotError> {
        blocking(|| self.record_doubt_and_plan(meta, body, Some((plan, plan_body))))
    }

    async fn checkpoint(&self, plan: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
        blocking(|| self.checkpoint_blocking(plan, progress))
    }

    async fn commit(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        blocking(|| self.commit_blocking(meta, body))
    }

    async fn delete(&self) -> Result<(), SnapshotError> {
        // The doubt file first: a snapshot without it is whole; the reverse would not be.
        remove(&self.doubt).map_err(self.io("delete the keys in doubt"))?;
        for path in [&self.plan, &self.progress] {
            remove(path).map_err(self.io("delete a plan"))?;
        }
        remove(&self.snapshot).map_err(self.io("delete"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::diff::KeyCursor;
    use crate::snapshot::format::{BodyWriter, read_body};
    use crate::snapshot::tests::{doubt, meta};

    fn body(dir: &Path, keys: &[&str]) -> PathBuf {
        let path = dir.join(format!("body-{}", keys.join("-")));
        let mut w = BodyWriter::new(File::create(&path).unwrap()).unwrap();
        for k in keys {
            w.push(k.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn keys(body: File) -> Vec<String> {
        let mut r = read_body(body).unwrap();
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
        let empty = store.load(dir.path()).await.unwrap();
        assert!(empty.snapshot.is_none() && empty.doubt.is_none());

        store.commit(&meta(1, 2), &body(dir.path(), &["a", "b"])).await.unwrap();
        let s = store.load(dir.path()).await.unwrap().snapshot.unwrap();
        assert_eq!(s.meta, meta(1, 2));
        assert_eq!(keys(s.body), ["a", "b"]);

        // A commit that does not follow the stored generation is refused and changes nothing.
        let err = store.commit(&meta(1, 1), &body(dir.path(), &["z"])).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Conflict { expected: 0, found: 1, .. }), "{err}");
        let err = store.commit(&meta(3, 1), &body(dir.path(), &["z"])).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Conflict { expected: 2, found: 1, .. }), "{err}");

        store.commit(&meta(2, 3), &body(dir.path(), &["a", "c", "d"])).await.unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().snapshot.unwrap().body), ["a", "c", "d"]);

        store.delete().await.unwrap();
        assert!(store.load(dir.path()).await.unwrap().snapshot.is_none());
        store.delete().await.unwrap();
    }

    #[tokio::test]
    async fn keys_in_doubt_hold_until_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path(), "x");
        // Before any snapshot (an interrupted first run).
        store.record_doubt(&doubt(0, 2), &body(dir.path(), &["a", "b"])).await.unwrap();
        let loaded = store.load(dir.path()).await.unwrap();
        assert!(loaded.snapshot.is_none());
        let d = loaded.doubt.unwrap();
        assert_eq!(d.meta, doubt(0, 2));
        assert_eq!(keys(d.body), ["a", "b"]);
        // On a generation that is not the stored one: refused.
        let err = store.record_doubt(&doubt(1, 1), &body(dir.path(), &["c"])).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Conflict { expected: 1, found: 0, .. }), "{err}");

        store.commit(&meta(1, 1), &body(dir.path(), &["a"])).await.unwrap();
        assert!(store.load(dir.path()).await.unwrap().doubt.is_none());
        store.record_doubt(&doubt(1, 1), &body(dir.path(), &["c"])).await.unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().doubt.unwrap().body), ["c"]);

        // A doubt file left from before a commit (crash between rename and delete) is stale.
        let stale = fs::read(dir.path().join("x.doubt")).unwrap();
        store.commit(&meta(2, 1), &body(dir.path(), &["c"])).await.unwrap();
        fs::write(dir.path().join("x.doubt"), stale).unwrap();
        assert!(store.load(dir.path()).await.unwrap().doubt.is_none());
    }

    #[tokio::test]
    async fn a_leftover_temporary_file_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path(), "x");
        store.commit(&meta(1, 1), &body(dir.path(), &["a"])).await.unwrap();
        fs::write(dir.path().join("x.snapshot.tmp"), b"half a snap").unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().snapshot.unwrap().body), ["a"]);
        store.commit(&meta(2, 2), &body(dir.path(), &["a", "b"])).await.unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().snapshot.unwrap().body), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_snapshot_of_an_earlier_version_is_moved_to_the_cohorts_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = FsSnapshotStore::new(dir.path(), "growth_vip_uid-1");
        old.commit(&meta(1, 2), &body(dir.path(), &["a", "b"])).await.unwrap();
        old.record_doubt(&doubt(1, 1), &body(dir.path(), &["c"])).await.unwrap();
        let store = FsSnapshotStore::new(dir.path(), "growth_s1-0123").with_legacy("growth_vip_uid-1");
        let loaded = store.load(dir.path()).await.unwrap();
        assert_eq!(keys(loaded.snapshot.unwrap().body), ["a", "b"]);
        assert_eq!(keys(loaded.doubt.unwrap().body), ["c"]);
        assert!(!old.path().exists() && store.path().exists());
        // Once moved, a later legacy file is not taken over the cohort's own.
        old.commit(&meta(1, 1), &body(dir.path(), &["z"])).await.unwrap();
        assert_eq!(keys(store.load(dir.path()).await.unwrap().snapshot.unwrap().body), ["a", "b"]);
    }

    /// A plan of `sends` additions, recorded with keys in doubt `doubt(1, sends)`.
    fn plan_of(dir: &Path, adds: &[&str]) -> (PlanMeta, PathBuf) {
        let mut w = crate::snapshot::plan::PlanWriter::new(&dir.join("sections")).unwrap();
        for k in adds {
            w.push(crate::snapshot::plan::Section::Adds, k.as_bytes()).unwrap();
        }
        let path = dir.join("plan");
        let (keys, bytes) = w.finish(&path).unwrap();
        let d = doubt(1, adds.len() as u64);
        let meta = PlanMeta {
            format: 1,
            base_generation: d.base_generation,
            cohort_id: d.cohort_id,
            run_id: d.run_id,
            recorded_at: d.recorded_at,
            keys,
            bytes,
            progress: Progress { accepted: Vec::new(), permit: 1 },
            lease: None,
        };
        (meta, path)
    }

    #[tokio::test]
    async fn a_plan_and_its_checkpoints_hold_until_another_attempt_records_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path().join("snaps"), "x");
        store.commit(&meta(1, 1), &body(dir.path(), &["a"])).await.unwrap();
        let (plan, plan_body) = plan_of(dir.path(), &["b", "c"]);
        store.load(dir.path()).await.unwrap();
        assert!(
            store
                .record_doubt_with_plan(&doubt(1, 2), &body(dir.path(), &["b", "c"]), &plan, &plan_body)
                .await
                .unwrap()
        );
        let progress = Progress { accepted: vec![[0, 1]], permit: 2 };
        store.checkpoint(&plan, &progress).await.unwrap();
        let loaded = store.load(dir.path()).await.unwrap();
        let stored = loaded.plan.expect("the plan");
        assert_eq!(stored.meta.progress, progress, "the last checkpoint");
        let resolved = crate::snapshot::plan::resolve(stored, dir.path(), false).unwrap();
        assert_eq!(keys(resolved.settled_in), ["b"]);
        assert_eq!(keys(resolved.unsafe_keys), ["c"]);

        // Another attempt records its keys (without a plan): this plan is gone, its run may
        // no longer checkpoint, and the keys of both stay in doubt.
        let other = DoubtMeta { run_id: "attempt-2".into(), ..doubt(1, 1) };
        store.record_doubt(&other, &body(dir.path(), &["d"])).await.unwrap();
        let err = store.checkpoint(&plan, &progress).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Overtaken { .. }), "{err}");
        let loaded = store.load(dir.path()).await.unwrap();
        assert!(loaded.plan.is_none());
        assert_eq!(keys(loaded.doubt.unwrap().body), ["b", "c", "d"]);

        // A plan is recorded only over what the last load found: another attempt (another
        // store on the same files) records its keys after this one's load.
        let (plan, plan_body) = plan_of(dir.path(), &["b", "c", "d", "e"]);
        store.load(dir.path()).await.unwrap();
        let attempt = FsSnapshotStore::new(dir.path().join("snaps"), "x");
        attempt.record_doubt(&other, &body(dir.path(), &["e"])).await.unwrap();
        let keys4 = body(dir.path(), &["b", "c", "d", "e"]);
        assert!(!store.record_doubt_with_plan(&doubt(1, 4), &keys4, &plan, &plan_body).await.unwrap());
        assert!(store.load(dir.path()).await.unwrap().plan.is_none());
        // Loaded again, with nothing written since: the same plan is recorded.
        assert!(store.record_doubt_with_plan(&doubt(1, 4), &keys4, &plan, &plan_body).await.unwrap());
        assert!(store.load(dir.path()).await.unwrap().plan.is_some());

        // A commit settles everything.
        store.commit(&meta(2, 1), &body(dir.path(), &["a"])).await.unwrap();
        let loaded = store.load(dir.path()).await.unwrap();
        assert!(loaded.doubt.is_none() && loaded.plan.is_none());
        assert!(!dir.path().join("snaps/x.plan").exists() && !dir.path().join("snaps/x.progress").exists());
    }

    /// Two live attempts: A checkpoints between B's load and B's record. B records no plan
    /// (A may still send below its new permit), and A's checkpoint of an earlier plan left
    /// in place never applies to a later one.
    #[tokio::test]
    async fn a_checkpoint_between_a_load_and_a_record_keeps_the_plan_out() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (FsSnapshotStore::new(dir.path(), "x"), FsSnapshotStore::new(dir.path(), "x"));
        a.commit(&meta(1, 1), &body(dir.path(), &["a"])).await.unwrap();
        let (plan_a, plan_a_body) = plan_of(dir.path(), &["b", "c"]);
        a.load(dir.path()).await.unwrap();
        assert!(
            a.record_doubt_with_plan(&doubt(1, 2), &body(dir.path(), &["b", "c"]), &plan_a, &plan_a_body)
                .await
                .unwrap()
        );

        b.load(dir.path()).await.unwrap();
        a.checkpoint(&plan_a, &Progress { accepted: vec![[0, 1]], permit: 2 }).await.unwrap();
        let mine = DoubtMeta { run_id: "attempt-b".into(), ..doubt(1, 2) };
        let (plan_b, plan_b_body) = plan_of(dir.path(), &["b", "c"]);
        let plan_b = PlanMeta { run_id: mine.run_id.clone(), ..plan_b };
        let keys = body(dir.path(), &["b", "c"]);
        assert!(!b.record_doubt_with_plan(&mine, &keys, &plan_b, &plan_b_body).await.unwrap(), "A checkpointed");
        assert!(b.load(dir.path()).await.unwrap().plan.is_none());

        // B loads again and records its plan: A's checkpoint file stays, naming A's plan only.
        b.load(dir.path()).await.unwrap();
        assert!(b.record_doubt_with_plan(&mine, &keys, &plan_b, &plan_b_body).await.unwrap());
        assert!(dir.path().join("x.progress").exists());
        let stored = b.load(dir.path()).await.unwrap().plan.expect("B's plan");
        assert_eq!(stored.meta.progress, plan_b.progress, "not A's checkpoint");
    }

    #[tokio::test]
    async fn damaged_files_are_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::new(dir.path(), "x");
        fs::write(store.path(), b"COHSNAP\n\xff\xff\xff\xff").unwrap();
        let err = store.load(dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("damaged") && err.to_string().contains("approve a resync"), "{err}");
        fs::write(store.path(), b"something else entirely").unwrap();
        assert!(matches!(store.load(dir.path()).await, Err(SnapshotError::Corrupt { .. })));
    }
}
