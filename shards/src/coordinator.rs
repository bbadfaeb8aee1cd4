//! The coordinator: one thread that owns the catalog and the SQL front end, and is the
//! only sender to the shards.
//!
//! It runs a glommio executor (unpinned: it must not steal a shard's core) with two
//! command loops: the bounded queue from callers (Python) and an unbounded internal queue
//! from running queries (their scans and `INSERT … SELECT` rows). The internal queue is
//! separate so a query can always make progress while callers have filled theirs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::ScalarValue;
use glommio::channels::shared_channel::{self, ConnectedSender};
use glommio::{LocalExecutorBuilder, Placement};
use parking_lot::RwLock;

use laminardb_engine::catalog::{Catalog, SourceKind};
use laminardb_engine::config::EngineConfig;
use laminardb_engine::frontend::{Frontend, ObjectKind, QueryKind, ShardAccess, Statement};
use laminardb_engine::partition::partition_batch;
use laminardb_engine::{Error, ErrorCode, Result};

use crate::command::{reply_channel, AckLatch, Command, PanicSite, Reply, ShardCommand};
use crate::handle::Outcome;
use crate::health::{catch, Health};
use crate::shard;

pub(crate) type Published = Arc<RwLock<Arc<Catalog>>>;

pub(crate) struct Startup {
    pub config: EngineConfig,
    pub frontend: Box<dyn Frontend>,
    pub commands: flume::Receiver<Command>,
    pub internal: (flume::Sender<Command>, flume::Receiver<Command>),
    pub published: Published,
    pub health: Arc<Health>,
    pub ready: flume::Sender<Result<()>>,
}

/// The coordinator thread's body. Returns once shut down and every shard has stopped.
pub(crate) fn run(startup: Startup) {
    let Startup { config, frontend, commands, internal, published, health, ready } = startup;
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default();
    let mut senders = Vec::with_capacity(config.shards);
    let mut joins = Vec::with_capacity(config.shards);
    for id in 0..config.shards {
        let (tx, rx) = shared_channel::new_bounded(config.queue_capacity());
        let cpu = (config.pin_shards && !cores.is_empty()).then(|| cores[id % cores.len()]);
        match shard::spawn(id, cpu, rx, health.clone()) {
            Ok(join) => {
                senders.push(tx);
                joins.push(join);
            }
            Err(e) => {
                let _ = ready.send(Err(Error::new(ErrorCode::ConnectionFailed, format!("cannot start shard {id}: {e}"))));
                return;
            }
        }
    }
    let executor = match LocalExecutorBuilder::new(Placement::Unbound)
        .name("laminar-coordinator")
        .io_memory(shard::SHARD_IO_MEMORY_BYTES)
        .make()
    {
        Ok(ex) => ex,
        Err(e) => {
            let _ = ready.send(Err(Error::new(ErrorCode::ConnectionFailed, format!("cannot start coordinator: {e}"))));
            return;
        }
    };
    let shards = config.shards;
    let (frontend, shutdown_reply) = executor.run(async move {
        let mut connected = Vec::with_capacity(senders.len());
        for tx in senders {
            connected.push(tx.connect().await);
        }
        let access: Arc<dyn ShardAccess> =
            Arc::new(CoordinatorAccess { internal: internal.0.clone(), published: published.clone(), shards });
        let initial = published.read().clone();
        let coord = Rc::new(Coordinator {
            shards: connected,
            catalog: RefCell::new(initial),
            published,
            frontend: RefCell::new(Some(frontend)),
            access,
            watermarks: RefCell::new(HashMap::new()),
        });
        let _ = ready.send(Ok(()));
        let internal_tx = internal.0;
        // Not detached: at shutdown this loop must finish (and drop its pending receive)
        // inside the executor, or its waker would keep the executor's resources alive.
        let internal_loop = glommio::spawn_local({
            let coord = coord.clone();
            let rx = internal.1;
            async move {
                while let Ok(cmd) = rx.recv_async().await {
                    if matches!(cmd, Command::Shutdown { .. }) {
                        break;
                    }
                    coord.handle(cmd).await;
                }
            }
        });
        let mut shutdown_reply = None;
        while let Ok(cmd) = commands.recv_async().await {
            if let Command::Shutdown { reply, sent } = cmd {
                if let Some(sent) = sent {
                    // A short blocking wait, once, at shutdown (see `Handle::close`).
                    let _ = sent.recv_timeout(std::time::Duration::from_secs(1));
                }
                shutdown_reply = Some(reply);
                break;
            }
            coord.handle(cmd).await;
        }
        let (reply, _) = reply_channel();
        let _ = internal_tx.send(Command::Shutdown { reply, sent: None });
        internal_loop.await;
        for tx in &coord.shards {
            let _ = tx.send(ShardCommand::Stop).await;
        }
        let frontend = coord.frontend.borrow_mut().take();
        (frontend, shutdown_reply)
    });
    if let Some(mut frontend) = frontend {
        frontend.shutdown();
    }
    for join in joins {
        if join.join().is_err() {
            health.thread_died("shard", "its thread panicked".into());
        }
    }
    if let Some(reply) = shutdown_reply {
        let _ = reply.send(Ok(()));
    }
}

struct Coordinator {
    shards: Vec<ConnectedSender<ShardCommand>>,
    catalog: RefCell<Arc<Catalog>>,
    published: Published,
    frontend: RefCell<Option<Box<dyn Frontend>>>,
    access: Arc<dyn ShardAccess>,
    watermarks: RefCell<HashMap<String, i64>>,
}

impl Coordinator {
    async fn handle(&self, cmd: Command) {
        match cmd {
            Command::Execute { sql, params, reply } => {
                let _ = reply.send(self.execute(&sql, &params).await);
            }
            Command::Insert { source, parts, reply } => {
                self.insert(&source, parts, reply).await;
            }
            Command::Scan { source, shard, reply } => {
                let Some(tx) = self.shards.get(shard) else {
                    let _ = reply.send(Err(Error::internal(format!("no shard {shard}"))));
                    return;
                };
                let _ = tx.send(ShardCommand::Scan { source: source.into(), reply }).await;
            }
            Command::Stats { source, reply } => {
                let _ = reply.send(self.stats(&source).await);
            }
            Command::Watermark { source, watermark_ms, reply } => {
                let result = self.catalog.borrow().source(&source).map(|_| ()).map(|()| {
                    let mut marks = self.watermarks.borrow_mut();
                    let mark = marks.entry(source).or_insert(watermark_ms);
                    *mark = (*mark).max(watermark_ms);
                    *mark
                });
                let _ = reply.send(result);
            }
            Command::InjectPanic { site, reply } => match site {
                PanicSite::Coordinator => {
                    let _ = reply.send(catch("coordinator", || panic!("injected panic (test hook)")));
                }
                PanicSite::Shard => {
                    let _ = self.shards[0].send(ShardCommand::InjectPanic { reply }).await;
                }
            },
            Command::Shutdown { reply, .. } => {
                let _ = reply.send(Err(Error::internal("shutdown arrived on the internal queue")));
            }
        }
    }

    async fn execute(&self, sql: &str, params: &[ScalarValue]) -> Result<Vec<Outcome>> {
        let statements = self.with_frontend(|f| f.split(sql))?;
        if statements.is_empty() {
            return Err(Error::parse("empty SQL statement"));
        }
        let mut outcomes = Vec::with_capacity(statements.len());
        for text in &statements {
            let catalog = self.catalog.borrow().clone();
            let access = self.access.clone();
            let statement = self.with_frontend(|f| f.plan(text, params, &catalog, access))?;
            outcomes.push(self.apply(statement).await?);
        }
        Ok(outcomes)
    }

    fn with_frontend<T>(&self, f: impl FnOnce(&mut dyn Frontend) -> Result<T>) -> Result<T> {
        let mut guard = self.frontend.borrow_mut();
        let frontend = guard.as_mut().ok_or_else(Error::shutdown)?;
        catch("the SQL front end", || f(frontend.as_mut()))
    }

    async fn apply(&self, statement: Statement) -> Result<Outcome> {
        match statement {
            Statement::CreateSource { def, if_not_exists, or_replace } => {
                let verb = match def.kind {
                    SourceKind::Source => "CREATE SOURCE",
                    SourceKind::Table => "CREATE TABLE",
                };
                let name = def.name.clone();
                let exists = self.catalog.borrow().contains(&name);
                if exists && if_not_exists {
                    return Ok(Outcome::Ddl { verb: verb.into(), object: name });
                }
                if exists && or_replace {
                    self.drop_source(&name).await?;
                }
                self.update_catalog(|c| c.add_source(def))?;
                Ok(Outcome::Ddl { verb: verb.into(), object: name })
            }
            Statement::Drop { kind, name, if_exists } => {
                let verb = format!("DROP {}", kind.sql_name());
                match kind {
                    ObjectKind::Source | ObjectKind::Table => match self.drop_source(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                    ObjectKind::Stream | ObjectKind::Sink | ObjectKind::View => {
                        if !if_exists {
                            return Err(Error::table_not_found(&name));
                        }
                    }
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

    async fn drop_source(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_source(name))?;
        self.watermarks.borrow_mut().remove(&removed.name);
        let source: Arc<str> = removed.name.as_str().into();
        for tx in &self.shards {
            tx.send(ShardCommand::DropSource { source: source.clone() })
                .await
                .map_err(|_| Error::internal("a shard has stopped"))?;
        }
        Ok(())
    }

    fn update_catalog<T>(&self, change: impl FnOnce(&mut Catalog) -> Result<T>) -> Result<T> {
        let mut next = (**self.catalog.borrow()).clone();
        let out = change(&mut next)?;
        let next = Arc::new(next);
        *self.catalog.borrow_mut() = next.clone();
        *self.published.write() = next;
        Ok(out)
    }

    async fn insert(&self, source: &str, parts: Vec<Vec<RecordBatch>>, reply: Reply<u64>) {
        let name: Arc<str> = {
            let catalog = self.catalog.borrow();
            match catalog.source(source) {
                // The caller cast against a catalog snapshot; a source dropped and re-created
                // with another schema since then must not receive those rows.
                Ok(def) if parts.iter().flatten().all(|b| b.schema().fields() == def.schema.fields()) => {
                    def.name.as_str().into()
                }
                Ok(_) => {
                    let _ = reply.send(Err(Error::new(
                        ErrorCode::SchemaMismatch,
                        format!("'{source}' changed while the insert was prepared; retry"),
                    )));
                    return;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        };
        let busy: Vec<(usize, Vec<RecordBatch>)> =
            parts.into_iter().enumerate().filter(|(_, p)| !p.is_empty()).collect();
        if busy.is_empty() {
            let _ = reply.send(Ok(0));
            return;
        }
        let latch = AckLatch::new(busy.len(), reply);
        for (shard, batches) in busy {
            let cmd = ShardCommand::Append { source: name.clone(), batches, ack: latch.clone() };
            if self.shards[shard].send(cmd).await.is_err() {
                latch.done(Err(Error::internal(format!("shard {shard} has stopped"))));
            }
        }
    }

    async fn stats(&self, source: &str) -> Result<Vec<(u64, u64)>> {
        let name: Arc<str> = self.catalog.borrow().source(source)?.name.as_str().into();
        let mut waits = Vec::with_capacity(self.shards.len());
        for tx in &self.shards {
            let (reply, rx) = reply_channel();
            tx.send(ShardCommand::Stats { source: name.clone(), reply })
                .await
                .map_err(|_| Error::internal("a shard has stopped"))?;
            waits.push(rx);
        }
        let mut out = Vec::with_capacity(waits.len());
        for rx in waits {
            out.push(rx.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))??);
        }
        Ok(out)
    }
}

/// The front end's window onto the shards, used from its query threads.
struct CoordinatorAccess {
    internal: flume::Sender<Command>,
    published: Published,
    shards: usize,
}

impl ShardAccess for CoordinatorAccess {
    fn shards(&self) -> usize {
        self.shards
    }

    fn scan(&self, source: &str, shard: usize) -> Result<flume::Receiver<Result<Vec<RecordBatch>>>> {
        let (reply, rx) = reply_channel();
        self.internal
            .send(Command::Scan { source: source.to_string(), shard, reply })
            .map_err(|_| Error::shutdown())?;
        Ok(rx)
    }

    fn insert(&self, source: &str, batch: RecordBatch) -> Result<flume::Receiver<Result<u64>>> {
        let catalog = self.published.read().clone();
        let def = catalog.source(source)?;
        let batch = laminardb_engine::ingest::cast_to_schema(&batch, &def.schema)?;
        let parts = partition_batch(&batch, &def.partition_key, self.shards)?
            .into_iter()
            .map(|p| p.into_iter().collect())
            .collect();
        let (reply, rx) = reply_channel();
        self.internal
            .send(Command::Insert { source: def.name.clone(), parts, reply })
            .map_err(|_| Error::shutdown())?;
        Ok(rx)
    }
}
