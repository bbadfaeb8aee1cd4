//! # laminardb-connectors: where rows come from and go to outside the engine
//!
//! Each connector implements the engine's traits (`engine::source::SourceConnector` and
//! its `SplitReader`; sinks: `engine::sink::Sink`) and is made available by name with
//! [`register`], which the Python module calls once when it loads. Connector I/O runs in
//! the reader (on the owning shard's thread for file reads, which are short; connectors
//! that wait on the network hand batches over from their own threads).
//!
//! Built so far: `files` (source [`files`], sink [`file_sink`]), `kafka` (source
//! [`kafka`], sink [`kafka_sink`]), `websocket` (source [`websocket`], sink
//! [`websocket_sink`]) and the lookup tables of [`lookup`].

pub mod avro;
pub mod dead_letter;
pub mod decode;
pub mod encode;
pub mod file_sink;
pub mod files;
pub mod json_flat;
pub mod kafka;
mod kafka_batch;
pub mod kafka_sink;
pub mod lookup;
mod tls;
pub mod websocket;
pub mod websocket_sink;

/// The connectors' tokio runtime (network connectors' I/O; one worker thread, off the
/// shards' cores' hot loops), made when the first connector needs it.
pub(crate) fn runtime() -> laminardb_engine::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> = std::sync::OnceLock::new();
    let made = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("laminar-connectors")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    made.as_ref().map_err(|e| laminardb_engine::Error::connector(format!("starting the connectors' runtime: {e}")))
}
mod format;

/// Makes every connector of this crate available to `CREATE SOURCE`/`CREATE SINK … WITH
/// (connector = …)`.
pub fn register() {
    laminardb_engine::source::register("files", files::FilesSource::create);
    laminardb_engine::sink::register("files", file_sink::FileSink::create);
    laminardb_engine::source::register("kafka", kafka::KafkaSource::create);
    laminardb_engine::sink::register("kafka", kafka_sink::KafkaSink::create);
    laminardb_engine::source::register("websocket", websocket::WebSocketSource::create);
    laminardb_engine::sink::register("websocket", websocket_sink::WebSocketSink::create);
    laminardb_engine::lookup::register("postgres", lookup::PostgresLookup::create);
    laminardb_engine::lookup::register("parquet", lookup::ParquetLookup::create);
}
