//! What one shard does with its commands: keep its partition of every source, run every
//! stream's operators over the rows it holds, and trade keyed rows and watermarks with
//! the other shards over the exchange. Everything here runs on the shard's own thread;
//! processing is synchronous, so one command is fully handled before the next.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use parking_lot::RwLock;

use std::path::Path;

use laminardb_engine::checkpoint::{self, ShardFiles};
use laminardb_engine::partition::partition_by_key;
use laminardb_engine::{ipc, wal};
use laminardb_engine::dataflow::{Alignment, Collector, Operator, Route, TaskInfo, Upstream, Watermark, WatermarkHolder};
use laminardb_engine::stream::isolate::Rejected;
use laminardb_engine::stream::output::Output;
use laminardb_engine::source::END_OF_INPUT;
use laminardb_engine::stream::{StreamPlan, OP_INSERT};
use laminardb_engine::{Error, Result};

use crate::command::{Ack, AckToken, Exchange, Reply, SpillRequest};
use crate::store::{LocalStore, RetainPolicy, SpillJob, SpillPolicy};

mod sources;
pub use sources::SourceStep;

/// Outputs of every source and stream by name, shared by the coordinator, the shards and
/// the callers that subscribe.
pub type Outputs = Arc<RwLock<HashMap<String, Arc<Output>>>>;

/// The runtime's maps by stream or input name, looked up several times per batch: a fast
/// hash (names are ours, not an attacker's).
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// One operator of a stream on this shard, wired as its plan's DAG says.
struct NodeRt {
    op: Box<dyn Operator>,
    /// Its input watermarks: a slot per local port, a slot per sending shard per port
    /// behind an exchange.
    marks: WatermarkHolder,
    /// The first slot of each port.
    first_slot: Vec<usize>,
    /// Each port's route.
    routes: Vec<Route>,
    /// The catalog inputs each port depends on (idle when all of them are).
    port_inputs: Vec<Vec<String>>,
    /// What each port reads, for messages about its rows.
    port_names: Vec<String>,
    /// The nodes reading this one, with their port; none: its rows are the stream's.
    readers: Rc<[(usize, usize)]>,
    /// Late rows of this operator already counted in the stream's metrics.
    late_reported: u64,
    /// The join state this shard's operator last counted in the stream's metrics.
    join_reported: [u64; 2],
    /// Per slot: its sending shard said every input of the slot's port is idle there
    /// (`Exchange::Idle`).
    remote_idle: Vec<bool>,
    /// How far the watermark it passes on is held back (`OperatorSpec::watermark_delay_ms`).
    delay_ms: i64,
}

impl NodeRt {
    /// The watermark it passes on to its readers: its inputs' merged, held back by its delay.
    fn emitted(&self) -> Option<Watermark> {
        self.marks.merged().map(|w| self.held_back(w))
    }

    /// `mark` less the delay; the end of input (or beyond) passes unchanged: no row is to
    /// come, so none can be late, and readers must see the input end.
    fn held_back(&self, mark: Watermark) -> Watermark {
        if mark.ms() >= END_OF_INPUT {
            return mark;
        }
        Watermark::new(mark.ms().saturating_sub(self.delay_ms))
    }
}

struct StreamTask {
    plan: Arc<StreamPlan>,
    output: Arc<Output>,
    nodes: Vec<NodeRt>,
    /// The nodes whose rows are the stream's output.
    outputs: Vec<usize>,
    /// Where each catalog input enters: `(input, node, port)`.
    entries: Rc<[(Box<str>, usize, usize)]>,
    /// This shard's output watermark of the stream: the merge of its output nodes' (a
    /// slot each, idle when every input the node depends on is).
    out: WatermarkHolder,
    /// Changed since the last checkpoint's file of this task, which is `state_file`.
    dirty: bool,
    state_file: Option<String>,
}

impl StreamTask {
    /// The operators of `plan` for one of `shards` shards, their input watermarks set
    /// from `mark` of each catalog input (every shard has the same).
    fn new(plan: Arc<StreamPlan>, output: Arc<Output>, shard: usize, shards: usize, mark: impl Fn(&str) -> Option<Watermark>) -> Result<StreamTask> {
        let dag = &plan.dag;
        let mut nodes: Vec<NodeRt> = Vec::with_capacity(dag.nodes.len());
        let mut entries = Vec::new();
        for (n, node) in dag.nodes.iter().enumerate() {
            let (first_slot, slots) = dag.slots(n, shards);
            let mut marks = WatermarkHolder::new(slots);
            let mut port_inputs = Vec::new();
            let mut port_names = Vec::new();
            for (p, port) in node.ports.iter().enumerate() {
                let start = match &port.from {
                    Upstream::Input(name) => {
                        entries.push((Box::from(name.as_str()), n, p));
                        port_inputs.push(vec![name.clone()]);
                        port_names.push(name.clone());
                        mark(name)
                    }
                    Upstream::Node(m) => {
                        port_inputs.push(dag.depends_on(*m).into_iter().map(String::from).collect());
                        port_names.push(format!("the {} operator", dag.nodes[*m].spec.name()));
                        nodes[*m].emitted()
                    }
                };
                let width = if port.route.crosses_shards() { shards } else { 1 };
                if let Some(start) = start {
                    for slot in first_slot[p]..first_slot[p] + width {
                        marks.update(slot, start);
                    }
                }
            }
            nodes.push(NodeRt {
                op: Arc::clone(&node.spec).build(TaskInfo { shard, shards })?,
                marks,
                first_slot,
                routes: node.ports.iter().map(|p| p.route).collect(),
                port_inputs,
                port_names,
                readers: dag.readers(n).into(),
                late_reported: 0,
                join_reported: [0, 0],
                remote_idle: vec![false; slots],
                delay_ms: node.spec.watermark_delay_ms().max(0),
            });
        }
        let outputs = dag.outputs();
        let out = WatermarkHolder::new(outputs.len());
        Ok(StreamTask { plan, output, nodes, outputs, entries: entries.into(), out, dirty: true, state_file: None })
    }

    /// Restores the output merge (`mark`, encoded) and its slots from the output nodes'.
    fn restore_out(&mut self, mark: i64) {
        let slots: Vec<i64> = self.outputs.iter().map(|&o| Watermark::encode(self.nodes[o].emitted())).collect();
        self.out.restore(&slots, mark);
    }

    /// Late rows counted so far, over every operator.
    fn late_reported(&self) -> u64 {
        self.nodes.iter().map(|n| n.late_reported).sum()
    }

    /// The node whose ports cross shards, the one state a checkpoint of the pre-DAG
    /// format kept (an aggregate or a join).
    fn keyed_node(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.routes.iter().any(|r| r.crosses_shards()))
    }
}

pub struct ShardRuntime {
    id: usize,
    shards: usize,
    store: LocalStore,
    outputs: Outputs,
    exchange: Vec<flume::Sender<Exchange>>,
    streams: FastMap<Arc<str>, StreamTask>,
    /// Input name → streams reading it (shared: every batch walks it, streams change rarely).
    readers: FastMap<String, Rc<[Arc<str>]>>,
    /// The watermark of every source and stream as this shard last saw it.
    marks: FastMap<String, Watermark>,
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
    /// The exchange inbox's barrier alignment (what peers sent across the cut).
    align: Alignment<Exchange>,
    /// Exchange messages a restored checkpoint recorded, applied on `replay_channel`.
    recorded: Vec<ChannelMsg>,
    /// Rows and batches each source and stream published from this shard: its share of
    /// their counters, exact at every checkpoint barrier.
    published: FastMap<Arc<str>, [u64; 2]>,
    /// The spill thread, when retained rows spill to disk (`LocalStore` decides when).
    spill: Option<flume::Sender<SpillRequest>>,
    /// Collectors to reuse (`collector`).
    spare: Vec<Collector>,
    /// Sources' outputs (`source_output`).
    source_outputs: FastMap<Arc<str>, Arc<Output>>,
    /// Connector sources this shard reads splits of.
    sources: FastMap<Arc<str>, sources::SourceReading>,
    /// Connector sources whose every split on this shard is idle (`set_local_idle`).
    local_idle: HashSet<String>,
    /// Split positions a restored checkpoint recorded, until their source starts.
    positions: sources::Positions,
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

/// Moves the stream's join-state gauges by what changed in `node`'s operator on this shard.
fn report_join_state(node: &mut NodeRt, output: &Output) {
    let Some(now) = node.op.join_state() else { return };
    for side in 0..2 {
        let delta = now[side] as i64 - node.join_reported[side] as i64;
        if delta != 0 {
            output.counters.join_rows[side].fetch_add(delta, Ordering::Relaxed);
        }
    }
    node.join_reported = now;
}

/// Counts and reports the rows of an input batch a stream's expressions failed on; the
/// batch's other rows have gone on through the stream.
fn reject(output: &Output, input: &str, rows: usize, rejected: Rejected) {
    let n = rejected.rows.len();
    output.counters.rejected_rows.fetch_add(n as u64, Ordering::Relaxed);
    let first = rejected.rows.first().map_or(String::new(), |r| format!(" (the first at row {r} of the batch)"));
    output.record_error(&format!("{n} of {rows} rows of '{input}' rejected{first}: {}", rejected.error.message));
}

/// Counts `batch` into this shard's share of `name`'s counters (runs per published batch:
/// the name is cloned only the first time).
fn tally(published: &mut FastMap<Arc<str>, [u64; 2]>, name: &Arc<str>, batch: &RecordBatch) {
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

/// Checkpoint `id` after this shard's snapshot (Chandy–Lamport, `Alignment`): the
/// exchange messages each peer sent before its marker but that arrived after the
/// snapshot are recorded until every peer's marker is in.
struct PendingCheckpoint {
    root: Arc<Path>,
    id: u64,
    files: Result<ShardFiles>,
    /// The WAL has started its post-checkpoint segment.
    rolled: bool,
    channel: Vec<ChannelMsg>,
    reply: Reply<ShardFiles>,
}

/// One recorded exchange message: rows (Arrow IPC) or a watermark, for `port` of
/// `node` of `stream`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ChannelMsg {
    stream: String,
    node: u64,
    port: u64,
    from: u64,
    rows: Option<Vec<u8>>,
    watermark: i64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ChannelState {
    msgs: Vec<ChannelMsg>,
}

/// A recorded message of a checkpoint written before streams were DAGs (`channel-*`
/// files): `branch` was the port of the stream's one keyed operator.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ChannelMsgV1 {
    stream: String,
    branch: u64,
    from: u64,
    rows: Option<Vec<u8>>,
    watermark: i64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ChannelStateV1 {
    msgs: Vec<ChannelMsgV1>,
}

/// A shard's input watermarks in a checkpoint (rkyv; `i64::MIN`: none).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct RuntimeState {
    marks: Vec<(String, i64)>,
}

/// One stream's operators on one shard in a checkpoint (rkyv, `task-*` files): its own
/// file, rewritten only when the stream changed.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TaskState {
    nodes: Vec<NodeState>,
    watermark: i64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct NodeState {
    /// Input watermark slots (`Watermark::encode`) and their merge.
    marks: Vec<i64>,
    merged: i64,
    late_reported: u64,
    state: Option<Vec<u8>>,
}

/// A stream's state as checkpoints before DAGs kept it (`stream-*` files): the input
/// marks of its keyed operator (per branch × shard), or of its branches, and that
/// operator's state.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TaskStateV1 {
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
            streams: FastMap::default(),
            readers: FastMap::default(),
            marks: FastMap::default(),
            idle: HashSet::new(),
            background: Ack::background(),
            dirty: true,
            state_file: None,
            pending: None,
            align: Alignment::new(id, shards),
            recorded: Vec::new(),
            published: FastMap::default(),
            spill,
            spare: Vec::new(),
            source_outputs: FastMap::default(),
            sources: FastMap::default(),
            local_idle: HashSet::new(),
            positions: sources::Positions::new(),
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
        let held = self.align.begin();
        let pending = PendingCheckpoint { root, id, files, rolled: false, channel: Vec::new(), reply };
        if let Some(old) = self.pending.replace(pending) {
            let _ = old.reply.send(Err(Error::checkpoint(format!("checkpoint {} overtaken by the next", old.id))));
        }
        // Peers whose marker came first: what they sent after it is past both snapshots.
        for msg in held {
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
        let done = self.pending.as_ref().is_some_and(|p| p.rolled) && self.align.aligned();
        if !done {
            return;
        }
        self.align.finish();
        let Some(PendingCheckpoint { root, id, files, channel, reply, .. }) = self.pending.take() else { return };
        let files = files.and_then(|mut files| {
            if !channel.is_empty() {
                let file = format!("data/shard-{}/exchange-{id}.bin", self.id);
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
        let (stream, node, port, from, rows, watermark) = match msg {
            Exchange::Data { stream, node, port, from, batch, .. } => {
                if !self.align.records(*from) {
                    return;
                }
                match ipc::to_bytes(&batch.schema(), std::slice::from_ref(batch)) {
                    Ok(bytes) => (stream, *node, *port, *from, Some(bytes), Watermark::ENCODED_NONE),
                    Err(e) => {
                        p.files = Err(e);
                        return;
                    }
                }
            }
            Exchange::Watermark { stream, node, port, from, watermark, .. } => {
                if !self.align.records(*from) {
                    return;
                }
                (stream, *node, *port, *from, None, watermark.ms())
            }
            // Idleness is not state: a restored shard's sources say it again.
            Exchange::Idle { .. } | Exchange::Marker { .. } | Exchange::Spilled { .. } | Exchange::Stop => return,
        };
        let (node, port, from) = (node as u64, port as u64, from as u64);
        p.channel.push(ChannelMsg { stream: stream.to_string(), node, port, from, rows, watermark });
    }

    /// Applies the exchange messages the restored checkpoint recorded.
    pub fn replay_channel(&mut self, ack: &AckToken) -> Result<()> {
        for msg in std::mem::take(&mut self.recorded) {
            let stream: Arc<str> = Arc::from(msg.stream.as_str());
            let (node, port, from) = (msg.node as usize, msg.port as usize, msg.from as usize);
            match msg.rows {
                Some(bytes) => {
                    for batch in ipc::read(&bytes)? {
                        self.on_exchange(Exchange::Data { stream: stream.clone(), node, port, from, batch, hashes: None, ack: ack.clone() });
                    }
                }
                None => {
                    let watermark = Watermark::new(msg.watermark);
                    self.on_exchange(Exchange::Watermark { stream: stream.clone(), node, port, from, watermark, ack: ack.clone() });
                }
            }
        }
        Ok(())
    }

    /// Writes what changed since the previous checkpoint under `root`: each source's and
    /// stream's new rows, and the operator state if anything moved. Returns the files
    /// that make up this shard's part of checkpoint `id`.
    fn snapshot(&mut self, root: &Path, id: u64) -> Result<ShardFiles> {
        // Operators with effects outside the engine (sinks) deliver what came before the
        // barrier first: a checkpoint they cannot stand behind fails.
        for (name, task) in self.streams.iter_mut() {
            for node in task.nodes.iter_mut() {
                node.op.on_checkpoint(id).map_err(|e| Error::checkpoint(format!("'{name}' at checkpoint {id}: {e}")))?;
            }
        }
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
            let state = RuntimeState { marks: self.marks.iter().map(|(k, v)| (k.clone(), v.ms())).collect() };
            writes.push((root.join(file), state_bytes(&state)?));
        }
        let mut new_streams = Vec::new();
        for (n, (name, task)) in self.streams.iter().enumerate() {
            if task.dirty || task.state_file.is_none() {
                let file = format!("data/shard-{}/task-{id}-{n}.bin", self.id);
                let nodes = task
                    .nodes
                    .iter()
                    .map(|node| {
                        Ok(NodeState {
                            marks: node.marks.encoded(),
                            merged: Watermark::encode(node.marks.merged()),
                            late_reported: node.late_reported,
                            state: node.op.save()?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let state = TaskState { nodes, watermark: Watermark::encode(task.out.merged()) };
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
                let late = self.streams.get(name).map_or(0, StreamTask::late_reported);
                (name.to_string(), [rows, batches, late])
            })
            .collect();
        files.state = self.state_file.clone();
        files.positions = self.split_positions();
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
            self.marks = state.marks.into_iter().filter_map(|(k, v)| Some((k, Watermark::decode(v)?))).collect();
            // What a retention had dropped before the checkpoint stays dropped.
            for (name, mark) in &self.marks {
                self.store.expire(name, *mark);
            }
        }
        for (name, file) in &files.streams {
            let Some(task) = self.streams.get_mut(name.as_str()) else { continue };
            let path = root.join(file);
            if file.contains("/stream-") {
                restore_v1(task, read_state(&path)?, &self.marks)?;
            } else {
                let saved: TaskState = read_state(&path)?;
                if saved.nodes.len() != task.nodes.len() {
                    return Err(Error::checkpoint(format!("{}: the stream '{name}' has {} operators, not {}", path.display(), task.nodes.len(), saved.nodes.len())));
                }
                for (node, state) in task.nodes.iter_mut().zip(saved.nodes) {
                    node.marks.restore(&state.marks, state.merged);
                    node.late_reported = state.late_reported;
                    if let Some(bytes) = state.state {
                        node.op.restore(&bytes)?;
                    }
                }
                task.restore_out(saved.watermark);
            }
            // The joins' restored state counts in the stream's metrics from now on.
            for node in task.nodes.iter_mut() {
                report_join_state(node, &task.output);
            }
            if let Some(mark) = task.out.merged() {
                task.output.shard_watermark(self.id, self.shards, mark.ms());
            }
            task.state_file = Some(file.clone());
            task.dirty = false;
        }
        self.published = files.counters.iter().map(|(name, [rows, batches, _])| (Arc::from(name.as_str()), [*rows, *batches])).collect();
        if let Some(file) = &files.channel {
            let path = root.join(file);
            self.recorded = if file.contains("/channel-") {
                let old: ChannelStateV1 = read_state(&path)?;
                let keyed = |stream: &str| self.streams.get(stream).and_then(StreamTask::keyed_node).unwrap_or(0) as u64;
                old.msgs
                    .into_iter()
                    .map(|m| ChannelMsg { node: keyed(&m.stream), port: m.branch, stream: m.stream, from: m.from, rows: m.rows, watermark: m.watermark })
                    .collect()
            } else {
                read_state::<ChannelState>(&path)?.msgs
            };
        }
        self.positions = files.positions.iter().map(|p| ((p.source.clone(), p.split as usize), p.position.clone())).collect();
        self.state_file = files.state.clone();
        self.dirty = false;
        Ok(())
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shard stops: every operator closes (sinks deliver what is pending).
    pub fn close_all(&mut self) {
        for (name, task) in self.streams.iter_mut() {
            close_operators(name, task);
        }
        let sources: Vec<Arc<str>> = self.sources.keys().cloned().collect();
        for source in sources {
            self.close_source(&source);
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    pub fn output(&self, name: &str) -> Option<Arc<Output>> {
        self.outputs.read().get(name).cloned()
    }

    /// A source's output, kept here after the first append so that appends do not take
    /// the process-wide `outputs` lock; taken again once closed (the source was dropped or
    /// replaced).
    fn source_output(&mut self, source: &Arc<str>) -> Option<Arc<Output>> {
        if let Some(output) = self.source_outputs.get(source).filter(|o| !o.is_closed()) {
            return Some(output.clone());
        }
        let output = self.output(source)?;
        self.source_outputs.insert(source.clone(), output.clone());
        Some(output)
    }

    /// Rows of a source (inserted or generated): stored, published, run through its readers.
    pub fn append(&mut self, source: &Arc<str>, batches: Vec<RecordBatch>, ack: &AckToken) -> Result<()> {
        let output = self.source_output(source);
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
        self.close_source(source);
        self.local_idle.remove(source);
        self.positions.retain(|(name, _), _| name != source);
        self.source_outputs.remove(source);
        self.published.remove(source);
        self.store.drop_source(source);
        self.marks.remove(source);
        self.idle.remove(source);
    }

    pub fn add_stream(&mut self, plan: Arc<StreamPlan>, output: Arc<Output>, marks: &[(Arc<str>, Watermark)]) -> Result<()> {
        let ack = self.background.clone();
        for (source, mark) in marks {
            self.watermark(source, *mark, &ack);
        }
        // A stream that backfills starts without watermarks: its inputs' arrive after the
        // rows they retain (`backfill`).
        let backfill = plan.backfill;
        let task = StreamTask::new(plan, output, self.id, self.shards, |input| if backfill { None } else { self.marks.get(input).copied() })?;
        let name: Arc<str> = task.plan.name.as_str().into();
        if task.plan.inputs().all(|input| self.idle.contains(input)) {
            self.idle.insert(name.to_string());
        }
        self.streams.insert(name.clone(), task);
        if !backfill {
            self.start_reading(&name, &ack);
        }
        Ok(())
    }

    /// `name` reads its inputs from now on; ports reading idle inputs leave them out.
    fn start_reading(&mut self, name: &Arc<str>, ack: &AckToken) {
        let Some(task) = self.streams.get(name) else { return };
        for input in task.plan.inputs() {
            let readers = self.readers.entry(input.to_string()).or_insert_with(|| Rc::from([]));
            if !readers.contains(name) {
                *readers = readers.iter().cloned().chain([name.clone()]).collect();
            }
        }
        self.refresh_idle(name, ack);
    }

    /// Every shard has added the stream `name`: it reads the rows its inputs retain here,
    /// then starts reading them as they come, and their watermarks follow those rows (on
    /// every channel, so no operator moves past a row another shard still sends it).
    /// The coordinator lets no insert in between the two steps, so every row is read
    /// once: retained before, or arriving after.
    pub fn backfill(&mut self, name: &str, ack: &AckToken) -> Result<()> {
        let Some((name, task)) = self.streams.get_key_value(name) else { return Ok(()) };
        let (name, entries) = (name.clone(), task.entries.clone());
        let mut inputs: Vec<&str> = Vec::new();
        for (input, _, _) in entries.iter() {
            if !inputs.contains(&&**input) {
                inputs.push(input);
            }
        }
        for input in inputs {
            for batch in self.retained_rows(input)? {
                for (_, n, p) in entries.iter().filter(|(entry, _, _)| &**entry == input) {
                    self.send(&name, *n, *p, batch.clone(), ack);
                }
            }
        }
        self.start_reading(&name, ack);
        for (input, n, p) in entries.iter() {
            if let Some(&mark) = self.marks.get(&**input) {
                self.send_mark(&name, *n, *p, mark, ack);
            }
        }
        Ok(())
    }

    /// What a stream created now reads first from `input` on this shard: its retained
    /// rows, and for a changelog stream its current result as insertions (`+I`).
    fn retained_rows(&self, input: &str) -> Result<Vec<RecordBatch>> {
        let rows = self.store.scan(input);
        let Some(task) = self.streams.get(input).filter(|t| t.plan.is_changelog()) else { return Ok(rows) };
        let mut current = rows;
        for &n in &task.outputs {
            // Without the row a global aggregate reads as before any input: not a change.
            current.extend(task.nodes[n].op.scan(false)?.unwrap_or_default());
        }
        current
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let mut columns = b.columns().to_vec();
                columns.push(Arc::new(StringArray::from(vec![OP_INSERT; b.num_rows()])) as ArrayRef);
                Ok(RecordBatch::try_new(task.plan.schema.clone(), columns)?)
            })
            .collect()
    }

    pub fn drop_stream(&mut self, name: &str) {
        self.dirty = true;
        if let Some(mut task) = self.streams.remove(name) {
            close_operators(name, &mut task);
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

    /// Rows a query of `name` reads here: retained source or stream rows, and the current
    /// result its operators keep as state (a changelog stream's groups).
    pub fn scan(&self, name: &str) -> Result<Vec<RecordBatch>> {
        let mut rows = self.store.scan(name);
        if let Some(task) = self.streams.get(name) {
            for &n in &task.outputs {
                // What belongs to no key (a global aggregate's group) lives on shard 0.
                rows.extend(task.nodes[n].op.scan(self.id == 0)?.unwrap_or_default());
            }
        }
        Ok(rows)
    }

    /// Runs every stream reading `input` over `batch`.
    fn feed(&mut self, input: &str, batch: &RecordBatch, ack: &AckToken) {
        let Some(readers) = self.readers.get(input).cloned() else { return };
        for name in readers.iter() {
            let Some(task) = self.streams.get(name) else { continue };
            for (entry, n, p) in task.entries.clone().iter() {
                if &**entry == input {
                    self.send(name, *n, *p, batch.clone(), ack);
                }
            }
        }
    }

    /// Rows for port `p` of node `n`: to the shard its route names.
    fn send(&mut self, name: &Arc<str>, n: usize, p: usize, batch: RecordBatch, ack: &AckToken) {
        let Some(route) = self.streams.get(name).and_then(|t| t.nodes.get(n)?.routes.get(p).copied()) else { return };
        match route {
            Route::Forward => self.process(name, n, p, batch, None, ack),
            // Without keys every row belongs to the single global group, on shard 0.
            Route::Single => self.deliver(0, name, n, p, batch, None, ack),
            Route::Key(_) if self.shards == 1 => self.process(name, n, p, batch, None, ack),
            Route::Key(keys) => {
                let key: Vec<usize> = (0..keys).collect();
                match partition_by_key(&batch, &key, self.shards) {
                    Ok(parts) => {
                        for (shard, part) in parts.into_iter().enumerate() {
                            if let Some((part, hashes)) = part {
                                self.deliver(shard, name, n, p, part, Some(hashes), ack);
                            }
                        }
                    }
                    Err(e) => self.record_error(name, &e),
                }
            }
        }
    }

    /// Rows for port `p` of node `n` on `shard`, with their key hashes if known
    /// (`partition::key_hashes`), which the owner's aggregate reuses.
    #[allow(clippy::too_many_arguments)]
    fn deliver(&mut self, shard: usize, name: &Arc<str>, n: usize, p: usize, batch: RecordBatch, hashes: Option<Vec<u64>>, ack: &AckToken) {
        if shard == self.id {
            self.process(name, n, p, batch, hashes, ack);
        } else {
            let msg = Exchange::Data { stream: name.clone(), node: n, port: p, from: self.id, batch, hashes, ack: ack.clone() };
            let _ = self.exchange[shard].send(msg);
        }
    }

    /// Node `n` of stream `name` processes rows of its port `p`.
    fn process(&mut self, name: &Arc<str>, n: usize, p: usize, batch: RecordBatch, hashes: Option<Vec<u64>>, ack: &AckToken) {
        let mut out = self.collector();
        let Some(task) = self.streams.get_mut(name) else { return };
        // A message for a stream dropped and created again with other operators.
        let Some(node) = task.nodes.get_mut(n).filter(|node| p < node.routes.len()) else { return };
        task.dirty = true;
        let result = node.op.process(p, &batch, hashes, &mut out);
        let late = node.op.late_rows();
        if late > node.late_reported {
            task.output.counters.late_rows.fetch_add(late - node.late_reported, Ordering::Relaxed);
            node.late_reported = late;
        }
        report_join_state(node, &task.output);
        if let Some(rejected) = out.rejected.take() {
            reject(&task.output, &node.port_names[p], batch.num_rows(), rejected);
        }
        if let Err(e) = result {
            return self.record_error(name, &e);
        }
        self.drain(name, n, out, ack);
    }

    /// What node `n` emitted: retired rows kept, rows on to its readers or, from an
    /// output node, the stream's output.
    fn drain(&mut self, name: &Arc<str>, n: usize, mut out: Collector, ack: &AckToken) {
        for rows in out.retired.drain(..) {
            if let Err(e) = self.retain(name, rows) {
                self.record_error(name, &e);
            }
        }
        let readers = self.streams.get(name).filter(|_| !out.rows.is_empty()).map(|task| task.nodes[n].readers.clone());
        if let Some(readers) = readers {
            for batch in out.rows.drain(..) {
                if readers.is_empty() {
                    self.emit(name, batch, ack);
                } else {
                    for &(m, p) in readers.iter() {
                        self.send(name, m, p, batch.clone(), ack);
                    }
                }
            }
        }
        self.recycle(out);
    }

    /// A collector for one operator call: a spare one, so the per-batch path does not
    /// allocate its vectors anew.
    fn collector(&mut self) -> Collector {
        self.spare.pop().unwrap_or_default()
    }

    fn recycle(&mut self, mut out: Collector) {
        out.rows.clear();
        out.retired.clear();
        out.rejected = None;
        self.spare.push(out);
    }

    /// Counts an error against `name`'s metrics (`errors`, `last_error`; logged), a
    /// stream's or a source's; only logged once `name` is gone.
    fn record_error(&self, name: &str, e: &dyn std::fmt::Display) {
        match self.streams.get(name).map(|t| t.output.clone()).or_else(|| self.output(name)) {
            Some(output) => output.record_error(&e.to_string()),
            None => log::warn!("'{name}': {e}"),
        }
    }

    /// A stream produced `batch`: to its subscribers, its retained rows, and its readers.
    fn emit(&mut self, name: &Arc<str>, batch: RecordBatch, ack: &AckToken) {
        let Some(task) = self.streams.get(name) else { return };
        task.output.publish(&batch);
        tally(&mut self.published, name, &batch);
        if let Some(born) = ack.born {
            task.output.record_latency(self.id, self.shards, born);
        }
        if !task.plan.is_changelog() {
            if let Err(e) = self.retain(name, batch.clone()) {
                self.record_error(name, &e);
            }
        }
        self.feed(name, &batch, ack);
    }

    /// `input`'s watermark on this shard is now `mark`.
    pub fn watermark(&mut self, input: &str, mark: Watermark, ack: &AckToken) {
        // Looked up before inserting: every insert that moves a watermark comes here.
        match self.marks.get_mut(input) {
            Some(current) if mark <= *current => return,
            Some(current) => *current = mark,
            None => {
                self.marks.insert(input.to_string(), mark);
            }
        }
        self.dirty = true;
        self.store.expire(input, mark);
        let Some(readers) = self.readers.get(input).cloned() else { return };
        for name in readers.iter() {
            let Some(task) = self.streams.get(name) else { continue };
            for (entry, n, p) in task.entries.clone().iter() {
                if &**entry == input {
                    self.send_mark(name, *n, *p, mark, ack);
                }
            }
        }
    }

    /// The watermark of what port `p` of node `n` reads is now `mark` on this shard:
    /// locally, or to every shard behind an exchange (after the rows it follows).
    fn send_mark(&mut self, name: &Arc<str>, n: usize, p: usize, mark: Watermark, ack: &AckToken) {
        let Some(node) = self.streams.get(name).and_then(|t| t.nodes.get(n)) else { return };
        let Some((route, first)) = node.routes.get(p).map(|&r| (r, node.first_slot[p])) else { return };
        if !route.crosses_shards() {
            return self.mark_slot(name, n, first, mark, ack);
        }
        for shard in 0..self.shards {
            if shard == self.id {
                self.mark_slot(name, n, first + shard, mark, ack);
            } else {
                let msg = Exchange::Watermark { stream: name.clone(), node: n, port: p, from: self.id, watermark: mark, ack: ack.clone() };
                let _ = self.exchange[shard].send(msg);
            }
        }
    }

    /// Watermark slot `slot` of node `n` reached `mark`.
    fn mark_slot(&mut self, name: &Arc<str>, n: usize, slot: usize, mark: Watermark, ack: &AckToken) {
        let Some(task) = self.streams.get_mut(name) else { return };
        let Some(node) = task.nodes.get_mut(n).filter(|node| slot < node.marks.len()) else { return };
        task.dirty = true;
        if let Some(merged) = node.marks.update(slot, mark) {
            self.node_advanced(name, n, merged, ack);
        }
    }

    /// Node `n`'s merged input watermark moved to `mark`: it acts on it (closes windows),
    /// then the watermark goes on to its readers or the stream's output.
    fn node_advanced(&mut self, name: &Arc<str>, n: usize, mark: Watermark, ack: &AckToken) {
        let mut out = self.collector();
        let Some(task) = self.streams.get_mut(name) else { return };
        let result = task.nodes[n].op.on_watermark(mark, &mut out);
        report_join_state(&mut task.nodes[n], &task.output);
        let readers = task.nodes[n].readers.clone();
        let passed_on = task.nodes[n].held_back(mark);
        if let Err(e) = result {
            self.record_error(name, &e);
        }
        self.drain(name, n, out, ack);
        if readers.is_empty() {
            return self.advance_output(name, ack);
        }
        for &(m, p) in readers.iter() {
            self.send_mark(name, m, p, passed_on, ack);
        }
    }

    /// The stream's watermark on this shard: its output nodes' merged (`StreamTask::out`;
    /// a union's branch over idle sources holds nothing back, and with every input idle
    /// the watermark holds). Passed on to the streams reading it when it moves.
    fn advance_output(&mut self, name: &Arc<str>, ack: &AckToken) {
        let Some(task) = self.streams.get_mut(name) else { return };
        let before = task.out.merged();
        for (slot, &o) in task.outputs.iter().enumerate() {
            let node = &task.nodes[o];
            task.out.set_idle(slot, node.port_inputs.iter().flatten().all(|i| self.idle.contains(i)));
            if let Some(mark) = node.emitted() {
                task.out.update(slot, mark);
            }
        }
        let Some(mark) = task.out.merged().filter(|&m| Some(m) != before) else { return };
        task.output.shard_watermark(self.id, self.shards, mark.ms());
        self.watermark(name, mark, ack);
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
        for name in readers.iter() {
            let Some(task) = self.streams.get(name) else { continue };
            let all_idle = task.plan.inputs().all(|i| self.idle.contains(i));
            if all_idle != self.idle.contains(&**name) {
                self.set_idle(name, all_idle, ack);
            }
            self.refresh_idle(name, ack);
        }
    }

    /// Every split of connector source `input` on this shard is idle (or one is active
    /// again): this shard's slots of the ports depending on it stop holding merges back,
    /// here and, over the exchange, on every other shard.
    pub fn set_local_idle(&mut self, input: &str, idle: bool, ack: &AckToken) {
        let changed = if idle { self.local_idle.insert(input.to_string()) } else { self.local_idle.remove(input) };
        if !changed {
            return;
        }
        let Some(readers) = self.readers.get(input).cloned() else { return };
        for name in readers.iter() {
            let Some(task) = self.streams.get(name) else { continue };
            for (n, node) in task.nodes.iter().enumerate() {
                for (p, inputs) in node.port_inputs.iter().enumerate() {
                    if !node.routes[p].crosses_shards() || !inputs.iter().any(|i| i == input) {
                        continue;
                    }
                    let here = idle_here(&self.idle, &self.local_idle, inputs);
                    for (peer, tx) in self.exchange.iter().enumerate() {
                        if peer != self.id {
                            let _ = tx.send(Exchange::Idle { stream: name.clone(), node: n, port: p, from: self.id, idle: here });
                        }
                    }
                }
            }
            self.refresh_idle(name, ack);
        }
    }

    /// Marks every watermark slot of `name`'s operators idle or not, by whether every
    /// catalog input its port depends on is idle; acts on the merges that move.
    fn refresh_idle(&mut self, name: &Arc<str>, ack: &AckToken) {
        let Some(nodes) = self.streams.get(name).map(|t| t.nodes.len()) else { return };
        for n in 0..nodes {
            let Some(task) = self.streams.get_mut(name) else { return };
            let node = &mut task.nodes[n];
            let mut moved = None;
            for (p, inputs) in node.port_inputs.iter().enumerate() {
                // Idle everywhere (the coordinator said so), or on this shard (its splits).
                let everywhere = inputs.iter().all(|i| self.idle.contains(i));
                let here = idle_here(&self.idle, &self.local_idle, inputs);
                let first = node.first_slot[p];
                if !node.routes[p].crosses_shards() {
                    moved = node.marks.set_idle(first, here).or(moved);
                    continue;
                }
                for shard in 0..self.shards {
                    let slot = first + shard;
                    let idle = if shard == self.id { here } else { everywhere || node.remote_idle[slot] };
                    moved = node.marks.set_idle(slot, idle).or(moved);
                }
            }
            if let Some(mark) = moved {
                self.node_advanced(name, n, mark, ack);
            }
        }
        self.advance_output(name, ack);
    }

    /// A timed stream's period elapsed: its timed operators emit (`EMIT EVERY`) or expire
    /// state (`state_ttl`).
    pub fn tick(&mut self, name: &Arc<str>) {
        let Some(task) = self.streams.get_mut(name) else { return };
        task.dirty = true;
        let timed: Vec<usize> = (0..task.nodes.len()).filter(|&n| task.plan.dag.nodes[n].spec.tick_ms().is_some()).collect();
        // Ticks are not inserts: nobody waits on them.
        let ack = self.background.clone();
        for n in timed {
            let mut out = self.collector();
            let Some(task) = self.streams.get_mut(name) else { return };
            let result = task.nodes[n].op.on_tick(&mut out);
            report_join_state(&mut task.nodes[n], &task.output);
            if let Err(e) = result {
                self.record_error(name, &e);
            }
            self.drain(name, n, out, &ack);
        }
    }

    pub fn on_exchange(&mut self, msg: Exchange) {
        if let Some(from) = msg.sender() {
            if self.align.holds(from) {
                return self.align.hold(from, msg);
            }
        }
        self.record_channel(&msg);
        match msg {
            Exchange::Data { stream, node, port, batch, hashes, ack, .. } => self.process(&stream, node, port, batch, hashes, &ack),
            Exchange::Watermark { stream, node, port, from, watermark, ack } => {
                let first = self.streams.get(&stream).and_then(|t| t.nodes.get(node)?.first_slot.get(port).copied());
                let Some(slot) = first.map(|f| f + from) else { return };
                self.mark_slot(&stream, node, slot, watermark, &ack)
            }
            Exchange::Idle { stream, node, port, from, idle } => {
                let Some(n) = self.streams.get_mut(&stream).and_then(|t| t.nodes.get_mut(node)) else { return };
                let Some(slot) = n.first_slot.get(port).map(|f| f + from) else { return };
                if let Some(flag) = n.remote_idle.get_mut(slot) {
                    *flag = idle;
                }
                let ack = self.background.clone();
                self.refresh_idle(&stream, &ack);
            }
            Exchange::Spilled { name, epoch, batches, path, mapped } => self.spilled(&name, epoch, batches, path, mapped),
            Exchange::Marker { from } => {
                if self.align.marker(from) {
                    self.finish_checkpoint();
                }
            }
            Exchange::Stop => {}
        }
    }
}

/// Whether every one of `inputs` is idle on this shard: declared idle everywhere (`idle`),
/// or a connector source whose splits here are all idle (`local`).
fn idle_here(idle: &HashSet<String>, local: &HashSet<String>, inputs: &[String]) -> bool {
    inputs.iter().all(|i| idle.contains(i) || local.contains(i))
}

/// Closes every operator of `task` (a sink delivers what is pending); a failure is counted
/// against the stream.
fn close_operators(name: &str, task: &mut StreamTask) {
    for node in task.nodes.iter_mut() {
        if let Err(e) = node.op.close() {
            task.output.record_error(&format!("'{name}' closing: {e}"));
        }
    }
}

/// Loads a stream's state from a checkpoint written before streams were DAGs: the
/// keyed operator (aggregate or join) got the marks per branch × shard and the state;
/// without one, map node `b` got branch `b`'s mark. Map nodes in front of a keyed one
/// start from the shard's input marks.
fn restore_v1(task: &mut StreamTask, saved: TaskStateV1, marks: &FastMap<String, Watermark>) -> Result<()> {
    let watermark = saved.watermark;
    match task.keyed_node() {
        Some(k) => {
            task.nodes[k].marks.restore(&saved.marks, watermark);
            task.nodes[k].late_reported = saved.late_reported;
            if let Some(bytes) = saved.agg.or(saved.join) {
                task.nodes[k].op.restore(&bytes)?;
            }
            for node in task.nodes.iter_mut().take(k) {
                let mark = node.port_inputs[0].first().and_then(|i| marks.get(i)).copied();
                node.marks.restore(&[Watermark::encode(mark)], Watermark::encode(mark));
            }
        }
        None => {
            for (node, &mark) in task.nodes.iter_mut().zip(&saved.marks) {
                node.marks.restore(&[mark], mark);
            }
        }
    }
    task.restore_out(watermark);
    Ok(())
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
        Exchange::Data { stream: "s".into(), node: 0, port: 0, from, batch, hashes: None, ack: Ack::background() }
    }

    /// Shard 1's marker arrives at shard 0 before shard 0's own barrier (its command
    /// stream was behind): the checkpoint still completes, and what shard 1 sent after its
    /// marker waits until shard 0 has snapshotted, and is not recorded as in flight.
    #[test]
    fn a_marker_before_the_barrier_is_kept_and_what_follows_it_waits_for_the_snapshot() {
        let (mut rt, rx1, root) = shard_zero_of_two("early-marker");

        rt.on_exchange(Exchange::Marker { from: 1 });
        rt.on_exchange(data(1));
        assert!(rt.align.holds(1), "held until the barrier");

        let (reply, answer) = crate::command::reply_channel();
        rt.begin_checkpoint(root.clone(), 1, reply);
        assert!(matches!(rx1.try_recv(), Ok(Exchange::Marker { from: 0 })));
        assert!(!rt.align.holds(1), "applied after the snapshot");
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
