//! Kubernetes Events (events.k8s.io/v1) on an import, for what a person should see: a run
//! succeeded, failed, was blocked, missed or interrupted, or will be retried; a conflict, an
//! invalid spec, a missing Secret; members removed or a clean-up that failed on deletion; a
//! report that could not be sent. A run's start is no Event: status shows it
//! (`currentRun`, `Ready: Running`), and one Event a run keeps a run's API requests few.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use crate::api::CohortImport;

/// Event reasons. Those that report a `Ready` reason are spelt by it.
pub mod reason {
    use crate::api::ReadyReason;

    pub const RUN_SUCCEEDED: &str = "RunSucceeded";
    pub const RUN_DRY_RUN: &str = "RunDryRun";
    pub const RUN_FAILED: &str = "RunFailed";
    pub const RUN_BLOCKED: &str = "RunBlocked";
    pub const RUN_MISSED: &str = "RunMissed";
    pub const RUN_INTERRUPTED: &str = "RunInterrupted";
    pub const RETRY_SCHEDULED: &str = ReadyReason::RetryScheduled.as_str();
    pub const CONFLICT: &str = ReadyReason::Conflict.as_str();
    pub const INVALID_SPEC: &str = ReadyReason::InvalidSpec.as_str();
    pub const SECRET_NOT_FOUND: &str = ReadyReason::SecretNotFound.as_str();
    pub const NOTIFICATION_FAILED: &str = crate::notify::NOTIFICATION_FAILED_REASON;
    pub const MEMBERS_REMOVED: &str = "MembersRemoved";
    pub const CLEANUP_FAILED: &str = "CleanupFailed";
}

/// Reasons whose Event is about one run and names it: each is an Event of its own. kube's
/// recorder folds Events of the same reason on an object into one series and keeps the
/// first note, so three runs would show as "Run A succeeded (x3)".
const ONE_PER_RUN: &[&str] = &[
    reason::RUN_SUCCEEDED,
    reason::RUN_DRY_RUN,
    reason::RUN_FAILED,
    reason::RUN_BLOCKED,
    reason::RUN_MISSED,
    reason::RUN_INTERRUPTED,
    reason::RETRY_SCHEDULED,
];

/// Publishes Events; a failure to publish is logged, never fatal.
#[derive(Clone)]
pub struct Events {
    /// Folds repeats (a Conflict seen at every reconcile) into one series.
    recorder: Recorder,
    client: kube::Client,
    reporter: Reporter,
}

impl Events {
    pub fn new(client: kube::Client, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: crate::api::FIELD_MANAGER.to_owned(), instance };
        Events { recorder: Recorder::new(client.clone(), reporter.clone()), client, reporter }
    }

    pub async fn normal(&self, import: &CohortImport, reason: &str, action: &str, note: String) {
        self.publish(import, EventType::Normal, reason, action, note).await;
    }

    pub async fn warning(&self, import: &CohortImport, reason: &str, action: &str, note: String) {
        self.publish(import, EventType::Warning, reason, action, note).await;
    }

    async fn publish(&self, import: &CohortImport, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            // The Events API limits a note to 1 kB.
            note: Some(crate::run::report::truncate(note, 1000)),
            action: action.to_owned(),
            secondary: None,
        };
        // A recorder of its own has nothing to fold the Event into.
        let recorder = match ONE_PER_RUN.contains(&reason) {
            true => &Recorder::new(self.client.clone(), self.reporter.clone()),
            false => &self.recorder,
        };
        if let Err(e) = recorder.publish(&event, &import.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}
