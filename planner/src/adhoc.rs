//! Ad-hoc queries with a window in `GROUP BY` (`TUMBLE`, `HOP`, `SESSION`, `CUMULATE`) or
//! an ASOF JOIN: DataFusion has no such operators, so these run through the stream
//! operators over every retained row, with the watermark at the end of time so every
//! window is complete and every left row of an ASOF join has its final match. An outer
//! `ORDER BY` / `LIMIT` is then applied by DataFusion to the rows.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::row::{RowConverter, SortField};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;
use datafusion::sql::sqlparser::ast::{visit_expressions_mut, Expr, Statement as SqlStatement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use futures::StreamExt;

use laminardb_engine::catalog::Catalog;
use laminardb_engine::frontend::{CancelFlag, PreparedQuery, QueryHandle, QueryKind, ShardAccess, QUERY_BATCHES_MAX};
use laminardb_engine::dataflow::LocalRun;
use laminardb_engine::stream::op::change_signs;
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::{Error, ErrorCode, Result};

use crate::stream::{has_asof, has_window, plan_stream, strip_left_asof, CreateStream};

/// `Some` when `sql` is a `SELECT` with a window in a `GROUP BY`, or an ASOF JOIN (a
/// temporal join, `FOR SYSTEM_TIME AS OF`, is one).
pub fn plan_windowed_query(
    catalog: &Catalog,
    sql: &str,
    access: Arc<dyn ShardAccess>,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<WindowedQuery>> {
    let sql = &crate::temporal::rewrite_temporal(sql, catalog)?;
    let (stripped, left_asof) = strip_left_asof(sql)?;
    let Ok(mut statements) = Parser::parse_sql(&GenericDialect {}, &stripped) else { return Ok(None) };
    let [SqlStatement::Query(q)] = statements.as_mut_slice() else { return Ok(None) };
    if !has_window(&q.body) && !has_asof(&q.body) {
        return Ok(None);
    }
    // The outer ORDER BY reads the output rows: a column named through its table
    // (`t.qty`) is the output's `qty`.
    let mut order_by = q.order_by.take();
    let _ = visit_expressions_mut(&mut order_by, |e| {
        if let Expr::CompoundIdentifier(ids) = e {
            if let Some(last) = ids.last() {
                *e = Expr::Identifier(last.clone());
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    let order_by = order_by.map(|o| o.to_string()).unwrap_or_default();
    let limit = q.limit_clause.take().map(|l| l.to_string()).unwrap_or_default();
    let inner = CreateStream {
        name: "windowed_query".into(),
        materialized: false,
        or_replace: false,
        if_not_exists: false,
        // Printed without the LEFT the parser does not know (`strip_left_asof`): put back.
        query: if left_asof { q.to_string().replacen(" ASOF JOIN ", " LEFT ASOF JOIN ", 1) } else { q.to_string() },
        // Over the rows there are now: a join's state ends with the query.
        unbounded_join_ok: true,
        ..CreateStream::default()
    };
    let def = plan_stream(catalog, &inner, sql, runtime)?;
    let outer = (!order_by.is_empty() || !limit.is_empty()).then(|| format!("SELECT * FROM windowed {order_by} {limit}"));
    Ok(Some(WindowedQuery { plan: def.plan, access, runtime: runtime.clone(), outer }))
}

pub struct WindowedQuery {
    plan: Arc<StreamPlan>,
    access: Arc<dyn ShardAccess>,
    runtime: tokio::runtime::Handle,
    outer: Option<String>,
}

impl WindowedQuery {
    async fn run(plan: Arc<StreamPlan>, access: Arc<dyn ShardAccess>, cancel: CancelFlag) -> Result<Vec<RecordBatch>> {
        let mut inputs: Vec<(String, Vec<RecordBatch>)> = Vec::new();
        for input in plan.inputs() {
            if inputs.iter().any(|(name, _)| name == input) {
                continue;
            }
            let mut rows = Vec::new();
            for shard in 0..access.shards() {
                rows.extend(access.scan(input, shard)?.recv_async().await.map_err(|_| Error::shutdown())??);
            }
            inputs.push((input.to_string(), rows));
        }
        // The stream's operators, as one shard over every row.
        let mut run = LocalRun::new(&plan.dag)?;
        for (input, rows) in &inputs {
            for batch in rows {
                if cancel.is_cancelled() {
                    return Err(Error::new(ErrorCode::QueryCancelled, "the query was cancelled"));
                }
                run.push(input, batch)?;
            }
        }
        let rows = run.finish()?;
        if plan.is_changelog() {
            return fold_changelog(&rows, &result_schema(&plan));
        }
        Ok(rows)
    }
}

/// What the query returns: the stream's rows, without the change column of a changelog
/// (an unwindowed GROUP BY over an ASOF join returns its groups' final rows).
fn result_schema(plan: &StreamPlan) -> SchemaRef {
    if !plan.is_changelog() {
        return plan.schema.clone();
    }
    let fields = &plan.schema.fields()[..plan.schema.fields().len() - 1];
    Arc::new(arrow::datatypes::Schema::new(fields.to_vec()))
}

/// The rows a changelog leaves: each `+I`/`+U` row counts once, each `-U`/`-D` takes back
/// one equal row (a retraction carries the row it retracts).
fn fold_changelog(batches: &[RecordBatch], schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    let n = schema.fields().len();
    let converter = RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())?;
    let mut live: HashMap<arrow::row::OwnedRow, (i64, (usize, usize))> = HashMap::new();
    let mut order = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let rows = converter.convert_columns(&batch.columns()[..n])?;
        let signs = change_signs(batch.column(n))?;
        for (r, sign) in signs.into_iter().enumerate() {
            let entry = live.entry(rows.row(r).owned()).or_insert_with(|| {
                order.push(rows.row(r).owned());
                (0, (b, r))
            });
            entry.0 += sign;
        }
    }
    let mut indices = Vec::new();
    for row in &order {
        let (count, loc) = live[row];
        indices.extend(std::iter::repeat_n(loc, count.max(0) as usize));
    }
    if indices.is_empty() {
        return Ok(Vec::new());
    }
    let columns = (0..n)
        .map(|c| {
            let arrays: Vec<&dyn arrow::array::Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            arrow::compute::interleave(&arrays, &indices)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vec![RecordBatch::try_new(schema.clone(), columns)?])
}

impl PreparedQuery for WindowedQuery {
    fn schema(&self) -> SchemaRef {
        result_schema(&self.plan)
    }

    fn kind(&self) -> QueryKind {
        QueryKind::Rows
    }

    fn start(self: Box<Self>) -> Result<QueryHandle> {
        let schema = self.schema();
        let (tx, rx) = flume::bounded(QUERY_BATCHES_MAX);
        let cancel = CancelFlag::default();
        let WindowedQuery { plan, access, runtime, outer } = *self;
        let flag = cancel.clone();
        let out_schema = schema.clone();
        runtime.spawn(async move {
            let result = async {
                let rows = WindowedQuery::run(plan, access, flag).await?;
                let Some(outer) = outer else { return Ok(rows) };
                let ctx = SessionContext::new();
                ctx.register_table("windowed", Arc::new(MemTable::try_new(out_schema, vec![rows])?))?;
                let mut stream = ctx.sql(&outer).await?.execute_stream().await?;
                let mut out = Vec::new();
                while let Some(b) = stream.next().await {
                    out.push(b?);
                }
                Ok::<_, Error>(out)
            }
            .await;
            match result {
                Ok(batches) => {
                    for b in batches {
                        if tx.send_async(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send_async(Err(e)).await;
                }
            }
        });
        Ok(QueryHandle { schema, batches: rx, cancel })
    }
}
