//! Directories a database makes under the system's temporary directory: spill files of a
//! database without storage (`laminardb-spill-<pid>-<n>`) and the storage of checkpoints
//! configured without a directory (`laminardb-ephemeral-<pid>-<n>`). Each holds a `LOCK`
//! file flock'ed by its owner for the database's life and is removed at close; one whose
//! owner was killed is removed by the next database that opens (`clean_orphans`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Prefixes of the directories `clean_orphans` looks after.
pub(crate) const SPILL_PREFIX: &str = "laminardb-spill";
pub(crate) const EPHEMERAL_PREFIX: &str = "laminardb-ephemeral";

/// A directory name under the system's temporary directory that no other database of
/// this process uses: `<prefix>-<pid>-<n>`.
pub(crate) fn temp_dir(prefix: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()))
}

/// A temporary directory owned by this database: created with its `LOCK` held.
pub(crate) struct LockedDir {
    pub path: PathBuf,
    _lock: std::fs::File,
}

impl LockedDir {
    pub fn create(prefix: &str) -> std::io::Result<LockedDir> {
        let path = temp_dir(prefix);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path.join("LOCK"))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(LockedDir { path, _lock: lock })
    }
}

/// The owner's pid, if `name` is `<prefix>-<pid>-<n>` for one of our prefixes.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = [SPILL_PREFIX, EPHEMERAL_PREFIX].iter().find_map(|p| name.strip_prefix(p)?.strip_prefix('-'))?;
    let (pid, n) = rest.split_once('-')?;
    if pid.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// No process has this pid (in this pid namespace).
fn pid_is_dead(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) }
}

/// Nobody holds `dir/LOCK` (or there is none): taking it succeeds.
fn lock_is_free(dir: &Path) -> bool {
    match std::fs::File::open(dir.join("LOCK")) {
        // SAFETY: flock on a file descriptor this function owns; closing it releases it.
        Ok(f) => unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 },
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Removes the directories under `tmp` of databases whose process is gone (killed before
/// it could remove them): their owner's pid no longer exists and their `LOCK` is free
/// (the lock covers a pid reused by another process, the pid a directory's creation
/// before its lock exists). Returns how many it removed.
pub(crate) fn clean_orphans(tmp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(tmp) else { return 0 };
    let own = std::process::id();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else { continue };
        let path = entry.path();
        if pid == own || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if pid_is_dead(pid) && lock_is_free(&path) && std::fs::remove_dir_all(&path).is_ok() {
            log::info!("removed {}, left behind by process {pid}", path.display());
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_our_directories_give_their_owner() {
        assert_eq!(owner_pid("laminardb-spill-123-0"), Some(123));
        assert_eq!(owner_pid("laminardb-ephemeral-7-12"), Some(7));
        assert_eq!(owner_pid("laminardb-123-0"), None, "not ours: could be a user's database");
        assert_eq!(owner_pid("laminardb-spill-123"), None);
        assert_eq!(owner_pid("laminardb-spill-x-1"), None);
        assert_eq!(owner_pid("laminardb-spill-1-2-3"), None);
    }

    #[test]
    fn only_directories_of_dead_owners_with_free_locks_are_removed() {
        let tmp = std::env::temp_dir().join(format!("laminardb-tempdirs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        // A pid that cannot exist (above pid_max), and this process's (alive).
        let dead = tmp.join(format!("{SPILL_PREFIX}-{}-0", i32::MAX as u32 - 1));
        let dead_no_lock = tmp.join(format!("{EPHEMERAL_PREFIX}-{}-3", i32::MAX as u32 - 1));
        let alive = tmp.join(format!("{SPILL_PREFIX}-1-0")); // pid 1 always exists
        let held = tmp.join(format!("{SPILL_PREFIX}-{}-1", i32::MAX as u32 - 2));
        let not_ours = tmp.join(format!("laminardb-{}-0", i32::MAX as u32 - 1));
        for dir in [&dead, &dead_no_lock, &alive, &held, &not_ours] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("0-1.arrow"), b"rows").unwrap();
        }
        for dir in [&dead, &alive, &held] {
            std::fs::write(dir.join("LOCK"), b"").unwrap();
        }
        let holder = std::fs::File::open(held.join("LOCK")).unwrap();
        assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        assert_eq!(clean_orphans(&tmp), 2);
        assert!(!dead.exists() && !dead_no_lock.exists());
        assert!(alive.exists() && held.exists() && not_ours.exists());
        drop(holder);
        assert_eq!(clean_orphans(&tmp), 1, "a released lock of a dead pid is an orphan");
        assert!(!held.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
