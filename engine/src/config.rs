//! Engine configuration, as `LaminarConfig` exposes it to Python plus the shard count.

use std::sync::Arc;

/// The stack of every engine thread that plans or evaluates SQL (coordinator, shards, the
/// query pool). Planning and expression evaluation recurse over the statement's tree,
/// whose depth `laminardb_planner::limits` bounds; a debug build needs ~8 KiB per level,
/// so this leaves a wide margin at that bound. Only the touched part is ever backed by
/// memory.
pub const ENGINE_STACK_BYTES: usize = 64 << 20;

/// One day: any real feed's clock skew, far below a unit mistake's jump.
pub const DEFAULT_MAX_EVENT_AHEAD_MS: u64 = 86_400_000;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Number of shard reactors; one per available core by default.
    pub shards: usize,
    /// Capacity, in messages, of every bounded queue (Python → coordinator, coordinator → shard).
    pub buffer_size: usize,
    pub storage_dir: Option<String>,
    pub checkpoint_interval_ms: Option<u64>,
    pub table_spill_threshold: usize,
    /// Pin shard `i` to core `i % cores` (`LAMINARDB_PIN_SHARDS=0`: never). A pinned
    /// shard that finds its core busy with another thread (a contended pause in its
    /// polling, see `poll_for`) unpins itself, since it would otherwise wait out that
    /// thread's scheduler slices (ms) on every hand-over, and pins itself again after a
    /// quiet while (`shard::Affinity`; perf/README.md, "A busy neighbour").
    pub pin_shards: bool,
    /// How long an idle shard or the coordinator polls its queue before sleeping, in µs:
    /// trades CPU for wake-up latency. `LAMINARDB_SPIN_US` overrides the default.
    pub spin_us: u64,
    /// How long the coordinator polls its queue after a command before sleeping, in µs
    /// (`LAMINARDB_COORD_SPIN_US`).
    pub coord_spin_us: u64,
    /// How long a caller waiting for a reply polls before sleeping, in µs
    /// (`LAMINARDB_CALLER_SPIN_US`; the GIL is released meanwhile).
    pub caller_spin_us: u64,
    /// A source with no rows and no watermark call for this long stops holding back
    /// `pipeline_watermark` (while another source is active).
    pub idle_timeout_ms: u64,
    /// With a storage directory: an insert is acknowledged after `fdatasync` of its WAL
    /// write (survives power loss). Off: after the direct write alone (survives the
    /// process being killed, not the machine losing power), several times faster.
    pub wal_fsync: bool,
    /// A row whose event time is more than this far ahead of the wall clock does not move
    /// its source's watermark (it is kept, and counted); `None`: no bound. One row with a
    /// microsecond timestamp in a millisecond column would otherwise move the watermark
    /// ~50,000 years ahead and make every later row late.
    pub max_event_ahead_ms: Option<u64>,
    /// What opening does when the storage directory holds damage, not just a torn tail.
    pub recovery: Recovery,
    /// The storage directory is a temporary one (checkpoints configured on an in-memory
    /// database): deleted when the database closes.
    pub ephemeral_storage: bool,
    /// Bytes a subscriber's queue may hold before its oldest batches are dropped (and
    /// counted as lagged), besides the bound in batches.
    pub subscriber_queue_bytes: u64,
    /// Python functions known before the database opens (those a database with storage
    /// imports again, `functions`), so recovery can plan the streams calling them.
    pub functions: Arc<crate::functions::Functions>,
}

/// How opening treats a damaged storage directory (`LaminarConfig(recovery=…)`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recovery {
    /// Refuse to open (`CheckpointError` naming the file); nothing on disk changes.
    #[default]
    Strict,
    /// Cut the log at the damage, keep everything before it, report what was lost.
    Truncate,
}

impl EngineConfig {
    /// Messages per queue: large inserts travel as one message per shard, so a short
    /// queue is enough to keep shards busy without buffering unbounded memory.
    pub const QUEUE_MESSAGES_MAX: usize = 1024;

    pub fn queue_capacity(&self) -> usize {
        self.buffer_size.clamp(16, Self::QUEUE_MESSAGES_MAX)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: default_shards(),
            buffer_size: 65536,
            storage_dir: None,
            checkpoint_interval_ms: None,
            table_spill_threshold: 1_000_000,
            // perf/neighbour.py measures both with busy neighbours on the host.
            pin_shards: env_us("LAMINARDB_PIN_SHARDS").is_none_or(|v| v != 0),
            spin_us: default_spin_us(),
            coord_spin_us: env_us("LAMINARDB_COORD_SPIN_US").unwrap_or(SPIN_AFTER_COMMAND_US),
            caller_spin_us: env_us("LAMINARDB_CALLER_SPIN_US").unwrap_or(SPIN_AFTER_COMMAND_US),
            idle_timeout_ms: 10_000,
            wal_fsync: true,
            max_event_ahead_ms: Some(DEFAULT_MAX_EVENT_AHEAD_MS),
            recovery: Recovery::Strict,
            ephemeral_storage: false,
            subscriber_queue_bytes: crate::stream::output::SUBSCRIBER_BYTES_MAX,
            functions: Arc::default(),
        }
    }
}

/// The coordinator, a waiting caller and an idle shard poll this long (politely:
/// `poll_for`) before sleeping, for at most this much CPU per command. Long enough to cover the work a caller
/// does between two inserts (the harness converts each received batch with pyarrow): a
/// thread that fell asleep in between costs the next round trip a wake-up of tens of µs.
/// 200 µs instead of 100 (and 50 for shards) cut the harness's round trip p90 from 90–177
/// to 26–43 µs on session 8's machine (figures in perf/README.md).
pub const SPIN_AFTER_COMMAND_US: u64 = 200;

/// One iteration of a polling wait (a caller waiting for its reply, the coordinator for
/// its next command): gives the core to any other runnable thread first. With more
/// threads than cores (caller, coordinator and shards on 2 cores) a plain busy loop holds
/// the core the awaited thread needs; yielding keeps the core awake (waking an idle vCPU
/// is what costs tens of microseconds) without taking it from anyone.
fn spin_pause() {
    std::thread::yield_now();
}

/// A pause of the polling loop at least this long means another runnable thread had this
/// core for a whole scheduler slice: a busy neighbour (the application's own threads or
/// another program). Far above what the rest of this process's threads take between their
/// yields (microseconds) and above the hypervisor's usual stalls (tens of microseconds).
pub const CONTENDED_PAUSE: std::time::Duration = std::time::Duration::from_micros(1000);

/// After a contended pause, a thread does not poll for this long: it sleeps at once, so
/// that its wake-up gets the priority the scheduler gives a sleeper over a thread that
/// kept running, instead of waiting out the neighbour's slice on every yield.
pub const CONTENDED_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

thread_local! {
    /// Until when this thread sleeps instead of polling (`poll_for`).
    static CONTENDED_UNTIL: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Whether this thread lost its core to another runnable thread for a scheduler slice
/// within the last `CONTENDED_BACKOFF` (while polling).
pub fn contended() -> bool {
    CONTENDED_UNTIL.get().is_some_and(|until| std::time::Instant::now() < until)
}

/// Polls `attempt` for up to `spin`, pausing politely (`spin_pause`) between attempts:
/// its first `Some`, or `None` once `spin` has passed. The one polling loop of the
/// engine: callers waiting for a reply, the coordinator for a command, a shard for a
/// command. Under contention (a pause of `CONTENDED_PAUSE` or more) it gives up at once
/// and the thread makes one attempt only, for `CONTENDED_BACKOFF`, before it sleeps.
pub fn poll_for<T>(spin: std::time::Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    if spin.is_zero() {
        return None;
    }
    let start = std::time::Instant::now();
    if CONTENDED_UNTIL.get().is_some_and(|until| start < until) {
        return attempt();
    }
    let mut before = start;
    loop {
        if let Some(found) = attempt() {
            return Some(found);
        }
        let now = std::time::Instant::now();
        if now - before >= CONTENDED_PAUSE {
            CONTENDED_UNTIL.set(Some(now + CONTENDED_BACKOFF));
            return None;
        }
        if now - start >= spin {
            return None;
        }
        spin_pause();
        before = now;
    }
}

fn env_us(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// How long an idle shard polls before sleeping: 200 µs unless `LAMINARDB_SPIN_US` says
/// otherwise. Shards poll politely (the reactor yields the core between polls, see
/// `spin_pause`), so this costs no other thread its CPU time.
pub fn default_spin_us() -> u64 {
    env_us("LAMINARDB_SPIN_US").unwrap_or(SHARD_SPIN_US)
}

pub const SHARD_SPIN_US: u64 = SPIN_AFTER_COMMAND_US;

pub fn default_shards() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1)
}
