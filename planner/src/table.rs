//! Sources as DataFusion tables whose partitions are the shards.
//!
//! [`ShardTable::scan`] plans a [`ShardScanExec`] with one output partition per shard;
//! executing partition `i` asks shard `i` (through the coordinator) for its rows, so every
//! shard's partition is scanned by its own task and no gathered copy is ever made.
//! `INSERT INTO` goes through [`ShardSink`], back through the coordinator to the shards.

use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use futures::{StreamExt, TryStreamExt};

use laminardb_engine::frontend::ShardAccess;
use laminardb_engine::Error;

pub struct ShardTable {
    name: String,
    schema: SchemaRef,
    access: Arc<dyn ShardAccess>,
}

impl ShardTable {
    pub fn new(name: String, schema: SchemaRef, access: Arc<dyn ShardAccess>) -> Self {
        ShardTable { name, schema, access }
    }
}

impl fmt::Debug for ShardTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardTable").field("name", &self.name).finish()
    }
}

#[async_trait]
impl TableProvider for ShardTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(ShardScanExec::new(
            self.name.clone(),
            self.schema.clone(),
            projection.cloned(),
            self.access.clone(),
        )?))
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(DataFusionError::External(Box::new(Error::unsupported(format!(
                "{insert_op}: sources are append-only"
            )))));
        }
        let sink = ShardSink { name: self.name.clone(), schema: self.schema.clone(), access: self.access.clone() };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Reads one source, partition `i` from shard `i`.
pub struct ShardScanExec {
    source: String,
    projection: Option<Vec<usize>>,
    access: Arc<dyn ShardAccess>,
    properties: Arc<PlanProperties>,
}

impl ShardScanExec {
    fn new(
        source: String,
        schema: SchemaRef,
        projection: Option<Vec<usize>>,
        access: Arc<dyn ShardAccess>,
    ) -> DfResult<Self> {
        let projected = match &projection {
            Some(p) => Arc::new(schema.project(p)?),
            None => schema,
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(projected),
            Partitioning::UnknownPartitioning(access.shards()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(ShardScanExec { source, projection, access, properties: Arc::new(properties) })
    }
}

impl fmt::Debug for ShardScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardScanExec({})", self.source)
    }
}

impl DisplayAs for ShardScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardScanExec: source={}, shards={}", self.source, self.access.shards())?;
        if let Some(p) = &self.projection {
            write!(f, ", projection={p:?}")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for ShardScanExec {
    fn name(&self) -> &str {
        "ShardScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal("ShardScanExec has no children".into()))
        }
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let reply = self.access.scan(&self.source, partition).map_err(external)?;
        let projection = self.projection.clone();
        // Stored batches can be huge (one per insert); operators work best on cache-sized
        // batches, and slicing is zero-copy.
        let batch_rows = context.session_config().batch_size().max(1);
        let batches = async move {
            let batches = reply
                .recv_async()
                .await
                .map_err(|_| external(Error::shutdown()))?
                .map_err(external)?;
            let projected: DfResult<Vec<RecordBatch>> = batches
                .into_iter()
                .map(|b| match &projection {
                    Some(p) => b.project(p).map_err(DataFusionError::from),
                    None => Ok(b),
                })
                .flat_map(|b| match b {
                    Ok(b) => slices(b, batch_rows).into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
                .collect();
            Ok::<_, DataFusionError>(futures::stream::iter(projected?.into_iter().map(Ok)))
        };
        let stream = futures::stream::once(batches).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.properties.eq_properties.schema().clone(), stream)))
    }
}

fn slices(batch: RecordBatch, rows: usize) -> Vec<RecordBatch> {
    if batch.num_rows() <= rows {
        return vec![batch];
    }
    (0..batch.num_rows()).step_by(rows).map(|start| batch.slice(start, rows.min(batch.num_rows() - start))).collect()
}

/// `INSERT INTO source …`: every batch goes to the shards by the source's partition key.
struct ShardSink {
    name: String,
    schema: SchemaRef,
    access: Arc<dyn ShardAccess>,
}

impl fmt::Debug for ShardSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardSink({})", self.name)
    }
}

impl DisplayAs for ShardSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardSink: source={}", self.name)
    }
}

#[async_trait]
impl DataSink for ShardSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(&self, mut data: SendableRecordBatchStream, _context: &Arc<TaskContext>) -> DfResult<u64> {
        // Gather first so a failure half-way stores nothing of this statement.
        let mut batches = Vec::new();
        while let Some(batch) = data.next().await {
            batches.push(batch?);
        }
        let mut rows = 0;
        for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
            let ack = self.access.insert(&self.name, batch).map_err(external)?;
            rows += ack.recv_async().await.map_err(|_| external(Error::shutdown()))?.map_err(external)?;
        }
        Ok(rows)
    }
}

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// A lookup table in an ad-hoc query: every row, read from its connector when the query
/// runs (on a blocking thread of the query pool).
#[derive(Debug)]
pub struct LookupTable {
    source: Arc<dyn laminardb_engine::lookup::LookupSource>,
}

impl LookupTable {
    pub fn new(source: Arc<dyn laminardb_engine::lookup::LookupSource>) -> Self {
        LookupTable { source }
    }
}

#[async_trait]
impl TableProvider for LookupTable {
    fn schema(&self) -> SchemaRef {
        self.source.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let source = self.source.clone();
        let batches = tokio::task::spawn_blocking(move || source.scan())
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let table = datafusion::datasource::MemTable::try_new(self.source.schema(), vec![batches])?;
        table.scan(state, projection, filters, limit).await
    }
}
