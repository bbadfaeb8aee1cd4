//! `Writer`: repeated inserts into one source, pipelined.
//!
//! A row dict whose values are plain Python scalars of its columns' kinds (the feed
//! handler's `insert(dict)` per tick) is checked and appended to Arrow builders while the
//! GIL is held, and `insert` returns: every error its values can cause is found there.
//! The buffered rows go to the engine as one insert whenever the writer has fewer than
//! `IN_FLIGHT_MAX` inserts in flight, so a batch is what arrived while earlier ones were
//! being stored (natural batching: one row at a time when the feed is slow, large batches
//! when it is fast). Whoever holds the `sending` token sends: the caller, when it finds
//! room; otherwise the writer's flusher thread (started on first need), which waits for an
//! answer and sends what has gathered. Neither needs the GIL: the buffer is Rust.
//! Other inputs (lists, frames, Arrow) are converted and cast in the call (their errors are
//! raised there), then sent behind the buffered rows. The engine's own failures (storage,
//! a dropped source) surface on the writer's next call. `flush()` returns once everything
//! accepted is stored, and the connection flushes its writers before its own calls
//! (`ConnState::settle_writers`): a query sees what the connection's writers accepted.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString};
use pyo3_arrow::PySchema;

use laminardb_engine::config::poll_for;
use laminardb_engine::{Error, ErrorCode};
use laminardb_shards::{Handle, SentInsert};

use crate::connection::ConnState;
use crate::convert::{bytes, epoch_ms_in, float, int, text, to_batches, uint};
use crate::errors::to_pyerr;
use crate::gil::{blocking, guarded};

/// No watermark yet: the smallest timestamp, as upstream reports it.
pub const NO_WATERMARK: i64 = i64::MIN;

/// Rows a writer buffers at most while an insert is in flight; the caller then waits.
const BUFFER_ROWS_MAX: usize = 65_536;

/// Inserts a writer has in flight at most: rows arriving meanwhile gather into the next
/// one. Two, not one: a feed at rest sends its next row before the engine has answered
/// for the last one (its subscriber has it already), and should not wait for that answer.
const IN_FLIGHT_MAX: usize = 2;

/// How long a caller waits for room in flight before leaving its row to a flusher that is
/// asleep.
const ANSWER_SPIN: std::time::Duration = std::time::Duration::from_micros(20);

#[pyclass(name = "Writer", module = "laminardb", frozen)]
pub struct PyWriter {
    shared: Arc<Shared>,
    /// `None`: the source takes no row dicts on the fast path (a column of another type, a
    /// source of changes); every insert is converted in the call.
    rows: Option<RowReader>,
    watermark: AtomicI64,
    closed: AtomicBool,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the caller and the flusher thread share.
pub struct Shared {
    handle: Arc<Handle>,
    state: Arc<ConnState>,
    source: String,
    schema: SchemaRef,
    buffer: Mutex<Buffer>,
    /// The flusher waits here for rows.
    wake: Condvar,
    /// Held by the one thread that seals, sends and takes answers: keeps inserts in order.
    sending: AtomicBool,
    /// Inserts sent and not yet answered, oldest first (at most `IN_FLIGHT_MAX`).
    in_flight: Mutex<std::collections::VecDeque<InFlight>>,
    /// Rows accepted and not yet answered for.
    unsettled: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<Error>>,
}

struct InFlight {
    sent: SentInsert,
    rows: u64,
}

struct Buffer {
    columns: Vec<Builder>,
    kinds: Vec<Kind>,
    rows: usize,
    /// When the first buffered row came (the insert's age in the latency histograms).
    born: Option<Instant>,
    flusher_waiting: bool,
    stop: bool,
}

/// How a column's Python values are read, and the builder they go to.
#[derive(Clone)]
enum Kind {
    Bool,
    /// Signed and unsigned integers up to 32 bits and Int64, range-checked as declared.
    Int(DataType),
    UInt64,
    Float,
    Str,
    Bin,
    Timestamp(TimeUnit),
}

enum Builder {
    Bool(BooleanBuilder),
    I64(Int64Builder),
    U64(UInt64Builder),
    F64(Float64Builder),
    Str(StringBuilder),
    Bin(BinaryBuilder),
}

enum Value<'a> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(&'a str),
    Bin(&'a [u8]),
}

impl Kind {
    fn of(ty: &DataType) -> Option<Kind> {
        Some(match ty {
            DataType::Boolean => Kind::Bool,
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Kind::Int(ty.clone()),
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => Kind::Int(ty.clone()),
            DataType::UInt64 => Kind::UInt64,
            DataType::Float32 | DataType::Float64 => Kind::Float,
            DataType::Utf8 | DataType::LargeUtf8 => Kind::Str,
            DataType::Binary => Kind::Bin,
            DataType::Timestamp(unit, _) => Kind::Timestamp(*unit),
            _ => return None,
        })
    }

    /// The value as the insert path's conversion (`convert::build_native`) reads it;
    /// `None`: not a plain value of this kind (the row then takes that path).
    fn read<'a>(&self, v: &'a Bound<'_, PyAny>) -> Option<Value<'a>> {
        if v.is_none() {
            return Some(Value::Null);
        }
        Some(match self {
            Kind::Bool => Value::Bool(v.is_instance_of::<PyBool>().then(|| v.is_truthy().ok()).flatten()?),
            Kind::Int(ty) => Value::I64(match ty {
                DataType::Int8 => int::<i8>(v)?.into(),
                DataType::Int16 => int::<i16>(v)?.into(),
                DataType::Int32 => int::<i32>(v)?.into(),
                DataType::UInt8 => uint::<u8>(v)?.into(),
                DataType::UInt16 => uint::<u16>(v)?.into(),
                DataType::UInt32 => uint::<u32>(v)?.into(),
                _ => int::<i64>(v)?,
            }),
            Kind::UInt64 => Value::U64(uint::<u64>(v)?),
            Kind::Float => Value::F64(float(v)?),
            Kind::Str => Value::Str(text(v)?),
            Kind::Bin => Value::Bin(bytes(v)?),
            Kind::Timestamp(unit) => Value::I64(epoch_ms_in(*unit)(v)?),
        })
    }

    fn builder(&self, capacity: usize) -> Builder {
        match self {
            Kind::Bool => Builder::Bool(BooleanBuilder::with_capacity(capacity)),
            Kind::Int(_) | Kind::Timestamp(_) => Builder::I64(Int64Builder::with_capacity(capacity)),
            Kind::UInt64 => Builder::U64(UInt64Builder::with_capacity(capacity)),
            Kind::Float => Builder::F64(Float64Builder::with_capacity(capacity)),
            Kind::Str => Builder::Str(StringBuilder::with_capacity(capacity, capacity * 8)),
            Kind::Bin => Builder::Bin(BinaryBuilder::with_capacity(capacity, capacity * 8)),
        }
    }
}

impl Builder {
    fn append(&mut self, value: &Value<'_>) {
        match (self, value) {
            (Builder::Bool(b), Value::Bool(v)) => b.append_value(*v),
            (Builder::I64(b), Value::I64(v)) => b.append_value(*v),
            (Builder::U64(b), Value::U64(v)) => b.append_value(*v),
            (Builder::F64(b), Value::F64(v)) => b.append_value(*v),
            (Builder::Str(b), Value::Str(v)) => b.append_value(v),
            (Builder::Bin(b), Value::Bin(v)) => b.append_value(v),
            (Builder::Bool(b), _) => b.append_null(),
            (Builder::I64(b), _) => b.append_null(),
            (Builder::U64(b), _) => b.append_null(),
            (Builder::F64(b), _) => b.append_null(),
            (Builder::Str(b), _) => b.append_null(),
            (Builder::Bin(b), _) => b.append_null(),
        }
    }

    fn finish(mut self) -> ArrayRef {
        match &mut self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::I64(b) => Arc::new(b.finish()),
            Builder::U64(b) => Arc::new(b.finish()),
            Builder::F64(b) => Arc::new(b.finish()),
            Builder::Str(b) => Arc::new(b.finish()),
            Builder::Bin(b) => Arc::new(b.finish()),
        }
    }
}

/// Reads row dicts for the fast path: the source's column names as interned Python
/// strings (a dict lookup by one hashes nothing), their kinds and nullability.
struct RowReader {
    keys: Vec<Py<PyString>>,
    kinds: Vec<Kind>,
    nullable: Vec<bool>,
}

impl RowReader {
    fn new(py: Python<'_>, schema: &SchemaRef) -> Option<RowReader> {
        let kinds = schema.fields().iter().map(|f| Kind::of(f.data_type())).collect::<Option<Vec<_>>>()?;
        Some(RowReader {
            keys: schema.fields().iter().map(|f| PyString::intern(py, f.name()).unbind()).collect(),
            kinds,
            nullable: schema.fields().iter().map(|f| f.is_nullable()).collect(),
        })
    }

    /// The dict's values per column, or `None` when it is not a row of plain values that
    /// fit (an unknown key, a list, a datetime, a null in a NOT NULL column...).
    fn values<'py>(&self, dict: &Bound<'py, PyDict>) -> PyResult<Option<Vec<Option<Bound<'py, PyAny>>>>> {
        let py = dict.py();
        let mut values = Vec::with_capacity(self.keys.len());
        let mut found = 0;
        for (key, &nullable) in self.keys.iter().zip(&self.nullable) {
            let value = dict.get_item(key.bind(py))?;
            match &value {
                Some(_) => found += 1,
                None if !nullable => return Ok(None),
                None => {}
            }
            values.push(value);
        }
        Ok((found > 0 && found == dict.len()).then_some(values))
    }
}

impl Buffer {
    /// Appends one row if every value fits its column; false (nothing appended) if not.
    fn append(&mut self, row: &[Option<Bound<'_, PyAny>>], nullable: &[bool]) -> bool {
        let mut values = Vec::with_capacity(row.len());
        for ((value, kind), &nullable) in row.iter().zip(&self.kinds).zip(nullable) {
            let value = match value {
                Some(v) => match kind.read(v) {
                    Some(v) => v,
                    None => return false,
                },
                None => Value::Null,
            };
            if !nullable && matches!(value, Value::Null) {
                return false;
            }
            values.push(value);
        }
        for (builder, value) in self.columns.iter_mut().zip(&values) {
            builder.append(value);
        }
        self.rows += 1;
        self.born.get_or_insert_with(Instant::now);
        true
    }

    /// The buffered rows' builders, replaced by empty ones.
    fn take(&mut self) -> Option<(Vec<Builder>, usize, Instant)> {
        if self.rows == 0 {
            return None;
        }
        let fresh = self.kinds.iter().map(|k| k.builder(self.rows)).collect();
        let columns = std::mem::replace(&mut self.columns, fresh);
        let rows = std::mem::take(&mut self.rows);
        Some((columns, rows, self.born.take().unwrap_or_else(Instant::now)))
    }
}

impl Shared {
    fn take_token(&self) {
        while !self.try_token() {
            std::thread::yield_now();
        }
    }

    fn try_token(&self) -> bool {
        self.sending.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    fn release_token(&self) {
        self.sending.store(false, Ordering::Release);
    }

    /// With the token: takes the answers that have come; with `wait`, waits for the
    /// oldest insert while `IN_FLIGHT_MAX` are in flight. True when one more may be sent.
    fn room(&self, wait: bool) -> bool {
        loop {
            let mut flights = self.in_flight.lock();
            let Some(oldest) = flights.front() else { return true };
            let answered = self.handle.is_answered(&oldest.sent);
            if !answered && (flights.len() < IN_FLIGHT_MAX || !wait) {
                return flights.len() < IN_FLIGHT_MAX;
            }
            let oldest = flights.pop_front().expect("checked above");
            drop(flights);
            self.take_answer(oldest);
        }
    }

    /// Waits for an insert's answer: its rows counted, or its failure kept.
    fn take_answer(&self, InFlight { sent, rows }: InFlight) {
        match self.handle.finish(sent, true) {
            Some(Ok(stored)) => self.state.count_events(stored),
            Some(Err(e)) => self.fail(e, rows),
            None => {}
        }
        self.unsettled.fetch_sub(rows, Ordering::AcqRel);
    }

    /// With the token: waits until every insert in flight is answered.
    fn drain(&self) {
        while !self.in_flight.lock().is_empty() {
            self.room(true);
            let oldest = self.in_flight.lock().pop_front();
            if let Some(flight) = oldest {
                self.take_answer(flight);
            }
        }
    }

    /// With the token and room in flight: sends the buffered rows as one insert. False
    /// when there were none.
    fn send_buffered(&self) -> bool {
        let Some((columns, rows, born)) = self.buffer.lock().take() else { return false };
        let arrays: Vec<ArrayRef> = columns.into_iter().map(Builder::finish).collect();
        let sent = guarded(|| {
            let arrays = arrays
                .into_iter()
                .zip(self.schema.fields())
                .map(|(a, f)| if a.data_type() == f.data_type() { Ok(a) } else { arrow::compute::cast(&a, f.data_type()) })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::internal(format!("a buffered column did not take its type: {e}")))?;
            let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| Error::batch_mismatch(e.to_string()))?;
            let insert = self.handle.prepare(&self.source, &[batch])?;
            self.handle.send_insert(insert, born)
        });
        self.in_flight(sent, rows as u64);
        true
    }

    fn in_flight(&self, sent: laminardb_engine::Result<SentInsert>, rows: u64) {
        match sent {
            Ok(sent) => self.in_flight.lock().push_back(InFlight { sent, rows }),
            Err(e) => {
                self.fail(e, rows);
                self.unsettled.fetch_sub(rows, Ordering::AcqRel);
            }
        }
    }

    /// Sends everything buffered and waits until all of it is answered.
    fn flush(&self) {
        self.take_token();
        while {
            self.drain();
            self.send_buffered()
        } {}
        self.release_token();
    }

    /// Keeps the first failure of rows that were accepted, for the writer's next call.
    fn fail(&self, e: Error, rows: u64) {
        let mut failure = self.failure.lock();
        if failure.is_none() {
            let message = format!("{rows} row(s) this writer accepted for '{}' were not stored: {}", self.source, e.message);
            let mut e = e;
            e.message = message;
            *failure = Some(e);
            self.failed.store(true, Ordering::Release);
        }
    }

    fn take_failure(&self) -> Option<Error> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failed.store(false, Ordering::Release);
        self.failure.lock().take()
    }

    pub fn unsettled(&self) -> bool {
        self.unsettled.load(Ordering::Acquire) > 0
    }

    /// Everything accepted stored (the connection's calls wait for this).
    pub fn settle(&self) {
        if self.unsettled() {
            self.flush();
        }
    }
}

/// The flusher: sends what gathers while an insert is in flight, until the writer stops.
fn run_flusher(shared: Arc<Shared>) {
    loop {
        {
            let mut buffer = shared.buffer.lock();
            while buffer.rows == 0 && !buffer.stop {
                buffer.flusher_waiting = true;
                shared.wake.wait(&mut buffer);
            }
            buffer.flusher_waiting = false;
            if buffer.rows == 0 {
                return;
            }
        }
        shared.take_token();
        shared.room(true);
        shared.send_buffered();
        shared.release_token();
    }
}

impl PyWriter {
    pub fn new(py: Python<'_>, handle: Arc<Handle>, state: Arc<ConnState>, source: String, schema: SchemaRef, changes: bool) -> Self {
        let rows = if changes { None } else { RowReader::new(py, &schema) };
        let kinds = rows.as_ref().map(|r| r.kinds.clone()).unwrap_or_default();
        let shared = Arc::new(Shared {
            handle,
            state: state.clone(),
            source,
            schema,
            buffer: Mutex::new(Buffer {
                columns: kinds.iter().map(|k| k.builder(0)).collect(),
                kinds,
                rows: 0,
                born: None,
                flusher_waiting: false,
                stop: false,
            }),
            wake: Condvar::new(),
            sending: AtomicBool::new(false),
            in_flight: Mutex::new(std::collections::VecDeque::new()),
            unsettled: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        state.add_writer(Arc::downgrade(&shared));
        PyWriter { shared, rows, watermark: AtomicI64::new(NO_WATERMARK), closed: AtomicBool::new(false), flusher: Mutex::new(None) }
    }

    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(to_pyerr(Error::new(ErrorCode::WriterClosed, format!("the writer for '{}' is closed", self.shared.source))));
        }
        self.shared.handle.check_accepting().map_err(to_pyerr)?;
        self.raise_failure()
    }

    /// After a row was buffered: send it now if nothing is in flight, else leave it to the
    /// flusher (or, with the buffer full, wait until it can be sent).
    fn after_append(&self, py: Python<'_>, flusher_waiting: bool, full: bool) -> PyResult<()> {
        let shared = &*self.shared;
        // With the flusher asleep, handing the row over costs a thread's wake-up (tens of
        // µs on a VM); the insert in flight is often answered within a few µs (a feed at
        // rest: its last row is already through), so wait that long for it first.
        let flusher_idle = flusher_waiting || self.flusher.lock().is_none();
        if shared.try_token() {
            let room = shared.room(false) || (flusher_idle && poll_for(ANSWER_SPIN, || shared.room(false).then_some(())).is_some());
            if room {
                py.detach(|| shared.send_buffered());
                shared.release_token();
                return self.raise_failure();
            }
            shared.release_token();
        }
        if full {
            py.detach(|| {
                shared.take_token();
                shared.room(true);
                shared.send_buffered();
                shared.release_token();
            });
            return self.raise_failure();
        }
        self.start_flusher()?;
        if flusher_waiting {
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// A failure of rows this writer accepted (sent by this call or before it).
    fn raise_failure(&self) -> PyResult<()> {
        match self.shared.take_failure() {
            Some(e) => Err(to_pyerr(e)),
            None => Ok(()),
        }
    }

    fn start_flusher(&self) -> PyResult<()> {
        let mut flusher = self.flusher.lock();
        if flusher.is_none() {
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name("laminar-writer".into())
                .spawn(move || run_flusher(shared))
                .map_err(|e| to_pyerr(Error::internal(format!("cannot start the writer's flusher: {e}"))))?;
            *flusher = Some(thread);
        }
        Ok(())
    }

    /// Stops the flusher once it has sent what is buffered.
    fn stop_flusher(&self) {
        self.shared.buffer.lock().stop = true;
        self.shared.wake.notify_all();
    }

    fn flush_all(&self, py: Python<'_>) -> PyResult<u64> {
        let shared = &*self.shared;
        py.detach(|| shared.flush());
        self.raise_failure().map(|_| 0)
    }
}

impl Drop for PyWriter {
    fn drop(&mut self) {
        // What is buffered still goes: sent by the flusher, which then ends.
        if self.shared.buffer.lock().rows > 0 && self.flusher.lock().is_none() {
            let shared = self.shared.clone();
            let _ = std::thread::Builder::new().name("laminar-writer".into()).spawn(move || {
                shared.take_token();
                shared.room(true);
                shared.send_buffered();
                shared.release_token();
            });
        }
        self.stop_flusher();
    }
}

#[pymethods]
impl PyWriter {
    /// The source's name; `IngestionError` once the writer is closed.
    #[getter]
    fn name(&self) -> PyResult<String> {
        self.check_open()?;
        Ok(self.shared.source.clone())
    }

    /// The source's schema; `IngestionError` once the writer is closed.
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        PySchema::new(self.shared.schema.clone()).into_pyarrow(py)
    }

    /// Epoch milliseconds of the last watermark this writer emitted.
    #[getter]
    fn current_watermark(&self) -> i64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Inserts rows in any supported format; returns once they are queued (`flush()`
    /// waits until they are stored).
    fn insert(&self, py: Python<'_>, data: Bound<'_, PyAny>) -> PyResult<()> {
        self.check_open()?;
        if let (Some(reader), Ok(dict)) = (&self.rows, data.cast::<PyDict>()) {
            if let Some(row) = reader.values(dict)? {
                let appended = {
                    let mut buffer = self.shared.buffer.lock();
                    let appended = buffer.append(&row, &reader.nullable);
                    if appended {
                        self.shared.unsettled.fetch_add(1, Ordering::AcqRel);
                    }
                    appended.then_some((buffer.flusher_waiting, buffer.rows >= BUFFER_ROWS_MAX))
                };
                if let Some((flusher_waiting, full)) = appended {
                    return self.after_append(py, flusher_waiting, full);
                }
            }
        }
        // Anything else is converted and cast here, so its errors are this call's; then
        // it is sent behind the buffered rows.
        let batches = to_batches(py, &data, &self.shared.schema)?;
        let shared = &*self.shared;
        blocking(py, || {
            let insert = shared.handle.prepare(&shared.source, &batches)?;
            let rows = insert.rows() as u64;
            shared.unsettled.fetch_add(rows, Ordering::AcqRel);
            shared.take_token();
            shared.room(true);
            shared.send_buffered();
            shared.room(true);
            shared.in_flight(shared.handle.send_insert(insert, Instant::now()), rows);
            shared.release_token();
            Ok(())
        })?;
        self.raise_failure()
    }

    /// Waits until every row this writer accepted is stored and visible to queries and
    /// subscribers. Returns 0, as the specification has it (nothing stays buffered).
    fn flush(&self, py: Python<'_>) -> PyResult<u64> {
        self.check_open()?;
        self.flush_all(py)
    }

    /// Declares that no event older than `timestamp` (epoch ms) will follow; the rows
    /// accepted before it are sent first.
    fn watermark(&self, py: Python<'_>, timestamp: i64) -> PyResult<()> {
        self.check_open()?;
        let shared = &*self.shared;
        let mark = laminardb_engine::dataflow::Watermark::decode(timestamp);
        let merged = blocking(py, || {
            shared.take_token();
            shared.room(true);
            shared.send_buffered();
            shared.release_token();
            shared.handle.watermark(&shared.source, mark)
        })?;
        let merged = laminardb_engine::dataflow::Watermark::encode(merged);
        self.watermark.fetch_max(merged.max(timestamp), Ordering::AcqRel);
        Ok(())
    }

    /// Flushes, then closes the writer.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = if self.shared.handle.is_closed() { Ok(0) } else { self.flush_all(py) };
        self.stop_flusher();
        flushed.map(|_| ())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyResult<PyRef<'_, Self>> {
        slf.check_open()?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        if self.closed.load(Ordering::Acquire) {
            return "Writer(closed)".into();
        }
        format!("Writer(source='{}', open)", self.shared.source)
    }
}

/// The connection's writers, flushed before its own calls.
#[derive(Default)]
pub struct Writers(Mutex<Vec<Weak<Shared>>>);

impl Writers {
    pub fn add(&self, writer: Weak<Shared>) {
        let mut writers = self.0.lock();
        writers.retain(|w| w.strong_count() > 0);
        writers.push(writer);
    }

    /// Writers with rows not yet stored.
    pub fn unsettled(&self) -> Vec<Arc<Shared>> {
        self.0.lock().iter().filter_map(Weak::upgrade).filter(|w| w.unsettled()).collect()
    }
}
