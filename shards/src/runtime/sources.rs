//! Connector sources read on this shard (`engine::source`): the readers of the splits
//! this shard owns, polled by the shard's source task (`shard::SourceTask`), their rows
//! appended like inserted ones, the source's watermark here the least of its splits'.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use laminardb_engine::checkpoint::SplitPosition;
use laminardb_engine::dataflow::Watermark;
use laminardb_engine::source::{Backlog, SourceConnector, SplitPoll, SplitReader, END_OF_INPUT};
use laminardb_engine::stream::time::max_millis;
use laminardb_engine::{Error, Result};

use super::ShardRuntime;
use crate::command::AckToken;

/// One connector source on this shard.
pub(super) struct SourceReading {
    connector: Arc<dyn SourceConnector>,
    /// How many splits the source had when this shard last looked (it owns those among
    /// them that are its own).
    known: usize,
    /// More may appear ([`SourceConnector::splits_now`] answers): asked once per round.
    grows: bool,
    splits: Vec<SplitState>,
    /// The declared watermark delay, subtracted from the splits' event-time progress.
    delay_ms: i64,
    /// The event-time column, for splits that do not report their progress.
    time_column: Option<usize>,
    /// The source's columns, which every batch must have.
    schema: SchemaRef,
    /// How long a split may go without rows before it is idle.
    idle_after: Duration,
}

struct SplitState {
    split: usize,
    reader: Box<dyn SplitReader>,
    ended: bool,
    /// The latest event time among the rows read.
    seen: Option<i64>,
    /// When it last had rows (or was opened).
    active: Instant,
}

impl SplitState {
    /// This split's watermark: past everything once ended, else its progress less the delay.
    fn watermark(&self, delay_ms: i64) -> Option<i64> {
        if self.ended {
            return Some(END_OF_INPUT);
        }
        self.reader.progress().or(self.seen).map(|t| t.saturating_sub(delay_ms))
    }
}

fn same_columns(a: &SchemaRef, b: &SchemaRef) -> bool {
    Arc::ptr_eq(a, b) || a.fields() == b.fields()
}

/// What a poll of a source's splits on this shard came to.
#[derive(Debug, PartialEq)]
pub enum SourceStep {
    /// Rows (or input skipped) came: poll again at once.
    Busy,
    /// Nothing now: poll again after this long.
    Wait(Duration),
    /// Every split of this shard has ended (or it owns none).
    Ended,
}

/// The splits restored positions are kept by, until their source starts reading.
pub(super) type Positions = HashMap<(String, usize), Vec<u8>>;

/// How often a shard owning no split of a source that may grow looks for new ones.
const UNOWNED_POLL: Duration = Duration::from_millis(100);

impl ShardRuntime {
    /// Opens the readers of the splits of `source` this shard owns (split `s` is shard
    /// `s % shards`'s), each where the restored checkpoint left it. A shard owning none
    /// moves the source's watermark here past everything (none of its rows will come
    /// here), unless the source may gain splits: then this shard's part of it is idle
    /// until it owns one.
    pub fn open_source(
        &mut self,
        source: &Arc<str>,
        connector: Arc<dyn SourceConnector>,
        delay_ms: i64,
        time_column: Option<usize>,
        idle_after: Duration,
        ack: &AckToken,
    ) -> Result<SourceStep> {
        self.close_source(source);
        let splits = connector.splits(self.shards)?;
        let mut states = Vec::new();
        for split in (self.id..splits).step_by(self.shards) {
            states.push(self.open_split(source, connector.as_ref(), split, splits)?);
        }
        let owns = !states.is_empty();
        let grows = connector.splits_now().is_some();
        let schema = connector.schema();
        let reading = SourceReading { connector, known: splits, grows, splits: states, delay_ms, time_column, schema, idle_after };
        self.sources.insert(source.clone(), reading);
        match (owns, grows) {
            (true, _) => Ok(SourceStep::Busy),
            (false, false) => {
                self.source_watermark(source, END_OF_INPUT, ack);
                Ok(SourceStep::Ended)
            }
            (false, true) => {
                // The source's watermark in its metrics is the other shards'; the
                // dataflow here waits for none of this shard's (idle).
                if let Some(output) = self.source_output(source) {
                    output.shard_watermark(self.id, self.shards, END_OF_INPUT);
                }
                self.set_local_idle(source, true, ack);
                Ok(SourceStep::Wait(UNOWNED_POLL))
            }
        }
    }

    /// A reader of split `split` of `splits`, where the restored checkpoint left it.
    fn open_split(&mut self, source: &Arc<str>, connector: &dyn SourceConnector, split: usize, splits: usize) -> Result<SplitState> {
        let position = self.positions.remove(&(source.to_string(), split));
        let reader = connector
            .open(split, splits, position.as_deref())
            .map_err(|e| Error::connector(format!("opening split {split} of '{source}': {}", e.message)))?;
        Ok(SplitState { split, reader, ended: false, seen: None, active: Instant::now() })
    }

    /// Opens the splits among `source`'s `now` that it gained since this shard last looked
    /// and that are its own.
    fn open_new_splits(&mut self, source: &Arc<str>, now: usize) -> Result<()> {
        let Some(reading) = self.sources.get(source) else { return Ok(()) };
        let (known, connector) = (reading.known, reading.connector.clone());
        let mut opened = Vec::new();
        let (shards, id) = (self.shards, self.id);
        for split in (known..now).filter(|s| s % shards == id) {
            opened.push(self.open_split(source, connector.as_ref(), split, now)?);
        }
        if let Some(reading) = self.sources.get_mut(source) {
            reading.known = now;
            reading.splits.extend(opened);
        }
        Ok(())
    }

    /// Polls each open split of `source` once, appends what came and moves the source's
    /// watermark on this shard.
    pub fn poll_source(&mut self, source: &Arc<str>, ack: &AckToken) -> Result<SourceStep> {
        let Some(reading) = self.sources.get_mut(source) else { return Ok(SourceStep::Ended) };
        let gained = if reading.grows { reading.connector.splits_now().filter(|&n| n > reading.known) } else { None };
        let reading = match gained {
            Some(now) => {
                self.open_new_splits(source, now)?;
                let Some(reading) = self.sources.get_mut(source) else { return Ok(SourceStep::Ended) };
                reading
            }
            None => reading,
        };
        if reading.splits.is_empty() {
            // None of a growing source's splits is this shard's yet.
            return Ok(SourceStep::Wait(UNOWNED_POLL));
        }
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut wait: Option<Duration> = None;
        let mut failure = None;
        let mut skipped = Vec::new();
        for state in reading.splits.iter_mut().filter(|s| !s.ended) {
            match state.reader.poll() {
                Ok(SplitPoll::Rows(batch)) if !same_columns(&batch.schema(), &reading.schema) => {
                    failure = Some(Error::connector(format!(
                        "split {} of '{source}' produced the columns {:?}, not the source's",
                        state.split,
                        batch.schema().fields().iter().map(|f| f.name()).collect::<Vec<_>>()
                    )));
                    break;
                }
                Ok(SplitPoll::Rows(batch)) => {
                    state.active = Instant::now();
                    // The rows are the reader's no more: they go in even if their time fails.
                    let latest = reading.time_column.map(|c| max_millis(batch.column(c))).transpose();
                    batches.push(batch);
                    match latest {
                        Ok(latest) => state.seen = state.seen.max(latest.flatten()),
                        Err(e) => {
                            failure = Some(Error::connector(format!("event time of split {} of '{source}': {}", state.split, e.message)));
                            break;
                        }
                    }
                }
                Ok(SplitPoll::Pending(after)) => wait = Some(wait.map_or(after, |w| w.min(after))),
                Ok(SplitPoll::End) => state.ended = true,
                Ok(SplitPoll::Skipped(what)) => skipped.push(format!("split {} of '{source}' skipped {what}", state.split)),
                Err(e) => {
                    failure = Some(Error::connector(format!("reading split {} of '{source}': {}", state.split, e.message)));
                    break;
                }
            }
        }
        // A source that may gain splits never ends here.
        let ended = !reading.grows && reading.splits.iter().all(|s| s.ended);
        let delay_ms = reading.delay_ms;
        // A split without rows for a while is idle: the others' watermark goes on without
        // it; with every open split idle, this shard's part of the source is idle.
        let idle_after = reading.idle_after;
        let is_idle = |s: &SplitState| !s.ended && s.active.elapsed() >= idle_after;
        let all_idle = !ended && reading.splits.iter().filter(|s| !s.ended).all(is_idle);
        let mark = reading.splits.iter().filter(|s| !is_idle(s)).map(|s| s.watermark(delay_ms)).min().flatten();
        let came = !batches.is_empty() || !skipped.is_empty();
        let backlog = reading.splits.iter().filter_map(|s| s.reader.backlog()).reduce(|a, b| Backlog {
            pending: a.pending + b.pending,
            capacity: a.capacity + b.capacity,
        });
        if backlog.is_some() || !skipped.is_empty() {
            if let Some(output) = self.source_output(source) {
                if let Some(b) = backlog {
                    output.shard_backlog(self.id, self.shards, b.pending, b.capacity);
                }
                for what in &skipped {
                    output.record_error(what);
                }
            }
        }
        if !batches.is_empty() {
            self.append(source, batches, ack)?;
        }
        if let Some(mark) = mark.filter(|_| !all_idle) {
            self.source_watermark(source, mark, ack);
        }
        if all_idle != self.local_idle.contains(&**source) {
            self.set_local_idle(source, all_idle, ack);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(match (came, ended, wait) {
            (true, _, _) => SourceStep::Busy,
            (false, true, _) => SourceStep::Ended,
            (false, false, Some(after)) => SourceStep::Wait(after),
            (false, false, None) => SourceStep::Busy,
        })
    }

    /// `source`'s watermark on this shard is now `mark` (a connector source moves its
    /// own): into the dataflow, and into the source's metrics.
    fn source_watermark(&mut self, source: &Arc<str>, mark: i64, ack: &AckToken) {
        self.watermark(source, Watermark::new(mark), ack);
        if let Some(output) = self.source_output(source) {
            output.shard_watermark(self.id, self.shards, mark);
        }
    }

    /// Closes the readers of `source` on this shard (dropped, replaced or shut down).
    pub(super) fn close_source(&mut self, source: &str) {
        if let Some(mut reading) = self.sources.remove(source) {
            for state in reading.splits.iter_mut() {
                if let Err(e) = state.reader.close() {
                    log::warn!("closing split {} of '{source}': {e}", state.split);
                }
            }
        }
    }

    /// Where every split of this shard is, for a checkpoint: the open readers', and the
    /// restored positions of sources not reading yet (carried on, or they would be lost).
    pub(super) fn split_positions(&self) -> Vec<SplitPosition> {
        let open = self.sources.iter().flat_map(|(source, reading)| {
            reading.splits.iter().map(|s| SplitPosition { source: source.to_string(), split: s.split as u64, position: s.reader.position() })
        });
        let waiting = self
            .positions
            .iter()
            .map(|((source, split), position)| SplitPosition { source: source.clone(), split: *split as u64, position: position.clone() });
        let mut all: Vec<SplitPosition> = open.chain(waiting).collect();
        all.sort_by(|a, b| (&a.source, a.split).cmp(&(&b.source, b.split)));
        all
    }
}
