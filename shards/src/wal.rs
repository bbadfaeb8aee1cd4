//! Writing a WAL owner's segments (one per shard, one for the coordinator's control log)
//! with glommio direct I/O, i.e. io_uring writes that bypass the page cache. The format
//! is `laminardb_engine::wal`'s.
//!
//! Direct I/O writes whole pages, so each flush writes from the start of the last partial
//! page: the bytes already on disk there are rewritten unchanged, then the new frames,
//! then zeros to the page end (which read back as the end of the segment). A crash during
//! a flush can only damage frames of that flush, whose callers were not yet answered.

use std::path::PathBuf;

use glommio::io::{DmaFile, OpenOptions};

use laminardb_engine::wal::{io_error, segment_path, Claim, LogWriter, Record, Resume};
use laminardb_engine::{Error, Result};

/// When a flush counts as durable.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Sync {
    /// After `fdatasync`: survives power loss.
    Data,
    /// After the direct write completes: the bytes are with the device, past the page
    /// cache, so they survive the process being killed, not the machine losing power.
    Write,
}

/// Where and how an owner writes: plain data, sent to the thread that will write.
#[derive(Clone, Debug)]
pub(crate) struct WalSpec {
    pub dir: PathBuf,
    pub owner: String,
    pub sync: Sync,
    /// Where recovery left the owner's log: the chains continue from there.
    pub resume: Resume,
}

impl WalSpec {
    /// The writer; it must stay on the calling thread (glommio files are thread-local).
    pub fn writer(self) -> WalWriter {
        let log = LogWriter::new(self.resume);
        WalWriter { spec: self, log, file: None, bytes: 0, flushes: 0 }
    }
}

/// An owner's writer: the format's state (`LogWriter`: chains, segment headers, the
/// partial last page) and the open segment file.
pub(crate) struct WalWriter {
    spec: WalSpec,
    log: LogWriter,
    file: Option<DmaFile>,
    /// Bytes written and synced by this writer (metrics and tests).
    pub bytes: u64,
    pub flushes: u64,
}

impl WalWriter {
    /// Writes `records` (lsns ascending, each with the acknowledged range it was sent
    /// with) in one flush and returns once they are durable per `Sync`. After a failed
    /// flush the owner writes nothing more: what reached the disk is unknown.
    pub async fn write(&mut self, records: &[(&Record, Claim)], place: &str) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let log = &mut self.log;
        let flush = crate::health::catch(place, || log.encode(records.iter().map(|(r, c)| (*r, *c))))?;
        match self.flush(&flush).await {
            Ok(()) => {
                self.log.written(&flush);
                self.bytes += flush.frames.len() as u64;
                self.flushes += 1;
                Ok(())
            }
            Err(e) => {
                self.log.failed(&e.message);
                Err(e)
            }
        }
    }

    async fn flush(&mut self, flush: &laminardb_engine::wal::Flush) -> Result<()> {
        if let Some(first) = flush.opens {
            if let Some(old) = self.file.take() {
                old.close().await.map_err(|e| Error::internal(format!("closing a WAL segment: {e}")))?;
            }
            self.file = Some(self.open_segment(first).await?);
        }
        let owner = &self.spec.owner;
        let file = self.file.as_ref().ok_or_else(|| Error::internal(format!("WAL {owner}: no open segment")))?;
        let (offset, len) = self.log.extent(flush);
        let mut buf = file.alloc_dma_buffer(len);
        self.log.fill(flush, buf.as_bytes_mut());
        let written = file.write_at(buf, offset).await.map_err(|e| failed(owner, "writing", e))?;
        if written != len {
            return Err(Error::internal(format!("WAL {owner}: short write ({written} of {len} bytes)")));
        }
        if self.spec.sync == Sync::Data {
            file.fdatasync().await.map_err(|e| failed(owner, "syncing", e))?;
        }
        Ok(())
    }

    async fn open_segment(&self, first_lsn: u64) -> Result<DmaFile> {
        let path = segment_path(&self.spec.dir, &self.spec.owner, first_lsn);
        let parent = path.parent().expect("segment paths have a parent");
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&path)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
        // The new file's directory entry must be durable too.
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| io_error(parent, e))?;
        Ok(file)
    }

    /// Ends the current segment: the next write starts a new one, named by its first lsn.
    pub async fn roll(&mut self) {
        self.log.roll();
        if let Some(file) = self.file.take() {
            let _ = file.close().await;
        }
    }

    pub async fn close(mut self) {
        if let Some(file) = self.file.take() {
            let _ = file.close().await;
        }
    }
}

fn failed(owner: &str, what: &str, e: glommio::GlommioError<()>) -> Error {
    Error::internal(format!("WAL {owner}: {what} failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use laminardb_engine::wal::{decode_all, segments, Record, Tail, PAGE};

    /// Flushes of every size, crossing and ending inside pages, then a roll: reading the
    /// segments back gives every record once, in order, and a clean end.
    #[test]
    fn flushes_rewrite_the_partial_page_and_lose_nothing() {
        let dir = std::env::temp_dir().join(format!("laminardb-walwriter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = WalSpec { dir: dir.clone(), owner: "shard-0".into(), sync: Sync::Write, resume: Resume::default() };
        let records: Vec<Record> =
            (1..=300u64).map(|lsn| Record::Ddl { lsn, sql: "x".repeat((lsn as usize * 37) % 5000) }).collect();
        let written = records.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut wal = spec.writer();
                let mut at = 0;
                let mut n = 1;
                let mut rolled = false;
                while at < written.len() {
                    let group = &written[at..(at + n).min(written.len())];
                    let claimed: Vec<(&Record, Claim)> = group.iter().map(|r| (r, Claim { start: 1, acked: r.lsn() })).collect();
                    wal.write(&claimed, "test").await.unwrap();
                    if !rolled && at >= 150 {
                        wal.roll().await;
                        rolled = true;
                    }
                    at += group.len();
                    n = n % 7 + 1;
                }
                wal.close().await;
            })
            .unwrap()
            .join()
            .unwrap();
        let segs = segments(&dir.join("shard-0")).unwrap();
        assert_eq!(segs.len(), 2);
        let mut back = Vec::new();
        for (_, path) in segs {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(bytes.len() % PAGE, 0);
            let (records, _, tail) = decode_all(&bytes);
            assert_eq!(tail, Tail::Clean);
            back.extend(records);
        }
        assert_eq!(back, records);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
