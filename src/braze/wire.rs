//! Braze's JSON bodies, and reading its answers leniently (their shape is undocumented).

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use super::batch::{Batch, IdCounts};
use crate::domain::member::Member;
use crate::secret::redact;

/// How much of a response body a request result keeps.
pub const KEPT_BODY_BYTES: usize = 1024;
/// How much of a response body is read at all; the rest is drained unread.
pub const READ_BODY_BYTES: usize = 64 * 1024;
/// Keys are redacted from answers whatever their length (Braze's 401 "Partner not enabled
/// for client with client secret: …" echoes one): unlike a source's user-chosen values, a
/// key is never a word that redacting would blank out.
pub const REDACT_MIN_LEN: usize = 1;

/// `POST …/cohorts`.
#[derive(Serialize)]
pub struct NameBody<'a> {
    pub partner_api_key: &'a str,
    pub client_secret: &'a str,
    pub cohort_id: &'a str,
    pub name: &'a str,
    pub created_at: &'a str,
}

/// `POST …/cohorts/users`: one add object and one remove object, each omitted when empty.
pub struct UsersBody<'a> {
    pub partner_api_key: &'a str,
    pub client_secret: &'a str,
    pub cohort_id: &'a str,
    pub batch: &'a Batch,
}

impl Serialize for UsersBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("partner_api_key", self.partner_api_key)?;
        map.serialize_entry("client_secret", self.client_secret)?;
        map.serialize_entry("cohort_id", self.cohort_id)?;
        map.serialize_entry("cohort_changes", &Changes(self.batch))?;
        map.end()
    }
}

struct Changes<'a>(&'a Batch);

impl Serialize for Changes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.0;
        let objects = [
            ChangeObject { members: &b.adds, counts: b.add_counts, remove: false },
            ChangeObject { members: &b.removes, counts: b.remove_counts, remove: true },
        ];
        let mut seq = s.serialize_seq(None)?;
        for object in objects.iter().filter(|o| !o.members.is_empty()) {
            seq.serialize_element(object)?;
        }
        seq.end()
    }
}

struct ChangeObject<'a> {
    members: &'a [Member],
    counts: IdCounts,
    remove: bool,
}

impl Serialize for ChangeObject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if self.counts.external_ids > 0 {
            map.serialize_entry("user_ids", &Ids(self.members, external_id))?;
        }
        if self.counts.device_ids > 0 {
            map.serialize_entry("device_ids", &Ids(self.members, device_id))?;
        }
        if self.counts.aliases > 0 {
            map.serialize_entry("aliases", &Aliases(self.members))?;
        }
        if self.remove {
            map.serialize_entry("should_remove", &true)?;
        }
        map.end()
    }
}

fn external_id(m: &Member) -> Option<&str> {
    match m {
        Member::ExternalId(id) => Some(id),
        _ => None,
    }
}

fn device_id(m: &Member) -> Option<&str> {
    match m {
        Member::DeviceId(id) => Some(id),
        _ => None,
    }
}

struct Ids<'a>(&'a [Member], fn(&Member) -> Option<&str>);

impl Serialize for Ids<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().filter_map(self.1))
    }
}

struct Aliases<'a>(&'a [Member]);

#[derive(Serialize)]
struct AliasObject<'a> {
    alias_name: &'a str,
    alias_label: &'a str,
}

impl Serialize for Aliases<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().filter_map(|m| match m {
            Member::Alias { name, label } => Some(AliasObject { alias_name: name, alias_label: label }),
            _ => None,
        }))
    }
}

/// What we keep of a response: its body (redacted, truncated, for the operator's own log)
/// and which of Braze's documented answers its `message` is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseText {
    /// The body as text, secrets replaced by `<redacted>`, cut to [`KEPT_BODY_BYTES`]. Only
    /// ever logged by the operator: never in status, Events or reports.
    pub body: String,
    /// The documented answer `message` matched ([`KNOWN_MESSAGES`]), in the operator's own
    /// words, or [`UNDOCUMENTED`]. No byte of the answer itself: whoever can read the import's status
    /// must not read what an endpoint a tenant named answered (it may be an in-cluster
    /// service, not Braze).
    pub message: String,
    /// A JSON body with a non-empty `errors` array (Braze's non-fatal problems).
    pub has_errors: bool,
}

/// Braze's documented answers for the cohort import endpoints (see
/// `shared/notes/braze-cohort-import-api.md`): a phrase the `message` contains, and how
/// the operator names it. The first match wins.
pub const KNOWN_MESSAGES: &[(&str, &str)] = &[
    ("partner not enabled", "Partner not enabled for client"),
    ("invalid partner api key", "Invalid Partner API key"),
    ("partner_api_key", "Invalid Partner API key"),
    ("invalid client secret", "Invalid client secret"),
    // The REST API's documented 401 (`/users/track`).
    ("invalid api key", "Invalid API key"),
    ("client_secret", "Invalid client secret"),
    ("cohort_changes", "cohort_changes is malformed"),
    ("cohort_id", "cohort_id is not valid"),
    ("created_at", "created_at is not ISO-8601"),
    ("name", "the cohort name is not valid"),
    ("resource locked", "resource locked"),
    ("rate limit", "rate limit exceeded"),
    ("queued", "queued"),
    ("success", "success"),
];

/// What [`ResponseText::message`] says of any other answer.
pub const UNDOCUMENTED: &str = "answer not quoted";

/// The operator's name for a documented `message`, or `None`.
pub fn known_message(message: &str) -> Option<&'static str> {
    let message = message.to_ascii_lowercase();
    KNOWN_MESSAGES.iter().find(|(phrase, _)| message.contains(phrase)).map(|(_, named)| *named)
}

pub fn read_response(bytes: &[u8], secrets: &[&str]) -> ResponseText {
    let text = String::from_utf8_lossy(bytes);
    let json: Option<serde_json::Value> = serde_json::from_slice(bytes).ok();
    let message = json
        .as_ref()
        .and_then(|v| v.get("message"))
        .and_then(|m| m.as_str())
        .and_then(known_message)
        .unwrap_or(UNDOCUMENTED)
        .to_owned();
    let has_errors =
        json.as_ref().and_then(|v| v.get("errors")).and_then(|e| e.as_array()).is_some_and(|e| !e.is_empty());
    ResponseText { body: truncate(redact(&text, secrets, REDACT_MIN_LEN), KEPT_BODY_BYTES), message, has_errors }
}

pub(crate) fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::braze::batch::{Change, Packer};

    /// The `cohorts/users` body for `changes`, all in one batch.
    fn users_json(changes: impl IntoIterator<Item = Change>) -> serde_json::Value {
        let mut packer = Packer::new(1000);
        for change in changes {
            assert!(packer.push(change).is_none());
        }
        let batch = packer.finish().unwrap();
        let body = UsersBody { partner_api_key: "pk", client_secret: "cs", cohort_id: "c-1", batch: &batch };
        serde_json::to_value(&body).unwrap()
    }

    #[test]
    fn users_body_has_one_add_and_one_remove_object_with_every_kind() {
        let json = users_json([
            Change::add(Member::ExternalId("e1".into())),
            Change::add(Member::Alias { name: "n\"1".into(), label: "crm".into() }),
            Change::remove(Member::DeviceId("d1".into())),
            Change::add(Member::ExternalId("e2".into())),
        ]);
        assert_eq!(
            json,
            serde_json::json!({
                "partner_api_key": "pk",
                "client_secret": "cs",
                "cohort_id": "c-1",
                "cohort_changes": [
                    {"user_ids": ["e1", "e2"], "aliases": [{"alias_name": "n\"1", "alias_label": "crm"}]},
                    {"device_ids": ["d1"], "should_remove": true}
                ]
            })
        );
    }

    #[test]
    fn only_removes_give_a_single_object() {
        let json = users_json([Change::remove(Member::ExternalId("e".into()))]);
        assert_eq!(json["cohort_changes"], serde_json::json!([{"user_ids": ["e"], "should_remove": true}]));
    }

    #[test]
    fn responses_are_read_leniently_and_keys_are_redacted() {
        let r = read_response(
            br#"{"message":"Partner not enabled for client with client secret: s3cret-key"}"#,
            &["s3cret-key", "partner-key"],
        );
        assert_eq!(r.message, "Partner not enabled for client");
        assert!(!r.body.contains("s3cret-key"));
        let r = read_response(b"<html>Bad Gateway</html>\n", &[]);
        assert_eq!(r.message, UNDOCUMENTED);
        let r = read_response(br#"{"message":"success","errors":["x"]}"#, &[]);
        assert!(r.has_errors);
        assert_eq!(r.message, "success");
        let r = read_response(&[0xff, b'a'], &[]);
        assert_eq!(r.body, "\u{fffd}a");
        let long = "é".repeat(2000);
        let r = read_response(long.as_bytes(), &[]);
        assert!(r.body.len() <= KEPT_BODY_BYTES + '…'.len_utf8());
        assert!(r.body.ends_with('…'));
    }

    #[test]
    fn only_documented_messages_are_named_and_nothing_else_of_an_answer_is_kept_as_message() {
        let marker = "internal-service-secret-marker";
        for body in [
            format!(r#"{{"message":"{marker}"}}"#),
            format!("<html>{marker}</html>"),
            format!(r#"{{"error":"{marker}"}}"#),
        ] {
            let r = read_response(body.as_bytes(), &[]);
            assert_eq!(r.message, UNDOCUMENTED, "{body}");
        }
        let r = read_response(br#"{"message":"Invalid client secret: abc"}"#, &[]);
        assert_eq!(r.message, "Invalid client secret");
        assert_eq!(known_message("cohort_changes must be an array"), Some("cohort_changes is malformed"));
    }

    #[test]
    fn redaction_replaces_longer_keys_first_and_ignores_empty_ones() {
        assert_eq!(redact("abc abcdef", &["abc", "abcdef", ""], REDACT_MIN_LEN), "<redacted> <redacted>");
        assert_eq!(redact("nothing", &[""], REDACT_MIN_LEN), "nothing");
        assert_eq!(redact("a key: ik", &["ik"], REDACT_MIN_LEN), "a key: <redacted>");
    }
}
