//! Hash partitioning of a batch onto shards.
//!
//! The hash is DataFusion's (the same one its repartitioning uses), so a group key lands
//! on the same shard whether it arrives by insert or by a later cross-shard exchange.

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use datafusion::common::hash_utils::create_hashes;

use crate::error::Result;

/// Fixed seed: partitioning must be stable across runs (recovery replays by shard).
const PARTITION_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Splits `batch` into one batch per shard (empty shards get `None`). With no key the
/// rows are dealt out in contiguous slices, which is zero-copy.
pub fn partition_batch(
    batch: &RecordBatch,
    key: &[usize],
    shards: usize,
) -> Result<Vec<Option<RecordBatch>>> {
    let rows = batch.num_rows();
    if shards == 1 {
        return Ok(vec![(rows > 0).then(|| batch.clone())]);
    }
    if key.is_empty() {
        let per = rows.div_ceil(shards);
        return Ok((0..shards)
            .map(|s| {
                let start = (s * per).min(rows);
                let len = per.min(rows - start);
                // A shard taking every row (a single-row insert) shares the batch as is.
                (len > 0).then(|| if len == rows { batch.clone() } else { batch.slice(start, len) })
            })
            .collect());
    }
    let cols: Vec<_> = key.iter().map(|&i| batch.column(i).clone()).collect();
    let state = datafusion::common::hash_utils::RandomState::with_seed(PARTITION_SEED);
    let mut hashes = vec![0u64; rows];
    create_hashes(&cols, &state, &mut hashes)?;
    let mut idx: Vec<Vec<u32>> = vec![Vec::with_capacity(rows / shards + 1); shards];
    for (row, h) in hashes.iter().enumerate() {
        idx[shard_of(*h, shards)].push(row as u32);
    }
    idx.into_iter()
        .map(|rows_of_shard| {
            if rows_of_shard.is_empty() {
                return Ok(None);
            }
            if rows_of_shard.len() == rows {
                return Ok(Some(batch.clone()));
            }
            Ok(Some(take_record_batch(batch, &UInt32Array::from(rows_of_shard))?))
        })
        .collect()
}

/// Maps a hash onto a shard without the bias of a plain modulo on low bits.
pub fn shard_of(hash: u64, shards: usize) -> usize {
    ((hash as u128 * shards as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(n: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let syms: Vec<String> = (0..n).map(|i| format!("S{}", i % 7)).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(syms)),
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn every_row_lands_on_exactly_one_shard_and_keys_stay_together() {
        let b = batch(1000);
        let parts = partition_batch(&b, &[0], 4).unwrap();
        let total: usize = parts.iter().flatten().map(|p| p.num_rows()).sum();
        assert_eq!(total, 1000);
        let mut owner = std::collections::HashMap::new();
        for (s, p) in parts.iter().enumerate() {
            let Some(p) = p else { continue };
            let syms = p.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            for v in syms.iter().flatten() {
                assert_eq!(*owner.entry(v.to_string()).or_insert(s), s, "key {v} split");
            }
        }
    }

    #[test]
    fn keyless_split_is_contiguous() {
        let parts = partition_batch(&batch(10), &[], 3).unwrap();
        let sizes: Vec<usize> = parts.iter().map(|p| p.as_ref().map_or(0, |b| b.num_rows())).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        // A single row goes whole to the first shard.
        let parts = partition_batch(&batch(1), &[], 3).unwrap();
        let sizes: Vec<usize> = parts.iter().map(|p| p.as_ref().map_or(0, |b| b.num_rows())).collect();
        assert_eq!(sizes, vec![1, 0, 0]);
    }
}
