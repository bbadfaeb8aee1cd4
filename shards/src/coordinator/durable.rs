//! The coordinator's durability part: the control log (DDL and watermark calls) and the
//! lsns every WAL record takes, checkpoints (a barrier through every shard, then the
//! manifest, then the collection of what it made obsolete), and recovery at open (the
//! checkpoint loaded, the WAL after it replayed through the ordinary paths).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;

use laminardb_engine::checkpoint::{self, collect_garbage, Manifest};
use laminardb_engine::dataflow::Watermark;
use laminardb_engine::recovery::Recovered;
use laminardb_engine::wal::{self, Frontier, Record, RecoveryReport};
use laminardb_engine::{Error, Result};

use super::{answers, Coordinator};
use crate::command::{reply_channel, Ack, ShardCommand};
use crate::handle::{count_future_rows, prepare_insert, Prepared};
use crate::storage::CheckpointStats;
use crate::wal::WalWriter;

/// The control log, lsns and checkpoints.
pub(super) struct Durable {
    /// Accepted work goes to the WAL: there is a storage directory and no replay is
    /// running.
    pub(super) logging: Cell<bool>,
    /// The control log: catalog changes and watermark calls. Async-locked: both command
    /// loops may log.
    pub(super) control: futures::lock::Mutex<Option<WalWriter>>,
    /// The next log sequence number: one per logged command, across all WAL owners.
    pub(super) next_lsn: Cell<u64>,
    /// The lsns taken and not yet acknowledged: every logged record carries what it
    /// proves was acknowledged before it (`wal::Frontier`, checked by recovery).
    pub(super) frontier: Arc<Frontier>,
    /// The storage directory, if any.
    pub(super) root: Option<Arc<std::path::Path>>,
    /// The database can be opened again from `root` (not a temporary directory of an
    /// in-memory database's checkpoints): what it stores must be plannable again.
    pub(super) reopens: bool,
    pub(super) last_checkpoint: Cell<u64>,
    /// The checkpoints taken, for metrics.
    pub(super) checkpoints: Arc<parking_lot::Mutex<CheckpointStats>>,
    /// Deleting what the latest manifest made obsolete, off the checkpoint's path
    /// (`spawn_gc`); finished before the next checkpoint writes files.
    pub(super) gc: RefCell<Option<std::thread::JoinHandle<()>>>,
}

impl Durable {
    /// `next_lsn`: the first lsn not in the log read at open (1 for a new database).
    pub(super) fn new(
        control: Option<WalWriter>,
        root: Option<Arc<std::path::Path>>,
        reopens: bool,
        next_lsn: u64,
        checkpoints: Arc<parking_lot::Mutex<CheckpointStats>>,
    ) -> Durable {
        Durable {
            reopens: reopens && root.is_some(),
            logging: Cell::new(control.is_some()),
            control: futures::lock::Mutex::new(control),
            next_lsn: Cell::new(next_lsn),
            frontier: Arc::new(Frontier::new(next_lsn)),
            root,
            last_checkpoint: Cell::new(0),
            checkpoints,
            gc: RefCell::new(None),
        }
    }
}

impl Coordinator {
    /// The next lsn, taken: it stays in the acknowledged frontier until its work is done.
    pub(super) fn take_lsn(&self) -> u64 {
        let lsn = self.durable.next_lsn.get();
        self.durable.next_lsn.set(lsn + 1);
        self.durable.frontier.begin(lsn);
        lsn
    }

    /// Appends one record to the control log and returns once it is durable; nothing
    /// without a storage directory or while replaying.
    pub(super) async fn log_control(&self, record: impl FnOnce(u64) -> Record) -> Result<()> {
        if !self.durable.logging.get() {
            return Ok(());
        }
        let mut control = self.durable.control.lock().await;
        let Some(writer) = control.as_mut() else { return Ok(()) };
        let lsn = self.take_lsn();
        let claim = self.durable.frontier.claim();
        writer.write(&[(&record(lsn), claim)], "the coordinator").await?;
        self.durable.frontier.done(lsn);
        Ok(())
    }

    /// Deletes, on a thread of its own, the WAL segments and data files `manifest` (just
    /// published) made obsolete: unlinking takes long on this file system (discard), and
    /// nothing waits for it. Failures only leave files behind.
    pub(super) fn spawn_gc(&self, root: Arc<std::path::Path>, manifest: Manifest) {
        let spawned = std::thread::Builder::new().name("laminar-gc".into()).spawn(move || collect_garbage(&root, &manifest));
        match spawned {
            Ok(thread) => *self.durable.gc.borrow_mut() = Some(thread),
            Err(e) => log::warn!("cannot start the checkpoint's file collection: {e}"),
        }
    }

    /// Waits for the collection `spawn_gc` started, if any.
    pub(super) async fn finish_gc(&self) {
        let Some(thread) = self.durable.gc.borrow_mut().take() else { return };
        while !thread.is_finished() {
            glommio::timer::sleep(std::time::Duration::from_micros(100)).await;
        }
        let _ = thread.join();
    }

    /// Takes a checkpoint: under the dispatch lock (a few microseconds: no insert is half
    /// sent), takes its lsn, puts its barrier into every shard's command stream and rolls
    /// the control log; inserts then flow again while the shards snapshot at the barrier
    /// and record the exchange messages still in flight to them (Chandy–Lamport: see
    /// `ShardRuntime::begin_checkpoint`). Once every shard has answered, publishes the
    /// manifest and deletes the WAL segments and files it made obsolete. Returns the id.
    pub(super) async fn checkpoint(&self) -> Result<u64> {
        let root = self.durable.root.clone().ok_or_else(|| {
            Error::checkpoint("checkpointing is disabled: open the database with a path or LaminarConfig(storage_dir=…)")
        })?;
        let _ddl = self.ddl.lock.lock().await;
        let started = Instant::now();
        // The previous checkpoint's collection deletes data files its manifest does not
        // name: it must be over before this one writes any.
        self.finish_gc().await;
        let dispatching = self.ingest.dispatch_lock.lock().await;
        let paused = Instant::now();
        let id = self.durable.last_checkpoint.get() + 1;
        // Every record below the next lsn is before the barrier (the lsn is not taken:
        // lsns stay dense, so recovery can tell a lost record from an unused number).
        let lsn = self.durable.next_lsn.get();
        let waits = self.ask_shards(|_, reply| ShardCommand::Checkpoint { root: root.clone(), id, reply }).await?;
        if let Some(control) = self.durable.control.lock().await.as_mut() {
            control.roll().await;
        }
        // The sources' watermarks as of the barrier (later inserts may move them on).
        let watermarks: Vec<(String, i64)> = self.ingest.watermarks.borrow().iter().map(|(k, v)| (k.clone(), v.ms())).collect();
        drop(dispatching);
        let pause = paused.elapsed();
        // Every answer is awaited, failed or not, so no shard is still completing this
        // checkpoint when the next one begins.
        let shard_files = answers(waits).await.map_err(|e| Error::checkpoint(format!("checkpoint {id}: {e}")))?;
        // Counters as of the barrier: the sum of what each shard had published by then.
        let catalog = self.ddl.catalog();
        let outputs = self.outputs.read();
        let mut totals: HashMap<String, [i64; 4]> = catalog
            .sources
            .keys()
            .chain(catalog.streams.keys())
            .filter_map(|name| outputs.get(name).map(|o| (name.clone(), [0, 0, 0, o.counters.watermark.load(Ordering::Relaxed)])))
            .collect();
        drop(outputs);
        for files in &shard_files {
            for (name, counts) in &files.counters {
                if let Some(total) = totals.get_mut(name) {
                    for (t, c) in total.iter_mut().zip(counts) {
                        *t += *c as i64;
                    }
                }
            }
        }
        let manifest = Manifest {
            id,
            lsn,
            shards: self.shards.len(),
            created_ms: laminardb_engine::stream::time::now_ms(),
            ddl: self.ddl.history.borrow().iter().map(|(_, sql)| sql.clone()).collect(),
            watermarks,
            counters: totals.into_iter().collect(),
            bytes_written: shard_files.iter().map(|f| f.bytes_written).sum(),
            shard_files,
        };
        checkpoint::write_manifest(&root, &manifest)?;
        self.durable.last_checkpoint.set(id);
        let bytes_written = manifest.bytes_written;
        self.spawn_gc(root, manifest);
        let mut stats = self.durable.checkpoints.lock();
        stats.count += 1;
        stats.last_id = id;
        stats.last_ms = started.elapsed().as_secs_f64() * 1e3;
        stats.last_pause_ms = pause.as_secs_f64() * 1e3;
        stats.last_bytes = bytes_written;
        Ok(id)
    }

    /// Loads the checkpoint read at open: the catalog (its DDL, run again without
    /// logging), every shard's rows and state, the sources' watermarks and counters.
    pub(super) async fn restore(&self, manifest: &Manifest) -> Result<()> {
        let root = self.durable.root.clone().ok_or_else(|| Error::internal("restoring without a storage directory"))?;
        for sql in &manifest.ddl {
            self.execute(sql, &[]).await.map_err(|e| Error::checkpoint(format!("rebuilding the catalog: {sql}: {e}")))?;
        }
        let files = &manifest.shard_files;
        answers(self.ask_shards(|shard, reply| ShardCommand::Restore { root: root.clone(), files: files[shard].clone(), reply }).await?)
            .await?;
        // Exchange messages that were in flight at the checkpoint, now that every shard
        // they may route rows on to holds its state.
        let ack = Ack::born_at(None, &self.ingest.inflight, |_| {});
        self.send_shards(|| ShardCommand::ReplayChannel { ack: ack.clone() }).await?;
        for (source, mark) in &manifest.watermarks {
            if let Some(mark) = Watermark::decode(*mark) {
                self.ingest.watermarks.borrow_mut().insert(source.clone(), mark);
            }
        }
        let outputs = self.outputs.read();
        for (name, [rows, batches, late, mark]) in &manifest.counters {
            if let Some(o) = outputs.get(name) {
                o.counters.rows.store(*rows as u64, Ordering::Relaxed);
                o.counters.batches.store(*batches as u64, Ordering::Relaxed);
                o.counters.late_rows.store(*late as u64, Ordering::Relaxed);
                o.counters.watermark.fetch_max(*mark, Ordering::Relaxed);
            }
        }
        self.durable.last_checkpoint.set(manifest.id);
        Ok(())
    }

    /// Replays the WAL read at open through the ordinary paths, in lsn order, without
    /// logging it again: catalog changes run as SQL, inserts are re-partitioned for the
    /// current shard count, watermark calls move watermarks. Streams rebuild their state
    /// from the replayed input. Returns once everything has passed through every stream.
    /// A checkpoint that cannot be loaded fails the open: the WAL before it is gone, so
    /// going on would serve a database missing what the checkpoint held.
    pub(super) async fn recover(&self, recovered: Recovered) -> Result<RecoveryReport> {
        let started = Instant::now();
        let Recovered { groups, mut report, manifest, checkpoint_now, .. } = recovered;
        let logging = self.durable.logging.replace(false);
        // Statements accepted before are planned again as they were accepted.
        self.with_frontend(|f| {
            f.set_replaying(true);
            Ok(())
        })?;
        let replayed = self.replay(groups, manifest.as_ref(), &mut report).await;
        self.with_frontend(|f| {
            f.set_replaying(false);
            Ok(())
        })?;
        replayed?;
        self.durable.logging.set(logging);
        if checkpoint_now {
            // Damage was cut (recovery='truncate'): a checkpoint now puts it behind the
            // database, so the next open neither finds nor cuts it again.
            self.checkpoint().await.map_err(|e| Error::checkpoint(format!("the checkpoint after cutting damage failed: {e}")))?;
        }
        report.millis = started.elapsed().as_secs_f64() * 1e3;
        for line in report.torn_tails.iter().chain(&report.damage).chain(&report.errors) {
            log::warn!("recovery: {line}");
        }
        Ok(report)
    }

    /// The checkpoint `manifest` names, then the WAL after it (`groups`), in lsn order.
    async fn replay(&self, groups: Vec<Vec<Record>>, manifest: Option<&Manifest>, report: &mut RecoveryReport) -> Result<()> {
        if let Some(m) = manifest {
            self.restore(m).await.map_err(|e| Error::checkpoint(format!("loading checkpoint {}: {}", m.id, e.message)))?;
            // What a crash kept the last checkpoint's collection from deleting.
            if let Some(root) = self.durable.root.clone() {
                self.spawn_gc(root, m.clone());
            }
        }
        // `groups` holds only what follows the checkpoint (`Storage::read`).
        for group in groups {
            let lsn = group[0].lsn();
            let step = match &group[0] {
                Record::Ddl { sql, .. } => self.execute(sql, &[]).await.map(drop),
                Record::Watermark { source, watermark, .. } => {
                    let ack = Ack::born_at(None, &self.ingest.inflight, |_| {});
                    self.advance_watermark(&self.flow(source), *watermark, &ack).await;
                    Ok(())
                }
                Record::Append { .. } => match wal::append_batches(group) {
                    Some((source, batches)) => {
                        report.rows += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
                        self.replay_insert(&source, batches).await
                    }
                    None => Ok(()),
                },
            };
            if let Err(e) = step {
                report.errors.push(format!("lsn {lsn}: {e}"));
            }
        }
        self.drain().await;
        Ok(())
    }

    /// Logged rows go in as an insert does (re-partitioned for the current shard count).
    pub(super) async fn replay_insert(&self, source: &str, batches: Vec<RecordBatch>) -> Result<()> {
        let catalog = self.ddl.catalog();
        let Prepared { parts, max_event_ms, future_rows } =
            prepare_insert(catalog.source(source)?, &batches, self.shards.len(), self.ingest.max_event_ahead_ms)?;
        count_future_rows(&self.outputs, source, future_rows, self.ingest.max_event_ahead_ms);
        let (reply, answer) = reply_channel();
        self.insert(source, parts, max_event_ms, None, reply).await;
        // Refused at once (the source is gone or changed), or answered later: not waited on.
        match answer.try_recv() {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}
