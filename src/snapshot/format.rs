//! Byte formats of sorted key sequences: front-coded records, and the compressed snapshot body.
//!
//! A record is `varint(shared) ‖ varint(suffix length) ‖ suffix`, where `shared` is the
//! length of the prefix the key has in common with the key before it. Sorted member keys
//! share long prefixes (`\x01user-00012…`), so this roughly halves them before compression.
//! Sorter spill files use the records as they are; a snapshot body is the same records in
//! one zstd frame with its content checksum, so a truncated or damaged body fails to read.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use crate::domain::diff::KeyCursor;

/// Longest key a record may carry; member keys are far shorter (Braze limits ids to ~1 KB).
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// zstd level for snapshot bodies: fast to write, and reads are ~1 GB/s at any level.
const ZSTD_LEVEL: i32 = 3;
/// Largest zstd window a body may ask the reader for (2^24 = 16 MiB). Level 3 writes
/// windows of at most 2^21; a damaged or crafted frame asking for more is refused instead
/// of making the reader allocate up to zstd's own limit.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Writes sorted keys as front-coded records.
pub struct FrontCodedWriter<W: Write> {
    out: W,
    last: Vec<u8>,
    count: u64,
}

impl<W: Write> FrontCodedWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, last: Vec::new(), count: 0 }
    }

    /// Appends `key`, which must sort after the previous one (callers guarantee it; a
    /// reader still decodes unsorted input correctly, and the diff checks order).
    pub fn push(&mut self, key: &[u8]) -> io::Result<()> {
        if key.len() > MAX_KEY_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a member key of {} bytes is longer than {MAX_KEY_BYTES}", key.len()),
            ));
        }
        let shared = self.last.iter().zip(key).take_while(|(a, b)| a == b).count();
        let suffix = &key[shared..];
        let mut head = [0u8; 20];
        let mut n = put_varint(&mut head, shared as u64);
        n += put_varint(&mut head[n..], suffix.len() as u64);
        self.out.write_all(&head[..n])?;
        self.out.write_all(suffix)?;
        self.last.truncate(shared);
        self.last.extend_from_slice(suffix);
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

fn put_varint(buf: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[i] = byte;
            return i + 1;
        }
        buf[i] = byte | 0x80;
        i += 1;
    }
}

/// Reads front-coded records; a [`KeyCursor`] that lends the current key.
pub struct FrontCodedReader<R: BufRead> {
    input: R,
    current: Vec<u8>,
    done: bool,
    read: u64,
}

impl<R: BufRead> FrontCodedReader<R> {
    /// Opens the reader on its first key.
    pub fn new(input: R) -> io::Result<Self> {
        let mut reader = Self { input, current: Vec::new(), done: false, read: 0 };
        reader.advance()?;
        Ok(reader)
    }

    fn corrupt(&self, what: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("{what} at key #{}", self.read))
    }

    /// `None` at a clean end of input (no byte of a new record).
    fn varint(&mut self, first: bool) -> io::Result<Option<u64>> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = {
                let buf = self.input.fill_buf()?;
                match buf.first() {
                    Some(&b) => b,
                    None if first && shift == 0 => return Ok(None),
                    None => return Err(self.corrupt("input ends inside a record")),
                }
            };
            self.input.consume(1);
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(Some(value));
            }
        }
        Err(self.corrupt("a length is too long"))
    }
}

impl<R: BufRead> KeyCursor for FrontCodedReader<R> {
    type Error = io::Error;

    fn key(&self) -> Option<&[u8]> {
        (!self.done).then_some(self.current.as_slice())
    }

    fn advance(&mut self) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        let Some(shared) = self.varint(true)? else {
            self.done = true;
            return Ok(());
        };
        let suffix = self.varint(false)?.ok_or_else(|| self.corrupt("input ends inside a record"))?;
        // Damaged input can claim any length: compare without adding, which could overflow.
        if shared > self.current.len() as u64 || suffix > MAX_KEY_BYTES as u64 - shared {
            return Err(self.corrupt("a record does not fit the key before it"));
        }
        self.current.truncate(shared as usize);
        let start = self.current.len();
        self.current.resize(start + suffix as usize, 0);
        self.input.read_exact(&mut self.current[start..]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof { self.corrupt("input ends inside a record") } else { e }
        })?;
        self.read += 1;
        Ok(())
    }
}

/// Records gathered before they go to the compressor: a record is a few bytes, and each
/// call into zstd's streaming API costs more than compressing them.
const RECORD_BUFFER: usize = 64 * 1024;

/// Writes a snapshot body: front-coded records in a zstd frame with a checksum.
pub struct BodyWriter<W: Write> {
    records: FrontCodedWriter<BufWriter<zstd::Encoder<'static, W>>>,
}

impl<W: Write> BodyWriter<W> {
    pub fn new(out: W) -> io::Result<Self> {
        let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
        encoder.include_checksum(true)?;
        Ok(Self { records: FrontCodedWriter::new(BufWriter::with_capacity(RECORD_BUFFER, encoder)) })
    }

    pub fn push(&mut self, key: &[u8]) -> io::Result<()> {
        self.records.push(key)
    }

    pub fn count(&self) -> u64 {
        self.records.count()
    }

    /// Ends the frame; returns the output and the number of keys written.
    pub fn finish(self) -> io::Result<(W, u64)> {
        let count = self.records.count();
        let encoder = self.records.into_inner().into_inner().map_err(io::IntoInnerError::into_error)?;
        let out = encoder.finish()?;
        Ok((out, count))
    }
}

/// A reader of a snapshot body.
pub type BodyReader<R> = FrontCodedReader<BufReader<zstd::Decoder<'static, BufReader<R>>>>;

/// Opens a snapshot body on its first key. Any input, however damaged, gives keys or an
/// error — never a panic, nor more memory than one window and one key.
pub fn read_body<R: Read>(input: R) -> io::Result<BodyReader<R>> {
    let mut decoder = zstd::Decoder::new(input)?;
    decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    FrontCodedReader::new(BufReader::with_capacity(64 * 1024, decoder))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collect<C: KeyCursor<Error = io::Error>>(mut c: C) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        while let Some(k) = c.key() {
            out.push(k.to_vec());
            c.advance()?;
        }
        Ok(out)
    }

    #[test]
    fn shared_prefixes_are_stored_once() {
        let mut w = FrontCodedWriter::new(Vec::new());
        for k in [&b"\x01user-0001"[..], b"\x01user-0002", b"\x01user-0010"] {
            w.push(k).unwrap();
        }
        let bytes = w.into_inner();
        // 12 + 3 + 4 bytes: the first key whole, then the differing tails.
        assert_eq!(bytes.len(), 2 + 10 + 2 + 1 + 2 + 2);
        let keys = collect(FrontCodedReader::new(&bytes[..]).unwrap()).unwrap();
        assert_eq!(keys[2], b"\x01user-0010");
    }

    #[test]
    fn truncated_or_inconsistent_records_are_errors() {
        let mut w = FrontCodedWriter::new(Vec::new());
        w.push(b"\x01abcdef").unwrap();
        w.push(b"\x01abcxyz").unwrap();
        let bytes = w.into_inner();
        for cut in 1..bytes.len() {
            if cut == 9 {
                continue; // a record boundary: a shorter, valid list
            }
            let err = FrontCodedReader::new(&bytes[..cut]).and_then(collect).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut at {cut}: {err}");
        }
        // A first record that claims a shared prefix.
        let err = FrontCodedReader::new(&[3u8, 1, b'a'][..]).err().unwrap();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn damaged_bodies_fail_to_read() {
        let mut w = BodyWriter::new(Vec::new()).unwrap();
        for i in 0..10_000u32 {
            w.push(format!("\x01member-{i:08}").as_bytes()).unwrap();
        }
        let (bytes, n) = w.finish().unwrap();
        assert_eq!(n, 10_000);
        assert_eq!(collect(read_body(&bytes[..]).unwrap()).unwrap().len(), 10_000);
        let truncated = &bytes[..bytes.len() - 3];
        assert!(read_body(truncated).and_then(collect).is_err());
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(read_body(&flipped[..]).and_then(collect).is_err());
    }

    /// A real body of sorted member keys.
    fn real_body(n: u32) -> Vec<u8> {
        let mut w = BodyWriter::new(Vec::new()).unwrap();
        for i in 0..n {
            w.push(format!("\x01member-{i:06}-{}", i % 7).as_bytes()).unwrap();
        }
        w.finish().unwrap().0
    }

    /// Reads every key of `bytes`; the outcome does not matter, only that it comes.
    fn read_all(bytes: &[u8]) -> io::Result<u64> {
        let mut reader = read_body(bytes)?;
        let mut n = 0;
        while reader.key().is_some() {
            n += 1;
            reader.advance()?;
        }
        Ok(n)
    }

    #[test]
    fn lengths_near_the_integer_limit_are_damage_not_overflow() {
        // shared 0, then a suffix length of u64::MAX (ten varint bytes).
        let mut record = vec![0u8];
        record.extend([0xff; 9]);
        record.push(0x01);
        let err = FrontCodedReader::new(&record[..]).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A frame asking for a 2 GiB window is refused, not allocated.
        let mut encoder = zstd::Encoder::new(Vec::new(), 1).unwrap();
        encoder.window_log(31).unwrap();
        encoder.long_distance_matching(true).unwrap();
        io::Write::write_all(&mut encoder, &vec![7u8; 1 << 16]).unwrap();
        let frame = encoder.finish().unwrap();
        assert!(read_all(&frame).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = read_all(&bytes);
            let _ = FrontCodedReader::new(&bytes[..]).and_then(collect);
        }

        #[test]
        fn arbitrary_records_in_a_valid_frame_never_panic(records in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let frame = zstd::encode_all(&records[..], 3).unwrap();
            let _ = read_all(&frame);
        }

        #[test]
        fn damaged_real_bodies_never_panic(
            n in 0u32..3000,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..8),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            insert in proptest::option::of((any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 1..64))),
        ) {
            let mut bytes = real_body(n);
            for (at, mask) in &flips {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            if let Some((at, extra)) = &insert {
                let i = at.index(bytes.len() + 1);
                bytes.splice(i..i, extra.iter().copied());
            }
            if let Some(at) = cut {
                bytes.truncate(at.index(bytes.len() + 1));
            }
            let damaged = !flips.is_empty() || insert.is_some() || cut.is_some();
            match read_all(&bytes) {
                Ok(read) => prop_assert!(damaged || read == u64::from(n)),
                Err(e) => prop_assert!(damaged, "an intact body failed: {}", e),
            }
        }

        #[test]
        fn records_round_trip(mut keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..200)) {
            keys.sort();
            keys.dedup();
            let mut w = BodyWriter::new(Vec::new()).unwrap();
            for k in &keys {
                w.push(k).unwrap();
            }
            let (bytes, n) = w.finish().unwrap();
            prop_assert_eq!(n, keys.len() as u64);
            prop_assert_eq!(collect(read_body(&bytes[..]).unwrap()).unwrap(), keys);
        }
    }
}
