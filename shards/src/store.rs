//! A shard's retained rows: its partition of every source and stream, owned by one
//! thread; beyond the spill limit the oldest move to files, kept memory-mapped: the page
//! cache holds them (the kernel may drop and re-read those pages), not the heap.
//!
//! A source with a retention (`RetainPolicy`) loses its oldest rows: beyond its share of
//! `retention_rows` as rows arrive, and those older than its watermark minus
//! `retention` as the watermark moves. Rows go in arrival order, whole batches where they
//! can, the boundary batch sliced (no copy); a spill file goes once all its rows have,
//! and a checkpoint file leaves the source's list (so the next checkpoint's collection
//! deletes it) once all of its rows have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::buffer::Buffer;
use arrow::compute::concat_batches;

use laminardb_engine::dataflow::Watermark;
use laminardb_engine::stream::time::to_millis;
use laminardb_engine::{ipc, wal, Error, Result};

use crate::command::{Exchange, SpillRequest};

/// Small appends (single-row inserts) are merged once this many accumulate, so scans
/// stay vectorized however the rows arrived.
const SMALL_BATCHES_MAX: usize = 64;
/// A batch with fewer rows than this counts as small.
const SMALL_BATCH_ROWS: usize = 4096;

/// Retained rows of one source or stream on one shard, oldest first: files spilled to
/// disk, then sealed batches in memory, then recent small appends.
pub struct SourceRows {
    spilled: Vec<SpillFile>,
    sealed: Vec<RecordBatch>,
    small: Vec<RecordBatch>,
    /// The first `spilling` sealed batches are being written to disk (`SpillJob`).
    spilling: usize,
    /// Tells this incarnation of the name from a later one (drop + create) when a spill
    /// finishes.
    epoch: u64,
    pub rows: u64,
    /// Bytes of the rows held in memory.
    pub bytes: u64,
    spilled_rows: u64,
    /// Rows already in checkpoint files, and those files (oldest first) with their row
    /// counts; the files' first rows may have expired since (`saved_rows` counts only
    /// the retained ones).
    saved_rows: u64,
    files: Vec<String>,
    file_rows: Vec<u64>,
    retention: Option<RetainPolicy>,
    /// The latest watermark the time retention was applied at.
    mark: Option<Watermark>,
    /// Rows dropped by the retention since the database opened.
    expired_rows: u64,
}

/// What one source keeps on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetainPolicy {
    /// The event-time column and how far behind the watermark rows are kept (ms).
    pub time: Option<(usize, i64)>,
    /// This shard's share of the source's `retention_rows`.
    pub rows: Option<u64>,
}

impl RetainPolicy {
    /// Shard `shard` of `shards` keeps `rows / shards` rows, the first `rows % shards`
    /// shards one more: together never more than `rows`.
    pub fn share(rows: u64, shard: usize, shards: usize) -> u64 {
        let shards = shards.max(1) as u64;
        rows / shards + u64::from((shard as u64) < rows % shards)
    }
}

/// Rows moved to disk: one Arrow IPC stream file, and its batches read from its
/// memory-mapped bytes without copying.
struct SpillFile {
    path: PathBuf,
    batches: Vec<RecordBatch>,
}

/// Oldest in-memory rows of one source or stream, to be written to `path` by the spill
/// thread; `Spilled` comes back over the shard's exchange inbox.
pub struct SpillJob {
    pub name: Arc<str>,
    pub epoch: u64,
    pub batches: Vec<RecordBatch>,
    pub path: PathBuf,
}

/// What a store reports of one source or stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowStats {
    pub rows: u64,
    /// Bytes of the rows in memory.
    pub bytes: u64,
    pub spilled_rows: u64,
    /// Rows the source's retention dropped since the database opened.
    pub expired_rows: u64,
}

impl SourceRows {
    fn new(epoch: u64) -> Self {
        SourceRows {
            spilled: Vec::new(),
            sealed: Vec::new(),
            small: Vec::new(),
            spilling: 0,
            epoch,
            rows: 0,
            bytes: 0,
            spilled_rows: 0,
            saved_rows: 0,
            files: Vec::new(),
            file_rows: Vec::new(),
            retention: None,
            mark: None,
            expired_rows: 0,
        }
    }

    /// Drops rows beyond the row retention; returns how many.
    fn expire_rows(&mut self) -> u64 {
        match self.retention.and_then(|r| r.rows) {
            Some(keep) if self.rows > keep => self.drop_oldest(self.rows - keep),
            _ => 0,
        }
    }

    /// Drops the rows older than `watermark` minus the time retention, from the oldest
    /// on up to the first row that is not; returns how many.
    fn expire_time(&mut self, watermark: Option<Watermark>) -> u64 {
        let Some((column, span)) = self.retention.and_then(|r| r.time) else { return 0 };
        self.mark = self.mark.max(watermark);
        let Some(watermark) = self.mark else { return 0 };
        let cutoff = watermark.ms().saturating_sub(span);
        let mut expired = 0u64;
        let spilled = self.spilled.iter().flat_map(|f| f.batches.iter());
        for batch in spilled.chain(&self.sealed).chain(&self.small) {
            let Some(times) = batch.columns().get(column) else { break };
            // The common case, a batch not yet expiring, is decided by its first row.
            let first = match to_millis(&times.slice(0, times.len().min(1))) {
                Ok(ms) if ms.len() == 1 && ms.is_valid(0) => ms.value(0),
                _ => break,
            };
            if first >= cutoff {
                break;
            }
            let Ok(ms) = to_millis(times) else { break };
            let old = (0..ms.len()).take_while(|&i| ms.is_valid(i) && ms.value(i) < cutoff).count();
            expired += old as u64;
            if old < ms.len() {
                break;
            }
        }
        self.drop_oldest(expired)
    }

    /// Drops the oldest `n` rows (fewer if some are being spilled: those wait for their
    /// file); returns how many went.
    fn drop_oldest(&mut self, n: u64) -> u64 {
        let mut left = n;
        while left > 0 && !self.spilled.is_empty() {
            let file = &mut self.spilled[0];
            let gone = drop_front(&mut file.batches, left, &mut 0);
            left -= gone;
            self.spilled_rows -= gone.min(self.spilled_rows);
            if file.batches.is_empty() {
                let _ = std::fs::remove_file(&file.path);
                self.spilled.remove(0);
            }
        }
        if left > 0 && self.spilling == 0 {
            left -= drop_front(&mut self.sealed, left, &mut self.bytes);
            left -= drop_front(&mut self.small, left, &mut self.bytes);
        }
        let dropped = n - left;
        self.rows -= dropped;
        self.expired_rows += dropped;
        // The dropped rows were the oldest: those saved come first.
        self.saved_rows -= dropped.min(self.saved_rows);
        let mut expired_in_files = self.file_rows.iter().sum::<u64>().saturating_sub(self.saved_rows);
        while self.file_rows.first().is_some_and(|&rows| rows <= expired_in_files) {
            expired_in_files -= self.file_rows.remove(0);
            self.files.remove(0);
        }
        dropped
    }

    fn append(&mut self, batch: RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        self.bytes += batch.get_array_memory_size() as u64;
        if batch.num_rows() >= SMALL_BATCH_ROWS {
            self.sealed.push(batch);
            return Ok(());
        }
        self.small.push(batch);
        if self.small.len() >= SMALL_BATCHES_MAX {
            let merged = concat_batches(&self.small[0].schema(), &self.small)?;
            // The small batches' buffers are freed: count the merged batch instead.
            let freed: u64 = self.small.drain(..).map(|b| b.get_array_memory_size() as u64).sum();
            self.bytes = self.bytes - freed.min(self.bytes) + merged.get_array_memory_size() as u64;
            self.sealed.push(merged);
        }
        Ok(())
    }

    /// Every retained row, oldest first (reference-counted, no row copies).
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        self.batches_from(0)
    }

    /// The retained rows after the first `skip`.
    fn batches_from(&self, mut skip: u64) -> Vec<RecordBatch> {
        let spilled = self.spilled.iter().flat_map(|f| f.batches.iter());
        let mut out = Vec::new();
        for batch in spilled.chain(&self.sealed).chain(&self.small) {
            let rows = batch.num_rows() as u64;
            if skip >= rows {
                skip -= rows;
                continue;
            }
            out.push(if skip == 0 { batch.clone() } else { batch.slice(skip as usize, (rows - skip) as usize) });
            skip = 0;
        }
        out
    }

    /// The rows no checkpoint holds yet (zero-copy slices).
    fn unsaved(&self) -> Vec<RecordBatch> {
        self.batches_from(self.saved_rows)
    }

    /// The spill due under `policy`, if more rows are in memory than it allows: the
    /// oldest batches down to half the limit, marked as being written.
    fn spill_due(&mut self, name: &Arc<str>, policy: &SpillPolicy, next_file: &mut u64) -> Option<SpillJob> {
        let mut resident = self.resident_rows();
        if resident <= policy.limit {
            return None;
        }
        // Small appends become candidates as they are (merged, they could only spill
        // all at once).
        self.sealed.append(&mut self.small);
        let mut batches = Vec::new();
        for batch in &self.sealed[self.spilling..] {
            if resident <= policy.limit / 2 {
                break;
            }
            resident -= batch.num_rows() as u64;
            batches.push(batch.clone());
        }
        if batches.is_empty() {
            return None;
        }
        self.spilling += batches.len();
        *next_file += 1;
        let path = policy.dir.join(format!("{}-{}.arrow", self.epoch, next_file));
        Some(SpillJob { name: name.clone(), epoch: self.epoch, batches, path })
    }

    /// Rows in memory that no spill is writing yet.
    fn resident_rows(&self) -> u64 {
        let spilling: u64 = self.sealed[..self.spilling].iter().map(|b| b.num_rows() as u64).sum();
        self.rows - self.spilled_rows - spilling
    }

    fn remove_files(&self) {
        for file in &self.spilled {
            let _ = std::fs::remove_file(&file.path);
        }
    }
}

/// Drops up to `n` rows from the front of `batches` (whole batches, then a slice of the
/// next), taking the memory of whole batches off `bytes`; returns how many went.
fn drop_front(batches: &mut Vec<RecordBatch>, n: u64, bytes: &mut u64) -> u64 {
    let mut left = n;
    let mut whole = 0;
    for batch in batches.iter() {
        let rows = batch.num_rows() as u64;
        if rows > left {
            break;
        }
        left -= rows;
        whole += 1;
    }
    for batch in batches.drain(..whole) {
        *bytes -= (batch.get_array_memory_size() as u64).min(*bytes);
    }
    if left > 0 {
        if let Some(first) = batches.first_mut() {
            let rows = first.num_rows();
            *first = first.slice(left as usize, rows - left as usize);
            left = 0;
        }
    }
    n - left
}

/// Where and when a shard's retained rows spill to disk: beyond `limit` rows in memory
/// per source or stream (the database's `table_spill_threshold` divided over its shards),
/// the oldest sealed batches go to files under `dir` until half the limit is left.
#[derive(Clone, Debug)]
pub struct SpillPolicy {
    pub dir: PathBuf,
    pub limit: u64,
}

/// `name`'s rows, created empty (with the next epoch) if it has none yet.
fn entry<'a>(sources: &'a mut HashMap<Arc<str>, SourceRows>, next_epoch: &mut u64, name: &Arc<str>) -> &'a mut SourceRows {
    sources.entry(name.clone()).or_insert_with(|| {
        *next_epoch += 1;
        SourceRows::new(*next_epoch)
    })
}

/// One shard's partition of every source. `Local*`: it never leaves its shard's thread.
pub struct LocalStore {
    sources: HashMap<Arc<str>, SourceRows>,
    spill: Option<SpillPolicy>,
    next_epoch: u64,
    next_file: u64,
}

impl LocalStore {
    pub fn new(spill: Option<SpillPolicy>) -> Self {
        LocalStore { sources: HashMap::new(), spill, next_epoch: 0, next_file: 0 }
    }

    /// Keeps `batch` among `name`'s rows; returns the spill that is now due, if any.
    pub fn append(&mut self, name: &Arc<str>, batch: RecordBatch) -> Result<Option<SpillJob>> {
        let LocalStore { sources, spill, next_epoch, next_file } = self;
        let rows = entry(sources, next_epoch, name);
        rows.append(batch)?;
        if rows.retention.is_some() {
            rows.expire_rows();
        }
        Ok(spill.as_ref().and_then(|policy| rows.spill_due(name, policy, next_file)))
    }

    /// `name` keeps only what `policy` retains from now on.
    pub fn set_retention(&mut self, name: &Arc<str>, policy: RetainPolicy) {
        let rows = entry(&mut self.sources, &mut self.next_epoch, name);
        rows.retention = Some(policy);
        rows.expire_rows();
    }

    /// `name`'s watermark on this shard is now `watermark`: rows older than its time
    /// retention go (nothing happens for a source without one, or for a stream).
    pub fn expire(&mut self, name: &str, watermark: Watermark) -> u64 {
        match self.sources.get_mut(name) {
            Some(rows) if rows.retention.is_some() => rows.expire_time(Some(watermark)) + rows.expire_rows(),
            _ => 0,
        }
    }

    /// The spill `name` is due for, if any (see [`SourceRows::spill_due`]).
    pub fn spill_due(&mut self, name: &Arc<str>) -> Option<SpillJob> {
        let policy = self.spill.as_ref()?;
        self.sources.get_mut(name)?.spill_due(name, policy, &mut self.next_file)
    }

    /// Spilling failed: from now on every row stays in memory.
    pub fn stop_spilling(&mut self) {
        self.spill = None;
    }

    /// A spill job finished: on success its batches in memory are replaced by the
    /// file's (`mapped`). A file whose source has gone since is deleted.
    pub fn spilled(&mut self, name: &str, epoch: u64, batches: usize, path: PathBuf, mapped: Result<Vec<RecordBatch>>) -> Result<()> {
        let Some(rows) = self.sources.get_mut(name).filter(|r| r.epoch == epoch) else {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        };
        rows.spilling -= batches;
        let mapped = mapped?;
        let freed: u64 = rows.sealed.drain(..batches).map(|b| b.get_array_memory_size() as u64).sum();
        rows.bytes -= freed.min(rows.bytes);
        rows.spilled_rows += mapped.iter().map(|b| b.num_rows() as u64).sum::<u64>();
        rows.spilled.push(SpillFile { path, batches: mapped });
        // Retention stops at batches being spilled: it catches up now.
        if rows.retention.is_some() {
            rows.expire_time(rows.mark);
            rows.expire_rows();
        }
        Ok(())
    }

    pub fn scan(&self, source: &str) -> Vec<RecordBatch> {
        self.sources.get(source).map(SourceRows::snapshot).unwrap_or_default()
    }

    pub fn drop_source(&mut self, source: &str) {
        if let Some(rows) = self.sources.remove(source) {
            rows.remove_files();
        }
    }

    pub fn stats(&self, source: &str) -> RowStats {
        self.sources.get(source).map_or(RowStats::default(), |s| RowStats {
            rows: s.rows,
            bytes: s.bytes,
            spilled_rows: s.spilled_rows,
            expired_rows: s.expired_rows,
        })
    }

    pub fn names(&self) -> Vec<Arc<str>> {
        self.sources.keys().cloned().collect()
    }

    /// Rows of `name` that no checkpoint holds yet.
    pub fn unsaved(&self, name: &str) -> Vec<RecordBatch> {
        self.sources.get(name).map(SourceRows::unsaved).unwrap_or_default()
    }

    /// Every row of `name` is now in its checkpoint files, the last of them `file` (if
    /// there were new rows).
    pub fn mark_saved(&mut self, name: &str, file: Option<String>) {
        if let Some(rows) = self.sources.get_mut(name) {
            if let Some(file) = file {
                rows.files.push(file);
                rows.file_rows.push(rows.rows - rows.saved_rows);
            }
            rows.saved_rows = rows.rows;
        }
    }

    pub fn files(&self, name: &str) -> Vec<String> {
        self.sources.get(name).map(|s| s.files.clone()).unwrap_or_default()
    }

    /// Rows loaded from checkpoint `files` (each with its row count): retained as saved
    /// (the caller asks `spill_due` afterwards, and `expire` once the watermarks are in).
    pub fn restore(&mut self, name: &Arc<str>, batches: Vec<RecordBatch>, files: Vec<(String, u64)>) -> Result<()> {
        let rows = entry(&mut self.sources, &mut self.next_epoch, name);
        for batch in batches {
            rows.append(batch)?;
        }
        rows.saved_rows = rows.rows;
        (rows.files, rows.file_rows) = files.into_iter().unzip();
        rows.expire_rows();
        Ok(())
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        for rows in self.sources.values() {
            rows.remove_files();
        }
    }
}

/// Starts the thread that writes spill jobs, off the shards' reactors; each job's answer
/// goes back to its shard as `Exchange::Spilled`. It ends once every sender is gone.
pub(crate) fn start_spill_thread() -> std::io::Result<(std::thread::JoinHandle<()>, flume::Sender<SpillRequest>)> {
    let (jobs, queue) = flume::unbounded::<SpillRequest>();
    let thread = std::thread::Builder::new().name("laminar-spill".into()).spawn(move || {
        for (job, reply) in queue {
            let mapped = write_spill(&job).and_then(|()| map_spill(&job.path));
            let batches = job.batches.len();
            let _ = reply.send(Exchange::Spilled { name: job.name, epoch: job.epoch, batches, path: job.path, mapped });
        }
    })?;
    Ok((thread, jobs))
}

/// Writes one spill job's rows to its file (not synced: spill files are not durable),
/// streamed: large buffers go to the file as they are, not through one growing `Vec`.
fn write_spill(job: &SpillJob) -> Result<()> {
    let Some(first) = job.batches.first() else { return Ok(()) };
    if let Some(dir) = job.path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| wal::io_error(dir, e))?;
    }
    let file = std::fs::File::create(&job.path).map_err(|e| wal::io_error(&job.path, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
    ipc::write(&first.schema(), &job.batches, &mut out)?;
    std::io::Write::flush(&mut out).map_err(|e| wal::io_error(&job.path, e))
}

/// The batches of a spill file, memory-mapped: their arrays point into the mapping,
/// which lives as long as any of them.
fn map_spill(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| wal::io_error(path, e))?;
    // SAFETY: spill files are written once, before this, and never modified while
    // mapped (they are only deleted, which keeps the mapping valid).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| wal::io_error(path, e))?;
    let ptr = std::ptr::NonNull::new(map.as_ptr() as *mut u8).ok_or_else(|| Error::internal("an empty spill file"))?;
    let len = map.len();
    // SAFETY: `ptr` is valid for `len` bytes as long as `map` lives; the buffer owns it.
    let buffer = unsafe { Buffer::from_custom_allocation(ptr, len, Arc::new(map)) };
    ipc::read_buffer(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};

    fn one_row(v: i64) -> RecordBatch {
        RecordBatch::try_from_iter(vec![("v", Arc::new(Int64Array::from(vec![v])) as ArrayRef)]).unwrap()
    }

    #[test]
    fn single_row_appends_are_compacted_and_all_kept() {
        let mut store = LocalStore::new(None);
        let src: Arc<str> = "t".into();
        for i in 0..200 {
            store.append(&src, one_row(i)).unwrap();
        }
        let batches = store.scan("t");
        assert!(batches.len() <= 4 + SMALL_BATCHES_MAX, "{} batches", batches.len());
        let sum: i64 = batches
            .iter()
            .map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().iter().sum::<i64>())
            .sum();
        assert_eq!(sum, (0..200).sum::<i64>());
        assert_eq!(store.stats("t").rows, 200);
        // The memory counted is that of the batches kept, not of the appends merged away.
        let held: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
        assert_eq!(store.stats("t").bytes, held as u64);
    }
    fn batch_of(from: i64, n: i64) -> RecordBatch {
        RecordBatch::try_from_iter(vec![("v", Arc::new(Int64Array::from_iter_values(from..from + n)) as ArrayRef)]).unwrap()
    }

    fn values(batches: &[RecordBatch]) -> Vec<i64> {
        batches.iter().flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()).collect()
    }

    fn timed(from: i64, n: i64) -> RecordBatch {
        RecordBatch::try_from_iter(vec![("ts", Arc::new(Int64Array::from_iter_values((from..from + n).map(|t| t * 10))) as ArrayRef)])
            .unwrap()
    }

    #[test]
    fn retention_drops_the_oldest_rows_whole_batches_first_then_a_slice() {
        let mut store = LocalStore::new(None);
        let src: Arc<str> = "t".into();
        store.set_retention(&src, RetainPolicy { time: Some((0, 100)), rows: Some(250) });
        for i in 0..3 {
            store.append(&src, timed(i * 100, 100)).unwrap(); // ts 0..2990 step 10
        }
        store.mark_saved("t", Some("rows-1".into()));
        assert_eq!(store.stats("t").rows, 250, "the row retention keeps the newest 250");
        assert_eq!(store.stats("t").expired_rows, 50);
        assert_eq!(values(&store.scan("t"))[0], 500);
        // watermark 2,000: rows before 1,900 go (whole first batch, a slice of the second)
        assert_eq!(store.expire("t", Watermark::new(2_000)), 140);
        let kept = values(&store.scan("t"));
        assert_eq!(kept, (190..300).map(|t| t * 10).collect::<Vec<_>>());
        assert_eq!(store.stats("t").expired_rows, 190);
        assert_eq!(store.expire("t", Watermark::new(1_500)), 0, "a watermark does not move back");
        assert_eq!(store.files("t"), vec!["rows-1".to_string()], "the file still holds retained rows");
        store.append(&src, timed(300, 250)).unwrap();
        assert_eq!(store.files("t"), Vec::<String>::new(), "every row of the file has expired: it leaves the list");
        assert_eq!(values(&store.scan("t")), (300..550).map(|t| t * 10).collect::<Vec<_>>());
        assert_eq!(values(&store.unsaved("t")).len(), 250);
        assert_eq!(store.expire("other", Watermark::new(1 << 40)), 0, "no retention, nothing dropped");
        assert_eq!(RetainPolicy::share(10, 0, 3) + RetainPolicy::share(10, 1, 3) + RetainPolicy::share(10, 2, 3), 10);
        assert_eq!((RetainPolicy::share(10, 0, 3), RetainPolicy::share(10, 2, 3)), (4, 3));
    }

    #[test]
    fn retention_deletes_spill_files_once_all_their_rows_have_expired() {
        let dir = std::env::temp_dir().join(format!("laminardb-retention-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = LocalStore::new(Some(SpillPolicy { dir: dir.clone(), limit: 1_000 }));
        let src: Arc<str> = "t".into();
        store.set_retention(&src, RetainPolicy { time: None, rows: Some(2_500) });
        let mut jobs = Vec::new();
        for i in 0..3 {
            jobs.extend(store.append(&src, batch_of(i * 1_000, 1_000)).unwrap());
        }
        let [job] = <[SpillJob; 1]>::try_from(jobs).ok().expect("one spill");
        assert_eq!(values(&job.batches), (0..2_000).collect::<Vec<_>>());
        store.append(&src, batch_of(3_000, 1_000)).unwrap();
        assert_eq!(store.stats("t").rows, 4_000, "rows being spilled wait for their file");
        write_spill(&job).unwrap();
        let mapped = map_spill(&job.path);
        store.spilled("t", job.epoch, job.batches.len(), job.path.clone(), mapped).unwrap();
        let stats = store.stats("t");
        assert_eq!((stats.rows, stats.expired_rows), (2_500, 1_500), "caught up once the spill is in");
        assert_eq!(values(&store.scan("t")), (1_500..4_000).collect::<Vec<_>>());
        assert!(job.path.exists(), "the file still holds rows 1,500..2,000");
        store.append(&src, batch_of(4_000, 500)).unwrap();
        assert!(!job.path.exists(), "a spill file whose rows have all expired is deleted");
        assert_eq!(store.stats("t").spilled_rows, 0);
        assert_eq!(values(&store.scan("t")), (2_000..4_500).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_beyond_the_limit_spill_oldest_first_and_scans_and_checkpoints_read_them_back() {
        let dir = std::env::temp_dir().join(format!("laminardb-spill-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = LocalStore::new(Some(SpillPolicy { dir: dir.clone(), limit: 20_000 }));
        let src: Arc<str> = "t".into();
        for i in 0..4 {
            assert!(store.append(&src, batch_of(i * 5_000, 5_000)).unwrap().is_none(), "20,000 rows fit");
        }
        store.mark_saved("t", Some("rows-1".into()));
        // 25,000 in memory: the oldest go until half the limit is left.
        let job = store.append(&src, batch_of(20_000, 5_000)).unwrap().expect("over the limit");
        assert_eq!(values(&job.batches), (0..15_000).collect::<Vec<_>>());
        assert!(store.spill_due(&src).is_none(), "a spill is under way");
        write_spill(&job).unwrap();
        let mapped = map_spill(&job.path);
        assert_eq!(mapped.as_ref().map(|b| values(b)).ok(), Some((0..15_000).collect::<Vec<_>>()));
        // Until the spill is in, scans read the batches in memory.
        assert_eq!(values(&store.scan("t")), (0..25_000).collect::<Vec<_>>());
        let bytes = store.stats("t").bytes;
        store.spilled("t", job.epoch, job.batches.len(), job.path.clone(), mapped).unwrap();
        let stats = store.stats("t");
        assert_eq!((stats.rows, stats.spilled_rows), (25_000, 15_000));
        assert!(stats.bytes < bytes / 2, "the spilled batches' memory is released: {} of {bytes}", stats.bytes);
        assert_eq!(values(&store.scan("t")), (0..25_000).collect::<Vec<_>>());
        assert_eq!(values(&store.unsaved("t")), (20_000..25_000).collect::<Vec<_>>());
        // A failed spill keeps the rows in memory.
        let jobs: Vec<SpillJob> = (5..8).filter_map(|i| store.append(&src, batch_of(i * 5_000, 5_000)).unwrap()).collect();
        let [job] = <[SpillJob; 1]>::try_from(jobs).ok().expect("one spill: when 25,000 rows are in memory again");
        let failed = store.spilled("t", job.epoch, job.batches.len(), job.path.clone(), Err(laminardb_engine::Error::internal("disk full")));
        assert!(failed.is_err());
        assert_eq!(values(&store.scan("t")), (0..40_000).collect::<Vec<_>>());
        // A spill that finishes after its source was dropped leaves no file behind.
        let job = store.spill_due(&src).expect("due again");
        write_spill(&job).unwrap();
        let mapped = map_spill(&job.path);
        store.drop_source("t");
        store.spilled("t", job.epoch, job.batches.len(), job.path.clone(), mapped).unwrap();
        assert!(!job.path.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "dropping a source deletes its spill files");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
