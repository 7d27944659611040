//! Snapshots kept in the cluster, as ConfigMaps owned by the `CohortImport`.
//!
//! Layout, for an import with uid `U` and snapshot generation `G`:
//! - `cohort-snapshot-U` — the head: [`SnapshotMeta`], the generation's chunk count and
//!   body length (`data["snapshot.json"]`);
//! - `cohort-snapshot-U-gG-0`, `-1`, … — the compressed body, cut into `binaryData["body"]`
//!   pieces of at most 900 KiB, well under etcd's 1.5 MiB request limit.
//!
//! A commit writes every chunk of the new generation, then switches the head to it with an
//! update conditioned on the head's `resourceVersion`, then deletes the old generation's
//! chunks. A crash before the switch leaves the old snapshot whole (plus unreferenced chunks,
//! which the next commit deletes first); after it, the new one. Readers follow the head, so
//! they never see a torn snapshot. Every object carries an ownerReference to the import, so
//! Kubernetes' garbage collector removes the snapshot with it.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{SnapshotError, SnapshotMeta, SnapshotStore, StoredSnapshot, previous_generation};
use crate::api::{CohortImport, FIELD_MANAGER};

/// Largest body piece per ConfigMap. A ConfigMap holds at most 1 MiB; etcd takes requests
/// up to 1.5 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 900 * 1024;

/// Label: uid of the import a snapshot object belongs to.
pub const SNAPSHOT_OF_LABEL: &str = "cohorts.dev/snapshot-of";
/// Label: `head` or `chunk`.
pub const SNAPSHOT_PART_LABEL: &str = "cohorts.dev/snapshot-part";
/// Label: the generation a chunk belongs to (on the head: the current generation).
pub const SNAPSHOT_GENERATION_LABEL: &str = "cohorts.dev/snapshot-generation";
/// Annotation: the import's name, for people listing ConfigMaps.
pub const SNAPSHOT_IMPORT_ANNOTATION: &str = "cohorts.dev/import";

const HEAD_KEY: &str = "snapshot.json";
const BODY_KEY: &str = "body";
/// A reader that finds a chunk gone (a commit replaced the snapshot meanwhile) starts over.
const LOAD_ATTEMPTS: usize = 3;

/// What the head ConfigMap says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    meta: SnapshotMeta,
    chunks: u32,
    body_bytes: u64,
}

/// The snapshot of one import, in its namespace.
#[derive(Clone)]
pub struct ClusterSnapshotStore {
    api: Api<ConfigMap>,
    namespace: String,
    import_name: String,
    uid: String,
    chunk_bytes: usize,
}

impl std::fmt::Debug for ClusterSnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ClusterSnapshotStore {
    /// The snapshot of `import`, which must have been read from the API server (it needs
    /// the namespace and uid).
    pub fn new(client: kube::Client, import: &CohortImport) -> Result<Self, SnapshotError> {
        let missing = |field: &str| SnapshotError::Kube {
            what: format!("of CohortImport {}", import.name_any()),
            action: "identify the import",
            message: format!("metadata.{field} is not set; use the object as read from the API server"),
        };
        let namespace = import.namespace().ok_or_else(|| missing("namespace"))?;
        let uid = import.uid().ok_or_else(|| missing("uid"))?;
        Ok(Self::for_owner(client, &namespace, &import.name_any(), &uid))
    }

    /// The snapshot of the import `namespace/name` with `uid`.
    pub fn for_owner(client: kube::Client, namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            import_name: name.to_owned(),
            uid: uid.to_owned(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }

    /// Cuts bodies into pieces of at most `bytes` (tests use small ones).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.clamp(1, DEFAULT_CHUNK_BYTES);
        self
    }

    /// Name of the head ConfigMap.
    pub fn head_name(&self) -> String {
        format!("cohort-snapshot-{}", self.uid)
    }

    /// Name of chunk `index` of generation `generation`.
    pub fn chunk_name(&self, generation: u64, index: u32) -> String {
        format!("cohort-snapshot-{}-g{generation}-{index}", self.uid)
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

    fn owner(&self) -> OwnerReference {
        OwnerReference {
            api_version: CohortImport::api_version(&()).into_owned(),
            kind: CohortImport::kind(&()).into_owned(),
            name: self.import_name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            // Setting blockOwnerDeletion needs rights on the owner's finalizers; not needed.
            block_owner_deletion: None,
        }
    }

    fn object_meta(&self, name: String, part: &str, generation: u64) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(BTreeMap::from([
                (SNAPSHOT_OF_LABEL.to_owned(), self.uid.clone()),
                (SNAPSHOT_PART_LABEL.to_owned(), part.to_owned()),
                (SNAPSHOT_GENERATION_LABEL.to_owned(), generation.to_string()),
                ("app.kubernetes.io/managed-by".to_owned(), "cohort-operator".to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                SNAPSHOT_IMPORT_ANNOTATION.to_owned(),
                self.import_name.clone(),
            )])),
            owner_references: Some(vec![self.owner()]),
            ..ObjectMeta::default()
        }
    }

    async fn head(&self) -> Result<Option<(Head, ConfigMap)>, SnapshotError> {
        let Some(cm) = self.api.get_opt(&self.head_name()).await.map_err(self.kube("read the head"))? else {
            return Ok(None);
        };
        let json = cm
            .data
            .as_ref()
            .and_then(|d| d.get(HEAD_KEY))
            .ok_or_else(|| self.corrupt(format!("the head has no data key {HEAD_KEY}")))?;
        let head: Head =
            serde_json::from_str(json).map_err(|e| self.corrupt(format!("the head: {e}")))?;
        head.meta.check(&self.what())?;
        Ok(Some((head, cm)))
    }

    /// Deletes chunks selected by `extra` (a label selector added to this import's chunks).
    async fn delete_chunks(&self, extra: Option<String>) -> Result<(), SnapshotError> {
        let mut selector = format!("{SNAPSHOT_OF_LABEL}={},{SNAPSHOT_PART_LABEL}=chunk", self.uid);
        if let Some(extra) = extra {
            selector.push(',');
            selector.push_str(&extra);
        }
        self.api
            .delete_collection(&DeleteParams::default(), &ListParams::default().labels(&selector))
            .await
            .map_err(self.kube("delete old snapshot chunks"))?;
        Ok(())
    }

    /// One attempt at copying the current snapshot into `file`.
    async fn load_into(&self, file: &mut std::fs::File) -> Result<LoadAttempt, SnapshotError> {
        let Some((head, _)) = self.head().await? else {
            return Ok(LoadAttempt::None);
        };
        file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).map_err(self.io("reset the scratch file"))?;
        let generation = head.meta.generation;
        let mut copied = 0u64;
        for index in 0..head.chunks {
            let name = self.chunk_name(generation, index);
            let Some(cm) = self.api.get_opt(&name).await.map_err(self.kube("read a chunk"))? else {
                return Ok(LoadAttempt::Moved(format!("chunk {name} is missing")));
            };
            let bytes = cm
                .binary_data
                .as_ref()
                .and_then(|d| d.get(BODY_KEY))
                .ok_or_else(|| self.corrupt(format!("chunk {name} has no binaryData key {BODY_KEY}")))?;
            file.write_all(&bytes.0).map_err(self.io("write the scratch file"))?;
            copied += bytes.0.len() as u64;
        }
        if copied != head.body_bytes {
            return Err(self.corrupt(format!(
                "generation {generation} holds {copied} body bytes, its head says {}",
                head.body_bytes
            )));
        }
        file.seek(SeekFrom::Start(0)).map_err(self.io("rewind the scratch file"))?;
        Ok(LoadAttempt::Loaded(head.meta))
    }
}

enum LoadAttempt {
    None,
    Loaded(SnapshotMeta),
    Moved(String),
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

    async fn load(&self, scratch: &Path) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let mut file = tempfile::tempfile_in(scratch).map_err(self.io("create a scratch file"))?;
        let mut why = String::new();
        for _ in 0..LOAD_ATTEMPTS {
            match self.load_into(&mut file).await? {
                LoadAttempt::None => return Ok(None),
                LoadAttempt::Loaded(meta) => return Ok(Some(StoredSnapshot { meta, body: file })),
                LoadAttempt::Moved(reason) => {
                    debug!(snapshot = %self.what(), %reason, "snapshot replaced while reading; reading again");
                    why = reason;
                }
            }
        }
        Err(self.corrupt(format!("{why} (after {LOAD_ATTEMPTS} attempts)")))
    }

    async fn commit(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        let current = self.head().await?;
        let found = current.as_ref().map(|(h, _)| h.meta.generation);
        if found != previous_generation(meta) {
            return Err(SnapshotError::Conflict {
                what: self.what(),
                expected: previous_generation(meta).unwrap_or(0),
                found: found.unwrap_or(0),
            });
        }
        // Chunks of commits that never switched the head.
        self.delete_chunks(Some(match found {
            Some(g) => format!("{SNAPSHOT_GENERATION_LABEL}!={g}"),
            None => format!("{SNAPSHOT_GENERATION_LABEL}"),
        }))
        .await?;

        let generation = meta.generation;
        let mut file = std::fs::File::open(body).map_err(self.io("open the new body"))?;
        let pp = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() };
        let mut piece = vec![0u8; self.chunk_bytes];
        let (mut chunks, mut body_bytes) = (0u32, 0u64);
        loop {
            let n = read_full(&mut file, &mut piece).map_err(self.io("read the new body"))?;
            if n == 0 {
                break;
            }
            let cm = ConfigMap {
                metadata: self.object_meta(self.chunk_name(generation, chunks), "chunk", generation),
                binary_data: Some(BTreeMap::from([(BODY_KEY.to_owned(), ByteString(piece[..n].to_vec()))])),
                ..ConfigMap::default()
            };
            self.api.create(&pp, &cm).await.map_err(|e| {
                if is_conflict(&e) {
                    SnapshotError::Conflict { what: self.what(), expected: found.unwrap_or(0), found: generation }
                } else {
                    self.kube("create a chunk")(e)
                }
            })?;
            chunks += 1;
            body_bytes += n as u64;
        }

        let head = Head { meta: meta.clone(), chunks, body_bytes };
        let mut cm = ConfigMap {
            metadata: self.object_meta(self.head_name(), "head", generation),
            data: Some(BTreeMap::from([(
                HEAD_KEY.to_owned(),
                serde_json::to_string(&head).expect("the snapshot head serializes"),
            )])),
            ..ConfigMap::default()
        };
        let switched = match current {
            Some((_, old)) => {
                // Only if nobody switched it since we read it.
                cm.metadata.resource_version = old.metadata.resource_version;
                self.api.replace(&self.head_name(), &pp, &cm).await
            }
            None => self.api.create(&pp, &cm).await,
        };
        if let Err(e) = switched {
            if is_conflict(&e) {
                let now = self.head().await.ok().flatten().map(|(h, _)| h.meta.generation).unwrap_or(0);
                return Err(SnapshotError::Conflict {
                    what: self.what(),
                    expected: found.unwrap_or(0),
                    found: now,
                });
            }
            return Err(self.kube("switch the head to the new generation")(e));
        }
        // The old generation is garbage now; if this fails, the next commit deletes it.
        if let Some(old) = found
            && let Err(e) = self.delete_chunks(Some(format!("{SNAPSHOT_GENERATION_LABEL}={old}"))).await
        {
            warn!(snapshot = %self.what(), error = %e, "could not delete the previous snapshot generation; the next commit will");
        }
        Ok(())
    }

    async fn delete(&self) -> Result<(), SnapshotError> {
        // The head first: without it the chunks are garbage, never a torn snapshot.
        match self.api.delete(&self.head_name(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(self.kube("delete the head")(e)),
        }
        self.delete_chunks(None).await
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
