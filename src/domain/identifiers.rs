//! From a source row to one Braze identifier: the spec's mapping, Braze's limits, and why a
//! row was skipped.
//!
//! A row resolves to exactly one [`Member`]. Precedence when a row carries several
//! identifiers: the external id, then the alias, then the device id. The first one that is
//! *present* (not null, not empty) decides: if it is unusable (too long, not UTF-8, control
//! characters) the row is skipped with that reason rather than falling back to the next
//! kind, because falling back would silently move a user to another identifier (a device id
//! matches anonymous users only).
//!
//! # Braze's limits
//!
//! Braze's REST documentation gives no length for identifiers. Its SDKs do: the Web SDK's
//! `changeUser` rejects a user id whose UTF-8 length exceeds `User.mr = 997` bytes
//! ("Rejected user id … because it is longer than 997 bytes", `@braze/web-sdk`
//! `src/Core/change-user.js`), and the Android SDK truncates stored user ids "longer than
//! 997 bytes". So an external id is at most [`MAX_IDENTIFIER_BYTES`] = 997 UTF-8 bytes.
//! Alias names, alias labels and device ids have no documented limit; the same bound is
//! applied to them so that no identifier Braze's own SDKs could not produce is sent, and so
//! that 1,000 identifiers always fit Braze's 4 MB request limit.
//!
//! Identifiers containing control characters (U+0000–U+001F, U+007F–U+009F) are refused:
//! Braze's SDKs refuse them in custom strings (`CUSTOM_DATA_REGEX = /^[^\x00-\x1F\x22]+$/`),
//! a tab or newline inside an id is a data error, and NUL would break [`MemberKey`]s.
//!
//! Values are taken as they are: Braze ids are case- and whitespace-sensitive, so nothing is
//! trimmed or case-folded. A value that is empty or only whitespace counts as missing.
//!
//! [`MemberKey`]: super::member::MemberKey

use std::borrow::Cow;
use std::fmt;

use crate::api::IdentifierMapping;

use super::member::Member;

/// Longest identifier accepted, in UTF-8 bytes (see the module documentation for the source).
pub const MAX_IDENTIFIER_BYTES: usize = 997;

/// One field of a source row, as the source read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL, JSON null, or the field is not in this row.
    Null,
    Text(Cow<'a, str>),
    /// Raw bytes not yet checked to be UTF-8 (CSV cells, lines of a ConfigMap).
    Bytes(&'a [u8]),
    /// A value the source already knows it cannot use (a JSON object, undecodable text).
    Rejected(SkipReason),
}

impl<'a> Value<'a> {
    pub fn text(s: &'a str) -> Self {
        Value::Text(Cow::Borrowed(s))
    }

    /// `None` when the value is missing (null, empty, or whitespace only).
    fn present(&self) -> Option<Result<&str, SkipReason>> {
        let text = match self {
            Value::Null => return None,
            Value::Text(s) => s.as_ref(),
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => s,
                // Empty or blank bytes are valid UTF-8, so this is a present, bad value.
                Err(_) => return Some(Err(SkipReason::InvalidUtf8)),
            },
            Value::Rejected(reason) => return Some(Err(*reason)),
        };
        if text.trim().is_empty() { None } else { Some(check(text)) }
    }
}

/// Checks one present identifier against Braze's limits.
fn check(text: &str) -> Result<&str, SkipReason> {
    if text.len() > MAX_IDENTIFIER_BYTES {
        return Err(SkipReason::TooLong);
    }
    if text.chars().any(char::is_control) {
        return Err(SkipReason::ControlCharacter);
    }
    Ok(text)
}

/// Why a row gave no member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// Every mapped field is null, empty or blank.
    Missing,
    /// Longer than [`MAX_IDENTIFIER_BYTES`].
    TooLong,
    /// Not valid UTF-8.
    InvalidUtf8,
    /// Contains a control character (NUL, tab, newline, …).
    ControlCharacter,
    /// An alias name without a label (the label field is null or empty).
    IncompleteAlias,
    /// Not text or a number (a JSON boolean, object or array).
    UnsupportedValue,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::Missing,
        SkipReason::TooLong,
        SkipReason::InvalidUtf8,
        SkipReason::ControlCharacter,
        SkipReason::IncompleteAlias,
        SkipReason::UnsupportedValue,
    ];

    /// Short text for reports: "3 missing, 1 too long".
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::Missing => "missing",
            SkipReason::TooLong => "too long",
            SkipReason::InvalidUtf8 => "not UTF-8",
            SkipReason::ControlCharacter => "with control characters",
            SkipReason::IncompleteAlias => "alias without label",
            SkipReason::UnsupportedValue => "not text or a number",
        }
    }
}

/// Rows skipped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkipCounts([u64; SkipReason::ALL.len()]);

impl SkipCounts {
    pub fn record(&mut self, reason: SkipReason) {
        self.0[reason as usize] += 1;
    }

    pub fn get(&self, reason: SkipReason) -> u64 {
        self.0[reason as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn add(&mut self, other: &SkipCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// The reasons that occurred, with their counts.
    pub fn iter(&self) -> impl Iterator<Item = (SkipReason, u64)> + '_ {
        SkipReason::ALL.into_iter().map(|r| (r, self.get(r))).filter(|&(_, n)| n > 0)
    }
}

impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total() == 0 {
            return f.write_str("none");
        }
        for (i, (reason, n)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n} {}", reason.describe())?;
        }
        Ok(())
    }
}

/// A mapping the schema let through but that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("identifiers: set at least one of externalId, alias and deviceId")]
    Empty,
    #[error("identifiers.alias: set exactly one of label and labelField")]
    AliasLabel,
    #[error("identifiers.{field}: a field name must not be empty")]
    EmptyFieldName { field: &'static str },
    #[error("identifiers.alias.label: {reason} — use a short label without control characters")]
    BadFixedLabel { reason: &'static str },
}

/// Where an alias label comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelSource {
    Fixed(String),
    Field(String),
}

/// The field names an [`IdentifierMapping`] reads, checked and ready to resolve rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifierFields {
    pub external_id: Option<String>,
    /// Field holding `alias_name`, and the label's source.
    pub alias: Option<(String, LabelSource)>,
    pub device_id: Option<String>,
}

/// The values of one row for each mapped identifier field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowValues<'a> {
    pub external_id: Value<'a>,
    pub alias_name: Value<'a>,
    pub alias_label: Value<'a>,
    pub device_id: Value<'a>,
}

/// The column index of each mapped field in a table with a fixed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnPlan {
    external_id: Option<usize>,
    alias_name: Option<usize>,
    alias_label: Option<usize>,
    device_id: Option<usize>,
}

impl IdentifierFields {
    pub fn from_mapping(mapping: &IdentifierMapping) -> Result<Self, MappingError> {
        let name = |field: &'static str, v: &Option<String>| match v {
            Some(s) if s.is_empty() => Err(MappingError::EmptyFieldName { field }),
            other => Ok(other.clone()),
        };
        let external_id = name("externalId", &mapping.external_id)?;
        let device_id = name("deviceId", &mapping.device_id)?;
        let alias = match &mapping.alias {
            None => None,
            Some(a) => {
                if a.name_field.is_empty() {
                    return Err(MappingError::EmptyFieldName { field: "alias.nameField" });
                }
                let label = match (&a.label, &a.label_field) {
                    (Some(fixed), None) => {
                        match Value::text(fixed).present() {
                            None => return Err(MappingError::BadFixedLabel { reason: "it is blank" }),
                            Some(Err(reason)) => {
                                return Err(MappingError::BadFixedLabel { reason: reason.describe() });
                            }
                            Some(Ok(_)) => {}
                        }
                        LabelSource::Fixed(fixed.as_str().to_owned())
                    }
                    (None, Some(field)) if !field.is_empty() => LabelSource::Field(field.clone()),
                    (None, Some(_)) => {
                        return Err(MappingError::EmptyFieldName { field: "alias.labelField" });
                    }
                    _ => return Err(MappingError::AliasLabel),
                };
                Some((a.name_field.clone(), label))
            }
        };
        if external_id.is_none() && alias.is_none() && device_id.is_none() {
            return Err(MappingError::Empty);
        }
        Ok(IdentifierFields { external_id, alias, device_id })
    }

    /// The field each part of a row is read from, in precedence order: external id, alias
    /// name, alias label (when it is read per row), device id.
    fn fields(&self) -> [Option<&str>; 4] {
        let (alias_name, alias_label) = match &self.alias {
            None => (None, None),
            Some((name, LabelSource::Fixed(_))) => (Some(name.as_str()), None),
            Some((name, LabelSource::Field(label))) => (Some(name.as_str()), Some(label.as_str())),
        };
        [self.external_id.as_deref(), alias_name, alias_label, self.device_id.as_deref()]
    }

    /// Every field name the mapping reads, in precedence order, without repeats.
    pub fn field_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for n in self.fields().into_iter().flatten() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }

    /// Reads a row through `get`, which returns a field's value by name ([`Value::Null`] for
    /// fields the row lacks).
    pub fn resolve<'a>(&self, mut get: impl FnMut(&str) -> Value<'a>) -> Result<Member, SkipReason> {
        let [external_id, alias_name, alias_label, device_id] =
            self.fields().map(|name| name.map_or(Value::Null, &mut get));
        self.resolve_values(RowValues { external_id, alias_name, alias_label, device_id })
    }

    /// Finds each mapped field in a header. `Err` names the first field the header lacks.
    pub fn column_plan<S: AsRef<str>>(&self, header: &[S]) -> Result<ColumnPlan, String> {
        let [external_id, alias_name, alias_label, device_id] = self.fields().map(|name| match name {
            None => Ok(None),
            Some(n) => header.iter().position(|h| h.as_ref() == n).map(Some).ok_or_else(|| n.to_owned()),
        });
        Ok(ColumnPlan {
            external_id: external_id?,
            alias_name: alias_name?,
            alias_label: alias_label?,
            device_id: device_id?,
        })
    }

    /// Reads a row of a table through `plan`; `cell` returns the value at a column index.
    pub fn resolve_columns<'a>(
        &self,
        plan: &ColumnPlan,
        mut cell: impl FnMut(usize) -> Value<'a>,
    ) -> Result<Member, SkipReason> {
        let mut at = |i: Option<usize>| i.map_or(Value::Null, &mut cell);
        let values = RowValues {
            external_id: at(plan.external_id),
            alias_name: at(plan.alias_name),
            alias_label: at(plan.alias_label),
            device_id: at(plan.device_id),
        };
        self.resolve_values(values)
    }

    /// Applies precedence and Braze's limits to one row's values.
    pub fn resolve_values(&self, row: RowValues<'_>) -> Result<Member, SkipReason> {
        if let Some(id) = row.external_id.present() {
            return id.map(|s| Member::ExternalId(s.to_owned()));
        }
        if let Some((_, label_source)) = &self.alias
            && let Some(name) = row.alias_name.present()
        {
            let name = name?;
            let label = match label_source {
                LabelSource::Fixed(label) => label.as_str(),
                LabelSource::Field(_) => match row.alias_label.present() {
                    None => return Err(SkipReason::IncompleteAlias),
                    Some(label) => label?,
                },
            };
            return Ok(Member::Alias { name: name.to_owned(), label: label.to_owned() });
        }
        if let Some(id) = row.device_id.present() {
            return id.map(|s| Member::DeviceId(s.to_owned()));
        }
        Err(SkipReason::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AliasMapping;
    use std::collections::BTreeMap;

    fn mapping(
        ext: Option<&str>,
        alias: Option<(&str, Option<&str>, Option<&str>)>,
        dev: Option<&str>,
    ) -> IdentifierMapping {
        IdentifierMapping {
            external_id: ext.map(str::to_owned),
            alias: alias.map(|(n, l, lf)| AliasMapping {
                name_field: n.to_owned(),
                label: l.map(str::to_owned),
                label_field: lf.map(str::to_owned),
            }),
            device_id: dev.map(str::to_owned),
        }
    }

    fn all_kinds() -> IdentifierFields {
        IdentifierFields::from_mapping(&mapping(Some("uid"), Some(("email", None, Some("kind"))), Some("device")))
            .unwrap()
    }

    fn row<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl FnMut(&str) -> Value<'a> + 'a {
        let map: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        move |k| map.get(k).map_or(Value::Null, |v| Value::text(v))
    }

    #[test]
    fn external_id_wins_then_alias_then_device() {
        let f = all_kinds();
        let full = [("uid", "u1"), ("email", "a@b"), ("kind", "email"), ("device", "d1")];
        assert_eq!(f.resolve(row(&full)), Ok(Member::ExternalId("u1".into())));
        let no_uid = [("uid", ""), ("email", "a@b"), ("kind", "email"), ("device", "d1")];
        assert_eq!(f.resolve(row(&no_uid)), Ok(Member::Alias { name: "a@b".into(), label: "email".into() }));
        assert_eq!(f.resolve(row(&[("device", "d1")])), Ok(Member::DeviceId("d1".into())));
        assert_eq!(f.resolve(row(&[("uid", "  "), ("device", "\t")])), Err(SkipReason::Missing));
    }

    #[test]
    fn the_first_present_identifier_decides_even_when_bad() {
        let f = all_kinds();
        let long = "x".repeat(MAX_IDENTIFIER_BYTES + 1);
        assert_eq!(f.resolve(row(&[("uid", &long), ("device", "d1")])), Err(SkipReason::TooLong));
        assert_eq!(f.resolve(row(&[("uid", "a\0b"), ("device", "d1")])), Err(SkipReason::ControlCharacter));
        assert_eq!(f.resolve(row(&[("email", "a@b"), ("device", "d1")])), Err(SkipReason::IncompleteAlias));
    }

    #[test]
    fn limits_count_utf8_bytes() {
        let f = IdentifierFields::from_mapping(&mapping(Some("id"), None, None)).unwrap();
        let exact = "é".repeat(MAX_IDENTIFIER_BYTES / 2); // 996 bytes
        assert!(f.resolve(row(&[("id", &exact)])).is_ok());
        let over = format!("{exact}é"); // 998 bytes, 499 characters
        assert_eq!(f.resolve(row(&[("id", &over)])), Err(SkipReason::TooLong));
        let bytes = |b: &'static [u8]| move |_: &str| Value::Bytes(b);
        assert_eq!(f.resolve(bytes(b"ok\xff")), Err(SkipReason::InvalidUtf8));
        assert_eq!(f.resolve(bytes(b"plain")), Ok(Member::ExternalId("plain".into())));
        assert_eq!(f.resolve(bytes(b"")), Err(SkipReason::Missing));
    }

    #[test]
    fn values_are_not_trimmed() {
        let f = IdentifierFields::from_mapping(&mapping(Some("id"), None, None)).unwrap();
        assert_eq!(f.resolve(row(&[("id", " A ")])), Ok(Member::ExternalId(" A ".into())));
    }

    #[test]
    fn fixed_labels() {
        let f = IdentifierFields::from_mapping(&mapping(None, Some(("email", Some("email"), None)), None)).unwrap();
        assert_eq!(
            f.resolve(row(&[("email", "a@b")])),
            Ok(Member::Alias { name: "a@b".into(), label: "email".into() })
        );
        assert_eq!(f.field_names(), vec!["email"]);
    }

    #[test]
    fn bad_mappings_are_refused() {
        assert_eq!(IdentifierFields::from_mapping(&mapping(None, None, None)), Err(MappingError::Empty));
        assert_eq!(
            IdentifierFields::from_mapping(&mapping(None, Some(("n", Some("l"), Some("lf"))), None)),
            Err(MappingError::AliasLabel)
        );
        assert_eq!(
            IdentifierFields::from_mapping(&mapping(None, Some(("n", None, None)), None)),
            Err(MappingError::AliasLabel)
        );
        assert!(matches!(
            IdentifierFields::from_mapping(&mapping(None, Some(("n", Some("a\nb"), None)), None)),
            Err(MappingError::BadFixedLabel { .. })
        ));
        assert_eq!(
            IdentifierFields::from_mapping(&mapping(Some(""), None, None)),
            Err(MappingError::EmptyFieldName { field: "externalId" })
        );
    }

    #[test]
    fn column_plans_name_the_missing_column() {
        let f = all_kinds();
        assert_eq!(f.column_plan(&["uid", "email", "device"]), Err("kind".to_owned()));
        let plan = f.column_plan(&["device", "kind", "email", "uid"]).unwrap();
        let cells = ["d1", "email", "a@b", ""];
        assert_eq!(
            f.resolve_columns(&plan, |i| Value::text(cells[i])),
            Ok(Member::Alias { name: "a@b".into(), label: "email".into() })
        );
        assert_eq!(f.field_names(), vec!["uid", "email", "kind", "device"]);
    }

    #[test]
    fn rejected_values_keep_their_reason() {
        let f = IdentifierFields::from_mapping(&mapping(Some("id"), None, Some("dev"))).unwrap();
        let get = |k: &str| if k == "id" { Value::Rejected(SkipReason::UnsupportedValue) } else { Value::text("d") };
        assert_eq!(f.resolve(get), Err(SkipReason::UnsupportedValue));
    }

    #[test]
    fn skip_counts_add_and_print() {
        let mut a = SkipCounts::default();
        assert_eq!(a.to_string(), "none");
        a.record(SkipReason::Missing);
        a.record(SkipReason::Missing);
        let mut b = SkipCounts::default();
        b.record(SkipReason::TooLong);
        a.add(&b);
        assert_eq!(a.total(), 3);
        assert_eq!(a.get(SkipReason::Missing), 2);
        assert_eq!(a.to_string(), "2 missing, 1 too long");
    }
}
