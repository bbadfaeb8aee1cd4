//! Subscriptions: the receiving end of a source's or stream's output queue.
//!
//! `StreamSubscription` follows a named stream; `Subscription` follows the rows of any
//! `SELECT`, run as a hidden stream that lives as long as the subscription. Every
//! blocking wait releases the GIL and wakes regularly to let Ctrl-C through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parking_lot::Mutex;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3_arrow::PySchema;

use std::sync::atomic::AtomicBool;

use laminardb_engine::frontend::CancelFlag;
use laminardb_engine::stream::output::Subscription;
use laminardb_engine::{Error, ErrorCode};

use crate::errors::to_pyerr;
use crate::result::PyQueryResult;

/// How often a blocking wait comes up for air (signals, cancellation).
const POLL: Duration = Duration::from_millis(50);

#[derive(Copy, Clone, PartialEq, Eq)]
enum State {
    Active,
    Finished,
    Cancelled,
}

/// What both subscription classes share.
pub struct SubCore {
    sub: Subscription,
    schema: SchemaRef,
    state: Mutex<State>,
    /// Set by `Connection.cancel_query(id)`: the next read raises QUERY_CANCELLED (402).
    cancel: CancelFlag,
    /// The `queries()` entry's active flag, cleared when the subscription ends.
    listed: Option<Arc<AtomicBool>>,
    /// Runs once when the subscription ends (drops a hidden stream).
    on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Identifies this subscription to the asyncio waiter thread.
    wait_id: u64,
}

enum Wait {
    Batch(RecordBatch),
    Ended,
    TimedOut,
}

impl SubCore {
    pub fn new(sub: Subscription, on_end: Option<Box<dyn FnOnce() + Send>>) -> Self {
        let schema = sub.output.schema.clone();
        SubCore {
            sub,
            schema,
            state: Mutex::new(State::Active),
            cancel: CancelFlag::default(),
            listed: None,
            on_end: Mutex::new(on_end),
            wait_id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        }
    }

    /// Lists the subscription in `queries()`: `cancel` is what `cancel_query` sets.
    pub fn listed(mut self, cancel: CancelFlag, active: Arc<AtomicBool>) -> Self {
        self.cancel = cancel;
        self.listed = Some(active);
        self
    }

    /// Raises QUERY_CANCELLED once if `cancel_query` cancelled this subscription.
    fn check_cancelled(&self) -> PyResult<()> {
        if self.cancel.is_cancelled() && *self.state.lock() == State::Active {
            self.end(State::Cancelled);
            return Err(to_pyerr(Error::new(ErrorCode::QueryCancelled, "the subscription was cancelled (cancel_query)")));
        }
        Ok(())
    }

    fn end(&self, state: State) {
        let mut current = self.state.lock();
        if *current == State::Active {
            *current = state;
        }
        drop(current);
        if let Some(active) = &self.listed {
            active.store(false, std::sync::atomic::Ordering::Release);
        }
        if state == State::Cancelled {
            self.sub.cancel();
        }
        if let Some(f) = self.on_end.lock().take() {
            f();
        }
    }

    fn result(&self, batch: RecordBatch) -> PyQueryResult {
        PyQueryResult::new(vec![batch], self.schema.clone())
    }

    fn is_active(&self) -> bool {
        *self.state.lock() == State::Active && !self.cancel.is_cancelled()
    }

    fn try_next(&self) -> PyResult<Option<PyQueryResult>> {
        self.check_cancelled()?;
        if *self.state.lock() == State::Cancelled {
            return Ok(None);
        }
        Ok(match self.sub.batches.try_recv() {
            Ok(b) => Some(self.result(b)),
            Err(flume::TryRecvError::Disconnected) => {
                self.end(State::Finished);
                None
            }
            Err(flume::TryRecvError::Empty) => None,
        })
    }

    /// Waits for a batch until `deadline` (forever if `None`), GIL released.
    fn wait(&self, py: Python<'_>, deadline: Option<Instant>) -> PyResult<Wait> {
        loop {
            self.check_cancelled()?;
            if *self.state.lock() == State::Cancelled {
                return Ok(Wait::Ended);
            }
            // A batch already waiting is taken without giving up the GIL.
            if let Ok(b) = self.sub.batches.try_recv() {
                return Ok(Wait::Batch(b));
            }
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(POLL),
                None => POLL,
            };
            let rx = self.sub.batches.clone();
            match py.detach(move || rx.recv_timeout(slice)) {
                Ok(b) => return Ok(Wait::Batch(b)),
                Err(flume::RecvTimeoutError::Disconnected) => {
                    self.end(State::Finished);
                    return Ok(Wait::Ended);
                }
                Err(flume::RecvTimeoutError::Timeout) => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Wait::TimedOut);
                    }
                }
            }
        }
    }

    fn next(&self, py: Python<'_>) -> PyResult<Option<PyQueryResult>> {
        Ok(match self.wait(py, None)? {
            Wait::Batch(b) => Some(self.result(b)),
            _ => None,
        })
    }

    fn next_timeout(&self, py: Python<'_>, timeout: Duration) -> PyResult<Option<PyQueryResult>> {
        match self.wait(py, Some(Instant::now() + timeout))? {
            Wait::Batch(b) => Ok(Some(self.result(b))),
            Wait::Ended => Ok(None),
            Wait::TimedOut => Err(to_pyerr(Error::new(
                ErrorCode::SubscriptionTimeout,
                format!("no data within {} ms", timeout.as_millis()),
            ))),
        }
    }

    /// Waits up to `timeout_ms`; `None` on timeout or end (for the asyncio and callback
    /// helpers, which check `is_active` to tell them apart).
    fn poll(&self, py: Python<'_>, timeout_ms: u64) -> PyResult<Option<PyQueryResult>> {
        Ok(match self.wait(py, Some(Instant::now() + Duration::from_millis(timeout_ms)))? {
            Wait::Batch(b) => Some(self.result(b)),
            _ => None,
        })
    }

    fn iter_next(&self, py: Python<'_>) -> PyResult<PyQueryResult> {
        self.next(py)?.ok_or_else(|| PyStopIteration::new_err(()))
    }

    fn repr(&self, class: &str) -> String {
        let state = match *self.state.lock() {
            State::Active if self.cancel.is_cancelled() => "cancelled",
            State::Active => "active",
            State::Finished => "finished",
            State::Cancelled => "cancelled",
        };
        format!("{class}({state})")
    }

    fn lagged_batches(&self) -> u64 {
        self.sub.lag.batches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls `wake()` (from the waiter thread, with the GIL) once this subscription has a
    /// batch, has ended, or was cancelled by `cancel_query`; at once if it already has. No
    /// thread waits on the queue meanwhile: the engine's notifier tells the waiter.
    fn wait_async(&self, wake: Py<PyAny>) {
        let waiter = waiter::get();
        waiter.register(self.wait_id, wake, self.cancel.clone());
        self.sub.notify_when_ready(waiter.notifier(self.wait_id));
    }
}

/// The one thread that wakes every asyncio subscription: an armed subscription's
/// notifier sends its id here (cheap, from the publishing shard), and this thread calls
/// the registered `wake()`, which hands the event loop a `call_soon_threadsafe`. So async
/// waiting holds no thread of the application's executor, however many subscriptions
/// wait. A `cancel_query` flag has no notifier: registrations listed in `queries()` are
/// looked at every 50 ms.
mod waiter {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use laminardb_engine::frontend::CancelFlag;
    use parking_lot::Mutex;
    use pyo3::prelude::*;

    use super::POLL;

    enum Msg {
        Register(u64, Py<PyAny>, CancelFlag),
        Ready(u64),
        Stop,
    }

    pub struct Waiter {
        /// The running thread's queue; `None` until first used and after `stop`.
        tx: Mutex<Option<(flume::Sender<Msg>, std::thread::JoinHandle<()>)>>,
    }

    pub fn get() -> &'static Waiter {
        static WAITER: OnceLock<Waiter> = OnceLock::new();
        WAITER.get_or_init(|| Waiter { tx: Mutex::new(None) })
    }

    impl Waiter {
        fn sender(&self) -> Option<flume::Sender<Msg>> {
            let mut tx = self.tx.lock();
            if tx.is_none() {
                let (send, recv) = flume::unbounded();
                let thread = std::thread::Builder::new().name("laminardb-async".into()).spawn(move || run(recv)).ok()?;
                *tx = Some((send, thread));
            }
            tx.as_ref().map(|(s, _)| s.clone())
        }

        pub fn register(&self, id: u64, wake: Py<PyAny>, cancel: CancelFlag) {
            if let Some(tx) = self.sender() {
                let _ = tx.send(Msg::Register(id, wake, cancel));
            }
        }

        /// The callback a subscription's notifier runs: never blocks (unbounded queue).
        pub fn notifier(&self, id: u64) -> Box<dyn FnOnce() + Send> {
            let tx = self.sender();
            Box::new(move || {
                if let Some(tx) = tx {
                    let _ = tx.send(Msg::Ready(id));
                }
            })
        }

        /// Stops the thread (at interpreter exit, before finalization); pending
        /// registrations are dropped. A later registration starts it again.
        pub fn stop(&self) {
            let running = self.tx.lock().take();
            if let Some((tx, thread)) = running {
                let _ = tx.send(Msg::Stop);
                drop(tx);
                let _ = thread.join();
            }
        }
    }

    fn run(queue: flume::Receiver<Msg>) {
        let mut waiting: HashMap<u64, (Py<PyAny>, CancelFlag)> = HashMap::new();
        loop {
            let msg = if waiting.is_empty() {
                queue.recv().ok()
            } else {
                match queue.recv_timeout(POLL) {
                    Ok(msg) => Some(msg),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut ready = Vec::new();
            match msg {
                Some(Msg::Register(id, wake, cancel)) => {
                    // Replaces an earlier registration of the same subscription (that
                    // waiter was given up: its future cancelled or timed out).
                    waiting.insert(id, (wake, cancel));
                }
                Some(Msg::Ready(id)) => ready.extend(waiting.remove(&id)),
                Some(Msg::Stop) => return,
                None if waiting.is_empty() => return,
                None => {}
            }
            let cancelled: Vec<u64> = waiting.iter().filter(|(_, (_, c))| c.is_cancelled()).map(|(id, _)| *id).collect();
            ready.extend(cancelled.into_iter().filter_map(|id| waiting.remove(&id)));
            if ready.is_empty() {
                continue;
            }
            // A closed event loop raises from call_soon_threadsafe: nobody waits any more.
            let _ = Python::try_attach(|py| {
                for (wake, _) in ready.drain(..) {
                    let _ = wake.call0(py);
                }
            });
        }
    }
}

/// Stops the asyncio waiter thread (called at interpreter exit).
#[pyfunction]
pub fn _stop_async_waiter(py: Python<'_>) {
    py.detach(|| waiter::get().stop());
}

impl Drop for SubCore {
    fn drop(&mut self) {
        self.sub.cancel();
        if let Some(f) = self.on_end.get_mut().take() {
            f();
        }
    }
}

/// The methods both subscription classes share, plus each class's own `$extra` methods
/// (one `#[pymethods]` block per class, as PyO3 requires).
macro_rules! subscription_class {
    ($ty:ident, $class:literal, { $($extra:tt)* }) => {
        #[pymethods]
        impl $ty {
            #[getter]
            fn is_active(&self) -> bool {
                self.core.is_active()
            }

            /// The rows' schema; `SubscriptionError` once the subscription is cancelled.
            #[getter]
            fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                if *self.core.state.lock() == State::Cancelled {
                    return Err(to_pyerr(Error::new(ErrorCode::SubscriptionClosed, "the subscription is cancelled")));
                }
                PySchema::new(self.core.schema.clone()).into_pyarrow(py)
            }

            /// Batches this subscriber lost because it read too slowly (its queue was full).
            #[getter]
            fn lagged_batches(&self) -> u64 {
                self.core.lagged_batches()
            }

            /// Blocks until the next batch; `None` once the subscription has ended.
            fn next(&self, py: Python<'_>) -> PyResult<Option<PyQueryResult>> {
                self.core.next(py)
            }

            fn try_next(&self) -> PyResult<Option<PyQueryResult>> {
                self.core.try_next()
            }

            fn _poll(&self, py: Python<'_>, timeout_ms: u64) -> PyResult<Option<PyQueryResult>> {
                self.core.poll(py, timeout_ms)
            }

            fn cancel(&self) {
                self.core.end(State::Cancelled);
            }

            /// For the asyncio helpers: `wake()` is called once this subscription has a
            /// batch or has ended (see `SubCore::wait_async`).
            fn _wait_async(&self, wake: Py<PyAny>) {
                self.core.wait_async(wake);
            }

            fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
                slf
            }

            fn __next__(&self, py: Python<'_>) -> PyResult<PyQueryResult> {
                self.core.iter_next(py)
            }

            fn __repr__(&self) -> String {
                self.core.repr($class)
            }

            $($extra)*
        }
    };
}

/// Follows a named stream (or source).
#[pyclass(name = "StreamSubscription", module = "laminardb", frozen)]
pub struct PyStreamSubscription {
    core: Arc<SubCore>,
    name: String,
}

impl PyStreamSubscription {
    pub fn new(core: SubCore, name: String) -> Self {
        PyStreamSubscription { core: Arc::new(core), name }
    }
}

subscription_class!(PyStreamSubscription, "StreamSubscription", {
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `timeout_ms`; raises SubscriptionError (502) if nothing arrived.
    fn next_timeout(&self, py: Python<'_>, timeout_ms: u64) -> PyResult<Option<PyQueryResult>> {
        self.core.next_timeout(py, Duration::from_millis(timeout_ms))
    }
});

/// Follows the rows of a `SELECT`, continuously.
#[pyclass(name = "Subscription", module = "laminardb", frozen)]
pub struct PySubscription {
    core: Arc<SubCore>,
}

impl PySubscription {
    pub fn new(core: SubCore) -> Self {
        PySubscription { core: Arc::new(core) }
    }
}

subscription_class!(PySubscription, "Subscription", {
    /// Waits up to `timeout` seconds; raises SubscriptionError (502) if nothing arrived.
    fn next_timeout(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<PyQueryResult>> {
        self.core.next_timeout(py, Duration::from_secs_f64(timeout.max(0.0)))
    }
});
