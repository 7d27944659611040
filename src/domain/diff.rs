//! The diff of two cohorts, as a single merge over sorted, de-duplicated key streams.
//!
//! Four streams take part: the previous cohort (what Braze received in the last
//! successful run), the keys *in doubt* (changes an interrupted or failed run may or may
//! not have delivered, so Braze's state for them is unknown), the keys *settled* by an
//! interrupted run's checkpoint (changes Braze is known to have accepted, so their state is
//! known again: [`crate::snapshot::plan`]), and the new cohort. A key in doubt is sent again
//! in whichever direction the new cohort says, even if the previous and new cohorts agree
//! on it; that is what makes a run after a crash exact. A settled key is sent only when
//! its known state differs from the new cohort: that is what keeps a resumed run from
//! paying again for what the interrupted one delivered.
//!
//! Every stream is read through a [`KeyCursor`], which lends its current key instead of
//! handing out owned keys, so diffing ten million members against ten million allocates
//! nothing per member. Order is checked as the merge goes: a stream that is not strictly
//! increasing (a corrupt snapshot, a sorter bug) stops the diff instead of producing a
//! wrong one.

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
    /// In neither: only in doubt (a failed run may have added it).
    Absent,
}

/// What is known of a key's state in Braze.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// What the previous cohort says: no run since may have changed it.
    Previous,
    /// Nothing: an interrupted run may or may not have changed it.
    InDoubt,
    /// An interrupted run's checkpoint shows it: in the Braze cohort (`true`) or not.
    Settled(bool),
}

/// What to tell Braze about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Send {
    Add,
    Remove,
}

impl Change {
    /// Whether the key is in the new cohort.
    pub fn is_new(self) -> bool {
        matches!(self, Change::Added | Change::Unchanged)
    }

    /// The request a key needs: its change; when Braze's state of it is in doubt, whatever
    /// makes Braze match the new cohort; when a checkpoint settled it, a request only if
    /// that state is not the new cohort's.
    pub fn send(self, known: Known) -> Option<Send> {
        let now = self.is_new();
        match (self, known) {
            (_, Known::Settled(in_braze)) if in_braze == now => None,
            (_, Known::Settled(_) | Known::InDoubt) => Some(if now { Send::Add } else { Send::Remove }),
            (Change::Added, Known::Previous) => Some(Send::Add),
            (Change::Removed, Known::Previous) => Some(Send::Remove),
            (Change::Unchanged | Change::Absent, Known::Previous) => None,
        }
    }
}

/// Which stream of a diff a problem was found on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Previous,
    InDoubt,
    Settled,
    New,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Previous => "previous cohort (the snapshot)",
            Side::InDoubt => "keys in doubt (from an interrupted run)",
            Side::Settled => "keys an interrupted run's checkpoint settled",
            Side::New => "new cohort",
        })
    }
}

/// Why a diff stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiffError<E> {
    /// A stream yielded a key not greater than the one before it, at the given position.
    #[error("the {side} is not sorted and de-duplicated at key #{position}; the diff was stopped")]
    OutOfOrder { side: Side, position: u64 },
    /// Reading a stream, or the consumer of the changes, failed.
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
    /// Keys in doubt.
    pub in_doubt: u64,
    /// Requests for keys in doubt (or settled otherwise than the new cohort says) beyond the
    /// changes: unchanged members added again, and absent ones removed again.
    pub resent_adds: u64,
    pub resent_removes: u64,
    /// Keys whose state an interrupted run's checkpoint settled.
    pub settled: u64,
    /// Changes (in `added` and `removed`) Braze already has by such a checkpoint: no
    /// request.
    pub already_sent: u64,
}

impl DiffCounts {
    /// Keys that need a request.
    pub fn sends(&self) -> u64 {
        self.added + self.removed - self.already_sent + self.resent_adds + self.resent_removes
    }
}

/// A [`KeyCursor`] of settled keys, which also tells the state of the key under it.
pub trait SettledCursor: KeyCursor {
    /// Whether the key under the cursor is in the Braze cohort.
    fn in_braze(&self) -> bool;
}

/// Merges `previous`, `in_doubt`, `settled` and `new`, calling `on_key(change, known, key)`
/// once per distinct key, in key order. A key both settled and in doubt is settled.
///
/// Cursors must start on their first key (or be empty; [`Empty`] is an empty one).
/// `on_key` may fail (it is where the caller writes the changes), and its error ends the
/// diff.
pub fn merge_diff<E, P, D, S, N, F>(
    previous: &mut P,
    in_doubt: &mut D,
    settled: &mut S,
    new: &mut N,
    mut on_key: F,
) -> Result<DiffCounts, DiffError<E>>
where
    P: KeyCursor,
    D: KeyCursor,
    S: SettledCursor,
    N: KeyCursor,
    P::Error: Into<E>,
    D::Error: Into<E>,
    S::Error: Into<E>,
    N::Error: Into<E>,
    F: FnMut(Change, Known, &[u8]) -> Result<(), E>,
{
    let mut counts = DiffCounts::default();
    let mut checks = [Side::Previous, Side::InDoubt, Side::Settled, Side::New].map(OrderCheck::new);
    loop {
        let (p, d, s, n) = (previous.key(), in_doubt.key(), settled.key(), new.key());
        let Some(min) = [p, d, s, n].into_iter().flatten().min() else {
            return Ok(counts);
        };
        let here = [p == Some(min), d == Some(min), s == Some(min), n == Some(min)];
        for (check, present) in checks.iter_mut().zip(here) {
            if present {
                check.check(min)?;
            }
        }
        let [was, doubt, known, now] = here;
        let change = match (was, now) {
            (true, true) => Change::Unchanged,
            (false, true) => Change::Added,
            (true, false) => Change::Removed,
            (false, false) => Change::Absent,
        };
        let state = match (known, doubt) {
            (true, _) => Known::Settled(settled.in_braze()),
            (false, true) => Known::InDoubt,
            (false, false) => Known::Previous,
        };
        on_key(change, state, min).map_err(DiffError::Io)?;
        count(&mut counts, change, state, [was, doubt, known, now]);
        if was {
            previous.advance().map_err(|e| DiffError::Io(e.into()))?;
        }
        if doubt {
            in_doubt.advance().map_err(|e| DiffError::Io(e.into()))?;
        }
        if known {
            settled.advance().map_err(|e| DiffError::Io(e.into()))?;
        }
        if now {
            new.advance().map_err(|e| DiffError::Io(e.into()))?;
        }
    }
}

fn count(counts: &mut DiffCounts, change: Change, state: Known, [was, doubt, known, now]: [bool; 4]) {
    match change {
        Change::Added => counts.added += 1,
        Change::Removed => counts.removed += 1,
        Change::Unchanged => counts.unchanged += 1,
        Change::Absent => {}
    }
    counts.previous += u64::from(was);
    counts.new += u64::from(now);
    counts.in_doubt += u64::from(doubt);
    counts.settled += u64::from(known);
    match (change, change.send(state)) {
        (Change::Added | Change::Removed, None) => counts.already_sent += 1,
        (Change::Unchanged | Change::Absent, Some(Send::Add)) => counts.resent_adds += 1,
        (Change::Unchanged | Change::Absent, Some(Send::Remove)) => counts.resent_removes += 1,
        _ => {}
    }
}

/// An empty cursor: no previous cohort, no keys in doubt.
#[derive(Debug)]
pub struct Empty<E>(std::marker::PhantomData<fn() -> E>);

impl<E> Default for Empty<E> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<E> KeyCursor for Empty<E> {
    type Error = E;
    fn key(&self) -> Option<&[u8]> {
        None
    }
    fn advance(&mut self) -> Result<(), E> {
        Ok(())
    }
}

impl<E> SettledCursor for Empty<E> {
    fn in_braze(&self) -> bool {
        false
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

    type Changes = Vec<(Change, Known, Vec<u8>)>;

    /// Settled keys with their state, in memory.
    struct SettledSlice<'a>(&'a [(Vec<u8>, bool)], usize);

    impl KeyCursor for SettledSlice<'_> {
        type Error = Infallible;
        fn key(&self) -> Option<&[u8]> {
            self.0.get(self.1).map(|(k, _)| k.as_slice())
        }
        fn advance(&mut self) -> Result<(), Infallible> {
            self.1 += 1;
            Ok(())
        }
    }

    impl SettledCursor for SettledSlice<'_> {
        fn in_braze(&self) -> bool {
            self.0.get(self.1).is_some_and(|(_, s)| *s)
        }
    }

    fn diff4(
        previous: &[Vec<u8>],
        doubt: &[Vec<u8>],
        settled: &[(Vec<u8>, bool)],
        new: &[Vec<u8>],
    ) -> Result<(DiffCounts, Changes), DiffError<Infallible>> {
        let mut out = Vec::new();
        let counts = merge_diff::<Infallible, _, _, _, _, _>(
            &mut SliceCursor::new(previous),
            &mut SliceCursor::new(doubt),
            &mut SettledSlice(settled, 0),
            &mut SliceCursor::new(new),
            |c, d, k| {
                out.push((c, d, k.to_vec()));
                Ok(())
            },
        )?;
        Ok((counts, out))
    }

    fn diff3(
        previous: &[Vec<u8>],
        doubt: &[Vec<u8>],
        new: &[Vec<u8>],
    ) -> Result<(DiffCounts, Changes), DiffError<Infallible>> {
        diff4(previous, doubt, &[], new)
    }

    fn diff(previous: &[Vec<u8>], new: &[Vec<u8>]) -> Result<(DiffCounts, Changes), DiffError<Infallible>> {
        diff3(previous, &[], new)
    }

    fn keys(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn first_import_adds_everyone_and_an_empty_source_removes_everyone() {
        let members = keys(&["a", "b", "c"]);
        let (counts, changes) = diff(&[], &members).unwrap();
        assert_eq!(counts, DiffCounts { new: 3, added: 3, ..DiffCounts::default() });
        assert!(changes.iter().all(|(c, _, _)| *c == Change::Added));
        let (counts, _) = diff(&members, &[]).unwrap();
        assert_eq!(counts, DiffCounts { previous: 3, removed: 3, ..DiffCounts::default() });
        assert_eq!(counts.sends(), 3);
    }

    #[test]
    fn changes_come_in_key_order() {
        let (counts, changes) = diff(&keys(&["a", "c", "e"]), &keys(&["b", "c", "d"])).unwrap();
        assert_eq!((counts.added, counts.removed, counts.unchanged), (2, 2, 1));
        let order: Vec<_> = changes.iter().map(|(c, _, k)| (*c, k[0])).collect();
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
    fn keys_in_doubt_are_sent_again_the_way_the_new_cohort_says() {
        // b: unchanged but in doubt → added again; x: absent but in doubt → removed again;
        // c: a real change that is also in doubt → sent once.
        let (counts, changes) = diff3(&keys(&["a", "b", "c"]), &keys(&["b", "c", "x"]), &keys(&["a", "b"])).unwrap();
        let sends: Vec<_> = changes.iter().map(|(c, d, k)| (k[0], c.send(*d))).collect();
        assert_eq!(
            sends,
            [(b'a', None), (b'b', Some(Send::Add)), (b'c', Some(Send::Remove)), (b'x', Some(Send::Remove))]
        );
        assert_eq!(counts.in_doubt, 3);
        assert_eq!((counts.resent_adds, counts.resent_removes), (1, 1));
        assert_eq!((counts.added, counts.removed, counts.unchanged), (0, 1, 2));
        assert_eq!(counts.sends(), 3);
    }

    #[test]
    fn settled_keys_are_sent_only_where_their_known_state_is_not_the_new_cohorts() {
        // a: added and accepted, still wanted → nothing; b: removed and accepted, wanted
        // again → added; c: added and accepted, no longer wanted (and never in the
        // previous cohort) → removed again; d: removed and accepted, still gone → nothing;
        // e: in doubt only → sent as the new cohort says.
        let settled = [(b"a".to_vec(), true), (b"b".to_vec(), false), (b"c".to_vec(), true), (b"d".to_vec(), false)];
        let (counts, changes) =
            diff4(&keys(&["b", "d"]), &keys(&["a", "b", "c", "d", "e"]), &settled, &keys(&["a", "b", "e"])).unwrap();
        let sends: Vec<_> = changes.iter().map(|(c, s, k)| (k[0], c.send(*s))).collect();
        assert_eq!(
            sends,
            [(b'a', None), (b'b', Some(Send::Add)), (b'c', Some(Send::Remove)), (b'd', None), (b'e', Some(Send::Add))]
        );
        assert_eq!(changes[0].1, Known::Settled(true));
        assert_eq!(changes[4].1, Known::InDoubt);
        assert_eq!((counts.added, counts.removed, counts.unchanged), (2, 1, 1));
        assert_eq!((counts.settled, counts.already_sent), (4, 2), "a and d: Braze has them");
        assert_eq!((counts.resent_adds, counts.resent_removes), (1, 1), "b, c");
        assert_eq!(counts.sends(), 3);
    }

    #[test]
    fn unsorted_or_duplicated_input_stops_the_diff() {
        let err = diff(&keys(&["a", "c", "b"]), &keys(&["a"])).unwrap_err();
        assert!(matches!(err, DiffError::OutOfOrder { side: Side::Previous, position: 2 }), "{err:?}");
        let err = diff(&keys(&["a"]), &keys(&["a", "b", "b"])).unwrap_err();
        assert!(matches!(err, DiffError::OutOfOrder { side: Side::New, position: 2 }), "{err:?}");
        assert!(err.to_string().contains("new cohort"), "{err}");
        let err = diff3(&[], &keys(&["b", "a"]), &[]).unwrap_err();
        assert!(matches!(err, DiffError::OutOfOrder { side: Side::InDoubt, position: 1 }), "{err:?}");
        let err = diff4(&[], &[], &[(b"b".to_vec(), true), (b"a".to_vec(), true)], &[]).unwrap_err();
        assert!(matches!(err, DiffError::OutOfOrder { side: Side::Settled, position: 1 }), "{err:?}");
    }

    #[test]
    fn a_failing_consumer_stops_the_diff() {
        #[derive(Debug)]
        struct DiskFull;
        impl From<Infallible> for DiskFull {
            fn from(never: Infallible) -> Self {
                match never {}
            }
        }
        let (previous, new) = (keys(&["a"]), keys(&["b"]));
        let err = merge_diff::<DiskFull, _, _, _, _, _>(
            &mut SliceCursor::new(&previous),
            &mut Empty::<Infallible>::default(),
            &mut Empty::<Infallible>::default(),
            &mut SliceCursor::new(&new),
            |_, _, _| Err(DiskFull),
        )
        .unwrap_err();
        assert!(matches!(err, DiffError::Io(DiskFull)));
    }

    fn key_set() -> impl Strategy<Value = BTreeSet<Vec<u8>>> {
        proptest::collection::btree_set(proptest::collection::vec(0u8..4, 0..4), 0..60)
    }

    proptest! {
        #[test]
        fn diff_matches_set_difference(previous in key_set(), new in key_set()) {
            let p: Vec<_> = previous.iter().cloned().collect();
            let n: Vec<_> = new.iter().cloned().collect();
            let (counts, changes) = diff(&p, &n).unwrap();
            let pick = |which: Change| -> BTreeSet<Vec<u8>> {
                changes.iter().filter(|(c, _, _)| *c == which).map(|(_, _, k)| k.clone()).collect()
            };
            prop_assert_eq!(pick(Change::Added), new.difference(&previous).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(pick(Change::Removed), previous.difference(&new).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(pick(Change::Unchanged), previous.intersection(&new).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(counts.new, new.len() as u64);
            prop_assert_eq!(counts.previous, previous.len() as u64);
            // Every distinct key once, in order.
            let all: Vec<_> = changes.iter().map(|(_, _, k)| k.clone()).collect();
            prop_assert!(all.windows(2).all(|w| w[0] < w[1]));
        }

        /// Whatever Braze holds of the keys in doubt, applying the sends makes it equal the
        /// new cohort — provided it equals the previous cohort on every other key, and
        /// holds the settled state of every settled key (settled keys are in doubt too, as
        /// a run records every key it sends; some carry a state opposite to the previous
        /// cohort's, some the same). The sends are as many as the counts say, and none is
        /// for a settled key Braze already holds as the new cohort wants it.
        #[test]
        fn sends_converge_from_any_state_of_the_keys_in_doubt(
            previous in key_set(), doubt in key_set(), new in key_set(), coin in any::<u64>(), pick in any::<u64>(),
        ) {
            let mut braze: BTreeSet<Vec<u8>> = previous.iter().filter(|k| !doubt.contains(*k)).cloned().collect();
            let mut settled = Vec::new();
            for (i, k) in doubt.iter().enumerate() {
                let in_braze = coin.rotate_left(i as u32) & 1 == 1;
                if in_braze {
                    braze.insert(k.clone());
                }
                if pick.rotate_left(i as u32) & 1 == 1 {
                    settled.push((k.clone(), in_braze));
                }
            }
            let p: Vec<_> = previous.iter().cloned().collect();
            let d: Vec<_> = doubt.iter().cloned().collect();
            let n: Vec<_> = new.iter().cloned().collect();
            let (counts, changes) = diff4(&p, &d, &settled, &n).unwrap();
            let mut sent = 0;
            for (c, known, k) in changes {
                let send = c.send(known);
                if let Known::Settled(in_braze) = known {
                    prop_assert_eq!(send.is_some(), in_braze != new.contains(&k), "a settled key is sent iff it differs");
                }
                match send {
                    Some(Send::Add) => { braze.insert(k); sent += 1; }
                    Some(Send::Remove) => { braze.remove(&k); sent += 1; }
                    None => {}
                }
            }
            prop_assert_eq!(braze, new);
            prop_assert_eq!(sent, counts.sends());
            prop_assert_eq!(counts.settled, settled.len() as u64);
        }
    }
}
