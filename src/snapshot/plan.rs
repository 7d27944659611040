//! Checkpoints: which of a run's sends Braze accepted, so a run resumed after an
//! interruption does not send them again.
//!
//! A large run records, with its keys in doubt and in the same write, its *plan*: the keys
//! it sends in the order it sends them (removals, then additions, each sorted: a send's
//! *position* is its place in that order), and what it knows of other keys in doubt. As
//! Braze accepts its requests the run writes its [`Progress`] — the positions accepted — in
//! one small, conditional write every so many accepted keys. The next run *settles* every
//! accepted key (a removal is not in the Braze cohort, an addition is) and sends it only if
//! its own source wants it otherwise ([`crate::domain::diff`]).
//!
//! Settling a key is safe only if no other attempt of the run may still send it. Two
//! attempts can overlap (an old leader cut off from the API server while a new one
//! resumes). Under leader election the Lease's fence ([`crate::fence`]) ends that: an
//! attempt sends nothing once its fence has closed, and another replica leads only after
//! that (a shard resumes another shard's run only once that shard let go of it or lost its
//! Lease, [`crate::controller::shard::handoff`]; an earlier attempt in the same process
//! ended before the run was resumed). So a run under the fence finds every earlier attempt
//! silent that also sent only under it — the exactness of every commit already rests on
//! that. A plan names its Lease (`lease`) when its run sent under the fence and listed no
//! unsafe key; such a plan, resolved by a run under the same Lease, is *quiet* (a shard, a
//! renamed Lease or another installation is never ordered by it): every send it accepted
//! is settled, and what it left below its permit is simply in doubt, sent again once and
//! settled like any other send. Without leader election, or from an older plan, the store
//! alone proves a key quiet:
//! - a run sends a position only below its *permit*, a bound it recorded before sending
//!   there and never lowers; it records a higher one only by a write conditioned on the
//!   store being as it last wrote it. Once another attempt recorded its keys in doubt, that
//!   write fails and the run stops sending: it never sends past the permit the other
//!   attempt saw.
//! - a run records a plan only if the store is still as its load found it; otherwise it
//!   records its keys in doubt without one (and drops the old plan), and nothing it sends
//!   is ever settled.
//! - the positions of a plan below its permit that were not accepted may still be sent by
//!   its run at any time, so they are *unsafe*: the next run sends them as keys in doubt and
//!   never settles them, and its own plan lists them as unsafe, as do the plans after it,
//!   until a commit. Keys in doubt without a plan are all unsafe.
//! - every other key of the plan is either settled by it (*held*: known before the run,
//!   and not sent by it, or accepted) or quiet.
//!
//! A plan's body holds five sections, each a body as [`super::format`] writes it:
//! removals sent, additions sent, keys held out of and in the cohort, and unsafe keys.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::format::{BodyReader, BodyWriter, read_body};
use super::{DoubtMeta, SnapshotError, check_format};
use crate::domain::diff::KeyCursor;

/// The sections of a plan's body.
pub const SECTIONS: usize = 5;
/// Accepted ranges a checkpoint keeps; past them (a request stuck while many after it
/// finish) the latest are left out, and their keys sent again.
pub const MAX_ACCEPTED_RANGES: usize = 64;

/// One section of a plan's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The run's removals, sorted: positions `0..n`.
    Removes = 0,
    /// The run's additions, sorted: positions after the removals.
    Adds = 1,
    /// Keys in doubt the run knew to be out of the cohort and did not send.
    HeldOut = 2,
    /// Keys in doubt the run knew to be in the cohort and did not send.
    HeldIn = 3,
    /// Keys no checkpoint may settle before a commit: another attempt may still send them.
    Unsafe = 4,
}

impl Section {
    pub const ALL: [Section; SECTIONS] =
        [Section::Removes, Section::Adds, Section::HeldOut, Section::HeldIn, Section::Unsafe];
}

/// A run's plan: recorded with its keys in doubt, valid with them only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanMeta {
    pub format: u32,
    /// As the keys in doubt recorded with it: the generation, cohort, run and time.
    pub base_generation: u64,
    pub cohort_id: String,
    pub run_id: String,
    pub recorded_at: Timestamp,
    /// Keys, and bytes in the body, of each [`Section`], in order.
    pub keys: [u64; SECTIONS],
    pub bytes: [u64; SECTIONS],
    pub progress: Progress,
    /// The Lease (`namespace/name`) whose fence the run sent under, when it lists no unsafe
    /// key: a run under the same Lease finds it quiet (see the module's doc). Older plans
    /// and runs without leader election: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// How far a run got: what Braze accepted, and how far it may send.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Positions Braze accepted: sorted, disjoint, non-adjacent `[start, end)` ranges.
    pub accepted: Vec<[u64; 2]>,
    /// The run sends no position at or past this one.
    pub permit: u64,
}

impl Progress {
    /// Adds the positions `range`, merged with its neighbours.
    pub fn accept(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        self.accepted.retain(|&[s, e]| {
            let touches = s <= end && start <= e;
            if touches {
                start = start.min(s);
                end = end.max(e);
            }
            !touches
        });
        let at = self.accepted.partition_point(|&[s, _]| s < start);
        self.accepted.insert(at, [start, end]);
    }

    /// Positions accepted.
    pub fn accepted_keys(&self) -> u64 {
        self.accepted.iter().map(|[s, e]| e - s).sum()
    }

    /// What a checkpoint records: at most [`MAX_ACCEPTED_RANGES`], the lowest.
    pub fn capped(&self) -> Progress {
        let accepted = self.accepted.iter().take(MAX_ACCEPTED_RANGES).copied().collect();
        Progress { accepted, permit: self.permit }
    }

    fn check(&self) -> Result<(), String> {
        let mut last = None;
        for &[s, e] in &self.accepted {
            if s >= e || last.is_some_and(|l| s <= l) {
                return Err(format!("accepted ranges out of order at [{s}, {e})"));
            }
            last = Some(e);
        }
        Ok(())
    }
}

impl PlanMeta {
    /// Whether it was recorded with these keys in doubt.
    pub fn belongs_to(&self, doubt: &DoubtMeta) -> bool {
        self.run_id == doubt.run_id
            && self.recorded_at == doubt.recorded_at
            && self.base_generation == doubt.base_generation
            && self.cohort_id == doubt.cohort_id
    }

    /// Whether `other` is the same plan (perhaps at another checkpoint).
    pub fn belongs_to_plan(&self, other: &PlanMeta) -> bool {
        self.run_id == other.run_id
            && self.recorded_at == other.recorded_at
            && self.base_generation == other.base_generation
            && self.cohort_id == other.cohort_id
            && self.keys == other.keys
    }

    /// Checks what a reader relies on, against the keys in doubt it belongs to: every key
    /// in doubt is sent or held by the plan.
    pub fn check(&self, what: &str, doubt: &DoubtMeta) -> Result<(), SnapshotError> {
        check_format(self.format, what)?;
        let corrupt = |message: String| SnapshotError::Corrupt { what: what.to_owned(), message };
        let [removes, adds, held_out, held_in, unsafe_keys] = self.keys;
        let covered = removes + adds + held_out + held_in;
        if covered != doubt.keys || unsafe_keys > doubt.keys {
            return Err(corrupt(format!(
                "the checkpoint covers {covered} keys ({unsafe_keys} unsafe), the keys in doubt are {}",
                doubt.keys
            )));
        }
        if self.lease.is_some() && unsafe_keys > 0 {
            return Err(corrupt(format!("a plan sent under the Lease lists {unsafe_keys} unsafe keys")));
        }
        self.progress.check().map_err(|e| corrupt(format!("the checkpoint: {e}")))?;
        if self.progress.accepted.last().is_some_and(|&[_, e]| e > removes + adds) {
            return Err(corrupt("the checkpoint accepts positions past the run's sends".into()));
        }
        Ok(())
    }

    /// Bytes of the body.
    pub fn body_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// Sends of the run.
    pub fn sends(&self) -> u64 {
        self.keys[Section::Removes as usize] + self.keys[Section::Adds as usize]
    }
}

/// Writes the sections of a plan's body, each to its own file in a scratch directory.
pub struct PlanWriter {
    dir: PathBuf,
    sections: Vec<BodyWriter<BufWriter<File>>>,
}

impl PlanWriter {
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let sections = Section::ALL
            .iter()
            .map(|s| BodyWriter::new(BufWriter::with_capacity(64 * 1024, File::create(section_path(dir, *s))?)))
            .collect::<io::Result<_>>()?;
        Ok(PlanWriter { dir: dir.to_owned(), sections })
    }

    /// Adds `key` to `section`; keys of a section come in order.
    pub fn push(&mut self, section: Section, key: &[u8]) -> io::Result<()> {
        self.sections[section as usize].push(key)
    }

    /// Writes the body to `out`; returns the keys and bytes of each section.
    pub fn finish(self, out: &Path) -> io::Result<([u64; SECTIONS], [u64; SECTIONS])> {
        let (mut keys, mut bytes) = ([0; SECTIONS], [0; SECTIONS]);
        let mut body = BufWriter::with_capacity(256 * 1024, File::create(out)?);
        for (i, section) in self.sections.into_iter().enumerate() {
            let (file, count) = section.finish()?;
            file.into_inner().map_err(io::IntoInnerError::into_error)?;
            keys[i] = count;
            let path = section_path(&self.dir, Section::ALL[i]);
            bytes[i] = io::copy(&mut File::open(&path)?, &mut body)?;
            std::fs::remove_file(path)?;
        }
        body.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
        Ok((keys, bytes))
    }
}

fn section_path(dir: &Path, section: Section) -> PathBuf {
    dir.join(format!("plan-section-{}", section as usize))
}

/// Reads `end - pos` bytes of a shared file from `pos`, without moving any cursor.
struct SectionReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for SectionReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A stored plan, opened for reading.
#[derive(Debug)]
pub struct StoredPlan {
    pub meta: PlanMeta,
    /// Holds the body at `offset`.
    pub body: File,
    pub offset: u64,
}

type SectionBody = BodyReader<SectionReader>;

impl StoredPlan {
    fn section(&self, body: &Arc<File>, section: Section) -> io::Result<SectionBody> {
        let i = section as usize;
        let pos = self.offset + self.meta.bytes[..i].iter().sum::<u64>();
        read_body(SectionReader { file: body.clone(), pos, end: pos + self.meta.bytes[i] })
    }
}

/// What a stored plan tells the next run, as bodies in scratch files: keys it settles in
/// the cohort and out of it, and keys no checkpoint may settle.
#[derive(Debug)]
pub struct Resolved {
    pub settled_in: File,
    pub settled_out: File,
    pub unsafe_keys: File,
}

/// Whether a run sending under the fence of `lease` finds `plan` quiet: the plan's run sent
/// under the same Lease and listed no unsafe key (see the module's doc). Another Lease —
/// another shard's, a renamed one, another installation's — orders nothing.
pub fn is_quiet(plan: &PlanMeta, lease: Option<&str>) -> bool {
    lease.is_some() && plan.lease.as_deref() == lease
}

/// Works out what `plan` settles: the held keys, and each accepted send that is not
/// unsafe; and what is unsafe: its unsafe keys, and the sends below its permit that were
/// not accepted — unless the plan is `quiet` ([`is_quiet`]): then nothing is unsafe.
/// [`io::ErrorKind::InvalidData`] when a section is damaged or out of order.
pub fn resolve(plan: StoredPlan, scratch: &Path, quiet: bool) -> io::Result<Resolved> {
    let body = Arc::new(plan.body.try_clone()?);
    let progress = &plan.meta.progress;
    let removes = plan.meta.keys[Section::Removes as usize];
    let temp = || tempfile::tempfile_in(scratch);
    let (mut accepted_out, mut window_out, mut accepted_in, mut window_in) = (temp()?, temp()?, temp()?, temp()?);
    // A quiet plan's run sends nothing more: what it left below its permit is in doubt, not
    // unsafe (and its unsafe section is empty, [`PlanMeta::check`]).
    let window_end = if quiet { 0 } else { progress.permit };
    let accepted = &progress.accepted;
    split(plan.section(&body, Section::Removes)?, 0, accepted, window_end, &mut accepted_out, &mut window_out)?;
    split(plan.section(&body, Section::Adds)?, removes, accepted, window_end, &mut accepted_in, &mut window_in)?;
    let settled = |held: Section, accepted: &mut File| -> io::Result<File> {
        let mut claimed = temp()?;
        let mut accepted = read_body(rewound(accepted)?)?;
        minus(&mut accepted, &mut plan.section(&body, Section::Unsafe)?, &mut claimed)?;
        let mut out = temp()?;
        union(&mut [&mut plan.section(&body, held)?, &mut read_body(rewound(&mut claimed)?)?], &mut out)?;
        rewound(&mut out)
    };
    let settled_out = settled(Section::HeldOut, &mut accepted_out)?;
    let settled_in = settled(Section::HeldIn, &mut accepted_in)?;
    let mut unsafe_keys = temp()?;
    union(
        &mut [
            &mut plan.section(&body, Section::Unsafe)?,
            &mut read_body(rewound(&mut window_out)?)?,
            &mut read_body(rewound(&mut window_in)?)?,
        ],
        &mut unsafe_keys,
    )?;
    Ok(Resolved { settled_in, settled_out, unsafe_keys: rewound(&mut unsafe_keys)? })
}

fn rewound(file: &mut File) -> io::Result<File> {
    file.seek(SeekFrom::Start(0))?;
    file.try_clone()
}

/// Writes the keys of a send section (positions from `first`) in the `ranges` accepted to
/// `accepted`, and those below `window_end` that were not to `window`.
fn split(
    mut sends: SectionBody,
    first: u64,
    ranges: &[[u64; 2]],
    window_end: u64,
    accepted: &mut File,
    window: &mut File,
) -> io::Result<()> {
    let mut yes = BodyWriter::new(BufWriter::new(accepted))?;
    let mut maybe = BodyWriter::new(BufWriter::new(window))?;
    let mut ranges = ranges.iter().peekable();
    let mut position = first;
    while let Some(key) = sends.key() {
        while ranges.next_if(|[_, end]| *end <= position).is_some() {}
        if ranges.peek().is_some_and(|[start, _]| *start <= position) {
            yes.push(key)?;
        } else if position < window_end {
            maybe.push(key)?;
        }
        position += 1;
        sends.advance()?;
    }
    for w in [yes, maybe] {
        w.finish()?.0.into_inner().map_err(io::IntoInnerError::into_error)?;
    }
    Ok(())
}

fn out_of_order() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "checkpoint keys out of order")
}

/// Writes the keys of `a` that are not in `b` (both sorted) as a body to `out`.
fn minus(
    a: &mut dyn KeyCursor<Error = io::Error>,
    b: &mut dyn KeyCursor<Error = io::Error>,
    out: &mut File,
) -> io::Result<()> {
    let mut w = BodyWriter::new(BufWriter::new(out))?;
    let mut last: Vec<u8> = Vec::new();
    while let Some(key) = a.key() {
        while b.key().is_some_and(|k| k < key) {
            b.advance()?;
        }
        if w.count() > 0 && key <= last.as_slice() {
            return Err(out_of_order());
        }
        if b.key() != Some(key) {
            w.push(key)?;
        }
        last.clear();
        last.extend_from_slice(key);
        a.advance()?;
    }
    w.finish()?.0.into_inner().map_err(io::IntoInnerError::into_error)?;
    Ok(())
}

/// Writes the sorted union of `inputs` as a body to `out`; fails unless each is sorted.
pub(crate) fn union(inputs: &mut [&mut dyn KeyCursor<Error = io::Error>], out: &mut File) -> io::Result<u64> {
    let mut w = BodyWriter::new(BufWriter::new(out))?;
    let mut last: Vec<u8> = Vec::new();
    while let Some(min) = inputs.iter().filter_map(|c| c.key()).min().map(<[u8]>::to_vec) {
        if w.count() > 0 && min <= last {
            return Err(out_of_order());
        }
        w.push(&min)?;
        for input in inputs.iter_mut() {
            if input.key() == Some(min.as_slice()) {
                input.advance()?;
            }
        }
        last = min;
    }
    let (out, count) = w.finish()?;
    out.into_inner().map_err(io::IntoInnerError::into_error)?;
    Ok(count)
}

/// The settled keys of a [`Resolved`] plan as one cursor for the diff.
pub struct SettledKeys {
    ins: Option<BodyReader<BufReader<File>>>,
    outs: Option<BodyReader<BufReader<File>>>,
}

impl SettledKeys {
    pub fn new(settled_in: Option<File>, settled_out: Option<File>) -> io::Result<Self> {
        let open = |f: Option<File>| f.map(|f| read_body(BufReader::with_capacity(64 * 1024, f))).transpose();
        Ok(SettledKeys { ins: open(settled_in)?, outs: open(settled_out)? })
    }

    /// The side holding the lower key: `true` for the keys in the cohort.
    fn side(&self) -> Option<bool> {
        fn key(c: &Option<BodyReader<BufReader<File>>>) -> Option<&[u8]> {
            c.as_ref().and_then(|c| c.key())
        }
        match (key(&self.ins), key(&self.outs)) {
            (None, None) => None,
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (Some(i), Some(o)) => Some(i <= o),
        }
    }
}

impl KeyCursor for SettledKeys {
    type Error = io::Error;

    fn key(&self) -> Option<&[u8]> {
        match self.side()? {
            true => self.ins.as_ref()?.key(),
            false => self.outs.as_ref()?.key(),
        }
    }

    fn advance(&mut self) -> io::Result<()> {
        match self.side() {
            Some(true) => self.ins.as_mut().map_or(Ok(()), KeyCursor::advance),
            Some(false) => self.outs.as_mut().map_or(Ok(()), KeyCursor::advance),
            None => Ok(()),
        }
    }
}

impl crate::domain::diff::SettledCursor for SettledKeys {
    fn in_braze(&self) -> bool {
        self.side().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(file: File) -> Vec<String> {
        let mut r = read_body(BufReader::new(file)).unwrap();
        let mut out = Vec::new();
        while let Some(k) = r.key() {
            out.push(String::from_utf8(k.to_vec()).unwrap());
            r.advance().unwrap();
        }
        out
    }

    /// A stored plan of these sections and progress.
    fn plan(dir: &Path, sections: [&[&str]; SECTIONS], progress: Progress) -> StoredPlan {
        let mut w = PlanWriter::new(&dir.join("w")).unwrap();
        for (section, keys) in Section::ALL.into_iter().zip(sections) {
            for k in keys {
                w.push(section, k.as_bytes()).unwrap();
            }
        }
        let path = dir.join("plan");
        let (keys, bytes) = w.finish(&path).unwrap();
        let meta = PlanMeta {
            format: super::super::FORMAT_VERSION,
            base_generation: 1,
            cohort_id: "vip".into(),
            run_id: "r".into(),
            recorded_at: Timestamp::UNIX_EPOCH,
            keys,
            bytes,
            progress,
            lease: None,
        };
        StoredPlan { meta, body: File::open(path).unwrap(), offset: 0 }
    }

    #[test]
    fn accepted_ranges_merge_and_stay_in_order() {
        let mut p = Progress::default();
        for r in [10..20, 30..40, 0..5, 20..30, 50..60, 45..46] {
            p.accept(r);
        }
        assert_eq!(p.accepted, [[0, 5], [10, 40], [45, 46], [50, 60]]);
        assert_eq!(p.accepted_keys(), 5 + 30 + 1 + 10);
        p.accept(4..51);
        assert_eq!(p.accepted, [[0, 60]]);
        for i in 0..100u64 {
            p.accept(100 + 2 * i..101 + 2 * i);
        }
        assert_eq!(p.capped().accepted.len(), MAX_ACCEPTED_RANGES);
        assert_eq!(p.capped().accepted[0], [0, 60], "the lowest are kept");
    }

    #[test]
    fn accepted_sends_are_settled_unless_unsafe_and_the_rest_below_the_permit_is_unsafe() {
        let dir = tempfile::tempdir().unwrap();
        // Sends: removals a c e (positions 0-2), additions b d f g (3-6). Accepted: 0-1 and 3-4,
        // permit 6: e (2) and f (5) may still be sent; g (6) never will be. c is unsafe.
        let progress = Progress { accepted: vec![[0, 2], [3, 5]], permit: 6 };
        let stored = plan(dir.path(), [&["a", "c", "e"], &["b", "d", "f", "g"], &["h"], &["i"], &["c", "z"]], progress);
        let resolved = resolve(stored, dir.path(), false).unwrap();
        assert_eq!(keys_of(resolved.settled_out), ["a", "h"]);
        assert_eq!(keys_of(resolved.settled_in), ["b", "d", "i"]);
        assert_eq!(keys_of(resolved.unsafe_keys), ["c", "e", "f", "z"]);
    }

    #[test]
    fn a_quiet_plan_settles_its_accepted_sends_and_leaves_nothing_unsafe() {
        let dir = tempfile::tempdir().unwrap();
        // As above without unsafe keys: e (2) and f (5) were below the permit, not accepted.
        let progress = Progress { accepted: vec![[0, 2], [3, 5]], permit: 6 };
        let sections: [&[&str]; SECTIONS] = [&["a", "c", "e"], &["b", "d", "f", "g"], &["h"], &["i"], &[]];
        let mut stored = plan(dir.path(), sections, progress.clone());
        stored.meta.lease = Some("ops/cohort-operator".into());
        assert!(is_quiet(&stored.meta, Some("ops/cohort-operator")));
        assert!(!is_quiet(&stored.meta, None), "a run without the fence proves nothing quiet");
        assert!(!is_quiet(&stored.meta, Some("ops/cohort-operator-b")), "another Lease (a shard's) orders nothing");
        let resolved = resolve(stored, dir.path(), true).unwrap();
        assert_eq!(keys_of(resolved.settled_out), ["a", "c", "h"]);
        assert_eq!(keys_of(resolved.settled_in), ["b", "d", "i"]);
        assert!(keys_of(resolved.unsafe_keys).is_empty(), "e and f are in doubt, sent again once");
        let unfenced = resolve(plan(dir.path(), sections, progress), dir.path(), false).unwrap();
        assert_eq!(keys_of(unfenced.unsafe_keys), ["e", "f"]);
    }

    #[test]
    fn the_settled_cursor_merges_both_states_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let stored = plan(dir.path(), [&[], &[], &["b", "d"], &["a", "c"], &[]], Progress::default());
        let r = resolve(stored, dir.path(), false).unwrap();
        let mut c = SettledKeys::new(Some(r.settled_in), Some(r.settled_out)).unwrap();
        let mut seen = Vec::new();
        while let Some(k) = c.key() {
            seen.push((k[0], crate::domain::diff::SettledCursor::in_braze(&c)));
            c.advance().unwrap();
        }
        assert_eq!(seen, [(b'a', true), (b'b', false), (b'c', true), (b'd', false)]);
    }

    #[test]
    fn unsorted_sections_are_damage() {
        let dir = tempfile::tempdir().unwrap();
        let stored = plan(dir.path(), [&[], &[], &["b", "a"], &[], &[]], Progress::default());
        let err = resolve(stored, dir.path(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn a_plan_is_checked_against_its_keys_in_doubt() {
        let dir = tempfile::tempdir().unwrap();
        let stored =
            plan(dir.path(), [&["a"], &["b"], &[], &["c"], &[]], Progress { accepted: vec![[0, 2]], permit: 9 });
        let doubt = DoubtMeta {
            format: 1,
            base_generation: 1,
            cohort_id: "vip".into(),
            keys: 3,
            run_id: "r".into(),
            recorded_at: Timestamp::UNIX_EPOCH,
        };
        assert!(stored.meta.belongs_to(&doubt));
        stored.meta.check("x", &doubt).unwrap();
        assert!(!stored.meta.belongs_to(&DoubtMeta { run_id: "other".into(), ..doubt.clone() }));
        assert!(stored.meta.check("x", &DoubtMeta { keys: 4, ..doubt.clone() }).is_err());
        let past = PlanMeta { progress: Progress { accepted: vec![[0, 3]], permit: 3 }, ..stored.meta.clone() };
        assert!(past.check("x", &doubt).is_err());
        let mut leased = stored.meta.clone();
        leased.lease = Some("ops/cohort-operator".into());
        leased.check("x", &doubt).unwrap();
        leased.keys[Section::Unsafe as usize] = 1;
        let err = leased.check("x", &doubt).unwrap_err().to_string();
        assert!(err.contains("under the Lease lists 1 unsafe"), "{err}");
    }
}
