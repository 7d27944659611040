//! Availability on a real kube-apiserver: two replicas under Lease-based leader election
//! never run an import twice and the standby takes over when the leader dies; an operator
//! killed in the middle of a run converges when it comes back, with nothing lost.

use crate::controller_support::*;
use braze_sandbox::Faults;
use cohort_operator::api::{RunResult, RunTrigger};
use serde_json::json;

#[tokio::test]
async fn two_replicas_run_each_import_once_and_the_standby_takes_over() {
    let env = Env::new("ctl-ha").await;
    env.put_members(&ids(0..3)).await;
    let a = env.start_with(env.leader_config("replica-a"), None).await;
    let b = env.start_with(env.leader_config("replica-b"), None).await;
    wait_until("one replica leading", || a.is_leader() || b.is_leader()).await;

    // Both replicas are up; each import runs exactly once.
    for i in 0..5 {
        env.create(env.import(&format!("once-{i}"), &format!("once-{i}"), json!({ "cadence": "Once" }))).await;
    }
    for i in 0..5 {
        let status = env.wait_runs(&format!("once-{i}"), 1).await.status.unwrap();
        assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    }
    assert!(!(a.is_leader() && b.is_leader()), "never two leaders");
    assert_eq!(env.sandbox.stats().users_requests, 5, "one membership request per import");

    // The leader dies without a word (its Lease is not released).
    let (leader, standby) = if a.is_leader() { (a, b) } else { (b, a) };
    leader.kill().await;
    env.put_members(&ids(0..4)).await;
    env.request_run("once-0", "after-failover").await;
    let status = env.wait_runs("once-0", 2).await.status.unwrap();
    assert!(standby.is_leader(), "the standby leads");
    assert_eq!(status.history[0].trigger, RunTrigger::Manual);
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(status.history[0].added, 1);
    assert_ne!(status.history[0].id, status.history[1].id);
    assert_eq!(env.members("once-0"), set(&ids(0..4)));
    // The other imports did not run again under the new leader.
    for i in 1..5 {
        assert_eq!(env.get(&format!("once-{i}")).await.status.unwrap().history.len(), 1);
    }
    assert_eq!(env.sandbox.stats().users_requests, 6);
    standby.stop().await;
}

#[tokio::test]
async fn an_operator_killed_in_the_middle_of_a_run_finishes_it_when_back() {
    let env = Env::new("ctl-restart").await;
    env.put_members(&ids(0..3000)).await;
    let operator = env.start().await;
    env.create(env.import("cut", "cut", json!({ "cadence": "Daily", "at": "06:30" }))).await;
    env.wait_status("cut", "Scheduled", |s| s.next_run_at.is_some()).await;

    // Braze is slow; the operator dies after the first requests went out.
    env.sandbox.set_faults(Faults { latency_ms: 1500, ..Faults::default() });
    env.request_run("cut", "now").await;
    let running = env.wait_status("cut", "Running", |s| s.current_run.is_some()).await;
    let run_id = running.status.unwrap().current_run.unwrap().id;
    wait_until("Braze receiving the run", || env.sandbox.stats().requests >= 1).await;
    operator.kill().await;
    env.sandbox.set_faults(Faults::default());

    // Back: the interrupted run is found in status and run again, to the end.
    let operator = env.start().await;
    let status = env.wait_runs("cut", 1).await.status.unwrap();
    let run = &status.history[0];
    assert_eq!(run.id, run_id, "the same run, finished");
    assert_eq!(run.trigger, RunTrigger::Manual);
    assert_eq!(run.result, RunResult::Succeeded, "{}", run.message);
    assert_eq!(run.cohort_size, 3000);
    assert_eq!(status.last_handled_run_request.as_deref(), Some("now"), "the request is not run a third time");
    assert_eq!(env.members("cut"), set(&ids(0..3000)), "nothing lost");
    env.wait_event("cut", "RunInterrupted").await;

    // And the next run sends nothing: the snapshot holds exactly what Braze has.
    let requests = env.sandbox.stats().users_requests;
    env.request_run("cut", "again").await;
    let status = env.wait_runs("cut", 2).await.status.unwrap();
    assert_eq!((status.history[0].added, status.history[0].removed), (0, 0));
    assert_eq!(env.sandbox.stats().users_requests, requests);
    operator.stop().await;
}
