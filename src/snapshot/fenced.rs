//! A snapshot store that writes only while the leader's fence is open ([`crate::fence`]):
//! recording keys in doubt, committing, releasing and deleting are refused once this replica may no
//! longer hold its Lease, and a write still going at the deadline is dropped (as safe as a
//! crash: stores replace their state atomically and check the generation they expect).
//! Reading is not fenced: it changes nothing.

use std::path::Path;

use super::plan::{PlanMeta, Progress};
use super::{DoubtMeta, Loaded, SnapshotError, SnapshotMeta, SnapshotStore};
use crate::fence::Fence;

/// `inner`, writing only while `fence` is open.
pub struct FencedStore {
    inner: Box<dyn SnapshotStore>,
    fence: Fence,
}

impl FencedStore {
    pub fn new(inner: Box<dyn SnapshotStore>, fence: Fence) -> Self {
        FencedStore { inner, fence }
    }

    async fn write<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, SnapshotError>>,
    ) -> Result<T, SnapshotError> {
        self.fence
            .bounded(work)
            .await
            .map_err(|source| SnapshotError::Fenced { what: self.inner.describe(), source })?
    }
}

#[async_trait::async_trait]
impl SnapshotStore for FencedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn load(&self, scratch: &Path) -> Result<Loaded, SnapshotError> {
        self.inner.load(scratch).await
    }

    async fn record_doubt(&self, meta: &DoubtMeta, body: &Path) -> Result<(), SnapshotError> {
        self.write(self.inner.record_doubt(meta, body)).await
    }

    async fn record_doubt_with_plan(
        &self,
        meta: &DoubtMeta,
        body: &Path,
        plan: &PlanMeta,
        plan_body: &Path,
    ) -> Result<bool, SnapshotError> {
        self.write(self.inner.record_doubt_with_plan(meta, body, plan, plan_body)).await
    }

    async fn checkpoint(&self, plan: &PlanMeta, progress: &Progress) -> Result<(), SnapshotError> {
        self.write(self.inner.checkpoint(plan, progress)).await
    }

    async fn commit(&self, meta: &SnapshotMeta, body: &Path) -> Result<(), SnapshotError> {
        self.write(self.inner.commit(meta, body)).await
    }

    async fn delete(&self) -> Result<(), SnapshotError> {
        self.write(self.inner.delete()).await
    }

    async fn release(&self) -> Result<(), SnapshotError> {
        self.write(self.inner.release()).await
    }

    fn key(&self) -> Option<String> {
        self.inner.key()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::snapshot::fs::FsSnapshotStore;
    use crate::snapshot::tests::{doubt, meta};

    #[tokio::test]
    async fn writes_are_refused_once_the_fence_closes() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body");
        let mut w = crate::snapshot::format::BodyWriter::new(std::fs::File::create(&body).unwrap()).unwrap();
        w.push(b"\x01a").unwrap();
        w.finish().unwrap();
        let fence = Fence::leased();
        let store = FencedStore::new(Box::new(FsSnapshotStore::new(dir.path(), "x")), fence.clone());
        let refused = store.commit(&meta(1, 1), &body).await.unwrap_err();
        assert!(matches!(refused, SnapshotError::Fenced { .. }), "{refused}");
        assert!(refused.to_string().contains("no longer holds its Lease"), "{refused}");
        assert!(store.load(dir.path()).await.unwrap().snapshot.is_none(), "nothing written");
        fence.renewed(Instant::now() + Duration::from_secs(30));
        store.commit(&meta(1, 1), &body).await.unwrap();
        fence.close();
        assert!(matches!(store.record_doubt(&doubt(1, 1), &body).await, Err(SnapshotError::Fenced { .. })));
        assert!(store.load(dir.path()).await.unwrap().doubt.is_none());
        assert!(matches!(store.delete().await, Err(SnapshotError::Fenced { .. })));
        assert_eq!(store.load(dir.path()).await.unwrap().generation(), 1, "reading is not fenced");
    }
}
