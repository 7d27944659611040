//! What Braze holds is never lost track of, on a real kube-apiserver with the Braze sandbox:
//! a lost, restored or damaged snapshot stops the runs (`SnapshotMissing`, nothing sent)
//! until a person approves a resync or moves to a new cohort id; a snapshot outlives its
//! import deleted with `Retain` and the import applied again continues from it with exact
//! diffs; `RemoveMembers` removes no one on a snapshot that is not the committed one.

use crate::controller_support::*;
use cohort_operator::api::{CohortImport, CohortImportStatus, RunResult};
use cohort_operator::cli;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn daily() -> serde_json::Value {
    json!({ "cadence": "Daily", "at": "06:30" })
}

/// Runs `name` once more (request `value`) and returns its status once `runs` are recorded.
async fn run(env: &Env, name: &str, value: &str, runs: usize) -> CohortImportStatus {
    env.request_run(name, value).await;
    env.wait_runs(name, runs).await.status.unwrap()
}

fn assert_succeeded(status: &CohortImportStatus) {
    let last = &status.history[0];
    assert_eq!(last.result, RunResult::Succeeded, "{}", last.message);
}

/// The last run was blocked because the snapshot was missing: `Ready`, `Stalled` and the
/// run's message say so and give both ways forward.
fn assert_snapshot_missing(env: &Env, name: &str, status: &CohortImportStatus) {
    let last = &status.history[0];
    assert_eq!(last.result, RunResult::Blocked, "{}", last.message);
    assert_eq!(status.snapshot_missing_run.as_deref(), Some(last.id.as_str()));
    assert_eq!((last.added, last.removed), (0, 0), "nothing sent");
    let ready = ready(status).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "SnapshotMissing"));
    let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "SnapshotMissing"));
    let resync = format!("cohort-operator resync {name} -n {}", env.ns);
    assert!(last.message.contains(&resync), "{}", last.message);
    assert!(last.message.contains("spec.cohort.id"), "{}", last.message);
    assert!(last.message.contains("who left meanwhile stays in Braze"), "{}", last.message);
}

#[tokio::test]
async fn a_lost_snapshot_blocks_until_a_resync_is_approved() {
    let env = Env::new("snapsafe-resync").await;
    env.put_members(&ids(0..30)).await;
    let operator = env.start().await;
    env.create(env.import("lost", "lost", daily())).await;
    let status = run(&env, "lost", "1", 1).await;
    assert_succeeded(&status);
    let committed = status.committed_snapshot.clone().expect("the commit is recorded");
    assert_eq!((committed.generation, committed.members), (1, 30));
    assert!(committed.digest.as_deref().is_some_and(|d| d.starts_with("sha256:")), "{committed:?}");

    // The snapshot disappears (a clean-up by label), then 10 members leave the source.
    assert!(env.delete_snapshot("lost").await > 0);
    env.put_members(&ids(0..20)).await;
    let requests = env.sandbox.requests().len();
    let status = run(&env, "lost", "2", 2).await;
    assert_snapshot_missing(&env, "lost", &status);
    assert!(status.history[0].message.contains("the snapshot is gone"), "{}", status.history[0].message);
    assert_eq!(env.sandbox.requests().len(), requests, "nothing was sent to Braze");
    assert_eq!(env.members("lost"), set(&ids(0..30)));
    env.wait_event("lost", "RunBlocked").await;
    // The per-import gauge shows the reason (it follows status on the next reconcile).
    let series =
        format!("cohort_operator_import_ready{{namespace=\"{}\",name=\"lost\",reason=\"SnapshotMissing\"}} 1", env.ns);
    wait_until(&format!("{series} exported"), || operator.metrics.render().contains(&series)).await;

    // Approving removals does not approve a resync: nothing runs.
    env.merge(
        "lost",
        json!({ "metadata": { "annotations": { "cohorts.dev/approve-removals": status.history[0].id } } }),
    )
    .await;
    // A scheduled run meanwhile is blocked too: the resync approves the newest blocked run.
    let status = run(&env, "lost", "3", 3).await;
    assert_snapshot_missing(&env, "lost", &status);

    // The resync (the command line's way) sends the whole source as additions.
    let approved = cli::resync(env.client.clone(), &env.ns, "lost", None).await.unwrap();
    assert_eq!(approved, status.history[0].id);
    let status = env.wait_runs("lost", 4).await.status.unwrap();
    assert_succeeded(&status);
    let resynced = &status.history[0];
    assert_eq!((resynced.added, resynced.removed), (20, 0));
    assert!(
        resynced.message.contains("members who left while the snapshot was lost could not be removed"),
        "{}",
        resynced.message
    );
    assert_eq!(ready_reason(&status), Some("Succeeded"));
    // Braze cannot list its members: the 10 who left while the snapshot was lost stay.
    assert_eq!(env.members("lost"), set(&ids(0..30)));
    let committed = status.committed_snapshot.clone().unwrap();
    assert_eq!(committed.members, 20);

    // From there on, diffs are exact again.
    env.put_members(&ids(5..20)).await;
    let status = run(&env, "lost", "5", 5).await;
    assert_succeeded(&status);
    assert_eq!((status.history[0].added, status.history[0].removed), (0, 5));
    assert_eq!(env.members("lost"), set(&[ids(5..20), ids(20..30)].concat()));
    operator.stop().await;
}

#[tokio::test]
async fn a_lost_snapshot_moves_on_to_a_new_cohort_id_exactly() {
    let env = Env::new("snapsafe-newid").await;
    env.put_members(&ids(0..30)).await;
    let operator = env.start().await;
    env.create(env.import("moved", "moved-v1", daily())).await;
    assert_succeeded(&run(&env, "moved", "1", 1).await);
    assert!(env.delete_snapshot("moved").await > 0);
    env.put_members(&ids(0..25)).await;
    let status = run(&env, "moved", "2", 2).await;
    assert_snapshot_missing(&env, "moved", &status);

    // A new cohort id: a fresh cohort in Braze holding exactly the source.
    env.merge("moved", json!({ "spec": { "cohort": { "id": "moved-v2" } } })).await;
    let status = run(&env, "moved", "3", 3).await;
    assert_succeeded(&status);
    assert_eq!((status.history[0].added, status.history[0].removed), (25, 0));
    assert_eq!(env.members("moved-v2"), set(&ids(0..25)));
    assert_eq!(env.members("moved-v1"), set(&ids(0..30)), "the old cohort is left as it was");
    env.put_members(&ids(3..25)).await;
    let status = run(&env, "moved", "4", 4).await;
    assert_eq!((status.history[0].added, status.history[0].removed), (0, 3));
    assert_eq!(env.members("moved-v2"), set(&ids(3..25)));
    operator.stop().await;
}

#[tokio::test]
async fn an_import_deleted_with_retain_and_applied_again_continues_with_exact_diffs() {
    let env = Env::new("snapsafe-reapply").await;
    env.put_members(&ids(0..40)).await;
    let operator = env.start().await;
    let first = env.create(env.import("gitops", "gitops", daily())).await;
    assert_succeeded(&run(&env, "gitops", "1", 1).await);
    assert_eq!(env.members("gitops"), set(&ids(0..40)));

    // Deleted (Retain, the default): the snapshot stays, released, and is listed.
    env.delete("gitops").await;
    env.wait_for("gitops", "deleted", |i| i.is_none()).await;
    let maps = env.snapshot_maps("gitops").await;
    assert!(!maps.is_empty() && maps.iter().all(|cm| cm.metadata.owner_references.is_none()));
    let listed = cli::snapshots(env.client.clone(), Some(&env.ns)).await.unwrap();
    assert!(listed.contains("released (was gitops)") && listed.contains("\"gitops\""), "{listed}");

    // While it is gone, 10 members leave the source and 5 join.
    env.put_members(&[ids(0..30), ids(100..105)].concat()).await;
    let again = env.create(env.import("gitops", "gitops", daily())).await;
    assert_ne!(again.uid(), first.uid(), "a new object");
    let status = run(&env, "gitops", "1", 1).await;
    assert_succeeded(&status);
    assert_eq!((status.history[0].added, status.history[0].removed), (5, 10), "{}", status.history[0].message);
    assert_eq!(env.members("gitops"), set(&[ids(0..30), ids(100..105)].concat()), "exactly the source");
    assert_eq!(status.committed_snapshot.as_ref().map(|c| c.generation), Some(2));
    let listed = cli::snapshots(env.client.clone(), Some(&env.ns)).await.unwrap();
    assert!(!listed.contains("released"), "adopted: {listed}");
    operator.stop().await;
}

/// Replaces the body of the snapshot's first chunk of `name` — or its body in the head, for
/// a small one kept there — with `damage` of it.
async fn damage_chunk(env: &Env, name: &str, damage: impl Fn(&mut Vec<u8>)) {
    let maps = env.snapshot_maps(name).await;
    let part = |cm: &&ConfigMap| cm.metadata.labels.as_ref().unwrap()["cohorts.dev/snapshot-part"].clone();
    // The snapshot's chunk, as the head names it (chunks of replaced bodies may be left too).
    let head_map = maps.iter().find(|cm| part(cm) == "head").expect("a head");
    let head: serde_json::Value = serde_json::from_str(&head_map.data.as_ref().unwrap()["snapshot.json"]).unwrap();
    // A small body is kept in the head (`binaryData.snapshot`), a larger one in its chunk.
    let (map, key) = if head["snapshot"]["inline"] == json!(true) {
        (head_map, "snapshot")
    } else {
        let serial = head["snapshot"]["serial"].as_u64().expect("a snapshot").to_string();
        let chunk = maps
            .iter()
            .find(|cm| {
                part(cm) == "chunk" && cm.metadata.labels.as_ref().unwrap()["cohorts.dev/snapshot-serial"] == serial
            })
            .expect("the snapshot's chunk");
        (chunk, "body")
    };
    let mut body = map.binary_data.as_ref().unwrap()[key].0.clone();
    damage(&mut body);
    let patch = json!({ "binaryData": { key: ByteString(body) } });
    Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .patch(&map.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_damaged_snapshot_never_panics_and_blocks_the_run() {
    let env = Env::new("snapsafe-damaged").await;
    env.put_members(&ids(0..500)).await;
    let operator = env.start().await;
    env.create(env.import("damaged", "damaged", daily())).await;
    assert_succeeded(&run(&env, "damaged", "1", 1).await);
    env.put_members(&ids(0..400)).await;
    let requests = env.sandbox.requests().len();

    // Bytes flipped in the middle of the compressed body: its checksum fails while diffing.
    damage_chunk(&env, "damaged", |body| {
        let middle = body.len() / 2;
        for b in &mut body[middle..middle + 8] {
            *b ^= 0x5a;
        }
    })
    .await;
    let status = run(&env, "damaged", "2", 2).await;
    assert_snapshot_missing(&env, "damaged", &status);
    assert!(status.history[0].message.contains("the snapshot cannot be read"), "{}", status.history[0].message);

    // Cut short: fewer bytes than the head says.
    damage_chunk(&env, "damaged", |body| body.truncate(body.len() / 3)).await;
    let status = run(&env, "damaged", "3", 3).await;
    assert_snapshot_missing(&env, "damaged", &status);

    // A head that is not a snapshot head at all.
    let maps = env.snapshot_maps("damaged").await;
    let head = maps.iter().find(|cm| cm.metadata.labels.as_ref().unwrap()["cohorts.dev/snapshot-part"] == "head");
    let patch = json!({ "data": { "snapshot.json": "{\"serial\": \"many\"" } });
    Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .patch(&head.unwrap().name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let status = run(&env, "damaged", "4", 4).await;
    assert_snapshot_missing(&env, "damaged", &status);
    assert_eq!(env.sandbox.requests().len(), requests, "nothing was sent to Braze");
    assert_eq!(env.members("damaged"), set(&ids(0..500)));

    // The operator is still up and serving: a resync goes through.
    cli::resync(env.client.clone(), &env.ns, "damaged", None).await.unwrap();
    let status = env.wait_runs("damaged", 5).await.status.unwrap();
    assert_succeeded(&status);
    assert_eq!(status.history[0].added, 400);
    operator.stop().await;
}

/// Copies of the snapshot ConfigMaps of `name`, as a backup would keep them.
async fn backup(env: &Env, name: &str) -> Vec<ConfigMap> {
    env.snapshot_maps(name)
        .await
        .into_iter()
        .map(|cm| ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: cm.metadata.name,
                labels: cm.metadata.labels,
                annotations: cm.metadata.annotations,
                ..Default::default()
            },
            data: cm.data,
            binary_data: cm.binary_data,
            ..Default::default()
        })
        .collect()
}

#[tokio::test]
async fn remove_members_on_a_restored_older_snapshot_is_held_and_removes_no_one() {
    let env = Env::new("snapsafe-restore").await;
    env.put_members(&ids(0..10)).await;
    let operator = env.start().await;
    let mut doc = env.import("restored", "restored", daily());
    doc["spec"]["deletionPolicy"] = json!("RemoveMembers");
    env.create(doc).await;
    assert_succeeded(&run(&env, "restored", "1", 1).await);
    let saved = backup(&env, "restored").await;
    env.put_members(&ids(0..25)).await;
    let status = run(&env, "restored", "2", 2).await;
    assert_succeeded(&status);
    assert_eq!(status.committed_snapshot.as_ref().map(|c| c.generation), Some(2));

    // The snapshot is restored from the backup taken after the first run.
    let maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    env.delete_snapshot("restored").await;
    for cm in &saved {
        maps.create(&PostParams::default(), cm).await.unwrap();
    }
    env.delete("restored").await;
    let note = env.wait_event("restored", "CleanupFailed").await;
    assert!(note.contains("older than status records"), "{note}");
    assert!(note.contains("set spec.deletionPolicy to Retain"), "{note}");
    env.wait_reason("restored", "Deleting").await;
    assert!(!env.events("restored").await.iter().any(|(reason, _)| reason == "MembersRemoved"));
    assert_eq!(env.members("restored"), set(&ids(0..25)), "no one removed, not even the 10 it holds");

    // Letting it go the way the message says keeps the members.
    env.merge("restored", json!({ "spec": { "deletionPolicy": "Retain" } })).await;
    env.wait_for("restored", "deleted", |i| i.is_none()).await;
    assert_eq!(env.members("restored"), set(&ids(0..25)));
    operator.stop().await;
}

/// The snapshot vanished before a `RemoveMembers` deletion: held, never "removed 0".
#[tokio::test]
async fn remove_members_after_the_snapshot_vanished_is_held() {
    let env = Env::new("snapsafe-vanished").await;
    env.put_members(&ids(0..12)).await;
    let operator = env.start().await;
    let mut doc = env.import("vanished", "vanished", daily());
    doc["spec"]["deletionPolicy"] = json!("RemoveMembers");
    env.create(doc).await;
    assert_succeeded(&run(&env, "vanished", "1", 1).await);
    assert!(env.delete_snapshot("vanished").await > 0);
    env.delete("vanished").await;
    let note = env.wait_event("vanished", "CleanupFailed").await;
    assert!(note.contains("is gone, but status records snapshot generation 1 of 12 members committed"), "{note}");
    let held: CohortImport = env.wait_reason("vanished", "Deleting").await;
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(!env.events("vanished").await.iter().any(|(reason, _)| reason == "MembersRemoved"), "never 'removed 0'");
    assert_eq!(env.members("vanished"), set(&ids(0..12)));
    env.merge("vanished", json!({ "spec": { "deletionPolicy": "Retain" } })).await;
    env.wait_for("vanished", "deleted", |i| i.is_none()).await;
    operator.stop().await;
}

/// Status written before commits were recorded (an install being upgraded) has no
/// `committedSnapshot`: such an import is not blocked, and its next successful run records
/// one, from which a lost snapshot is caught.
#[tokio::test]
async fn an_import_from_before_committed_snapshots_is_not_blocked_and_records_one() {
    let env = Env::new("snapsafe-upgrade").await;
    env.put_members(&ids(0..8)).await;
    let operator = env.start().await;
    env.create(env.import("older", "older", daily())).await;
    assert_succeeded(&run(&env, "older", "1", 1).await);
    let earlier = json!({ "status": { "committedSnapshot": null, "snapshotMissingRun": null } });
    env.imports().patch_status("older", &PatchParams::default(), &Patch::Merge(&earlier)).await.unwrap();
    env.wait_status("older", "without committedSnapshot", |s| s.committed_snapshot.is_none()).await;

    env.put_members(&ids(0..10)).await;
    let status = run(&env, "older", "2", 2).await;
    assert_succeeded(&status);
    assert_eq!((status.history[0].added, status.history[0].removed), (2, 0));
    let committed = status.committed_snapshot.expect("recorded by the first run of this version");
    assert_eq!((committed.generation, committed.members), (2, 10));

    // A run that sends nothing records what the store holds too.
    env.imports().patch_status("older", &PatchParams::default(), &Patch::Merge(&earlier)).await.unwrap();
    env.wait_status("older", "without committedSnapshot", |s| s.committed_snapshot.is_none()).await;
    let status = run(&env, "older", "3", 3).await;
    assert_eq!((status.history[0].added, status.history[0].removed), (0, 0));
    assert_eq!(status.committed_snapshot.map(|c| (c.generation, c.members, c.digest)), Some((2, 10, committed.digest)));

    // From now on a lost snapshot is caught.
    assert!(env.delete_snapshot("older").await > 0);
    let status = run(&env, "older", "4", 4).await;
    assert_snapshot_missing(&env, "older", &status);
    operator.stop().await;
}

/// The filesystem store keys snapshots by cohort too: an import deleted with `Retain` and
/// applied again (a new uid) continues from the file, and a lost file is caught.
#[tokio::test]
async fn the_filesystem_store_keeps_a_cohorts_snapshot_across_delete_and_reapply() {
    use cohort_operator::braze::{BrazeClient, BrazeClientConfig};
    use cohort_operator::controller::pipeline::{PipelineImporter, SnapshotStoreKind};
    let env = Env::new("snapsafe-fs").await;
    let volume = tempfile::tempdir().unwrap();
    let braze = BrazeClient::new(BrazeClientConfig::default()).unwrap();
    let store = SnapshotStoreKind::Filesystem(volume.path().to_owned());
    let importer = PipelineImporter::new(env.client.clone(), braze, store, env.scratch.path().to_owned());
    let operator = env.start_importing(env.config(), None, std::sync::Arc::new(importer)).await;
    env.put_members(&ids(0..20)).await;
    env.create(env.import("files", "files", daily())).await;
    assert_succeeded(&run(&env, "files", "1", 1).await);
    let snapshots = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(volume.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".snapshot"))
            .collect();
        names.sort();
        names
    };
    let files = snapshots();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(&format!("{}_s1-", env.ns)), "keyed by cohort, not by uid: {files:?}");

    env.delete("files").await;
    env.wait_for("files", "deleted", |i| i.is_none()).await;
    assert_eq!(snapshots(), files, "Retain keeps the file");
    env.put_members(&[ids(0..15), ids(50..52)].concat()).await;
    env.create(env.import("files", "files", daily())).await;
    let status = run(&env, "files", "1", 1).await;
    assert_succeeded(&status);
    assert_eq!((status.history[0].added, status.history[0].removed), (2, 5));
    assert_eq!(env.members("files"), set(&[ids(0..15), ids(50..52)].concat()));

    std::fs::remove_file(volume.path().join(&files[0])).unwrap();
    let status = run(&env, "files", "2", 2).await;
    assert_snapshot_missing(&env, "files", &status);
    operator.stop().await;
}
