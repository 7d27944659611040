//! `POST /users/track`, attributes only: Braze's "user attributes object" as its public
//! documentation describes it, judged strictly. Pure: parsing, checking and applying to a
//! [`Profiles`] store; the HTTP side is in `server.rs`.
//!
//! Documented (braze.com/docs/api/endpoints/user_data/post_user_track,
//! …/api/objects_filters/user_attributes_object, …/api/api_limits, …/api/errors):
//! - the body is `{"attributes": [...], "events": [...], "purchases": [...]}`, at most 75
//!   objects a request (counted across the three arrays, as newer accounts count them);
//! - an object names its user by `external_id`, `user_alias` (`alias_name`, `alias_label`),
//!   `braze_id`, `email` or `phone`; this sandbox models `external_id` and `user_alias`;
//! - `"_update_existing_only": true` updates an existing profile and never creates one; it
//!   defaults to true for `user_alias` and to false for `external_id`;
//! - `attr: {"add": [...]}` / `{"remove": [...]}` change an array attribute; `null` deletes
//!   an attribute; keys and string values are at most 255 characters;
//! - an array attribute keeps 500 values by default; adding the 501st drops the oldest
//!   (…/custom_data/data_types);
//! - objects Braze rejects are listed in a 201 answer:
//!   `{"message":"success","attributes_processed":N,"errors":[{"type","input_array","index"}]}`.
//!
//! Not documented, and the sandbox's choice (so tests do not rely on Braze's words): the
//! error `type` texts other than the missing identifier; that an update-only object for an
//! unknown user is skipped silently (counted in [`TrackOutcome::unknown_users`]); that
//! `events` and `purchases` are refused when not empty (the sandbox does not model them).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::store::{SandboxUser, Users};

/// Braze's limit on objects per `/users/track` request.
pub const MAX_OBJECTS_PER_REQUEST: usize = 75;
/// Braze's limit on attribute names and string values, in characters.
pub const MAX_KEY_CHARS: usize = 255;
/// Braze's default length of an array attribute.
pub const DEFAULT_ARRAY_LIMIT: usize = 500;

pub const MSG_NOT_OBJECT: &str = "Request body must be a JSON object";
pub const MSG_UNKNOWN_FIELD: &str = "Unknown top-level field; allowed: attributes, events, purchases";
pub const MSG_ATTRIBUTES_ARRAY: &str = "attributes must be an array of objects";
pub const MSG_TOO_MANY_OBJECTS: &str = "Only 75 attributes, events and purchases objects are allowed per request";
pub const MSG_EVENTS_NOT_MODELLED: &str = "The sandbox does not model events or purchases";
/// Braze's words (seen in public client tests).
pub const ERR_NO_IDENTIFIER: &str = "'external_id' or 'braze_id' or 'user_alias' is required";
pub const ERR_TWO_IDENTIFIERS: &str = "only one of 'external_id', 'braze_id' or 'user_alias' may be given";
pub const ERR_BAD_EXTERNAL_ID: &str = "'external_id' must be a non-empty string of at most 997 bytes";
pub const ERR_BAD_ALIAS: &str = "'user_alias' must be an object with non-empty string 'alias_name' and 'alias_label'";
pub const ERR_UNSUPPORTED_IDENTIFIER: &str = "the sandbox models only 'external_id' and 'user_alias'";
pub const ERR_UPDATE_ONLY_TYPE: &str = "'_update_existing_only' must be a boolean";
pub const ERR_ATTRIBUTE_NAME: &str = "custom attribute names must be 1 to 255 characters and not start with '$'";
/// The `type` of an object refused by fault injection (`Faults::reject_external_ids`).
pub const ERR_REJECTED_BY_FAULT: &str = "sandbox fault: this user's object was rejected";
pub const ERR_ATTRIBUTE_VALUE: &str = "custom attribute value must be a string of at most 255 characters, number, \
     boolean, null, array of strings, or an object with only 'add' and/or 'remove' arrays";

/// One rejected object, as Braze lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectError {
    #[serde(rename = "type")]
    pub kind: String,
    pub input_array: &'static str,
    pub index: usize,
}

/// Who an object names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    ExternalId(String),
    Alias { name: String, label: String },
}

/// A change of one attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Set(Value),
    Delete,
    Modify { add: Vec<Value>, remove: Vec<Value> },
}

/// One checked attributes object.
#[derive(Clone, Debug, PartialEq)]
pub struct AttributesObject {
    pub identity: Identity,
    /// As sent; `None` when the object left it out.
    pub update_existing_only: Option<bool>,
    pub writes: Vec<(String, Write)>,
}

impl AttributesObject {
    /// Whether this object may create a user: an `external_id` object without
    /// `_update_existing_only: true` (alias objects default to update-only).
    pub fn may_create(&self) -> bool {
        match self.identity {
            Identity::ExternalId(_) => self.update_existing_only != Some(true),
            Identity::Alias { .. } => self.update_existing_only == Some(false),
        }
    }
}

/// A request that passed the whole-request checks: its objects, or each one's error.
#[derive(Debug, Default)]
pub struct TrackRequest {
    pub objects: Vec<Result<AttributesObject, ObjectError>>,
}

/// Whole-request checks (a 400), then each attributes object (an entry in `errors`).
pub fn parse(body: &[u8]) -> Result<TrackRequest, &'static str> {
    let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) else {
        return Err(MSG_NOT_OBJECT);
    };
    if top.keys().any(|k| !matches!(k.as_str(), "attributes" | "events" | "purchases")) {
        return Err(MSG_UNKNOWN_FIELD);
    }
    let count = |key: &str| -> Result<usize, &'static str> {
        match top.get(key) {
            None => Ok(0),
            Some(Value::Array(items)) => Ok(items.len()),
            Some(_) => Err(MSG_ATTRIBUTES_ARRAY),
        }
    };
    let (attributes, others) = (count("attributes")?, count("events")? + count("purchases")?);
    if attributes + others > MAX_OBJECTS_PER_REQUEST {
        return Err(MSG_TOO_MANY_OBJECTS);
    }
    if others > 0 {
        return Err(MSG_EVENTS_NOT_MODELLED);
    }
    let items = match top.get("attributes") {
        Some(Value::Array(items)) => items.as_slice(),
        _ => &[],
    };
    let objects = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            object(item).map_err(|kind| ObjectError { kind: kind.to_owned(), input_array: "attributes", index })
        })
        .collect();
    Ok(TrackRequest { objects })
}

fn object(item: &Value) -> Result<AttributesObject, &'static str> {
    let Value::Object(fields) = item else { return Err(ERR_NO_IDENTIFIER) };
    let identity = identity(fields)?;
    let update_existing_only = match fields.get("_update_existing_only") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(ERR_UPDATE_ONLY_TYPE),
    };
    let mut writes = Vec::new();
    for (key, value) in fields {
        if is_reserved(key) {
            continue;
        }
        if key.is_empty() || key.chars().count() > MAX_KEY_CHARS || key.starts_with('$') {
            return Err(ERR_ATTRIBUTE_NAME);
        }
        writes.push((key.clone(), write(value)?));
    }
    Ok(AttributesObject { identity, update_existing_only, writes })
}

fn is_reserved(key: &str) -> bool {
    matches!(key, "external_id" | "user_alias" | "braze_id" | "email" | "phone" | "_update_existing_only")
}

fn identity(fields: &Map<String, Value>) -> Result<Identity, &'static str> {
    let named = ["external_id", "user_alias", "braze_id"].iter().filter(|k| fields.contains_key(**k)).count();
    if named > 1 {
        return Err(ERR_TWO_IDENTIFIERS);
    }
    if let Some(id) = fields.get("external_id") {
        return match id {
            Value::String(s) if !s.is_empty() && s.len() <= 997 => Ok(Identity::ExternalId(s.clone())),
            _ => Err(ERR_BAD_EXTERNAL_ID),
        };
    }
    if let Some(alias) = fields.get("user_alias") {
        let text = |k: &str| alias.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let extra = alias.as_object().is_some_and(|o| o.keys().any(|k| k != "alias_name" && k != "alias_label"));
        return match (text("alias_name"), text("alias_label"), extra) {
            (Some(name), Some(label), false) => Ok(Identity::Alias { name, label }),
            _ => Err(ERR_BAD_ALIAS),
        };
    }
    if named == 1 || fields.contains_key("email") || fields.contains_key("phone") {
        return Err(ERR_UNSUPPORTED_IDENTIFIER);
    }
    Err(ERR_NO_IDENTIFIER)
}

fn write(value: &Value) -> Result<Write, &'static str> {
    let scalar = |v: &Value| match v {
        Value::String(s) => s.chars().count() <= MAX_KEY_CHARS,
        Value::Bool(_) | Value::Number(_) => true,
        _ => false,
    };
    match value {
        Value::Null => Ok(Write::Delete),
        Value::Array(items) if items.iter().all(|v| v.is_string() && scalar(v)) => Ok(Write::Set(value.clone())),
        Value::Object(ops) => {
            let list = |k: &str| -> Result<Vec<Value>, &'static str> {
                match ops.get(k) {
                    None => Ok(Vec::new()),
                    Some(Value::Array(items)) if items.iter().all(scalar) => Ok(items.clone()),
                    Some(_) => Err(ERR_ATTRIBUTE_VALUE),
                }
            };
            if ops.is_empty() || ops.keys().any(|k| k != "add" && k != "remove") {
                return Err(ERR_ATTRIBUTE_VALUE);
            }
            Ok(Write::Modify { add: list("add")?, remove: list("remove")? })
        }
        v if scalar(v) => Ok(Write::Set(v.clone())),
        _ => Err(ERR_ATTRIBUTE_VALUE),
    }
}

impl TrackRequest {
    /// Turns the objects naming one of `external_ids` into errors (fault injection).
    pub fn reject(&mut self, external_ids: &[String]) {
        if external_ids.is_empty() {
            return;
        }
        for (index, object) in self.objects.iter_mut().enumerate() {
            let named = matches!(object, Ok(AttributesObject { identity: Identity::ExternalId(id), .. })
                if external_ids.contains(id));
            if named {
                let kind = ERR_REJECTED_BY_FAULT.to_owned();
                *object = Err(ObjectError { kind, input_array: "attributes", index });
            }
        }
    }
}

/// Custom attributes of users, by user index.
#[derive(Debug, Default)]
pub struct Profiles {
    by_user: HashMap<u32, BTreeMap<String, Value>>,
}

/// What applying one request did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackOutcome {
    pub errors: Vec<ObjectError>,
    /// Objects applied to an existing (or, against the contract, a new) user.
    pub processed: u64,
    /// Update-only objects for a user Braze does not have: nothing happened.
    pub unknown_users: u64,
    /// Users created because an object could create them.
    pub users_created: u64,
    /// `external_id` objects without `_update_existing_only` (a contract violation here).
    pub missing_update_existing_only: u64,
    /// Attributes written: Braze's data points.
    pub data_points: u64,
    /// Writes that changed nothing (adding a present value, removing an absent one, deleting
    /// an absent attribute, setting the value it has): data points paid for nothing.
    pub wasted_writes: u64,
    /// Oldest values dropped because an array went past its limit.
    pub array_overflow: u64,
    /// Users named twice in one request.
    pub duplicate_users: u64,
    /// Writes that take a value away: an array `remove` (without `add`), `null`, `false`.
    pub removals: u64,
    /// Of the wasted writes, removals.
    pub wasted_removals: u64,
}

impl Profiles {
    pub fn get(&self, user: u32) -> Option<&BTreeMap<String, Value>> {
        self.by_user.get(&user)
    }

    /// Every user's attributes, for the state file.
    pub fn all(&self) -> impl Iterator<Item = (u32, &BTreeMap<String, Value>)> {
        self.by_user.iter().map(|(u, a)| (*u, a))
    }

    pub fn insert(&mut self, user: u32, attributes: BTreeMap<String, Value>) {
        self.by_user.insert(user, attributes);
    }

    /// Users whose array `attribute` holds `value` (or, with `None`, whose `attribute` is
    /// `true`): what a segment filter on it matches.
    pub fn matching(&self, attribute: &str, value: Option<&str>) -> Vec<u32> {
        let mut users: Vec<u32> = self
            .by_user
            .iter()
            .filter(|(_, attrs)| match (attrs.get(attribute), value) {
                (Some(Value::Array(items)), Some(v)) => items.iter().any(|i| i.as_str() == Some(v)),
                (Some(Value::Bool(true)), None) => true,
                _ => false,
            })
            .map(|(u, _)| *u)
            .collect();
        users.sort_unstable();
        users
    }

    /// Applies a parsed request in order.
    pub fn apply(&mut self, users: &mut Users, request: TrackRequest, array_limit: usize) -> TrackOutcome {
        let mut out = TrackOutcome::default();
        let mut seen = std::collections::HashSet::new();
        for object in request.objects {
            let object = match object {
                Ok(o) => o,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            if matches!(object.identity, Identity::ExternalId(_)) && object.update_existing_only.is_none() {
                out.missing_update_existing_only += 1;
            }
            let user = match (find(users, &object.identity), object.may_create()) {
                (Some(user), _) => user,
                (None, false) => {
                    out.unknown_users += 1;
                    continue;
                }
                (None, true) => {
                    out.users_created += 1;
                    users.upsert(new_user(&object.identity))
                }
            };
            if !seen.insert(user) {
                out.duplicate_users += 1;
            }
            out.processed += 1;
            let attrs = self.by_user.entry(user).or_default();
            for (name, write) in object.writes {
                out.data_points += 1;
                apply_write(attrs, name, write, array_limit, &mut out);
            }
        }
        out
    }
}

fn find(users: &Users, identity: &Identity) -> Option<u32> {
    match identity {
        Identity::ExternalId(id) => users.by_external_id(id),
        Identity::Alias { name, label } => users.by_alias(name, label),
    }
}

fn new_user(identity: &Identity) -> SandboxUser {
    match identity {
        Identity::ExternalId(id) => SandboxUser::identified(id.clone()),
        Identity::Alias { name, label } => SandboxUser::alias(name.clone(), label.clone()),
    }
}

fn apply_write(
    attrs: &mut BTreeMap<String, Value>,
    name: String,
    write: Write,
    array_limit: usize,
    out: &mut TrackOutcome,
) {
    let removal = match &write {
        Write::Delete => true,
        Write::Set(value) => value == &Value::Bool(false),
        Write::Modify { add, remove } => add.is_empty() && !remove.is_empty(),
    };
    let wasted = match write {
        Write::Delete => attrs.remove(&name).is_none(),
        Write::Set(value) => {
            let old = attrs.insert(name, value.clone());
            old.as_ref() == Some(&value)
        }
        Write::Modify { add, remove } => {
            let slot = attrs.entry(name).or_insert_with(|| Value::Array(Vec::new()));
            if !slot.is_array() {
                *slot = Value::Array(Vec::new());
            }
            let Value::Array(items) = slot else { unreachable!("made an array above") };
            let before = items.clone();
            for value in add {
                if !items.contains(&value) {
                    items.push(value);
                }
            }
            items.retain(|v| !remove.contains(v));
            if items.len() > array_limit {
                let drop = items.len() - array_limit;
                items.drain(..drop);
                out.array_overflow += drop as u64;
            }
            *items == before
        }
    };
    out.wasted_writes += u64::from(wasted);
    out.removals += u64::from(removal);
    out.wasted_removals += u64::from(wasted && removal);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<TrackRequest, &'static str> {
        parse(&serde_json::to_vec(&v).unwrap())
    }

    fn users() -> Users {
        let mut u = Users::default();
        u.upsert(SandboxUser::identified("u1"));
        u.upsert(SandboxUser::alias("n1", "crm"));
        u
    }

    #[test]
    fn whole_request_refusals() {
        assert_eq!(parse(b"[]").unwrap_err(), MSG_NOT_OBJECT);
        assert_eq!(parse(b"{").unwrap_err(), MSG_NOT_OBJECT);
        assert_eq!(parse_json(json!({"attributes": [], "extra": 1})).unwrap_err(), MSG_UNKNOWN_FIELD);
        assert_eq!(parse_json(json!({"attributes": {}})).unwrap_err(), MSG_ATTRIBUTES_ARRAY);
        let many: Vec<Value> = (0..76).map(|i| json!({"external_id": format!("u{i}")})).collect();
        assert_eq!(parse_json(json!({ "attributes": many })).unwrap_err(), MSG_TOO_MANY_OBJECTS);
        let mut mixed: Vec<Value> = (0..74).map(|i| json!({"external_id": format!("u{i}")})).collect();
        mixed.truncate(74);
        let events = vec![json!({}), json!({})];
        assert_eq!(parse_json(json!({"attributes": mixed, "events": events})).unwrap_err(), MSG_TOO_MANY_OBJECTS);
        assert_eq!(parse_json(json!({"events": [{}]})).unwrap_err(), MSG_EVENTS_NOT_MODELLED);
        let exactly: Vec<Value> = (0..75).map(|i| json!({"external_id": format!("u{i}")})).collect();
        assert_eq!(parse_json(json!({ "attributes": exactly })).unwrap().objects.len(), 75);
    }

    #[test]
    fn bad_objects_are_listed_by_index() {
        let r = parse_json(json!({"attributes": [
            {"cohorts": {"add": ["c"]}},
            {"external_id": "u1", "user_alias": {"alias_name": "n", "alias_label": "l"}},
            {"external_id": ""},
            {"user_alias": {"alias_name": "n"}},
            {"email": "a@b.c"},
            {"external_id": "u1", "_update_existing_only": "yes"},
            {"external_id": "u1", "$bad": true},
            {"external_id": "u1", "c": {"add": ["x"], "set": ["y"]}},
            {"external_id": "u1", "c": {"nested": 1}},
            {"external_id": "u1", "c": "x".repeat(256)},
            {"external_id": "u1", "_update_existing_only": true, "c": {"add": ["x"]}},
        ]}))
        .unwrap();
        let kinds: Vec<_> = r.objects.iter().map(|o| o.as_ref().err().map(|e| (e.index, e.kind.as_str()))).collect();
        assert_eq!(
            kinds,
            [
                Some((0, ERR_NO_IDENTIFIER)),
                Some((1, ERR_TWO_IDENTIFIERS)),
                Some((2, ERR_BAD_EXTERNAL_ID)),
                Some((3, ERR_BAD_ALIAS)),
                Some((4, ERR_UNSUPPORTED_IDENTIFIER)),
                Some((5, ERR_UPDATE_ONLY_TYPE)),
                Some((6, ERR_ATTRIBUTE_NAME)),
                Some((7, ERR_ATTRIBUTE_VALUE)),
                Some((8, ERR_ATTRIBUTE_VALUE)),
                Some((9, ERR_ATTRIBUTE_VALUE)),
                None,
            ]
        );
    }

    #[test]
    fn update_only_never_creates_and_a_missing_flag_is_recorded() {
        let mut users = users();
        let mut profiles = Profiles::default();
        let r = parse_json(json!({"attributes": [
            {"external_id": "nobody", "_update_existing_only": true, "c": {"add": ["vip"]}},
            {"user_alias": {"alias_name": "ghost", "alias_label": "crm"}, "c": {"add": ["vip"]}},
            {"external_id": "u1", "_update_existing_only": true, "c": {"add": ["vip"]}},
            {"external_id": "new", "c": {"add": ["vip"]}},
        ]}))
        .unwrap();
        let out = profiles.apply(&mut users, r, DEFAULT_ARRAY_LIMIT);
        assert_eq!((out.unknown_users, out.users_created, out.missing_update_existing_only), (2, 1, 1));
        assert_eq!(out.processed, 2);
        assert_eq!(users.len(), 3, "only the object without the flag created a user");
        assert_eq!(profiles.matching("c", Some("vip")).len(), 2);
    }

    #[test]
    fn arrays_add_remove_and_overflow_booleans_set_and_delete() {
        let mut users = users();
        let mut profiles = Profiles::default();
        let mut send = |v: Value| profiles.apply(&mut users, parse_json(v).unwrap(), 3);
        let o = |attrs: Value| {
            let mut m = json!({"external_id": "u1", "_update_existing_only": true});
            m.as_object_mut().unwrap().extend(attrs.as_object().unwrap().clone());
            json!({ "attributes": [m] })
        };
        let out = send(o(json!({"c": {"add": ["a", "b"]}, "vip": true})));
        assert_eq!((out.data_points, out.wasted_writes), (2, 0));
        let out = send(o(json!({"c": {"add": ["a"]}, "vip": true})));
        assert_eq!(out.wasted_writes, 2, "a present value and an unchanged boolean");
        assert_eq!((out.removals, out.wasted_removals), (0, 0), "adds and sets are no removals");
        let out = send(o(json!({"c": {"add": ["x", "y"]}})));
        assert_eq!(out.array_overflow, 1, "the oldest value is dropped past the limit");
        let out = send(o(json!({"c": {"remove": ["zzz"]}, "vip": null})));
        assert_eq!(out.wasted_writes, 1, "removing an absent value");
        assert_eq!((out.removals, out.wasted_removals), (2, 1), "a remove and a null; the remove wasted");
        let out = send(o(json!({"vip": null})));
        assert_eq!(out.wasted_writes, 1, "deleting an absent attribute");
        assert_eq!(out.wasted_removals, 1);
        let attrs = profiles.get(0).unwrap();
        assert_eq!(attrs["c"], json!(["b", "x", "y"]));
        assert!(!attrs.contains_key("vip"));
        assert_eq!(profiles.matching("vip", None), Vec::<u32>::new());
        assert_eq!(profiles.matching("c", Some("x")), [0]);
    }

    #[test]
    fn a_user_named_twice_in_one_request_is_counted() {
        let mut users = users();
        let mut profiles = Profiles::default();
        let one = json!({"external_id": "u1", "_update_existing_only": true, "c": {"add": ["a"]}});
        let out = profiles.apply(&mut users, parse_json(json!({"attributes": [one.clone(), one]})).unwrap(), 500);
        assert_eq!(out.duplicate_users, 1);
    }
}
