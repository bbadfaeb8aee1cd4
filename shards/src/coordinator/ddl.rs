//! The coordinator's catalog part: statements planned by the front end and applied (the
//! catalog swapped, outputs made, streams and sinks added to every shard, sources
//! dropped), and the DDL history a checkpoint keeps of the live objects.

use std::cell::RefCell;
use std::sync::Arc;

use datafusion::common::ScalarValue;

use laminardb_engine::catalog::{Catalog, SourceKind, TRANSIENT_PREFIX};
use laminardb_engine::dataflow::{Dag, Port, Route, Upstream, Watermark};
use laminardb_engine::frontend::{Frontend, ObjectKind, QueryKind, Request, Statement};
use laminardb_engine::sink::SinkPlan;
use laminardb_engine::stream::output::Output;
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::wal::Record;
use laminardb_engine::{Error, ErrorCode, Result};

use super::{Coordinator, Published};
use crate::command::{reply_channel, Ack, ShardCommand};
use crate::handle::Outcome;
use crate::health::catch;
use crate::store::RetainPolicy;

/// The catalog and the SQL front end.
pub(super) struct Ddl {
    pub(super) catalog: RefCell<Arc<Catalog>>,
    /// The catalog as callers' threads read it (swapped on every change).
    pub(super) published: Published,
    pub(super) frontend: RefCell<Option<Box<dyn Frontend>>>,
    /// The statement that created each live object, in creation order: the catalog part
    /// of a checkpoint. A drop removes its object's entry, a replace moves it to the end,
    /// so it holds what exists, however many objects came and went.
    pub(super) history: RefCell<Vec<(String, String)>>,
    /// Held by catalog changes and checkpoints (the timer's checkpoints run beside the
    /// command loop).
    pub(super) lock: futures::lock::Mutex<()>,
}

impl Ddl {
    pub(super) fn new(published: Published, frontend: Box<dyn Frontend>) -> Ddl {
        let catalog = published.read().clone();
        Ddl {
            catalog: RefCell::new(catalog),
            published,
            frontend: RefCell::new(Some(frontend)),
            history: RefCell::new(Vec::new()),
            lock: futures::lock::Mutex::new(()),
        }
    }

    /// The current catalog.
    pub(super) fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }
}

/// What the shards keep of `def`'s rows (`None`: everything).
fn retain_policy(def: &laminardb_engine::catalog::SourceDef) -> Result<Option<RetainPolicy>> {
    let retention = def.retention()?;
    if !retention.is_some() {
        return Ok(None);
    }
    let time = match (retention.time_ms, &def.watermark) {
        (None, _) => None,
        (Some(span), Some(w)) => Some((def.schema.index_of(&w.column).map_err(|_| Error::invalid_schema(format!("watermark column '{}' is not a column", w.column)))?, span)),
        (Some(_), None) => {
            return Err(Error::invalid_schema(format!("retention by time needs a watermark on '{}'", def.name)))
        }
    };
    Ok(Some(RetainPolicy { time, rows: retention.rows }))
}

/// What a DDL statement does to the checkpoint's DDL history (`Coordinator::ddl_history`).
#[derive(Debug, PartialEq, Eq)]
enum DdlChange {
    /// Creates (or replaces) its object.
    Create,
    /// `CREATE … IF NOT EXISTS` of an object that exists: changes nothing.
    Nothing,
    Drop,
}

impl DdlChange {
    /// Decided before the statement runs (whether its object exists already).
    fn of(statement: &Statement, catalog: &Catalog) -> DdlChange {
        let (name, if_not_exists) = match statement {
            Statement::CreateSource { def, if_not_exists, .. } => (&def.name, *if_not_exists),
            Statement::CreateStream { def, if_not_exists, .. } => (&def.name, *if_not_exists),
            Statement::CreateSink { def, if_not_exists, .. } => (&def.name, *if_not_exists),
            Statement::Drop { .. } => return DdlChange::Drop,
            Statement::Query(_) => return DdlChange::Nothing,
        };
        if if_not_exists && catalog.contains(name) {
            DdlChange::Nothing
        } else {
            DdlChange::Create
        }
    }

    /// Applies the statement `sql`, which succeeded on `object`, to `history`.
    fn record(&self, history: &mut Vec<(String, String)>, object: &str, sql: &str) {
        match self {
            DdlChange::Nothing => {}
            DdlChange::Drop => history.retain(|(name, _)| name != object),
            DdlChange::Create => {
                history.retain(|(name, _)| name != object);
                history.push((object.to_string(), sql.to_string()));
            }
        }
    }
}

impl Coordinator {
    pub(super) async fn execute(&self, sql: &str, params: &[ScalarValue]) -> Result<Vec<Outcome>> {
        let statements = self.with_frontend(|f| f.split(sql))?;
        if statements.is_empty() {
            return Err(Error::parse("empty SQL statement"));
        }
        let mut outcomes = Vec::with_capacity(statements.len());
        for text in &statements {
            let catalog = self.ddl.catalog();
            let access = self.access.clone();
            let statement = self.with_frontend(|f| f.plan(text, params, &catalog, access))?;
            let is_ddl = !matches!(statement, Statement::Query(_));
            let _ddl = if is_ddl { Some(self.ddl.lock.lock().await) } else { None };
            let change = DdlChange::of(&statement, &self.ddl.catalog.borrow());
            let outcome = self.apply(statement).await?;
            if let Outcome::Ddl { object, .. } = &outcome {
                if !object.starts_with(TRANSIENT_PREFIX) && self.durable.root.is_some() {
                    change.record(&mut self.ddl.history.borrow_mut(), object, text);
                    self.log_control(|lsn| Record::Ddl { lsn, sql: text.clone() }).await?;
                }
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// A structured request of the binding: planned by the front end from its parts, and
    /// never logged (a subscription's hidden stream lives as long as the connection).
    pub(super) async fn request(&self, request: &Request) -> Result<Outcome> {
        let catalog = self.ddl.catalog();
        let access = self.access.clone();
        let statement = self.with_frontend(|f| f.plan_request(request, &catalog, access))?;
        let is_ddl = !matches!(statement, Statement::Query(_));
        let _ddl = if is_ddl { Some(self.ddl.lock.lock().await) } else { None };
        self.apply(statement).await
    }

    pub(super) fn with_frontend<T>(&self, f: impl FnOnce(&mut dyn Frontend) -> Result<T>) -> Result<T> {
        let mut guard = self.ddl.frontend.borrow_mut();
        let frontend = guard.as_mut().ok_or_else(Error::shutdown)?;
        catch("the SQL front end", || f(frontend.as_mut()))
    }

    pub(super) async fn apply(&self, statement: Statement) -> Result<Outcome> {
        match statement {
            Statement::CreateSource { def, if_not_exists, or_replace } => {
                let verb = match def.kind {
                    SourceKind::Source => "CREATE SOURCE",
                    SourceKind::Table => "CREATE TABLE",
                    SourceKind::Lookup => "CREATE LOOKUP TABLE",
                };
                let name = def.name.clone();
                let exists = self.ddl.catalog.borrow().contains(&name);
                if exists && if_not_exists {
                    return Ok(Outcome::Ddl { verb: verb.into(), object: name });
                }
                if exists && or_replace {
                    self.drop_source(&name).await?;
                }
                let schema = def.schema.clone();
                let connected = def.connector.is_some();
                let retention = retain_policy(&def)?;
                self.update_catalog(|c| c.add_source(def))?;
                self.outputs.write().insert(name.clone(), Output::new(name.clone(), schema));
                if let Some(policy) = retention {
                    let source: Arc<str> = name.as_str().into();
                    self.send_shards(|| ShardCommand::Retain { source: source.clone(), policy }).await?;
                }
                if connected {
                    self.ingest.connected.borrow_mut().insert(name.clone(), false);
                    if self.ingest.running.get() {
                        self.start_source(&name).await?;
                    }
                }
                Ok(Outcome::Ddl { verb: verb.into(), object: name })
            }
            Statement::CreateStream { def, if_not_exists, or_replace } => {
                let verb = if def.plan.materialized { "CREATE MATERIALIZED VIEW" } else { "CREATE STREAM" };
                let name = def.name.clone();
                let exists = self.ddl.catalog.borrow().contains(&name);
                if exists && if_not_exists {
                    return Ok(Outcome::Ddl { verb: verb.into(), object: name });
                }
                let functions = self.ddl.catalog.borrow().functions.clone();
                let unstored = def.plan.functions.iter().find(|f| !functions.is_stored(f));
                if let (Some(function), true) = (unstored, self.durable.reopens) {
                    if !name.starts_with(TRANSIENT_PREFIX) {
                        return Err(Error::unsupported(format!(
                            "'{name}' calls the Python function '{function}' in a database with storage, and that \
                             function cannot be imported again when the database reopens (a lambda, a local function \
                             or class, or one its module does not name): register a function or class defined at a \
                             module's top level, or use it in queries and subscriptions, or in streams of an in-memory \
                             database"
                        )));
                    }
                }
                if exists && or_replace {
                    self.drop_stream(&name).await?;
                }
                let plan = def.plan.clone();
                self.update_catalog(|c| c.add_stream(def))?;
                if let Some(ms) = plan.tick_ms() {
                    self.start_ticker(&name, ms);
                }
                let output = Output::new(name.clone(), plan.schema.clone());
                self.outputs.write().insert(name.clone(), output.clone());
                // No insert between adding the stream and its backfill: what is retained
                // then is read once by the backfill, what comes after once as it arrives.
                let _dispatching = self.ingest.dispatch_lock.lock().await;
                let marks: Vec<(Arc<str>, Watermark)> =
                    self.ingest.watermarks.borrow().iter().map(|(k, v)| (Arc::from(k.as_str()), *v)).collect();
                let added = self
                    .ask_shards(|_, reply| ShardCommand::AddStream { plan: plan.clone(), output: output.clone(), marks: marks.clone(), reply })
                    .await?;
                for rx in added {
                    let result = rx.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))?;
                    if let Err(e) = result {
                        output.record_error(&e.to_string());
                    }
                }
                if plan.backfill {
                    let (reply, done) = reply_channel();
                    let ack = Ack::replying(None, &self.ingest.inflight, reply);
                    let stream: Arc<str> = Arc::from(name.as_str());
                    self.tell_shards(&ack, || ShardCommand::Backfill { stream: stream.clone(), ack: ack.clone() }).await;
                    drop(ack);
                    let backfilled = done.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))?;
                    if let Err(e) = backfilled {
                        output.record_error(&format!("reading the rows retained before the stream was created: {e}"));
                    }
                }
                Ok(Outcome::Ddl { verb: verb.into(), object: name })
            }
            Statement::CreateSink { def, stream, if_not_exists } => {
                let name = def.name.clone();
                if if_not_exists && self.ddl.catalog.borrow().contains(&name) {
                    return Ok(Outcome::Ddl { verb: "CREATE SINK".into(), object: name });
                }
                if self.ddl.catalog.borrow().contains(&name) {
                    return Err(Error::table_exists(&name));
                }
                if self.durable.reopens && laminardb_engine::sink::is_transient(&def.connector) {
                    return Err(Error::unsupported(format!(
                        "sink '{name}': connector '{}' calls into this Python process, so a database with storage \
                         could not open it again when it reopens (use it with an in-memory database)",
                        def.connector
                    )));
                }
                if let Some(stream) = stream {
                    let verb = self.apply(Statement::CreateStream { def: stream, if_not_exists: false, or_replace: false });
                    Box::pin(verb).await?;
                }
                let input = self.outputs.read().get(&def.input).cloned().ok_or_else(|| Error::table_not_found(&def.input))?;
                let counters = Output::new(name.clone(), input.schema.clone());
                // The sink is the one node of its own dataflow, on every shard. Its options
                // were checked when the statement was planned; a shard whose instance cannot
                // open fails the CREATE below.
                if let Err(e) = self.update_catalog(|c| c.add_sink(def.clone())) {
                    if def.owns_input {
                        let _ = Box::pin(self.drop_stream(&def.input)).await;
                    }
                    return Err(e);
                }
                let spec = SinkPlan { connector: def.connector.clone(), options: def.options.clone(), schema: input.schema.clone(), counters: counters.clone() };
                let mut dag = Dag::default();
                dag.add(Arc::new(spec), vec![Port { from: Upstream::Input(def.input.clone()), route: Route::Forward }]);
                let plan = Arc::new(StreamPlan { name: name.clone(), sql: def.sql.clone(), dag, schema: input.schema.clone(), materialized: false, backfill: false, functions: Vec::new(), changes_asked: false });
                self.outputs.write().insert(name.clone(), counters.clone());
                // No insert half-way: every shard's sink starts with the same rows.
                let _dispatching = self.ingest.dispatch_lock.lock().await;
                let added = self
                    .ask_shards(|_, reply| ShardCommand::AddStream { plan: plan.clone(), output: counters.clone(), marks: vec![], reply })
                    .await?;
                let mut failure = None;
                for rx in added {
                    let result = rx.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))?;
                    if let Err(e) = result {
                        failure.get_or_insert(e);
                    }
                }
                drop(_dispatching);
                if let Some(e) = failure {
                    // A sink that did not open on every shard (a broker not reachable, an
                    // address in use) is not created: it would lose the rows of the others.
                    let _ = Box::pin(self.drop_sink(&name)).await;
                    return Err(e);
                }
                Ok(Outcome::Ddl { verb: "CREATE SINK".into(), object: name })
            }
            Statement::Drop { kind, name, if_exists } => {
                let verb = format!("DROP {}", kind.sql_name());
                match kind {
                    ObjectKind::Source | ObjectKind::Table => match self.drop_source(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                    ObjectKind::Stream | ObjectKind::View => match self.drop_stream(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                    ObjectKind::Sink => match self.drop_sink(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                }
                Ok(Outcome::Ddl { verb, object: name })
            }
            Statement::Query(prepared) => {
                let kind = prepared.kind();
                let handle = prepared.start()?;
                if kind != QueryKind::RowsAffected {
                    return Ok(Outcome::Query { kind, handle });
                }
                let mut affected = 0u64;
                while let Ok(batch) = handle.batches.recv_async().await {
                    affected += crate::handle::count_of(&batch?)?;
                }
                Ok(Outcome::RowsAffected(affected))
            }
        }
    }

    pub(super) async fn drop_sink(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_sink(name))?;
        // Each shard closes its instance (which delivers what is pending).
        let name: Arc<str> = removed.name.as_str().into();
        for tx in self.shards.iter() {
            let _ = tx.send(ShardCommand::DropStream { name: name.clone() }).await;
        }
        self.outputs.write().remove(&removed.name);
        if removed.owns_input {
            self.drop_stream(&removed.input).await?;
        }
        Ok(())
    }

    pub(super) async fn drop_stream(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_stream(name))?;
        if let Some(output) = self.outputs.write().remove(&removed.name) {
            output.close();
        }
        let name: Arc<str> = removed.name.as_str().into();
        self.send_shards(|| ShardCommand::DropStream { name: name.clone() }).await
    }

    pub(super) async fn drop_source(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_source(name))?;
        self.ingest.watermarks.borrow_mut().remove(&removed.name);
        self.ingest.connected.borrow_mut().remove(&removed.name);
        if let Some(output) = self.outputs.write().remove(&removed.name) {
            output.close();
        }
        let source: Arc<str> = removed.name.as_str().into();
        self.send_shards(|| ShardCommand::DropSource { source: source.clone() }).await
    }

    pub(super) fn update_catalog<T>(&self, change: impl FnOnce(&mut Catalog) -> Result<T>) -> Result<T> {
        let mut next = (**self.ddl.catalog.borrow()).clone();
        let out = change(&mut next)?;
        let next = Arc::new(next);
        *self.ddl.catalog.borrow_mut() = next.clone();
        self.ingest.flows.borrow_mut().clear();
        *self.ddl.published.write() = next;
        Ok(out)
    }
}
