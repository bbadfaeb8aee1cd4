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

use laminardb_engine::checkpoint;
use laminardb_engine::config::{EngineConfig, Recovery};
use laminardb_engine::recovery::{self, Recovered};
use laminardb_engine::vfs::OsVfs;
use laminardb_engine::wal::Resume;
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
    pub recovery: Recovery,
    /// Where recovery left each owner's log, for its writer.
    pub resume: std::collections::HashMap<String, Resume>,
    pub resume_default: Resume,
    /// Held (flock'ed) for the connection's life; closing the file releases the lock.
    _lock: std::fs::File,
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
        // A damaged manifest is reported by recovery, which names it.
        if let Ok(Some(manifest)) = checkpoint::read_manifest(Path::new(dir)) {
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
        Ok(Some(Storage {
            root: root.to_path_buf(),
            wal_dir: root.join("wal"),
            sync,
            recovery: config.recovery,
            resume: Default::default(),
            resume_default: Resume::default(),
            _lock: lock,
        }))
    }

    pub fn wal(&self, owner: &str) -> WalSpec {
        let resume = self.resume.get(owner).copied().unwrap_or(self.resume_default);
        WalSpec { dir: self.wal_dir.clone(), owner: owner.to_string(), sync: self.sync, resume }
    }

    /// Reads the checkpoint and every owner's segments: torn tails are cut, damage
    /// refuses the open (or is cut, with `Recovery::Truncate`); see `engine::recovery`.
    pub fn read(&mut self) -> Result<Recovered> {
        let recovered = recovery::recover(&OsVfs, &self.root, self.recovery)?;
        self.resume = recovered.resume.clone();
        self.resume_default = recovered.resume_default;
        Ok(recovered)
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
