//! `LaminarConfig`: the user-facing engine settings.

use pyo3::prelude::*;

use laminardb_engine::config::{default_shards, EngineConfig, Recovery};

#[pyclass(name = "LaminarConfig", module = "laminardb", frozen, from_py_object)]
#[derive(Clone)]
pub struct PyLaminarConfig {
    pub inner: EngineConfig,
    /// Serve `metrics_text()` at http://127.0.0.1:<port>/metrics while open.
    pub metrics_port: Option<u16>,
}

#[pymethods]
impl PyLaminarConfig {
    #[new]
    #[pyo3(signature = (*, buffer_size=65536, storage_dir=None, checkpoint_interval_ms=None, table_spill_threshold=1_000_000, shards=None, idle_timeout_ms=10_000, wal_fsync=true, max_event_ahead_ms=Some(laminardb_engine::config::DEFAULT_MAX_EVENT_AHEAD_MS), subscriber_queue_bytes=laminardb_engine::stream::output::SUBSCRIBER_BYTES_MAX, recovery="strict", metrics_port=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        buffer_size: usize,
        storage_dir: Option<String>,
        checkpoint_interval_ms: Option<u64>,
        table_spill_threshold: usize,
        shards: Option<usize>,
        idle_timeout_ms: u64,
        wal_fsync: bool,
        max_event_ahead_ms: Option<u64>,
        subscriber_queue_bytes: u64,
        recovery: &str,
        metrics_port: Option<u16>,
    ) -> PyResult<Self> {
        if buffer_size == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err("buffer_size must be positive"));
        }
        if shards == Some(0) {
            return Err(pyo3::exceptions::PyValueError::new_err("shards must be positive"));
        }
        let recovery = match recovery {
            "strict" => Recovery::Strict,
            "truncate" => Recovery::Truncate,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "recovery must be 'strict' or 'truncate', not {other:?}"
                )))
            }
        };
        Ok(PyLaminarConfig {
            inner: EngineConfig {
                shards: shards.unwrap_or_else(default_shards),
                buffer_size,
                storage_dir,
                checkpoint_interval_ms,
                table_spill_threshold,
                idle_timeout_ms,
                wal_fsync,
                max_event_ahead_ms,
                subscriber_queue_bytes,
                recovery,
                ..EngineConfig::default()
            },
            metrics_port,
        })
    }

    #[getter]
    fn buffer_size(&self) -> usize {
        self.inner.buffer_size
    }
    #[getter]
    fn storage_dir(&self) -> Option<String> {
        self.inner.storage_dir.clone()
    }
    #[getter]
    fn checkpoint_interval_ms(&self) -> Option<u64> {
        self.inner.checkpoint_interval_ms
    }
    #[getter]
    fn table_spill_threshold(&self) -> usize {
        self.inner.table_spill_threshold
    }
    /// Number of shard reactors (one per core by default).
    #[getter]
    fn shards(&self) -> usize {
        self.inner.shards
    }
    /// A source without rows or watermarks for this long stops holding back
    /// `pipeline_watermark`.
    #[getter]
    fn idle_timeout_ms(&self) -> u64 {
        self.inner.idle_timeout_ms
    }
    /// With a storage directory, inserts are acknowledged after `fdatasync` (True) or
    /// after the direct write alone (False: survives a killed process, not power loss).
    #[getter]
    fn wal_fsync(&self) -> bool {
        self.inner.wal_fsync
    }

    /// A row whose event time is more than this far ahead of the wall clock (a unit
    /// mistake, a corrupt clock) is stored and flows through the streams but does not move
    /// its source's watermark; counted in `source_metrics(name).future_events`. `None`:
    /// no bound.
    #[getter]
    fn max_event_ahead_ms(&self) -> Option<u64> {
        self.inner.max_event_ahead_ms
    }
    /// Bytes a subscriber's queue may hold before its oldest batches are dropped (counted
    /// in `lagged_batches`); a single larger batch is still delivered.
    #[getter]
    fn subscriber_queue_bytes(&self) -> u64 {
        self.inner.subscriber_queue_bytes
    }
    /// What opening does with a damaged storage directory: 'strict' refuses
    /// (`CheckpointError` naming the file); 'truncate' cuts the log at the damage, keeps
    /// everything before it and reports what was lost (`metrics().wal_damage_cut`).
    #[getter]
    fn recovery(&self) -> &'static str {
        match self.inner.recovery {
            Recovery::Strict => "strict",
            Recovery::Truncate => "truncate",
        }
    }

    /// The port of the Prometheus endpoint (`None`: none).
    #[getter]
    fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    fn __repr__(&self) -> String {
        format!(
            "LaminarConfig(buffer_size={}, storage_dir={}, checkpoint_interval_ms={}, table_spill_threshold={}, shards={}, idle_timeout_ms={}, wal_fsync={}, max_event_ahead_ms={}, subscriber_queue_bytes={}, recovery='{}', metrics_port={})",
            self.inner.buffer_size,
            self.inner.storage_dir.as_ref().map_or("None".to_string(), |d| format!("'{d}'")),
            self.inner.checkpoint_interval_ms.map_or("None".to_string(), |v| v.to_string()),
            self.inner.table_spill_threshold,
            self.inner.shards,
            self.inner.idle_timeout_ms,
            if self.inner.wal_fsync { "True" } else { "False" },
            self.inner.max_event_ahead_ms.map_or("None".to_string(), |v| v.to_string()),
            self.inner.subscriber_queue_bytes,
            self.recovery(),
            self.metrics_port.map_or("None".to_string(), |p| p.to_string()),
        )
    }
}
