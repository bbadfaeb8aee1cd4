//! Sources that produce their own rows (`CREATE SOURCE … WITH (connector = …)`), as
//! opposed to those that Python inserts into.
//!
//! A connector ([`SourceConnector`]) splits its input into numbered splits (a Kafka
//! topic's partitions, a generator's interleaved ranges); split `s` is read by shard
//! `s % shards`, through a [`SplitReader`] that lives on that shard's thread. The shard
//! polls its readers between commands, appends their rows like inserted ones and moves
//! the source's watermark on itself to the least of its splits' watermarks, leaving out
//! splits without rows for `idle_timeout_ms` (all idle: the shard's part of the source is
//! idle to every shard's operators). A shard reading no split of a source holds nothing
//! back: to the rest of the dataflow its part of the source has ended.
//!
//! At a checkpoint barrier every reader's [`position`](SplitReader::position) is
//! recorded beside the shard's state, which holds exactly the rows read up to that
//! position (both are taken on the shard's thread, between two polls). A restore opens
//! each reader at its recorded position: no row is read twice into the state, none is
//! skipped. Rows read after the last checkpoint are not in the WAL: they are read again.
//!
//! Built in: `nexmark` ([`crate::nexmark`]); other crates add theirs with [`register`]
//! (`laminardb-connectors`: `files`, `kafka`, `websocket`).

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

    /// The rows are changes (a CDC feed): the schema's last column is `_op`
    /// ([`crate::stream::OP_COLUMN`]), each row's `+I`, `-U`, `+U` or `-D`, and readers
    /// take the source as a changelog, as they take a changelog stream.
    fn changelog(&self) -> bool {
        false
    }

    /// How many splits the source has when read by `shards` shards.
    fn splits(&self, shards: usize) -> Result<usize>;

    /// How many splits the source has now, when that can grow while it is read (a Kafka
    /// topic given partitions): each shard asks at every poll round and opens the new
    /// splits it owns, so it must answer from what the connector already knows (no I/O).
    /// `None` (the default): the splits are fixed while open.
    fn splits_now(&self) -> Option<usize> {
        None
    }

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
    /// Input that could not be read was left out (a file that does not decode), or there
    /// is nothing to read for a reason the user must hear of (a directory that does not
    /// exist): counted in the source's errors and logged, and reading goes on.
    Skipped(String),
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

    /// Messages received but not yet polled, and how many the reader's queue holds
    /// (`None`: the reader has no queue of its own, e.g. a file, or cannot tell).
    fn backlog(&self) -> Option<Backlog> {
        None
    }

    /// The split is dropped or the database closes.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A reader's queue: `pending` of `capacity` (a full one has stopped taking input).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: u64,
    pub capacity: u64,
}

/// Connectors the spec names that this build does not have as sources yet.
const PLANNED: &[&str] = &[
    "kafka", "websocket", "postgres-cdc", "postgres_cdc", "mysql-cdc", "mysql_cdc", "rabbitmq", "redis", "nats", "mqtt",
];

/// Builds a connector from a `CREATE SOURCE`'s options and declared columns (`None`: the
/// statement declared none).
pub type SourceFactory = fn(&ConnectorOptions, Option<&SchemaRef>) -> Result<Arc<dyn SourceConnector>>;

/// Connectors other crates add (`laminardb-connectors` registers its own when the Python
/// module loads); looked up at `CREATE SOURCE`, never on the data path.
static REGISTERED: parking_lot::RwLock<BTreeMap<&'static str, SourceFactory>> = parking_lot::const_rwlock(BTreeMap::new());

/// Makes `name` available to `CREATE SOURCE … WITH (connector = name)`.
pub fn register(name: &'static str, factory: SourceFactory) {
    REGISTERED.write().insert(name, factory);
}

/// The names `connector = …` accepts.
pub fn available() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = REGISTERED.read().keys().copied().collect();
    names.push("nexmark");
    names.sort_unstable();
    names
}

/// The connector `WITH (connector = …)` names, built from its options (after `${VAR}`
/// substitution) and the declared columns; `None` without a `connector` option (a
/// source Python inserts into).
pub fn connector(options: &BTreeMap<String, String>, declared: Option<&SchemaRef>) -> Result<Option<Arc<dyn SourceConnector>>> {
    let Some(name) = options.get("connector").map(|c| c.to_ascii_lowercase()) else { return Ok(None) };
    let list = || available().iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    if name == "nexmark" {
        return Ok(Some(Arc::new(NexmarkConfig::from_options(options)?)));
    }
    let factory = REGISTERED.read().get(name.as_str()).copied();
    match factory {
        Some(factory) => Ok(Some(factory(&ConnectorOptions::new(&name, options)?, declared)?)),
        None if PLANNED.contains(&name.as_str()) => Err(Error::connector(format!(
            "source connector '{name}' is not available in this build yet (available: {}; insert rows from Python for the rest)",
            list()
        ))),
        None => Err(Error::connector(format!("unknown source connector '{name}' (available: {})", list()))),
    }
}

/// Keys every source takes, whatever its connector (the planner reads them).
pub const SOURCE_KEYS: [&str; 6] = ["connector", "partition_key", "watermark_column", "watermark_delay_ms", "retention", "retention_rows"];

/// A connector's `WITH` options, `${VAR}` replaced by the environment's value (the DDL
/// keeps the reference: a secret is not written to the catalog, the WAL or a checkpoint).
#[derive(Clone, Debug)]
pub struct ConnectorOptions {
    connector: String,
    values: BTreeMap<String, String>,
    /// Keys the engine reads itself, whatever the connector (`check_known` lets them by).
    general: &'static [&'static str],
}

impl ConnectorOptions {
    /// A source's options.
    pub fn new(connector: &str, options: &BTreeMap<String, String>) -> Result<ConnectorOptions> {
        Self::with_general(connector, options, &SOURCE_KEYS)
    }

    /// A lookup table's options.
    pub fn for_lookup(connector: &str, options: &BTreeMap<String, String>) -> Result<ConnectorOptions> {
        Self::with_general(connector, options, &crate::lookup::LOOKUP_KEYS)
    }

    /// A sink's options.
    pub fn for_sink(connector: &str, options: &BTreeMap<String, String>) -> Result<ConnectorOptions> {
        Self::with_general(connector, options, &["connector"])
    }

    fn with_general(connector: &str, options: &BTreeMap<String, String>, general: &'static [&'static str]) -> Result<ConnectorOptions> {
        let values = options
            .iter()
            .map(|(k, v)| Ok((k.clone(), substitute_env(v).map_err(|e| Error::connector(format!("option '{k}': {e}")))?)))
            .collect::<Result<_>>()?;
        Ok(ConnectorOptions { connector: connector.to_string(), values, general })
    }

    pub fn connector(&self) -> &str {
        &self.connector
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key`, which the connector cannot go without.
    pub fn required(&self, key: &str) -> Result<&str> {
        self.get(key).ok_or_else(|| Error::connector(format!("connector '{}' needs the option '{key}'", self.connector)))
    }

    /// The value of `key` as a `T`, or `default` when absent.
    pub fn parse<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| {
                Error::connector(format!("connector '{}': option '{key}' = '{v}' is not a valid value", self.connector))
            }),
        }
    }

    /// Refuses a key that is neither one of `known` nor one every source takes.
    pub fn check_known(&self, known: &[&str]) -> Result<()> {
        self.check_known_or_prefixed(known, &[])
    }

    /// Refuses a key that is not one of `known`, does not start with one of `prefixes`
    /// (options handed on to a client library as they are) and is not one every source
    /// takes.
    pub fn check_known_or_prefixed(&self, known: &[&str], prefixes: &[&str]) -> Result<()> {
        let fits = |k: &str| known.contains(&k) || self.general.contains(&k) || prefixes.iter().any(|p| k.starts_with(p));
        match self.values.keys().find(|k| !fits(k)) {
            None => Ok(()),
            Some(key) => {
                let more = prefixes.iter().map(|p| format!("{p}*"));
                let list: Vec<String> = known.iter().map(|k| k.to_string()).chain(more).collect();
                Err(Error::connector(format!("connector '{}' has no option '{key}' (its options: {})", self.connector, list.join(", "))))
            }
        }
    }

    /// Every option, `${VAR}` substituted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// `text` with every `${NAME}` replaced by the environment variable `NAME`; an unset one
/// is an error naming it.
pub fn substitute_env(text: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("'${{' without a closing '}}' in '{text}'"))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| format!("the environment variable '{name}' is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
        assert_eq!(connector(&options("NEXMARK"), None).unwrap().unwrap().name(), "nexmark");
        assert!(connector(&BTreeMap::new(), None).unwrap().is_none());
        let planned = connector(&options("kafka"), None).unwrap_err();
        assert!(planned.message.contains("not available in this build yet"), "{}", planned.message);
        let unknown = connector(&options("telepathy"), None).unwrap_err();
        assert!(unknown.message.contains("unknown source connector 'telepathy' (available: "), "{}", unknown.message);
    }

    #[test]
    fn options_substitute_the_environment_and_name_what_is_missing_or_unknown() {
        std::env::set_var("LAMINARDB_TEST_SOURCE_DIR", "/data");
        let raw: BTreeMap<String, String> = [("path", "${LAMINARDB_TEST_SOURCE_DIR}/in/*.csv"), ("n", "12"), ("watermark_column", "ts")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let o = ConnectorOptions::new("files", &raw).unwrap();
        assert_eq!(o.get("path"), Some("/data/in/*.csv"));
        assert_eq!(o.parse::<u64>("n", 1).unwrap(), 12);
        assert_eq!(o.parse::<u64>("absent", 7).unwrap(), 7);
        assert!(o.required("format").unwrap_err().message.contains("needs the option 'format'"));
        o.check_known(&["path", "n"]).unwrap();
        let e = o.check_known(&["path"]).unwrap_err();
        assert!(e.message.contains("no option 'n'") && e.message.contains("its options: path"), "{}", e.message);
        let unset: BTreeMap<String, String> = [("k".to_string(), "${LAMINARDB_TEST_UNSET_VARIABLE}".to_string())].into_iter().collect();
        let e = ConnectorOptions::new("files", &unset).unwrap_err();
        assert!(e.message.contains("'LAMINARDB_TEST_UNSET_VARIABLE' is not set"), "{}", e.message);
        assert_eq!(substitute_env("a${LAMINARDB_TEST_SOURCE_DIR}b$c").unwrap(), "a/datab$c");
        assert!(substitute_env("${OPEN").is_err());
    }

    #[test]
    fn offset_positions_round_trip_and_refuse_other_lengths() {
        assert_eq!(read_offset_position(&offset_position(42), "t").unwrap(), 42);
        let e = read_offset_position(&[1, 2, 3], "split 0 of 't'").unwrap_err();
        assert!(e.message.contains("split 0 of 't'") && e.message.contains("3 bytes"), "{}", e.message);
    }
}
