//! Packing membership changes into Braze requests of at most 1,000 identifiers.
//!
//! Braze counts every identifier of a request together — external ids, aliases and device
//! ids, added or removed — so one request carries up to 1,000 of them, split into at most
//! one add object and one remove object. Batches cover consecutive stretches of the input,
//! so a caller can tell which changes a request carried by position alone.

use std::ops::Range;

use crate::domain::member::{IdentifierKind, Member};

/// Braze's limit on identifiers per `cohorts/users` request.
pub const MAX_IDS_PER_REQUEST: usize = 1000;

/// One member entering (`remove == false`) or leaving the cohort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub member: Member,
    pub remove: bool,
}

impl Change {
    pub fn add(member: Member) -> Self {
        Self { member, remove: false }
    }

    pub fn remove(member: Member) -> Self {
        Self { member, remove: true }
    }
}

/// Identifiers of each kind in a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdCounts {
    pub external_ids: u32,
    pub aliases: u32,
    pub device_ids: u32,
}

impl IdCounts {
    pub fn total(&self) -> u32 {
        self.external_ids + self.aliases + self.device_ids
    }

    fn count(&mut self, kind: IdentifierKind) {
        match kind {
            IdentifierKind::ExternalId => self.external_ids += 1,
            IdentifierKind::Alias => self.aliases += 1,
            IdentifierKind::DeviceId => self.device_ids += 1,
        }
    }
}

/// The changes of one `cohorts/users` request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Request number within the run, from 0.
    pub seq: u64,
    /// Position in the input of the first change this batch carries.
    pub first_change: u64,
    pub adds: Vec<Member>,
    pub removes: Vec<Member>,
    pub add_counts: IdCounts,
    pub remove_counts: IdCounts,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.adds.len() + self.removes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.removes.is_empty()
    }

    /// Positions in the input of the changes this batch carries.
    pub fn changes(&self) -> Range<u64> {
        self.first_change..self.first_change + self.len() as u64
    }

    fn push(&mut self, change: Change) {
        if change.remove {
            self.remove_counts.count(change.member.kind());
            self.removes.push(change.member);
        } else {
            self.add_counts.count(change.member.kind());
            self.adds.push(change.member);
        }
    }
}

/// Accumulates changes and hands out full batches.
#[derive(Debug)]
pub struct Packer {
    max_ids: usize,
    next_seq: u64,
    position: u64,
    current: Batch,
}

impl Packer {
    /// `max_ids` is clamped to `1..=MAX_IDS_PER_REQUEST`.
    pub fn new(max_ids: usize) -> Self {
        Self { max_ids: max_ids.clamp(1, MAX_IDS_PER_REQUEST), next_seq: 0, position: 0, current: Batch::default() }
    }

    /// Adds a change; returns the batch it completed, if any.
    pub fn push(&mut self, change: Change) -> Option<Batch> {
        self.current.push(change);
        self.position += 1;
        (self.current.len() >= self.max_ids).then(|| self.take())
    }

    /// The last, partly filled batch.
    pub fn finish(&mut self) -> Option<Batch> {
        (!self.current.is_empty()).then(|| self.take())
    }

    /// Changes pushed so far.
    pub fn consumed(&self) -> u64 {
        self.position
    }

    fn take(&mut self) -> Batch {
        // Size the next batch like this one so the vectors grow at most once or twice.
        let next = Batch {
            seq: self.next_seq + 1,
            first_change: self.position,
            adds: Vec::with_capacity(self.current.adds.len()),
            removes: Vec::with_capacity(self.current.removes.len()),
            ..Batch::default()
        };
        let mut batch = std::mem::replace(&mut self.current, next);
        batch.seq = self.next_seq;
        self.next_seq += 1;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(i: usize) -> Member {
        Member::ExternalId(format!("u{i}"))
    }

    #[test]
    fn packs_adds_and_removes_of_all_kinds_together_up_to_the_limit() {
        let mut packer = Packer::new(MAX_IDS_PER_REQUEST);
        let mut batches = Vec::new();
        for i in 0..2500 {
            let member = match i % 3 {
                0 => ext(i),
                1 => Member::Alias { name: format!("a{i}"), label: "crm".into() },
                _ => Member::DeviceId(format!("d{i}")),
            };
            let change = Change { member, remove: i % 2 == 1 };
            batches.extend(packer.push(change));
        }
        batches.extend(packer.finish());
        assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), [1000, 1000, 500]);
        assert_eq!(batches[0].changes(), 0..1000);
        assert_eq!(batches[2].changes(), 2000..2500);
        assert_eq!(batches.iter().map(|b| b.seq).collect::<Vec<_>>(), [0, 1, 2]);
        let b = &batches[0];
        assert_eq!(b.adds.len(), 500);
        assert_eq!(b.removes.len(), 500);
        assert_eq!(b.add_counts.total() + b.remove_counts.total(), 1000);
        assert_eq!(b.add_counts.external_ids + b.remove_counts.external_ids, 334);
        assert_eq!(b.add_counts.aliases + b.remove_counts.aliases, 333);
        assert_eq!(packer.consumed(), 2500);
        assert!(packer.finish().is_none());
    }

    #[test]
    fn limit_is_clamped_to_brazes() {
        let mut packer = Packer::new(5000);
        let full = (0..1000).filter_map(|i| packer.push(Change::add(ext(i)))).count();
        assert_eq!(full, 1);
        let mut tiny = Packer::new(0);
        assert_eq!(tiny.push(Change::add(ext(0))).map(|b| b.len()), Some(1));
    }

    proptest! {
        #[test]
        fn batches_partition_the_input_in_order(
            removes in proptest::collection::vec(any::<bool>(), 0..3000),
            max in 1usize..1200,
        ) {
            let mut packer = Packer::new(max);
            let mut batches = Vec::new();
            for (i, &remove) in removes.iter().enumerate() {
                batches.extend(packer.push(Change { member: ext(i), remove }));
            }
            batches.extend(packer.finish());
            let mut next = 0u64;
            for b in &batches {
                prop_assert!(b.len() <= max.min(MAX_IDS_PER_REQUEST));
                prop_assert!(!b.is_empty());
                prop_assert_eq!(b.changes().start, next);
                next = b.changes().end;
                let mut seen: Vec<(u64, bool)> = b.adds.iter().map(|m| (id(m), false))
                    .chain(b.removes.iter().map(|m| (id(m), true))).collect();
                seen.sort();
                let expected: Vec<(u64, bool)> =
                    b.changes().map(|p| (p, removes[p as usize])).collect();
                prop_assert_eq!(seen, expected);
            }
            prop_assert_eq!(next, removes.len() as u64);
        }
    }

    fn id(m: &Member) -> u64 {
        match m {
            Member::ExternalId(s) => s[1..].parse().unwrap(),
            _ => unreachable!(),
        }
    }
}
