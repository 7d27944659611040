//! The ConfigMap snapshot store on a real kube-apiserver: chunking under etcd's limit,
//! labels (keyed by cohort, no ownerReferences), generation checks, keys in doubt, leftovers
//! of interrupted writes, snapshots of earlier versions moved over, adoption by a new
//! holder, and a whole import run that keeps its snapshot in the cluster.
//!
//! This API server runs no garbage collector; the snapshot objects carry no ownerReference
//! (checked here), so a garbage collector has nothing to take.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use braze_sandbox::SandboxUser;
use cohort_operator::api::{RunResult, RunTrigger};
use cohort_operator::braze::{BrazeClient, BrazeClientConfig};
use cohort_operator::controller::kube_api::{self, ApiLimits};
use cohort_operator::controller::metrics::Metrics;
use cohort_operator::domain::diff::KeyCursor;
use cohort_operator::domain::member::Member;
use cohort_operator::run::{ImportRun, RunDeps, run_import};
use cohort_operator::snapshot::cluster::{
    ClusterSnapshotStore, DEFAULT_CHUNK_BYTES, DEFAULT_INLINE_BYTES, SNAPSHOT_HOLDER_LABEL, SNAPSHOT_OF_LABEL,
    SNAPSHOT_PART_LABEL, SNAPSHOT_SERIAL_LABEL, list_snapshots,
};
use cohort_operator::snapshot::format::{BodyWriter, read_body};
use cohort_operator::snapshot::plan::{PlanMeta, PlanWriter, Progress, Section, resolve};
use cohort_operator::snapshot::{DoubtMeta, FORMAT_VERSION, SnapshotError, SnapshotMeta, SnapshotStore, snapshot_key};
use cohort_operator::source::{MemberBatch, MemberStream};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rand::RngCore;

#[path = "support/braze.rs"]
mod braze_support;
use testkit::cluster::Cluster;

struct Setup {
    client: kube::Client,
    namespace: String,
    uid: String,
    key: String,
    dir: tempfile::TempDir,
}

async fn setup(prefix: &str) -> Setup {
    let cluster = Cluster::shared();
    let namespace = cluster.namespace(prefix).await;
    Setup {
        client: cluster.client().await,
        key: snapshot_key(&namespace, "https://rest.iad-01.braze.com", "kubit", "vip"),
        namespace,
        uid: random_uid(),
        dir: tempfile::tempdir().unwrap(),
    }
}

fn random_uid() -> String {
    format!("0f3c2a1e-{:04x}-4d6b-9a57-{:012x}", rand::random::<u16>(), rand::random::<u64>() >> 16)
}

impl Setup {
    fn store(&self) -> ClusterSnapshotStore {
        ClusterSnapshotStore::for_cohort(
            self.client.clone(),
            &self.namespace,
            &self.key,
            "cohort vip",
            "vip",
            &self.uid,
        )
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn objects(&self) -> Vec<ConfigMap> {
        let selector = format!("{SNAPSHOT_OF_LABEL}={}", self.key);
        self.config_maps().list(&ListParams::default().labels(&selector)).await.unwrap().items
    }

    async fn chunk_serials(&self) -> BTreeSet<String> {
        self.objects()
            .await
            .iter()
            .filter_map(|cm| cm.metadata.labels.as_ref()?.get(SNAPSHOT_SERIAL_LABEL).cloned())
            .collect()
    }

    /// Puts chunk `index` of `serial` with `body`, as a write that never switched the head
    /// leaves it.
    async fn leave_chunk(&self, store: &ClusterSnapshotStore, serial: u64, index: u32, body: &[u8]) {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(store.chunk_name(serial, index)),
                labels: Some(BTreeMap::from([
                    (SNAPSHOT_OF_LABEL.to_owned(), self.key.clone()),
                    (SNAPSHOT_PART_LABEL.to_owned(), "chunk".to_owned()),
                    (SNAPSHOT_SERIAL_LABEL.to_owned(), serial.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            binary_data: Some(BTreeMap::from([("body".to_owned(), ByteString(body.to_vec()))])),
            ..ConfigMap::default()
        };
        self.config_maps().create(&PostParams::default(), &cm).await.unwrap();
    }

    fn body(&self, name: &str, keys: &[Vec<u8>]) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut w = BodyWriter::new(File::create(&path).unwrap()).unwrap();
        for k in keys {
            w.push(k).unwrap();
        }
        w.finish().unwrap();
        path
    }
}

fn meta(generation: u64, members: u64) -> SnapshotMeta {
    SnapshotMeta {
        format: FORMAT_VERSION,
        generation,
        cohort_id: "vip".into(),
        cohort_name: "VIP users".into(),
        cohort_created_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        members,
        identifier_fingerprint: "externalId=user_id".into(),
        run_id: format!("run-{generation}"),
        committed_at: jiff::Timestamp::now(),
        digest: None,
    }
}

fn doubt(base_generation: u64, keys: u64) -> DoubtMeta {
    DoubtMeta {
        format: FORMAT_VERSION,
        base_generation,
        cohort_id: "vip".into(),
        keys,
        run_id: "run-interrupted".into(),
        recorded_at: jiff::Timestamp::now(),
    }
}

fn read_keys(file: File) -> Vec<Vec<u8>> {
    let mut r = read_body(file).unwrap();
    let mut out = Vec::new();
    while let Some(k) = r.key() {
        out.push(k.to_vec());
        r.advance().unwrap();
    }
    out
}

fn sorted_keys(n: usize, len: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rng();
    let mut keys: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let mut k = vec![0u8; len];
            rng.fill_bytes(&mut k);
            k
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[tokio::test]
async fn large_bodies_are_cut_into_chunks_etcd_accepts_and_read_back_whole() {
    let s = setup("snap-large").await;
    let store = s.store();
    // ~2.3 MB of random bytes: incompressible, so three chunks at the default size.
    let keys = sorted_keys(70_000, 32);
    let body = s.body("large", &keys);
    store.commit(&meta(1, keys.len() as u64), &body).await.unwrap();

    let objects = s.objects().await;
    let chunks: Vec<&ConfigMap> =
        objects.iter().filter(|cm| cm.metadata.labels.as_ref().unwrap()[SNAPSHOT_PART_LABEL] == "chunk").collect();
    assert_eq!(chunks.len(), 3, "{:?}", objects.iter().map(|c| c.metadata.name.clone()).collect::<Vec<_>>());
    for cm in &chunks {
        let bytes = &cm.binary_data.as_ref().unwrap()["body"].0;
        assert!(bytes.len() <= DEFAULT_CHUNK_BYTES, "{}", bytes.len());
    }
    for cm in &objects {
        // Nothing for a garbage collector to take before the import's finalizer has run.
        assert_eq!(cm.metadata.owner_references, None, "{:?}", cm.metadata.name);
        assert_eq!(cm.metadata.labels.as_ref().unwrap()[SNAPSHOT_HOLDER_LABEL], s.uid);
        assert_eq!(cm.metadata.annotations.as_ref().unwrap()["cohorts.dev/import"], "vip");
        assert_eq!(cm.metadata.annotations.as_ref().unwrap()["cohorts.dev/cohort"], "cohort vip");
    }

    let loaded = store.load(s.dir.path()).await.unwrap();
    let snapshot = loaded.snapshot.unwrap();
    assert_eq!(snapshot.meta.members, keys.len() as u64);
    assert_eq!(read_keys(snapshot.body), keys);
    assert!(loaded.doubt.is_none());
}

#[tokio::test]
async fn commits_follow_generations_and_remove_what_they_replace() {
    let s = setup("snap-gen").await;
    let store = s.store().with_chunk_bytes(4096);
    assert!(store.load(s.dir.path()).await.unwrap().snapshot.is_none());

    let first = sorted_keys(3000, 12);
    store.commit(&meta(1, first.len() as u64), &s.body("g1", &first)).await.unwrap();
    let serials = s.chunk_serials().await;
    assert_eq!(serials.len(), 1);

    let second = sorted_keys(2000, 12);
    store.commit(&meta(2, second.len() as u64), &s.body("g2", &second)).await.unwrap();
    let now = s.chunk_serials().await;
    assert_eq!(now.len(), 1, "the first generation's chunks are deleted");
    assert!(now.is_disjoint(&serials));
    assert_eq!(read_keys(store.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), second);

    // A second writer that diffed against generation 1 cannot commit over generation 2.
    let other = s.store();
    let err = other.commit(&meta(2, 1), &s.body("late", &first[..1])).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Conflict { expected: 1, found: 2, .. }), "{err}");
    assert_eq!(read_keys(store.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), second);

    store.delete().await.unwrap();
    assert!(s.objects().await.is_empty());
    assert!(store.load(s.dir.path()).await.unwrap().snapshot.is_none());
}

#[tokio::test]
async fn keys_in_doubt_are_kept_until_the_next_commit() {
    let s = setup("snap-doubt").await;
    let store = s.store().with_chunk_bytes(2048);
    let sent = sorted_keys(500, 10);
    // An interrupted first run.
    store.record_doubt(&doubt(0, sent.len() as u64), &s.body("d0", &sent)).await.unwrap();
    let loaded = store.load(s.dir.path()).await.unwrap();
    assert!(loaded.snapshot.is_none());
    let d = loaded.doubt.unwrap();
    assert_eq!(d.meta.run_id, "run-interrupted");
    assert_eq!(read_keys(d.body), sent);

    let err = store.record_doubt(&doubt(3, 1), &s.body("d3", &sent[..1])).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Conflict { expected: 3, found: 0, .. }), "{err}");

    store.commit(&meta(1, sent.len() as u64), &s.body("g1", &sent)).await.unwrap();
    let loaded = store.load(s.dir.path()).await.unwrap();
    assert!(loaded.doubt.is_none(), "a commit settles the keys in doubt");
    // Keys in doubt are few: their replaced chunks are left for the next write to delete.
    assert_eq!(s.chunk_serials().await.len(), 2, "the snapshot's, and the settled doubt's");

    store.record_doubt(&doubt(1, 2), &s.body("d1", &sent[..2])).await.unwrap();
    let loaded = store.load(s.dir.path()).await.unwrap();
    assert_eq!(loaded.generation(), 1);
    assert_eq!(read_keys(loaded.doubt.unwrap().body), sent[..2]);
    assert_eq!(s.chunk_serials().await.len(), 2, "snapshot and doubt: the settled doubt's are deleted");
}

/// A write that crashed after some chunks but before switching the head leaves chunks no
/// head names: readers ignore them and the next write deletes them.
#[tokio::test]
async fn chunks_of_an_interrupted_write_are_ignored_then_cleaned() {
    let s = setup("snap-crash").await;
    let store = s.store();
    let keys = sorted_keys(100, 8);
    store.commit(&meta(1, keys.len() as u64), &s.body("g1", &keys)).await.unwrap();
    let serial = s.chunk_serials().await.into_iter().next().unwrap();
    let next: u64 = serial.parse::<u64>().unwrap() + 1;
    for index in 0..2 {
        s.leave_chunk(&store, next, index, b"half of a body").await;
    }
    assert_eq!(read_keys(store.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys);

    let more = sorted_keys(120, 8);
    store.commit(&meta(2, more.len() as u64), &s.body("g2", &more)).await.unwrap();
    let serials = s.chunk_serials().await;
    assert_eq!(serials.len(), 1, "{serials:?}");
    assert_eq!(read_keys(store.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), more);
}

#[tokio::test]
async fn a_damaged_head_is_reported_with_the_fix() {
    let s = setup("snap-damaged").await;
    let store = s.store();
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(store.head_name()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([("snapshot.json".to_owned(), "{not json".to_owned())])),
        ..ConfigMap::default()
    };
    s.config_maps().create(&PostParams::default(), &cm).await.unwrap();
    let err = store.load(s.dir.path()).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("damaged") && text.contains(&store.head_name()) && text.contains("approve a resync"),
        "{text}"
    );
}

/// A snapshot an earlier version kept under the import's uid is moved to the cohort's key,
/// keys in doubt included, and the old objects go.
#[tokio::test]
async fn a_snapshot_of_an_earlier_version_moves_to_the_cohorts_key() {
    let s = setup("snap-legacy").await;
    let legacy = ClusterSnapshotStore::legacy(s.client.clone(), &s.namespace, "vip", &s.uid).with_chunk_bytes(256);
    let keys = sorted_keys(300, 8);
    legacy.commit(&meta(1, keys.len() as u64), &s.body("g1", &keys)).await.unwrap();
    let doubtful = sorted_keys(5, 8);
    legacy.record_doubt(&doubt(1, 5), &s.body("d", &doubtful)).await.unwrap();
    let legacy_objects = format!("{SNAPSHOT_OF_LABEL}={}", s.uid);
    assert!(!s.config_maps().list(&ListParams::default().labels(&legacy_objects)).await.unwrap().items.is_empty());

    // A preview reads it where it is and changes nothing.
    let all = |s: &Setup| {
        let api = s.config_maps();
        async move {
            let items = api.list(&ListParams::default()).await.unwrap().items;
            items.into_iter().map(|cm| (cm.name_any(), cm.resource_version())).collect::<BTreeMap<_, _>>()
        }
    };
    let before = all(&s).await;
    let preview = s.store().with_legacy_uid(&s.uid).read_only();
    let loaded = preview.load(s.dir.path()).await.unwrap();
    assert_eq!(read_keys(loaded.snapshot.unwrap().body), keys);
    assert_eq!(read_keys(loaded.doubt.unwrap().body), doubtful);
    assert_eq!(all(&s).await, before, "a read-only load writes nothing");

    let store = s.store().with_legacy_uid(&s.uid);
    let loaded = store.load(s.dir.path()).await.unwrap();
    let snapshot = loaded.snapshot.unwrap();
    assert_eq!(snapshot.meta.generation, 1);
    assert_eq!(read_keys(snapshot.body), keys);
    assert_eq!(read_keys(loaded.doubt.unwrap().body), doubtful);
    assert!(s.config_maps().list(&ListParams::default().labels(&legacy_objects)).await.unwrap().items.is_empty());
    assert!(!s.objects().await.is_empty());
    // The next commit follows on.
    store.commit(&meta(2, 2), &s.body("g2", &keys[..2])).await.unwrap();
    assert_eq!(read_keys(store.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), &keys[..2]);
}

/// Released by a deleted import (`Retain`), the snapshot waits, listed, for an import of
/// the same cohort with a new uid, which adopts it.
#[tokio::test]
async fn a_released_snapshot_is_listed_and_adopted_by_a_new_import_of_the_cohort() {
    let s = setup("snap-adopt").await;
    let store = s.store();
    let keys = sorted_keys(50, 8);
    store.commit(&meta(1, keys.len() as u64), &s.body("g1", &keys)).await.unwrap();
    store.release().await.unwrap();
    let listed = list_snapshots(s.client.clone(), Some(&s.namespace)).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].released && listed[0].import == "vip" && listed[0].generation == 1 && listed[0].members == 50);
    assert_eq!(listed[0].head, store.head_name());

    let uid = random_uid();
    let again = ClusterSnapshotStore::for_cohort(s.client.clone(), &s.namespace, &s.key, "cohort vip", "vip-2", &uid);
    // A preview of the new import reads it without adopting it.
    let preview = again.clone().read_only();
    assert_eq!(read_keys(preview.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys);
    assert!(list_snapshots(s.client.clone(), Some(&s.namespace)).await.unwrap()[0].released);
    assert_eq!(read_keys(again.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys);
    let listed = list_snapshots(s.client.clone(), Some(&s.namespace)).await.unwrap();
    assert!(!listed[0].released && listed[0].import == "vip-2", "{listed:?}");
    again.commit(&meta(2, 1), &s.body("g2", &keys[..1])).await.unwrap();
    assert_eq!(read_keys(again.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), &keys[..1]);
}

fn member(i: usize) -> Member {
    Member::ExternalId(format!("user-{i}"))
}

fn source(range: std::ops::Range<usize>) -> MemberStream<'static> {
    let members: Vec<Member> = range.map(member).collect();
    futures::stream::iter(vec![Ok(MemberBatch { members, ..MemberBatch::default() })]).boxed()
}

#[tokio::test]
async fn an_import_run_keeps_its_snapshot_in_the_cluster() {
    let s = setup("snap-run").await;
    let keys = braze_support::BrazeKeys { partner: "acme", partner_key: "pk", import_key: "ik" };
    let users = (0..3000).map(|i| SandboxUser::identified(format!("user-{i}"))).collect();
    let sandbox = braze_support::start_sandbox(keys, users).await;
    let target = braze_support::target(&sandbox, keys, "vip");
    let braze = BrazeClient::new(BrazeClientConfig::default()).unwrap();
    let store = s.store().with_chunk_bytes(1024);
    let scratch: &Path = s.dir.path();
    let run = |id: &str| {
        let mut run = ImportRun::new(id, RunTrigger::Manual, &s.namespace, "vip", "VIP users");
        run.scratch_dir = scratch.to_owned();
        run
    };
    let members = |sandbox: &braze_sandbox::RunningSandbox| -> BTreeSet<String> {
        sandbox.member_external_ids("acme", "vip").into_iter().collect()
    };

    let report =
        run_import(&run("r1"), RunDeps { members: source(0..2000), snapshots: &store, braze: &braze, target: &target })
            .await;
    assert_eq!(report.result, RunResult::Succeeded, "{}", report.message());
    let report = run_import(
        &run("r2"),
        RunDeps { members: source(100..2100), snapshots: &store, braze: &braze, target: &target },
    )
    .await;
    assert_eq!(report.result, RunResult::Succeeded, "{}", report.message());
    assert_eq!((report.added, report.removed, report.committed_generation), (100, 100, Some(2)));
    assert_eq!(members(&sandbox), (100..2100).map(|i| format!("user-{i}")).collect());

    let loaded = store.load(scratch).await.unwrap();
    let snapshot = loaded.snapshot.unwrap();
    assert_eq!((snapshot.meta.generation, snapshot.meta.members, snapshot.meta.run_id.as_str()), (2, 2000, "r2"));
    assert!(loaded.doubt.is_none());
}

/// Two runs of one import committing at once (a failover's old and new leader): one wins,
/// the other gets a conflict, and the snapshot readers see is the winner's, whole — even
/// when the second writer starts while the first is half-way through its chunks.
#[tokio::test]
async fn racing_commits_leave_one_whole_snapshot() {
    let s = setup("snap-race").await;
    let store = s.store().with_chunk_bytes(512);
    let first = sorted_keys(500, 16);
    store.commit(&meta(1, first.len() as u64), &s.body("g1", &first)).await.unwrap();
    let live = s.chunk_serials().await;

    // Random keys do not compress: about 160 chunks, so the second writer starts mid-write.
    let early = sorted_keys(5000, 16);
    let late = sorted_keys(5000, 16);
    let early_body = s.body("early", &early);
    let late_body = s.body("late", &late);
    let early_store = store.clone();
    let early_write = tokio::spawn(async move { early_store.commit(&meta(2, 5000), &early_body).await });

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let in_progress = s
            .objects()
            .await
            .iter()
            .filter(|cm| {
                let labels = cm.metadata.labels.as_ref().unwrap();
                labels.get(SNAPSHOT_SERIAL_LABEL).is_some_and(|serial| !live.contains(serial))
            })
            .count();
        if in_progress >= 3 || early_write.is_finished() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the first writer wrote no chunk within 30 s");
    }
    let late_result = store.commit(&meta(2, 5000), &late_body).await;
    let early_result = early_write.await.unwrap();

    let winner = match (&early_result, &late_result) {
        (Ok(()), Err(SnapshotError::Conflict { .. })) => &early,
        (Err(SnapshotError::Conflict { .. }), Ok(())) => &late,
        other => panic!("expected one commit and one conflict, got {other:?}"),
    };
    let snapshot = store.load(s.dir.path()).await.unwrap().snapshot.unwrap();
    assert_eq!(snapshot.meta.generation, 2);
    assert_eq!(&read_keys(snapshot.body), winner);
}

/// A released snapshot of another Braze workspace (the same cohort id, endpoint and partner
/// in the namespace) is not adopted: the store uses its alternate key and leaves it alone.
#[tokio::test]
async fn another_workspaces_snapshot_is_left_alone_under_an_alternate_key() {
    let s = setup("snap-workspace").await;
    let theirs = s.store().with_alternate(&format!("{}-theirs", s.key), Some("w1-aaaa"));
    let keys = sorted_keys(40, 8);
    theirs.load(s.dir.path()).await.unwrap();
    theirs.commit(&meta(1, keys.len() as u64), &s.body("theirs", &keys)).await.unwrap();
    theirs.release().await.unwrap();

    let uid = random_uid();
    let alternate = format!("{}-{}", s.key, &uid[..8]);
    let ours = ClusterSnapshotStore::for_cohort(s.client.clone(), &s.namespace, &s.key, "cohort vip", "vip-b", &uid)
        .with_alternate(&alternate, Some("w1-bbbb"));
    assert!(ours.load(s.dir.path()).await.unwrap().snapshot.is_none(), "not the other workspace's");
    assert_eq!(ours.key(), alternate);
    ours.commit(&meta(1, 2), &s.body("ours", &keys[..2])).await.unwrap();
    assert_eq!(read_keys(ours.load(s.dir.path()).await.unwrap().snapshot.unwrap().body), &keys[..2]);
    // Theirs is untouched.
    assert_eq!(read_keys(s.store().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys);
}

/// A client counting its requests by verb, as the operator's does.
async fn counting_client() -> (kube::Client, std::sync::Arc<Metrics>) {
    let kubeconfig = Kubeconfig::read_from(Cluster::shared().kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    let metrics = std::sync::Arc::new(Metrics::new());
    let limits = ApiLimits { qps: 0.0, burst: 1 };
    (kube_api::client(config, limits, metrics.clone()).unwrap(), metrics)
}

fn requests(metrics: &Metrics) -> BTreeMap<String, u64> {
    metrics
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("cohort_operator_kube_api_requests_total{verb=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(verb, n)| (verb.to_owned(), n.parse().unwrap()))
        .collect()
}

/// What a run of a small cohort costs once its snapshot exists: one read of the head, then
/// for recording its keys in doubt and for its commit one chunk and one switch each, under
/// the serial the previous switch reserved, and one delete each of what they replaced —
/// no list, no second read. Whatever the order of runs, only the chunks the head names stay.
#[tokio::test]
async fn a_run_reads_the_head_once_and_writes_each_part_in_one_switch() {
    let s = setup("snap-cost").await;
    let (client, metrics) = counting_client().await;
    let run = |generation: u64, keys: &[Vec<u8>]| {
        let store = ClusterSnapshotStore::for_cohort(client.clone(), &s.namespace, &s.key, "cohort vip", "vip", &s.uid);
        one_run(&s, store, generation, keys.to_vec(), false)
    };
    let keys = sorted_keys(100, 8);
    run(1, &keys[..50]).await;
    run(2, &keys[..60]).await;
    let before = requests(&metrics);
    run(3, &keys[..70]).await;
    let after = requests(&metrics);
    let spent: BTreeMap<String, u64> =
        after.iter().map(|(verb, n)| (verb.clone(), n - before.get(verb).copied().unwrap_or(0))).collect();
    let expected = BTreeMap::from([
        ("get".to_owned(), 2),    // the head, the snapshot's one chunk
        ("create".to_owned(), 2), // a chunk for the keys in doubt, one for the snapshot
        ("update".to_owned(), 2), // two switches
        ("delete".to_owned(), 2), // what the last commit replaced; what this one replaced
    ]);
    assert_eq!(spent, expected);
    assert_eq!(s.chunk_serials().await.len(), 1, "only the snapshot's chunks are left");
    assert_eq!(read_keys(s.store().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys[..70]);
}

/// A head written by an earlier version lists no unnamed serials: the first write claims a
/// serial and finds what earlier writes left by listing chunks, then lists them itself.
#[tokio::test]
async fn a_head_of_an_earlier_version_is_cleaned_by_listing_once() {
    let s = setup("snap-old-head").await;
    let store = s.store();
    let keys = sorted_keys(100, 8);
    store.commit(&meta(1, keys.len() as u64), &s.body("g1", &keys)).await.unwrap();
    // As an earlier version leaves it: no `unnamed`, and chunks of a write that never switched.
    let api = s.config_maps();
    let mut head = api.get(&store.head_name()).await.unwrap();
    let data = head.data.as_mut().unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&data["snapshot.json"]).unwrap();
    let serial = json["serial"].as_u64().unwrap();
    json.as_object_mut().unwrap().remove("unnamed");
    data.insert("snapshot.json".into(), json.to_string());
    api.replace(&store.head_name(), &PostParams::default(), &head).await.unwrap();
    s.leave_chunk(&store, serial, 0, b"left behind").await;
    assert_eq!(s.chunk_serials().await.len(), 2);

    let store = s.store();
    assert_eq!(store.load(s.dir.path()).await.unwrap().generation(), 1);
    store.commit(&meta(2, 50), &s.body("g2", &keys[..50])).await.unwrap();
    assert_eq!(s.chunk_serials().await.len(), 1, "what the earlier version left is deleted");
    let json: serde_json::Value =
        serde_json::from_str(&api.get(&store.head_name()).await.unwrap().data.unwrap()["snapshot.json"]).unwrap();
    assert!(json["unnamed"].is_array(), "the head lists its unnamed serials now: {json}");
    assert_eq!(read_keys(s.store().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys[..50]);
}

/// Chunks left by a head deleted before (its chunks are deleted after it, so a crash between
/// leaves them): the first write of a new head finds them in its way, deletes them and
/// writes its own.
#[tokio::test]
async fn chunks_of_a_deleted_head_do_not_block_the_next_one() {
    let s = setup("snap-leftover").await;
    let store = s.store();
    for serial in [1, 2] {
        s.leave_chunk(&store, serial, 0, b"left behind").await;
    }
    let keys = sorted_keys(100, 8);
    assert!(store.load(s.dir.path()).await.unwrap().snapshot.is_none());
    store.commit(&meta(1, keys.len() as u64), &s.body("g1", &keys)).await.unwrap();
    assert_eq!(s.chunk_serials().await.len(), 1, "the leftovers are gone");
    assert_eq!(read_keys(s.store().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys);
}

/// A plan of additions `keys`, recorded with keys in doubt `doubt(0, n)` of run `run_id`.
fn plan_of(s: &Setup, keys: &[Vec<u8>], doubt: &DoubtMeta) -> (PlanMeta, PathBuf) {
    let mut w = PlanWriter::new(&s.dir.path().join("sections")).unwrap();
    for k in keys {
        w.push(Section::Adds, k).unwrap();
    }
    let path = s.dir.path().join(format!("plan-{}", doubt.run_id));
    let (counts, bytes) = w.finish(&path).unwrap();
    let meta = PlanMeta {
        format: FORMAT_VERSION,
        base_generation: doubt.base_generation,
        cohort_id: doubt.cohort_id.clone(),
        run_id: doubt.run_id.clone(),
        recorded_at: doubt.recorded_at,
        keys: counts,
        bytes,
        progress: Progress { accepted: Vec::new(), permit: 10 },
        lease: None,
    };
    (meta, path)
}

/// A plan goes with the keys in doubt in their one switch; each checkpoint is one update of
/// the head; the next run reads what it settles. Once another attempt records its keys in
/// doubt, the plan is gone and its run can checkpoint no more; and a run whose store changed
/// since its load records no plan.
#[tokio::test]
async fn checkpoints_cost_one_update_and_stop_once_another_attempt_records_its_keys() {
    let s = setup("snap-plan").await;
    let (client, metrics) = counting_client().await;
    let store = ClusterSnapshotStore::for_cohort(client, &s.namespace, &s.key, "cohort vip", "vip", &s.uid);
    let keys = sorted_keys(40, 8);
    let mine = doubt(0, 40);
    let (plan, plan_body) = plan_of(&s, &keys, &mine);
    store.load(s.dir.path()).await.unwrap();
    assert!(store.record_doubt_with_plan(&mine, &s.body("mine", &keys), &plan, &plan_body).await.unwrap());
    let before = requests(&metrics);
    let progress = Progress { accepted: vec![[0, 25]], permit: 30 };
    store.checkpoint(&plan, &progress).await.unwrap();
    let after = requests(&metrics);
    let spent: u64 = after.iter().map(|(verb, n)| n - before.get(verb).copied().unwrap_or(0)).sum();
    assert_eq!((spent, after["update"] - before.get("update").copied().unwrap_or(0)), (1, 1), "one update");

    let loaded = s.store().load(s.dir.path()).await.unwrap();
    assert_eq!(loaded.doubt.as_ref().unwrap().meta.keys, 40);
    assert_eq!(read_keys(loaded.doubt.unwrap().body), keys, "the keys in doubt, without the plan after them");
    let stored = loaded.plan.expect("the plan");
    assert_eq!(stored.meta.progress, progress);
    let resolved = resolve(stored, s.dir.path(), false).unwrap();
    assert_eq!(read_keys(resolved.settled_in), keys[..25]);
    assert_eq!(read_keys(resolved.unsafe_keys), keys[25..30], "below the permit, not accepted");

    // A run that loads now but records after another attempt did: no plan.
    let late = s.store();
    late.load(s.dir.path()).await.unwrap();
    let other = DoubtMeta { run_id: "attempt-2".into(), ..doubt(0, 1) };
    let other_store = s.store();
    other_store.load(s.dir.path()).await.unwrap();
    other_store.record_doubt(&other, &s.body("other", &[b"\x01zz".to_vec()])).await.unwrap();
    let err = store.checkpoint(&plan, &progress).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Overtaken { .. }), "{err}");
    // Its plan covers the 41 keys in doubt the merge makes, so only the resourceVersion
    // guard keeps it out.
    let third = DoubtMeta { run_id: "attempt-3".into(), ..doubt(0, 41) };
    let mut all = keys.clone();
    all.push(b"\x01zz".to_vec());
    all.sort();
    let (plan3, plan3_body) = plan_of(&s, &all, &third);
    assert!(!late.record_doubt_with_plan(&third, &s.body("third", &keys), &plan3, &plan3_body).await.unwrap());
    let loaded = s.store().load(s.dir.path()).await.unwrap();
    assert!(loaded.plan.is_none());
    assert_eq!(loaded.doubt.unwrap().meta.keys, 41, "every attempt's keys stay in doubt");
    // Loaded again, with nothing written since, the same plan is recorded.
    let again = s.store();
    again.load(s.dir.path()).await.unwrap();
    assert!(again.record_doubt_with_plan(&third, &s.body("third", &keys), &plan3, &plan3_body).await.unwrap());
}

/// Two live attempts of a run: A checkpoints between B's load and B's record. B records its
/// keys in doubt but no plan (A may still send below the permit it just raised).
#[tokio::test]
async fn a_checkpoint_between_a_load_and_a_record_keeps_the_plan_out() {
    let s = setup("snap-plan-live").await;
    let (a, b) = (s.store(), s.store());
    let keys = sorted_keys(40, 8);
    let mine = doubt(0, 40);
    let (plan_a, plan_a_body) = plan_of(&s, &keys, &mine);
    a.load(s.dir.path()).await.unwrap();
    assert!(a.record_doubt_with_plan(&mine, &s.body("a", &keys), &plan_a, &plan_a_body).await.unwrap());

    b.load(s.dir.path()).await.unwrap();
    a.checkpoint(&plan_a, &Progress { accepted: vec![[0, 10]], permit: 20 }).await.unwrap();
    let theirs = DoubtMeta { run_id: "attempt-b".into(), ..doubt(0, 40) };
    let (plan_b, plan_b_body) = plan_of(&s, &keys, &theirs);
    assert!(!b.record_doubt_with_plan(&theirs, &s.body("b", &keys), &plan_b, &plan_b_body).await.unwrap());
    let loaded = s.store().load(s.dir.path()).await.unwrap();
    assert!(loaded.plan.is_none(), "B recorded no plan");
    assert_eq!(read_keys(loaded.doubt.unwrap().body), keys);
    let err = a.checkpoint(&plan_a, &Progress { accepted: vec![[0, 20]], permit: 30 }).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Overtaken { .. }), "{err}");
}

/// Replaces the head's JSON with what `edit` makes of it.
async fn edit_head(s: &Setup, store: &ClusterSnapshotStore, edit: impl FnOnce(&mut serde_json::Value)) {
    let api = s.config_maps();
    let mut head = api.get(&store.head_name()).await.unwrap();
    let data = head.data.as_mut().unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&data["snapshot.json"]).unwrap();
    edit(&mut json);
    data.insert("snapshot.json".into(), json.to_string());
    api.replace(&store.head_name(), &PostParams::default(), &head).await.unwrap();
}

/// Names of this cohort's plan chunks.
async fn plan_chunks(s: &Setup) -> Vec<String> {
    s.objects().await.iter().map(|cm| cm.name_any()).filter(|n| n.contains("-plan-")).collect()
}

/// An operator of an earlier version knows neither `planPart` nor a plan appended to the
/// keys in doubt: it reads the doubt part's chunks alone and must find the keys in doubt,
/// nothing else. Its next write drops the plan, and the plan's chunks go with the serial
/// that write replaces.
#[tokio::test]
async fn an_earlier_operator_reads_the_keys_in_doubt_alone_and_collects_the_plan() {
    let s = setup("snap-plan-old").await;
    let store = s.store();
    let keys = sorted_keys(40, 8);
    store.commit(&meta(1, 5), &s.body("g1", &keys[..5])).await.unwrap();
    let mine = doubt(1, 40);
    let (plan, plan_body) = plan_of(&s, &keys, &mine);
    store.load(s.dir.path()).await.unwrap();
    assert!(store.record_doubt_with_plan(&mine, &s.body("mine", &keys), &plan, &plan_body).await.unwrap());

    // The head as an earlier version reads it: without the fields it does not know.
    edit_head(&s, &store, |json| {
        let json = json.as_object_mut().unwrap();
        json.remove("plan");
        json.remove("planPart");
    })
    .await;
    let loaded = s.store().load(s.dir.path()).await.unwrap();
    assert!(loaded.plan.is_none());
    let stored = loaded.doubt.unwrap();
    assert_eq!(stored.meta.keys, 40);
    assert_eq!(read_keys(stored.body), keys, "the keys in doubt, and nothing after them");
    assert!(!plan_chunks(&s).await.is_empty(), "the plan is in chunks of its own");

    // Its next write (a commit) replaces the keys in doubt: their plan's chunks go with them.
    s.store().commit(&meta(2, 40), &s.body("g2", &keys)).await.unwrap();
    assert_eq!(plan_chunks(&s).await, Vec::<String>::new());
    assert_eq!(s.chunk_serials().await.len(), 1, "only the snapshot's chunks are left");
}

/// A head as the first version with checkpoints wrote it (never released, but it ran from
/// `main`): the plan's body appended to the keys in doubt in their chunks, its metadata in
/// `plan`. Returns what a load finds.
async fn legacy_head(s: &Setup, keys: &[Vec<u8>], plan_keys: &[Vec<u8>]) -> cohort_operator::snapshot::Loaded {
    let store = s.store();
    let mine = doubt(0, keys.len() as u64);
    let doubt_body = s.body("legacy-doubt", keys);
    store.load(s.dir.path()).await.unwrap();
    store.record_doubt(&mine, &doubt_body).await.unwrap();
    let (plan, plan_body) = plan_of(s, plan_keys, &mine);
    let mut bytes = std::fs::read(&doubt_body).unwrap();
    let plan_bytes = std::fs::read(&plan_body).unwrap();
    bytes.extend_from_slice(&plan_bytes);
    let serial = s.chunk_serials().await.into_iter().next().unwrap().parse().unwrap();
    s.config_maps().delete(&store.chunk_name(serial, 0), &Default::default()).await.unwrap();
    s.leave_chunk(&store, serial, 0, &bytes).await;
    edit_head(s, &store, |json| {
        let body_bytes = json["doubt"]["bodyBytes"].as_u64().unwrap();
        json["doubt"]["bodyBytes"] = (body_bytes + plan_bytes.len() as u64).into();
        json["plan"] = serde_json::to_value(&plan).unwrap();
    })
    .await;
    s.store().load(s.dir.path()).await.unwrap()
}

/// Such a head is still read: the plan's bytes are cut off the keys in doubt first, so a
/// plan that does not check out (it covers 39 of the 40 keys) is left out and the keys in
/// doubt are read whole, and one that does is read.
#[tokio::test]
async fn a_plan_appended_by_the_first_version_is_cut_off_before_it_is_checked() {
    let keys = sorted_keys(40, 8);
    let s = setup("snap-plan-legacy").await;
    let loaded = legacy_head(&s, &keys, &keys).await;
    assert_eq!(loaded.plan.expect("a plan that checks out").meta.keys[Section::Adds as usize], 40);
    assert_eq!(read_keys(loaded.doubt.unwrap().body), keys);

    let s = setup("snap-plan-legacy-bad").await;
    let loaded = legacy_head(&s, &keys, &keys[..39]).await;
    assert!(loaded.plan.is_none(), "a plan that does not check out is left out");
    assert_eq!(read_keys(loaded.doubt.unwrap().body), keys, "the keys in doubt alone");
}

/// A client of the shared API server that answers every update of the ConfigMap `name`
/// with 409 Conflict, as when the head keeps changing under a writer (labels, adoption).
async fn conflicting_client(name: String) -> kube::Client {
    let real = Cluster::shared().client().await;
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let real = real.clone();
        let conflict =
            request.method() == http::Method::PUT && request.uri().path().ends_with(&format!("/configmaps/{name}"));
        async move {
            if !conflict {
                return real.send(request).await;
            }
            let status = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                "message": "the object has been modified; please apply your changes to the latest version",
            });
            let body = kube::client::Body::from(serde_json::to_vec(&status).unwrap());
            Ok(http::Response::builder().status(409).header("content-type", "application/json").body(body).unwrap())
        }
    });
    kube::Client::new(service, "default")
}

/// A checkpoint whose head keeps changing while it still holds the run's plan was not
/// overtaken by another attempt: it fails as trouble with the API server (which the run
/// tries again), and a later checkpoint lands.
#[tokio::test]
async fn a_checkpoint_whose_head_keeps_changing_is_not_overtaken() {
    let s = setup("snap-plan-busy").await;
    let store = s.store();
    let keys = sorted_keys(40, 8);
    let mine = doubt(0, 40);
    let (plan, plan_body) = plan_of(&s, &keys, &mine);
    store.load(s.dir.path()).await.unwrap();
    assert!(store.record_doubt_with_plan(&mine, &s.body("mine", &keys), &plan, &plan_body).await.unwrap());
    let client = conflicting_client(store.head_name()).await;
    let busy = ClusterSnapshotStore::for_cohort(client, &s.namespace, &s.key, "cohort vip", "vip", &s.uid);
    busy.load(s.dir.path()).await.unwrap();
    let progress = Progress { accepted: vec![[0, 10]], permit: 20 };
    let err = busy.checkpoint(&plan, &progress).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Kube { .. }), "{err}");
    assert!(err.to_string().contains("kept changing"), "{err}");
    store.checkpoint(&plan, &progress).await.unwrap();
    assert_eq!(s.store().load(s.dir.path()).await.unwrap().plan.unwrap().meta.progress, progress);
}

/// With inline bodies on (the operator's runs), a small cohort's snapshot and keys in doubt
/// live in the head: a run that changes something reads the head once and updates it twice
/// (keys in doubt, commit), with no chunk to create, read or delete.
#[tokio::test]
async fn a_small_cohort_costs_one_read_and_two_updates_of_the_head() {
    let s = setup("snap-inline").await;
    let (client, metrics) = counting_client().await;
    let store = || {
        ClusterSnapshotStore::for_cohort(client.clone(), &s.namespace, &s.key, "cohort vip", "vip", &s.uid)
            .with_inline_bytes(DEFAULT_INLINE_BYTES)
    };
    let keys = sorted_keys(100, 8);
    let run = |generation: u64, keys: &[Vec<u8>]| one_run(&s, store(), generation, keys.to_vec(), true);
    run(1, &keys[..50]).await;
    let before = requests(&metrics);
    let store = store();
    store.load(s.dir.path()).await.unwrap();
    store.record_doubt(&doubt(1, 60), &s.body("d2", &keys[..60])).await.unwrap();
    store.commit(&meta(2, 60), &s.body("g2", &keys[..60])).await.unwrap();
    let after = requests(&metrics);
    let spent: BTreeMap<String, u64> = after
        .iter()
        .map(|(verb, n)| (verb.clone(), n - before.get(verb).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(spent, BTreeMap::from([("get".to_owned(), 1), ("update".to_owned(), 2)]));
    assert!(s.chunk_serials().await.is_empty(), "no chunk at all");
    let loaded = s.store().load(s.dir.path()).await.unwrap();
    assert_eq!(read_keys(loaded.snapshot.unwrap().body), keys[..60], "a store without inline writes reads it too");
    assert!(loaded.doubt.is_none());
}

fn keys_of(body: &Path) -> Vec<Vec<u8>> {
    read_keys(File::open(body).unwrap())
}

/// Upgrade: a snapshot in chunks (as every earlier version, and a large body, keeps it)
/// moves into the head at the first small commit, its chunks deleted; a body that grows
/// past the limit goes back to chunks, and the inline body it replaced leaves nothing behind.
#[tokio::test]
async fn a_snapshot_moves_between_chunks_and_the_head_as_it_shrinks_and_grows() {
    let s = setup("snap-inline-move").await;
    let keys = sorted_keys(5000, 16);
    s.store().commit(&meta(1, 100), &s.body("g1", &keys[..100])).await.unwrap();
    assert_eq!(s.chunk_serials().await.len(), 1, "written chunked, as an earlier version does");

    let inline = || s.store().with_inline_bytes(4096);
    let store = inline();
    store.load(s.dir.path()).await.unwrap();
    store.record_doubt(&doubt(1, 10), &s.body("d2", &keys[..10])).await.unwrap();
    store.commit(&meta(2, 110), &s.body("g2", &keys[..110])).await.unwrap();
    assert!(s.chunk_serials().await.is_empty(), "the chunked snapshot it replaced is deleted");
    assert_eq!(read_keys(inline().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys[..110]);

    // 5,000 random 16-byte keys are far over 4 KiB: chunks again, under the reservation.
    let store = inline();
    store.load(s.dir.path()).await.unwrap();
    store.record_doubt(&doubt(2, 10), &s.body("d3", &keys[..10])).await.unwrap();
    store.commit(&meta(3, 5000), &s.body("g3", &keys)).await.unwrap();
    assert_eq!(s.chunk_serials().await.len(), 1);
    let head = s.config_maps().get(&store.head_name()).await.unwrap();
    assert_eq!(head.binary_data, None, "no inline body left in the head");
    assert_eq!(read_keys(inline().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys);
}

/// A head written with inline bodies, as a version that does not know them reads it: the
/// part's bytes are in no chunk, so the head is refused as damaged — never read as an empty
/// snapshot (which would forget every member to remove). A head of an earlier version (no
/// list of unnamed serials) is written once in chunks, which lists them, then inline.
#[tokio::test]
async fn inline_bodies_are_never_misread_and_an_earlier_head_is_cleaned_first() {
    let s = setup("snap-inline-old").await;
    let keys = sorted_keys(100, 8);
    let store = s.store().with_inline_bytes(DEFAULT_INLINE_BYTES);
    store.commit(&meta(1, 100), &s.body("g1", &keys)).await.unwrap();
    edit_head(&s, &store, |json| {
        json["snapshot"].as_object_mut().unwrap().remove("inline");
    })
    .await;
    let err = s.store().load(s.dir.path()).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");

    let s = setup("snap-inline-unnamed").await;
    s.store().commit(&meta(1, 50), &s.body("g1", &keys[..50])).await.unwrap();
    edit_head(&s, &s.store(), |json| {
        json.as_object_mut().unwrap().remove("unnamed");
    })
    .await;
    let store = s.store().with_inline_bytes(DEFAULT_INLINE_BYTES);
    store.load(s.dir.path()).await.unwrap();
    store.record_doubt(&doubt(1, 10), &s.body("d2", &keys[..10])).await.unwrap();
    assert_eq!(s.chunk_serials().await.len(), 2, "chunked: the snapshot's and the doubt's");
    store.commit(&meta(2, 60), &s.body("g2", &keys[..60])).await.unwrap();
    let store = s.store().with_inline_bytes(DEFAULT_INLINE_BYTES);
    store.load(s.dir.path()).await.unwrap();
    store.record_doubt(&doubt(2, 10), &s.body("d3", &keys[..10])).await.unwrap();
    assert!(s.chunk_serials().await.is_empty(), "inline from then on, the chunks collected");
    assert_eq!(read_keys(s.store().load(s.dir.path()).await.unwrap().snapshot.unwrap().body), keys[..60]);
}

/// Two attempts writing small bodies into the head at once (a failover's old and new
/// leader, both having loaded the same head): keys in doubt end as the union of both, and
/// of two commits of the same generation the head's conditional update lets one through and
/// refuses the other; readers see whole bodies — no chunk, nothing half-written.
#[tokio::test]
async fn racing_inline_writes_leave_one_whole_body() {
    let s = setup("snap-inline-race").await;
    let first = sorted_keys(50, 16);
    inline_store(&s).commit(&meta(1, first.len() as u64), &s.body("g1", &first)).await.unwrap();

    let ([a, b], [doubt_a, doubt_b], [body_a, body_b]) = racers(&s, "d", 30).await;
    let meta_in_doubt = doubt(1, 30);
    let (ra, rb) = tokio::join!(a.record_doubt(&meta_in_doubt, &body_a), b.record_doubt(&meta_in_doubt, &body_b));
    // Keys in doubt are never lost: the writer that finds the head moved reads it again and
    // records the union.
    ra.unwrap();
    rb.unwrap();
    let both: Vec<Vec<u8>> = doubt_a.iter().chain(&doubt_b).cloned().collect::<BTreeSet<_>>().into_iter().collect();
    let loaded = inline_store(&s).load(s.dir.path()).await.unwrap();
    assert_eq!(read_keys(loaded.doubt.unwrap().body), both);

    let ([a, b], [keys_a, keys_b], [body_a, body_b]) = racers(&s, "g", 40).await;
    let committed = meta(2, 40);
    let (ra, rb) = tokio::join!(a.commit(&committed, &body_a), b.commit(&committed, &body_b));
    let winner = match (&ra, &rb) {
        (Ok(()), Err(SnapshotError::Conflict { .. })) => &keys_a,
        (Err(SnapshotError::Conflict { .. }), Ok(())) => &keys_b,
        other => panic!("expected one commit and one conflict, got {other:?}"),
    };
    let loaded = inline_store(&s).load(s.dir.path()).await.unwrap();
    let snapshot = loaded.snapshot.unwrap();
    assert_eq!(snapshot.meta.generation, 2);
    assert_eq!(&read_keys(snapshot.body), winner);
    assert!(loaded.doubt.is_none(), "the commit settled the keys in doubt");
    assert!(s.chunk_serials().await.is_empty(), "small bodies leave no chunk");
}

fn inline_store(s: &Setup) -> ClusterSnapshotStore {
    s.store().with_inline_bytes(DEFAULT_INLINE_BYTES)
}

/// Two inline stores over the same head, each having loaded it, and a body of `keys` random
/// keys for each to write.
async fn racers(s: &Setup, name: &str, keys: usize) -> ([ClusterSnapshotStore; 2], [Vec<Vec<u8>>; 2], [PathBuf; 2]) {
    let stores = [inline_store(s), inline_store(s)];
    for store in &stores {
        store.load(s.dir.path()).await.unwrap();
    }
    let keys = [sorted_keys(keys, 16), sorted_keys(keys, 16)];
    let bodies = [s.body(&format!("{name}a"), &keys[0]), s.body(&format!("{name}b"), &keys[1])];
    (stores, keys, bodies)
}

/// One run's writes through `store`: it loads generation `generation - 1`, records `keys` in
/// doubt (and reads them back, when `check_doubt`), then commits them as `generation`.
async fn one_run(s: &Setup, store: ClusterSnapshotStore, generation: u64, keys: Vec<Vec<u8>>, check_doubt: bool) {
    let (doubt_body, body) = (s.body(&format!("d{generation}"), &keys), s.body(&format!("g{generation}"), &keys));
    let (dir, count) = (s.dir.path(), keys.len() as u64);
    let loaded = store.load(dir).await.unwrap();
    assert_eq!(loaded.generation(), generation - 1);
    store.record_doubt(&doubt(generation - 1, count), &doubt_body).await.unwrap();
    if check_doubt {
        let loaded = store.load(dir).await.unwrap();
        assert_eq!(read_keys(loaded.doubt.unwrap().body), keys_of(&doubt_body));
    }
    store.commit(&meta(generation, count), &body).await.unwrap();
}
