//! Shards: several operator Deployments, each owning the imports its label selector picks
//! (Flux's `sharding.fluxcd.io/key` convention, here the label `cohorts.dev/shard`).
//!
//! - `--shard a` owns the imports labelled `cohorts.dev/shard=a`.
//! - `--shard a --shard-default --shards a,b,c` also owns every import whose label names no
//!   shard of the installation, unlabelled ones included: `cohorts.dev/shard notin (b,c)`.
//!   With the same `--shards` everywhere and one default shard, every import has exactly one
//!   owner, whatever its label says.
//! - `--watch-label-selector` narrows further (ANDed), or alone selects like Flux does.
//!
//! A shard reconciles, runs and leader-elects (Lease `<lease>-<shard>`) for its imports only.
//! Conflict detection still compares every import in the watched namespaces, whichever shard
//! owns it: two imports of one Braze cohort on two shards must not both run.
//!
//! Moving an import (relabelling it) never runs it twice: a run records its runner
//! (`status.currentRun.runnerShard`, `runnerLease`, `runnerIdentity`); the old shard, seeing
//! the import leave, stops that run and clears the runner; the new shard resumes the run
//! only once the runner is cleared or the
//! old runner's Lease shows it no longer leads (the HA guarantee: a replica that cannot renew
//! stops its runs). Snapshots are keyed by the import, so the new shard diffs against the
//! same one (the filesystem store needs a volume every shard mounts).

use std::collections::BTreeSet;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};

use crate::api::{CohortImport, RunRunner};

/// The label naming an import's shard.
pub const SHARD_LABEL: &str = "cohorts.dev/shard";

/// Which imports this operator owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// `--shard`; names the Lease (`<lease>-<name>`) and the runner in status.
    pub name: Option<String>,
    selector: Selector,
}

/// The shard flags as given.
#[derive(Clone, Debug, Default)]
pub struct ShardFlags {
    pub shard: Option<String>,
    pub shard_default: bool,
    /// Every shard of the installation (`--shards`), for the default shard's selector.
    pub shards: Vec<String>,
    pub watch_label_selector: Option<String>,
}

impl Shard {
    /// `None`: no sharding, every import is ours.
    pub fn from_flags(flags: &ShardFlags) -> Result<Option<Shard>, String> {
        let mut expressions = Vec::new();
        if let Some(name) = &flags.shard {
            check_label_value("--shard", name)?;
            if flags.shard_default {
                if flags.shards.is_empty() {
                    return Err("--shard-default needs --shards listing every shard of the installation, so that \
                                imports whose label names no shard have exactly one owner"
                        .into());
                }
                for other in &flags.shards {
                    check_label_value("--shards", other)?;
                }
                if !flags.shards.contains(name) {
                    return Err(format!("--shards must include this operator's own --shard {name:?}"));
                }
                let others: BTreeSet<String> = flags.shards.iter().filter(|s| *s != name).cloned().collect();
                expressions.push(if others.is_empty() {
                    // The only shard: it owns everything, labelled or not.
                    Expression::NotIn(SHARD_LABEL.into(), BTreeSet::from([String::new()]))
                } else {
                    Expression::NotIn(SHARD_LABEL.into(), others)
                });
            } else {
                expressions.push(Expression::Equal(SHARD_LABEL.into(), name.clone()));
            }
        } else if flags.shard_default || !flags.shards.is_empty() {
            return Err("--shard-default and --shards need --shard naming this operator's shard".into());
        }
        if let Some(text) = flags.watch_label_selector.as_deref().filter(|t| !t.trim().is_empty()) {
            expressions.extend(parse_selector(text).map_err(|e| format!("--watch-label-selector {text:?}: {e}"))?);
        }
        if expressions.is_empty() {
            return Ok(None);
        }
        Ok(Some(Shard { name: flags.shard.clone(), selector: expressions.into_iter().collect() }))
    }

    /// The label selector for the API server.
    pub fn selector(&self) -> String {
        self.selector.to_string()
    }

    pub fn owns(&self, import: &CohortImport) -> bool {
        self.selector.matches(import.labels())
    }

    /// How this shard signs its runs in status.
    pub(super) fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.selector())
    }
}

/// A label value: at most 63 characters, alphanumerics with `-`, `_`, `.` inside.
fn check_label_value(flag: &str, value: &str) -> Result<(), String> {
    let inner_ok = value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let ends_ok =
        value.starts_with(|c: char| c.is_ascii_alphanumeric()) && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if value.is_empty() || value.len() > 63 || !inner_ok || !ends_ok {
        return Err(format!(
            "{flag} {value:?} is not a label value: 1–63 letters, digits, '-', '_' or '.', starting and ending \
             with a letter or digit"
        ));
    }
    Ok(())
}

/// Kubernetes' label selector text: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
/// `k notin (a,b)`, joined by commas.
pub fn parse_selector(text: &str) -> Result<Vec<Expression>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        // A term ends at the first comma outside parentheses.
        let mut depth = 0;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(rest.len(), |(i, _)| i);
        out.push(parse_term(rest[..end].trim())?);
        rest = rest[end..].trim_start_matches(',').trim();
    }
    Ok(out)
}

fn parse_term(term: &str) -> Result<Expression, String> {
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        let ok = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        ok.then(|| k.to_owned()).ok_or_else(|| format!("{k:?} is not a label key"))
    };
    if let Some(k) = term.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key(k)?));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = term.split_once(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("{term:?}: the values go in parentheses, e.g. \"{} in (a,b)\"", k.trim()))?;
            let values: BTreeSet<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
            return Ok(if notin { Expression::NotIn(key(k)?, values) } else { Expression::In(key(k)?, values) });
        }
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Expression::NotEqual(key(k)?, v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Expression::Equal(key(k)?, v.trim().to_owned()));
    }
    Ok(Expression::Exists(key(term)?))
}

/// What the old runner's Lease shows.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseState {
    Missing,
    Held {
        holder: Option<String>,
        expires: Option<Timestamp>,
    },
    /// It could not be read.
    Unknown,
}

/// Whether a run found in `currentRun`, not running here, may be resumed here.
#[derive(Clone, Debug, PartialEq)]
pub enum Handoff {
    Resume,
    /// Another operator may still be running it: look again at `retry_at`.
    Wait {
        why: String,
        retry_at: Timestamp,
    },
}

/// Decides a run's handoff. `me` is how this operator signs runs; `lease` is the state of
/// the runner's Lease (read only when the runner is another operator with a Lease).
pub fn handoff(
    runner: Option<&RunRunner>,
    me: &RunRunner,
    lease: impl FnOnce() -> LeaseState,
    now: Timestamp,
) -> Handoff {
    let Some(runner) = runner else {
        // Released by its shard, or started by an operator that does not shard.
        return Handoff::Resume;
    };
    if runner.shard == me.shard && runner.lease == me.lease {
        // Our own Lease, which we hold now: whoever ran it before stopped when it lost it.
        return Handoff::Resume;
    }
    let Some(lease_name) = &runner.lease else {
        let why = format!(
            "shard {:?} ({}) ran it without leader election; waiting for it to let go of the run",
            runner.shard, runner.identity
        );
        return Handoff::Wait { why, retry_at: now + jiff::SignedDuration::from_secs(30) };
    };
    match lease() {
        LeaseState::Missing => Handoff::Resume,
        LeaseState::Held { holder, .. } if holder.as_deref() != Some(runner.identity.as_str()) => Handoff::Resume,
        LeaseState::Held { expires: Some(at), .. } if at <= now => Handoff::Resume,
        LeaseState::Unknown => Handoff::Wait {
            why: format!("the Lease {lease_name} of shard {:?} cannot be read", runner.shard),
            retry_at: now + jiff::SignedDuration::from_secs(10),
        },
        LeaseState::Held { expires, .. } => {
            let soon = now + jiff::SignedDuration::from_secs(30);
            let retry_at = expires.map_or(soon, |at| at.min(soon) + jiff::SignedDuration::from_secs(1));
            let why = format!(
                "shard {:?} ({} holding Lease {lease_name}) is still stopping it; resumed here once it lets go",
                runner.shard, runner.identity
            );
            Handoff::Wait { why, retry_at }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn shard(shard: Option<&str>, default: bool, shards: &[&str], raw: Option<&str>) -> Result<Option<Shard>, String> {
        Shard::from_flags(&ShardFlags {
            shard: shard.map(str::to_owned),
            shard_default: default,
            shards: shards.iter().map(|s| s.to_string()).collect(),
            watch_label_selector: raw.map(str::to_owned),
        })
    }

    fn owns(shard: &Shard, pairs: &[(&str, &str)]) -> bool {
        shard.selector.matches(&labels(pairs))
    }

    #[test]
    fn no_flags_no_sharding() {
        assert_eq!(shard(None, false, &[], None), Ok(None));
        assert_eq!(shard(None, false, &[], Some("  ")), Ok(None));
    }

    #[test]
    fn every_import_has_exactly_one_owner_among_the_installations_shards() {
        let all = ["a", "b", "c"];
        let shards: Vec<Shard> = [("a", true), ("b", false), ("c", false)]
            .iter()
            .map(|(name, default)| shard(Some(name), *default, &all, None).unwrap().unwrap())
            .collect();
        assert_eq!(shards[0].selector(), "cohorts.dev/shard notin (b,c)");
        assert_eq!(shards[1].selector(), "cohorts.dev/shard=b");
        let cases: [(&[(&str, &str)], usize); 6] = [
            (&[], 0),
            (&[("team", "growth")], 0),
            (&[(SHARD_LABEL, "a")], 0),
            (&[(SHARD_LABEL, "b")], 1),
            (&[(SHARD_LABEL, "c")], 2),
            // A label naming no shard (a typo) still has an owner: the default shard.
            (&[(SHARD_LABEL, "zz")], 0),
        ];
        for (pairs, owner) in cases {
            let owners: Vec<usize> = (0..3).filter(|&i| owns(&shards[i], pairs)).collect();
            assert_eq!(owners, [owner], "{pairs:?}");
        }
    }

    #[test]
    fn a_single_default_shard_owns_everything() {
        let only = shard(Some("a"), true, &["a"], None).unwrap().unwrap();
        assert!(owns(&only, &[]));
        assert!(owns(&only, &[(SHARD_LABEL, "x")]));
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        let e = shard(Some("a"), true, &[], None).unwrap_err();
        assert!(e.contains("--shards"), "{e}");
        let e = shard(Some("a"), true, &["b", "c"], None).unwrap_err();
        assert!(e.contains("own --shard"), "{e}");
        let e = shard(Some("bad name"), false, &[], None).unwrap_err();
        assert!(e.contains("--shard \"bad name\""), "{e}");
        let e = shard(None, true, &[], None).unwrap_err();
        assert!(e.contains("need --shard"), "{e}");
        let e = shard(None, false, &[], Some("tier in prod")).unwrap_err();
        assert!(e.contains("--watch-label-selector") && e.contains("parentheses"), "{e}");
    }

    #[test]
    fn flux_style_selectors_are_parsed_and_anded_with_the_shard() {
        let flux = shard(None, false, &[], Some("!cohorts.dev/shard")).unwrap().unwrap();
        assert!(owns(&flux, &[]));
        assert!(!owns(&flux, &[(SHARD_LABEL, "a")]));
        let both = shard(Some("a"), false, &[], Some("team in (growth, crm),tier!=dev")).unwrap().unwrap();
        assert_eq!(both.selector(), "cohorts.dev/shard=a,team in (crm,growth),tier!=dev");
        assert!(owns(&both, &[(SHARD_LABEL, "a"), ("team", "crm")]));
        assert!(!owns(&both, &[(SHARD_LABEL, "a"), ("team", "crm"), ("tier", "dev")]));
        assert!(!owns(&both, &[(SHARD_LABEL, "b"), ("team", "crm")]));
        let parsed = parse_selector("a==1, b, c notin (x), d=").unwrap();
        assert_eq!(
            parsed,
            [
                Expression::Equal("a".into(), "1".into()),
                Expression::Exists("b".into()),
                Expression::NotIn("c".into(), BTreeSet::from(["x".to_owned()])),
                Expression::Equal("d".into(), String::new()),
            ]
        );
    }

    fn runner(shard: &str, lease: Option<&str>, identity: &str) -> RunRunner {
        RunRunner { shard: shard.into(), lease: lease.map(str::to_owned), identity: identity.into() }
    }

    #[test]
    fn a_run_is_resumed_only_once_its_old_runner_let_go_or_lost_its_lease() {
        let now: Timestamp = "2026-11-29T06:00:00Z".parse().unwrap();
        let me = runner("b", Some("ops/cohort-operator-b"), "pod-b");
        let old = runner("a", Some("ops/cohort-operator-a"), "pod-a");
        let unreachable = || -> LeaseState { panic!("the Lease is not read") };
        // Released (or never signed): resume.
        assert_eq!(handoff(None, &me, unreachable, now), Handoff::Resume);
        // Our own Lease (a failover within this shard): resume.
        let predecessor = runner("b", Some("ops/cohort-operator-b"), "pod-b-old");
        assert_eq!(handoff(Some(&predecessor), &me, unreachable, now), Handoff::Resume);
        // The old shard still holds its Lease, renewed: wait until it lets go or expires.
        let held =
            |expires: &str| LeaseState::Held { holder: Some("pod-a".into()), expires: Some(expires.parse().unwrap()) };
        match handoff(Some(&old), &me, || held("2026-11-29T06:00:10Z"), now) {
            Handoff::Wait { why, retry_at } => {
                assert!(why.contains("\"a\"") && why.contains("pod-a"), "{why}");
                assert_eq!(retry_at, "2026-11-29T06:00:11Z".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        // Expired, taken by another replica, or gone: the old runner stopped its runs.
        assert_eq!(handoff(Some(&old), &me, || held("2026-11-29T05:59:59Z"), now), Handoff::Resume);
        let soon = Some(now + jiff::SignedDuration::from_secs(9));
        let taken = || LeaseState::Held { holder: Some("pod-a2".into()), expires: soon };
        assert_eq!(handoff(Some(&old), &me, taken, now), Handoff::Resume);
        assert_eq!(handoff(Some(&old), &me, || LeaseState::Missing, now), Handoff::Resume);
        // A released Lease (no holder): resume. An unreadable one: wait and look again.
        let released = || LeaseState::Held { holder: None, expires: None };
        assert_eq!(handoff(Some(&old), &me, released, now), Handoff::Resume);
        assert!(matches!(handoff(Some(&old), &me, || LeaseState::Unknown, now), Handoff::Wait { .. }));
        assert!(matches!(
            handoff(Some(&old), &me, || LeaseState::Held { holder: Some("pod-a".into()), expires: None }, now),
            Handoff::Wait { .. }
        ));
        // A runner without leader election cannot be proven stopped: wait for its release.
        assert!(matches!(handoff(Some(&runner("a", None, "pod-a")), &me, unreachable, now), Handoff::Wait { .. }));
    }
}
