//! Braze's request bodies as the sandbox reads them, and Braze's documented error
//! messages. Pure: parsing and validation only.
//!
//! Bodies are parsed borrowing from the request bytes (only escaped strings allocate), so a
//! 1,000-id request costs one pass of `serde_json` and no copies of the identifiers.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Braze's limit on identifiers per `cohorts/users` request.
pub const MAX_IDS_PER_REQUEST: usize = 1000;

pub const MSG_INVALID_PARTNER_KEY: &str = "Invalid Partner API key";
pub const MSG_INVALID_CLIENT_SECRET: &str = "Invalid client secret";
/// Braze echoes the data import key in this one, so clients must redact answers.
pub const MSG_PARTNER_NOT_ENABLED: &str = "Partner not enabled for client with client secret: ";
pub const MSG_COHORT_ID: &str = "cohort_id must be a valid string";
pub const MSG_COHORT_CHANGES: &str = "cohort_changes must be an array of objects each with key \
     user_ids and/or device_ids mapping to an array of strings, or an aliases object";
pub const MSG_TOO_MANY_IDS: &str = "Only 1,000 user_ids, device_ids, and aliases are allowed per request";
pub const MSG_NAME: &str = "name must be a non-empty string";
pub const MSG_CREATED_AT: &str = "created_at must be a valid time as an ISO-8601 string";
/// Not documented by Braze: the sandbox's answer to a body that is not a JSON object.
pub const MSG_INVALID_JSON: &str = "Request body must be a JSON object";

/// The fields both endpoints share, each kept raw until it is checked.
#[derive(Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow, default)]
    pub partner_api_key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub client_secret: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub cohort_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub created_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub cohort_changes: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, &'static str> {
        // serde would also read a struct from a JSON array; Braze bodies are objects.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(MSG_INVALID_JSON);
        }
        serde_json::from_slice(body).map_err(|_| MSG_INVALID_JSON)
    }
}

/// A raw JSON value read as a string, if it is one.
pub fn string<'a>(raw: Option<&'a RawValue>) -> Option<Cow<'a, str>> {
    #[derive(Deserialize)]
    struct S<'a>(#[serde(borrow)] Cow<'a, str>);
    raw.and_then(|r| serde_json::from_str::<S<'a>>(r.get()).ok()).map(|s| s.0)
}

/// An identifier string, borrowed unless it had escapes.
#[derive(Deserialize, Debug, PartialEq, Eq)]
pub struct Id<'a>(#[serde(borrow)] pub Cow<'a, str>);

#[derive(Deserialize, Debug, PartialEq, Eq)]
pub struct AliasId<'a> {
    #[serde(borrow)]
    pub alias_name: Cow<'a, str>,
    #[serde(borrow)]
    pub alias_label: Cow<'a, str>,
}

/// One element of `cohort_changes`.
#[derive(Deserialize, Debug, PartialEq, Eq)]
pub struct ChangeObject<'a> {
    #[serde(borrow, default)]
    pub user_ids: Option<Vec<Id<'a>>>,
    #[serde(borrow, default)]
    pub device_ids: Option<Vec<Id<'a>>>,
    #[serde(borrow, default)]
    pub aliases: Option<Vec<AliasId<'a>>>,
    #[serde(default)]
    pub should_remove: Option<bool>,
}

impl ChangeObject<'_> {
    pub fn id_count(&self) -> usize {
        self.user_ids.as_ref().map_or(0, Vec::len)
            + self.device_ids.as_ref().map_or(0, Vec::len)
            + self.aliases.as_ref().map_or(0, Vec::len)
    }

    pub fn remove(&self) -> bool {
        self.should_remove.unwrap_or(false)
    }
}

/// A checked `cohorts/users` body (keys are checked separately, before this).
#[derive(Debug, PartialEq, Eq)]
pub struct UsersRequest<'a> {
    pub cohort_id: Cow<'a, str>,
    pub changes: Vec<ChangeObject<'a>>,
    pub id_count: usize,
}

/// A checked `cohorts` body.
#[derive(Debug, PartialEq, Eq)]
pub struct NameRequest<'a> {
    pub cohort_id: Cow<'a, str>,
    pub name: Cow<'a, str>,
    pub created_at: Cow<'a, str>,
}

fn cohort_id<'a>(env: &Envelope<'a>) -> Result<Cow<'a, str>, &'static str> {
    string(env.cohort_id).filter(|id| !id.is_empty()).ok_or(MSG_COHORT_ID)
}

/// Validates a `cohorts/users` body in Braze's documented order of 400s.
pub fn users_request<'a>(env: &Envelope<'a>) -> Result<UsersRequest<'a>, &'static str> {
    let cohort_id = cohort_id(env)?;
    let raw = env.cohort_changes.ok_or(MSG_COHORT_CHANGES)?;
    let changes: Vec<ChangeObject<'a>> = serde_json::from_str(raw.get()).map_err(|_| MSG_COHORT_CHANGES)?;
    // Every object must name users in at least one of the three ways.
    if changes.iter().any(|c| c.user_ids.is_none() && c.device_ids.is_none() && c.aliases.is_none()) {
        return Err(MSG_COHORT_CHANGES);
    }
    let id_count = changes.iter().map(ChangeObject::id_count).sum();
    if id_count > MAX_IDS_PER_REQUEST {
        return Err(MSG_TOO_MANY_IDS);
    }
    Ok(UsersRequest { cohort_id, changes, id_count })
}

/// Validates a `cohorts` body.
pub fn name_request<'a>(env: &Envelope<'a>) -> Result<NameRequest<'a>, &'static str> {
    let cohort_id = cohort_id(env)?;
    let name = string(env.name).filter(|n| !n.trim().is_empty()).ok_or(MSG_NAME)?;
    let created_at = string(env.created_at).filter(|t| is_iso8601(t)).ok_or(MSG_CREATED_AT)?;
    Ok(NameRequest { cohort_id, name, created_at })
}

/// ISO-8601 as people send it: an instant with offset, a local date-time, or a date.
pub fn is_iso8601(text: &str) -> bool {
    text.parse::<jiff::Timestamp>().is_ok()
        || text.parse::<jiff::civil::DateTime>().is_ok()
        || text.parse::<jiff::civil::Date>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(body: &str) -> Result<UsersRequest<'_>, &'static str> {
        users_request(&Envelope::parse(body.as_bytes())?)
    }

    fn name(body: &str) -> Result<NameRequest<'_>, &'static str> {
        name_request(&Envelope::parse(body.as_bytes())?)
    }

    #[test]
    fn reads_all_three_identifier_kinds_and_borrows_plain_strings() {
        let r = users(
            r#"{"cohort_id":"c","cohort_changes":[
                {"user_ids":["a","b\u0041"],"aliases":[{"alias_name":"n","alias_label":"l"}]},
                {"device_ids":["d"],"should_remove":true}]}"#,
        )
        .unwrap();
        assert_eq!(r.cohort_id, "c");
        assert_eq!(r.id_count, 4);
        let ids = r.changes[0].user_ids.as_ref().unwrap();
        assert!(matches!(ids[0].0, Cow::Borrowed("a")));
        assert_eq!(ids[1].0, "bA");
        assert!(!r.changes[0].remove());
        assert!(r.changes[1].remove());
    }

    #[test]
    fn documented_400s() {
        assert_eq!(users(r#"{"cohort_id":5,"cohort_changes":[]}"#), Err(MSG_COHORT_ID));
        assert_eq!(users(r#"{"cohort_id":"","cohort_changes":[]}"#), Err(MSG_COHORT_ID));
        assert_eq!(users(r#"{"cohort_changes":[]}"#), Err(MSG_COHORT_ID));
        assert_eq!(users(r#"{"cohort_id":"c"}"#), Err(MSG_COHORT_CHANGES));
        assert_eq!(users(r#"{"cohort_id":"c","cohort_changes":"[]"}"#), Err(MSG_COHORT_CHANGES));
        assert_eq!(users(r#"{"cohort_id":"c","cohort_changes":[{}]}"#), Err(MSG_COHORT_CHANGES));
        assert_eq!(users(r#"{"cohort_id":"c","cohort_changes":[{"user_ids":[1]}]}"#), Err(MSG_COHORT_CHANGES));
        assert_eq!(
            users(r#"{"cohort_id":"c","cohort_changes":[{"user_ids":["a"],"should_remove":"yes"}]}"#),
            Err(MSG_COHORT_CHANGES)
        );
        assert_eq!(
            users(r#"{"cohort_id":"c","cohort_changes":[{"aliases":[{"alias_name":"x"}]}]}"#),
            Err(MSG_COHORT_CHANGES)
        );
        assert_eq!(users("[1]"), Err(MSG_INVALID_JSON));
        assert_eq!(users("{"), Err(MSG_INVALID_JSON));
        assert_eq!(name(r#"{"cohort_id":"c","name":"","created_at":"2024-01-01T00:00:00Z"}"#), Err(MSG_NAME));
        assert_eq!(name(r#"{"cohort_id":"c","name":"  ","created_at":"2024-01-01T00:00:00Z"}"#), Err(MSG_NAME));
        assert_eq!(name(r#"{"cohort_id":"c","name":"N","created_at":"yesterday"}"#), Err(MSG_CREATED_AT));
        assert_eq!(name(r#"{"cohort_id":"c","name":"N"}"#), Err(MSG_CREATED_AT));
        assert_eq!(name(r#"{"cohort_id":["c"],"name":"N"}"#), Err(MSG_COHORT_ID));
        let ok = name(r#"{"cohort_id":"c","name":"N","created_at":"2021-01-21T19:20:30+05:00"}"#).unwrap();
        assert_eq!(ok.name, "N");
    }

    #[test]
    fn the_limit_counts_every_object_and_kind_together() {
        let ids = |n: usize, p: &str| (0..n).map(|i| format!("\"{p}{i}\"")).collect::<Vec<_>>().join(",");
        let body = |a: usize, d: usize| {
            format!(
                r#"{{"cohort_id":"c","cohort_changes":[{{"user_ids":[{}]}},{{"device_ids":[{}],"should_remove":true}}]}}"#,
                ids(a, "u"),
                ids(d, "d")
            )
        };
        assert_eq!(users(&body(600, 400)).unwrap().id_count, 1000);
        assert_eq!(users(&body(600, 401)), Err(MSG_TOO_MANY_IDS));
    }

    #[test]
    fn iso8601_forms() {
        for ok in [
            "2021-01-21T19:20:30+05:00",
            "2021-01-21T19:20:30Z",
            "2021-01-21T19:20:30.5Z",
            "2021-01-21T19:20:30",
            "2021-01-21",
        ] {
            assert!(is_iso8601(ok), "{ok}");
        }
        for bad in ["", "21/01/2021", "2021-13-01", "now"] {
            assert!(!is_iso8601(bad), "{bad}");
        }
    }
}
