//! What a genuine call does: record its delivery on the trigger (refusing one already
//! recorded: a replay), then ask each selected import for a run by setting its
//! run-requested annotation — the same request `kubectl cohort trigger` makes, so the
//! leader of the import's shard runs it, whichever replica took the call.

use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::hooks::Hook;
use super::signature::Delivery;
use crate::api::{CohortImport, CohortTrigger, RUN_REQUESTED_ANNOTATION, TriggerDelivery};

/// How long and how many deliveries a trigger remembers against replays. A delivery sent
/// before what is remembered (older than a day, or than the oldest of a full memory) is
/// refused: a replay that outlived its memory still runs nothing.
pub const REMEMBERED_FOR: SignedDuration = SignedDuration::from_hours(24);
pub const REMEMBERED_AT_MOST: usize = 512;
/// How far ahead of this replica's clock a sender's time may be.
const CLOCK_SKEW: SignedDuration = SignedDuration::from_mins(5);
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
    #[error(
        "the delivery was sent before what the trigger remembers (a day, or its last 512 deliveries) or too far ahead of the operator's clock: a replay runs nothing"
    )]
    Stale,
    #[error("the trigger was deleted")]
    Gone,
    #[error("the Kubernetes API did not answer as expected; try again")]
    Api(#[source] kube::Error),
    #[error("other calls kept changing the trigger at the same time; try again")]
    Busy,
}

/// Records the delivery on the trigger, then requests a run of each import it selects; if
/// that fails, forgets the delivery again so that the sender's retry is not a replay.
pub async fn deliver(
    client: &Client,
    hook: &Hook,
    delivery: &Delivery,
    now: Timestamp,
) -> Result<Outcome, DeliverError> {
    let api: Api<CohortTrigger> = Api::namespaced(client.clone(), &hook.namespace);
    update_memory(&api, &hook.name, |seen| remember(seen, delivery, now)).await?;
    match request_runs(client, hook, &delivery.id, now).await {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            let id = delivery.id.as_str();
            let forget_it = |seen: &mut Vec<TriggerDelivery>| {
                seen.retain(|d| d.id != id);
                Ok(())
            };
            if let Err(forget) = update_memory(&api, &hook.name, forget_it).await {
                tracing::warn!(trigger = hook.name, error = %forget, "could not forget a failed delivery");
            }
            Err(e)
        }
    }
}

/// Changes `status.recentDeliveries` by `change`, guarded by the resourceVersion it read,
/// so two replicas taking the same delivery at once cannot both accept it.
async fn update_memory(
    api: &Api<CohortTrigger>,
    name: &str,
    change: impl Fn(&mut Vec<TriggerDelivery>) -> Result<(), DeliverError>,
) -> Result<(), DeliverError> {
    for _ in 0..RECORD_TRIES {
        let mut trigger = match api.get(name).await {
            Ok(trigger) => trigger,
            Err(kube::Error::Api(s)) if s.is_not_found() => return Err(DeliverError::Gone),
            Err(e) => return Err(DeliverError::Api(e)),
        };
        let mut status = trigger.status.take().unwrap_or_default();
        change(&mut status.recent_deliveries)?;
        status.last_delivery = status.recent_deliveries.first().cloned();
        trigger.status = Some(status);
        match api.replace_status(name, &PostParams::default(), &trigger).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() => continue,
            Err(e) => return Err(DeliverError::Api(e)),
        }
    }
    Err(DeliverError::Busy)
}

/// `seen` with the delivery first, forgetting what is older than [`REMEMBERED_FOR`] or
/// beyond [`REMEMBERED_AT_MOST`]; a replay if its id is still remembered, stale if it was
/// sent before the oldest delivery the memory still covers.
fn remember(seen: &mut Vec<TriggerDelivery>, delivery: &Delivery, now: Timestamp) -> Result<(), DeliverError> {
    seen.retain(|d| now.duration_since(d.received_at) <= REMEMBERED_FOR);
    if seen.iter().any(|d| d.id == delivery.id) {
        return Err(DeliverError::Replayed(delivery.id.clone()));
    }
    if let Some(sent_at) = delivery.sent_at {
        let covered_since = match seen.get(REMEMBERED_AT_MOST - 1) {
            Some(oldest_kept) => oldest_kept.received_at.max(now - REMEMBERED_FOR),
            None => now - REMEMBERED_FOR,
        };
        if sent_at < covered_since || sent_at > now + CLOCK_SKEW {
            return Err(DeliverError::Stale);
        }
    }
    let received_at = crate::controller::status::seconds(now);
    seen.insert(0, TriggerDelivery { id: delivery.id.clone(), received_at });
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
    let mut failed = None;
    for import in imports.items {
        // A request not yet taken up starts a run that reads the source after this call:
        // it serves this call too. A run already going may have read it before.
        if waiting(&import) {
            outcome.merged += 1;
            continue;
        }
        // Every import is tried; one that fails fails the call (its retry patches again).
        match api.patch(&import.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => outcome.requested += 1,
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) => Err(DeliverError::Api(e)),
        None => Ok(outcome),
    }
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
        let d = |id: &str, sent: Option<&str>| Delivery { id: id.into(), sent_at: sent.map(at) };
        remember(&mut seen, &d("a", None), at("2026-12-07T10:00:00Z")).unwrap();
        let again = remember(&mut seen, &d("a", None), at("2026-12-07T11:00:00Z"));
        assert!(matches!(again, Err(DeliverError::Replayed(_))));
        remember(&mut seen, &d("b", Some("2026-12-07T10:59:00Z")), at("2026-12-07T11:00:00Z")).unwrap();
        assert_eq!(seen.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        // A day later "a" is forgotten — and a delivery sent then is refused as too old.
        let late = remember(&mut seen, &d("a", Some("2026-12-07T10:00:00Z")), at("2026-12-08T10:30:00Z"));
        assert!(matches!(late, Err(DeliverError::Stale)));
        remember(&mut seen, &d("a", None), at("2026-12-08T10:30:00Z")).unwrap();
        assert_eq!(seen.len(), 2, "the first a was forgotten, b is kept");
        let ahead = remember(&mut seen, &d("c", Some("2026-12-08T11:00:00Z")), at("2026-12-08T10:30:00Z"));
        assert!(matches!(ahead, Err(DeliverError::Stale)));
    }

    #[test]
    fn a_full_memory_refuses_what_was_sent_before_its_oldest_delivery() {
        let mut seen = Vec::new();
        let start = at("2026-12-07T10:00:00Z");
        for i in 0..REMEMBERED_AT_MOST + 10 {
            let now = start + SignedDuration::from_secs(i as i64);
            remember(&mut seen, &Delivery { id: format!("d{i}"), sent_at: Some(now) }, now).unwrap();
        }
        assert_eq!(seen.len(), REMEMBERED_AT_MOST);
        assert_eq!(seen[0].id, format!("d{}", REMEMBERED_AT_MOST + 9));
        // "d0" fell out of the memory; sent at its time, it is refused, not run again.
        let now = start + SignedDuration::from_secs(600);
        let replay = remember(&mut seen, &Delivery { id: "d0".into(), sent_at: Some(start) }, now);
        assert!(matches!(replay, Err(DeliverError::Stale)));
    }
}
