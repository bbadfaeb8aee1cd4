//! Sinks: where a stream's rows leave the database. A sink reads one source or stream
//! (for `CREATE SINK … AS SELECT`, a hidden stream of that query) through a subscription
//! and hands every batch to its connector on the sink's own thread.
//!
//! Connectors built in so far: `blackhole` (the default when `WITH` names none): it
//! accepts and counts rows, for pipelines whose results are read by subscription and for
//! benchmarks. The external connectors of the spec (Kafka, WebSocket, Postgres, Delta,
//! Iceberg, files, …) are rejected with a ConnectorError until they exist, never accepted
//! and silently dropped.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;

use crate::error::{Error, Result};

/// Connectors the spec names that this build does not have yet.
const PLANNED: &[&str] = &[
    "kafka", "websocket", "postgres", "postgres-cdc", "postgres_cdc", "postgres-sink", "mysql", "mysql-cdc",
    "mysql_cdc", "rabbitmq", "delta", "delta-lake", "delta_lake", "iceberg", "file", "files", "parquet", "csv",
    "json", "redis", "nats",
];

pub const DEFAULT_CONNECTOR: &str = "blackhole";

/// What a sink does with its rows.
pub trait SinkConnector: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<()>;
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

struct Blackhole;

impl SinkConnector for Blackhole {
    fn write(&mut self, _batch: &RecordBatch) -> Result<()> {
        Ok(())
    }
}

/// Checks that `connector` exists here and its options make sense.
pub fn validate(connector: &str, _options: &BTreeMap<String, String>) -> Result<()> {
    match connector {
        DEFAULT_CONNECTOR => Ok(()),
        c if PLANNED.contains(&c) => Err(Error::connector(format!(
            "connector '{c}' is not available in this build yet (only '{DEFAULT_CONNECTOR}')"
        ))),
        c => Err(Error::connector(format!("unknown connector '{c}' (available: '{DEFAULT_CONNECTOR}')"))),
    }
}

pub fn open(connector: &str, options: &BTreeMap<String, String>) -> Result<Box<dyn SinkConnector>> {
    validate(connector, options)?;
    Ok(Box::new(Blackhole))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_planned_connectors_are_connector_errors() {
        let none = BTreeMap::new();
        assert!(validate("blackhole", &none).is_ok());
        for c in ["kafka", "no_such_connector"] {
            let e = validate(c, &none).unwrap_err();
            assert_eq!(e.class, crate::error::ErrorClass::Connector);
            assert!(e.message.contains(c), "{}", e.message);
        }
    }
}
