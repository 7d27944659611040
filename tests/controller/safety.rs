//! Braze is never left wrong, on a real kube-apiserver with the Braze sandbox: a run that
//! panics is recorded `Failed` and the next one runs; a deletion that cannot know whom to
//! remove is held; a lost snapshot stops the runs until a person chooses the way forward.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::controller_support::*;
use cohort_operator::api::{CohortImport, CurrentRun, RunResult};
use cohort_operator::controller::importer::{ImportError, Importer};
use cohort_operator::controller::pipeline::PipelineImporter;
use cohort_operator::controller::secrets::BrazeKeys;
use cohort_operator::domain::validate::ValidSpec;
use cohort_operator::run::RunReport;
use futures::future::BoxFuture;
use kube::ResourceExt;
use serde_json::json;

/// The real importer, except that its first `panics` runs panic, as a damaged snapshot chunk
/// or an `expect` in the pipeline would.
struct PanicsFirst {
    real: Arc<PipelineImporter>,
    panics: AtomicUsize,
}

impl Importer for PanicsFirst {
    fn run<'a>(
        &'a self,
        import: &'a CohortImport,
        spec: &'a ValidSpec,
        run: &'a CurrentRun,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<RunReport, ImportError>> {
        Box::pin(async move {
            if self.panics.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                panic!("snapshot chunk 2 is damaged (injected by the test)");
            }
            self.real.run(import, spec, run, keys).await
        })
    }

    fn remove_members<'a>(
        &'a self,
        import: &'a CohortImport,
        keys: BrazeKeys,
    ) -> BoxFuture<'a, Result<u64, ImportError>> {
        self.real.remove_members(import, keys)
    }

    fn forget<'a>(&'a self, import: &'a CohortImport) -> BoxFuture<'a, Result<(), ImportError>> {
        self.real.forget(import)
    }
}

#[tokio::test]
async fn a_run_that_panics_is_recorded_failed_and_the_next_trigger_runs() {
    let env = Env::new("safe-panic").await;
    env.put_members(&ids(0..20)).await;
    let importer = Arc::new(PanicsFirst { real: env.importer(), panics: AtomicUsize::new(1) });
    let operator = env.start_importing(env.config(), None, importer).await;
    env.create(env.import("crash", "crash", json!({ "cadence": "Daily", "at": "06:30" }))).await;

    env.request_run("crash", "1").await;
    let status = env.wait_runs("crash", 1).await.status.unwrap();
    let crashed = &status.history[0];
    assert_eq!(crashed.result, RunResult::Failed, "{}", crashed.message);
    assert!(crashed.message.contains("the run panicked: snapshot chunk 2 is damaged"), "{}", crashed.message);
    let ready = ready(&status).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Failed"));
    assert!(ready.message.contains("the run panicked"), "Ready says so: {}", ready.message);
    let note = env.wait_event("crash", "RunFailed").await;
    assert!(note.contains("the run panicked"), "{note}");
    assert!(env.members("crash").is_empty(), "nothing was sent");

    // The run is deregistered: the next trigger runs, and succeeds.
    env.request_run("crash", "2").await;
    let status = env.wait_runs("crash", 2).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(ready_reason(&status), Some("Succeeded"));
    assert_eq!(env.members("crash"), set(&ids(0..20)));
    operator.stop().await;
}

#[tokio::test]
async fn remove_members_without_a_snapshot_holds_the_deletion_unless_nothing_was_sent() {
    let env = Env::new("safe-delete").await;
    env.put_members(&ids(0..30)).await;
    let operator = env.start().await;
    let schedule = json!({ "cadence": "Daily", "at": "06:30" });
    for name in ["lost", "never"] {
        let mut doc = env.import(name, name, schedule.clone());
        doc["spec"]["deletionPolicy"] = json!("RemoveMembers");
        env.create(doc).await;
    }
    env.request_run("lost", "1").await;
    let status = env.wait_runs("lost", 1).await.status.unwrap();
    assert_eq!(status.history[0].result, RunResult::Succeeded, "{}", status.history[0].message);
    assert_eq!(env.members("lost"), set(&ids(0..30)));

    // The snapshot goes first (a foreground cascade, a clean-up by label): the deletion is
    // held, says why and how to let it go, and removes no one.
    assert!(env.delete_snapshot("lost").await > 0);
    env.delete("lost").await;
    let note = env.wait_event("lost", "CleanupFailed").await;
    assert!(note.contains("set spec.deletionPolicy to Retain"), "{note}");
    assert!(note.contains("is gone, but status records snapshot generation 1 of 30 members committed"), "{note}");
    let held = env.wait_reason("lost", "Deleting").await;
    let ready = ready(held.status.as_ref().unwrap()).unwrap();
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains(&format!("kubectl patch cohortimport lost -n {}", env.ns)), "{}", ready.message);
    assert!(!env.events("lost").await.iter().any(|(reason, _)| reason == "MembersRemoved"), "never 'removed 0'");
    assert_eq!(env.members("lost"), set(&ids(0..30)), "no one was removed");

    // Doing what it says lets it go; the members stay.
    env.merge("lost", json!({ "spec": { "deletionPolicy": "Retain" } })).await;
    env.wait_for("lost", "deleted", |i| i.is_none()).await;
    assert_eq!(env.members("lost"), set(&ids(0..30)));

    // An import that never ran sent no one: it has no finalizer to hold it, and goes at once.
    assert!(env.get("never").await.finalizers().is_empty());
    env.delete("never").await;
    env.wait_for("never", "deleted", |i| i.is_none()).await;
    operator.stop().await;
}
