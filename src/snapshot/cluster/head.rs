//! The head ConfigMap's record of where a cohort's snapshot and keys in doubt are, and which
//! serials a write may use or must clean up — pure, so every rule is unit-tested here.
//!
//! Serials: a write puts its body's chunks under one serial. The head names the serials its
//! parts need; `unnamed` lists every other serial up to `serial` whose chunks may exist:
//! bodies a switch replaced, serials whose writers never switched, and the one *reserved*
//! for the next write. The reservation saves the next write a claim: when the head still is
//! as it read it, its serial is free, so it writes its chunks there and switches the head
//! in one conditional update. Two writers using one reservation collide on the name of
//! chunk 0 (a create either makes a chunk or fails), so the one that switches the head owns
//! every chunk its head names; the other falls back to claiming a serial of its own.
//!
//! Inline parts: a small body is kept in the head ConfigMap itself ([`Part::inline`]), so a
//! write of it is the one conditional update of the head, with no chunk and no serial. The
//! head's serial and reservation stay as they were; an inline switch deletes beforehand
//! the unnamed serials but the reservation (their writers can no longer switch), and lists
//! the chunked bodies it replaced as unnamed, like a chunked switch.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::snapshot::plan::PlanMeta;
use crate::snapshot::{DoubtMeta, SnapshotMeta};

/// What the head ConfigMap says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Head {
    /// The last serial claimed or reserved.
    pub serial: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Part<SnapshotMeta>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doubt: Option<Part<DoubtMeta>>,
    /// A plan as the first version with checkpoints wrote it (never released, but it ran
    /// from `main`): its body appended to the keys in doubt, in the doubt part's chunks (the
    /// last [`PlanMeta::body_bytes`] of them). Read, never written: a reader cuts those
    /// bytes off the keys in doubt whatever the plan says, and a write drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanMeta>,
    /// The plan recorded with the keys in doubt, with its last checkpoint: a part of its own,
    /// in chunks of its own (`…-S-plan-N`) under the doubt part's serial `S`. A version that
    /// does not know it reads the keys in doubt alone, drops it on its next write, and
    /// collects its chunks with the doubt part's serial, which that write replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_part: Option<Part<PlanMeta>>,
    /// Serials up to `serial` whose chunks may exist and that no part names. `None` in heads
    /// of earlier versions: the next claim finds them by listing chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unnamed: Option<BTreeSet<u64>>,
}

/// A body and where its chunks are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Part<M> {
    pub meta: M,
    /// `0` for an inline part.
    pub serial: u64,
    /// `0` for an inline part.
    pub chunks: u32,
    pub body_bytes: u64,
    /// The body is in the head ConfigMap's `binaryData`, not in chunks. A version that does
    /// not know this field finds no chunk holding the part's `bodyBytes`, and refuses the
    /// head as damaged instead of reading it as empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline: bool,
}

/// Where a body was just written.
pub(super) struct Location {
    pub serial: u64,
    pub chunks: u32,
    pub body_bytes: u64,
    pub inline: bool,
}

impl Location {
    /// A body of `body_bytes` kept in the head.
    pub fn inline(body_bytes: u64) -> Location {
        Location { serial: 0, chunks: 0, body_bytes, inline: true }
    }

    pub fn part<M>(self, meta: M) -> Part<M> {
        Part { meta, serial: self.serial, chunks: self.chunks, body_bytes: self.body_bytes, inline: self.inline }
    }
}

impl Head {
    /// The head of a cohort without one yet: serial 1 is reserved for its first write.
    pub fn new() -> Head {
        Head { serial: 1, unnamed: Some(BTreeSet::from([1])), ..Head::default() }
    }

    pub fn generation(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.generation)
    }

    /// The keys in doubt on the stored generation.
    pub fn current_doubt(&self) -> Option<&Part<DoubtMeta>> {
        self.doubt.as_ref().filter(|d| d.meta.base_generation == self.generation())
    }

    /// The plan recorded with the keys in doubt on the stored generation, in its own part.
    pub fn current_plan(&self) -> Option<&Part<PlanMeta>> {
        let doubt = self.current_doubt()?;
        self.plan_part.as_ref().filter(|p| p.serial == doubt.serial && p.meta.belongs_to(&doubt.meta))
    }

    /// Bytes at the end of the doubt part that are not keys in doubt: the body of a plan
    /// appended by the first version with checkpoints ([`Head::plan`]).
    pub fn appended_plan_bytes(&self) -> u64 {
        self.plan.as_ref().map_or(0, PlanMeta::body_bytes)
    }

    /// Serials whose chunks the head needs (inline parts need none).
    pub fn serials(&self) -> BTreeSet<u64> {
        let snapshot = self.snapshot.iter().filter(|p| !p.inline).map(|p| p.serial);
        snapshot.chain(self.doubt.iter().filter(|p| !p.inline).map(|p| p.serial)).collect()
    }

    /// The serial set aside for the next write by the last switch, while nobody has claimed
    /// past it.
    pub fn reservation(&self) -> Option<u64> {
        let unnamed = self.unnamed.as_ref()?;
        (unnamed.contains(&self.serial) && !self.serials().contains(&self.serial)).then_some(self.serial)
    }

    /// This head with the next serial claimed for one write.
    pub fn claimed(&self) -> Head {
        let serial = self.serial + 1;
        let unnamed = self.unnamed.clone().map(|mut unnamed| {
            unnamed.insert(serial);
            unnamed
        });
        Head { serial, unnamed, ..self.clone() }
    }

    /// What a writer about to switch this head to a body under `serial` deletes first: every
    /// unnamed serial but its own (their writers can no longer switch: this head is past
    /// them, and a switch is conditioned on the head it read). `None`: not known.
    pub fn garbage(&self, serial: u64) -> Option<BTreeSet<u64>> {
        let named = self.serials();
        let unnamed = self.unnamed.as_ref()?;
        Some(unnamed.iter().copied().filter(|s| *s != serial && !named.contains(s)).collect())
    }

    /// `next` — what a write under `serial` makes of this head — as the head it switches to,
    /// with `left` the garbage whose deletion failed: the bodies it replaced are unnamed (and
    /// deleted right after the switch), and the serial after it is reserved.
    pub fn switched(&self, mut next: Head, serial: u64, left: BTreeSet<u64>) -> Head {
        next.serial = self.serial.max(serial) + 1;
        let mut unnamed = left;
        unnamed.extend(self.replaced_by(&next));
        unnamed.insert(next.serial);
        let named = next.serials();
        unnamed.retain(|s| !named.contains(s));
        next.unnamed = Some(unnamed);
        next
    }

    /// What a writer about to switch this head to an inline body deletes first: every
    /// unnamed serial but the reservation, which a writer that read this head may be writing
    /// to. `None`: not known (a head of an earlier version; such a head is written by a
    /// chunked switch, which finds them by listing).
    pub fn garbage_inline(&self) -> Option<BTreeSet<u64>> {
        self.garbage(self.serial)
    }

    /// `next` — what an inline write makes of this head — as the head it switches to, with
    /// `left` the garbage whose deletion failed: its serial and reservation are this head's,
    /// and the chunked bodies it replaced are unnamed (deleted right after the switch).
    pub fn switched_inline(&self, mut next: Head, left: BTreeSet<u64>) -> Head {
        next.serial = self.serial;
        let mut unnamed = left;
        unnamed.extend(self.replaced_by(&next));
        unnamed.extend(self.reservation());
        let named = next.serials();
        unnamed.retain(|s| !named.contains(s));
        next.unnamed = Some(unnamed);
        next
    }

    /// Serials this head names that `next` does not.
    pub fn replaced_by(&self, next: &Head) -> BTreeSet<u64> {
        self.serials().difference(&next.serials()).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;

    fn snapshot(serial: u64, generation: u64) -> Part<SnapshotMeta> {
        let meta = SnapshotMeta {
            format: 1,
            generation,
            cohort_id: "c".into(),
            cohort_name: "c".into(),
            cohort_created_at: Timestamp::UNIX_EPOCH,
            members: 1,
            identifier_fingerprint: "f".into(),
            run_id: "r".into(),
            committed_at: Timestamp::UNIX_EPOCH,
            digest: None,
        };
        Part { meta, serial, chunks: 1, body_bytes: 1, inline: false }
    }

    fn doubt(serial: u64) -> Part<DoubtMeta> {
        let meta = DoubtMeta {
            format: 1,
            base_generation: 1,
            cohort_id: "c".into(),
            keys: 1,
            run_id: "r".into(),
            recorded_at: Timestamp::UNIX_EPOCH,
        };
        Part { meta, serial, chunks: 1, body_bytes: 1, inline: false }
    }

    fn inline<M>(part: Part<M>) -> Part<M> {
        Part { serial: 0, chunks: 0, inline: true, ..part }
    }

    fn set(serials: &[u64]) -> BTreeSet<u64> {
        serials.iter().copied().collect()
    }

    #[test]
    fn a_new_head_reserves_serial_1_for_its_first_write() {
        let head = Head::new();
        assert_eq!(head.reservation(), Some(1));
        assert_eq!(head.garbage(1), Some(set(&[])));
        let first = head.switched(Head { doubt: Some(doubt(1)), ..head.clone() }, 1, set(&[]));
        assert_eq!((first.serial, first.unnamed), (2, Some(set(&[2]))));
    }

    #[test]
    fn a_head_of_an_earlier_version_has_no_reservation_and_unknown_garbage() {
        let head = Head { serial: 4, snapshot: Some(snapshot(3, 2)), ..Head::default() };
        assert_eq!(head.reservation(), None);
        assert_eq!(head.garbage(5), None, "found by listing");
        let claimed = head.claimed();
        assert_eq!((claimed.serial, claimed.unnamed), (5, None));
    }

    #[test]
    fn a_run_records_its_keys_then_commits_each_in_one_switch_under_the_reserved_serial() {
        // After a commit: the snapshot at 7, the earlier one (5) and doubt (6) replaced, 8 reserved.
        let head = Head {
            serial: 7,
            snapshot: Some(snapshot(5, 1)),
            doubt: Some(doubt(6)),
            unnamed: Some(set(&[7])),
            ..Head::default()
        };
        let reserved = head.reservation().unwrap();
        let committed =
            head.switched(Head { snapshot: Some(snapshot(7, 2)), doubt: None, ..head.clone() }, reserved, set(&[]));
        assert_eq!(committed.serial, 8);
        assert_eq!(committed.unnamed, Some(set(&[5, 6, 8])));
        assert_eq!(committed.reservation(), Some(8));

        // The next run deletes 5 and 6 (done right after the switch already; deleting again
        // costs one request and finds nothing), then records its keys in doubt under 8.
        assert_eq!(committed.garbage(8), Some(set(&[5, 6])));
        let recorded = committed.switched(Head { doubt: Some(doubt(8)), ..committed.clone() }, 8, set(&[]));
        assert_eq!((recorded.serial, recorded.unnamed.clone()), (9, Some(set(&[9]))));
        assert_eq!(recorded.serials(), set(&[7, 8]));
        assert_eq!(recorded.reservation(), Some(9));
    }

    #[test]
    fn a_claim_past_a_taken_reservation_deletes_it_and_keeps_what_could_not_be_deleted() {
        // Chunks exist under the reserved 9 (a writer crashed there): claim 10.
        let head = Head { serial: 9, snapshot: Some(snapshot(7, 2)), unnamed: Some(set(&[4, 9])), ..Head::default() };
        let claimed = head.claimed();
        assert_eq!((claimed.serial, claimed.reservation()), (10, Some(10)));
        assert_eq!(claimed.garbage(10), Some(set(&[4, 9])));
        // Deleting 4 failed: it stays listed, for the next write.
        let next = claimed.switched(Head { snapshot: Some(snapshot(10, 3)), ..claimed.clone() }, 10, set(&[4]));
        assert_eq!(next.serial, 11);
        assert_eq!(next.unnamed, Some(set(&[4, 7, 11])));
    }

    #[test]
    fn named_serials_are_never_garbage() {
        let head = Head {
            serial: 3,
            snapshot: Some(snapshot(2, 1)),
            doubt: Some(doubt(3)),
            unnamed: Some(set(&[2, 3])),
            ..Head::default()
        };
        assert_eq!(head.garbage(4), Some(set(&[])));
        assert_eq!(head.reservation(), None, "3 is in use");
        let next = head.switched(head.clone(), 3, set(&[2]));
        assert_eq!(next.unnamed, Some(set(&[4])));
    }

    #[test]
    fn an_inline_write_is_one_switch_that_keeps_the_reservation_and_lists_what_it_replaced() {
        // A chunked snapshot at 5, 6 reserved, 4 left over from an earlier write.
        let head = Head { serial: 6, snapshot: Some(snapshot(5, 1)), unnamed: Some(set(&[4, 6])), ..Head::default() };
        assert_eq!(head.garbage_inline(), Some(set(&[4])), "never the reservation");
        let recorded = head.switched_inline(Head { doubt: Some(inline(doubt(0))), ..head.clone() }, set(&[]));
        assert_eq!((recorded.serial, recorded.unnamed.clone()), (6, Some(set(&[6]))));
        assert_eq!(recorded.serials(), set(&[5]), "an inline part needs no chunks");
        let committed = recorded.switched_inline(
            Head { snapshot: Some(inline(snapshot(0, 2))), doubt: None, ..recorded.clone() },
            set(&[]),
        );
        assert_eq!(committed.unnamed, Some(set(&[5, 6])), "the chunked snapshot it replaced is garbage");
        assert_eq!(committed.reservation(), Some(6));
        assert_eq!(committed.garbage_inline(), Some(set(&[5])));
        // Inline over inline: nothing to delete, nothing listed but the reservation.
        let next = committed.switched_inline(Head { doubt: Some(inline(doubt(0))), ..committed.clone() }, set(&[]));
        assert_eq!(next.switched_inline(next.clone(), set(&[])).unnamed, Some(set(&[6])));
        // A chunked write after it uses the reservation as ever.
        assert_eq!(next.garbage(6), Some(set(&[])));
        let big = next.switched(Head { snapshot: Some(snapshot(6, 3)), doubt: None, ..next.clone() }, 6, set(&[]));
        assert_eq!((big.serial, big.unnamed), (7, Some(set(&[7]))));
    }

    #[test]
    fn a_head_of_an_earlier_version_has_no_known_garbage_for_an_inline_write_either() {
        let head = Head { serial: 4, snapshot: Some(snapshot(3, 2)), ..Head::default() };
        assert_eq!(head.garbage_inline(), None);
    }
}
