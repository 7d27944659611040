//! Which namespaces may use the operator's own cloud identity.
//!
//! A source that authenticates without a credential of its own — BigQuery without
//! `serviceAccountKeySecretRef` asks GKE's metadata server for a token — acts as the
//! operator: it can read whatever the operator's Google identity (Workload Identity) can
//! read. That is a power of the operator, not of a tenant, so it is lent only to the
//! namespaces the operator is started with (`--ambient-identity-namespaces`, chart value
//! `ambientIdentity.namespaces`); every other import is refused, saying what to set instead.
//! Any future ambient identity (an AWS role, Azure managed identity) follows the same list.

use std::collections::BTreeSet;

/// The namespaces the operator lends its own cloud identity to. Default: none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AmbientIdentity {
    #[default]
    Nobody,
    /// `*`: every namespace (a single-tenant operator).
    Everyone,
    Namespaces(BTreeSet<String>),
}

impl AmbientIdentity {
    /// From the flag's list: namespace names, or `*` alone for every namespace.
    pub fn from_list(list: &[String]) -> Result<Self, String> {
        let names: BTreeSet<String> = list.iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
        if names.contains("*") {
            return match names.len() {
                1 => Ok(AmbientIdentity::Everyone),
                _ => Err("--ambient-identity-namespaces: give `*` alone or a list of namespaces, not both".to_owned()),
            };
        }
        if let Some(bad) = names.iter().find(|n| !is_namespace_name(n)) {
            return Err(format!(
                "--ambient-identity-namespaces: {bad:?} is not a namespace name (lowercase letters, digits and '-', \
                 at most 63)"
            ));
        }
        Ok(if names.is_empty() { AmbientIdentity::Nobody } else { AmbientIdentity::Namespaces(names) })
    }

    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            AmbientIdentity::Nobody => false,
            AmbientIdentity::Everyone => true,
            AmbientIdentity::Namespaces(names) => names.contains(namespace),
        }
    }
}

/// An RFC 1123 label, as Kubernetes names namespaces.
fn is_namespace_name(name: &str) -> bool {
    name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn nobody_by_default_and_only_the_named_namespaces_otherwise() {
        assert!(!AmbientIdentity::default().allows("growth"));
        assert_eq!(AmbientIdentity::from_list(&[]).unwrap(), AmbientIdentity::Nobody);
        let some = AmbientIdentity::from_list(&list(&["growth", " data "])).unwrap();
        assert!(some.allows("growth") && some.allows("data"));
        assert!(!some.allows("growth-2") && !some.allows(""));
        assert!(AmbientIdentity::from_list(&list(&["*"])).unwrap().allows("anything"));
    }

    #[test]
    fn a_bad_list_is_refused_naming_the_flag() {
        for bad in [&["*", "growth"][..], &["Growth"], &["-x"], &["a/b"]] {
            let err = AmbientIdentity::from_list(&list(bad)).unwrap_err();
            assert!(err.starts_with("--ambient-identity-namespaces:"), "{err}");
        }
    }
}
