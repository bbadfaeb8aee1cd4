//! # laminardb-planner: the SQL front end
//!
//! Turns SQL text into what the coordinator executes: our DDL ([`ddl`]) becomes catalog
//! changes; everything else is planned by DataFusion against the current catalog, with
//! every source a [`table::ShardTable`] whose partitions are the shards. Queries run on
//! this crate's own small tokio pool, never on a shard or on the coordinator.

pub mod adhoc;
pub mod ddl;
pub mod group_call;
pub mod interval;
pub mod limits;
pub mod sink;
pub mod split;
pub mod stream;
pub mod table;
pub mod temporal;
pub mod time_bounds;
pub mod topn;
pub mod udaf;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::DataFrame;
use futures::{FutureExt, StreamExt};

use laminardb_engine::catalog::Catalog;
use laminardb_engine::frontend::{
    CancelFlag, Frontend, PreparedQuery, QueryHandle, QueryKind, Request, ShardAccess, Statement, QUERY_BATCHES_MAX,
};
use laminardb_engine::{Error, Result};

/// The DataFusion-backed [`Frontend`].
pub struct SqlFrontend {
    runtime: Option<tokio::runtime::Runtime>,
    ctx: SessionContext,
    /// Catalog version whose sources are registered in `ctx`.
    registered: Option<u64>,
    /// `Functions::version` of the Python functions registered in `ctx`.
    functions: Option<u64>,
    /// Recovery is replaying accepted statements (`Frontend::set_replaying`).
    replaying: bool,
}

impl SqlFrontend {
    pub fn new(query_threads: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(query_threads.max(1))
            .max_blocking_threads(query_threads.max(1))
            .thread_name("laminar-query")
            .thread_stack_size(laminardb_engine::config::ENGINE_STACK_BYTES)
            .enable_time()
            .build()
            .map_err(|e| Error::internal(format!("cannot start the query pool: {e}")))?;
        let config = SessionConfig::new()
            .with_target_partitions(query_threads.max(1))
            .with_information_schema(true)
            .with_default_catalog_and_schema("laminar", "public");
        let ctx = SessionContext::new_with_config(config);
        udaf::register(&ctx);
        Ok(SqlFrontend { runtime: Some(runtime), ctx, registered: None, functions: None, replaying: false })
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        self.runtime.as_ref().ok_or_else(Error::shutdown)
    }

    fn sync_tables(&mut self, catalog: &Catalog, access: &Arc<dyn ShardAccess>) -> Result<()> {
        let functions = catalog.functions.version();
        if self.functions != Some(functions) {
            stream::register_functions(&self.ctx, catalog);
            self.functions = Some(functions);
        }
        if self.registered == Some(catalog.version) {
            return Ok(());
        }
        let schema = self
            .ctx
            .catalog("laminar")
            .and_then(|c| c.schema("public"))
            .ok_or_else(|| Error::internal("default schema missing"))?;
        for name in schema.table_names() {
            schema.deregister_table(&name)?;
        }
        for (name, def) in &catalog.sources {
            if let Some(source) = &def.lookup {
                schema.register_table(name.clone(), Arc::new(table::LookupTable::new(source.clone())))?;
            }
        }
        let tables = catalog
            .sources
            .iter()
            .filter(|(_, def)| def.lookup.is_none())
            .map(|(name, def)| (name, def.schema.clone()))
            .chain(catalog.streams.iter().map(|(name, def)| (name, def.table_schema.clone())));
        for (name, table_schema) in tables {
            let table = table::ShardTable::new(name.clone(), table_schema, access.clone());
            schema.register_table(name.clone(), Arc::new(table))?;
        }
        self.registered = Some(catalog.version);
        Ok(())
    }
}

/// A function SQL has without registering it (`abs`, `sum`, `row_number`, …): a Python
/// function may not take its name.
pub fn is_builtin_function(name: &str) -> bool {
    let ctx = SessionContext::new();
    udaf::register(&ctx);
    let state = ctx.state();
    state.scalar_functions().contains_key(name) || state.aggregate_functions().contains_key(name) || state.window_functions().contains_key(name)
}

/// A query that reads no table or stream (`SELECT 1`, `VALUES …`): nothing can arrive
/// later, so a subscription to it delivers its rows and ends.
pub fn reads_no_table(sql: &str) -> bool {
    use datafusion::sql::sqlparser::ast::{visit_relations, Statement as SqlStatement};
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    let Ok(statements) = Parser::parse_sql(&GenericDialect {}, sql) else { return false };
    let mut relations = 0;
    let _ = visit_relations(&statements, |_| {
        relations += 1;
        std::ops::ControlFlow::<()>::Continue(())
    });
    matches!(statements.as_slice(), [SqlStatement::Query(_)]) && relations == 0
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A filter of `query_stream`: exactly one SQL expression, written again from its syntax
/// tree (so nothing after it, a `;` and a second statement say, is kept).
fn parse_filter(filter: &str) -> Result<String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    use datafusion::sql::sqlparser::tokenizer::Token;
    let tokens = split::tokenize(filter)?;
    limits::check_depth(&tokens)?;
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(filter).map_err(|e| Error::parse(e.to_string()))?;
    let expr = parser.parse_expr().map_err(|e| Error::parse(format!("the filter is not a SQL expression: {e}")))?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(Error::parse(format!("the filter must be one SQL expression, but '{}' follows it", next.token)));
    }
    Ok(expr.to_string())
}

impl Frontend for SqlFrontend {
    fn set_replaying(&mut self, on: bool) {
        self.replaying = on;
    }

    fn split(&self, sql: &str) -> Result<Vec<String>> {
        split::split_statements(sql)
    }

    fn plan_request(&mut self, request: &Request, catalog: &Arc<Catalog>, access: Arc<dyn ShardAccess>) -> Result<Statement> {
        match request {
            Request::Subscribe { name, query } => {
                let [query] = self.split(query)?.try_into().map_err(|_: Vec<String>| {
                    Error::query("subscribe() takes one SELECT query, not several statements")
                })?;
                let tokens = split::tokenize(&query)?;
                limits::check_depth(&tokens)?;
                limits::check_unsupported(&tokens)?;
                let (body, emit, lateness_ms) = stream::cut_streaming_clauses(&tokens)?;
                let create = stream::CreateStream {
                    name: name.clone(),
                    materialized: false,
                    or_replace: false,
                    if_not_exists: false,
                    query: body.iter().map(|t| t.to_string()).collect::<String>().trim().to_string(),
                    emit,
                    lateness_ms,
                    ..stream::CreateStream::default()
                };
                let runtime = self.runtime()?.handle().clone();
                let sql = format!("CREATE STREAM {} AS {query}", quote_ident(name));
                let def = stream::plan_stream(catalog, &create, &sql, &runtime)?;
                Ok(Statement::CreateStream { def, if_not_exists: false, or_replace: false })
            }
            Request::StreamQuery { name, filter } => {
                let mut sql = format!("SELECT * FROM {}", quote_ident(name));
                if let Some(filter) = filter.as_deref().filter(|f| !f.trim().is_empty()) {
                    // One expression, re-written from its syntax tree: nothing else can
                    // ride along.
                    sql.push_str(&format!(" WHERE {}", parse_filter(filter)?));
                }
                self.plan(&sql, &[], catalog, access)
            }
        }
    }

    fn plan(
        &mut self,
        statement: &str,
        params: &[ScalarValue],
        catalog: &Arc<Catalog>,
        access: Arc<dyn ShardAccess>,
    ) -> Result<Statement> {
        let tokens = split::tokenize(statement)?;
        limits::check_depth(&tokens)?;
        limits::check_unsupported(&tokens)?;
        if let Some(create) = sink::plan_create_sink(catalog, statement, &tokens, &self.runtime()?.handle().clone())? {
            return Ok(create);
        }
        if let Some(mut create) = stream::parse_create_stream(&tokens)? {
            create.unbounded_join_ok = self.replaying;
            let runtime = self.runtime()?.handle().clone();
            let def = stream::plan_stream(catalog, &create, statement, &runtime)?;
            return Ok(Statement::CreateStream { def, if_not_exists: create.if_not_exists, or_replace: create.or_replace });
        }
        if let Some(ddl) = ddl::plan_ddl(statement, &tokens)? {
            // A new lookup table must be readable; one that recovery replays is read
            // when a stream first looks a key up (its server may be down now).
            if let (Statement::CreateSource { def, .. }, false) = (&ddl, self.replaying) {
                if let Some(lookup) = &def.lookup {
                    lookup.check()?;
                }
            }
            return Ok(ddl);
        }
        self.sync_tables(catalog, &access)?;
        // A Python function over a group's rows becomes its aggregate twin (`group_call`).
        let rewritten = group_call::rewrite_sql(statement, &catalog.functions);
        let statement = rewritten.as_deref().unwrap_or(statement);
        let runtime = self.runtime()?.handle().clone();
        if let Some(windowed) = adhoc::plan_windowed_query(catalog, statement, access.clone(), &runtime)? {
            exportable(&windowed.schema())?;
            return Ok(Statement::Query(Box::new(windowed)));
        }
        let options = SQLOptions::new().with_allow_ddl(false).with_allow_statements(false);
        let runtime = self.runtime()?.handle().clone();
        let ctx = self.ctx.clone();
        let sql = statement.to_string();
        let mut df = runtime.block_on(async move { ctx.sql_with_options(&sql, options).await })?;
        if !params.is_empty() {
            df = df.with_param_values(ParamValues::List(params.iter().cloned().map(Into::into).collect()))?;
        }
        exportable(df.schema().as_arrow())?;
        let kind = match df.logical_plan() {
            LogicalPlan::Dml(_) => QueryKind::RowsAffected,
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_) => QueryKind::Metadata,
            _ => QueryKind::Rows,
        };
        // The schema the rows will have: the plan's after type coercion (before it, a
        // `CASE WHEN … THEN 3 ELSE px END` claims BIGINT while its rows are DOUBLE).
        let state = self.ctx.state();
        let analyzed = datafusion::optimizer::Analyzer::new().execute_and_check(
            df.logical_plan().clone(),
            state.config_options(),
            |_, _| {},
        )?;
        let schema = Arc::new(analyzed.schema().as_arrow().clone());
        Ok(Statement::Query(Box::new(DataFusionQuery { df, kind, runtime, schema })))
    }

    fn shutdown(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A result Arrow's C interface cannot carry (a NUL in a column name) is refused before it
/// runs, as a query error.
fn exportable(schema: &arrow::datatypes::Schema) -> Result<()> {
    laminardb_engine::catalog::check_exportable("the result", schema).map_err(|e| Error::query(e.message))
}

struct DataFusionQuery {
    df: DataFrame,
    kind: QueryKind,
    runtime: tokio::runtime::Handle,
    schema: SchemaRef,
}

impl PreparedQuery for DataFusionQuery {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn kind(&self) -> QueryKind {
        self.kind
    }

    fn start(self: Box<Self>) -> Result<QueryHandle> {
        let schema = self.schema();
        let (tx, rx) = flume::bounded(QUERY_BATCHES_MAX);
        let cancel = CancelFlag::default();
        let flag = cancel.clone();
        let df = self.df;
        let errors = tx.clone();
        let run = async move {
            let mut stream = df.execute_stream().await?;
            while let Some(batch) = stream.next().await {
                if flag.is_cancelled() {
                    return Err(Error::new(laminardb_engine::ErrorCode::QueryCancelled, "the query was cancelled"));
                }
                if tx.send_async(Ok(batch?)).await.is_err() {
                    return Ok(()); // the reader went away
                }
            }
            Ok::<_, Error>(())
        };
        self.runtime.spawn(async move {
            let failure = match std::panic::AssertUnwindSafe(run).catch_unwind().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(panic) => Error::internal(format!(
                    "panic while executing a query: {}",
                    laminardb_engine::error::panic_message(&*panic)
                )),
            };
            let _ = errors.send_async(Err(failure)).await;
        });
        Ok(QueryHandle { schema, batches: rx, cancel })
    }
}
