//! A shard's retained rows: its partition of every source, owned by one thread.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;

use laminardb_engine::Result;

/// Small appends (single-row inserts) are merged once this many accumulate, so scans
/// stay vectorized however the rows arrived.
const SMALL_BATCHES_MAX: usize = 64;
/// A batch with fewer rows than this counts as small.
const SMALL_BATCH_ROWS: usize = 4096;

#[derive(Default)]
pub struct SourceRows {
    sealed: Vec<RecordBatch>,
    small: Vec<RecordBatch>,
    pub rows: u64,
    pub bytes: u64,
    /// Rows already in checkpoint files, and those files (oldest first).
    saved_rows: u64,
    files: Vec<String>,
}

impl SourceRows {
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
            self.small.clear();
            self.sealed.push(merged);
        }
        Ok(())
    }

    /// Every retained batch; cheap (reference-counted buffers, no row copies).
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        self.sealed.iter().chain(self.small.iter()).cloned().collect()
    }

    /// The rows no checkpoint holds yet (zero-copy slices).
    fn unsaved(&self) -> Vec<RecordBatch> {
        let mut skip = self.saved_rows as usize;
        let mut out = Vec::new();
        for batch in self.sealed.iter().chain(self.small.iter()) {
            if skip >= batch.num_rows() {
                skip -= batch.num_rows();
                continue;
            }
            out.push(batch.slice(skip, batch.num_rows() - skip));
            skip = 0;
        }
        out
    }
}

/// One shard's partition of every source. `Local*`: it never leaves its shard's thread.
#[derive(Default)]
pub struct LocalStore {
    sources: HashMap<Arc<str>, SourceRows>,
}

impl LocalStore {
    pub fn append(&mut self, source: &Arc<str>, batch: RecordBatch) -> Result<u64> {
        let rows = batch.num_rows() as u64;
        self.sources.entry(source.clone()).or_default().append(batch)?;
        Ok(rows)
    }

    pub fn scan(&self, source: &str) -> Vec<RecordBatch> {
        self.sources.get(source).map(SourceRows::snapshot).unwrap_or_default()
    }

    pub fn drop_source(&mut self, source: &str) {
        self.sources.remove(source);
    }

    pub fn rows(&self, source: &str) -> (u64, u64) {
        self.sources.get(source).map_or((0, 0), |s| (s.rows, s.bytes))
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
            rows.saved_rows = rows.rows;
            rows.files.extend(file);
        }
    }

    pub fn files(&self, name: &str) -> Vec<String> {
        self.sources.get(name).map(|s| s.files.clone()).unwrap_or_default()
    }

    /// Rows loaded from checkpoint `files`: retained as saved.
    pub fn restore(&mut self, name: &Arc<str>, batches: Vec<RecordBatch>, files: Vec<String>) -> Result<()> {
        for batch in batches {
            self.append(name, batch)?;
        }
        let rows = self.sources.entry(name.clone()).or_default();
        rows.saved_rows = rows.rows;
        rows.files = files;
        Ok(())
    }
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
        let mut store = LocalStore::default();
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
        assert_eq!(store.rows("t").0, 200);
    }
}
