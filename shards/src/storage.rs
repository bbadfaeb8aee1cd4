//! A database's storage directory: the lock that keeps a second connection out, and
//! reading the WAL back at open.
//!
//! ```text
//! <storage_dir>/LOCK                 flock'ed while a connection has the directory open
//! <storage_dir>/wal/control/*.wal    the coordinator's log: catalog changes, watermark calls
//! <storage_dir>/wal/shard-<i>/*.wal  shard i's log: its rows of every insert
//! ```

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use laminardb_engine::checkpoint::{self, Manifest};
use laminardb_engine::config::EngineConfig;
use laminardb_engine::wal::{self, io_error, Record, RecoveryReport};
use laminardb_engine::{Error, ErrorCode, Result};

use crate::wal::{Sync, WalSpec};

pub(crate) const CONTROL_OWNER: &str = "control";

pub(crate) fn shard_owner(id: usize) -> String {
    format!("shard-{id}")
}

pub(crate) struct Storage {
    pub root: PathBuf,
    pub wal_dir: PathBuf,
    pub sync: Sync,
    /// Held (flock'ed) for the connection's life; closing the file releases the lock.
    _lock: std::fs::File,
}

/// The WAL as read at open: complete record groups in lsn order, and what was found.
pub(crate) struct Recovered {
    /// The latest checkpoint; only WAL records from its lsn on are replayed after it.
    pub manifest: Option<Manifest>,
    pub groups: Vec<Vec<Record>>,
    pub next_lsn: u64,
    pub report: RecoveryReport,
}

/// Settings that follow from the storage directory, settled before anything starts:
/// checkpoints without a directory get a temporary one (deleted at close; nothing in it
/// outlives the database, so its WAL skips `fdatasync`), and a directory holding a
/// checkpoint reopens with the shard count the checkpoint's keyed state is partitioned for.
pub(crate) fn settle(mut config: EngineConfig) -> Result<EngineConfig> {
    if config.storage_dir.is_none() && config.checkpoint_interval_ms.is_some() {
        // Its LOCK is held while open (`Storage::open`); a killed process's is removed
        // by the next open (`tempdirs::clean_orphans`).
        let dir = crate::tempdirs::temp_dir(crate::tempdirs::EPHEMERAL_PREFIX);
        config.storage_dir = Some(dir.to_string_lossy().into_owned());
        config.ephemeral_storage = true;
        config.wal_fsync = false;
    }
    if let Some(dir) = config.storage_dir.as_deref() {
        if let Some(manifest) = checkpoint::read_manifest(Path::new(dir))? {
            config.shards = manifest.shards;
        }
    }
    Ok(config)
}

impl Storage {
    /// Opens (creating) `config.storage_dir`, if set, and locks it.
    pub fn open(config: &EngineConfig) -> Result<Option<Storage>> {
        let Some(root) = config.storage_dir.as_deref() else { return Ok(None) };
        let root = Path::new(root);
        let failed = |e: std::io::Error| Error::new(ErrorCode::ConnectionFailed, format!("storage directory {}: {e}", root.display()));
        std::fs::create_dir_all(root).map_err(failed)?;
        let lock_path = root.join("LOCK");
        let mut lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(failed)?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(Error::new(
                ErrorCode::ConnectionInUse,
                format!("{} is already open in another connection (process {})", root.display(), holder.trim()),
            ));
        }
        lock.set_len(0).and_then(|()| write!(lock, "{}", std::process::id())).map_err(failed)?;
        let sync = if config.wal_fsync { Sync::Data } else { Sync::Write };
        Ok(Some(Storage { root: root.to_path_buf(), wal_dir: root.join("wal"), sync, _lock: lock }))
    }

    pub fn wal(&self, owner: &str) -> WalSpec {
        WalSpec { dir: self.wal_dir.clone(), owner: owner.to_string(), sync: self.sync }
    }

    /// Reads every owner's segments (torn tails truncated) and merges them by lsn.
    pub fn read(&self) -> Result<Recovered> {
        let mut report = RecoveryReport::default();
        let mut records = Vec::new();
        let mut next_lsn = 1;
        let owners = match std::fs::read_dir(&self.wal_dir) {
            Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&self.wal_dir, e)),
        };
        for owner in owners {
            for (first, _) in wal::segments(&owner)? {
                next_lsn = next_lsn.max(first + 1);
            }
            let log = wal::recover_owner(&owner)?;
            report.torn_tails.extend(log.torn);
            records.extend(log.records);
        }
        if let Some(max) = records.iter().map(Record::lsn).max() {
            next_lsn = next_lsn.max(max + 1);
        }
        let manifest = checkpoint::read_manifest(&self.root)?;
        if let Some(m) = &manifest {
            next_lsn = next_lsn.max(m.lsn + 1);
            records.retain(|r| r.lsn() >= m.lsn);
        }
        // Inserts with some but not all parts on disk were never acknowledged: left out.
        let (groups, _incomplete) = wal::merge(records);
        Ok(Recovered { manifest, groups, next_lsn, report })
    }
}

/// Checkpoints taken by this connection, for metrics.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    pub count: u64,
    pub last_id: u64,
    /// Whole checkpoint, and the part during which inserts waited.
    pub last_ms: f64,
    pub last_pause_ms: f64,
    pub last_bytes: u64,
}

/// After `manifest` is published: deletes WAL segments it covers (every record below its
/// lsn; writers started new segments at the checkpoint) and data files it does not name.
/// Failures only leave files behind.
pub(crate) fn collect_garbage(root: &Path, manifest: &Manifest) {
    let remove = |path: &Path| {
        let _ = std::fs::remove_file(path);
    };
    let wal_dir = root.join("wal");
    for owner in std::fs::read_dir(&wal_dir).into_iter().flatten().flatten() {
        // Every owner rolls its log at the checkpoint's barrier, so a segment begun
        // before the barrier holds nothing after it.
        for (first, path) in wal::segments(&owner.path()).unwrap_or_default() {
            if first < manifest.lsn {
                remove(&path);
            }
        }
    }
    let named: std::collections::HashSet<PathBuf> = manifest
        .shard_files
        .iter()
        .flat_map(|f| {
            let rows = f.rows.iter().flat_map(|(_, files)| files.iter());
            f.state.iter().chain(&f.channel).chain(f.streams.iter().map(|(_, file)| file)).chain(rows)
        })
        .map(|f| root.join(f))
        .collect();
    for shard in std::fs::read_dir(root.join("data")).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            if !named.contains(&file.path()) {
                remove(&file.path());
            }
        }
    }
}
