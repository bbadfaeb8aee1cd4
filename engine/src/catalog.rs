//! The catalog: every named object and its schema.
//!
//! The coordinator owns the one mutable [`Catalog`]; after each change it publishes an
//! immutable `Arc<Catalog>` snapshot that planners and the Python layer read without
//! talking to any shard.
//!
//! Names are looked up as written: unquoted SQL identifiers are folded to lower case by
//! the parser before they reach here, quoted ones keep their case.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};
use crate::source::SourceConnector;
use crate::stream::StreamPlan;

/// Streams that live only as long as one subscription (`subscribe(sql)`): never written
/// to the WAL, so a reopened database does not bring them back.
pub const TRANSIENT_PREFIX: &str = "__subscription_";

/// How event time advances for a source: `WATERMARK FOR col AS col - INTERVAL …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatermarkSpec {
    pub column: String,
    /// Allowed out-of-orderness: watermark = max(event time) - delay.
    pub delay_ms: i64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// An append-only stream of events.
    Source,
    /// A reference table (`CREATE TABLE` with a primary key upserts by key).
    Table,
    /// A table outside the engine that streams join by key (`CREATE LOOKUP TABLE`,
    /// [`crate::lookup`]): the shards hold none of its rows.
    Lookup,
}

#[derive(Clone, Debug)]
pub struct SourceDef {
    pub name: String,
    pub kind: SourceKind,
    pub schema: SchemaRef,
    pub watermark: Option<WatermarkSpec>,
    /// Column indices whose hash picks a row's shard; empty = spread by row position.
    pub partition_key: Vec<usize>,
    pub primary_key: Vec<usize>,
    pub options: BTreeMap<String, String>,
    /// The DDL text it was created from (for `streams()`-style introspection and recovery).
    pub sql: String,
    /// A source whose rows the shards read themselves (`WITH (connector = …)`).
    pub connector: Option<Arc<dyn SourceConnector>>,
    /// A lookup table's rows (`SourceKind::Lookup`).
    pub lookup: Option<Arc<dyn crate::lookup::LookupSource>>,
}

impl SourceDef {
    /// Picks the partition key: an explicit `partition_key` option, else the primary key,
    /// else none — rows are then dealt out in contiguous slices, which costs the inserting
    /// caller nothing; keyed operators move rows to their key's shard over the exchange,
    /// in parallel on the shards.
    /// The source's retention (`Retention::from_options`).
    pub fn retention(&self) -> Result<Retention> {
        Retention::from_options(&self.options)
    }

    /// A source of changes (a `debezium` feed): its rows carry `_op`.
    pub fn is_changelog(&self) -> bool {
        self.connector.as_ref().is_some_and(|c| c.changelog())
    }

    pub fn choose_partition_key(&mut self) -> Result<()> {
        if let Some(list) = self.options.get("partition_key").cloned() {
            let mut idx = Vec::new();
            for col in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                idx.push(self.schema.index_of(col).map_err(|_| {
                    Error::invalid_schema(format!("partition_key column '{col}' is not in the schema"))
                })?);
            }
            self.partition_key = idx;
            return Ok(());
        }
        self.partition_key = self.primary_key.clone();
        Ok(())
    }
}

/// How long a source keeps its rows (`WITH (retention = '1 hour', retention_rows = '…')`);
/// without either, every row is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Rows whose event time is older than the source's watermark minus this (ms) go.
    pub time_ms: Option<i64>,
    /// At most this many rows are kept, the newest.
    pub rows: Option<u64>,
}

impl Retention {
    pub fn is_some(&self) -> bool {
        self.time_ms.is_some() || self.rows.is_some()
    }

    /// Reads the `retention` and `retention_rows` options.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Retention> {
        let time_ms = match options.get("retention") {
            None => None,
            Some(v) => Some(parse_duration_ms(v).ok_or_else(|| {
                Error::invalid_schema(format!(
                    "retention = '{v}' is not a duration: write e.g. '1 hour', '30 minutes', '10 seconds', '500 ms'"
                ))
            })?),
        };
        let rows = match options.get("retention_rows") {
            None => None,
            Some(v) => match v.replace('_', "").parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(Error::invalid_schema(format!("retention_rows = '{v}' is not a positive integer"))),
            },
        };
        Ok(Retention { time_ms, rows })
    }
}

/// `<n> <unit>` (or `<n><unit>`) as milliseconds; units from ms to days, singular, plural
/// or abbreviated. `None` for anything else, a zero or a negative duration.
pub fn parse_duration_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(text.len());
    let n: i64 = text[..split].replace('_', "").parse().ok()?;
    let unit = text[split..].trim().to_ascii_lowercase();
    let ms: i64 = match unit.as_str() {
        "ms" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms).filter(|&ms| ms > 0)
}

/// A continuous query (`CREATE STREAM` / `CREATE MATERIALIZED VIEW`).
#[derive(Clone, Debug)]
pub struct StreamDef {
    pub name: String,
    /// The DDL text: the plan's serialized form, replanned on recovery.
    pub sql: String,
    pub plan: Arc<StreamPlan>,
    /// What `SELECT … FROM stream` reads: the stream's rows, without a change column.
    pub table_schema: SchemaRef,
}

/// A sink: rows of `input` (a source or stream) handed to a connector.
#[derive(Clone, Debug)]
pub struct SinkDef {
    pub name: String,
    pub input: String,
    /// The hidden stream a `CREATE SINK … AS SELECT` runs, which `input` names.
    pub owns_input: bool,
    pub connector: String,
    pub options: BTreeMap<String, String>,
    pub sql: String,
}

#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// Bumped on every change so holders of a snapshot can tell it is stale.
    pub version: u64,
    pub sources: BTreeMap<String, Arc<SourceDef>>,
    pub streams: BTreeMap<String, Arc<StreamDef>>,
    pub sinks: BTreeMap<String, Arc<SinkDef>>,
    /// Python functions (shared by every version of the catalog, not stored).
    pub functions: Arc<crate::functions::Functions>,
}

impl Catalog {
    pub fn stream(&self, name: &str) -> Result<&Arc<StreamDef>> {
        self.streams.get(name).ok_or_else(|| Error::table_not_found(name))
    }

    /// The schema a query sees for a source or stream.
    pub fn table_schema(&self, name: &str) -> Result<SchemaRef> {
        match self.sources.get(name) {
            Some(def) => Ok(def.schema.clone()),
            None => Ok(self.stream(name)?.table_schema.clone()),
        }
    }

    /// Whether `name`'s rows are changes with an `_op` column (a changelog stream, or a
    /// source of changes), which only a retracting aggregate can read.
    pub fn is_changelog(&self, name: &str) -> bool {
        match self.sources.get(name) {
            Some(def) => def.is_changelog(),
            None => self.streams.get(name).is_some_and(|s| s.plan.is_changelog()),
        }
    }

    /// Streams and sinks that read `name`, in name order.
    pub fn readers_of(&self, name: &str) -> Vec<String> {
        let reads = |s: &StreamDef| {
            s.plan.inputs().any(|i| i == name) || s.plan.dag.nodes.iter().any(|n| n.spec.lookup_table() == Some(name))
        };
        let streams = self.streams.values().filter(|s| reads(s)).map(|s| s.name.clone());
        let sinks = self.sinks.values().filter(|s| s.input == name && !s.owns_input).map(|s| s.name.clone());
        streams.chain(sinks).collect()
    }

    /// Every stream fed, directly or through other streams, by `name`.
    pub fn downstream(&self, name: &str) -> Vec<Arc<StreamDef>> {
        let mut out: Vec<Arc<StreamDef>> = Vec::new();
        let mut frontier = vec![name.to_string()];
        while let Some(input) = frontier.pop() {
            for s in self.streams.values() {
                if s.plan.inputs().any(|i| i == input) && !out.iter().any(|o| o.name == s.name) {
                    out.push(s.clone());
                    frontier.push(s.name.clone());
                }
            }
        }
        out
    }

    /// Whether a watermark of `name` can close a window somewhere downstream (else it
    /// only updates metrics, and the shards need not hear of it).
    pub fn watermark_matters(&self, name: &str) -> bool {
        self.downstream(name).iter().any(|s| s.plan.uses_watermarks())
    }

    pub fn add_sink(&mut self, def: SinkDef) -> Result<()> {
        check_name("sink", &def.name)?;
        if self.contains(&def.name) {
            return Err(Error::table_exists(&def.name));
        }
        if !self.contains(&def.input) {
            return Err(Error::table_not_found(&def.input));
        }
        self.sinks.insert(def.name.clone(), Arc::new(def));
        self.version += 1;
        Ok(())
    }

    pub fn drop_sink(&mut self, name: &str) -> Result<Arc<SinkDef>> {
        let def = self.sinks.remove(name).ok_or_else(|| Error::table_not_found(name))?;
        self.version += 1;
        Ok(def)
    }

    pub fn add_stream(&mut self, def: StreamDef) -> Result<()> {
        check_name("stream", &def.name)?;
        check_exportable(&format!("stream '{}'", def.name), &def.table_schema)?;
        if self.contains(&def.name) {
            return Err(Error::table_exists(&def.name));
        }
        for input in def.plan.inputs() {
            if !self.contains(input) {
                return Err(Error::table_not_found(input));
            }
        }
        self.streams.insert(def.name.clone(), Arc::new(def));
        self.version += 1;
        Ok(())
    }

    pub fn drop_stream(&mut self, name: &str) -> Result<Arc<StreamDef>> {
        let def = self.stream(name)?.clone();
        self.check_unused(&def.name)?;
        self.streams.remove(&def.name);
        self.version += 1;
        Ok(def)
    }

    fn check_unused(&self, name: &str) -> Result<()> {
        let readers = self.readers_of(name);
        if readers.is_empty() {
            return Ok(());
        }
        Err(Error::query(format!("'{name}' is read by {}: drop those first", readers.join(", "))))
    }

    pub fn source(&self, name: &str) -> Result<&Arc<SourceDef>> {
        self.sources.get(name).ok_or_else(|| Error::table_not_found(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.sources.contains_key(name) || self.streams.contains_key(name) || self.sinks.contains_key(name)
    }

    pub fn add_source(&mut self, def: SourceDef) -> Result<()> {
        check_name("source", &def.name)?;
        check_columns(&def.name, &def.schema)?;
        if self.contains(&def.name) {
            return Err(Error::table_exists(&def.name));
        }
        self.sources.insert(def.name.clone(), Arc::new(def));
        self.version += 1;
        Ok(())
    }

    pub fn drop_source(&mut self, name: &str) -> Result<Arc<SourceDef>> {
        if let Some(def) = self.sources.get(name) {
            self.check_unused(&def.name.clone())?;
        }
        let removed = self.sources.remove(name).ok_or_else(|| Error::table_not_found(name))?;
        self.version += 1;
        Ok(removed)
    }
}


/// An object name must be nonempty and free of control characters (a NUL cannot cross
/// Arrow's C interface or a C string, and none can be typed back reliably).
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::invalid_schema(format!("a {kind} needs a nonempty name")));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::invalid_schema(format!(
            "the {kind} name {name:?} contains the control character U+{:04X}",
            c as u32
        )));
    }
    Ok(())
}

/// A source's columns: nonempty names, each once, that Arrow can export.
pub fn check_columns(source: &str, schema: &Schema) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for field in schema.fields() {
        if field.name().is_empty() {
            return Err(Error::invalid_schema(format!("'{source}' has a column without a name")));
        }
        if !seen.insert(field.name().as_str()) {
            return Err(Error::invalid_schema(format!("'{source}' has two columns named '{}'", field.name())));
        }
    }
    check_exportable(&format!("'{source}'"), schema)
}

/// Refuses a schema with a NUL character in a field name, at any nesting depth: Arrow's
/// C data interface (how results reach pyarrow) carries names as C strings, and exporting
/// one would abort the process.
pub fn check_exportable(what: &str, schema: &Schema) -> Result<()> {
    fn nul_in(field: &Field) -> Option<String> {
        if field.name().contains('\0') {
            return Some(field.name().clone());
        }
        match field.data_type() {
            DataType::Struct(children) => children.iter().find_map(|c| nul_in(c)),
            DataType::List(child) | DataType::LargeList(child) | DataType::FixedSizeList(child, _)
            | DataType::Map(child, _) | DataType::ListView(child) | DataType::LargeListView(child) => nul_in(child),
            DataType::Union(fields, _) => fields.iter().find_map(|(_, c)| nul_in(c)),
            DataType::Dictionary(_, value) => nul_in(&Field::new("value", (**value).clone(), true)),
            _ => None,
        }
    }
    match schema.fields().iter().find_map(|f| nul_in(f)) {
        Some(name) => Err(Error::invalid_schema(format!(
            "{what} has a column named {name:?}: a NUL character cannot be part of a column name"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_control_and_duplicate_names_are_refused() {
        assert!(check_name("source", "").is_err());
        assert!(check_name("source", "  ").is_err());
        let err = check_name("source", "a\0b").unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidSchema);
        assert!(err.message.contains("U+0000"), "{}", err.message);
        check_name("source", "Trades").unwrap();
        let dup = Schema::new(vec![Field::new("a", DataType::Int64, true), Field::new("a", DataType::Utf8, true)]);
        assert!(check_columns("s", &dup).unwrap_err().message.contains("two columns named 'a'"));
        let nested = Schema::new(vec![Field::new(
            "s",
            DataType::Struct(vec![Field::new("x\0y", DataType::Int64, true)].into()),
            true,
        )]);
        assert!(check_exportable("q", &nested).unwrap_err().message.contains("NUL"));
        check_columns("s", &Schema::new(vec![Field::new("A", DataType::Int64, true), Field::new("a", DataType::Int64, true)])).unwrap();
    }

    #[test]
    fn durations_and_row_counts_of_retention() {
        assert_eq!(parse_duration_ms("1 hour"), Some(3_600_000));
        assert_eq!(parse_duration_ms("30 minutes"), Some(1_800_000));
        assert_eq!(parse_duration_ms("10s"), Some(10_000));
        assert_eq!(parse_duration_ms(" 500 ms "), Some(500));
        assert_eq!(parse_duration_ms("2 DAYS"), Some(172_800_000));
        for bad in ["", "hour", "1", "0 s", "-1 s", "1.5 h", "1 fortnight", "99999999999999999 d"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
        let opts = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(Retention::from_options(&opts(&[])).unwrap(), Retention::default());
        let r = Retention::from_options(&opts(&[("retention", "1 minute"), ("retention_rows", "1_000")])).unwrap();
        assert_eq!(r, Retention { time_ms: Some(60_000), rows: Some(1000) });
        let e = Retention::from_options(&opts(&[("retention_rows", "0")])).unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidSchema);
        assert!(e.message.contains("retention_rows = '0'"), "{}", e.message);
        assert!(Retention::from_options(&opts(&[("retention", "soon")])).is_err());
    }
}
