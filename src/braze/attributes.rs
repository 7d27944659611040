//! Membership as a custom attribute, through `POST /users/track` and the customer's REST
//! API key: the wire format, its batching and its limits (pure).
//!
//! Braze documents (braze.com/docs/api/endpoints/user_data/post_user_track, …/api_limits,
//! …/objects_filters/user_attributes_object, …/api/errors):
//! - at most 75 attributes objects a request; 3,000 requests per 3 seconds per workspace;
//! - `"_update_existing_only": true` updates existing profiles and never creates one (sent on
//!   every object here, aliases included, though it is their default);
//! - an array attribute changes by `{"add": [..]}` / `{"remove": [..]}`; `null` deletes an
//!   attribute;
//! - objects it rejects come back in a 201 answer:
//!   `{"message": "success", "errors": [{"type": "…", "input_array": "attributes", "index": n}]}`.
//!
//! Not documented: whether an update-only object for a user Braze does not have is listed in
//! `errors` (public clients show none); such users are counted as sent, as on the partner
//! path, where Braze ignores unknown ids.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use super::batch::Batch;
use super::budget::BudgetConfig;
use crate::api::AttributeShape;
use crate::domain::member::Member;
use crate::secret::redact;

/// Braze's limit on objects per `/users/track` request.
pub const MAX_OBJECTS_PER_REQUEST: usize = 75;
/// Braze's documented limit: 3,000 requests per 3 seconds per workspace.
pub const REQUESTS_PER_WINDOW: u32 = 3000;
pub const WINDOW: Duration = Duration::from_secs(3);
/// Reasons kept per run: a hostile or broken answer cannot grow a report without bound.
pub const MAX_REASONS: usize = 20;
/// Characters of one reason kept.
pub const MAX_REASON_CHARS: usize = 120;

/// The attribute membership is written to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipAttribute {
    /// The custom attribute's name (validated against Braze's rules by the spec).
    pub name: String,
    pub shape: AttributeShape,
}

/// The budget of a `/users/track` destination: Braze's window is aligned, so the bucket's
/// burst plus three seconds of its rate stays within 3,000 requests in any 3 s. With shards,
/// each takes its share of it, as of the partner endpoints' ([`BudgetConfig::shared_by`]).
pub fn users_track_budget(base: &BudgetConfig) -> BudgetConfig {
    let burst = REQUESTS_PER_WINDOW / 10;
    let per_window = REQUESTS_PER_WINDOW - burst;
    let per_hour = u64::from(per_window) * 3600 / WINDOW.as_secs();
    let whole = BudgetConfig { requests_per_hour: per_hour as u32, burst, shards: 1, max_wait: base.max_wait };
    whole.shared_by(base.shards as usize)
}

/// `POST /users/track` for one batch: one attributes object per member, removals first
/// (so `errors[].index` below the batch's removal count names a removal).
pub struct TrackBody<'a> {
    pub attribute: &'a MembershipAttribute,
    pub cohort_id: &'a str,
    pub batch: &'a Batch,
}

impl Serialize for TrackBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("attributes", &Objects(self))?;
        map.end()
    }
}

struct Objects<'a, 'b>(&'b TrackBody<'a>);

impl Serialize for Objects<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let body = self.0;
        let mut seq = s.serialize_seq(Some(body.batch.len()))?;
        let removes = body.batch.removes.iter().map(|m| (m, true));
        for (member, remove) in removes.chain(body.batch.adds.iter().map(|m| (m, false))) {
            seq.serialize_element(&Object { body, member, remove })?;
        }
        seq.end()
    }
}

struct Object<'a, 'b> {
    body: &'b TrackBody<'a>,
    member: &'b Member,
    remove: bool,
}

#[derive(Serialize)]
struct AliasObject<'a> {
    alias_name: &'a str,
    alias_label: &'a str,
}

#[derive(Serialize)]
struct ArrayChange<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    add: Option<[&'a str; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remove: Option<[&'a str; 1]>,
}

impl Serialize for Object<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3))?;
        match self.member {
            Member::ExternalId(id) => map.serialize_entry("external_id", id)?,
            Member::Alias { name, label } => {
                map.serialize_entry("user_alias", &AliasObject { alias_name: name, alias_label: label })?
            }
            // Refused by validation (`deviceId` with `method: Attribute`); never sent.
            Member::DeviceId(_) => {
                return Err(serde::ser::Error::custom("a device id cannot be sent through /users/track"));
            }
        }
        map.serialize_entry("_update_existing_only", &true)?;
        let attribute = self.body.attribute;
        let cohort = self.body.cohort_id;
        match (attribute.shape, self.remove) {
            (AttributeShape::Array, false) => {
                map.serialize_entry(&attribute.name, &ArrayChange { add: Some([cohort]), remove: None })?
            }
            (AttributeShape::Array, true) => {
                map.serialize_entry(&attribute.name, &ArrayChange { add: None, remove: Some([cohort]) })?
            }
            (AttributeShape::Boolean, false) => map.serialize_entry(&attribute.name, &true)?,
            (AttributeShape::Boolean, true) => map.serialize_entry(&attribute.name, &())?,
        }
        map.end()
    }
}

/// Objects of one request Braze rejected (listed in `errors` of an accepted answer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejected {
    pub adds: u64,
    pub removes: u64,
    /// By Braze's `type` (keys redacted, cut to [`MAX_REASON_CHARS`]).
    pub by_reason: BTreeMap<String, u64>,
}

impl Rejected {
    pub fn total(&self) -> u64 {
        self.adds + self.removes
    }

    /// Adds `other`, keeping at most [`MAX_REASONS`] reasons (the rest counted as "other").
    pub fn merge(&mut self, other: &Rejected) {
        self.adds += other.adds;
        self.removes += other.removes;
        for (reason, n) in &other.by_reason {
            let known = self.by_reason.contains_key(reason) || self.by_reason.len() < MAX_REASONS;
            let key = if known { reason.clone() } else { "other reasons".to_owned() };
            *self.by_reason.entry(key).or_default() += n;
        }
    }
}

/// Reads the per-object `errors` of an accepted `/users/track` answer for a batch that had
/// `removes` removals then `objects - removes` additions. Entries that name no object of
/// the batch (no index, out of range, repeated) are ignored: they cannot be told apart.
pub fn rejected_objects(body: &[u8], objects: u64, removes: u64, secrets: &[&str]) -> Rejected {
    let mut rejected = Rejected::default();
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else { return rejected };
    let Some(errors) = json.get("errors").and_then(|e| e.as_array()) else { return rejected };
    let mut seen = std::collections::BTreeSet::new();
    for error in errors {
        let index = error.get("index").and_then(|i| i.as_u64());
        let in_attributes = error.get("input_array").and_then(|a| a.as_str()).is_none_or(|a| a == "attributes");
        let Some(index) = index.filter(|i| *i < objects && in_attributes && seen.insert(*i)) else { continue };
        let reason = error.get("type").and_then(|t| t.as_str()).unwrap_or("unnamed error");
        let reason = super::wire::truncate(redact(reason, secrets, super::wire::REDACT_MIN_LEN), MAX_REASON_CHARS);
        if index < removes {
            rejected.removes += 1;
        } else {
            rejected.adds += 1;
        }
        let mut one = Rejected::default();
        one.by_reason.insert(reason, 1);
        rejected.merge(&one);
    }
    rejected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::braze::batch::{Change, Packer};
    use serde_json::json;

    fn body(shape: AttributeShape, changes: Vec<Change>) -> serde_json::Value {
        let mut packer = Packer::new(MAX_OBJECTS_PER_REQUEST);
        for c in changes {
            assert!(packer.push(c).is_none());
        }
        let batch = packer.finish().unwrap();
        let attribute = MembershipAttribute { name: "cohorts".into(), shape };
        serde_json::to_value(TrackBody { attribute: &attribute, cohort_id: "vip", batch: &batch }).unwrap()
    }

    #[test]
    fn array_shape_adds_and_removes_the_cohort_id_update_only_removals_first() {
        let json = body(
            AttributeShape::Array,
            vec![
                Change::add(Member::ExternalId("u1".into())),
                Change::remove(Member::Alias { name: "n\"1".into(), label: "crm".into() }),
            ],
        );
        assert_eq!(
            json,
            json!({"attributes": [
                {"user_alias": {"alias_name": "n\"1", "alias_label": "crm"}, "_update_existing_only": true,
                 "cohorts": {"remove": ["vip"]}},
                {"external_id": "u1", "_update_existing_only": true, "cohorts": {"add": ["vip"]}},
            ]})
        );
    }

    #[test]
    fn boolean_shape_sets_true_and_deletes_with_null() {
        let json = body(
            AttributeShape::Boolean,
            vec![Change::add(Member::ExternalId("u1".into())), Change::remove(Member::ExternalId("u2".into()))],
        );
        assert_eq!(
            json["attributes"],
            json!([
                {"external_id": "u2", "_update_existing_only": true, "cohorts": null},
                {"external_id": "u1", "_update_existing_only": true, "cohorts": true},
            ])
        );
    }

    #[test]
    fn a_device_id_is_never_encoded() {
        let mut packer = Packer::new(MAX_OBJECTS_PER_REQUEST);
        packer.push(Change::add(Member::DeviceId("d".into())));
        let batch = packer.finish().unwrap();
        let attribute = MembershipAttribute { name: "c".into(), shape: AttributeShape::Array };
        assert!(serde_json::to_vec(&TrackBody { attribute: &attribute, cohort_id: "x", batch: &batch }).is_err());
    }

    #[test]
    fn per_object_errors_are_counted_by_direction_and_reason_never_beyond_the_batch() {
        let answer = json!({"message": "success", "errors": [
            {"type": "'external_id' or 'braze_id' or 'user_alias' is required", "input_array": "attributes", "index": 0},
            {"type": "bad key sk-123", "input_array": "attributes", "index": 2},
            {"type": "bad key sk-123", "input_array": "attributes", "index": 2},
            {"type": "x", "input_array": "events", "index": 1},
            {"type": "x", "input_array": "attributes", "index": 99},
            "a string",
        ]});
        let r = rejected_objects(answer.to_string().as_bytes(), 3, 1, &["sk-123"]);
        assert_eq!((r.removes, r.adds), (1, 1));
        assert_eq!(r.by_reason.get("bad key <redacted>"), Some(&1));
        assert_eq!(r.by_reason.len(), 2);
        assert_eq!(rejected_objects(b"not json", 3, 0, &[]), Rejected::default());
    }

    #[test]
    fn reasons_are_bounded() {
        let mut total = Rejected::default();
        for i in 0..100 {
            let mut one = Rejected { adds: 1, ..Rejected::default() };
            one.by_reason.insert(format!("reason {i}"), 1);
            total.merge(&one);
        }
        assert_eq!(total.adds, 100);
        assert_eq!(total.by_reason.len(), MAX_REASONS + 1);
        assert_eq!(total.by_reason["other reasons"], 80);
    }

    #[test]
    fn the_budget_stays_within_brazes_window() {
        let b = users_track_budget(&BudgetConfig::default());
        let per_window = f64::from(b.requests_per_hour) / 3600.0 * WINDOW.as_secs_f64() + f64::from(b.burst);
        assert!(per_window <= f64::from(REQUESTS_PER_WINDOW), "{per_window}");
        assert!(per_window >= f64::from(REQUESTS_PER_WINDOW) * 0.99, "{per_window}");
    }
}
