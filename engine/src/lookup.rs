//! Lookup tables (`CREATE LOOKUP TABLE … WITH (connector = …)`): reference rows that live
//! outside the engine (a PostgreSQL table, a Parquet file) and that a stream joins by key.
//!
//! A lookup table has no stream of rows and the shards store none of it. A stream joining
//! one (`FROM trades t [LEFT] JOIN instruments i ON t.sym = i.sym`) runs a lookup operator
//! (`stream::lookup`) that asks the connector for the keys it has not seen lately, one
//! [`LookupSource::fetch`] per batch, and keeps what it got in a per-shard cache bounded
//! in rows and age (`cache.max_rows`, `cache.ttl`). Each row joins the table as it is when
//! the row is processed. An ad-hoc query reads the whole table ([`LookupSource::scan`]).
//!
//! Built in: none; `laminardb-connectors` registers `postgres` and `parquet`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::catalog::parse_duration_ms;
use crate::error::{Error, Result};
use crate::source::ConnectorOptions;

/// Where a lookup table's rows are.
pub trait LookupSource: Send + Sync + Debug {
    /// The connector's name, as `WITH (connector = …)` spells it.
    fn name(&self) -> &'static str;

    /// The table's declared columns.
    fn schema(&self) -> SchemaRef;

    /// The rows whose columns `columns` equal one of the rows of `keys` (one key per row,
    /// its columns in `columns`' order, each already of the type the join compares in).
    /// Rows come in the table's schema, in any order.
    fn fetch(&self, columns: &[usize], keys: &RecordBatch) -> Result<RecordBatch>;

    /// Every row (an ad-hoc query of the table).
    fn scan(&self) -> Result<Vec<RecordBatch>>;

    /// Refuses a join key of `data_type` that `fetch` cannot send (checked when a stream
    /// joining the table is planned).
    fn check_key(&self, data_type: &arrow::datatypes::DataType) -> Result<()> {
        let _ = data_type;
        Ok(())
    }

    /// Checks that the table can be read (at `CREATE LOOKUP TABLE`; not when the database
    /// reopens, so a table out of reach then fails the lookups, not the open).
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the lookup operator should cache what `fetch` returns (not for a table
    /// already held in memory).
    fn cached(&self) -> bool {
        true
    }
}

/// Builds a lookup source from its options and declared columns.
pub type LookupFactory = fn(&ConnectorOptions, &SchemaRef) -> Result<Arc<dyn LookupSource>>;

static REGISTERED: parking_lot::RwLock<BTreeMap<&'static str, LookupFactory>> = parking_lot::const_rwlock(BTreeMap::new());

/// Makes `name` available to `CREATE LOOKUP TABLE … WITH (connector = name)`.
pub fn register(name: &'static str, factory: LookupFactory) {
    REGISTERED.write().insert(name, factory);
}

/// Keys every lookup table takes, whatever its connector (the engine reads them).
pub const LOOKUP_KEYS: [&str; 3] = ["connector", "cache.max_rows", "cache.ttl"];

/// The lookup source `WITH (connector = …)` names.
pub fn lookup_source(options: &BTreeMap<String, String>, schema: &SchemaRef) -> Result<Arc<dyn LookupSource>> {
    let names = || REGISTERED.read().keys().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    let Some(name) = options.get("connector").map(|c| c.to_ascii_lowercase()) else {
        return Err(Error::connector(format!("a lookup table needs WITH (connector = …) (available: {})", names())));
    };
    let factory = REGISTERED.read().get(name.as_str()).copied();
    match factory {
        Some(factory) => factory(&ConnectorOptions::for_lookup(&name, options)?, schema),
        None => Err(Error::connector(format!("unknown lookup connector '{name}' (available: {})", names()))),
    }
}

/// The lookup operator's cache bounds (`cache.max_rows`, `cache.ttl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBounds {
    /// At most this many table rows (and keys) are cached per shard.
    pub max_rows: usize,
    /// A key's rows are fetched again once they are this old (ms).
    pub ttl_ms: i64,
}

impl CacheBounds {
    pub const DEFAULT_MAX_ROWS: usize = 100_000;
    pub const DEFAULT_TTL_MS: i64 = 60_000;

    pub fn from_options(options: &BTreeMap<String, String>) -> Result<CacheBounds> {
        let max_rows = match options.get("cache.max_rows") {
            None => Self::DEFAULT_MAX_ROWS,
            Some(v) => match v.replace('_', "").trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => return Err(Error::connector(format!("cache.max_rows = '{v}' is not a positive integer"))),
            },
        };
        let ttl_ms = match options.get("cache.ttl") {
            None => Self::DEFAULT_TTL_MS,
            Some(v) => parse_duration_ms(v).ok_or_else(|| {
                Error::connector(format!("cache.ttl = '{v}' is not a duration: write e.g. '1 minute', '30 seconds', '500 ms'"))
            })?,
        };
        Ok(CacheBounds { max_rows, ttl_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_bounds_have_defaults_and_refuse_nonsense() {
        let o = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert_eq!(
            CacheBounds::from_options(&o(&[])).unwrap(),
            CacheBounds { max_rows: CacheBounds::DEFAULT_MAX_ROWS, ttl_ms: CacheBounds::DEFAULT_TTL_MS }
        );
        assert_eq!(
            CacheBounds::from_options(&o(&[("cache.max_rows", "1_000"), ("cache.ttl", "5 s")])).unwrap(),
            CacheBounds { max_rows: 1000, ttl_ms: 5000 }
        );
        assert!(CacheBounds::from_options(&o(&[("cache.max_rows", "0")])).is_err());
        assert!(CacheBounds::from_options(&o(&[("cache.ttl", "soon")])).unwrap_err().message.contains("not a duration"));
        let e = lookup_source(&o(&[("connector", "telepathy")]), &Arc::new(arrow::datatypes::Schema::empty())).unwrap_err();
        assert!(e.message.contains("unknown lookup connector 'telepathy'"), "{}", e.message);
    }
}
