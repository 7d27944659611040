//! What a genuine call does: record its delivery on the trigger (refusing one already
//! recorded: a replay), then ask each selected import for a run by setting its
//! run-requested annotation — the same request `kubectl cohort trigger` makes, so the
//! leader of the import's shard runs it, whichever replica took the call.

use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::hooks::Hook;
use crate::api::{CohortImport, CohortTrigger, RUN_REQUESTED_ANNOTATION, TriggerDelivery};

/// How long and how many deliveries a trigger remembers against replays.
pub const REMEMBERED_FOR: SignedDuration = SignedDuration::from_hours(24);
pub const REMEMBERED_AT_MOST: usize = 256;
/// Tries of the guarded status write when another replica wrote the trigger first.
const RECORD_TRIES: usize = 5;

/// What a call did.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Imports whose run was requested by this call.
    pub requested: usize,
    /// Imports that already had a run requested and not started: the call joined it.
    pub merged: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("delivery {0} was accepted before: a replay runs nothing")]
    Replayed(String),
    #[error("the trigger was deleted")]
    Gone,
    #[error("the Kubernetes API did not answer as expected; try again")]
    Api(#[source] kube::Error),
    #[error("other calls kept changing the trigger at the same time; try again")]
    Busy,
}

/// Records `id` on the trigger, then requests a run of each import it selects.
pub async fn deliver(client: &Client, hook: &Hook, id: &str, now: Timestamp) -> Result<Outcome, DeliverError> {
    record(client, hook, id, now).await?;
    request_runs(client, hook, id, now).await
}

/// Adds `id` to `status.recentDeliveries`, guarded by the resourceVersion it read, so two
/// replicas taking the same delivery at once cannot both accept it.
async fn record(client: &Client, hook: &Hook, id: &str, now: Timestamp) -> Result<(), DeliverError> {
    let api: Api<CohortTrigger> = Api::namespaced(client.clone(), &hook.namespace);
    for _ in 0..RECORD_TRIES {
        let mut trigger = match api.get(&hook.name).await {
            Ok(trigger) => trigger,
            Err(kube::Error::Api(s)) if s.is_not_found() => return Err(DeliverError::Gone),
            Err(e) => return Err(DeliverError::Api(e)),
        };
        let mut status = trigger.status.take().unwrap_or_default();
        remember(&mut status.recent_deliveries, id, now)?;
        status.last_delivery = status.recent_deliveries.first().cloned();
        trigger.status = Some(status);
        match api.replace_status(&hook.name, &PostParams::default(), &trigger).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() => continue,
            Err(e) => return Err(DeliverError::Api(e)),
        }
    }
    Err(DeliverError::Busy)
}

/// `seen` with `id` first, forgetting what is older than [`REMEMBERED_FOR`] or beyond
/// [`REMEMBERED_AT_MOST`]; a replay if `id` is still remembered.
fn remember(seen: &mut Vec<TriggerDelivery>, id: &str, now: Timestamp) -> Result<(), DeliverError> {
    seen.retain(|d| now.duration_since(d.received_at) <= REMEMBERED_FOR);
    if seen.iter().any(|d| d.id == id) {
        return Err(DeliverError::Replayed(id.to_owned()));
    }
    let received_at = crate::controller::status::seconds(now);
    seen.insert(0, TriggerDelivery { id: id.to_owned(), received_at });
    seen.truncate(REMEMBERED_AT_MOST);
    Ok(())
}

/// Sets the run-requested annotation of each selected import that has no request waiting.
async fn request_runs(client: &Client, hook: &Hook, id: &str, now: Timestamp) -> Result<Outcome, DeliverError> {
    let api: Api<CohortImport> = Api::namespaced(client.clone(), &hook.namespace);
    let imports = api.list(&ListParams::default().labels(&hook.selector)).await.map_err(DeliverError::Api)?;
    let value = format!("{now} cohorttrigger/{} {id}", hook.name);
    let patch = json!({ "metadata": { "annotations": { RUN_REQUESTED_ANNOTATION: value } } });
    let mut outcome = Outcome { requested: 0, merged: 0 };
    for import in imports.items {
        // A request not yet taken up starts a run that reads the source after this call:
        // it serves this call too. A run already going may have read it before.
        if waiting(&import) {
            outcome.merged += 1;
            continue;
        }
        match api.patch(&import.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => outcome.requested += 1,
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(DeliverError::Api(e)),
        }
    }
    Ok(outcome)
}

/// Whether `import` carries a run request the controller has not taken up yet.
fn waiting(import: &CohortImport) -> bool {
    let requested = import.annotations().get(RUN_REQUESTED_ANNOTATION).filter(|v| !v.is_empty());
    let handled = import.status.as_ref().and_then(|s| s.last_handled_run_request.as_ref());
    requested.is_some() && requested != handled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_delivery_is_accepted_once_and_forgotten_after_a_day() {
        let mut seen = Vec::new();
        remember(&mut seen, "a", at("2026-12-07T10:00:00Z")).unwrap();
        assert!(matches!(remember(&mut seen, "a", at("2026-12-07T11:00:00Z")), Err(DeliverError::Replayed(_))));
        remember(&mut seen, "b", at("2026-12-07T11:00:00Z")).unwrap();
        assert_eq!(seen.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        remember(&mut seen, "a", at("2026-12-08T10:30:00Z")).unwrap();
        assert_eq!(seen.len(), 2, "the first a was forgotten, b is kept");
    }

    #[test]
    fn at_most_so_many_deliveries_are_remembered() {
        let mut seen = Vec::new();
        let now = at("2026-12-07T10:00:00Z");
        for i in 0..REMEMBERED_AT_MOST + 10 {
            remember(&mut seen, &format!("d{i}"), now).unwrap();
        }
        assert_eq!(seen.len(), REMEMBERED_AT_MOST);
        assert_eq!(seen[0].id, format!("d{}", REMEMBERED_AT_MOST + 9));
    }
}
