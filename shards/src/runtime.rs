//! What one shard does with its commands: keep its partition of every source, run every
//! stream's operators over the rows it holds, and trade keyed rows and watermarks with
//! the other shards over the exchange. Everything here runs on the shard's own thread;
//! processing is synchronous, so one command is fully handled before the next.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::array::RecordBatch;
use parking_lot::RwLock;

use std::path::Path;

use laminardb_engine::checkpoint::{self, ShardFiles};
use laminardb_engine::partition::partition_by_key;
use laminardb_engine::{ipc, wal};
use laminardb_engine::stream::join::JoinOperator;
use laminardb_engine::stream::isolate::{eval_isolating, Rejected};
use laminardb_engine::stream::op::AggOperator;
use laminardb_engine::stream::output::Output;
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::{Error, Result};

use crate::command::{Ack, AckToken, Exchange, Reply, SpillRequest};
use crate::store::{LocalStore, RetainPolicy, SpillJob, SpillPolicy};

/// Outputs of every source and stream by name, shared by the coordinator, the shards and
/// the callers that subscribe.
pub type Outputs = Arc<RwLock<HashMap<String, Arc<Output>>>>;

struct StreamTask {
    plan: Arc<StreamPlan>,
    output: Arc<Output>,
    op: Option<AggOperator>,
    join: Option<JoinOperator>,
    /// Input watermarks: per branch, and for an aggregate per branch × sending shard.
    marks: Vec<i64>,
    /// This shard's output watermark of the stream.
    watermark: i64,
    late_reported: u64,
    /// Changed since the last checkpoint's file of this task, which is `state_file`.
    dirty: bool,
    state_file: Option<String>,
}

pub struct ShardRuntime {
    id: usize,
    shards: usize,
    store: LocalStore,
    outputs: Outputs,
    exchange: Vec<flume::Sender<Exchange>>,
    streams: HashMap<Arc<str>, StreamTask>,
    /// Input name → streams reading it (shared: every batch walks it, streams change rarely).
    readers: HashMap<String, Rc<[Arc<str>]>>,
    /// The watermark of every source and stream as this shard last saw it.
    marks: HashMap<String, i64>,
    /// Inputs left out of the watermark alignment of the streams reading them: sources
    /// the coordinator declared idle, and streams all of whose inputs are idle.
    idle: HashSet<String>,
    /// The token processing-time emissions carry (nobody waits for them).
    background: AckToken,
    /// `marks` changed since the last checkpoint's file of them, which is `state_file`.
    dirty: bool,
    state_file: Option<String>,
    /// The checkpoint this shard has snapshotted and is completing, if any.
    pending: Option<PendingCheckpoint>,
    /// Per peer: `Some` once its marker of the next checkpoint came in before this shard
    /// reached its own barrier (its command stream is behind its exchange inbox). What
    /// that peer sends after its marker is past its cut, so it waits here, unapplied,
    /// until this shard has snapshotted (`begin_checkpoint`).
    early: Vec<Option<Vec<Exchange>>>,
    /// Exchange messages a restored checkpoint recorded, applied on `replay_channel`.
    recorded: Vec<ChannelMsg>,
    /// Rows and batches each source and stream published from this shard: its share of
    /// their counters, exact at every checkpoint barrier.
    published: HashMap<Arc<str>, [u64; 2]>,
    /// The spill thread, when retained rows spill to disk (`LocalStore` decides when).
    spill: Option<flume::Sender<SpillRequest>>,
}

/// `state` as rkyv bytes, for a checkpoint file.
fn state_bytes<T>(state: &T) -> Result<Vec<u8>>
where
    T: for<'a> rkyv::Serialize<rkyv::api::high::HighSerializer<rkyv::util::AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rkyv::rancor::Error>>,
{
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(state).map_err(|e| Error::internal(format!("saving shard state: {e}")))?;
    Ok(bytes.into_vec())
}

fn read_state<T>(path: &Path) -> Result<T>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let bytes = checkpoint::read_checked(path)?;
    checkpoint::load_state(&bytes, &path.display().to_string())
}

/// Counts `batch` into this shard's share of `name`'s counters (runs per published batch:
/// the name is cloned only the first time).
/// Counts and reports the rows of an input batch a stream's expressions failed on; the
/// batch's other rows have gone on through the stream.
fn reject(output: &Output, input: &str, rows: usize, rejected: Rejected) {
    let n = rejected.rows.len();
    output.counters.rejected_rows.fetch_add(n as u64, Ordering::Relaxed);
    let first = rejected.rows.first().map_or(String::new(), |r| format!(" (the first at row {r} of the batch)"));
    output.record_error(&format!("{n} of {rows} rows of '{input}' rejected{first}: {}", rejected.error.message));
}

fn tally(published: &mut HashMap<Arc<str>, [u64; 2]>, name: &Arc<str>, batch: &RecordBatch) {
    if batch.num_rows() == 0 {
        return;
    }
    let rows = batch.num_rows() as u64;
    match published.get_mut(name) {
        Some([total, batches]) => {
            *total += rows;
            *batches += 1;
        }
        None => {
            published.insert(name.clone(), [rows, 1]);
        }
    }
}

/// Checkpoint `id` after this shard's snapshot (Chandy–Lamport): the exchange messages
/// each peer sent before its marker but that arrived after the snapshot are recorded —
/// they are part of the cut but in nobody's state — until every peer's marker is in.
/// Nothing waits meanwhile: the messages are applied as usual, and recorded too. A marker
/// that arrives before this shard's own barrier is held for it (`ShardRuntime::early`).
struct PendingCheckpoint {
    root: Arc<Path>,
    id: u64,
    files: Result<ShardFiles>,
    /// Per shard: its marker has not arrived yet (never true for this shard itself).
    awaiting: Vec<bool>,
    /// The WAL has started its post-checkpoint segment.
    rolled: bool,
    channel: Vec<ChannelMsg>,
    reply: Reply<ShardFiles>,
}

/// One recorded exchange message: rows (Arrow IPC) or a watermark.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ChannelMsg {
    stream: String,
    branch: u64,
    from: u64,
    rows: Option<Vec<u8>>,
    watermark: i64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ChannelState {
    msgs: Vec<ChannelMsg>,
}

/// A shard's input watermarks in a checkpoint (rkyv).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct RuntimeState {
    marks: Vec<(String, i64)>,
}

/// One stream's operator state on one shard in a checkpoint (rkyv): its own file,
/// rewritten only when the stream changed.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TaskState {
    marks: Vec<i64>,
    watermark: i64,
    late_reported: u64,
    agg: Option<Vec<u8>>,
    join: Option<Vec<u8>>,
}

impl ShardRuntime {
    pub fn new(
        id: usize,
        outputs: Outputs,
        exchange: Vec<flume::Sender<Exchange>>,
        spill: Option<(SpillPolicy, flume::Sender<SpillRequest>)>,
    ) -> Self {
        let shards = exchange.len();
        let (policy, spill) = spill.unzip();
        ShardRuntime {
            id,
            shards,
            store: LocalStore::new(policy),
            outputs,
            exchange,
            streams: HashMap::new(),
            readers: HashMap::new(),
            marks: HashMap::new(),
            idle: HashSet::new(),
            background: Ack::background(),
            dirty: true,
            state_file: None,
            pending: None,
            early: (0..shards).map(|_| None).collect(),
            recorded: Vec::new(),
            published: HashMap::new(),
            spill,
        }
    }

    /// The barrier of checkpoint `id` arrived on the command stream: snapshot now, tell
    /// every peer, and record what still arrives from each peer until its marker. The
    /// answer goes out once the WAL has rolled (`checkpoint_rolled`) and every marker is
    /// in. Markers go out even when the snapshot failed, so no peer waits forever.
    pub fn begin_checkpoint(&mut self, root: Arc<Path>, id: u64, reply: Reply<ShardFiles>) {
        let files = crate::health::catch(&format!("shard {}", self.id), || self.snapshot(&root, id));
        for (peer, tx) in self.exchange.iter().enumerate() {
            if peer != self.id {
                let _ = tx.send(Exchange::Marker { from: self.id });
            }
        }
        let awaiting = (0..self.shards).map(|s| s != self.id && self.early[s].is_none()).collect();
        let pending = PendingCheckpoint { root, id, files, awaiting, rolled: false, channel: Vec::new(), reply };
        if let Some(old) = self.pending.replace(pending) {
            let _ = old.reply.send(Err(Error::checkpoint(format!("checkpoint {} overtaken by the next", old.id))));
        }
        // Peers whose marker came first: what they sent after it is past both snapshots.
        let held: Vec<Vec<Exchange>> = self.early.iter_mut().filter_map(Option::take).collect();
        for msg in held.into_iter().flatten() {
            self.on_exchange(msg);
        }
    }

    /// The WAL now writes past the checkpoint's barrier.
    pub fn checkpoint_rolled(&mut self) {
        if let Some(p) = self.pending.as_mut() {
            p.rolled = true;
        }
        self.finish_checkpoint();
    }

    fn finish_checkpoint(&mut self) {
        let done = self.pending.as_ref().is_some_and(|p| p.rolled && !p.awaiting.contains(&true));
        if !done {
            return;
        }
        let Some(PendingCheckpoint { root, id, files, channel, reply, .. }) = self.pending.take() else { return };
        let files = files.and_then(|mut files| {
            if !channel.is_empty() {
                let file = format!("data/shard-{}/channel-{id}.bin", self.id);
                let write = (root.join(&file), state_bytes(&ChannelState { msgs: channel })?);
                files.bytes_written += checkpoint::write_all_checked(&checkpoint::shard_dir(&root, self.id), vec![write])?;
                files.channel = Some(file);
            }
            Ok(files)
        });
        let _ = reply.send(files);
    }

    /// Records `msg` into the pending checkpoint if its sender's marker is still due.
    fn record_channel(&mut self, msg: &Exchange) {
        let Some(p) = self.pending.as_mut() else { return };
        let (stream, branch, from, rows, watermark) = match msg {
            Exchange::Data { stream, branch, from, batch, .. } => {
                if !p.awaiting[*from] {
                    return;
                }
                match ipc::to_bytes(&batch.schema(), std::slice::from_ref(batch)) {
                    Ok(bytes) => (stream, *branch, *from, Some(bytes), i64::MIN),
                    Err(e) => {
                        p.files = Err(e);
                        return;
                    }
                }
            }
            Exchange::Watermark { stream, branch, from, watermark, .. } => {
                if !p.awaiting[*from] {
                    return;
                }
                (stream, *branch, *from, None, *watermark)
            }
            Exchange::Marker { .. } | Exchange::Spilled { .. } | Exchange::Stop => return,
        };
        p.channel.push(ChannelMsg { stream: stream.to_string(), branch: branch as u64, from: from as u64, rows, watermark });
    }

    /// Applies the exchange messages the restored checkpoint recorded.
    pub fn replay_channel(&mut self, ack: &AckToken) -> Result<()> {
        for msg in std::mem::take(&mut self.recorded) {
            let (stream, branch, from): (Arc<str>, _, _) = (Arc::from(msg.stream.as_str()), msg.branch as usize, msg.from as usize);
            match msg.rows {
                Some(bytes) => {
                    for batch in ipc::read(&bytes)? {
                        self.on_exchange(Exchange::Data { stream: stream.clone(), branch, from, batch, hashes: None, ack: ack.clone() });
                    }
                }
                None => {
                    let watermark = msg.watermark;
                    self.on_exchange(Exchange::Watermark { stream, branch, from, watermark, ack: ack.clone() });
                }
            }
        }
        Ok(())
    }

    /// Writes what changed since the previous checkpoint under `root`: each source's and
    /// stream's new rows, and the operator state if anything moved. Returns the files
    /// that make up this shard's part of checkpoint `id`.
    fn snapshot(&mut self, root: &Path, id: u64) -> Result<ShardFiles> {
        let dir = checkpoint::shard_dir(root, self.id);
        std::fs::create_dir_all(&dir).map_err(|e| wal::io_error(&dir, e))?;
        let mut writes = Vec::new();
        let mut new_rows = Vec::new();
        for (n, name) in self.store.names().into_iter().enumerate() {
            let new = self.store.unsaved(&name);
            let file = match new.first() {
                Some(first) => {
                    let file = format!("data/shard-{}/rows-{id}-{n}.arrow", self.id);
                    writes.push((root.join(&file), ipc::to_bytes(&first.schema(), &new)?));
                    Some(file)
                }
                None => None,
            };
            new_rows.push((name, file));
        }
        let marks_file = (self.dirty || self.state_file.is_none()).then(|| format!("data/shard-{}/state-{id}.bin", self.id));
        if let Some(file) = &marks_file {
            let state = RuntimeState { marks: self.marks.iter().map(|(k, v)| (k.clone(), *v)).collect() };
            writes.push((root.join(file), state_bytes(&state)?));
        }
        let mut new_streams = Vec::new();
        for (n, (name, task)) in self.streams.iter().enumerate() {
            if task.dirty || task.state_file.is_none() {
                let file = format!("data/shard-{}/stream-{id}-{n}.bin", self.id);
                let state = TaskState {
                    marks: task.marks.clone(),
                    watermark: task.watermark,
                    late_reported: task.late_reported,
                    agg: task.op.as_ref().map(AggOperator::save).transpose()?,
                    join: task.join.as_ref().map(JoinOperator::save).transpose()?,
                };
                writes.push((root.join(&file), state_bytes(&state)?));
                new_streams.push((name.clone(), file));
            }
        }
        let bytes_written = checkpoint::write_all_checked(&dir, writes)?;
        // Only now that every file is durable does this shard count it as saved.
        let mut files = ShardFiles { bytes_written, ..ShardFiles::default() };
        for (name, file) in new_rows {
            self.store.mark_saved(&name, file);
            files.rows.push((name.to_string(), self.store.files(&name)));
        }
        if marks_file.is_some() {
            self.state_file = marks_file;
            self.dirty = false;
        }
        for (name, file) in new_streams {
            if let Some(task) = self.streams.get_mut(&name) {
                task.state_file = Some(file);
                task.dirty = false;
            }
        }
        files.streams = self.streams.iter().filter_map(|(name, t)| Some((name.to_string(), t.state_file.clone()?))).collect();
        files.counters = self
            .published
            .iter()
            .map(|(name, &[rows, batches])| {
                let late = self.streams.get(name).map_or(0, |t| t.late_reported);
                (name.to_string(), [rows, batches, late])
            })
            .collect();
        files.state = self.state_file.clone();
        Ok(files)
    }

    /// Loads this shard's part of a checkpoint; the streams it names exist already (the
    /// catalog was rebuilt first). Rows are retained, not fed to streams again: the
    /// streams' state already holds their effect.
    pub fn restore(&mut self, root: &Path, files: &ShardFiles) -> Result<()> {
        for (name, row_files) in &files.rows {
            let mut batches = Vec::new();
            let mut counted = Vec::with_capacity(row_files.len());
            for file in row_files {
                let path = root.join(file);
                let read = ipc::read(&checkpoint::read_checked(&path)?)?;
                counted.push((file.clone(), read.iter().map(|b| b.num_rows() as u64).sum()));
                batches.extend(read);
            }
            let name = Arc::from(name.as_str());
            self.store.restore(&name, batches, counted)?;
            self.spill_if_due(&name);
        }
        if let Some(file) = &files.state {
            let state: RuntimeState = read_state(&root.join(file))?;
            self.marks = state.marks.into_iter().collect();
            // What a retention had dropped before the checkpoint stays dropped.
            for (name, mark) in &self.marks {
                self.store.expire(name, *mark);
            }
        }
        for (name, file) in &files.streams {
            let Some(task) = self.streams.get_mut(name.as_str()) else { continue };
            let saved: TaskState = read_state(&root.join(file))?;
            if saved.marks.len() == task.marks.len() {
                task.marks = saved.marks;
            }
            task.watermark = saved.watermark;
            task.late_reported = saved.late_reported;
            if let Some(bytes) = saved.agg {
                task.op = Some(AggOperator::restore(task.plan.clone(), &bytes)?);
            }
            if let Some(bytes) = saved.join {
                task.join = Some(JoinOperator::restore(task.plan.clone(), &bytes)?);
            }
            if task.watermark > i64::MIN {
                task.output.shard_watermark(self.id, self.shards, task.watermark);
            }
            task.state_file = Some(file.clone());
            task.dirty = false;
        }
        self.published = files.counters.iter().map(|(name, [rows, batches, _])| (Arc::from(name.as_str()), [*rows, *batches])).collect();
        if let Some(file) = &files.channel {
            self.recorded = read_state::<ChannelState>(&root.join(file))?.msgs;
        }
        self.state_file = files.state.clone();
        self.dirty = false;
        Ok(())
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    pub fn output(&self, name: &str) -> Option<Arc<Output>> {
        self.outputs.read().get(name).cloned()
    }

    /// Rows of a source (inserted or generated): stored, published, run through its readers.
    pub fn append(&mut self, source: &Arc<str>, batches: Vec<RecordBatch>, ack: &AckToken) -> Result<()> {
        let output = self.output(source);
        if let Some(output) = &output {
            output.touch();
        }
        for batch in batches {
            ack.add_rows(self.retain(source, batch.clone())?);
            if let Some(output) = &output {
                output.publish(&batch);
                tally(&mut self.published, source, &batch);
            }
            self.feed(source, &batch, ack);
        }
        Ok(())
    }

    /// Keeps `batch` among `name`'s rows, handing the oldest to the spill thread when
    /// too many are in memory.
    fn retain(&mut self, name: &Arc<str>, batch: RecordBatch) -> Result<u64> {
        let rows = batch.num_rows() as u64;
        if let Some(job) = self.store.append(name, batch)? {
            self.spill(job);
        }
        Ok(rows)
    }

    fn spill_if_due(&mut self, name: &Arc<str>) {
        if let Some(job) = self.store.spill_due(name) {
            self.spill(job);
        }
    }

    /// Hands `job` to the spill thread.
    fn spill(&mut self, job: SpillJob) {
        let (name, epoch, batches, path) = (job.name.clone(), job.epoch, job.batches.len(), job.path.clone());
        let sent = self.spill.as_ref().is_some_and(|spill| spill.send((job, self.exchange[self.id].clone())).is_ok());
        if !sent {
            let mapped = Err(Error::internal("the spill thread has stopped"));
            self.spilled(&name, epoch, batches, path, mapped);
        }
    }

    /// A spill of `name` ended: on success what stays in memory may be due again; a
    /// failure keeps the rows in memory and turns spilling off on this shard.
    fn spilled(&mut self, name: &Arc<str>, epoch: u64, batches: usize, path: std::path::PathBuf, mapped: Result<Vec<RecordBatch>>) {
        match self.store.spilled(name, epoch, batches, path, mapped) {
            Ok(()) => self.spill_if_due(name),
            Err(e) => {
                self.store.stop_spilling();
                self.record_error(name, &format!("spilling rows of '{name}' to disk failed: {e}; rows stay in memory from now on"));
            }
        }
    }

    /// `source` keeps only what `policy` retains, `policy.rows` being the whole source's
    /// count (this shard keeps its `RetainPolicy::share`).
    pub fn set_retention(&mut self, source: &Arc<str>, policy: RetainPolicy) {
        let rows = policy.rows.map(|n| RetainPolicy::share(n, self.id, self.shards));
        self.store.set_retention(source, RetainPolicy { rows, ..policy });
        if let Some(&mark) = self.marks.get(&**source) {
            self.store.expire(source, mark);
        }
    }

    pub fn drop_source(&mut self, source: &str) {
        self.dirty = true;
        self.published.remove(source);
        self.store.drop_source(source);
        self.marks.remove(source);
        self.idle.remove(source);
    }

    pub fn add_stream(&mut self, plan: Arc<StreamPlan>, output: Arc<Output>, marks: &[(Arc<str>, i64)]) -> Result<()> {
        let ack = self.background.clone();
        for (source, mark) in marks {
            self.watermark(source, *mark, &ack);
        }
        let op = if plan.agg.is_some() { Some(AggOperator::new(plan.clone())?) } else { None };
        let join = if plan.join.is_some() { Some(JoinOperator::new(plan.clone())?) } else { None };
        let keyed = plan.is_keyed();
        let slots = if keyed { plan.branches.len() * self.shards } else { plan.branches.len() };
        let marks = (0..slots)
            .map(|slot| {
                let branch = if keyed { slot / self.shards } else { slot };
                self.marks.get(&plan.branches[branch].input).copied().unwrap_or(i64::MIN)
            })
            .collect();
        let name: Arc<str> = plan.name.as_str().into();
        if plan.inputs().all(|input| self.idle.contains(input)) {
            self.idle.insert(name.to_string());
        }
        for input in plan.inputs() {
            let readers = self.readers.entry(input.to_string()).or_insert_with(|| Rc::from([]));
            if !readers.contains(&name) {
                *readers = readers.iter().cloned().chain([name.clone()]).collect();
            }
        }
        self.streams.insert(name, StreamTask { plan, output, op, join, marks, watermark: i64::MIN, late_reported: 0, dirty: true, state_file: None });
        Ok(())
    }

    pub fn drop_stream(&mut self, name: &str) {
        self.dirty = true;
        if let Some(task) = self.streams.remove(name) {
            for input in task.plan.inputs() {
                if let Some(readers) = self.readers.get_mut(input) {
                    *readers = readers.iter().filter(|r| &***r != name).cloned().collect();
                }
            }
        }
        self.store.drop_source(name);
        self.published.remove(name);
        self.marks.remove(name);
        self.idle.remove(name);
    }

    /// Rows a query of `name` reads here: retained source or stream rows, or the current
    /// per-group rows of a changelog stream and the final rows of its closed windows.
    pub fn scan(&self, name: &str) -> Result<Vec<RecordBatch>> {
        if let Some(task) = self.streams.get(name) {
            if task.plan.is_changelog() {
                if let Some(op) = &task.op {
                    let mut rows = self.store.scan(name);
                    rows.push(op.snapshot()?);
                    // The global group of an aggregate without keys lives on shard 0.
                    if self.id == 0 {
                        rows.extend(op.empty_global_row()?);
                    }
                    return Ok(rows);
                }
            }
        }
        Ok(self.store.scan(name))
    }

    /// Runs every stream reading `input` over `batch`.
    fn feed(&mut self, input: &str, batch: &RecordBatch, ack: &AckToken) {
        let Some(readers) = self.readers.get(input).cloned() else { return };
        for name in readers.iter().cloned() {
            let Some(task) = self.streams.get(&name) else { continue };
            let (plan, output) = (task.plan.clone(), task.output.clone());
            for (b, branch) in plan.branches.iter().enumerate().filter(|(_, b)| b.input == input) {
                let out = match eval_isolating(branch.filter.as_ref(), &branch.exprs, &branch.schema, batch) {
                    Ok((out, rejected)) => {
                        if let Some(rejected) = rejected {
                            reject(&output, input, batch.num_rows(), rejected);
                        }
                        if out.num_rows() == 0 {
                            continue;
                        }
                        out
                    }
                    Err(e) => {
                        output.counters.rejected_rows.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                        output.record_error(&e.to_string());
                        continue;
                    }
                };
                if plan.is_keyed() {
                    self.route(&name, b, out, plan.key_columns(), ack);
                } else {
                    self.emit(&name, out, ack);
                }
            }
        }
    }

    /// Sends each row of a keyed operator's input (branch `branch`) to the shard owning its
    /// key. Each part goes with its rows' key hashes, which the owner's aggregate reuses.
    fn route(&mut self, name: &Arc<str>, branch: usize, batch: RecordBatch, keys: usize, ack: &AckToken) {
        if self.shards == 1 || keys == 0 {
            // Without keys every row belongs to the single global group, on shard 0.
            return self.deliver(0, name, branch, batch, None, ack);
        }
        let key: Vec<usize> = (0..keys).collect();
        match partition_by_key(&batch, &key, self.shards) {
            Ok(parts) => {
                for (shard, part) in parts.into_iter().enumerate() {
                    if let Some((part, hashes)) = part {
                        self.deliver(shard, name, branch, part, Some(hashes), ack);
                    }
                }
            }
            Err(e) => self.record_error(name, &e),
        }
    }

    fn deliver(&mut self, shard: usize, name: &Arc<str>, branch: usize, batch: RecordBatch, hashes: Option<Vec<u64>>, ack: &AckToken) {
        if shard == self.id {
            self.keyed(name, branch, batch, hashes, ack);
        } else {
            let msg = Exchange::Data { stream: name.clone(), branch, from: self.id, batch, hashes, ack: ack.clone() };
            let _ = self.exchange[shard].send(msg);
        }
    }

    /// Rows of branch `branch` this shard owns the keys of: into the aggregate or the join.
    /// `hashes`: their key hashes, if known (`partition::key_hashes`).
    fn keyed(&mut self, name: &Arc<str>, branch: usize, batch: RecordBatch, hashes: Option<Vec<u64>>, ack: &AckToken) {
        let Some(task) = self.streams.get_mut(name) else { return };
        task.dirty = true;
        if let Some(join) = task.join.as_mut() {
            match join.apply(branch, &batch) {
                Ok(Some(out)) => self.emit(name, out, ack),
                Ok(None) => {}
                Err(e) => self.record_error(name, &e),
            }
        } else {
            self.aggregate(name, batch, hashes, ack);
        }
    }

    /// Counts an error against `name`'s metrics (`errors`, `last_error`; logged), a
    /// stream's or a source's; only logged once `name` is gone.
    fn record_error(&self, name: &str, e: &dyn std::fmt::Display) {
        match self.streams.get(name).map(|t| t.output.clone()).or_else(|| self.output(name)) {
            Some(output) => output.record_error(&e.to_string()),
            None => log::warn!("'{name}': {e}"),
        }
    }

    /// Folds rows this shard owns into the stream's aggregate state.
    fn aggregate(&mut self, name: &Arc<str>, batch: RecordBatch, hashes: Option<Vec<u64>>, ack: &AckToken) {
        let Some(task) = self.streams.get_mut(name) else { return };
        let Some(op) = task.op.as_mut() else { return };
        let result = op.apply_hashed(&batch, hashes);
        let late = op.late_rows;
        if late > task.late_reported {
            task.output.counters.late_rows.fetch_add(late - task.late_reported, Ordering::Relaxed);
            task.late_reported = late;
        }
        match result {
            Ok(out) => {
                for b in out {
                    self.emit(name, b, ack);
                }
            }
            Err(e) => self.record_error(name, &e),
        }
    }

    /// A stream produced `batch`: to its subscribers, its retained rows, and its readers.
    fn emit(&mut self, name: &Arc<str>, batch: RecordBatch, ack: &AckToken) {
        let Some(task) = self.streams.get(name) else { return };
        task.output.publish(&batch);
        tally(&mut self.published, name, &batch);
        if let Some(born) = ack.born {
            task.output.record_latency(born);
        }
        if !task.plan.is_changelog() {
            if let Err(e) = self.retain(name, batch.clone()) {
                self.record_error(name, &e);
            }
        }
        self.feed(name, &batch, ack);
    }

    /// `input`'s watermark on this shard is now `watermark`.
    pub fn watermark(&mut self, input: &str, watermark: i64, ack: &AckToken) {
        // Looked up before inserting: every insert that moves a watermark comes here.
        match self.marks.get_mut(input) {
            Some(mark) if watermark <= *mark => return,
            Some(mark) => *mark = watermark,
            None => {
                self.marks.insert(input.to_string(), watermark);
                if watermark == i64::MIN {
                    return;
                }
            }
        }
        self.dirty = true;
        self.store.expire(input, watermark);
        let Some(readers) = self.readers.get(input).cloned() else { return };
        for name in readers.iter().cloned() {
            let Some(task) = self.streams.get(&name) else { continue };
            let plan = task.plan.clone();
            for (b, branch) in plan.branches.iter().enumerate().filter(|(_, b)| b.input == input) {
                if plan.is_keyed() {
                    for shard in 0..self.shards {
                        if shard == self.id {
                            self.aggregate_mark(&name, b, shard, watermark, ack);
                        } else {
                            let msg = Exchange::Watermark {
                                stream: name.clone(),
                                branch: b,
                                from: self.id,
                                watermark,
                                ack: ack.clone(),
                            };
                            let _ = self.exchange[shard].send(msg);
                        }
                    }
                } else {
                    let _ = branch;
                    let Some(task) = self.streams.get_mut(&name) else { continue };
                    task.marks[b] = task.marks[b].max(watermark);
                    task.dirty = true;
                    self.advance_stream(&name, ack);
                }
            }
        }
    }

    /// A watermark from `from` for branch `b` of a keyed stream.
    fn aggregate_mark(&mut self, name: &Arc<str>, b: usize, from: usize, watermark: i64, ack: &AckToken) {
        let shards = self.shards;
        let Some(task) = self.streams.get_mut(name) else { return };
        let slot = b * shards + from;
        task.marks[slot] = task.marks[slot].max(watermark);
        task.dirty = true;
        self.advance_stream(name, ack);
    }

    /// The coordinator declared `input` idle (no rows or watermarks for `idle_timeout_ms`)
    /// or active again. An idle input stops holding back the watermark of the streams
    /// reading it while another of their inputs is active; a stream all of whose inputs
    /// are idle is idle itself to its readers, and its watermark stays. Rows of an input
    /// that comes back behind a stream's watermark are late there (dropped and counted).
    pub fn set_idle(&mut self, input: &str, idle: bool, ack: &AckToken) {
        let changed = if idle { self.idle.insert(input.to_string()) } else { self.idle.remove(input) };
        if !changed {
            return;
        }
        let Some(readers) = self.readers.get(input).cloned() else { return };
        for name in readers.iter().cloned() {
            let Some(task) = self.streams.get(&name) else { continue };
            let all_idle = task.plan.inputs().all(|i| self.idle.contains(i));
            if all_idle != self.idle.contains(&*name) {
                self.set_idle(&name, all_idle, ack);
            }
            self.advance_stream(&name, ack);
        }
    }

    /// Moves the stream to the minimum of its active inputs' watermarks: closes windows
    /// and passes the watermark on to its readers.
    fn advance_stream(&mut self, name: &Arc<str>, ack: &AckToken) {
        let Some(task) = self.streams.get_mut(name) else { return };
        let per_branch = if task.plan.is_keyed() { self.shards } else { 1 };
        let branches = &task.plan.branches;
        let idle = &self.idle;
        let active = task.marks.iter().enumerate().filter(|(slot, _)| idle.is_empty() || !idle.contains(&branches[slot / per_branch].input));
        // Every input idle: the watermark holds.
        let Some(mark) = active.map(|(_, &m)| m).min() else { return };
        if mark <= task.watermark {
            return;
        }
        task.watermark = mark;
        task.output.shard_watermark(self.id, self.shards, mark);
        let (emitted, closed) = match task.op.as_mut() {
            Some(op) => (op.advance(mark), op.take_closed()),
            None => (Ok(vec![]), vec![]),
        };
        // A changelog stream's closed windows leave its operator's state; their final rows
        // stay queryable as its retained rows (spilled, checkpointed like an append
        // stream's).
        for rows in closed {
            if let Err(e) = self.retain(name, rows) {
                self.record_error(name, &e);
            }
        }
        match emitted {
            Ok(out) => {
                for b in out {
                    self.emit(name, b, ack);
                }
            }
            Err(e) => self.record_error(name, &e),
        }
        self.watermark(name, mark, ack);
    }

    /// An `EMIT EVERY` stream's period elapsed: emit its changes since the last tick.
    pub fn tick(&mut self, name: &Arc<str>) {
        let Some(task) = self.streams.get_mut(name) else { return };
        task.dirty = true;
        let Some(op) = task.op.as_mut() else { return };
        match op.tick() {
            Ok(out) => {
                // Ticks are not inserts: nobody waits on them.
                let ack = self.background.clone();
                for b in out {
                    self.emit(name, b, &ack);
                }
            }
            Err(e) => self.record_error(name, &e),
        }
    }

    pub fn on_exchange(&mut self, msg: Exchange) {
        if let Some(held) = msg.sender().and_then(|from| self.early[from].as_mut()) {
            held.push(msg);
            return;
        }
        self.record_channel(&msg);
        match msg {
            Exchange::Data { stream, branch, batch, hashes, ack, .. } => self.keyed(&stream, branch, batch, hashes, &ack),
            Exchange::Watermark { stream, branch, from, watermark, ack } => {
                self.aggregate_mark(&stream, branch, from, watermark, &ack)
            }
            Exchange::Spilled { name, epoch, batches, path, mapped } => self.spilled(&name, epoch, batches, path, mapped),
            Exchange::Marker { from } => match self.pending.as_mut() {
                Some(p) if p.awaiting[from] => {
                    p.awaiting[from] = false;
                    self.finish_checkpoint();
                }
                // Before this shard's own barrier: hold what `from` sends next.
                _ => self.early[from] = Some(Vec::new()),
            },
            Exchange::Stop => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    /// Shard 0 of two, the receiving end of shard 1's exchange inbox, and a checkpoint root.
    fn shard_zero_of_two(test: &str) -> (ShardRuntime, flume::Receiver<Exchange>, Arc<Path>) {
        let (tx0, _) = flume::unbounded();
        let (tx1, rx1) = flume::unbounded();
        let root = std::env::temp_dir().join(format!("laminar-{test}-{}", std::process::id()));
        (ShardRuntime::new(0, Outputs::default(), vec![tx0, tx1], None), rx1, root.into())
    }

    fn data(from: usize) -> Exchange {
        let batch = RecordBatch::try_from_iter([("v", Arc::new(Int64Array::from(vec![1])) as _)]).unwrap();
        Exchange::Data { stream: "s".into(), branch: 0, from, batch, hashes: None, ack: Ack::background() }
    }

    /// Shard 1's marker arrives at shard 0 before shard 0's own barrier (its command
    /// stream was behind): the checkpoint still completes, and what shard 1 sent after its
    /// marker waits until shard 0 has snapshotted, and is not recorded as in flight.
    #[test]
    fn a_marker_before_the_barrier_is_kept_and_what_follows_it_waits_for_the_snapshot() {
        let (mut rt, rx1, root) = shard_zero_of_two("early-marker");

        rt.on_exchange(Exchange::Marker { from: 1 });
        rt.on_exchange(data(1));
        assert_eq!(rt.early[1].as_ref().map(Vec::len), Some(1), "held until the barrier");

        let (reply, answer) = crate::command::reply_channel();
        rt.begin_checkpoint(root.clone(), 1, reply);
        assert!(matches!(rx1.try_recv(), Ok(Exchange::Marker { from: 0 })));
        assert!(rt.early.iter().all(Option::is_none), "applied after the snapshot");
        rt.checkpoint_rolled();
        let files = answer.try_recv().expect("answered without another marker").expect("checkpoint written");
        assert_eq!(files.channel, None, "nothing recorded in flight");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The usual order: the barrier first, then a message the peer sent before its marker
    /// (recorded: it is in nobody's snapshot), then the marker, which completes it.
    #[test]
    fn a_message_before_the_peers_marker_is_recorded() {
        let (mut rt, _rx1, root) = shard_zero_of_two("late-marker");

        let (reply, answer) = crate::command::reply_channel();
        rt.begin_checkpoint(root.clone(), 1, reply);
        rt.checkpoint_rolled();
        rt.on_exchange(data(1));
        assert!(answer.try_recv().is_err(), "waits for shard 1's marker");
        rt.on_exchange(Exchange::Marker { from: 1 });
        let files = answer.try_recv().expect("answered").expect("checkpoint written");
        assert!(files.channel.is_some(), "the in-flight batch is recorded");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
