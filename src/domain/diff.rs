//! The diff of two cohorts, as a single merge over two sorted, de-duplicated key streams.
//!
//! Both sides are read through a [`KeyCursor`], which lends its current key instead of
//! handing out owned keys, so diffing ten million members against ten million allocates
//! nothing per member. Order is checked as the merge goes: a side that is not strictly
//! increasing (a corrupt snapshot, a sorter bug) stops the diff instead of producing a
//! wrong one.

use std::cmp::Ordering;

/// A forward-only reader of sorted, de-duplicated keys that lends the current one.
pub trait KeyCursor {
    type Error;
    /// The key under the cursor; `None` once the keys are used up.
    fn key(&self) -> Option<&[u8]>;
    /// Moves to the next key.
    fn advance(&mut self) -> Result<(), Self::Error>;
}

/// How one key differs between the previous and the new cohort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// In the new cohort only.
    Added,
    /// In the previous cohort only.
    Removed,
    /// In both.
    Unchanged,
}

/// Which side of a diff a problem was found on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Previous,
    New,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Previous => "previous cohort (the snapshot)",
            Side::New => "new cohort",
        })
    }
}

/// Why a diff stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiffError<E> {
    /// A side yielded a key not greater than the one before it, at the given position.
    #[error("the {side} is not sorted and de-duplicated at key #{position}; the diff was stopped")]
    OutOfOrder { side: Side, position: u64 },
    /// Reading a side, or the consumer of the changes, failed.
    #[error(transparent)]
    Io(E),
}

/// Counts of a finished diff.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffCounts {
    pub previous: u64,
    pub new: u64,
    pub added: u64,
    pub removed: u64,
    pub unchanged: u64,
}

/// Merges `previous` and `new`, calling `on_change` once per distinct key, in key order.
///
/// Both cursors must start on their first key (or be empty). `on_change` may fail (it is
/// where the caller writes the changes), and its error ends the diff.
pub fn merge_diff<E, P, N, F>(
    previous: &mut P,
    new: &mut N,
    mut on_change: F,
) -> Result<DiffCounts, DiffError<E>>
where
    P: KeyCursor,
    N: KeyCursor,
    P::Error: Into<E>,
    N::Error: Into<E>,
    F: FnMut(Change, &[u8]) -> Result<(), E>,
{
    let mut counts = DiffCounts::default();
    let mut last_previous = OrderCheck::new(Side::Previous);
    let mut last_new = OrderCheck::new(Side::New);
    loop {
        let step = match (previous.key(), new.key()) {
            (None, None) => return Ok(counts),
            (Some(p), None) => {
                last_previous.check(p)?;
                on_change(Change::Removed, p).map_err(DiffError::Io)?;
                Ordering::Less
            }
            (None, Some(n)) => {
                last_new.check(n)?;
                on_change(Change::Added, n).map_err(DiffError::Io)?;
                Ordering::Greater
            }
            (Some(p), Some(n)) => {
                let order = p.cmp(n);
                match order {
                    Ordering::Less => {
                        last_previous.check(p)?;
                        on_change(Change::Removed, p).map_err(DiffError::Io)?;
                    }
                    Ordering::Greater => {
                        last_new.check(n)?;
                        on_change(Change::Added, n).map_err(DiffError::Io)?;
                    }
                    Ordering::Equal => {
                        last_previous.check(p)?;
                        last_new.check(n)?;
                        on_change(Change::Unchanged, n).map_err(DiffError::Io)?;
                    }
                }
                order
            }
        };
        match step {
            Ordering::Less => {
                counts.previous += 1;
                counts.removed += 1;
                previous.advance().map_err(|e| DiffError::Io(e.into()))?;
            }
            Ordering::Greater => {
                counts.new += 1;
                counts.added += 1;
                new.advance().map_err(|e| DiffError::Io(e.into()))?;
            }
            Ordering::Equal => {
                counts.previous += 1;
                counts.new += 1;
                counts.unchanged += 1;
                previous.advance().map_err(|e| DiffError::Io(e.into()))?;
                new.advance().map_err(|e| DiffError::Io(e.into()))?;
            }
        }
    }
}

/// Remembers the last key of one side (in a reused buffer) to check strict order.
struct OrderCheck {
    side: Side,
    last: Vec<u8>,
    seen: u64,
}

impl OrderCheck {
    fn new(side: Side) -> Self {
        Self { side, last: Vec::new(), seen: 0 }
    }

    fn check<E>(&mut self, key: &[u8]) -> Result<(), DiffError<E>> {
        if self.seen > 0 && key <= self.last.as_slice() {
            return Err(DiffError::OutOfOrder { side: self.side, position: self.seen });
        }
        self.seen += 1;
        self.last.clear();
        self.last.extend_from_slice(key);
        Ok(())
    }
}

/// A cursor over keys held in memory; for tests and small cohorts.
#[derive(Debug)]
pub struct SliceCursor<'a, K> {
    keys: &'a [K],
    at: usize,
}

impl<'a, K: AsRef<[u8]>> SliceCursor<'a, K> {
    pub fn new(keys: &'a [K]) -> Self {
        Self { keys, at: 0 }
    }
}

impl<K: AsRef<[u8]>> KeyCursor for SliceCursor<'_, K> {
    type Error = std::convert::Infallible;

    fn key(&self) -> Option<&[u8]> {
        self.keys.get(self.at).map(AsRef::as_ref)
    }

    fn advance(&mut self) -> Result<(), Self::Error> {
        self.at += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::convert::Infallible;

    type Changes = Vec<(Change, Vec<u8>)>;

    fn diff(previous: &[Vec<u8>], new: &[Vec<u8>]) -> Result<(DiffCounts, Changes), DiffError<Infallible>> {
        let mut out = Vec::new();
        let counts = merge_diff::<Infallible, _, _, _>(
            &mut SliceCursor::new(previous),
            &mut SliceCursor::new(new),
            |c, k| {
                out.push((c, k.to_vec()));
                Ok(())
            },
        )?;
        Ok((counts, out))
    }

    fn keys(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn first_import_adds_everyone_and_an_empty_source_removes_everyone() {
        let members = keys(&["a", "b", "c"]);
        let (counts, changes) = diff(&[], &members).unwrap();
        assert_eq!(counts, DiffCounts { previous: 0, new: 3, added: 3, removed: 0, unchanged: 0 });
        assert!(changes.iter().all(|(c, _)| *c == Change::Added));
        let (counts, _) = diff(&members, &[]).unwrap();
        assert_eq!(counts, DiffCounts { previous: 3, new: 0, added: 0, removed: 3, unchanged: 0 });
    }

    #[test]
    fn changes_come_in_key_order() {
        let (counts, changes) = diff(&keys(&["a", "c", "e"]), &keys(&["b", "c", "d"])).unwrap();
        assert_eq!(counts.added, 2);
        assert_eq!(counts.removed, 2);
        assert_eq!(counts.unchanged, 1);
        let order: Vec<_> = changes.iter().map(|(c, k)| (*c, k[0])).collect();
        assert_eq!(
            order,
            [
                (Change::Removed, b'a'),
                (Change::Added, b'b'),
                (Change::Unchanged, b'c'),
                (Change::Added, b'd'),
                (Change::Removed, b'e')
            ]
        );
    }

    #[test]
    fn unsorted_or_duplicated_input_stops_the_diff() {
        let err = diff(&keys(&["a", "c", "b"]), &keys(&["a"])).unwrap_err();
        assert!(matches!(err, DiffError::OutOfOrder { side: Side::Previous, position: 2 }), "{err:?}");
        let err = diff(&keys(&["a"]), &keys(&["a", "b", "b"])).unwrap_err();
        assert!(matches!(err, DiffError::OutOfOrder { side: Side::New, position: 2 }), "{err:?}");
        assert!(err.to_string().contains("new cohort"), "{err}");
    }

    #[test]
    fn a_failing_consumer_stops_the_diff() {
        let previous = keys(&["a"]);
        let new = keys(&["b"]);
        #[derive(Debug)]
        struct DiskFull;
        impl From<Infallible> for DiskFull {
            fn from(never: Infallible) -> Self {
                match never {}
            }
        }
        let err = merge_diff::<DiskFull, _, _, _>(
            &mut SliceCursor::new(&previous),
            &mut SliceCursor::new(&new),
            |_, _| Err(DiskFull),
        )
        .unwrap_err();
        assert!(matches!(err, DiffError::Io(DiskFull)));
    }

    proptest! {
        #[test]
        fn diff_matches_set_difference(
            previous in proptest::collection::btree_set(proptest::collection::vec(0u8..4, 0..4), 0..60),
            new in proptest::collection::btree_set(proptest::collection::vec(0u8..4, 0..4), 0..60),
        ) {
            let p: Vec<_> = previous.iter().cloned().collect();
            let n: Vec<_> = new.iter().cloned().collect();
            let (counts, changes) = diff(&p, &n).unwrap();
            let pick = |which: Change| -> BTreeSet<Vec<u8>> {
                changes.iter().filter(|(c, _)| *c == which).map(|(_, k)| k.clone()).collect()
            };
            prop_assert_eq!(pick(Change::Added), new.difference(&previous).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(pick(Change::Removed), previous.difference(&new).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(pick(Change::Unchanged), previous.intersection(&new).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(counts.new, new.len() as u64);
            prop_assert_eq!(counts.previous, previous.len() as u64);
            // Every distinct key once, in order.
            let all: Vec<_> = changes.iter().map(|(_, k)| k.clone()).collect();
            prop_assert!(all.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
