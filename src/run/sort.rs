//! External sort: member keys in, one sorted de-duplicated key stream out, in bounded memory.
//!
//! Keys are buffered in one contiguous arena (no allocation per key) with a 16-byte index
//! entry each — 8 key bytes as a big-endian integer, so most comparisons never touch the
//! arena, plus offset and length. The 8 bytes are those after the prefix every buffered key
//! shares (`\x01user-00…`: the type tag and what ids have in common), which says nothing
//! about order. When arena and index reach the memory budget the buffer is sorted,
//! de-duplicated and spilled to an unnamed temporary file as front-coded records; at the
//! end the spilled runs are merged through a binary heap. A cohort that fits the budget
//! never touches the disk.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::collections::binary_heap::PeekMut;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom};
use std::path::PathBuf;

use crate::domain::diff::KeyCursor;
use crate::snapshot::format::{FrontCodedReader, FrontCodedWriter};

/// Default budget for buffered keys and their index: 24 MiB.
pub const DEFAULT_MEMORY_BUDGET: usize = 24 << 20;
/// Bytes of the index per buffered key.
const ENTRY_BYTES: usize = size_of::<Entry>();
const SPILL_WRITE_BUFFER: usize = 256 * 1024;
const SPILL_READ_BUFFER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
struct Entry {
    prefix: u64,
    offset: u32,
    len: u32,
}

/// Sorts and de-duplicates keys within a memory budget.
pub struct ExternalSorter {
    dir: PathBuf,
    budget: usize,
    arena: Vec<u8>,
    entries: Vec<Entry>,
    runs: Vec<File>,
    stats: SortStats,
}

/// What a sort did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SortStats {
    /// Keys pushed, duplicates included.
    pub pushed: u64,
    /// Runs written to disk (0 when everything fit in memory).
    pub spilled_runs: u32,
    pub spilled_bytes: u64,
}

impl ExternalSorter {
    /// Spills go to unnamed temporary files in `dir`; `budget` bounds buffered keys plus
    /// their index (at least 64 KiB).
    pub fn new(dir: impl Into<PathBuf>, budget: usize) -> Self {
        Self {
            dir: dir.into(),
            budget: budget.max(64 * 1024),
            arena: Vec::new(),
            entries: Vec::new(),
            runs: Vec::new(),
            stats: SortStats::default(),
        }
    }

    pub fn push(&mut self, key: &[u8]) -> io::Result<()> {
        let used = self.arena.len() + self.entries.len() * ENTRY_BYTES;
        if used + key.len() + ENTRY_BYTES > self.budget && !self.entries.is_empty() {
            self.spill()?;
        }
        if self.arena.capacity() == 0 {
            // Reserve the budget once (pages are only touched as keys arrive), so growth
            // never copies the arena; the index gets a share sized for short keys.
            self.arena.reserve(self.budget / 2);
            self.entries.reserve(self.budget / 2 / ENTRY_BYTES);
        }
        // Entries address the arena with u32s, so the key must end within 4 GiB.
        let end = u32::try_from(self.arena.len() + key.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "sort buffer over 4 GiB; lower the memory budget")
        })?;
        let len = key.len() as u32;
        self.arena.extend_from_slice(key);
        // The prefix is set when the buffer is sorted, once the bytes all keys share are known.
        self.entries.push(Entry { prefix: 0, offset: end - len, len });
        self.stats.pushed += 1;
        Ok(())
    }

    /// Sorts and de-duplicates the buffer in place; returns how many bytes every key shares.
    fn sort_buffer(&mut self) -> usize {
        let (arena, entries) = (&self.arena, &mut self.entries);
        let key = |e: &Entry| &arena[e.offset as usize..(e.offset + e.len) as usize];
        // Keys that share their first bytes are ordered by what follows them: compare by the
        // 8 bytes after the shared part (one pass, in arena order), then by the rest.
        let shared = shared_prefix_len(entries.iter().map(key));
        for e in entries.iter_mut() {
            e.prefix = prefix(&key(e)[shared..]);
        }
        let rest = |e: &Entry| &key(e)[shared..];
        entries.sort_unstable_by(|a, b| match a.prefix.cmp(&b.prefix) {
            Ordering::Equal => rest(a).cmp(rest(b)),
            other => other,
        });
        entries.dedup_by(|a, b| a.prefix == b.prefix && rest(a) == rest(b));
        shared
    }

    fn spill(&mut self) -> io::Result<()> {
        let shared = self.sort_buffer();
        let file = tempfile::tempfile_in(&self.dir)?;
        let mut out = FrontCodedWriter::new(BufWriter::with_capacity(SPILL_WRITE_BUFFER, file));
        let mut key = SortedKey::new(&self.arena, &self.entries, shared);
        for e in &self.entries {
            out.push(key.of(&self.arena, e))?;
        }
        let mut file = out.into_inner().into_inner().map_err(io::IntoInnerError::into_error)?;
        self.stats.spilled_bytes += file.stream_position()?;
        file.seek(SeekFrom::Start(0))?;
        self.runs.push(file);
        self.stats.spilled_runs += 1;
        self.arena.clear();
        self.entries.clear();
        Ok(())
    }

    /// Ends input; returns the keys sorted and de-duplicated.
    pub fn finish(mut self) -> io::Result<(SortedKeys, SortStats)> {
        if self.runs.is_empty() {
            let shared = self.sort_buffer();
            let stats = self.stats;
            return Ok((SortedKeys::Memory(MemoryKeys::new(self.arena, self.entries, shared)), stats));
        }
        if !self.entries.is_empty() {
            self.spill()?;
        }
        // Release the buffer before merging.
        self.arena = Vec::new();
        self.entries = Vec::new();
        let stats = self.stats;
        let readers = self
            .runs
            .drain(..)
            .map(|f| FrontCodedReader::new(BufReader::with_capacity(SPILL_READ_BUFFER, f)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok((SortedKeys::Merged(Merge::new(readers)?), stats))
    }
}

/// The length of the prefix every key shares.
fn shared_prefix_len<'k>(mut keys: impl Iterator<Item = &'k [u8]>) -> usize {
    let Some(first) = keys.next() else { return 0 };
    let mut shared = first.len();
    for key in keys {
        if shared == 0 {
            break;
        }
        shared = first[..shared].iter().zip(key).take_while(|(a, b)| a == b).count();
    }
    shared
}

/// Keys of a sorted buffer, one after the other, in a buffer of their own. A key whose bytes
/// past the shared prefix fit its entry's 8 (numeric ids, mostly) is rebuilt from the entry:
/// the arena holds keys in arrival order, so reading them in sorted order from it costs a
/// cache miss a key.
struct SortedKey {
    shared: usize,
    key: Vec<u8>,
}

impl SortedKey {
    fn new(arena: &[u8], entries: &[Entry], shared: usize) -> Self {
        let key = entries.first().map(|e| arena[e.offset as usize..][..shared].to_vec()).unwrap_or_default();
        SortedKey { shared, key }
    }

    /// The key of `e`, an entry of the sorted buffer.
    fn of(&mut self, arena: &[u8], e: &Entry) -> &[u8] {
        self.key.truncate(self.shared);
        let rest = e.len as usize - self.shared;
        if rest <= size_of::<u64>() {
            self.key.extend_from_slice(&e.prefix.to_be_bytes()[..rest]);
        } else {
            self.key.extend_from_slice(&arena[e.offset as usize + self.shared..(e.offset + e.len) as usize]);
        }
        &self.key
    }
}

/// The first 8 bytes as a big-endian integer, zero-padded: ordered as the bytes are.
fn prefix(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// The sorted, de-duplicated output of an [`ExternalSorter`].
pub enum SortedKeys {
    Memory(MemoryKeys),
    Merged(Merge),
}

impl KeyCursor for SortedKeys {
    type Error = io::Error;

    fn key(&self) -> Option<&[u8]> {
        match self {
            SortedKeys::Memory(m) => m.key(),
            SortedKeys::Merged(m) => m.key(),
        }
    }

    fn advance(&mut self) -> io::Result<()> {
        match self {
            SortedKeys::Memory(m) => {
                m.advance();
                Ok(())
            }
            SortedKeys::Merged(m) => m.advance(),
        }
    }
}

/// Keys that never left memory.
pub struct MemoryKeys {
    arena: Vec<u8>,
    entries: Vec<Entry>,
    at: usize,
    /// The current key's bytes.
    current: SortedKey,
}

impl MemoryKeys {
    fn new(arena: Vec<u8>, entries: Vec<Entry>, shared: usize) -> Self {
        let current = SortedKey::new(&arena, &entries, shared);
        let mut keys = MemoryKeys { arena, entries, at: 0, current };
        keys.load();
        keys
    }

    fn key(&self) -> Option<&[u8]> {
        (self.at < self.entries.len()).then_some(self.current.key.as_slice())
    }

    fn advance(&mut self) {
        self.at += 1;
        self.load();
    }

    fn load(&mut self) {
        if let Some(e) = self.entries.get(self.at) {
            self.current.of(&self.arena, e);
        }
    }
}

type Run = FrontCodedReader<BufReader<File>>;

/// K-way merge of spilled runs, dropping keys repeated across runs.
pub struct Merge {
    runs: Vec<Run>,
    /// Each run's current key (a copy, so the heap can own it) and the run's index.
    heap: BinaryHeap<Reverse<(Vec<u8>, usize)>>,
    current: Vec<u8>,
    done: bool,
}

impl Merge {
    fn new(runs: Vec<Run>) -> io::Result<Self> {
        let heap = runs.iter().enumerate().filter_map(|(i, r)| r.key().map(|k| Reverse((k.to_vec(), i)))).collect();
        let mut merge = Merge { runs, heap, current: Vec::new(), done: false };
        merge.pop(true)?;
        Ok(merge)
    }

    fn key(&self) -> Option<&[u8]> {
        (!self.done).then_some(self.current.as_slice())
    }

    fn advance(&mut self) -> io::Result<()> {
        self.pop(false)
    }

    /// Makes the smallest key not yet emitted current, reusing buffers: the smallest key's
    /// vector becomes `current`, and the old `current` carries its run's next key in its
    /// place at the top of the heap, which then sifts down once (a pop and a push would
    /// sift twice).
    fn pop(&mut self, first: bool) -> io::Result<()> {
        loop {
            let Some(mut top) = self.heap.peek_mut() else {
                self.done = true;
                return Ok(());
            };
            let Reverse((key, run)) = &mut *top;
            let duplicate = !first && *key == self.current;
            if !duplicate {
                std::mem::swap(key, &mut self.current);
            }
            let reader = &mut self.runs[*run];
            reader.advance()?;
            match reader.key() {
                Some(next) => {
                    key.clear();
                    key.extend_from_slice(next);
                }
                None => drop(PeekMut::pop(top)),
            }
            if !duplicate {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(mut keys: SortedKeys) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(k) = keys.key() {
            out.push(k.to_vec());
            keys.advance().unwrap();
        }
        out
    }

    fn sort(keys: &[Vec<u8>], budget: usize) -> (Vec<Vec<u8>>, SortStats) {
        let dir = tempfile::tempdir().unwrap();
        let mut sorter = ExternalSorter::new(dir.path(), budget);
        for k in keys {
            sorter.push(k).unwrap();
        }
        let (sorted, stats) = sorter.finish().unwrap();
        (drain(sorted), stats)
    }

    #[test]
    fn small_inputs_stay_in_memory() {
        let keys: Vec<Vec<u8>> = ["b", "a", "c", "a", "b"].iter().map(|s| s.as_bytes().to_vec()).collect();
        let (out, stats) = sort(&keys, DEFAULT_MEMORY_BUDGET);
        assert_eq!(out, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(stats, SortStats { pushed: 5, spilled_runs: 0, spilled_bytes: 0 });
        assert!(sort(&[], 0).0.is_empty());
    }

    #[test]
    fn large_inputs_spill_and_merge_with_duplicates_across_runs() {
        // Keys sharing their first 8 bytes, so the prefix shortcut must fall back to bytes.
        let keys: Vec<Vec<u8>> =
            (0..200_000u32).map(|i| format!("\x01same-pre{:06}", (i * 7919) % 50_000).into_bytes()).collect();
        let (out, stats) = sort(&keys, 64 * 1024);
        assert!(stats.spilled_runs > 10, "{stats:?}");
        let mut expected = keys.clone();
        expected.sort();
        expected.dedup();
        assert_eq!(out.len(), 50_000);
        assert_eq!(out, expected);
    }

    #[test]
    fn the_prefix_compared_starts_after_the_bytes_every_key_shares() {
        let keys: [&[u8]; 3] = [b"\x01user-0012", b"\x01user-0034", b"\x01user-00"];
        assert_eq!(shared_prefix_len(keys.into_iter()), 8);
        assert_eq!(shared_prefix_len([&b"abc"[..], b""].into_iter()), 0);
        assert_eq!(shared_prefix_len(std::iter::empty()), 0);
        assert_eq!(shared_prefix_len([&b"same"[..]].into_iter()), 4);
        // Keys that differ only past their first 8 bytes, one a prefix of another.
        let keys: Vec<Vec<u8>> = ["\x01user-0000002", "\x01user-00000010", "\x01user-0000001", "\x01user-00"]
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
        let (out, _) = sort(&keys, DEFAULT_MEMORY_BUDGET);
        let mut expected = keys.clone();
        expected.sort();
        assert_eq!(out, expected);
    }

    proptest! {
        #[test]
        fn keys_sharing_a_prefix_come_out_sorted(
            shared in proptest::collection::vec(0u8..3, 0..12),
            tails in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..12), 0..2000),
        ) {
            let keys: Vec<Vec<u8>> = tails.iter().map(|t| [&shared[..], t].concat()).collect();
            let (out, _) = sort(&keys, 16 * 1024);
            let expected: Vec<_> = keys.iter().cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn output_is_the_sorted_set_of_the_input(
            keys in proptest::collection::vec(proptest::collection::vec(0u8..6, 0..12), 0..3000),
        ) {
            let (out, _) = sort(&keys, 1);
            let expected: Vec<_> = keys.iter().cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            prop_assert_eq!(out, expected);
        }
    }
}
