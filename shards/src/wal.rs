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

use laminardb_engine::wal::{io_error, segment_path, PAGE, SEGMENT_BYTES};
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
}

impl WalSpec {
    /// The writer; it must stay on the calling thread (glommio files are thread-local).
    pub fn writer(self) -> WalWriter {
        WalWriter { spec: self, segment: None, bytes: 0, flushes: 0 }
    }
}

pub(crate) struct WalWriter {
    spec: WalSpec,
    segment: Option<Segment>,
    /// Bytes written and synced by this writer (metrics and tests).
    pub bytes: u64,
    pub flushes: u64,
}

struct Segment {
    file: DmaFile,
    /// File offset of `tail[0]`: always a page boundary.
    page_pos: u64,
    /// The written bytes of the last, partial page (fewer than `PAGE`).
    tail: Vec<u8>,
}

impl WalWriter {
    /// Writes `frames` (whole encoded frames whose first record has `first_lsn`) and
    /// returns once they are durable per `Sync`.
    pub async fn write(&mut self, frames: &[u8], first_lsn: u64) -> Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        let full = self.segment.as_ref().is_some_and(|s| s.page_pos + s.tail.len() as u64 >= SEGMENT_BYTES);
        if full {
            if let Some(old) = self.segment.take() {
                old.file.close().await.map_err(|e| Error::internal(format!("closing a WAL segment: {e}")))?;
            }
        }
        if self.segment.is_none() {
            self.segment = Some(self.open_segment(first_lsn).await?);
        }
        let segment = self.segment.as_mut().expect("opened above");
        let owner = &self.spec.owner;
        let total = segment.tail.len() + frames.len();
        let padded = total.next_multiple_of(PAGE);
        let mut buf = segment.file.alloc_dma_buffer(padded);
        let bytes = buf.as_bytes_mut();
        bytes[..segment.tail.len()].copy_from_slice(&segment.tail);
        bytes[segment.tail.len()..total].copy_from_slice(frames);
        bytes[total..].fill(0);
        let whole = total / PAGE * PAGE;
        let next_tail = bytes[whole..total].to_vec();
        let written = segment.file.write_at(buf, segment.page_pos).await.map_err(|e| failed(owner, "writing", e))?;
        if written != padded {
            return Err(Error::internal(format!("WAL {owner}: short write ({written} of {padded} bytes)")));
        }
        if self.spec.sync == Sync::Data {
            segment.file.fdatasync().await.map_err(|e| failed(owner, "syncing", e))?;
        }
        segment.page_pos += whole as u64;
        segment.tail = next_tail;
        self.bytes += frames.len() as u64;
        self.flushes += 1;
        Ok(())
    }

    async fn open_segment(&self, first_lsn: u64) -> Result<Segment> {
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
        Ok(Segment { file, page_pos: 0, tail: Vec::new() })
    }

    /// Ends the current segment: the next write starts a new one, named by its first lsn.
    pub async fn roll(&mut self) {
        if let Some(segment) = self.segment.take() {
            let _ = segment.file.close().await;
        }
    }

    pub async fn close(mut self) {
        if let Some(segment) = self.segment.take() {
            let _ = segment.file.close().await;
        }
    }
}

fn failed(owner: &str, what: &str, e: glommio::GlommioError<()>) -> Error {
    Error::internal(format!("WAL {owner}: {what} failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use laminardb_engine::wal::{decode_all, encode, segments, Record, Tail};

    /// Flushes of every size, crossing and ending inside pages, then a roll: reading the
    /// segments back gives every record once, in order, and a clean end.
    #[test]
    fn flushes_rewrite_the_partial_page_and_lose_nothing() {
        let dir = std::env::temp_dir().join(format!("laminardb-walwriter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = WalSpec { dir: dir.clone(), owner: "shard-0".into(), sync: Sync::Write };
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
                    let mut frames = Vec::new();
                    for r in group {
                        encode(r, &mut frames).unwrap();
                    }
                    wal.write(&frames, group[0].lsn()).await.unwrap();
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
