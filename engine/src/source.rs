//! Sources that produce their own rows (`CREATE SOURCE … WITH (connector = …)`), as
//! opposed to those that Python inserts into.
//!
//! A connector ([`SourceConnector`]) splits its input into numbered splits (a Kafka
//! topic's partitions, a generator's interleaved ranges); split `s` is read by shard
//! `s % shards`, through a [`SplitReader`] that lives on that shard's thread. The shard
//! polls its readers between commands, appends their rows like inserted ones and moves
//! the source's watermark on itself to the least of its splits' watermarks. A shard
//! reading no split of a source holds nothing back: to the rest of the dataflow its part
//! of the source has ended.
//!
//! At a checkpoint barrier every reader's [`position`](SplitReader::position) is
//! recorded beside the shard's state, which holds exactly the rows read up to that
//! position (both are taken on the shard's thread, between two polls). A restore opens
//! each reader at its recorded position: no row is read twice into the state, none is
//! skipped. Rows read after the last checkpoint are not in the WAL: they are read again.
//!
//! Connectors built in so far: `nexmark` ([`crate::nexmark`]).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::error::{Error, Result};
use crate::nexmark::NexmarkConfig;

/// The watermark of a split that has ended (and so of a source whose every split has):
/// past any window, so every window closes (bounded input ends like a stream whose time
/// ran out).
pub const END_OF_INPUT: i64 = i64::MAX / 4;

/// What a connector source is: its schema, how it splits, how a split is read.
pub trait SourceConnector: Send + Sync + Debug {
    /// The connector's name, as `WITH (connector = …)` spells it.
    fn name(&self) -> &'static str;

    fn schema(&self) -> SchemaRef;

    /// A timestamp column whose values the splits produce in ascending order: the
    /// source's watermark follows it when the DDL declares none.
    fn ordered_time_column(&self) -> Option<&'static str> {
        None
    }

    /// How many splits the source has when read by `shards` shards (fixed while open).
    fn splits(&self, shards: usize) -> Result<usize>;

    /// A reader of split `split` of `splits`, going on after `position` (what
    /// [`SplitReader::position`] said at a checkpoint), or from the split's start.
    fn open(&self, split: usize, splits: usize, position: Option<&[u8]>) -> Result<Box<dyn SplitReader>>;
}

/// What one poll of a split found.
#[derive(Debug)]
pub enum SplitPoll {
    /// Rows; the split may have more at once.
    Rows(RecordBatch),
    /// Nothing now: poll again after about this long.
    Pending(Duration),
    /// The split has ended: nothing more comes.
    End,
}

/// One split, read on one shard's thread.
pub trait SplitReader {
    /// The next rows, without blocking.
    fn poll(&mut self) -> Result<SplitPoll>;

    /// Where the split is: reading on from here reads what follows the rows polled so far.
    fn position(&self) -> Vec<u8>;

    /// The event time (epoch ms) that every row the split has yet to produce is at or
    /// after, if the split knows it (a generator does). `None`: the engine takes the
    /// latest event time among the rows read so far. The source's declared watermark
    /// delay is subtracted either way.
    fn progress(&self) -> Option<i64> {
        None
    }

    /// The split is dropped or the database closes.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Connectors the spec names that this build does not have as sources yet.
const PLANNED: &[&str] = &[
    "kafka", "websocket", "postgres-cdc", "postgres_cdc", "mysql-cdc", "mysql_cdc", "rabbitmq", "file", "files",
    "parquet", "csv", "json", "redis", "nats", "mqtt",
];

/// The connector `WITH (connector = …)` names, built from its options; `None` without a
/// `connector` option (a source Python inserts into).
pub fn connector(options: &BTreeMap<String, String>) -> Result<Option<Arc<dyn SourceConnector>>> {
    let Some(name) = options.get("connector").map(|c| c.to_ascii_lowercase()) else { return Ok(None) };
    match name.as_str() {
        "nexmark" => Ok(Some(Arc::new(NexmarkConfig::from_options(options)?))),
        c if PLANNED.contains(&c) => Err(Error::connector(format!(
            "source connector '{c}' is not available in this build yet (only 'nexmark'; insert rows from Python for the rest)"
        ))),
        c => Err(Error::connector(format!("unknown source connector '{c}' (available: 'nexmark')"))),
    }
}

/// A position as 8 little-endian bytes (what simple splits record: an offset).
pub fn offset_position(offset: u64) -> Vec<u8> {
    offset.to_le_bytes().to_vec()
}

/// The offset [`offset_position`] wrote; an error names `what` if the bytes are not one.
pub fn read_offset_position(bytes: &[u8], what: &str) -> Result<u64> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::checkpoint(format!("{what}: a recorded split position of {} bytes, not 8", bytes.len())))?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectors_are_built_refused_as_planned_or_unknown() {
        let options = |c: &str| -> BTreeMap<String, String> {
            [("connector".to_string(), c.to_string()), ("table".to_string(), "bid".to_string())].into_iter().collect()
        };
        assert_eq!(connector(&options("NEXMARK")).unwrap().unwrap().name(), "nexmark");
        assert!(connector(&BTreeMap::new()).unwrap().is_none());
        let planned = connector(&options("kafka")).unwrap_err();
        assert!(planned.message.contains("not available in this build yet"), "{}", planned.message);
        let unknown = connector(&options("telepathy")).unwrap_err();
        assert!(unknown.message.contains("unknown source connector 'telepathy'"), "{}", unknown.message);
    }

    #[test]
    fn offset_positions_round_trip_and_refuse_other_lengths() {
        assert_eq!(read_offset_position(&offset_position(42), "t").unwrap(), 42);
        let e = read_offset_position(&[1, 2, 3], "split 0 of 't'").unwrap_err();
        assert!(e.message.contains("split 0 of 't'") && e.message.contains("3 bytes"), "{}", e.message);
    }
}
