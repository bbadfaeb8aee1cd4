//! Runs a [`Dag`] over rows already at hand, on the calling thread, as one shard: every
//! exchange is local. Ad-hoc windowed queries run their stream plan so, over the rows
//! the shards retain; tests run DAGs so without a runtime.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;

use super::{Collector, Dag, Operator, TaskInfo, Upstream, Watermark};
use crate::Result;

pub struct LocalRun<'a> {
    dag: &'a Dag,
    ops: Vec<Box<dyn Operator>>,
    readers: Vec<Vec<(usize, usize)>>,
    entries: HashMap<&'a str, Vec<(usize, usize)>>,
    out: Vec<RecordBatch>,
}

impl<'a> LocalRun<'a> {
    pub fn new(dag: &'a Dag) -> Result<LocalRun<'a>> {
        let ops = dag.nodes.iter().map(|n| Arc::clone(&n.spec).build(TaskInfo { shard: 0, shards: 1 })).collect::<Result<Vec<_>>>()?;
        let readers = (0..dag.nodes.len()).map(|n| dag.readers(n)).collect();
        let mut entries: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (n, node) in dag.nodes.iter().enumerate() {
            for (p, port) in node.ports.iter().enumerate() {
                if let Upstream::Input(name) = &port.from {
                    entries.entry(name.as_str()).or_default().push((n, p));
                }
            }
        }
        Ok(LocalRun { dag, ops, readers, entries, out: Vec::new() })
    }

    /// Rows of catalog input `input`, to every port that reads it. An expression that
    /// fails on a row fails the run (as a query does), rather than rejecting the row.
    pub fn push(&mut self, input: &str, batch: &RecordBatch) -> Result<()> {
        for (n, p) in self.entries.get(input).cloned().unwrap_or_default() {
            self.process(n, p, batch)?;
        }
        Ok(())
    }

    /// The end of input: event time jumps to the end of time (every window closes).
    /// Returns everything the output nodes emitted.
    pub fn finish(mut self) -> Result<Vec<RecordBatch>> {
        for n in 0..self.dag.nodes.len() {
            let mut out = Collector::default();
            self.ops[n].on_watermark(Watermark::new(i64::MAX), &mut out)?;
            self.drain(n, out)?;
        }
        Ok(self.out)
    }

    fn process(&mut self, n: usize, p: usize, batch: &RecordBatch) -> Result<()> {
        let mut out = Collector::default();
        self.ops[n].process(p, batch, None, &mut out)?;
        self.drain(n, out)
    }

    fn drain(&mut self, n: usize, out: Collector) -> Result<()> {
        if let Some(rejected) = out.rejected {
            return Err(rejected.error);
        }
        for batch in out.rows {
            if self.readers[n].is_empty() {
                self.out.push(batch);
                continue;
            }
            for (m, p) in self.readers[n].clone() {
                self.process(m, p, &batch)?;
            }
        }
        Ok(())
    }
}
