//! A cohort member: one Braze identifier, and its compact byte key.
//!
//! Diffing millions of members is done on [`MemberKey`]s: one tag byte and the identifier's
//! bytes, so that sorting keys sorts members, and snapshots store nothing else.

use std::fmt;

/// One Braze user, as Braze matches it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Member {
    /// An identified user's `external_id`.
    ExternalId(String),
    /// A user alias (`alias_name`, `alias_label`).
    Alias { name: String, label: String },
    /// An anonymous user's `device_id`.
    DeviceId(String),
}

const TAG_EXTERNAL_ID: u8 = 1;
const TAG_ALIAS: u8 = 2;
const TAG_DEVICE_ID: u8 = 3;
/// Separates alias name from label. Identifiers containing NUL are rejected on the way in
/// (see `domain::identifiers`), so the key stays unambiguous and sorts like [`Member`].
const ALIAS_SEPARATOR: u8 = 0;

/// A member encoded as bytes: `tag ‖ id` or `tag ‖ name ‖ 0 ‖ label`. Byte order equals
/// [`Member`] order.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey(Box<[u8]>);

/// A byte key that is not a valid member encoding (a corrupt snapshot, for instance).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a member key: {0}")]
pub struct InvalidMemberKey(&'static str);

impl Member {
    pub fn key(&self) -> MemberKey {
        let mut bytes = Vec::with_capacity(1 + self.encoded_len());
        self.write_key(&mut bytes);
        MemberKey(bytes.into_boxed_slice())
    }

    /// Appends the bytes of [`Self::key`] to `buf`, so a caller encoding millions of members
    /// can reuse one buffer instead of allocating a key each.
    pub fn write_key(&self, buf: &mut Vec<u8>) {
        match self {
            Member::ExternalId(id) => {
                buf.push(TAG_EXTERNAL_ID);
                buf.extend_from_slice(id.as_bytes());
            }
            Member::Alias { name, label } => {
                buf.push(TAG_ALIAS);
                buf.extend_from_slice(name.as_bytes());
                buf.push(ALIAS_SEPARATOR);
                buf.extend_from_slice(label.as_bytes());
            }
            Member::DeviceId(id) => {
                buf.push(TAG_DEVICE_ID);
                buf.extend_from_slice(id.as_bytes());
            }
        }
    }

    /// Decodes key bytes (as snapshots and change lists hold them) without copying them
    /// into a [`MemberKey`] first.
    pub fn from_key_bytes(bytes: &[u8]) -> Result<Member, InvalidMemberKey> {
        let (&tag, rest) = bytes.split_first().ok_or(InvalidMemberKey("empty"))?;
        let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_owned).map_err(|_| InvalidMemberKey("not UTF-8"));
        match tag {
            TAG_EXTERNAL_ID => Ok(Member::ExternalId(text(rest)?)),
            TAG_DEVICE_ID => Ok(Member::DeviceId(text(rest)?)),
            TAG_ALIAS => {
                let at =
                    rest.iter().position(|&b| b == ALIAS_SEPARATOR).ok_or(InvalidMemberKey("alias without label"))?;
                Ok(Member::Alias { name: text(&rest[..at])?, label: text(&rest[at + 1..])? })
            }
            _ => Err(InvalidMemberKey("unknown tag")),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Member::ExternalId(id) | Member::DeviceId(id) => id.len(),
            Member::Alias { name, label } => name.len() + 1 + label.len(),
        }
    }

    /// The identifier kind, for counters and messages.
    pub fn kind(&self) -> IdentifierKind {
        match self {
            Member::ExternalId(_) => IdentifierKind::ExternalId,
            Member::Alias { .. } => IdentifierKind::Alias,
            Member::DeviceId(_) => IdentifierKind::DeviceId,
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::ExternalId(id) => write!(f, "external_id:{id}"),
            Member::Alias { name, label } => write!(f, "alias:{name}@{label}"),
            Member::DeviceId(id) => write!(f, "device_id:{id}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentifierKind {
    ExternalId,
    Alias,
    DeviceId,
}

impl MemberKey {
    /// Wraps bytes read back from a snapshot, checking they decode.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidMemberKey> {
        let key = MemberKey(bytes.into());
        key.member()?;
        Ok(key)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn member(&self) -> Result<Member, InvalidMemberKey> {
        Member::from_key_bytes(&self.0)
    }
}

impl fmt::Debug for MemberKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.member() {
            Ok(m) => write!(f, "MemberKey({m})"),
            Err(_) => write!(f, "MemberKey({:?})", &self.0),
        }
    }
}

impl From<&Member> for MemberKey {
    fn from(m: &Member) -> Self {
        m.key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member() -> impl Strategy<Value = Member> {
        let id = "[^\u{0}]{1,12}";
        prop_oneof![
            id.prop_map(Member::ExternalId),
            (id, id).prop_map(|(name, label)| Member::Alias { name, label }),
            id.prop_map(Member::DeviceId),
        ]
    }

    proptest! {
        #[test]
        fn key_round_trips(m in member()) {
            prop_assert_eq!(m.key().member().unwrap(), m);
        }

        #[test]
        fn write_key_appends_the_key(m in member(), prefix in proptest::collection::vec(any::<u8>(), 0..4)) {
            let mut buf = prefix.clone();
            m.write_key(&mut buf);
            prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
            let key = m.key();
            prop_assert_eq!(&buf[prefix.len()..], key.as_bytes());
        }

        #[test]
        fn key_order_is_member_order(a in member(), b in member()) {
            prop_assert_eq!(a.key().cmp(&b.key()), a.cmp(&b));
        }
    }

    #[test]
    fn corrupt_keys_are_refused() {
        assert!(MemberKey::from_bytes(b"").is_err());
        assert!(MemberKey::from_bytes(b"\x09abc").is_err());
        assert!(MemberKey::from_bytes(b"\x02no-label").is_err());
        assert!(MemberKey::from_bytes(b"\x01\xff").is_err());
    }
}
