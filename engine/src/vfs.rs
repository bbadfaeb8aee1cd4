//! The file operations the WAL format, checkpoints and recovery use, behind a trait: the
//! real file system (`OsVfs`) in production, and an in-memory one that loses unsynced
//! writes and flips bits in the deterministic simulation (`sim`, tests only). The shards'
//! WAL writer keeps writing with glommio's direct I/O; only what recovery and checkpoints
//! do goes through here.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::wal::SECTOR;

pub trait Vfs: Send + Sync {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The entries of `dir` (files and directories), in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    fn is_dir(&self, path: &Path) -> bool;
    fn exists(&self, path: &Path) -> bool;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates (or empties) `path` and writes `bytes`; not yet synced.
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Writes `bytes` at `offset` of an existing file; not yet synced.
    fn write_at(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes the file's data and size durable.
    fn sync(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Whether independent file writes may run on threads of their own (their syncs then
    /// overlap); the simulation runs them one after another, in a reproducible order.
    fn parallel(&self) -> bool {
        false
    }
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsVfs;

impl Vfs for OsVfs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect()
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        std::fs::File::create(path)?.write_all(bytes)
    }
    fn write_at(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(path)?.write_all_at(bytes, offset)
    }
    fn sync(&self, path: &Path) -> io::Result<()> {
        std::fs::OpenOptions::new().write(true).open(path)?.sync_data()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        file.sync_all()
    }
    fn parallel(&self) -> bool {
        true
    }
}

#[derive(Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct FsState {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
}

/// A file system in memory that keeps only what was synced across a crash: the
/// simulation's (`engine::sim`) and the fuzz targets'.
#[derive(Default)]
pub struct MemVfs {
    state: Mutex<FsState>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

impl MemVfs {
    /// The machine stops: directory entries fall back to their last synced state, and
    /// each file keeps, sector by sector, either what was synced or what was written.
    /// `coin` decides each unsynced file's length (written or synced) and each of its
    /// sectors (written or not).
    pub fn crash(&self, mut coin: impl FnMut() -> bool) {
        let mut st = self.state.lock();
        st.names = st.durable_names.clone();
        for inode in &mut st.inodes {
            if inode.data == inode.durable {
                continue;
            }
            let len = if coin() { inode.data.len() } else { inode.durable.len() };
            let mut out = vec![0u8; len];
            for sector in (0..len).step_by(SECTOR) {
                let end = (sector + SECTOR).min(len);
                let from: &[u8] = if coin() { &inode.data } else { &inode.durable };
                for (i, b) in out[sector..end].iter_mut().enumerate() {
                    *b = from.get(sector + i).copied().unwrap_or(0);
                }
            }
            inode.data = out.clone();
            inode.durable = out;
        }
    }

    /// Every file that exists durably, in a stable order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.lock().durable_names.keys().cloned().collect()
    }

    /// Changes a durable file in place, as a failing disk or a person would.
    pub fn damage(&self, path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
        let mut st = self.state.lock();
        if let Some(&ino) = st.names.get(path) {
            let inode = &mut st.inodes[ino];
            change(&mut inode.data);
            inode.durable = inode.data.clone();
        }
    }

    pub fn delete(&self, path: &Path) {
        let mut st = self.state.lock();
        st.names.remove(path);
        st.durable_names.remove(path);
    }

    fn with_file<T>(&self, path: &Path, f: impl FnOnce(&mut Inode) -> T) -> io::Result<T> {
        let mut st = self.state.lock();
        let ino = *st.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(f(&mut st.inodes[ino]))
    }
}

impl Vfs for MemVfs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.with_file(path, |i| i.data.clone())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let st = self.state.lock();
        if !st.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let files = st.names.keys().filter(|p| p.parent() == Some(dir));
        let dirs = st.dirs.iter().filter(|p| p.parent() == Some(dir));
        Ok(files.chain(dirs).cloned().collect())
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.state.lock().dirs.contains(path)
    }
    fn exists(&self, path: &Path) -> bool {
        let st = self.state.lock();
        st.names.contains_key(path) || st.dirs.contains(path)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        for d in dir.ancestors() {
            st.dirs.insert(d.to_path_buf());
        }
        Ok(())
    }
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock();
        if !path.parent().is_some_and(|d| st.dirs.contains(d)) {
            return Err(not_found(path));
        }
        match st.names.get(path).copied() {
            Some(ino) => st.inodes[ino].data = bytes.to_vec(),
            None => {
                st.inodes.push(Inode { data: bytes.to_vec(), durable: Vec::new() });
                let ino = st.inodes.len() - 1;
                st.names.insert(path.to_path_buf(), ino);
            }
        }
        Ok(())
    }
    fn write_at(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.with_file(path, |i| {
            let end = offset as usize + bytes.len();
            if i.data.len() < end {
                i.data.resize(end, 0);
            }
            i.data[offset as usize..end].copy_from_slice(bytes);
        })
    }
    fn sync(&self, path: &Path) -> io::Result<()> {
        self.with_file(path, |i| i.durable = i.data.clone())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        st.durable_names.retain(|p, _| p.parent() != Some(dir));
        let now: Vec<(PathBuf, usize)> = st.names.iter().filter(|(p, _)| p.parent() == Some(dir)).map(|(p, i)| (p.clone(), *i)).collect();
        st.durable_names.extend(now);
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        let ino = st.names.remove(from).ok_or_else(|| not_found(from))?;
        st.names.insert(to.to_path_buf(), ino);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.state.lock().names.remove(path).map(drop).ok_or_else(|| not_found(path))
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        self.with_file(path, |i| {
            i.data.resize(len as usize, 0);
            i.durable = i.data.clone();
        })
    }
}

