//! The write-ahead log's on-disk format: records, frames, segment files, and reading them
//! back with torn-tail detection. Pure and synchronous; the shards write segments with
//! glommio's direct I/O (`laminardb_shards::wal`), recovery reads them with `std::fs`.
//!
//! ```text
//! segment file  <dir>/<owner>/<first lsn, 20 digits>.wal
//!   frame*      len: u32 LE (> 0) │ crc32(body): u32 LE │ body: len bytes
//!   zero bytes  padding up to the 4 KiB page (a frame length of 0 ends the segment)
//! body          lsn: u64 LE │ parts: u16 LE │ kind: u8 │ payload
//!   APPEND  1   source length: u32 LE │ source │ Arrow IPC stream of the batches
//!   DDL     2   SQL text
//!   MARK    3   source length: u32 LE │ source │ watermark: i64 LE
//! ```
//!
//! Every record carries the coordinator's log sequence number (`lsn`): one per accepted
//! command, so records of all owners merge back into the order the coordinator accepted
//! them. An insert split over several shards writes one `APPEND` on each shard that got
//! rows, all with the same `lsn` and `parts` = how many there are; recovery replays an
//! insert only if all its parts are on disk (the caller was never answered otherwise).

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

/// Appends `record` as one frame to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    match record {
        Record::Append { lsn, parts, source, batches } => {
            head(out, *lsn, *parts, KIND_APPEND);
            name(out, source);
            let schema = batches.first().map(|b| b.schema()).ok_or_else(|| Error::internal("an empty WAL append"))?;
            crate::ipc::write(&schema, batches, &mut *out)?;
        }
        Record::Ddl { lsn, sql } => {
            head(out, *lsn, 1, KIND_DDL);
            out.extend_from_slice(sql.as_bytes());
        }
        Record::Watermark { lsn, source, watermark } => {
            head(out, *lsn, 1, KIND_MARK);
            name(out, source);
            out.extend_from_slice(&watermark.to_le_bytes());
        }
    }
    let body = &out[start + FRAME_HEADER..];
    let (len, crc) = (body.len() as u32, crc32fast::hash(body));
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
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

/// Every valid frame of `bytes`, in order, and how the bytes ended; the second value is
/// the byte length of the valid prefix.
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize, Tail) {
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        if at + FRAME_HEADER > bytes.len() {
            // Fewer than 8 bytes left: a clean end only if they are padding.
            return if bytes[at..].iter().all(|&b| b == 0) {
                (records, at, Tail::Clean)
            } else {
                (records, at, Tail::Torn { offset: at, why: "a frame header cut short".into() })
            };
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        if len == 0 {
            return if crc == 0 && bytes[at..].iter().all(|&b| b == 0) {
                (records, at, Tail::Clean)
            } else {
                (records, at, Tail::Torn { offset: at, why: "bytes after the end marker".into() })
            };
        }
        let end = at + FRAME_HEADER + len;
        if len > FRAME_MAX || end > bytes.len() {
            return (records, at, Tail::Torn { offset: at, why: format!("a {len}-byte frame cut short") });
        }
        let body = &bytes[at + FRAME_HEADER..end];
        if crc32fast::hash(body) != crc {
            return (records, at, Tail::Torn { offset: at, why: "a checksum mismatch".into() });
        }
        match decode_body(body) {
            Ok(record) => records.push(record),
            Err(e) => return (records, at, Tail::Torn { offset: at, why: format!("an undecodable record: {e}") }),
        }
        at = end;
    }
}

fn decode_body(body: &[u8]) -> Result<Record> {
    let bad = || Error::internal("a WAL record shorter than its header");
    let fixed = body.get(..11).ok_or_else(bad)?;
    let lsn = u64::from_le_bytes(fixed[..8].try_into().unwrap());
    let parts = u16::from_le_bytes(fixed[8..10].try_into().unwrap());
    let rest = &body[11..];
    let name_of = |rest: &[u8]| -> Result<(String, usize)> {
        let n = u32::from_le_bytes(rest.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
        let text = rest.get(4..4 + n).ok_or_else(bad)?;
        let text = std::str::from_utf8(text).map_err(|e| Error::internal(e.to_string()))?;
        Ok((text.to_string(), 4 + n))
    };
    match fixed[10] {
        KIND_APPEND => {
            let (source, used) = name_of(rest)?;
            Ok(Record::Append { lsn, parts, source, batches: crate::ipc::read(&rest[used..])? })
        }
        KIND_DDL => {
            let sql = std::str::from_utf8(rest).map_err(|e| Error::internal(e.to_string()))?;
            Ok(Record::Ddl { lsn, sql: sql.to_string() })
        }
        KIND_MARK => {
            let (source, used) = name_of(rest)?;
            let mark = rest.get(used..used + 8).ok_or_else(bad)?;
            Ok(Record::Watermark { lsn, source, watermark: i64::from_le_bytes(mark.try_into().unwrap()) })
        }
        other => Err(Error::internal(format!("unknown WAL record kind {other}"))),
    }
}

/// `<dir>/<owner>/<first lsn>.wal`.
pub fn segment_path(dir: &Path, owner: &str, first_lsn: u64) -> PathBuf {
    dir.join(owner).join(format!("{first_lsn:020}.wal"))
}

/// One owner's segment files, oldest first, with the first lsn each was opened at.
pub fn segments(owner_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(owner_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_error(owner_dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io_error(owner_dir, e))?.path();
        let lsn = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(lsn) = lsn {
            out.push((lsn, path));
        }
    }
    out.sort();
    Ok(out)
}

/// What reading one owner's log found.
#[derive(Debug, Default)]
pub struct OwnerLog {
    pub records: Vec<Record>,
    /// Torn or corrupt tails cut off (one line each, for the log and the metric).
    pub torn: Vec<String>,
}

/// Reads every segment of `owner_dir`, oldest first. A torn or corrupt frame ends the
/// owner's log: the segment is truncated there and later segments are moved aside
/// (`*.wal.corrupt`), so the same damage is neither served nor reported twice.
pub fn recover_owner(owner_dir: &Path) -> Result<OwnerLog> {
    let mut log = OwnerLog::default();
    let mut damaged = false;
    for (_, path) in segments(owner_dir)? {
        if damaged {
            let aside = path.with_extension("wal.corrupt");
            std::fs::rename(&path, &aside).map_err(|e| io_error(&path, e))?;
            log.torn.push(format!("{}: after a damaged segment, moved aside", path.display()));
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
        let (records, valid, tail) = decode_all(&bytes);
        log.records.extend(records);
        if let Tail::Torn { offset, why } = tail {
            log.torn.push(format!("{}: {why} at byte {offset}; truncated", path.display()));
            if valid == 0 {
                // Nothing valid: a later segment could be named like this one.
                std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
            } else {
                let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| io_error(&path, e))?;
                file.set_len(valid as u64).map_err(|e| io_error(&path, e))?;
                file.sync_all().map_err(|e| io_error(&path, e))?;
            }
            damaged = true;
        }
    }
    Ok(log)
}

pub fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{}: {e}", path.display()))
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
    /// Torn or corrupt tails cut off, one line each.
    pub torn_tails: Vec<String>,
    /// Records that failed to replay (their error), e.g. rows for a source dropped since.
    pub errors: Vec<String>,
    pub millis: f64,
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
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
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

    #[test]
    fn merge_keeps_complete_inserts_in_lsn_order() {
        let a = |lsn, parts| Record::Append { lsn, parts, source: "t".into(), batches: vec![batch(0..1)] };
        let (groups, incomplete) = merge(vec![a(5, 2), a(2, 1), a(5, 2), a(7, 2), Record::Ddl { lsn: 1, sql: "x".into() }]);
        let lsns: Vec<u64> = groups.iter().map(|g| g[0].lsn()).collect();
        assert_eq!(lsns, vec![1, 2, 5]);
        assert_eq!(groups[2].len(), 2);
        assert_eq!(incomplete, 1);
    }

    #[test]
    fn a_torn_segment_is_truncated_and_later_segments_set_aside() {
        let dir = std::env::temp_dir().join(format!("laminardb-wal-test-{}", std::process::id()));
        let owner = dir.join("shard-0");
        std::fs::create_dir_all(&owner).unwrap();
        let records = sample();
        let mut first = encoded(&records[..2]);
        let good = first.len();
        first.extend_from_slice(&[7, 0, 0, 0, 1, 2]);
        std::fs::write(segment_path(&dir, "shard-0", 1), &first).unwrap();
        std::fs::write(segment_path(&dir, "shard-0", 3), encoded(&records[2..])).unwrap();
        let log = recover_owner(&owner).unwrap();
        assert_eq!(log.records, records[..2]);
        assert_eq!(log.torn.len(), 2, "{:?}", log.torn);
        assert_eq!(std::fs::metadata(segment_path(&dir, "shard-0", 1)).unwrap().len(), good as u64);
        let again = recover_owner(&owner).unwrap();
        assert_eq!(again.records, records[..2]);
        assert!(again.torn.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
