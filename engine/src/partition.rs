//! Hash partitioning of a batch onto shards.
//!
//! The hash is DataFusion's (the same one its repartitioning uses), so a group key lands
//! on the same shard whether it arrives by insert or by a later cross-shard exchange.

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use datafusion::common::hash_utils::{create_hashes, RandomState};

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
    let (_, owned) = owners(batch, key, shards)?;
    owned.into_iter().map(|rows_of_shard| take_part(batch, rows_of_shard)).collect()
}

/// Splits `batch` by the hash of its `key` columns (not empty), keeping each part's
/// rows' key hashes beside it: an aggregate finds its groups by the same hash
/// (`key_hashes`), so the owner need not hash them again.
pub fn partition_by_key(batch: &RecordBatch, key: &[usize], shards: usize) -> Result<Vec<Option<(RecordBatch, Vec<u64>)>>> {
    let (mut hashes, owned) = owners(batch, key, shards)?;
    owned
        .into_iter()
        .map(|rows_of_shard| {
            if rows_of_shard.is_empty() {
                return Ok(None);
            }
            // A shard taking every row takes the hashes as they are.
            let part_hashes = if rows_of_shard.len() == hashes.len() {
                std::mem::take(&mut hashes)
            } else {
                rows_of_shard.iter().map(|&r| hashes[r as usize]).collect()
            };
            Ok(take_part(batch, rows_of_shard)?.map(|part| (part, part_hashes)))
        })
        .collect()
}

/// The key hash of every row of `batch`, and the rows each shard owns.
fn owners(batch: &RecordBatch, key: &[usize], shards: usize) -> Result<(Vec<u64>, Vec<Vec<u32>>)> {
    let rows = batch.num_rows();
    let cols: Vec<ArrayRef> = key.iter().map(|&i| batch.column(i).clone()).collect();
    let hashes = key_hashes(&cols, rows)?;
    let mut owned: Vec<Vec<u32>> = vec![Vec::with_capacity(rows / shards + 1); shards];
    for (row, h) in hashes.iter().enumerate() {
        owned[shard_of(*h, shards)].push(row as u32);
    }
    Ok((hashes, owned))
}

/// The rows of `batch` one shard owns (`None` if none); all of them share the batch as is.
fn take_part(batch: &RecordBatch, rows_of_shard: Vec<u32>) -> Result<Option<RecordBatch>> {
    if rows_of_shard.is_empty() {
        return Ok(None);
    }
    if rows_of_shard.len() == batch.num_rows() {
        return Ok(Some(batch.clone()));
    }
    Ok(Some(take_record_batch(batch, &UInt32Array::from(rows_of_shard))?))
}

/// One hash per row of the key `columns` (DataFusion's, with a fixed seed): what decides
/// a key's shard, and what an aggregate indexes its groups by.
pub fn key_hashes(columns: &[ArrayRef], rows: usize) -> Result<Vec<u64>> {
    let state = RandomState::with_seed(PARTITION_SEED);
    let mut hashes = vec![0u64; rows];
    create_hashes(columns, &state, &mut hashes)?;
    Ok(hashes)
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
    fn each_part_carries_the_key_hashes_of_its_own_rows() {
        let b = batch(1000);
        let parts = partition_by_key(&b, &[0], 3).unwrap();
        let mut total = 0;
        for (shard, (rows, hashes)) in parts.into_iter().enumerate().filter_map(|(s, p)| p.map(|p| (s, p))) {
            assert_eq!(hashes, key_hashes(&[rows.column(0).clone()], rows.num_rows()).unwrap());
            assert!(hashes.iter().all(|&h| shard_of(h, 3) == shard));
            total += rows.num_rows();
        }
        assert_eq!(total, 1000);
        // Every row on one shard: the batch and its hashes go there whole.
        let one = batch(1);
        let parts = partition_by_key(&one, &[0], 3).unwrap();
        let whole: Vec<_> = parts.iter().flatten().collect();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].1, key_hashes(&[one.column(0).clone()], 1).unwrap());
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
