//! Shards on a real kube-apiserver (issue 16): two operators in-process, each owning the
//! imports its `cohorts.dev/shard` selector picks and leading on a Lease of its own. Twenty
//! imports split by label each run on exactly one shard; relabelling an import moves it to
//! the other shard with its snapshot, never running it twice — idle, or in the middle of a
//! run (the old shard stops it, the new one resumes the same run).

use crate::controller_support::*;
use braze_sandbox::Faults;
use cohort_operator::api::RunResult;
use cohort_operator::controller::Config;
use cohort_operator::controller::leader::LeaderElection;
use cohort_operator::controller::metrics::ResultLabels;
use cohort_operator::controller::shard::{SHARD_LABEL, Shard, ShardFlags};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::{Value, json};

/// Shard `name` of the installation `a`, `b`; `a` is the default shard.
fn shard_config(env: &Env, name: &str) -> Config {
    let shard = Shard::from_flags(&ShardFlags {
        shard: Some(name.into()),
        shard_default: name == "a",
        shards: vec!["a".into(), "b".into()],
        watch_label_selector: None,
    })
    .unwrap();
    let election = LeaderElection {
        lease_name: "cohort-operator".into(),
        lease_namespace: env.ns.clone(),
        identity: format!("pod-{name}"),
        lease_duration_seconds: 4,
        renew_grace_seconds: 2,
    };
    Config { shard, leader_election: Some(election.for_shard(Some(name))), ..env.config() }
}

fn labelled(mut doc: Value, shard: Option<&str>) -> Value {
    if let Some(shard) = shard {
        doc["metadata"]["labels"] = json!({ SHARD_LABEL: shard });
    }
    doc
}

fn succeeded(operator: &Operator) -> u64 {
    operator.metrics.runs.get_or_create(&ResultLabels { result: "Succeeded".into() }).get()
}

/// Whether `operator` exports a series of import `name`: only the shard that owns it
/// does, and only once it has reconciled (and, in these tests, run) it.
fn ran(operator: &Operator, name: &str) -> bool {
    operator.metrics.render().contains(&format!("name=\"{name}\""))
}

async fn start_shards(env: &Env) -> (Operator, Operator) {
    let a = env.start_with(shard_config(env, "a"), None).await;
    let b = env.start_with(shard_config(env, "b"), None).await;
    wait_until("both shards leading", || a.is_leader() && b.is_leader()).await;
    (a, b)
}

#[tokio::test]
async fn twenty_imports_split_by_label_each_run_on_exactly_one_shard_with_its_own_lease() {
    let env = Env::new("shards-split").await;
    env.put_members(&ids(0..3)).await;
    let (a, b) = start_shards(&env).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    for (lease, holder) in [("cohort-operator-a", "pod-a"), ("cohort-operator-b", "pod-b")] {
        let spec = leases.get(lease).await.expect("the shard's Lease").spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(holder));
    }

    // Even imports on shard b; odd ones unlabelled, except one whose label names no shard:
    // all of those belong to the default shard a.
    let shard_of = |i: usize| match i {
        _ if i.is_multiple_of(2) => Some("b"),
        7 => Some("no-such-shard"),
        _ => None,
    };
    for i in 0..20 {
        let doc = env.import(&format!("imp-{i}"), &format!("cohort-{i}"), json!({ "cadence": "Once" }));
        env.create(labelled(doc, shard_of(i))).await;
    }
    for i in 0..20 {
        let status = env.wait_runs(&format!("imp-{i}"), 1).await.status.unwrap();
        assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    }
    for i in 0..20 {
        let name = format!("imp-{i}");
        let on_b = shard_of(i) == Some("b");
        assert_eq!((ran(&a, &name), ran(&b, &name)), (!on_b, on_b), "{name} ran on exactly its shard");
        assert_eq!(env.members(&format!("cohort-{i}")), set(&ids(0..3)));
    }
    assert_eq!((succeeded(&a), succeeded(&b)), (10, 10));
    assert_eq!(env.sandbox.stats().users_requests, 20, "one membership request per import, none twice");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_relabelled_import_moves_with_its_snapshot_and_does_not_run_again() {
    let env = Env::new("shards-move").await;
    env.put_members(&ids(0..100)).await;
    let (a, b) = start_shards(&env).await;
    let daily = json!({ "cadence": "Daily", "at": "06:30" });
    env.create(env.import("mover", "mover", daily)).await;
    env.wait_status("mover", "Scheduled", |s| s.next_run_at.is_some()).await;
    env.request_run("mover", "first").await;
    let status = env.wait_runs("mover", 1).await.status.unwrap();
    assert_eq!(status.history[0].added, 100);
    assert!(ran(&a, "mover") && !ran(&b, "mover"));
    let requests = env.sandbox.stats().users_requests;

    // Moved to shard b: nothing runs because of the move.
    env.merge("mover", json!({ "metadata": { "labels": { SHARD_LABEL: "b" } } })).await;
    env.put_members(&ids(0..101)).await;
    env.request_run("mover", "on-b").await;
    let status = env.wait_runs("mover", 2).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    // The snapshot came along: only the one new member is sent, in one request.
    assert_eq!((run.added, run.removed), (1, 0), "{}", run.message);
    assert_eq!(env.sandbox.stats().users_requests, requests + 1);
    // b's metrics follow its status write.
    wait_until("b counting the run", || succeeded(&b) == 1).await;
    assert_eq!((succeeded(&a), succeeded(&b)), (1, 1), "the first run on a, the second on b, once each");
    assert_eq!(env.members("mover"), set(&ids(0..101)));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_import_relabelled_in_the_middle_of_a_run_is_stopped_there_and_resumed_once_on_its_new_shard() {
    let env = Env::new("shards-midrun").await;
    env.put_members(&ids(0..5000)).await;
    let (a, b) = start_shards(&env).await;
    env.create(env.import("busy", "busy", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.wait_status("busy", "Scheduled", |s| s.next_run_at.is_some()).await;

    // Braze is slow: the run on a is still sending when the import moves to b.
    env.sandbox.set_faults(Faults { latency_ms: 1500, ..Faults::default() });
    env.request_run("busy", "now").await;
    let running = env.wait_status("busy", "Running on a", |s| {
        s.current_run.as_ref().and_then(|r| r.runner_shard.as_deref()) == Some("a")
    });
    let run_id = running.await.status.unwrap().current_run.unwrap().id;
    wait_until("Braze receiving the run", || env.sandbox.stats().requests >= 1).await;
    env.merge("busy", json!({ "metadata": { "labels": { SHARD_LABEL: "b" } } })).await;
    // b resumes the very same run once a let go of it.
    env.wait_status("busy", "resumed on b", move |s| {
        s.current_run.as_ref().and_then(|r| r.runner_shard.as_deref()) == Some("b")
    })
    .await;
    env.sandbox.set_faults(Faults::default());

    let status = env.wait_runs("busy", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.id, run_id, "the same run, finished on b");
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!(run.cohort_size, 5000);
    assert_eq!(env.members("busy"), set(&ids(0..5000)), "nothing lost");
    // Recorded once, by b (its metrics follow the status write); a's part was stopped.
    wait_until("b counting the run", || succeeded(&b) == 1).await;
    assert_eq!(succeeded(&a), 0, "a never finished it");
    env.wait_event("busy", "RunInterrupted").await;

    // Braze holds exactly the snapshot: the next run sends nothing.
    let requests = env.sandbox.stats().users_requests;
    env.request_run("busy", "again").await;
    let status = env.wait_runs("busy", 2).await.status.unwrap();
    assert_eq!((status.history[0].added, status.history[0].removed), (0, 0));
    assert_eq!(env.sandbox.stats().users_requests, requests);
    assert!(!ran(&a, "busy"), "a, which no longer owns it, exports none of its series");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn two_imports_of_one_cohort_on_two_shards_do_not_both_run() {
    let env = Env::new("shards-conflict").await;
    env.put_members(&ids(0..3)).await;
    let (a, b) = start_shards(&env).await;
    env.create(env.import("older", "shared", json!({ "cadence": "Once" }))).await;
    env.wait_runs("older", 1).await;
    let requests = env.sandbox.stats().requests;

    // Shard b sees the older import of shard a: the newer one is held, not run.
    let newer = env.import("newer", "shared", json!({ "cadence": "Once" }));
    env.create(labelled(newer, Some("b"))).await;
    let held = env.wait_reason("newer", "Conflict").await.status.unwrap();
    assert!(ready(&held).unwrap().message.contains("older"), "{:?}", ready(&held));
    env.request_run("newer", "when-free").await;
    env.wait_status("newer", "holding the request", |s| {
        ready(s).is_some_and(|c| c.message.contains("the requested run waits"))
    })
    .await;
    assert_eq!(env.sandbox.stats().requests, requests);

    // Once the older one is gone, the newer one runs its requested run, on b.
    env.delete("older").await;
    env.wait_for("older", "deleted", |i| i.is_none()).await;
    let status = env.wait_runs("newer", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    wait_until("b counting the run", || ran(&b, "newer")).await;
    assert!(!ran(&a, "newer"));
    a.stop().await;
    b.stop().await;
}
