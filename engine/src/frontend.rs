//! The two seams between the runtime and the SQL front end.
//!
//! `shards` (the runtime) and `planner` (the SQL front end) never depend on each other.
//! The coordinator owns a `Box<dyn Frontend>` and asks it to turn SQL into [`Statement`]s;
//! the front end reads and writes shard-resident rows through the [`ShardAccess`] the
//! coordinator hands it. Both sides only see the types in this module.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;

use crate::catalog::{Catalog, SinkDef, SourceDef, StreamDef};
use crate::error::{Error, Result};

/// Bound on batches buffered between a running query and its reader: a slow reader
/// pauses the query instead of growing memory.
pub const QUERY_BATCHES_MAX: usize = 16;

pub type BatchSender = flume::Sender<Result<RecordBatch>>;
pub type BatchReceiver = flume::Receiver<Result<RecordBatch>>;

/// What the coordinator can do for a running query: read a shard's rows of a source, or
/// append rows to a source (the `INSERT INTO … SELECT/VALUES` path).
pub trait ShardAccess: Send + Sync {
    fn shards(&self) -> usize;
    /// Every row of `source` that `shard` holds when the request reaches it. Requests are
    /// ordered after every insert that was acknowledged before the query started.
    fn scan(&self, source: &str, shard: usize) -> Result<flume::Receiver<Result<Vec<RecordBatch>>>>;
    /// Appends an already-cast batch to `source`; resolves to the number of rows stored.
    fn insert(&self, source: &str, batch: RecordBatch) -> Result<flume::Receiver<Result<u64>>>;
}

/// A cancellation flag shared by a query and whoever may cancel it.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A running ad-hoc query: its schema and the receiving end of its result batches.
pub struct QueryHandle {
    pub schema: SchemaRef,
    pub batches: BatchReceiver,
    pub cancel: CancelFlag,
}

/// How a planned query's result should be presented.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum QueryKind {
    /// A `SELECT`-like query returning rows.
    Rows,
    /// DML (`INSERT`): the single result row holds the affected-row count.
    RowsAffected,
    /// `EXPLAIN`, `SHOW`, `DESCRIBE`: rows about the database rather than in it.
    Metadata,
}

/// A query planned against one catalog snapshot, not yet running.
pub trait PreparedQuery: Send {
    fn schema(&self) -> SchemaRef;
    fn kind(&self) -> QueryKind;
    /// Starts execution in the front end's own threads; never blocks the caller.
    fn start(self: Box<Self>) -> Result<QueryHandle>;
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Source,
    Table,
    Stream,
    Sink,
    View,
}

impl ObjectKind {
    pub fn sql_name(self) -> &'static str {
        match self {
            ObjectKind::Source => "SOURCE",
            ObjectKind::Table => "TABLE",
            ObjectKind::Stream => "STREAM",
            ObjectKind::Sink => "SINK",
            ObjectKind::View => "MATERIALIZED VIEW",
        }
    }
}

/// What the Python binding asks for besides SQL text, as data: it never assembles SQL
/// from a caller's pieces (a `;` in a filter would otherwise run a second statement).
#[derive(Clone, Debug)]
pub enum Request {
    /// `subscribe(query)`: the query as the hidden stream `name`. `query` must be one
    /// `SELECT` (with optional `EMIT` / `ALLOW LATENESS`).
    Subscribe { name: String, query: String },
    /// `query_stream(name, filter)`: the rows of `name`, where `filter` (one SQL boolean
    /// expression, nothing after it) holds.
    StreamQuery { name: String, filter: Option<String> },
}

/// One planned SQL statement.
pub enum Statement {
    CreateSource { def: SourceDef, if_not_exists: bool, or_replace: bool },
    CreateStream { def: StreamDef, if_not_exists: bool, or_replace: bool },
    /// `stream` is the hidden stream of a `CREATE SINK … AS SELECT`.
    CreateSink { def: SinkDef, stream: Option<StreamDef>, if_not_exists: bool },
    Drop { kind: ObjectKind, name: String, if_exists: bool },
    Query(Box<dyn PreparedQuery>),
}

/// The SQL front end, as the coordinator sees it.
pub trait Frontend: Send + 'static {
    /// Splits a SQL text into its statements (a later one may name what an earlier creates).
    fn split(&self, sql: &str) -> Result<Vec<String>>;

    /// Plans one statement against `catalog`. DDL is returned as data for the coordinator
    /// to apply; queries come back prepared, reading through `access`.
    fn plan(
        &mut self,
        statement: &str,
        params: &[ScalarValue],
        catalog: &Arc<Catalog>,
        access: Arc<dyn ShardAccess>,
    ) -> Result<Statement>;

    /// Plans a structured request against `catalog` (front ends without SQL refuse it).
    fn plan_request(&mut self, request: &Request, catalog: &Arc<Catalog>, access: Arc<dyn ShardAccess>) -> Result<Statement> {
        let _ = (catalog, access);
        Err(Error::unsupported(format!("{request:?} in this front end")))
    }

    /// Recovery replays statements the database accepted before (`on`) or is done: a
    /// check added since must not refuse what was accepted then.
    fn set_replaying(&mut self, on: bool) {
        let _ = on;
    }

    /// Stops the front end's threads; called once, on the coordinator, at shutdown.
    fn shutdown(&mut self);
}
