//! What a genuine call does: refuse a delivery the trigger remembers (a replay), ask each
//! selected import for a run by setting its run-requested annotation — the same request
//! `kubectl cohort trigger` makes, so the leader of the import's shard runs it, whichever
//! replica took the call — and then remember the delivery.
//!
//! The annotation's value names the delivery and nothing else, so setting it twice (a
//! sender's retry after a failure, two replicas taking the same call) asks for one run: the
//! controller runs once per value. Remembering comes last, so a call that failed half-way
//! can be retried; the memory is what refuses a replay once another request came between.

use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::hooks::Hook;
use super::signature::Delivery;
use crate::api::{CohortImport, CohortTrigger, CohortTriggerStatus, RUN_REQUESTED_ANNOTATION, TriggerDelivery};

/// How long and how many deliveries a trigger remembers against replays. A delivery sent
/// at or before the newest one it has forgotten (`status.forgottenBefore`), or more than a
/// day ago, is refused: a replay that outlived its memory still runs nothing.
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
    /// Imports that already had a run requested and not started (or this very delivery's):
    /// the call joined it.
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

/// Refuses a replay (as `status` shows the trigger's memory), requests the runs, then
/// remembers the delivery.
pub async fn deliver(
    client: &Client,
    hook: &Hook,
    delivery: &Delivery,
    now: Timestamp,
) -> Result<Outcome, DeliverError> {
    let api: Api<CohortTrigger> = Api::namespaced(client.clone(), &hook.namespace);
    let trigger = get(&api, &hook.name).await?;
    remember(&mut trigger.status.unwrap_or_default(), delivery, now)?;
    let outcome = request_runs(client, hook, &delivery.id).await?;
    record(&api, &hook.name, delivery, now).await?;
    Ok(outcome)
}

async fn get(api: &Api<CohortTrigger>, name: &str) -> Result<CohortTrigger, DeliverError> {
    match api.get(name).await {
        Ok(trigger) => Ok(trigger),
        Err(kube::Error::Api(s)) if s.is_not_found() => Err(DeliverError::Gone),
        Err(e) => Err(DeliverError::Api(e)),
    }
}

/// Adds the delivery to the trigger's memory, guarded by the resourceVersion it read. One
/// another replica recorded meanwhile is fine: its runs were requested with the same value.
async fn record(api: &Api<CohortTrigger>, name: &str, delivery: &Delivery, now: Timestamp) -> Result<(), DeliverError> {
    for _ in 0..RECORD_TRIES {
        let mut trigger = get(api, name).await?;
        let mut status = trigger.status.take().unwrap_or_default();
        match remember(&mut status, delivery, now) {
            Ok(()) => {}
            Err(DeliverError::Replayed(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        trigger.status = Some(status);
        match api.replace_status(name, &PostParams::default(), &trigger).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() => continue,
            Err(e) => return Err(DeliverError::Api(e)),
        }
    }
    Err(DeliverError::Busy)
}

/// `status` with the delivery remembered first. Forgets what was sent over
/// [`REMEMBERED_FOR`] ago or lies beyond [`REMEMBERED_AT_MOST`], raising
/// `forgottenBefore` to the newest time forgotten; refuses a delivery still remembered
/// (a replay) or sent at or before `forgottenBefore`, over a day ago or too far ahead.
pub fn remember(status: &mut CohortTriggerStatus, delivery: &Delivery, now: Timestamp) -> Result<(), DeliverError> {
    let at = |d: &TriggerDelivery| d.sent_at.unwrap_or(d.received_at);
    let horizon = now - REMEMBERED_FOR;
    let mut forgotten = status.forgotten_before;
    status.recent_deliveries.retain(|d| {
        let keep = at(d) > horizon;
        if !keep {
            forgotten = forgotten.max(Some(at(d)));
        }
        keep
    });
    status.forgotten_before = forgotten;
    if status.recent_deliveries.iter().any(|d| d.id == delivery.id) {
        return Err(DeliverError::Replayed(delivery.id.clone()));
    }
    let received_at = crate::controller::status::seconds(now);
    let sent_at = delivery.sent_at.map(crate::controller::status::seconds);
    let when = sent_at.unwrap_or(received_at);
    if when <= horizon || when > now + CLOCK_SKEW || forgotten.is_some_and(|f| when <= f) {
        return Err(DeliverError::Stale);
    }
    status.recent_deliveries.insert(0, TriggerDelivery { id: delivery.id.clone(), received_at, sent_at });
    status.recent_deliveries.sort_by_key(|d| std::cmp::Reverse(at(d)));
    for dropped in status.recent_deliveries.drain(REMEMBERED_AT_MOST.min(status.recent_deliveries.len())..) {
        forgotten = forgotten.max(Some(at(&dropped)));
    }
    status.forgotten_before = forgotten;
    status.last_delivery = status.recent_deliveries.iter().find(|d| d.id == delivery.id).cloned();
    Ok(())
}

/// Sets the run-requested annotation of each selected import that has no request waiting,
/// to a value naming this delivery.
async fn request_runs(client: &Client, hook: &Hook, id: &str) -> Result<Outcome, DeliverError> {
    let api: Api<CohortImport> = Api::namespaced(client.clone(), &hook.namespace);
    let imports = api.list(&ListParams::default().labels(&hook.selector)).await.map_err(DeliverError::Api)?;
    let value = format!("cohorttrigger/{} {id}", hook.name);
    let patch = json!({ "metadata": { "annotations": { RUN_REQUESTED_ANNOTATION: value } } });
    let mut outcome = Outcome { requested: 0, merged: 0 };
    let mut failed = None;
    for import in imports.items {
        // A request not yet taken up starts a run that reads the source after this call:
        // it serves this call too. A run already going may have read it before. An import
        // already asked by this delivery (a retry) is not asked again.
        if waiting(&import) || requested(&import) == Some(value.as_str()) {
            outcome.merged += 1;
            continue;
        }
        // Every import is tried; one that fails fails the call, whose retry asks again.
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

fn requested(import: &CohortImport) -> Option<&str> {
    import.annotations().get(RUN_REQUESTED_ANNOTATION).map(String::as_str).filter(|v| !v.is_empty())
}

/// Whether `import` carries a run request the controller has not taken up yet.
fn waiting(import: &CohortImport) -> bool {
    let handled = import.status.as_ref().and_then(|s| s.last_handled_run_request.as_deref());
    requested(import).is_some_and(|r| Some(r) != handled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn d(id: &str, sent: Option<&str>) -> Delivery {
        Delivery { id: id.into(), sent_at: sent.map(at) }
    }

    #[test]
    fn a_delivery_is_accepted_once_and_forgotten_after_a_day() {
        let mut status = CohortTriggerStatus::default();
        remember(&mut status, &d("a", None), at("2026-12-07T10:00:00Z")).unwrap();
        let again = remember(&mut status, &d("a", None), at("2026-12-07T11:00:00Z"));
        assert!(matches!(again, Err(DeliverError::Replayed(_))));
        remember(&mut status, &d("b", Some("2026-12-07T10:59:00Z")), at("2026-12-07T11:00:00Z")).unwrap();
        let ids = |s: &CohortTriggerStatus| s.recent_deliveries.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&status), ["b", "a"]);
        // A day later "a" is forgotten — and sent at its time again, it is refused.
        let late = remember(&mut status, &d("a", Some("2026-12-07T10:00:00Z")), at("2026-12-08T10:30:00Z"));
        assert!(matches!(late, Err(DeliverError::Stale)));
        assert_eq!(status.forgotten_before, Some(at("2026-12-07T10:00:00Z")));
        let ahead = remember(&mut status, &d("c", Some("2026-12-08T11:00:00Z")), at("2026-12-08T10:30:00Z"));
        assert!(matches!(ahead, Err(DeliverError::Stale)));
        remember(&mut status, &d("c", Some("2026-12-08T10:29:00Z")), at("2026-12-08T10:30:00Z")).unwrap();
        assert_eq!(status.last_delivery.as_ref().map(|d| d.id.as_str()), Some("c"));
    }

    #[test]
    fn what_a_full_memory_drops_stays_refused() {
        let mut status = CohortTriggerStatus::default();
        let start = at("2026-12-07T10:00:00Z");
        for i in 0..REMEMBERED_AT_MOST + 10 {
            let now = start + SignedDuration::from_secs(i as i64);
            remember(&mut status, &Delivery { id: format!("d{i}"), sent_at: Some(now) }, now).unwrap();
        }
        assert_eq!(status.recent_deliveries.len(), REMEMBERED_AT_MOST);
        assert_eq!(status.recent_deliveries[0].id, format!("d{}", REMEMBERED_AT_MOST + 9));
        assert_eq!(status.forgotten_before, Some(start + SignedDuration::from_secs(9)));
        // "d0" fell out of the memory; sent at its time, it is refused, not run again —
        // even once the memory holds fewer again.
        status.recent_deliveries.truncate(100);
        let now = start + SignedDuration::from_secs(600);
        let replay = remember(&mut status, &Delivery { id: "d0".into(), sent_at: Some(start) }, now);
        assert!(matches!(replay, Err(DeliverError::Stale)));
    }
}
