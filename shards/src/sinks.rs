//! Running sinks: one thread per sink, reading its input's output through a subscription
//! and writing every batch to the connector. Rows written are counted on the sink's own
//! `Output` (which has no subscribers); a failed write is counted and logged there.

use std::sync::Arc;
use std::thread::JoinHandle;

use laminardb_engine::catalog::SinkDef;
use laminardb_engine::sink;
use laminardb_engine::stream::output::{Output, Subscription, SUBSCRIBER_BATCHES_MAX, SUBSCRIBER_BYTES_MAX};
use laminardb_engine::{Error, ErrorCode, Result};

pub(crate) struct SinkRunner {
    subscription: Subscription,
    thread: Option<JoinHandle<()>>,
}

impl SinkRunner {
    pub fn start(def: &SinkDef, input: &Arc<Output>, counters: Arc<Output>) -> Result<SinkRunner> {
        let mut connector = sink::open(&def.connector, &def.options)?;
        let subscription = input.subscribe(SUBSCRIBER_BATCHES_MAX, SUBSCRIBER_BYTES_MAX);
        let batches = subscription.batches.clone();
        let thread = std::thread::Builder::new()
            .name(format!("laminar-sink-{}", def.name))
            .spawn(move || {
                for batch in batches.iter() {
                    match connector.write(&batch) {
                        Ok(()) => counters.publish(&batch),
                        Err(e) => counters.record_error(&e.to_string()),
                    }
                }
                if let Err(e) = connector.flush() {
                    counters.record_error(&e.to_string());
                }
            })
            .map_err(|e| Error::new(ErrorCode::Internal, format!("cannot start sink thread: {e}")))?;
        Ok(SinkRunner { subscription, thread: Some(thread) })
    }

    /// Stops reading, lets the thread write what is queued, and joins it.
    pub fn stop(mut self) {
        self.subscription.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
