//! Snapshots kept in the cluster, as ConfigMaps in the import's namespace.
//!
//! A snapshot belongs to the Braze cohort, not to one `CohortImport` object: it is keyed by
//! [`super::snapshot_key`] `K` (namespace, endpoint, partner, cohort id). Layout:
//! - `cohort-snapshot-K` — the head (`data["snapshot.json"]`): the [`SnapshotMeta`] and the
//!   [`DoubtMeta`], each with the serial number of the chunks holding its body;
//! - `cohort-snapshot-K-S-0`, `-1`, … — a body written under serial `S`, cut into
//!   `binaryData["body"]` pieces of at most 900 KiB, well under etcd's 1.5 MiB request limit.
//!
//! A write (a commit, or recording keys in doubt) puts every chunk of its body under one
//! serial, then switches the head to it, conditioned on the `resourceVersion` it read. The
//! serial is the one the last switch reserved ([`head`]), or else one the writer claims by
//! bumping it in the head first. So a serial's chunks belong to one writer, and a writer that
//! another one overtook fails at its switch. The head lists the serials no part names
//! (replaced bodies, writes that never switched); a snapshot a switch replaces is deleted
//! right after it, and whatever else is listed by the next write, before its switch — never
//! a serial a writer may still switch to. A crash before the switch leaves the old head whole
//! (plus unnamed chunks); after it, the new one. Readers follow the head, so they never see
//! a torn snapshot. A run costs few requests: one read of the head, then one create per
//! chunk and one switch per write (and a delete when there is garbage); the store keeps the
//! head it last read or wrote for the run's next write instead of reading it again.
//!
//! Small bodies, inline ([`ClusterSnapshotStore::with_inline_bytes`], what the operator's
//! runs use; up to [`DEFAULT_INLINE_BYTES`]): a snapshot or keys in doubt that small is kept
//! in the head's own `binaryData` (`snapshot`, `doubt`), its part marked `inline`, so that a
//! write of it is the switch alone — the same conditional update, all or nothing — and a
//! read of it is the read of the head. A small cohort's run then costs one read of the head
//! and two updates of it, no chunk. The serial bookkeeping is unchanged (an inline write
//! keeps the reservation and lists the chunked bodies it replaced), so a body that grows
//! goes to chunks and one that shrinks comes back without anything left over. Keys in doubt
//! recorded with a plan, and writes over a head of a version that did not list its unnamed
//! serials, stay chunked. A version that does not know inline parts finds no chunk holding a
//! part's `bodyBytes` and refuses the head as damaged; it never reads it as empty.
//!
//! A run's plan ([`super::plan`]) is written with its keys in doubt, in the same switch: its
//! body in chunks of its own under their serial (`cohort-snapshot-K-S-plan-0`, …), its
//! metadata in the head's `planPart`. An operator of an earlier version ignores `planPart`,
//! reads the keys in doubt alone, drops the plan on its next write and collects its chunks
//! with the serial that write replaces. Its checkpoints replace the head alone (one request
//! each), conditioned like every head write on the `resourceVersion` this store last wrote:
//! a checkpoint never lands over another attempt's write. (The first version with
//! checkpoints, never released, appended the plan's body to the keys in doubt; such a head
//! is still read: the plan's bytes are cut off first, whatever the plan says.)
//!
//! The objects carry no ownerReference, so no garbage collector can take them before the
//! import's finalizer has run (a foreground cascade deletes dependents first): the finalizer
//! deletes them (`deletionPolicy: RemoveMembers`, once the members are removed) or releases
//! them (`Retain`: the holder label goes, the snapshot stays). The head's
//! [`SNAPSHOT_HOLDER_LABEL`] names the import holding it; an import of the same cohort
//! created later (a new uid: `kubectl replace`, a GitOps migration, a restore) adopts a
//! snapshot whose holder is gone, and refuses one whose holder still exists. Snapshots of
//! earlier versions, keyed by the import's uid and owned by it, are moved over on first load.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tracing::{debug, warn};

use super::plan::{PlanMeta, Progress, StoredPlan};
use super::{
    DoubtMeta, Loaded, SnapshotError, SnapshotMeta, SnapshotStore, StoredDoubt, StoredSnapshot, previous_generation,
};
use crate::api::{CohortImport, FIELD_MANAGER};

mod head;
use head::{Head, Location, Part};

/// Largest body piece per ConfigMap. A ConfigMap holds at most 1 MiB; etcd takes requests
/// up to 1.5 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 900 * 1024;
/// Bodies up to this size are kept in the head when inline bodies are on
/// ([`ClusterSnapshotStore::with_inline_bytes`]; the operator's runs): a few thousand members.
pub const DEFAULT_INLINE_BYTES: usize = 64 * 1024;
/// The most an inline body may hold: the head holds two (a snapshot and keys in doubt), and
/// a ConfigMap at most 1 MiB.
pub const MAX_INLINE_BYTES: usize = 256 * 1024;

/// Label: the snapshot key ([`super::snapshot_key`]) of the cohort a snapshot object belongs
/// to (the import's uid in snapshots of earlier versions).
pub const SNAPSHOT_OF_LABEL: &str = "cohorts.dev/snapshot-of";
/// Label on the head: uid of the import holding the snapshot; absent once released
/// (the import was deleted with `deletionPolicy: Retain`).
pub const SNAPSHOT_HOLDER_LABEL: &str = "cohorts.dev/snapshot-holder";
/// Label on the head: the Braze workspace of its holder (`status.brazeWorkspace`), when known.
pub const SNAPSHOT_WORKSPACE_LABEL: &str = "cohorts.dev/snapshot-workspace";
/// Annotation: the cohort, for people listing snapshots (`cohort "vip" at https://… (partner p)`).
pub const SNAPSHOT_COHORT_ANNOTATION: &str = "cohorts.dev/cohort";
/// Label: `head` or `chunk`.
pub const SNAPSHOT_PART_LABEL: &str = "cohorts.dev/snapshot-part";
/// Label on chunks: the serial of the write they belong to.
pub const SNAPSHOT_SERIAL_LABEL: &str = "cohorts.dev/snapshot-serial";
/// Label on the head: the snapshot generation.
pub const SNAPSHOT_GENERATION_LABEL: &str = "cohorts.dev/snapshot-generation";
/// Annotation: the name of the import that last held it, for people listing ConfigMaps.
pub const SNAPSHOT_IMPORT_ANNOTATION: &str = "cohorts.dev/import";

const HEAD_KEY: &str = "snapshot.json";
const BODY_KEY: &str = "body";
/// The head's `binaryData` keys of its inline bodies.
const INLINE_SNAPSHOT_KEY: &str = "snapshot";
const INLINE_DOUBT_KEY: &str = "doubt";
/// A reader that finds a chunk gone (a write replaced it meanwhile) starts over.
const LOAD_ATTEMPTS: usize = 3;

/// The snapshot of one cohort, in the namespace of the import holding it.
#[derive(Clone)]
pub struct ClusterSnapshotStore {
    api: Api<ConfigMap>,
    imports: Api<CohortImport>,
    namespace: String,
    /// The import holding it.
    import_name: String,
    uid: String,
    /// [`super::snapshot_key`]: names and labels the objects.
    key: String,
    /// The cohort, for people.
    cohort: String,
    /// The uid-keyed snapshot of an earlier version to move over, if any.
    legacy_uid: Option<String>,
    /// The key used instead when another import of the same cohort key, in another Braze
    /// workspace, holds the snapshot under `key` (see [`Self::with_alternate`]).
    alternate: Option<String>,
    /// The holder's Braze workspace ([`SNAPSHOT_WORKSPACE_LABEL`]), when known.
    workspace: Option<String>,
    /// `key` or `alternate`, decided by the first load.
    effective: OnceLock<String>,
    chunk_bytes: usize,
    /// Bodies up to this size are written into the head (0: never).
    inline_bytes: usize,
    /// The head as this store last read or wrote it.
    last: LastHead,
    /// The `resourceVersion` of the head the last load read: a plan is recorded only over it.
    loaded: LoadedVersion,
    /// Loads change nothing ([`Self::read_only`]).
    read_only: bool,
}

/// The head as a store last read or wrote it: the next write of the same run starts from it
/// instead of reading it again. A stale one costs only a conflict (every head write is
/// conditioned on its `resourceVersion`), after which the head is read afresh. A clone of a
/// store starts without one.
#[derive(Default)]
struct LastHead(Mutex<Option<ReadHead>>);

impl Clone for LastHead {
    fn clone(&self) -> Self {
        LastHead::default()
    }
}

impl LastHead {
    fn set(&self, read: ReadHead) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(read);
    }

    fn take(&self) -> Option<ReadHead> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The `resourceVersion` of the head as a store's last load read it (`Some(None)`: no head).
/// A clone of a store starts without one.
#[derive(Default)]
struct LoadedVersion(Mutex<Option<Option<String>>>);

impl Clone for LoadedVersion {
    fn clone(&self) -> Self {
        LoadedVersion::default()
    }
}

impl LoadedVersion {
    fn set(&self, version: Option<Option<String>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = version;
    }

    fn is(&self, version: &Option<String>) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() == Some(version)
    }
}

impl std::fmt::Debug for ClusterSnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The head as read, with the `resourceVersion` a replacement must match and the bodies of
/// its inline parts.
#[derive(Clone)]
struct ReadHead {
    head: Head,
    resource_version: Option<String>,
    bodies: Bodies,
}

/// The bodies of a head's inline parts.
#[derive(Clone, Default)]
struct Bodies {
    snapshot: Option<Vec<u8>>,
    doubt: Option<Vec<u8>>,
}

/// The part of the head a write replaces.
#[derive(Clone, Copy)]
enum Slot {
    Snapshot,
    Doubt,
}

impl Slot {
    fn key(self) -> &'static str {
        match self {
            Slot::Snapshot => INLINE_SNAPSHOT_KEY,
            Slot::Doubt => INLINE_DOUBT_KEY,
        }
    }
}

impl Bodies {
    fn get(&self, slot: Slot) -> Option<&Vec<u8>> {
        match slot {
            Slot::Snapshot => self.snapshot.as_ref(),
            Slot::Doubt => self.doubt.as_ref(),
        }
    }

    fn set(&mut self, slot: Slot, body: Vec<u8>) {
        match slot {
            Slot::Snapshot => self.snapshot = Some(body),
            Slot::Doubt => self.doubt = Some(body),
        }
    }

    /// Only the bodies of `head`'s inline parts.
    fn of(mut self, head: &Head) -> Bodies {
        if !head.snapshot.as_ref().is_some_and(|p| p.inline) {
            self.snapshot = None;
        }
        if !head.doubt.as_ref().is_some_and(|p| p.inline) {
            self.doubt = None;
        }
        self
    }
}

/// Which body a chunk holds: a part's (a snapshot or keys in doubt), or the plan recorded
/// with keys in doubt, under their serial.
#[derive(Clone, Copy)]
enum Body {
    Main,
    Plan,
}

enum LoadAttempt {
    Loaded(Box<Loaded>),
    Moved(String),
}

impl ClusterSnapshotStore {
    /// The snapshot with `key` ([`super::snapshot_key`]) of `cohort` (a description, for
    /// people), held by `import`, which must have been read from the API server (it needs
    /// the namespace and uid). A uid-keyed snapshot `import` kept with an earlier version is
    /// moved over on first load.
    pub fn new(client: kube::Client, import: &CohortImport, key: &str, cohort: &str) -> Result<Self, SnapshotError> {
        let missing = |field: &str| SnapshotError::Kube {
            what: format!("of CohortImport {}", import.name_any()),
            action: "identify the import",
            message: format!("metadata.{field} is not set; use the object as read from the API server"),
        };
        let namespace = import.namespace().ok_or_else(|| missing("namespace"))?;
        let uid = import.uid().ok_or_else(|| missing("uid"))?;
        let store = Self::for_cohort(client, &namespace, key, cohort, &import.name_any(), &uid);
        Ok(Self { legacy_uid: Some(uid), ..store })
    }

    /// The snapshot with `key` in `namespace`, held by the import `name` with `uid`.
    pub fn for_cohort(client: kube::Client, namespace: &str, key: &str, cohort: &str, name: &str, uid: &str) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            imports: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            import_name: name.to_owned(),
            uid: uid.to_owned(),
            key: key.to_owned(),
            cohort: cohort.to_owned(),
            legacy_uid: None,
            alternate: None,
            workspace: None,
            effective: OnceLock::new(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            inline_bytes: 0,
            last: LastHead::default(),
            loaded: LoadedVersion::default(),
            read_only: false,
        }
    }

    /// The key this store reads and writes: `key`, or the alternate once a load found the
    /// snapshot under `key` held for another Braze workspace.
    pub fn key(&self) -> &str {
        self.effective.get().unwrap_or(&self.key)
    }

    /// Two imports of one cohort id, endpoint and partner in one namespace may import into
    /// two Braze workspaces (two cohorts in Braze). When the snapshot under the cohort's key
    /// is another workspace's — held by another import that exists, or, released, labelled
    /// with another workspace — this store uses `alternate` instead.
    pub fn with_alternate(mut self, alternate: &str, workspace: Option<&str>) -> Self {
        self.alternate = Some(alternate.to_owned()).filter(|a| *a != self.key);
        self.workspace = workspace.map(str::to_owned);
        self
    }

    /// The snapshot an earlier version kept for the import `name` with `uid` (keyed by the
    /// uid), as this version reads it.
    pub fn legacy(client: kube::Client, namespace: &str, name: &str, uid: &str) -> Self {
        Self::for_cohort(client, namespace, uid, "", name, uid)
    }

    /// Also moves over the uid-keyed snapshot of an earlier version of the import with `uid`.
    pub fn with_legacy_uid(mut self, uid: &str) -> Self {
        self.legacy_uid = Some(uid.to_owned());
        self
    }

    /// A store whose loads change nothing, for a preview: a snapshot of an earlier version is
    /// read where it is instead of moved over, and one whose holder is gone is read without
    /// adopting it. Its writes are the caller's to refuse.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Looks for no snapshot of an earlier version: the import never ran before.
    pub fn without_legacy(mut self) -> Self {
        self.legacy_uid = None;
        self
    }

    /// Cuts bodies into pieces of at most `bytes` (tests use small ones).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.clamp(1, DEFAULT_CHUNK_BYTES);
        self
    }

    /// Keeps bodies of up to `bytes` (at most [`MAX_INLINE_BYTES`]) in the head itself, so
    /// that writing one is one conditional update of the head and reading one is the read of
    /// the head; larger bodies, and keys in doubt recorded with a plan, go to chunks.
    pub fn with_inline_bytes(mut self, bytes: usize) -> Self {
        self.inline_bytes = bytes.min(MAX_INLINE_BYTES);
        self
    }

    /// Name of the head ConfigMap.
    pub fn head_name(&self) -> String {
        format!("cohort-snapshot-{}", self.key())
    }

    /// Name of chunk `index` of the write with `serial`.
    pub fn chunk_name(&self, serial: u64, index: u32) -> String {
        format!("cohort-snapshot-{}-{serial}-{index}", self.key())
    }

    /// Name of chunk `index` of the plan written with the keys in doubt under `serial`.
    pub fn plan_chunk_name(&self, serial: u64, index: u32) -> String {
        format!("cohort-snapshot-{}-{serial}-plan-{index}", self.key())
    }

    fn chunk_name_of(&self, body: Body, serial: u64, index: u32) -> String {
        match body {
            Body::Main => self.chunk_name(serial, index),
            Body::Plan => self.plan_chunk_name(serial, index),
        }
    }

    fn what(&self) -> String {
        format!("ConfigMaps {}* in namespace {}", self.head_name(), self.namespace)
    }

    fn kube(&self, action: &'static str) -> impl FnOnce(kube::Error) -> SnapshotError + '_ {
        move |e| SnapshotError::Kube { what: self.what(), action, message: kube_message(&e) }
    }

    fn io(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io { what: self.what(), action, source }
    }

    fn corrupt(&self, message: String) -> SnapshotError {
        SnapshotError::Corrupt { what: self.what(), message }
    }

    fn post_params() -> PostParams {
        PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() }
    }

    fn object_meta(&self, name: String, labels: [(&str, String); 2]) -> ObjectMeta {
        let mut all = BTreeMap::from([
            (SNAPSHOT_OF_LABEL.to_owned(), self.key().to_owned()),
            (SNAPSHOT_HOLDER_LABEL.to_owned(), self.uid.clone()),
            ("app.kubernetes.io/managed-by".to_owned(), "cohort-operator".to_owned()),
        ]);
        all.extend(labels.map(|(k, v)| (k.to_owned(), v)));
        if let Some(workspace) = &self.workspace {
            all.insert(SNAPSHOT_WORKSPACE_LABEL.to_owned(), workspace.clone());
        }
        let mut annotations = BTreeMap::from([(SNAPSHOT_IMPORT_ANNOTATION.to_owned(), self.import_name.clone())]);
        if !self.cohort.is_empty() {
            annotations.insert(SNAPSHOT_COHORT_ANNOTATION.to_owned(), self.cohort.clone());
        }
        // No ownerReference: see the module's documentation.
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(all),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }
    }

    async fn read_head(&self) -> Result<ReadHead, SnapshotError> {
        match self.api.get_opt(&self.head_name()).await.map_err(self.kube("read the head"))? {
            Some(cm) => self.parse_head(&cm),
            None => Ok(ReadHead::none()),
        }
    }

    fn parse_head(&self, cm: &ConfigMap) -> Result<ReadHead, SnapshotError> {
        let json = cm
            .data
            .as_ref()
            .and_then(|d| d.get(HEAD_KEY))
            .ok_or_else(|| self.corrupt(format!("the head has no data key {HEAD_KEY}")))?;
        let head: Head = serde_json::from_str(json).map_err(|e| self.corrupt(format!("the head: {e}")))?;
        if let Some(s) = &head.snapshot {
            s.meta.check(&self.what())?;
        }
        if let Some(d) = &head.doubt {
            d.meta.check(&self.what())?;
        }
        let bodies = Bodies {
            snapshot: self.inline_body_of(cm, head.snapshot.as_ref(), Slot::Snapshot)?,
            doubt: self.inline_body_of(cm, head.doubt.as_ref(), Slot::Doubt)?,
        };
        Ok(ReadHead { head, resource_version: cm.metadata.resource_version.clone(), bodies })
    }

    /// The body of `part` in the head `cm`, if it is inline there.
    fn inline_body_of<M>(
        &self,
        cm: &ConfigMap,
        part: Option<&Part<M>>,
        slot: Slot,
    ) -> Result<Option<Vec<u8>>, SnapshotError> {
        let Some(part) = part.filter(|p| p.inline) else { return Ok(None) };
        let key = slot.key();
        let body = cm
            .binary_data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| self.corrupt(format!("the head has no binaryData key {key} for its inline body")))?;
        if body.0.len() as u64 != part.body_bytes {
            let len = body.0.len();
            return Err(
                self.corrupt(format!("the inline {key} holds {len} body bytes, its head says {}", part.body_bytes))
            );
        }
        Ok(Some(body.0.clone()))
    }

    /// The head this store last read or wrote, or else the head as it is now.
    async fn last_or_read_head(&self) -> Result<ReadHead, SnapshotError> {
        match self.last.take() {
            Some(read) => Ok(read),
            None => self.read_head().await,
        }
    }

    /// Whether this import holds the snapshot `head`, after making it the holder unless it
    /// is another workspace's: held by another import that still exists (an import of the
    /// same cohort key in another Braze workspace), or labelled with another workspace.
    async fn adopt(&self, head: &ConfigMap) -> Result<Holding, SnapshotError> {
        let labels = head.metadata.labels.as_ref();
        let holder = labels.and_then(|l| l.get(SNAPSHOT_HOLDER_LABEL));
        if holder == Some(&self.uid) {
            return Ok(Holding::Held);
        }
        let annotations = head.metadata.annotations.as_ref();
        let last = annotations.and_then(|a| a.get(SNAPSHOT_IMPORT_ANNOTATION)).cloned().unwrap_or_default();
        if let (Some(theirs), Some(ours)) = (labels.and_then(|l| l.get(SNAPSHOT_WORKSPACE_LABEL)), &self.workspace)
            && theirs != ours
        {
            return Ok(Holding::Other(last));
        }
        if let Some(holder) = holder {
            let held = self.imports.list_metadata(&ListParams::default()).await.map_err(self.kube("list imports"))?;
            if let Some(other) = held.items.iter().find(|i| i.metadata.uid.as_deref() == Some(holder.as_str())) {
                return Ok(Holding::Other(other.metadata.name.clone().unwrap_or_default()));
            }
        }
        if self.read_only {
            return Ok(Holding::Held);
        }
        self.relabel_head("adopt the head", |meta| {
            let labels = meta.labels.get_or_insert_default();
            labels.insert(SNAPSHOT_HOLDER_LABEL.to_owned(), self.uid.clone());
            if let Some(workspace) = &self.workspace {
                labels.insert(SNAPSHOT_WORKSPACE_LABEL.to_owned(), workspace.clone());
            }
            meta.annotations
                .get_or_insert_default()
                .insert(SNAPSHOT_IMPORT_ANNOTATION.to_owned(), self.import_name.clone());
        })
        .await?;
        debug!(snapshot = %self.what(), previous = ?holder, "adopted the cohort's snapshot");
        Ok(Holding::Adopted)
    }

    /// Settles which key this store uses (see [`Self::with_alternate`]), moves the snapshot
    /// of an earlier version over to it, and adopts the snapshot under it. Returns the head
    /// as read, unless this changed it (then the caller reads it again).
    async fn settle_holder(&self, scratch: &Path) -> Result<Option<ReadHead>, SnapshotError> {
        for _ in 0..2 {
            let Some(head) = self.api.get_opt(&self.head_name()).await.map_err(self.kube("read the head"))? else {
                let moved = self.move_legacy(scratch).await?;
                return Ok((!moved).then(ReadHead::none));
            };
            let holder = match self.adopt(&head).await? {
                Holding::Held => return self.parse_head(&head).map(Some),
                Holding::Adopted => return Ok(None),
                Holding::Other(holder) => holder,
            };
            match &self.alternate {
                Some(alternate) if self.effective.get().is_none() => {
                    debug!(snapshot = %self.what(), %holder, %alternate, "the cohort's snapshot is another workspace's");
                    let _ = self.effective.set(alternate.clone());
                }
                _ => return Err(SnapshotError::Held { what: self.what(), holder }),
            }
        }
        Ok(None)
    }

    /// Moves the uid-keyed snapshot of an earlier version over to this key, keys in doubt
    /// included, in one switch of the new head; then deletes the old objects. Nothing to do
    /// once this key has a head. Whether it moved one.
    async fn move_legacy(&self, scratch: &Path) -> Result<bool, SnapshotError> {
        if self.read_only {
            return Ok(false);
        }
        let Some(legacy) = self.legacy_store() else { return Ok(false) };
        let old = legacy.read_head().await?;
        if old.resource_version.is_none() {
            return Ok(false);
        }
        let loaded = match legacy.load_once(old, scratch).await? {
            LoadAttempt::Loaded(loaded) => loaded,
            LoadAttempt::Moved(why) => {
                return Err(legacy.corrupt(format!("{why}; it cannot be moved to the cohort's snapshot")));
            }
        };
        let mut read = self.read_head().await?;
        if read.resource_version.is_some() {
            return Ok(false);
        }
        // Every serial is claimed before any chunk is written.
        let parts = u64::from(loaded.snapshot.is_some()) + u64::from(loaded.doubt.is_some());
        for _ in 0..parts {
            read = self.claim_serial(read).await?;
        }
        let mut serial = read.head.serial + 1 - parts;
        let mut head = read.head.clone();
        if let Some(snapshot) = loaded.snapshot {
            head.snapshot = Some(self.write_claimed(serial, snapshot.body).await?.part(snapshot.meta));
            serial += 1;
        }
        if let Some(doubt) = loaded.doubt {
            head.doubt = Some(self.write_claimed(serial, doubt.body).await?.part(doubt.meta));
        }
        let named = head.serials();
        if let Some(unnamed) = head.unnamed.as_mut() {
            unnamed.retain(|s| !named.contains(s));
        }
        self.put_head(&read, head, Bodies::default()).await?;
        legacy.delete().await?;
        debug!(snapshot = %self.what(), from = %legacy.what(), "moved a snapshot of an earlier version");
        Ok(true)
    }

    /// The uid-keyed store of an earlier version this one moves over, if any.
    fn legacy_store(&self) -> Option<Self> {
        let uid = self.legacy_uid.as_deref().filter(|uid| *uid != self.key())?;
        Some(Self {
            key: uid.to_owned(),
            legacy_uid: None,
            alternate: None,
            effective: OnceLock::new(),
            last: LastHead::default(),
            ..self.clone()
        })
    }

    /// `deletionPolicy: Retain`: the import goes, the snapshot stays, held by no one, for an
    /// import of the same cohort created later.
    pub async fn release_head(&self) -> Result<(), SnapshotError> {
        self.relabel_head("release the head", |meta| {
            meta.labels.get_or_insert_default().remove(SNAPSHOT_HOLDER_LABEL);
        })
        .await
    }

    /// Changes the head's metadata with `change` (a replace conditioned on what was read, so
    /// within the `update` right the store already needs); nothing when there is no head.
    async fn relabel_head(&self, action: &'static str, change: impl Fn(&mut ObjectMeta)) -> Result<(), SnapshotError> {
        for _ in 0..LOAD_ATTEMPTS {
            let Some(mut cm) = self.api.get_opt(&self.head_name()).await.map_err(self.kube(action))? else {
                return Ok(());
            };
            change(&mut cm.metadata);
            match self.api.replace(&self.head_name(), &Self::post_params(), &cm).await {
                Ok(_) => return Ok(()),
                Err(e) if is_conflict(&e) => continue,
                Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
                Err(e) => return Err(self.kube(action)(e)),
            }
        }
        Err(SnapshotError::Kube { what: self.what(), action, message: "the head kept changing".into() })
    }

    /// Deletes this cohort's chunks whose serial is at most `up_to` and not in `keep`, found
    /// by listing them: for heads that do not list their unnamed serials. Chunks of later
    /// serials belong to writes that may still be going on.
    async fn delete_stale_chunks(&self, up_to: u64, keep: &BTreeSet<u64>) -> Result<(), SnapshotError> {
        let listed = self
            .api
            .list_metadata(&ListParams::default().labels(&self.chunk_selector()))
            .await
            .map_err(self.kube("list snapshot chunks"))?;
        let stale: BTreeSet<u64> = listed
            .items
            .iter()
            .filter_map(|c| c.metadata.labels.as_ref()?.get(SNAPSHOT_SERIAL_LABEL)?.parse().ok())
            .filter(|serial| *serial <= up_to && !keep.contains(serial))
            .collect();
        self.delete_serials(&stale).await
    }

    /// Deletes the chunks of `serials`, in one request.
    async fn delete_serials(&self, serials: &BTreeSet<u64>) -> Result<(), SnapshotError> {
        if serials.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = serials.iter().map(u64::to_string).collect();
        let selector = format!("{},{SNAPSHOT_SERIAL_LABEL} in ({})", self.chunk_selector(), list.join(","));
        self.delete_chunks(&selector).await
    }

    fn chunk_selector(&self) -> String {
        format!("{SNAPSHOT_OF_LABEL}={},{SNAPSHOT_PART_LABEL}=chunk", self.key())
    }

    async fn delete_chunks(&self, selector: &str) -> Result<(), SnapshotError> {
        self.api
            .delete_collection(&DeleteParams::default(), &ListParams::default().labels(selector))
            .await
            .map_err(self.kube("delete unused snapshot chunks"))?;
        Ok(())
    }

    /// Uploads `file` from where it stands as chunks of `body` under `serial`; `None` when a
    /// chunk of that name exists already.
    async fn write_chunks(&self, serial: u64, mut file: File, body: Body) -> Result<Option<Location>, SnapshotError> {
        let pp = Self::post_params();
        let mut piece = vec![0u8; self.chunk_bytes];
        let (mut chunks, mut bytes) = (0u32, 0u64);
        loop {
            let n = read_full(&mut file, &mut piece).map_err(self.io("read the new body"))?;
            if n == 0 {
                return Ok(Some(Location { serial, chunks, body_bytes: bytes, inline: false }));
            }
            let cm = ConfigMap {
                metadata: self.object_meta(
                    self.chunk_name_of(body, serial, chunks),
                    [(SNAPSHOT_PART_LABEL, "chunk".into()), (SNAPSHOT_SERIAL_LABEL, serial.to_string())],
                ),
                binary_data: Some(BTreeMap::from([(BODY_KEY.to_owned(), ByteString(piece[..n].to_vec()))])),
                ..ConfigMap::default()
            };
            match self.api.create(&pp, &cm).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_already_exists() => return Ok(None),
                Err(e) => return Err(self.kube("create a chunk")(e)),
            }
            chunks += 1;
            bytes += n as u64;
        }
    }

    /// [`Self::write_chunks`] under a serial this writer claimed: nobody else writes there.
    async fn write_claimed(&self, serial: u64, file: File) -> Result<Location, SnapshotError> {
        self.write_chunks(serial, file, Body::Main).await?.ok_or_else(|| SnapshotError::Kube {
            what: self.what(),
            action: "create a chunk",
            message: format!("a chunk of the claimed serial {serial} exists already"),
        })
    }

    /// Writes `head` over the head as `read`, if nobody changed it since, with `bodies` for
    /// its inline parts; returns the head as written.
    async fn put_head(&self, read: &ReadHead, head: Head, bodies: Bodies) -> Result<ReadHead, SnapshotError> {
        let pp = Self::post_params();
        let bodies = bodies.of(&head);
        let mut inline = BTreeMap::new();
        let inline_bytes = |inline: bool, bytes: u64| inline.then_some(bytes);
        let parts = [
            (Slot::Snapshot, head.snapshot.as_ref().and_then(|p| inline_bytes(p.inline, p.body_bytes))),
            (Slot::Doubt, head.doubt.as_ref().and_then(|p| inline_bytes(p.inline, p.body_bytes))),
        ];
        for (slot, bytes) in parts {
            let Some(bytes) = bytes else { continue };
            let body = bodies.get(slot).filter(|b| b.len() as u64 == bytes);
            let body = body.ok_or_else(|| self.corrupt(format!("no body for the inline {} to write", slot.key())))?;
            inline.insert(slot.key().to_owned(), ByteString(body.clone()));
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                resource_version: read.resource_version.clone(),
                ..self.object_meta(
                    self.head_name(),
                    [(SNAPSHOT_PART_LABEL, "head".into()), (SNAPSHOT_GENERATION_LABEL, head.generation().to_string())],
                )
            },
            data: Some(BTreeMap::from([(
                HEAD_KEY.to_owned(),
                serde_json::to_string(&head).expect("the snapshot head serializes"),
            )])),
            binary_data: (!inline.is_empty()).then_some(inline),
            ..ConfigMap::default()
        };
        let written = match read.resource_version {
            Some(_) => self.api.replace(&self.head_name(), &pp, &cm).await,
            None => self.api.create(&pp, &cm).await,
        };
        match written {
            Ok(cm) => Ok(ReadHead { head, resource_version: cm.metadata.resource_version, bodies }),
            Err(e) if is_conflict(&e) => {
                let now = self.read_head().await.map(|r| r.head.generation()).unwrap_or(0);
                Err(SnapshotError::Conflict { what: self.what(), expected: read.head.generation(), found: now })
            }
            Err(e) => Err(self.kube("update the head")(e)),
        }
    }

    /// Claims the next serial for a write. A head that does not list its unnamed serials (one
    /// of an earlier version) has what earlier writes left found by listing, and deleted now.
    async fn claim_serial(&self, read: ReadHead) -> Result<ReadHead, SnapshotError> {
        let mut claimed = self.put_head(&read, read.head.claimed(), read.bodies.clone()).await?;
        if claimed.head.unnamed.is_none() {
            self.delete_stale_chunks(claimed.head.serial, &claimed.head.serials()).await?;
            claimed.head.unnamed = Some(BTreeSet::from([claimed.head.serial]));
        }
        Ok(claimed)
    }

    /// Writes `body` — the new `slot` part — into the head if it is small, else under the
    /// serial `read` reserved, or else under a freshly claimed one, and the plan `plan_body`
    /// (if any) in its own chunks under the same serial; then switches the head to what
    /// `next` makes of it and the new parts' locations.
    async fn write(
        &self,
        read: ReadHead,
        slot: Slot,
        body: &Path,
        plan_body: Option<&Path>,
        next: impl FnOnce(Head, Location, Option<Location>) -> Head,
    ) -> Result<(), SnapshotError> {
        if plan_body.is_none()
            && let Some(bytes) = self.small_body(&read, body)?
        {
            return self.write_inline(read, slot, bytes, |head, at| next(head, at, None)).await;
        }
        let (base, at) = self.place(read, body).await?;
        let (serial, owned) = (at.serial, at.chunks > 0);
        let plan_at = match plan_body {
            Some(plan_body) => Some(self.write_plan_chunks(&base, serial, plan_body).await?),
            None => None,
        };
        let left = self.delete_garbage(&base.head.garbage(serial).unwrap_or_default()).await;
        let head = base.head.switched(next(base.head.clone(), at, plan_at), serial, left);
        let replaced = base.head.replaced_by(&head);
        match self.put_head(&base, head, base.bodies.clone()).await {
            Ok(written) => self.last.set(written),
            Err(e) => {
                // Overtaken: this writer made chunk 0 of `serial`, so no head names it.
                if matches!(e, SnapshotError::Conflict { .. }) && owned {
                    let _ = self.delete_serials(&BTreeSet::from([serial])).await;
                }
                return Err(e);
            }
        }
        self.delete_replaced(&base.head, &replaced).await;
        Ok(())
    }

    /// The replaced bodies are garbage once the head no longer names them. A replaced
    /// snapshot (the whole cohort) goes at once; keys in doubt are few, and the next write
    /// deletes what is left anyway.
    async fn delete_replaced(&self, base: &Head, replaced: &BTreeSet<u64>) {
        let snapshot_replaced = base.snapshot.as_ref().is_some_and(|s| !s.inline && replaced.contains(&s.serial));
        if !snapshot_replaced {
            return;
        }
        if let Err(e) = self.delete_serials(replaced).await {
            warn!(snapshot = %self.what(), error = %e, "could not delete replaced snapshot chunks; the next write will");
        }
    }

    /// The bytes of `body` when it is small enough to keep in the head `read`; `None` for a
    /// larger body, or over a head of an earlier version (whose garbage a chunked write
    /// finds by listing first).
    fn small_body(&self, read: &ReadHead, body: &Path) -> Result<Option<Vec<u8>>, SnapshotError> {
        if self.inline_bytes == 0 || read.head.unnamed.is_none() {
            return Ok(None);
        }
        let len = std::fs::metadata(body).map_err(self.io("open the new body"))?.len();
        // (A body is never empty, a zstd frame at least; an empty `binaryData` value is one
        // this API server build refuses as null.)
        if len == 0 || len > self.inline_bytes as u64 {
            return Ok(None);
        }
        std::fs::read(body).map(Some).map_err(self.io("read the new body"))
    }

    /// Switches the head to what `next` makes of it with `body` as its inline `slot` part:
    /// one conditional update, after deleting the garbage it lists (none, in the steady state).
    async fn write_inline(
        &self,
        base: ReadHead,
        slot: Slot,
        body: Vec<u8>,
        next: impl FnOnce(Head, Location) -> Head,
    ) -> Result<(), SnapshotError> {
        let left = self.delete_garbage(&base.head.garbage_inline().unwrap_or_default()).await;
        let at = Location::inline(body.len() as u64);
        let head = base.head.switched_inline(next(base.head.clone(), at), left);
        let replaced = base.head.replaced_by(&head);
        let mut bodies = base.bodies.clone();
        bodies.set(slot, body);
        let written = self.put_head(&base, head, bodies).await?;
        self.last.set(written);
        self.delete_replaced(&base.head, &replaced).await;
        Ok(())
    }

    /// Writes `body`'s chunks under the serial `read` reserved, or else under a freshly
    /// claimed one; the head to switch from (the claimed one, if claimed) and where they are.
    async fn place(&self, read: ReadHead, body: &Path) -> Result<(ReadHead, Location), SnapshotError> {
        let open = || File::open(body).map_err(self.io("open the new body"));
        let reserved = match read.head.reservation() {
            Some(serial) => self.write_chunks(serial, open()?, Body::Main).await?,
            None => None,
        };
        if let Some(at) = reserved {
            return Ok((read, at));
        }
        // No reservation, or its serial is taken (a write there crashed or goes on): claim.
        let claimed = self.claim_serial(read).await?;
        let serial = claimed.head.serial;
        let at = match self.write_chunks(serial, open()?, Body::Main).await? {
            Some(at) => at,
            // Chunks left under the claimed serial by a head deleted before this one was
            // made: found by listing, deleted, and written again.
            None => {
                self.delete_stale_chunks(serial, &claimed.head.serials()).await?;
                self.write_claimed(serial, open()?).await?
            }
        };
        Ok((claimed, at))
    }

    /// Writes a plan's body in chunks of its own under `serial`, whose chunk 0 this writer
    /// made. A plan chunk in the way (left by a deletion cut short) fails the write as a
    /// conflict: the caller reads the head again and writes under another serial, and this
    /// one is collected as garbage (the head lists it unnamed).
    async fn write_plan_chunks(&self, base: &ReadHead, serial: u64, body: &Path) -> Result<Location, SnapshotError> {
        let file = File::open(body).map_err(self.io("open the plan's body"))?;
        let generation = base.head.generation();
        self.write_chunks(serial, file, Body::Plan).await?.ok_or_else(|| SnapshotError::Conflict {
            what: self.what(),
            expected: generation,
            found: generation,
        })
    }

    /// Deletes the `garbage` a head lists, before a switch; returns the serials it could not
    /// delete, for the new head to keep listing.
    async fn delete_garbage(&self, garbage: &BTreeSet<u64>) -> BTreeSet<u64> {
        match self.delete_serials(garbage).await {
            Ok(()) => BTreeSet::new(),
            Err(e) => {
                warn!(snapshot = %self.what(), error = %e, "could not delete unused snapshot chunks; the next write will");
                garbage.clone()
            }
        }
    }

    /// The body of `part`: in a new scratch file from the head's `inline` bytes, or else
    /// downloaded from its chunks ([`Self::download`]).
    async fn open_part<M>(
        &self,
        part: &Part<M>,
        inline: Option<&Vec<u8>>,
        scratch: &Path,
        body: Body,
    ) -> Result<Option<File>, SnapshotError> {
        if !part.inline {
            return self.download(part, scratch, body).await;
        }
        let bytes = inline.ok_or_else(|| self.corrupt("the head has no body for its inline part".into()))?;
        let mut file = tempfile::tempfile_in(scratch).map_err(self.io("create a scratch file"))?;
        file.write_all(bytes).map_err(self.io("write a scratch file"))?;
        file.seek(SeekFrom::Start(0)).map_err(self.io("rewind a scratch file"))?;
        Ok(Some(file))
    }

    /// Downloads the chunks of `part` into a new scratch file; `None` if one is gone.
    async fn download<M>(&self, part: &Part<M>, scratch: &Path, body: Body) -> Result<Option<File>, SnapshotError> {
        let mut file = tempfile::tempfile_in(scratch).map_err(self.io("create a scratch file"))?;
        let mut copied = 0u64;
        for index in 0..part.chunks {
            let name = self.chunk_name_of(body, part.serial, index);
            let Some(cm) = self.api.get_opt(&name).await.map_err(self.kube("read a chunk"))? else {
                debug!(snapshot = %self.what(), chunk = %name, "chunk gone: the snapshot was replaced while reading");
                return Ok(None);
            };
            let bytes = cm
                .binary_data
                .as_ref()
                .and_then(|d| d.get(BODY_KEY))
                .ok_or_else(|| self.corrupt(format!("chunk {name} has no binaryData key {BODY_KEY}")))?;
            file.write_all(&bytes.0).map_err(self.io("write a scratch file"))?;
            copied += bytes.0.len() as u64;
        }
        if copied != part.body_bytes {
            return Err(self.corrupt(format!(
                "serial {} holds {copied} body bytes, its head says {}",
                part.serial, part.body_bytes
            )));
        }
        file.seek(SeekFrom::Start(0)).map_err(self.io("rewind a scratch file"))?;
        Ok(Some(file))
    }

    /// The bodies `read` names, downloaded.
    async fn load_once(&self, read: ReadHead, scratch: &Path) -> Result<LoadAttempt, SnapshotError> {
        let head = &read.head;
        let mut loaded = Loaded::default();
        let missing = |serial: u64| Ok(LoadAttempt::Moved(format!("a chunk of serial {serial} is missing")));
        if let Some(part) = &head.snapshot {
            let inline = read.bodies.snapshot.as_ref();
            let Some(body) = self.open_part(part, inline, scratch, Body::Main).await? else {
                return missing(part.serial);
            };
            loaded.snapshot = Some(StoredSnapshot { meta: part.meta.clone(), body });
        }
        if let Some(part) = head.current_doubt() {
            let inline = read.bodies.doubt.as_ref();
            let Some(mut body) = self.open_part(part, inline, scratch, Body::Main).await? else {
                return missing(part.serial);
            };
            // Cut first: whatever becomes of the plan, the keys in doubt are read alone.
            let appended = self.cut_appended_plan(&mut body, part, head.plan.as_ref(), scratch)?;
            loaded.plan = match head.current_plan() {
                Some(plan) => {
                    let Some(plan_body) = self.download(plan, scratch, Body::Plan).await? else {
                        return missing(plan.serial);
                    };
                    self.checked_plan(plan.meta.clone(), &part.meta, plan_body, 0)
                }
                None => appended,
            };
            loaded.doubt = Some(StoredDoubt { meta: part.meta.clone(), body });
        }
        self.loaded.set(Some(read.resource_version.clone()));
        self.last.set(read);
        Ok(LoadAttempt::Loaded(Box::new(loaded)))
    }

    /// `plan`, when it checks out against the keys in doubt `doubt`; else `None` (its keys
    /// stay in doubt, every one sent again), with a warning.
    fn checked_plan(&self, plan: PlanMeta, doubt: &DoubtMeta, body: File, offset: u64) -> Option<StoredPlan> {
        if let Err(e) = plan.check(&self.what(), doubt) {
            warn!(snapshot = %self.what(), error = %e, "ignoring a checkpoint that does not check out");
            return None;
        }
        Some(StoredPlan { meta: plan, body, offset })
    }

    /// Cuts the body of a plan the first version with checkpoints appended ([`Head::plan`])
    /// off the downloaded doubt part `body` — before anything else, so a plan that does not
    /// check out still leaves the keys in doubt whole — and returns that plan if it belongs
    /// to them and checks out.
    fn cut_appended_plan(
        &self,
        body: &mut File,
        part: &Part<DoubtMeta>,
        plan: Option<&PlanMeta>,
        scratch: &Path,
    ) -> Result<Option<StoredPlan>, SnapshotError> {
        let Some(plan) = plan else { return Ok(None) };
        let doubt_bytes = self.doubt_bytes(part, plan.body_bytes())?;
        let mut tail = tempfile::tempfile_in(scratch).map_err(self.io("create a scratch file"))?;
        (|| {
            body.seek(SeekFrom::Start(doubt_bytes))?;
            std::io::copy(&mut (&*body).take(plan.body_bytes()), &mut tail)?;
            body.set_len(doubt_bytes)?;
            body.seek(SeekFrom::Start(0))?;
            tail.seek(SeekFrom::Start(0))
        })()
        .map_err(self.io("split the plan from the keys in doubt"))?;
        if !plan.belongs_to(&part.meta) {
            return Ok(None);
        }
        Ok(self.checked_plan(plan.clone(), &part.meta, tail, 0))
    }

    /// Bytes of the keys in doubt in `part`, when `appended` bytes of a plan follow them.
    fn doubt_bytes(&self, part: &Part<DoubtMeta>, appended: u64) -> Result<u64, SnapshotError> {
        part.body_bytes.checked_sub(appended).ok_or_else(|| {
            self.corrupt(format!("the keys in doubt hold {} bytes, their plan says {appended}", part.body_bytes))
        })
    }
}

impl ClusterSnapshotStore {
    /// Records keys in doubt merged with those already recorded on the same generation
    /// ([`super::doubt`]), and `plan` with them if the head is the one the last load read;
    /// the head's `resourceVersion` guards the read-merge-write. Whether `plan` was recorded.
    async fn record_doubt_once(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: Option<(&PlanMeta, &Path)>,
    ) -> Result<bool, SnapshotError> {
        let read = self.last_or_read_head().await?;
        let found = read.head.generation();
        if found != meta.base_generation {
            return Err(SnapshotError::Conflict { what: self.what(), expected: meta.base_generation, found });
        }
        let scratch = body.parent().unwrap_or(Path::new("."));
        let merged = match read.head.current_doubt() {
            Some(stored) => {
                let (appended, inline) = (read.head.appended_plan_bytes(), read.bodies.doubt.as_ref());
                Some(self.merge_stored((stored, inline), appended, meta, body, scratch).await?)
            }
            None => None,
        };
        let (meta, doubt_body) = match &merged {
            Some((meta, file)) => (meta.clone(), file.path()),
            None => (meta.clone(), body),
        };
        // A plan covers every key in doubt, or it is not recorded.
        let unchanged = self.loaded.is(&read.resource_version);
        let plan = plan.filter(|(p, _)| unchanged && p.check(&self.what(), &meta).is_ok());
        let recorded = plan.is_some();
        let (plan, plan_body) = plan.map(|(p, b)| (p.clone(), b)).unzip();
        self.write(read, Slot::Doubt, doubt_body, plan_body, |head, at, plan_at| Head {
            doubt: Some(at.part(meta)),
            plan: None,
            plan_part: plan_at.zip(plan).map(|(at, plan)| at.part(plan)),
            ..head
        })
        .await?;
        Ok(recorded)
    }

    /// The stored keys in doubt (without the `appended` bytes of a plan after them, in a head
    /// of the first version with checkpoints; with their body when inline) merged with the
    /// body `ours`.
    async fn merge_stored(
        &self,
        (stored, inline): (&Part<DoubtMeta>, Option<&Vec<u8>>),
        appended: u64,
        meta: &DoubtMeta,
        ours: &Path,
        scratch: &Path,
    ) -> Result<(DoubtMeta, tempfile::NamedTempFile), SnapshotError> {
        let doubt_bytes = self.doubt_bytes(stored, appended)?;
        let Some(file) = self.open_part(stored, inline, scratch, Body::Main).await? else {
            // Replaced while reading: the caller reads the head again.
            let found = meta.base_generation;
            return Err(SnapshotError::Conflict { what: self.what(), expected: found, found });
        };
        file.set_len(doubt_bytes).map_err(self.io("split the plan from the keys in doubt"))?;
        let merged = tempfile::NamedTempFile::new_in(scratch).map_err(self.io("create a scratch file"))?;
        let (what, ours, out, meta) = (self.what(), ours.to_owned(), merged.path().to_owned(), meta.clone());
        let meta = tokio::task::spawn_blocking(move || super::doubt::merge_record(&what, file, &meta, &ours, &out))
            .await
            .map_err(|e| self.io("merge the keys in doubt")(std::io::Error::other(e)))??;
        Ok((meta, merged))
    }

    /// Writes `progress` into the head, if it still holds `plan` (a change of labels in
    /// between is read again and written over; anything else is another attempt's). A head
    /// that kept changing under it while still holding `plan` is no other attempt's doing:
    /// that fails as trouble with the API server, which the caller tries again.
    async fn checkpoint_once(&self, plan: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
        for _ in 0..LOAD_ATTEMPTS {
            let read = self.last_or_read_head().await?;
            let mut head = read.head.clone();
            let ours = head.current_plan().is_some_and(|p| p.meta.belongs_to_plan(plan));
            let Some(stored) = head.plan_part.as_mut().filter(|_| ours) else {
                return Err(SnapshotError::Overtaken { what: self.what() });
            };
            stored.meta.progress = progress.clone();
            match self.put_head(&read, head, read.bodies.clone()).await {
                Ok(written) => {
                    self.last.set(written);
                    return Ok(());
                }
                Err(SnapshotError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(SnapshotError::Kube {
            what: self.what(),
            action: "write a checkpoint",
            message: format!("the head kept changing ({LOAD_ATTEMPTS} conflicts in a row)"),
        })
    }

    /// Commits over `read`, if it holds the generation `meta` follows.
    async fn commit_over(&self, read: ReadHead, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        let found = read.head.snapshot.as_ref().map(|s| s.meta.generation);
        if found != previous_generation(meta) {
            return Err(SnapshotError::Conflict {
                what: self.what(),
                expected: previous_generation(meta).unwrap_or(0),
                found: found.unwrap_or(0),
            });
        }
        self.write(read, Slot::Snapshot, body, None, |head, at, _| Head {
            snapshot: Some(at.part(meta.clone())),
            doubt: None,
            plan: None,
            plan_part: None,
            ..head
        })
        .await
    }
}

impl ClusterSnapshotStore {
    /// [`Self::record_doubt_once`], again when another run recording its keys at the same
    /// time made the head move under this one: read it again and merge with what that run
    /// recorded (the plan then stays out: the head is not the one loaded).
    async fn record_doubt_retried(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: Option<(&PlanMeta, &Path)>,
    ) -> Result<bool, SnapshotError> {
        let mut tries = 3;
        loop {
            tries -= 1;
            match self.record_doubt_once(meta, body, plan).await {
                Err(SnapshotError::Conflict { found, .. }) if found == meta.base_generation && tries > 0 => {}
                done => return done,
            }
        }
    }
}

/// Whether an import holds the snapshot it found.
enum Holding {
    /// It did already.
    Held,
    /// It does now: the head changed.
    Adopted,
    /// The import named holds it (or last held it, in another workspace).
    Other(String),
}

impl ReadHead {
    /// No head yet: the first write creates it, under serial 1 unless chunks of a head
    /// deleted before are in the way.
    fn none() -> Self {
        ReadHead { head: Head::new(), resource_version: None, bodies: Bodies::default() }
    }
}

fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({} {})", status.message, status.code, status.reason),
        other => other.to_string(),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

#[async_trait::async_trait]
impl SnapshotStore for ClusterSnapshotStore {
    fn describe(&self) -> String {
        self.what()
    }

    async fn load(&self, scratch: &Path) -> Result<Loaded, SnapshotError> {
        let mut read = self.settle_holder(scratch).await?;
        if self.read_only
            && read.as_ref().is_some_and(|r| r.resource_version.is_none())
            && let Some(legacy) = self.legacy_store()
        {
            // Where a run would move it from.
            return legacy.load(scratch).await;
        }
        let mut why = String::new();
        for _ in 0..LOAD_ATTEMPTS {
            let head = match read.take() {
                Some(head) => head,
                None => self.read_head().await?,
            };
            match self.load_once(head, scratch).await? {
                LoadAttempt::Loaded(loaded) => return Ok(*loaded),
                LoadAttempt::Moved(reason) => why = reason,
            }
        }
        Err(self.corrupt(format!("{why} (after {LOAD_ATTEMPTS} attempts)")))
    }

    async fn record_doubt(&self, meta: &DoubtMeta, body: &Path) -> Result<(), SnapshotError> {
        // Another run recording its keys at the same time makes the head move under this
        // one: read it again and merge with what that run recorded.
        self.record_doubt_retried(meta, body, None).await.map(|_| ())
    }

    async fn record_doubt_with_plan(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: &PlanMeta,
        plan_body: &Path,
    ) -> Result<bool, SnapshotError> {
        self.record_doubt_retried(meta, body, Some((plan, plan_body))).await
    }

    async fn checkpoint(&self, plan: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
        self.checkpoint_once(plan, progress).await
    }

    async fn commit(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        if let Some(last) = self.last.take() {
            match self.commit_over(last, meta, body).await {
                // The head changed since this store saw it: look again.
                Err(SnapshotError::Conflict { .. }) => {}
                done => return done,
            }
        }
        self.commit_over(self.read_head().await?, meta, body).await
    }

    async fn delete(&self) -> Result<(), SnapshotError> {
        // The head first: without it the chunks are garbage, never a torn snapshot.
        match self.api.delete(&self.head_name(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(self.kube("delete the head")(e)),
        }
        self.delete_chunks(&self.chunk_selector()).await
    }

    async fn release(&self) -> Result<(), SnapshotError> {
        self.release_head().await
    }

    fn key(&self) -> Option<String> {
        Some(ClusterSnapshotStore::key(self).to_owned())
    }
}

/// One cohort's snapshot as `cohort-operator snapshots` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotListing {
    pub namespace: String,
    /// The head ConfigMap.
    pub head: String,
    /// The cohort, as the head's annotation describes it.
    pub cohort: String,
    /// The import that holds it, or last held it when `released`.
    pub import: String,
    /// No import holds it (deleted with `deletionPolicy: Retain`): an import of the same
    /// cohort created later adopts it.
    pub released: bool,
    pub generation: u64,
    pub members: u64,
    pub committed_at: Option<jiff::Timestamp>,
}

/// Every cohort snapshot kept as ConfigMaps, in `namespace` or in every namespace.
pub async fn list_snapshots(
    client: kube::Client,
    namespace: Option<&str>,
) -> Result<Vec<SnapshotListing>, kube::Error> {
    let api: Api<ConfigMap> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let heads = api.list(&ListParams::default().labels(&format!("{SNAPSHOT_PART_LABEL}=head"))).await?;
    let mut listed: Vec<SnapshotListing> = heads.items.iter().map(listing).collect();
    listed.sort_by(|a, b| (&a.namespace, &a.head).cmp(&(&b.namespace, &b.head)));
    Ok(listed)
}

fn listing(cm: &ConfigMap) -> SnapshotListing {
    let text = |map: Option<&BTreeMap<String, String>>, key: &str| map.and_then(|m| m.get(key)).cloned();
    let head: Option<Head> = text(cm.data.as_ref(), HEAD_KEY).and_then(|json| serde_json::from_str(&json).ok());
    let snapshot = head.as_ref().and_then(|h| h.snapshot.as_ref());
    SnapshotListing {
        namespace: cm.namespace().unwrap_or_default(),
        head: cm.name_any(),
        cohort: text(cm.metadata.annotations.as_ref(), SNAPSHOT_COHORT_ANNOTATION).unwrap_or_else(|| "-".into()),
        import: text(cm.metadata.annotations.as_ref(), SNAPSHOT_IMPORT_ANNOTATION).unwrap_or_else(|| "-".into()),
        released: text(cm.metadata.labels.as_ref(), SNAPSHOT_HOLDER_LABEL).is_none(),
        generation: snapshot.map_or(0, |s| s.meta.generation),
        members: snapshot.map_or(0, |s| s.meta.members),
        committed_at: snapshot.map(|s| s.meta.committed_at),
    }
}

/// Reads until `buf` is full or the input ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
