//! Reading a storage directory back at open: the checkpoint's manifest, every owner's WAL
//! segments, and the decision between a torn tail and damage.
//!
//! A crash leaves only one kind of harm: the last, unfinished write of an owner's newest
//! segment, torn at sector granularity (`wal::crash_shaped`). That tail is cut, counted
//! and logged. Anything else is damage to data that was acknowledged, or may have been:
//! a bad frame before a later flush or in an older segment, a changed byte in the last
//! frame, a segment missing from an owner's chain (segment headers, record `prev`), a
//! record missing that a later record's acknowledged range proves was durable, a
//! `MANIFEST` missing while the WAL or `data/` show a checkpoint was taken, or damaged.
//! In `Strict` mode (the default) damage refuses the open with a `CheckpointError` naming
//! the file and changes nothing on disk; `Truncate` cuts every owner's log at the first
//! damaged lsn (a point-in-time prefix), keeps damaged segments as `*.wal.corrupt`, and
//! reports what was lost. A damaged checkpoint is refused in both modes: the WAL before it
//! is gone, so nothing consistent can be rebuilt without it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::checkpoint::{self, Manifest};
use crate::config::Recovery;
use crate::vfs::Vfs;
use crate::wal::{self, Entry, Meta, Record, RecoveryReport, Resume, Tail, SECTOR};
use crate::{Error, Result};

/// The storage directory as read at open.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The latest checkpoint; only WAL records from its lsn on are replayed after it.
    pub manifest: Option<Manifest>,
    /// Complete record groups from the checkpoint's lsn on, in lsn order.
    pub groups: Vec<Vec<Record>>,
    pub next_lsn: u64,
    pub report: RecoveryReport,
    /// Per owner, where its log stands on disk now, for its next writer.
    pub resume: HashMap<String, Resume>,
    /// Where an owner with no log on disk starts.
    pub resume_default: Resume,
    /// Damage was cut (`Truncate`): a checkpoint taken right after replay puts it behind
    /// the database, so the next open does not find it again.
    pub checkpoint_now: bool,
}

/// Where an owner's log stops being usable.
#[derive(Debug)]
struct Cut {
    /// The segment's first lsn (its name) and path.
    first: u64,
    path: PathBuf,
    /// Bytes of `path` still valid.
    keep: usize,
    /// The owner's later segments.
    later: Vec<PathBuf>,
    why: String,
    /// What a crash leaves (else damage).
    torn: bool,
}

#[derive(Debug)]
struct OwnerScan {
    name: String,
    dir: PathBuf,
    records: Vec<(Record, Option<Meta>)>,
    /// The header of the earliest segment read: the segment before it (0: none ever);
    /// `None` without a header (a directory from before headers existed).
    first_prev_segment: Option<u64>,
    /// The last valid record's lsn (0: none).
    last_lsn: u64,
    /// First lsns of the segments read, oldest first, and of those skipped (covered by
    /// the checkpoint, awaiting deletion).
    read: Vec<u64>,
    skipped: Vec<u64>,
    cut: Option<Cut>,
    /// The damaged segment's bytes, kept aside before a cut.
    cut_bytes: Vec<u8>,
}

/// A damaged place, and the lsn from which the log is lost because of it.
struct Damage {
    file: PathBuf,
    why: String,
    from_lsn: u64,
}

/// Reads `root`'s manifest and WAL, decides what is torn and what is damaged, and (unless
/// it refuses) applies the cuts. Nothing on disk changes when it refuses.
pub fn recover(vfs: &dyn Vfs, root: &Path, mode: Recovery) -> Result<Recovered> {
    let manifest = checkpoint::read_manifest_in(vfs, root).map_err(|e| refuse_checkpoint(mode, &e.message))?;
    let m_lsn = manifest.as_ref().map_or(0, |m| m.lsn);
    if let Some(m) = &manifest {
        for file in checkpoint::named_files(m) {
            let path = root.join(file);
            if !vfs.exists(&path) {
                return Err(refuse_checkpoint(mode, &format!("{}: missing; the MANIFEST names it", path.display())));
            }
        }
    }
    let wal_dir = root.join("wal");
    let mut owners: Vec<PathBuf> = match vfs.list(&wal_dir) {
        Ok(entries) => entries.into_iter().filter(|p| vfs.is_dir(p)).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::checkpoint(format!("{}: {e}", wal_dir.display()))),
    };
    owners.sort();
    let mut scans = Vec::with_capacity(owners.len());
    for dir in owners {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let mut segments = Vec::new();
        let mut skipped = Vec::new();
        for (first, path) in wal::segments_in(vfs, &dir)? {
            if first < m_lsn {
                // Covered by the checkpoint: its records are not replayed.
                skipped.push(first);
                continue;
            }
            let bytes = vfs.read(&path).map_err(|e| Error::checkpoint(format!("{}: {e}", path.display())))?;
            segments.push((first, path, bytes));
        }
        scans.push(scan_owner(name, dir, segments, skipped, m_lsn));
    }

    let mut damages: Vec<Damage> = Vec::new();
    let mut fatal: Vec<String> = Vec::new();
    for scan in &scans {
        if let Some(cut) = scan.cut.as_ref().filter(|c| !c.torn) {
            damages.push(Damage { file: cut.path.clone(), why: cut.why.clone(), from_lsn: (scan.last_lsn + 1).max(m_lsn) });
        }
    }
    if manifest.is_none() {
        missing_manifest_checks(vfs, root, &scans, &mut fatal);
    }
    if !fatal.is_empty() {
        return Err(refuse_checkpoint(mode, &fatal.join("; ")));
    }
    acknowledged_checks(&mut scans, m_lsn, &mut damages);
    if manifest.is_none() && !damages.is_empty() {
        // The checkpoint files were let by only because the WAL looked whole from its
        // start; it is not (the checkpoint's cleanup may have been cut short by a crash).
        if let Some(file) = checkpoint_file(vfs, root) {
            let first = &damages[0];
            return Err(refuse_checkpoint(
                mode,
                &format!(
                    "{}: missing, yet data/ holds checkpoint files ({}), and the WAL that would stand in for it is \
                     not whole ({}: {})",
                    checkpoint::manifest_path(root).display(),
                    file.display(),
                    first.file.display(),
                    first.why
                ),
            ));
        }
    }

    if !damages.is_empty() && mode == Recovery::Strict {
        let lines: Vec<String> = damages.iter().take(4).map(|d| format!("{}: {}", d.file.display(), d.why)).collect();
        return Err(Error::checkpoint(format!(
            "the storage directory {} is damaged, so it was not opened: {}. Opening it would lose acknowledged \
             data silently: restore the damaged files, or open with LaminarConfig(recovery='truncate') to cut the \
             log at the damage (what is lost is reported)",
            root.display(),
            lines.join("; ")
        )));
    }

    // Decided: apply the cuts.
    let mut report = RecoveryReport::default();
    let cut_lsn = damages.iter().map(|d| d.from_lsn).min();
    let mut resume = HashMap::new();
    // An owner without a segment left after a checkpoint must still say its log had a
    // past (a name below the checkpoint's lsn, as a deleted segment's would be): else a
    // MANIFEST lost later would look like a log complete from its start.
    let resume_default = Resume { prev_lsn: 0, prev_segment: if m_lsn > 1 { m_lsn - 1 } else { 0 } };
    let mut next_lsn = m_lsn.max(1);
    let mut records = Vec::new();
    for scan in scans {
        for &first in scan.read.iter().chain(&scan.skipped) {
            next_lsn = next_lsn.max(first + 1);
        }
        let mut last_segment = scan.skipped.iter().chain(&scan.read).copied().max().unwrap_or(0);
        let mut prev_lsn = scan.last_lsn;
        if scan.read.is_empty() {
            if let Some(&last) = scan.skipped.last() {
                // Only segments the checkpoint covers (awaiting deletion): the chain goes on
                // from their last record, so it still holds if the MANIFEST is lost later.
                let bytes = vfs.read(&wal::segment_path(&wal_dir, &scan.name, last)).unwrap_or_default();
                prev_lsn = wal::decode_all(&bytes).0.last().map_or(0, Record::lsn);
            }
        }

        if let Some(cut) = &scan.cut {
            apply_cut(vfs, cut, &scan.cut_bytes)?;
            if cut.torn {
                report.torn_tails.push(format!("{}: {} at byte {}; truncated", cut.path.display(), cut.why, cut.keep));
            }
            for later in &cut.later {
                report.torn_tails.extend(cut.torn.then(|| format!("{}: after a torn segment, moved aside", later.display())));
            }
            // The last segment left on disk.
            let remaining = if cut.keep > 0 { Some(cut.first) } else { scan.read.iter().copied().filter(|&f| f < cut.first).max() };
            last_segment = remaining.or_else(|| scan.skipped.iter().copied().max()).unwrap_or(0);
        }
        if last_segment == 0 {
            last_segment = resume_default.prev_segment;
        }
        resume.insert(scan.name.clone(), Resume { prev_lsn, prev_segment: last_segment });
        for (record, _) in scan.records {
            next_lsn = next_lsn.max(record.lsn() + 1);
            if record.lsn() < m_lsn {
                continue;
            }
            if cut_lsn.is_some_and(|cut| record.lsn() >= cut) {
                if let Record::Append { batches, .. } = &record {
                    report.dropped_rows += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
                }
                continue;
            }
            records.push(record);
        }
    }
    for d in &damages {
        report.damage.push(format!(
            "{}: {}; the log was cut at lsn {} ({} rows of intact later records dropped with it)",
            d.file.display(),
            d.why,
            cut_lsn.unwrap_or(d.from_lsn),
            report.dropped_rows
        ));
    }
    // Inserts with some but not all parts on disk were never acknowledged: left out.
    let (groups, _incomplete) = wal::merge(records);
    Ok(Recovered { manifest, groups, next_lsn, report, resume, resume_default, checkpoint_now: cut_lsn.is_some() })
}

fn refuse_checkpoint(mode: Recovery, why: &str) -> Error {
    let hint = match mode {
        Recovery::Strict => "",
        Recovery::Truncate => " (recovery='truncate' cannot cut around a checkpoint: the WAL it replaced is gone)",
    };
    Error::checkpoint(format!(
        "the checkpoint is damaged, so the database was not opened: {why}. Restore the file from a copy{hint}"
    ))
}

/// Reads one owner's segments in order and finds where its log stops being usable.
fn scan_owner(name: String, dir: PathBuf, segments: Vec<(u64, PathBuf, Vec<u8>)>, skipped: Vec<u64>, m_lsn: u64) -> OwnerScan {
    let mut scan = OwnerScan {
        name,
        dir,
        records: Vec::new(),
        first_prev_segment: None,
        last_lsn: 0,
        read: segments.iter().map(|s| s.0).collect(),
        skipped,
        cut: None,
        cut_bytes: Vec::new(),
    };
    let count = segments.len();
    let mut segments = segments.into_iter().enumerate().peekable();
    while let Some((i, (first, path, bytes))) = segments.next() {
        let newest = i + 1 == count;
        let (frames, valid, tail) = wal::decode_frames(&bytes);
        // (bytes to keep, why, torn)
        let mut problem: Option<(usize, String, bool)> = None;
        let mut records_here = 0;
        let mut has_header = false;
        for (j, frame) in frames.into_iter().enumerate() {
            match frame.entry {
                Entry::Header { first_lsn, prev_segment } => {
                    has_header = true;
                    if j != 0 {
                        problem = Some((frame.offset, "a segment header inside the segment".into(), false));
                    } else if first_lsn != first {
                        problem = Some((0, format!("its header says it begins at lsn {first_lsn}"), false));
                    } else if i > 0 && prev_segment != scan.read[i - 1] {
                        problem = Some((0, format!("the segment before it, {prev_segment:020}.wal, is missing"), false));
                    } else if i == 0 {
                        if prev_segment != 0 && prev_segment >= m_lsn && m_lsn > 0 {
                            problem = Some((0, format!("the segment before it, {prev_segment:020}.wal, is missing"), false));
                        }
                        scan.first_prev_segment = Some(prev_segment);
                    }
                }
                Entry::Record { record, meta, .. } => {
                    let lsn = record.lsn();
                    let trimmed = scan.first_prev_segment != Some(0);
                    if lsn <= scan.last_lsn {
                        problem = Some((frame.offset, format!("lsn {lsn} follows lsn {}", scan.last_lsn), false));
                    } else if records_here == 0 && lsn != first {
                        problem = Some((frame.offset, format!("its first record has lsn {lsn}, not {first} as its name says"), false));
                    } else if let Some(m) = meta.filter(|m| !(m.prev == scan.last_lsn || (scan.last_lsn == 0 && trimmed))) {
                        let why = if records_here == 0 {
                            format!("records after lsn {} are missing before it (a segment before it is missing)", m.prev)
                        } else {
                            format!("records between lsn {} and lsn {lsn} are missing", m.prev)
                        };
                        problem = Some((frame.offset, why, false));
                    } else {
                        scan.records.push((record, meta));
                        scan.last_lsn = lsn;
                        records_here += 1;
                    }
                }
            }
            if problem.is_some() {
                break;
            }
        }
        if problem.is_none() {
            problem = match tail {
                Tail::Torn { offset, why } => {
                    let later = wal::later_flush(&bytes, offset, scan.last_lsn).is_some();
                    let torn = newest && !later && wal::crash_shaped(&bytes, offset);
                    let why = if torn {
                        why
                    } else if !newest {
                        format!("{why} at byte {offset}, in a segment older than the newest")
                    } else if later {
                        format!("{why} at byte {offset}, before a later write")
                    } else {
                        format!("{why} at byte {offset}, which is not what a crash leaves (the bytes changed after they were written)")
                    };
                    Some((offset, why, torn))
                }
                // Writers (and recovery's own cuts) leave whole pages; a directory from before
                // segment headers may hold segments its recovery cut anywhere.
                Tail::Clean if has_header && bytes.len() % SECTOR != 0 && bytes.len() - valid < 8 => {
                    Some((valid, format!("the file is {} bytes long, not whole sectors: it was cut", bytes.len()), false))
                }
                Tail::Clean if records_here == 0 && newest => Some((0, "no record in it (made just before a crash)".into(), true)),
                Tail::Clean if records_here == 0 => Some((0, "it holds no records".into(), false)),
                Tail::Clean => None,
            };
        }
        if let Some((keep, why, torn)) = problem {
            // A segment left with a header alone would later read as an emptied one.
            let keep = if records_here == 0 { 0 } else { keep };
            let later = segments.by_ref().map(|(_, (_, p, _))| p).collect();
            scan.cut = Some(Cut { first, path, keep, later, why, torn });
            scan.cut_bytes = bytes;
            break;
        }
    }
    scan
}

/// The MANIFEST is missing: that is damage when a checkpoint had been taken, i.e. when
/// some owner's log no longer starts at its first segment (only a checkpoint deletes
/// segments) or `data/` holds checkpoint files that the WAL cannot stand in for.
fn missing_manifest_checks(vfs: &dyn Vfs, root: &Path, scans: &[OwnerScan], fatal: &mut Vec<String>) {
    let manifest = checkpoint::manifest_path(root);
    for scan in scans {
        if let Some(p) = scan.first_prev_segment.filter(|&p| p != 0) {
            fatal.push(format!(
                "{}: missing, yet {} begins after segment {p:020}.wal, which only a checkpoint deletes",
                manifest.display(),
                scan.dir.display()
            ));
            return;
        }
    }
    // (An owner with neither header nor record read holds only what a crash left of its
    // first write: it says nothing either way.)
    let wal_complete = scans.iter().any(|s| s.first_prev_segment == Some(0))
        && scans.iter().all(|s| s.first_prev_segment == Some(0) || (s.first_prev_segment.is_none() && s.records.is_empty()));
    if wal_complete {
        // Every record since the first is in the WAL: files of an unpublished (or lost)
        // checkpoint add nothing, and the next checkpoint removes them.
        return;
    }
    if let Some(file) = checkpoint_file(vfs, root) {
        // The owners whose logs do not show they are whole from their start.
        let unsure: Vec<String> = scans
            .iter()
            .filter(|s| s.first_prev_segment != Some(0))
            .map(|s| s.cut.as_ref().map_or_else(|| s.dir.display().to_string(), |c| c.path.display().to_string()))
            .collect();
        let unsure = if unsure.is_empty() { String::new() } else { format!(", and the WAL does not show it is whole: {}", unsure.join(", ")) };
        fatal.push(format!("{}: missing, yet data/ holds checkpoint files ({}){unsure}", manifest.display(), file.display()));
    }
}

/// A file in `data/` that only a checkpoint with rows writes (a database that never
/// logged anything writes only `state-1.bin` files at its first checkpoint).
fn checkpoint_file(vfs: &dyn Vfs, root: &Path) -> Option<PathBuf> {
    let files: Vec<PathBuf> = vfs.list(&root.join("data")).unwrap_or_default().iter().flat_map(|d| vfs.list(d).unwrap_or_default()).collect();
    files.into_iter().find(|p| p.file_name().and_then(|n| n.to_str()).is_none_or(|n| n != "state-1.bin"))
}

/// Every lsn a record says was acknowledged must be whole on disk: every part of an
/// insert, every control record. A loss is damage to the owner whose log ends before it.
fn acknowledged_checks(scans: &mut [OwnerScan], m_lsn: u64, damages: &mut Vec<Damage>) {
    let mut groups: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    let mut claims: BTreeMap<u64, u64> = BTreeMap::new();
    for scan in scans.iter() {
        for (record, meta) in &scan.records {
            let parts = match record {
                Record::Append { parts, .. } => *parts as usize,
                _ => 1,
            };
            let entry = groups.entry(record.lsn()).or_insert((0, parts));
            entry.0 += 1;
            if let Some(m) = meta {
                // A record cannot claim itself or anything after it.
                let acked = m.acked.min(record.lsn());
                let claim = claims.entry(m.start).or_insert(0);
                *claim = (*claim).max(acked);
            }
        }
    }
    let mut lost: Option<(u64, String)> = None;
    for (&start, &acked) in &claims {
        for lsn in start.max(m_lsn).max(1)..acked {
            let why = match groups.get(&lsn) {
                None => format!("lsn {lsn} was acknowledged, but no record of it remains"),
                Some(&(have, want)) if have < want => {
                    format!("lsn {lsn} was acknowledged, but only {have} of its {want} parts remain")
                }
                _ => continue,
            };
            if lost.as_ref().is_none_or(|(l, _)| lsn < *l) {
                lost = Some((lsn, why));
            }
            break;
        }
    }
    let Some((lsn, why)) = lost else { return };
    if damages.iter().any(|d| d.from_lsn <= lsn) {
        return; // already explained by damage found earlier in the log
    }
    // The owner that lost it: one whose torn tail was cut before it, else those whose logs
    // end before it.
    if let Some(scan) = scans.iter_mut().find(|s| s.last_lsn < lsn && s.cut.as_ref().is_some_and(|c| c.torn)) {
        let cut = scan.cut.as_mut().expect("found with a cut");
        cut.torn = false;
        cut.why = format!("{why}: it was cut here ({})", cut.why);
        damages.push(Damage { file: cut.path.clone(), why: cut.why.clone(), from_lsn: lsn });
        return;
    }
    let ending: Vec<String> = scans.iter().filter(|s| s.last_lsn < lsn).map(|s| s.dir.display().to_string()).collect();
    let file = PathBuf::from(if ending.is_empty() { "wal".to_string() } else { ending.join(" or ") });
    damages.push(Damage { file, why: format!("{why}: the log ends before it (a segment is missing or was emptied)"), from_lsn: lsn });
}

/// Cuts one owner's log as decided: a torn tail is truncated (or its empty segment
/// removed); damage is first copied aside as `*.wal.corrupt`. Later segments move aside.
fn apply_cut(vfs: &dyn Vfs, cut: &Cut, bytes: &[u8]) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::checkpoint(format!("{}: {e}", path.display()));
    let aside = |path: &Path| path.with_extension("wal.corrupt");
    if !cut.torn {
        let to = aside(&cut.path);
        vfs.write_new(&to, bytes).and_then(|()| vfs.sync(&to)).map_err(|e| io(&to, e))?;
    }
    if cut.keep == 0 {
        vfs.remove(&cut.path).map_err(|e| io(&cut.path, e))?;
    } else {
        // Cut, then zeros to the page end: segments stay whole pages, like writes leave them.
        let padded = cut.keep.next_multiple_of(wal::PAGE) as u64;
        vfs.set_len(&cut.path, cut.keep as u64).and_then(|()| vfs.set_len(&cut.path, padded)).map_err(|e| io(&cut.path, e))?;
    }
    for later in &cut.later {
        vfs.rename(later, &aside(later)).map_err(|e| io(later, e))?;
    }
    if let Some(dir) = cut.path.parent() {
        vfs.sync_dir(dir).map_err(|e| io(dir, e))?;
    }
    Ok(())
}
