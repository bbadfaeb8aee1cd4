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

use laminardb_engine::config::EngineConfig;
use laminardb_engine::wal::{self, io_error, Record, RecoveryReport};
use laminardb_engine::{Error, ErrorCode, Result};

use crate::wal::{Sync, WalSpec};

pub(crate) const CONTROL_OWNER: &str = "control";

pub(crate) fn shard_owner(id: usize) -> String {
    format!("shard-{id}")
}

pub(crate) struct Storage {
    pub wal_dir: PathBuf,
    pub sync: Sync,
    /// Held (flock'ed) for the connection's life; closing the file releases the lock.
    _lock: std::fs::File,
}

/// The WAL as read at open: complete record groups in lsn order, and what was found.
pub(crate) struct Recovered {
    pub groups: Vec<Vec<Record>>,
    pub next_lsn: u64,
    pub report: RecoveryReport,
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
        Ok(Some(Storage { wal_dir: root.join("wal"), sync, _lock: lock }))
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
            for (first, path) in wal::segments(&owner)? {
                next_lsn = next_lsn.max(first + 1);
                report.wal_bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            }
            let log = wal::recover_owner(&owner)?;
            report.torn_tails.extend(log.torn);
            records.extend(log.records);
        }
        if let Some(max) = records.iter().map(Record::lsn).max() {
            next_lsn = next_lsn.max(max + 1);
        }
        let (groups, incomplete) = wal::merge(records);
        report.incomplete_inserts = incomplete as u64;
        Ok(Recovered { groups, next_lsn, report })
    }
}
