//! The write-ahead log's on-disk format: records, frames, segment files, the pure state of
//! an owner's writer, and reading segments back. Pure and synchronous; the shards write
//! segments with glommio's direct I/O (`laminardb_shards::wal`), recovery reads them
//! through a [`Vfs`](crate::vfs::Vfs) (`crate::recovery`).
//!
//! ```text
//! segment file  <dir>/<owner>/<first lsn, 20 digits>.wal
//!   frame*      len: u32 LE (> 0) │ crc32(body): u32 LE │ body: len bytes
//!   zero bytes  padding up to the 4 KiB page (a frame length of 0 ends the segment)
//! body          lsn: u64 LE │ parts: u16 LE │ kind: u8 │ [meta] │ payload
//!   kind        low 4 bits: the record kind; 0x40: a meta follows; 0x80: the first frame
//!               of a flush (one write + sync)
//!   meta        prev: u64 │ start: u64 │ acked: u64   (see `Meta`)
//!   APPEND  1   source length: u32 LE │ source │ Arrow IPC stream of the batches
//!   DDL     2   SQL text
//!   MARK    3   source length: u32 LE │ source │ watermark: i64 LE
//!   SEGMENT 4   prev segment: u64 LE (the first lsn of this owner's previous segment, 0
//!               for its first ever); the first frame of every segment, lsn = its name
//! ```
//!
//! Every record carries the coordinator's log sequence number (`lsn`): one per accepted
//! command, so records of all owners merge back into the order the coordinator accepted
//! them. An insert split over several shards writes one `APPEND` on each shard that got
//! rows, all with the same `lsn` and `parts` = how many there are; recovery replays an
//! insert only if all its parts are on disk (the caller was never answered otherwise).
//!
//! What lets recovery tell damage from a crash: segment headers chain an owner's segments
//! (a missing one is named); each record's `prev` chains its owner's records (a gap is
//! found); each record's `start..acked` says which lsns had been acknowledged when it was
//! sent (an acknowledged record missing anywhere is found); and the flush flag marks where
//! one write ends and the next began (damage before a later flush is not a torn write).
//! Directories written before these existed (kinds 1–3 without flags) still read.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;

use crate::{Error, Result};

/// Direct I/O writes whole pages: a flush rewrites the partial last page.
pub const PAGE: usize = 4096;
/// A segment is closed and a new one started once it grows past this.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// A frame longer than this is corrupt (a length field torn or flipped).
pub const FRAME_MAX: usize = 1 << 31;
const FRAME_HEADER: usize = 8;

const KIND_APPEND: u8 = 1;
const KIND_DDL: u8 = 2;
const KIND_MARK: u8 = 3;
const KIND_SEGMENT: u8 = 4;
const KIND_MASK: u8 = 0x0f;
const FLAG_META: u8 = 0x40;
const FLAG_FLUSH: u8 = 0x80;
/// The smallest unit a device writes atomically: a crash leaves each such sector of an
/// unfinished write either old (zeros, past the previous end) or new, never mixed.
pub const SECTOR: usize = 512;

/// What a record says about the log around it, for recovery's damage checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// The lsn of the record its owner wrote before this one (0: none).
    pub prev: u64,
    /// Every lsn in `start..acked` had been acknowledged (all its records durable) when
    /// this record was sent: `start` is the writing process's first lsn.
    pub start: u64,
    pub acked: u64,
}

/// The acknowledged range a record is sent with (`Meta` without `prev`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    pub start: u64,
    pub acked: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// One shard's rows of an insert.
    Append { lsn: u64, parts: u16, source: String, batches: Vec<RecordBatch> },
    /// A catalog change, as the SQL that made it.
    Ddl { lsn: u64, sql: String },
    /// An explicit `Writer.watermark()` call that moved a source's watermark.
    Watermark { lsn: u64, source: String, watermark: i64 },
}

impl Record {
    pub fn lsn(&self) -> u64 {
        match self {
            Record::Append { lsn, .. } | Record::Ddl { lsn, .. } | Record::Watermark { lsn, .. } => *lsn,
        }
    }
}

/// Appends `record` as one frame to `out`, in the format before `Meta` existed (tests and
/// fuzzing: such directories must still read).
pub fn encode(record: &Record, out: &mut Vec<u8>) -> Result<()> {
    encode_frame(record, None, false, out)
}

/// Appends `record` as one frame to `out`, with its meta (if any) and whether it is the
/// first frame of a flush.
pub fn encode_frame(record: &Record, meta: Option<Meta>, flush_start: bool, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    let flags = if meta.is_some() { FLAG_META } else { 0 } | if flush_start { FLAG_FLUSH } else { 0 };
    let (lsn, parts, kind) = match record {
        Record::Append { lsn, parts, .. } => (*lsn, *parts, KIND_APPEND),
        Record::Ddl { lsn, .. } => (*lsn, 1, KIND_DDL),
        Record::Watermark { lsn, .. } => (*lsn, 1, KIND_MARK),
    };
    head(out, lsn, parts, kind | flags);
    if let Some(m) = meta {
        for v in [m.prev, m.start, m.acked] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let written = match record {
        Record::Append { source, batches, .. } => {
            name(out, source);
            match batches.first().map(|b| b.schema()) {
                Some(schema) => crate::ipc::write(&schema, batches, &mut *out),
                None => Err(Error::internal("an empty WAL append")),
            }
        }
        Record::Ddl { sql, .. } => {
            out.extend_from_slice(sql.as_bytes());
            Ok(())
        }
        Record::Watermark { source, watermark, .. } => {
            name(out, source);
            out.extend_from_slice(&watermark.to_le_bytes());
            Ok(())
        }
    };
    if let Err(e) = written {
        out.truncate(start);
        return Err(e);
    }
    seal(out, start);
    Ok(())
}

/// The frame that opens every segment: its first lsn and the previous segment's.
pub fn encode_segment_header(first_lsn: u64, prev_segment: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    head(out, first_lsn, 0, KIND_SEGMENT | FLAG_FLUSH);
    out.extend_from_slice(&prev_segment.to_le_bytes());
    seal(out, start);
}

/// Fills in the length and checksum of the frame begun at `start`.
fn seal(out: &mut [u8], start: usize) {
    let body = &out[start + FRAME_HEADER..];
    let (len, crc) = (body.len() as u32, crc32fast::hash(body));
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn head(out: &mut Vec<u8>, lsn: u64, parts: u16, kind: u8) {
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&parts.to_le_bytes());
    out.push(kind);
}

fn name(out: &mut Vec<u8>, source: &str) {
    out.extend_from_slice(&(source.len() as u32).to_le_bytes());
    out.extend_from_slice(source.as_bytes());
}

/// How a segment's bytes ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// After the last frame: end of file or zero padding.
    Clean,
    /// A frame that is cut short or fails its checksum, at this byte offset: a write the
    /// crash interrupted (or corruption). Nothing from here on is used.
    Torn { offset: usize, why: String },
}

/// One valid frame of a segment.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// The segment's header: its first lsn and the first lsn of the owner's previous
    /// segment (0 for its first ever).
    Header { first_lsn: u64, prev_segment: u64 },
    Record { record: Record, meta: Option<Meta>, flush_start: bool },
}

/// A valid frame and where it lies in the segment.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub entry: Entry,
    pub offset: usize,
    pub end: usize,
}

/// Every valid frame of `bytes`, in order, and how the bytes ended; the second value is
/// the byte length of the valid prefix.
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize, Tail) {
    let (frames, valid, tail) = decode_frames(bytes);
    let records = frames
        .into_iter()
        .filter_map(|f| match f.entry {
            Entry::Record { record, .. } => Some(record),
            Entry::Header { .. } => None,
        })
        .collect();
    (records, valid, tail)
}

/// Every valid frame of `bytes` (headers included), the length of the valid prefix, and
/// how the bytes ended. Never panics, whatever the bytes.
pub fn decode_frames(bytes: &[u8]) -> (Vec<Decoded>, usize, Tail) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        match frame_at(bytes, at) {
            Ok(Some((entry, end))) => {
                frames.push(Decoded { entry, offset: at, end });
                at = end;
            }
            Ok(None) => return (frames, at, Tail::Clean),
            Err(why) => return (frames, at, Tail::Torn { offset: at, why }),
        }
    }
}

/// The frame at `at`: `Ok(None)` at a clean end (end of the bytes or zero padding), an
/// error saying why the bytes there are not a valid frame.
fn frame_at(bytes: &[u8], at: usize) -> std::result::Result<Option<(Entry, usize)>, String> {
    let rest = &bytes[at.min(bytes.len())..];
    if rest.len() < FRAME_HEADER {
        // Fewer than 8 bytes left: a clean end only if they are padding.
        return if rest.iter().all(|&b| b == 0) { Ok(None) } else { Err("a frame header cut short".into()) };
    }
    let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
    if len == 0 {
        return if crc == 0 && rest.iter().all(|&b| b == 0) { Ok(None) } else { Err("bytes after the end marker".into()) };
    }
    if len > FRAME_MAX || len > rest.len() - FRAME_HEADER {
        return Err(format!("a {len}-byte frame cut short"));
    }
    let body = &rest[FRAME_HEADER..FRAME_HEADER + len];
    if crc32fast::hash(body) != crc {
        return Err("a checksum mismatch".into());
    }
    match decode_body(body) {
        Ok(entry) => Ok(Some((entry, at + FRAME_HEADER + len))),
        Err(e) => Err(format!("an undecodable record: {e}")),
    }
}

fn decode_body(body: &[u8]) -> Result<Entry> {
    let bad = || Error::internal("a WAL record shorter than its header");
    let fixed = body.get(..11).ok_or_else(bad)?;
    let lsn = u64::from_le_bytes(fixed[..8].try_into().unwrap());
    let parts = u16::from_le_bytes(fixed[8..10].try_into().unwrap());
    let (kind, flags) = (fixed[10] & KIND_MASK, fixed[10] & !KIND_MASK);
    if flags & !(FLAG_META | FLAG_FLUSH) != 0 {
        return Err(Error::internal(format!("unknown WAL record flags {flags:#x}")));
    }
    let u64_at = |b: &[u8], at: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(b.get(at..at + 8).ok_or_else(bad)?.try_into().unwrap()))
    };
    let mut rest = &body[11..];
    if kind == KIND_SEGMENT {
        if flags != FLAG_FLUSH || rest.len() != 8 {
            return Err(Error::internal("a malformed segment header"));
        }
        return Ok(Entry::Header { first_lsn: lsn, prev_segment: u64_at(rest, 0)? });
    }
    let meta = if flags & FLAG_META != 0 {
        let meta = Meta { prev: u64_at(rest, 0)?, start: u64_at(rest, 8)?, acked: u64_at(rest, 16)? };
        rest = &rest[24..];
        Some(meta)
    } else {
        None
    };
    let name_of = |rest: &[u8]| -> Result<(String, usize)> {
        let n = u32::from_le_bytes(rest.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
        let text = rest.get(4..4usize.saturating_add(n)).ok_or_else(bad)?;
        let text = std::str::from_utf8(text).map_err(|e| Error::internal(e.to_string()))?;
        Ok((text.to_string(), 4 + n))
    };
    let record = match kind {
        KIND_APPEND => {
            let (source, used) = name_of(rest)?;
            if parts == 0 {
                return Err(Error::internal("an append of 0 parts"));
            }
            Record::Append { lsn, parts, source, batches: crate::ipc::read(&rest[used..])? }
        }
        KIND_DDL => {
            let sql = std::str::from_utf8(rest).map_err(|e| Error::internal(e.to_string()))?;
            Record::Ddl { lsn, sql: sql.to_string() }
        }
        KIND_MARK => {
            let (source, used) = name_of(rest)?;
            let mark = rest.get(used..used + 8).ok_or_else(bad)?;
            Record::Watermark { lsn, source, watermark: i64::from_le_bytes(mark.try_into().unwrap()) }
        }
        other => return Err(Error::internal(format!("unknown WAL record kind {other}"))),
    };
    Ok(Entry::Record { record, meta, flush_start: flags & FLAG_FLUSH != 0 })
}

/// Where a frame that starts a later flush (a write after the one being looked at) lies
/// in `bytes` after `from`, if one does: a record with the flush flag and an lsn above
/// `after_lsn` whose checksum holds. Damage before such a frame is not a torn write: a
/// flush begins only once the previous one is durable. Bounded work: a search that would
/// checksum more than `CRC_BUDGET` bytes gives up.
pub fn later_flush(bytes: &[u8], from: usize, after_lsn: u64) -> Option<usize> {
    const CRC_BUDGET: usize = 256 << 20;
    let mut budget = CRC_BUDGET;
    let n = bytes.len();
    let mut at = from + 1;
    while at + FRAME_HEADER + 11 + 24 <= n {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let body = at + FRAME_HEADER;
        let kind = bytes[body + 10];
        let lsn = u64::from_le_bytes(bytes[body..body + 8].try_into().unwrap());
        let plausible = (11 + 24..=n - body).contains(&len)
            && kind & (FLAG_FLUSH | FLAG_META) == FLAG_FLUSH | FLAG_META
            && (KIND_APPEND..=KIND_MARK).contains(&(kind & KIND_MASK))
            && kind & 0x30 == 0
            && lsn > after_lsn
            && lsn - after_lsn < 1 << 40;
        if plausible {
            if budget < len {
                return None;
            }
            budget -= len;
            let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
            if crc32fast::hash(&bytes[body..body + len]) == crc {
                return Some(at);
            }
        }
        at += 1;
    }
    None
}

/// Whether the bad frame at `at` (the first one of `bytes` that is not valid) looks like
/// what a crash leaves of a write in flight: every sector of an unfinished write is
/// either written or still holds what it held before (zeros past the old end), and the
/// file ends at a sector boundary. A frame with no such unwritten sector (a changed byte,
/// a length that disagrees with an intact body) was damaged after it was written.
pub fn crash_shaped(bytes: &[u8], at: usize) -> bool {
    let n = bytes.len();
    let rest = n.saturating_sub(at);
    let zeros = |from: usize, to: usize| bytes[from..to].iter().all(|&b| b == 0);
    if rest < FRAME_HEADER {
        return n % SECTOR == 0;
    }
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    if len == 0 {
        let sector_end = ((at / SECTOR) + 1) * SECTOR;
        return zeros(at, sector_end.min(n));
    }
    let end = at.saturating_add(FRAME_HEADER).saturating_add(len);
    if len > FRAME_MAX || end > n {
        return n % SECTOR == 0 && !length_flipped(bytes, at);
    }
    // Some sector the frame spans holds nothing from this frame on: it was never written.
    let mut sector = at / SECTOR * SECTOR;
    while sector < end {
        let from = sector.max(at);
        let to = (sector + SECTOR).min(n);
        if from < to && zeros(from, to) {
            return true;
        }
        sector += SECTOR;
    }
    false
}

/// Whether the frame at `at`, cut short by the end of `bytes` by its length field, is
/// whole under some shorter length: its checksum holds for a body that ends where zero
/// padding begins. Then the length was changed, not the write cut. Bounded to 1 MiB.
fn length_flipped(bytes: &[u8], at: usize) -> bool {
    let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
    let body = &bytes[at + FRAME_HEADER..];
    let body = &body[..body.len().min(1 << 20)];
    let mut hasher = crc32fast::Hasher::new();
    for (i, &b) in body.iter().enumerate() {
        hasher.update(&[b]);
        if i >= 10 && body[i + 1..].first().is_none_or(|&next| next == 0) && hasher.clone().finalize() == crc {
            return true;
        }
    }
    false
}

/// `<dir>/<owner>/<first lsn>.wal`.
pub fn segment_path(dir: &Path, owner: &str, first_lsn: u64) -> PathBuf {
    dir.join(owner).join(format!("{first_lsn:020}.wal"))
}

/// One owner's segment files, oldest first, with the first lsn each was opened at.
pub fn segments(owner_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    segments_in(&crate::vfs::OsVfs, owner_dir)
}

pub fn segments_in(vfs: &dyn crate::vfs::Vfs, owner_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match vfs.list(owner_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(owner_dir, e)),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.strip_suffix(".wal")?;
            let lsn = name.parse::<u64>().ok().filter(|_| name.len() == 20)?;
            Some((lsn, path))
        })
        .collect();
    out.sort();
    Ok(out)
}

pub fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::storage(format!("{}: {e}", path.display())).with_source(e)
}

/// Groups records by lsn, in lsn order, keeping only complete groups: an insert whose
/// parts are not all on disk was never acknowledged and is left out (counted in the
/// second value).
pub fn merge(mut records: Vec<Record>) -> (Vec<Vec<Record>>, usize) {
    records.sort_by_key(Record::lsn);
    let mut groups: Vec<Vec<Record>> = Vec::new();
    for record in records {
        match groups.last_mut() {
            Some(group) if group[0].lsn() == record.lsn() => group.push(record),
            _ => groups.push(vec![record]),
        }
    }
    let before = groups.len();
    groups.retain(|g| match &g[0] {
        Record::Append { parts, .. } => g.len() == *parts as usize,
        _ => true,
    });
    let incomplete = before - groups.len();
    (groups, incomplete)
}

/// The rows of a complete append group, as one list of batches in shard order.
pub fn append_batches(group: Vec<Record>) -> Option<(String, Vec<RecordBatch>)> {
    let mut source = None;
    let mut out = Vec::new();
    for record in group {
        if let Record::Append { source: s, batches, .. } = record {
            source.get_or_insert(s);
            out.extend(batches);
        }
    }
    source.map(|s| (s, out))
}

/// What reopening a storage directory found and replayed.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Rows replayed into sources.
    pub rows: u64,
    /// Torn tails (what a crash left of unfinished writes) cut off, one line each.
    pub torn_tails: Vec<String>,
    /// Damage cut off because the database was opened with `recovery = 'truncate'`: one
    /// line each, naming the file and what was lost.
    pub damage: Vec<String>,
    /// Rows of intact records dropped with the damage (they followed it).
    pub dropped_rows: u64,
    /// Records that failed to replay (their error), e.g. rows for a source dropped since.
    pub errors: Vec<String>,
    pub millis: f64,
}

/// Everything recovery does with one owner's segment bytes, for the fuzz targets
/// (fuzz/wal_segment.rs) and the seeded loop in the tests: decoding, the torn-write
/// tests, and a whole recovery of a directory holding these bytes as a shard's only
/// segment and as two. Must never panic.
pub fn fuzz_segment(bytes: &[u8]) {
    let (_, valid, tail) = decode_frames(bytes);
    assert!(valid <= bytes.len());
    if let Tail::Torn { offset, .. } = tail {
        crash_shaped(bytes, offset);
        later_flush(bytes, offset, 0);
    }
    use crate::vfs::{MemVfs, Vfs};
    let root = Path::new("/db");
    let vfs = MemVfs::default();
    let owner = root.join("wal").join("shard-0");
    vfs.create_dir_all(&owner).unwrap();
    let half = bytes.len() / 2;
    vfs.write_new(&segment_path(&root.join("wal"), "shard-0", 1), bytes).unwrap();
    let _ = crate::recovery::recover(&vfs, root, crate::config::Recovery::Strict);
    vfs.write_new(&segment_path(&root.join("wal"), "shard-0", 1), &bytes[..half]).unwrap();
    vfs.write_new(&segment_path(&root.join("wal"), "shard-0", 2), &bytes[half..]).unwrap();
    let _ = crate::recovery::recover(&vfs, root, crate::config::Recovery::Truncate);
}

/// Where an owner's log stands at open, so a new writer continues its chains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// The lsn of the owner's last record on disk (0: none).
    pub prev_lsn: u64,
    /// The first lsn of the owner's last segment on disk (0: none).
    pub prev_segment: u64,
}

/// The format side of an owner's writer: chains, flush flags, segment headers, and the
/// page arithmetic of direct I/O (each flush rewrites the last partial page, then pads
/// with zeros). The I/O itself is the caller's: glommio's `DmaFile` on the shards, the
/// simulated file system in tests.
#[derive(Debug)]
pub struct LogWriter {
    resume: Resume,
    current: Option<Segment>,
    /// A write failed: what was on disk is unknown, so nothing more is written.
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Segment {
    /// File offset of `tail[0]`: always a page boundary.
    page_pos: u64,
    /// The written bytes of the last, partial page (fewer than `PAGE`).
    tail: Vec<u8>,
}

/// One flush: its frames, and the segment it opens (named by its first lsn), if any.
#[derive(Debug)]
pub struct Flush {
    pub frames: Vec<u8>,
    pub opens: Option<u64>,
    last_lsn: u64,
}

impl LogWriter {
    pub fn new(resume: Resume) -> LogWriter {
        LogWriter { resume, current: None, poisoned: None }
    }

    /// Encodes one flush's records (lsns ascending, each with the acknowledged range it
    /// was sent with); a segment header first when the flush opens a segment.
    pub fn encode<'a>(&mut self, records: impl IntoIterator<Item = (&'a Record, Claim)>) -> Result<Flush> {
        if let Some(why) = &self.poisoned {
            return Err(Error::internal(format!("an earlier WAL write failed ({why}); reopen the database")));
        }
        let mut frames = Vec::new();
        let mut opens = None;
        let mut prev = self.resume.prev_lsn;
        for (record, claim) in records {
            let full = self.current.as_ref().is_none_or(|s| s.page_pos + s.tail.len() as u64 >= SEGMENT_BYTES);
            let first = frames.is_empty();
            if first && full {
                opens = Some(record.lsn());
                encode_segment_header(record.lsn(), self.resume.prev_segment, &mut frames);
            }
            let meta = Meta { prev, start: claim.start, acked: claim.acked };
            encode_frame(record, Some(meta), first && opens.is_none(), &mut frames)?;
            prev = record.lsn();
        }
        Ok(Flush { frames, opens, last_lsn: prev })
    }

    /// Where the flush goes (a page-aligned file offset) and how many bytes it writes
    /// (whole pages).
    pub fn extent(&self, flush: &Flush) -> (u64, usize) {
        let (page_pos, tail) = self.position(flush);
        (page_pos, (tail + flush.frames.len()).next_multiple_of(PAGE))
    }

    fn position(&self, flush: &Flush) -> (u64, usize) {
        match (&self.current, flush.opens) {
            (Some(s), None) => (s.page_pos, s.tail.len()),
            _ => (0, 0),
        }
    }

    /// Fills `dst` (`extent`'s length) with the rewritten partial page, the frames, zeros.
    pub fn fill(&self, flush: &Flush, dst: &mut [u8]) {
        let tail: &[u8] = match (&self.current, flush.opens) {
            (Some(s), None) => &s.tail,
            _ => &[],
        };
        let total = tail.len() + flush.frames.len();
        dst[..tail.len()].copy_from_slice(tail);
        dst[tail.len()..total].copy_from_slice(&flush.frames);
        dst[total..].fill(0);
    }

    /// The flush is durable: the chains move on.
    pub fn written(&mut self, flush: &Flush) {
        let (page_pos, tail) = self.position(flush);
        let total = tail + flush.frames.len();
        let whole = total / PAGE * PAGE;
        let mut bytes = match (&self.current, flush.opens) {
            (Some(s), None) => s.tail.clone(),
            _ => Vec::new(),
        };
        bytes.extend_from_slice(&flush.frames);
        if let Some(first) = flush.opens {
            self.resume.prev_segment = first;
        }
        self.current = Some(Segment { page_pos: page_pos + whole as u64, tail: bytes[whole..].to_vec() });
        self.resume.prev_lsn = flush.last_lsn.max(self.resume.prev_lsn);
    }

    /// The flush failed: what reached the disk is unknown, so this owner writes no more.
    pub fn failed(&mut self, why: &str) {
        self.poisoned = Some(why.to_string());
    }

    /// Ends the current segment: the next flush opens a new one.
    pub fn roll(&mut self) {
        self.current = None;
    }

    pub fn resume(&self) -> Resume {
        self.resume
    }

    /// The first lsn (the name) of the segment `flush` goes to.
    pub fn segment_of(&self, flush: &Flush) -> u64 {
        flush.opens.unwrap_or(self.resume.prev_segment)
    }
}

/// The acknowledged frontier: lsns taken but not yet acknowledged. Every record is sent
/// with `claim()`: all lsns from this process's first up to the frontier are durable
/// everywhere, which recovery checks. An lsn whose work failed is never released, so the
/// frontier never claims it.
#[derive(Debug)]
pub struct Frontier {
    start: u64,
    state: parking_lot::Mutex<(std::collections::BTreeSet<u64>, u64)>,
}

impl Frontier {
    /// `start`: the first lsn this process takes.
    pub fn new(start: u64) -> Frontier {
        Frontier { start, state: parking_lot::Mutex::new((Default::default(), start)) }
    }

    /// `lsn` was taken (in ascending order).
    pub fn begin(&self, lsn: u64) {
        let mut state = self.state.lock();
        state.0.insert(lsn);
        state.1 = state.1.max(lsn + 1);
    }

    /// `lsn`'s work is acknowledged: every record of it is durable.
    pub fn done(&self, lsn: u64) {
        self.state.lock().0.remove(&lsn);
    }

    pub fn claim(&self) -> Claim {
        let state = self.state.lock();
        Claim { start: self.start, acked: state.0.first().copied().unwrap_or(state.1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use arrow::array::{ArrayRef, Int64Array, StringArray};

    fn batch(ids: std::ops::Range<i64>) -> RecordBatch {
        let n = ids.end - ids.start;
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from_iter_values(ids)) as ArrayRef),
            ("sym", Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("s{i}")))) as ArrayRef),
        ])
        .unwrap()
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::Ddl { lsn: 1, sql: "CREATE SOURCE t (id BIGINT, sym VARCHAR)".into() },
            Record::Append { lsn: 2, parts: 1, source: "t".into(), batches: vec![batch(0..3), batch(3..5)] },
            Record::Watermark { lsn: 3, source: "t".into(), watermark: -42 },
            Record::Append { lsn: 4, parts: 2, source: "t".into(), batches: vec![batch(5..6)] },
        ]
    }

    fn encoded(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            encode(r, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn records_round_trip_and_padding_is_a_clean_end() {
        let records = sample();
        let mut bytes = encoded(&records);
        let len = bytes.len();
        bytes.resize(len.next_multiple_of(PAGE), 0);
        let (back, valid, tail) = decode_all(&bytes);
        assert_eq!(back, records);
        assert_eq!(valid, len);
        assert_eq!(tail, Tail::Clean);
    }

    /// Deterministic fault injection: every cut (short write), every flipped bit in the
    /// last frame, and a zeroed page (a write the device never did) each keep exactly the
    /// frames before the damage.
    #[test]
    fn short_writes_flipped_bits_and_torn_pages_keep_only_whole_frames() {
        let records = sample();
        let bytes = encoded(&records);
        let ends: Vec<usize> = (1..=records.len()).map(|n| encoded(&records[..n]).len()).collect();
        let whole_before = |at: usize| ends.iter().filter(|&&e| e <= at).count();
        for cut in 0..bytes.len() {
            let (back, valid, tail) = decode_all(&bytes[..cut]);
            assert_eq!(back.len(), whole_before(cut), "cut at {cut}");
            assert_eq!(back[..], records[..back.len()]);
            assert!(valid <= cut);
            assert_eq!(tail == Tail::Clean, ends.contains(&cut) || cut == 0, "cut at {cut}");
        }
        let last = ends[ends.len() - 2];
        for bit in (last * 8)..(bytes.len() * 8) {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let (back, valid, tail) = decode_all(&damaged);
            assert_eq!(back[..], records[..records.len() - 1], "bit {bit}");
            assert_eq!(valid, last);
            assert!(matches!(tail, Tail::Torn { .. }), "bit {bit}");
        }
        let mut paged = bytes.clone();
        paged.resize(3 * PAGE, 0);
        let mut torn = paged.clone();
        torn[ends[0] + 10..].fill(0);
        let (back, _, tail) = decode_all(&torn);
        assert_eq!(back[..], records[..1]);
        assert!(matches!(tail, Tail::Torn { .. }));
    }

    /// Random frames, random damage, many seeds: decoding never panics and never returns
    /// a record that was not written.
    #[test]
    fn fuzzed_damage_never_yields_a_foreign_record() {
        let mut rng = crate::sim::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next();
        for round in 0..300 {
            let n = 1 + next() as usize % 6;
            let records: Vec<Record> = (0..n as u64)
                .map(|i| match next() % 3 {
                    0 => Record::Ddl { lsn: i, sql: "x".repeat(next() as usize % 50) },
                    1 => Record::Watermark { lsn: i, source: "s".into(), watermark: next() as i64 },
                    _ => Record::Append { lsn: i, parts: 1, source: "t".into(), batches: vec![batch(0..(1 + next() as i64 % 20))] },
                })
                .collect();
            let mut bytes = encoded(&records);
            for _ in 0..(next() % 4) {
                if bytes.is_empty() {
                    break;
                }
                let at = next() as usize % bytes.len();
                match next() % 3 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.truncate(at),
                    _ => bytes[at..].iter_mut().take(PAGE).for_each(|b| *b = 0),
                }
            }
            let (back, valid, _) = decode_all(&bytes);
            assert!(valid <= bytes.len(), "round {round}");
            assert_eq!(back[..], records[..back.len()], "round {round}");
        }
    }

    /// The fuzz target's entry point over random bytes and over mutated real segments
    /// (written by `LogWriter`, then cut, flipped, zeroed): never a panic.
    #[test]
    fn fuzz_segment_never_panics() {
        let mut rng = crate::sim::Rng::new(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next();
        let mut writer = LogWriter::new(Resume::default());
        let records = sample();
        let flush = writer.encode(records.iter().map(|r| (r, Claim { start: 1, acked: r.lsn() }))).unwrap();
        let mut segment = vec![0; writer.extent(&flush).1];
        writer.fill(&flush, &mut segment);
        fuzz_segment(&segment);
        for round in 0..400 {
            let mut bytes = if round % 4 == 0 {
                (0..next() % 600).map(|_| next() as u8).collect()
            } else {
                segment.clone()
            };
            for _ in 0..1 + next() % 3 {
                if bytes.is_empty() {
                    break;
                }
                let at = next() as usize % bytes.len();
                match next() % 4 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.truncate(at),
                    2 => bytes[at..].iter_mut().take(next() as usize % 700).for_each(|b| *b = 0),
                    _ => bytes[at..].iter_mut().take(4).for_each(|b| *b = next() as u8),
                }
            }
            fuzz_segment(&bytes);
        }
    }

    #[test]
    fn merge_keeps_complete_inserts_in_lsn_order() {
        let a = |lsn, parts| Record::Append { lsn, parts, source: "t".into(), batches: vec![batch(0..1)] };
        let (groups, incomplete) = merge(vec![a(5, 2), a(2, 1), a(5, 2), a(7, 2), Record::Ddl { lsn: 1, sql: "x".into() }]);
        let lsns: Vec<u64> = groups.iter().map(|g| g[0].lsn()).collect();
        assert_eq!(lsns, vec![1, 2, 5]);
        assert_eq!(groups[2].len(), 2);
        assert_eq!(incomplete, 1);
    }
}
