//! Checkpoints on disk: the manifest that names everything one checkpoint consists of, and
//! the files it points at.
//!
//! ```text
//! <storage_dir>/MANIFEST                    crc32 (hex) \n JSON; replaced atomically (rename)
//! <storage_dir>/data/shard-<i>/rows-<id>-<n>.arrow   rows appended to one source or stream
//!                                           on shard i since the previous checkpoint (IPC)
//! <storage_dir>/data/shard-<i>/state-<id>.bin        shard i's input watermarks (rkyv)
//! <storage_dir>/data/shard-<i>/task-<id>-<n>.bin     one stream's operators' state on
//!                                           shard i (rkyv; `stream-*` before DAGs)
//! <storage_dir>/data/shard-<i>/exchange-<id>.bin     exchange messages in flight into
//!                                           shard i at the checkpoint (rkyv; `channel-*`
//!                                           before DAGs)
//!                                           (each data file ends with its crc32 and "LDBC")
//! ```
//!
//! A checkpoint covers every WAL record with an lsn below `Manifest::lsn`: recovery loads
//! the catalog (`ddl`), each shard's rows and state, then replays the WAL from `lsn` on.
//! Checkpoints are incremental: a checkpoint writes only rows added since the previous
//! one, and a stream's state file is reused while the stream has not changed.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::vfs::{OsVfs, Vfs};

use serde::{Deserialize, Serialize};

use crate::wal::io_error;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: u64,
    /// Every WAL record below this lsn is in the checkpoint.
    pub lsn: u64,
    /// Shard count the state is partitioned for (keyed state lives on its key's shard).
    pub shards: usize,
    pub created_ms: i64,
    /// The catalog, as the DDL that built it, in order.
    pub ddl: Vec<String>,
    /// Each source's watermark.
    pub watermarks: Vec<(String, i64)>,
    /// Each source's and stream's counters: rows, batches, late rows, watermark.
    pub counters: Vec<(String, [i64; 4])>,
    /// Per shard: its files, relative to the storage directory.
    pub shard_files: Vec<ShardFiles>,
    /// Bytes written by this checkpoint (new row files and state files).
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardFiles {
    /// The shard's input watermarks.
    pub state: Option<String>,
    /// Per stream, its operator state on this shard (rewritten only when it changed).
    #[serde(default)]
    pub streams: Vec<(String, String)>,
    /// Per source or stream, its row files, oldest first.
    pub rows: Vec<(String, Vec<String>)>,
    /// Exchange messages in flight into this shard at the checkpoint (sent by a peer
    /// before its snapshot, received after this shard's), applied after every shard's
    /// state is loaded; `None` when there were none.
    #[serde(default)]
    pub channel: Option<String>,
    /// Per source or stream, what this shard published of it up to the barrier: rows,
    /// batches, late rows dropped.
    #[serde(default)]
    pub counters: Vec<(String, [u64; 3])>,
    /// Where each split this shard reads of a connector source was at the barrier
    /// (`source::SplitReader::position`): the state above holds exactly the rows before it.
    #[serde(default)]
    pub positions: Vec<SplitPosition>,
    /// Bytes this shard wrote for this checkpoint.
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitPosition {
    pub source: String,
    pub split: u64,
    pub position: Vec<u8>,
}

pub fn manifest_path(root: &Path) -> PathBuf {
    root.join("MANIFEST")
}

pub fn shard_dir(root: &Path, shard: usize) -> PathBuf {
    root.join("data").join(format!("shard-{shard}"))
}

/// Reads the manifest, if there is one; a manifest that fails its checksum or does not
/// parse is an error naming it (the rename that publishes it is atomic, so this is
/// damage, not a crash).
pub fn read_manifest(root: &Path) -> Result<Option<Manifest>> {
    read_manifest_in(&OsVfs, root)
}

pub fn read_manifest_in(vfs: &dyn Vfs, root: &Path) -> Result<Option<Manifest>> {
    let path = manifest_path(root);
    match vfs.read(&path) {
        Ok(bytes) => parse_manifest(&bytes).map(Some).map_err(|why| Error::checkpoint(format!("{}: {why}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::checkpoint(format!("{}: {e}", path.display()))),
    }
}

/// A manifest's bytes, checked: why they are not a manifest otherwise. Never panics.
pub fn parse_manifest(bytes: &[u8]) -> std::result::Result<Manifest, String> {
    let damaged = |what: &str| format!("{what}; the checkpoint is damaged");
    let newline = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| damaged("no checksum line"))?;
    let (crc, body) = (&bytes[..newline], &bytes[newline + 1..]);
    if crc != format!("{:08x}", crc32fast::hash(body)).as_bytes() {
        return Err(damaged("checksum mismatch"));
    }
    let body = std::str::from_utf8(body).map_err(|_| damaged("not UTF-8 text"))?;
    serde_json::from_str(body).map_err(|e| damaged(&format!("unreadable ({e})")))
}

/// Publishes `manifest` atomically: written to a temporary file, synced, renamed over the
/// old one, and the directory synced.
pub fn write_manifest(root: &Path, manifest: &Manifest) -> Result<()> {
    write_manifest_in(&OsVfs, root, manifest)
}

pub fn write_manifest_in(vfs: &dyn Vfs, root: &Path, manifest: &Manifest) -> Result<()> {
    let body = serde_json::to_string(manifest).map_err(|e| Error::checkpoint(e.to_string()))?;
    let text = format!("{:08x}\n{body}", crc32fast::hash(body.as_bytes()));
    let tmp = root.join("MANIFEST.tmp");
    vfs.write_new(&tmp, text.as_bytes()).and_then(|()| vfs.sync(&tmp)).map_err(|e| io_error(&tmp, e))?;
    let path = manifest_path(root);
    vfs.rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
    vfs.sync_dir(root).map_err(|e| io_error(root, e))
}

const TRAILER_MAGIC: &[u8; 4] = b"LDBC";

/// Writes checkpoint files into `dir` (each: its bytes, then their crc32 and a magic),
/// each on its own thread so that their syncs overlap (the file system commits them
/// together instead of one after another), and syncs `dir` alongside once every file
/// exists. Returns the bytes written (without trailers).
pub fn write_all_checked(dir: &Path, files: Vec<(PathBuf, Vec<u8>)>) -> Result<u64> {
    write_all_checked_in(&OsVfs, dir, files)
}

/// `write_all_checked` through `vfs`: on threads where the `vfs` allows it, else one
/// file after another.
pub fn write_all_checked_in(vfs: &dyn Vfs, dir: &Path, files: Vec<(PathBuf, Vec<u8>)>) -> Result<u64> {
    let bytes = files.iter().map(|(_, b)| b.len() as u64).sum();
    // First every file is created and written, then each is synced, with the directory
    // (whose entries now all exist) synced alongside.
    let create = files.iter().map(|(path, bytes)| move || create_checked(vfs, path, bytes));
    let mut syncs: Vec<Box<dyn FnOnce() -> Result<()> + Send + '_>> =
        vec![Box::new(|| vfs.sync_dir(dir).map_err(|e| io_error(dir, e)))];
    for (path, _) in &files {
        syncs.push(Box::new(move || vfs.sync(path).map_err(|e| io_error(path, e))));
    }
    if vfs.parallel() {
        on_threads(create)?;
        on_threads(syncs.into_iter())?;
    } else {
        create.map(|job| job()).collect::<Result<Vec<()>>>()?;
        syncs.into_iter().map(|job| job()).collect::<Result<Vec<()>>>()?;
    }
    Ok(bytes)
}

/// Runs every job on a thread of its own; their results in order, or the first error.
fn on_threads<T: Send, F: FnOnce() -> Result<T> + Send>(jobs: impl Iterator<Item = F>) -> Result<Vec<T>> {
    std::thread::scope(|scope| {
        let running: Vec<_> = jobs.map(|job| scope.spawn(job)).collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(Error::internal("a checkpoint writer panicked"))))
            .collect()
    })
}

/// Creates `path` holding `bytes`, then their crc32 and a magic; not yet synced.
fn create_checked(vfs: &dyn Vfs, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut all = Vec::with_capacity(bytes.len() + 8);
    all.extend_from_slice(bytes);
    all.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    all.extend_from_slice(TRAILER_MAGIC);
    vfs.write_new(path, &all).map_err(|e| io_error(path, e))
}

/// Reads a file `write_all_checked` wrote; damage (any changed byte, a cut) is an error.
pub fn read_checked(path: &Path) -> Result<Vec<u8>> {
    read_checked_in(&OsVfs, path)
}

pub fn read_checked_in(vfs: &dyn Vfs, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = vfs.read(path).map_err(|e| Error::checkpoint(format!("{}: {e}", path.display())))?;
    let damaged = || Error::checkpoint(format!("{}: checksum mismatch; the checkpoint file is damaged", path.display()));
    if bytes.len() < 8 || &bytes[bytes.len() - 4..] != TRAILER_MAGIC {
        return Err(damaged());
    }
    let crc = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap());
    bytes.truncate(bytes.len() - 8);
    if crc32fast::hash(&bytes) != crc {
        return Err(damaged());
    }
    Ok(bytes)
}

/// Every file `manifest` names, relative to the storage directory.
pub fn named_files(manifest: &Manifest) -> impl Iterator<Item = &String> {
    manifest.shard_files.iter().flat_map(|f| {
        let rows = f.rows.iter().flat_map(|(_, files)| files.iter());
        f.state.iter().chain(&f.channel).chain(f.streams.iter().map(|(_, file)| file)).chain(rows)
    })
}

/// After `manifest` is published: deletes WAL segments it covers (every record below its
/// lsn; writers started new segments at the checkpoint) and data files it does not name.
/// Failures only leave files behind.
pub fn collect_garbage(root: &Path, manifest: &Manifest) {
    collect_garbage_in(&OsVfs, root, manifest)
}

pub fn collect_garbage_in(vfs: &dyn Vfs, root: &Path, manifest: &Manifest) {
    let wal_dir = root.join("wal");
    for owner in vfs.list(&wal_dir).unwrap_or_default() {
        // Every owner rolls its log at the checkpoint's barrier, so a segment begun
        // before the barrier holds nothing after it.
        for (first, path) in crate::wal::segments_in(vfs, &owner).unwrap_or_default() {
            if first < manifest.lsn {
                let _ = vfs.remove(&path);
            }
        }
    }
    let named: std::collections::HashSet<PathBuf> = named_files(manifest).map(|f| root.join(f)).collect();
    for shard in vfs.list(&root.join("data")).unwrap_or_default() {
        for file in vfs.list(&shard).unwrap_or_default() {
            if !named.contains(&file) {
                let _ = vfs.remove(&file);
            }
        }
    }
}

/// Writes a whole file and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(|e| io_error(path, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| io_error(path, e))
}

/// State that `rkyv::to_bytes` wrote, read back (validated) from unaligned file bytes.
pub fn load_state<T>(bytes: &[u8], what: &str) -> Result<T>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned).map_err(|e| Error::checkpoint(format!("restoring {what}: {e}")))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_damage_is_detected() {
        let root = std::env::temp_dir().join(format!("laminardb-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(read_manifest(&root).unwrap(), None);
        let m = Manifest {
            id: 3,
            lsn: 42,
            shards: 2,
            ddl: vec!["CREATE SOURCE t (id BIGINT)".into()],
            shard_files: vec![ShardFiles { state: Some("data/shard-0/state-3.bin".into()), streams: vec![("s".into(), "data/shard-0/stream-3-0.bin".into())], rows: vec![("t".into(), vec!["a".into()])], channel: None, counters: vec![("t".into(), [1, 1, 0])], positions: vec![SplitPosition { source: "g".into(), split: 1, position: vec![7, 0, 0, 0, 0, 0, 0, 0] }], bytes_written: 9 }],
            ..Manifest::default()
        };
        write_manifest(&root, &m).unwrap();
        assert_eq!(read_manifest(&root).unwrap(), Some(m));
        let path = manifest_path(&root);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replace("\"lsn\":42", "\"lsn\":43");
        std::fs::write(&path, text).unwrap();
        assert!(read_manifest(&root).unwrap_err().to_string().contains("checksum"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The fuzz target's entry point over random and mutated manifests: an error naming
    /// the damage, never a panic, and never a manifest that differs from the one written.
    #[test]
    fn parse_manifest_never_panics() {
        let m = Manifest { id: 7, lsn: 99, shards: 2, ddl: vec!["CREATE SOURCE t (id BIGINT)".into()], ..Manifest::default() };
        let body = serde_json::to_string(&m).unwrap();
        let good = format!("{:08x}\n{body}", crc32fast::hash(body.as_bytes())).into_bytes();
        assert_eq!(parse_manifest(&good).unwrap(), m);
        let mut rng = crate::sim::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next();
        for round in 0..2000 {
            let mut bytes = if round % 5 == 0 { (0..next() % 300).map(|_| next() as u8).collect() } else { good.clone() };
            if !bytes.is_empty() && round % 5 != 0 {
                let at = next() as usize % bytes.len();
                match next() % 3 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.truncate(at),
                    _ => bytes[at] = next() as u8,
                }
            }
            if let Ok(parsed) = parse_manifest(&bytes) {
                assert_eq!(parsed, m, "round {round}");
            }
        }
    }

    #[test]
    fn files_written_together_read_back_and_a_failure_is_reported() {
        let dir = std::env::temp_dir().join(format!("laminardb-ckfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<(PathBuf, Vec<u8>)> = (0..5u8).map(|i| (dir.join(format!("f{i}")), vec![i; 1000 * i as usize + 1])).collect();
        assert_eq!(write_all_checked(&dir, files.clone()).unwrap(), files.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
        for (path, bytes) in &files {
            assert_eq!(&read_checked(path).unwrap(), bytes);
        }
        let bad = vec![(dir.join("f9"), vec![1]), (dir.join("missing").join("f"), vec![2])];
        assert!(write_all_checked(&dir, bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
