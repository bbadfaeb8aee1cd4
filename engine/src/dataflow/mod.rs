//! The dataflow core: what a stream compiles to and what the shards run.
//!
//! A stream is a [`Dag`] of [`Node`]s. Each node names an [`OperatorSpec`] (the planner's
//! output, built into one [`Operator`] per shard) and its input ports; each port reads a
//! source or stream of the catalog, or an earlier node, through a [`Route`] that says
//! which shard a row goes to (the exchange). Nodes nobody reads are the stream's output. The shards
//! (`laminardb-shards`) run any such DAG without knowing the operators: a new operator is
//! one file with its spec and its `Operator`, and one planner rule that puts it in a DAG.

pub mod barrier;
pub mod local;
pub mod watermark;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

pub use barrier::Alignment;
pub use local::LocalRun;
pub use watermark::{Watermark, WatermarkHolder};

use crate::stream::isolate::Rejected;
use crate::Result;

/// Which shard an edge's rows go to (the exchange in front of a port).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The shard the rows are on.
    Forward,
    /// The shard owning the hash of the rows' first `n` columns (`n > 0`).
    Key(usize),
    /// Shard 0 (an aggregate without keys: one global group).
    Single,
}

impl Route {
    /// Rows cross shards: the receiving operator's watermark merges every sender's.
    pub fn crosses_shards(self) -> bool {
        !matches!(self, Route::Forward)
    }
}

/// Where a port's rows come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// A source or stream of the catalog, by name.
    Input(String),
    /// An earlier node of the same DAG.
    Node(usize),
}

#[derive(Clone, Debug)]
pub struct Port {
    pub from: Upstream,
    pub route: Route,
}

/// What an operator emitted in one call; the shard runtime drains it.
#[derive(Default)]
pub struct Collector {
    /// Rows for the node's readers (the next nodes, or the stream's output).
    pub rows: Vec<RecordBatch>,
    /// Rows leaving the operator's state that stay queryable as the stream's retained
    /// rows without being emitted again (closed windows of a changelog stream).
    pub retired: Vec<RecordBatch>,
    /// Input rows an expression failed on (the rest went on).
    pub rejected: Option<Rejected>,
}

/// One operator instance on one shard: synchronous, single-threaded, fed one batch at a
/// time. Only `process` is required; the hooks default to "nothing to do".
pub trait Operator {
    /// Rows arriving on input port `port`. `hashes`: the rows' key hashes, when the
    /// exchange computed them.
    fn process(&mut self, port: usize, batch: &RecordBatch, hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()>;

    /// The merged watermark of the inputs moved to `mark` (windows close here). The
    /// runtime passes it on to the readers afterwards.
    fn on_watermark(&mut self, _mark: Watermark, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// A processing-time period elapsed (`OperatorSpec::tick_ms`).
    fn on_tick(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// The state a checkpoint keeps (`None`: stateless).
    fn save(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Back to what `save` returned.
    fn restore(&mut self, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }

    /// The rows a query of the stream reads from this operator's state (`global`: this
    /// shard also answers for state that belongs to no key), when it keeps its current
    /// result as state (a changelog's groups); `None` otherwise.
    fn scan(&self, _global: bool) -> Result<Option<Vec<RecordBatch>>> {
        Ok(None)
    }

    /// Input rows dropped as late so far (for the stream's metrics).
    fn late_rows(&self) -> u64 {
        0
    }

    /// A join's state: the rows it holds of each side (for the stream's metrics).
    fn join_state(&self) -> Option<[u64; 2]> {
        None
    }

    /// The barrier of checkpoint `id` reached this shard, before its state is saved: an
    /// operator with effects outside the engine (a sink) delivers or commits them here;
    /// an error fails the checkpoint.
    fn on_checkpoint(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }

    /// The stream is dropped or the database closes.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Which instance of an operator is being built: the one of shard `shard` of `shards`
/// (a sink names its transactions by it; most operators do not ask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    pub shard: usize,
    pub shards: usize,
}

/// A node's operator as planned: builds one [`Operator`] per shard.
pub trait OperatorSpec: Send + Sync + std::fmt::Debug {
    /// A short name for errors, metrics and the topology ("aggregate", "join", …).
    fn name(&self) -> &'static str;

    /// The rows it emits.
    fn schema(&self) -> SchemaRef;

    /// One instance, for the shard `task` names.
    fn build(self: Arc<Self>, task: TaskInfo) -> Result<Box<dyn Operator>>;

    /// Its emissions are a changelog (rows end with the `_op` column).
    fn changelog(&self) -> bool {
        false
    }

    /// It acts on watermarks (closes windows, prunes state), so its inputs' watermarks
    /// must reach it; otherwise they only update metrics.
    fn uses_watermarks(&self) -> bool {
        false
    }

    /// Its emissions may lie this many milliseconds behind its input watermark (a join
    /// pairing a row with an older kept one): the watermark it passes on is held back by
    /// that much, so its rows are never late to its readers.
    fn watermark_delay_ms(&self) -> i64 {
        0
    }

    /// Call `on_tick` every this many milliseconds of processing time.
    fn tick_ms(&self) -> Option<i64> {
        None
    }

    /// The lookup table it reads (`CREATE LOOKUP TABLE`), which cannot be dropped while
    /// it does.
    fn lookup_table(&self) -> Option<&str> {
        None
    }
}

/// One operator of a stream and its inputs.
#[derive(Clone, Debug)]
pub struct Node {
    pub spec: Arc<dyn OperatorSpec>,
    pub ports: Vec<Port>,
}

/// A stream's operators; a port only reads earlier nodes, so index order is a
/// topological order.
#[derive(Clone, Debug, Default)]
pub struct Dag {
    pub nodes: Vec<Node>,
}

impl Dag {
    /// Appends `node`, returning its index.
    pub fn add(&mut self, spec: Arc<dyn OperatorSpec>, ports: Vec<Port>) -> usize {
        debug_assert!(ports.iter().all(|p| !matches!(p.from, Upstream::Node(n) if n >= self.nodes.len())));
        self.nodes.push(Node { spec, ports });
        self.nodes.len() - 1
    }

    /// The nodes that read node `n`, with the port they read it on.
    pub fn readers(&self, n: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (m, node) in self.nodes.iter().enumerate() {
            for (p, port) in node.ports.iter().enumerate() {
                if port.from == Upstream::Node(n) {
                    out.push((m, p));
                }
            }
        }
        out
    }

    /// The nodes whose rows are the stream's output (no node reads them).
    pub fn outputs(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&n| self.readers(n).is_empty()).collect()
    }

    /// Catalog names the DAG reads, in port order (duplicates kept).
    pub fn inputs(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().flat_map(|n| &n.ports).filter_map(|p| match &p.from {
            Upstream::Input(name) => Some(name.as_str()),
            Upstream::Node(_) => None,
        })
    }

    /// The catalog inputs each node depends on, transitively (for idleness).
    pub fn depends_on(&self, n: usize) -> Vec<&str> {
        let mut out = Vec::new();
        for port in &self.nodes[n].ports {
            match &port.from {
                Upstream::Input(name) => out.push(name.as_str()),
                Upstream::Node(m) => out.extend(self.depends_on(*m)),
            }
        }
        out
    }

    /// Watermark slots of node `n`: one per local port, one per shard per port behind an
    /// exchange. Returns the first slot of each port and the total.
    pub fn slots(&self, n: usize, shards: usize) -> (Vec<usize>, usize) {
        let mut first = Vec::new();
        let mut total = 0;
        for port in &self.nodes[n].ports {
            first.push(total);
            total += if port.route.crosses_shards() { shards } else { 1 };
        }
        (first, total)
    }
}
