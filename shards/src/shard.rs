//! One shard reactor: a glommio executor pinned to a core, owning its [`ShardRuntime`]:
//! one task for commands from the coordinator, one for messages from the other shards.

use std::sync::Arc;

use glommio::channels::shared_channel::{ConnectedReceiver, SharedReceiver};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;

use laminardb_engine::config::poll_for;
use laminardb_engine::dataflow::Watermark;
use laminardb_engine::wal::Record;

use crate::command::{Ack, AckToken, Exchange, ShardCommand, SpillRequest};
use crate::store::SpillPolicy;
use crate::health::{catch, Health};
use crate::runtime::{Outputs, ShardRuntime, SourceStep};
use crate::wal::{WalSpec, WalWriter};

/// io_uring registered-buffer memory per shard; the hard memlock limit here is 8 MiB for
/// every executor of the process, so stay small until the WAL needs more.
pub(crate) const SHARD_IO_MEMORY_BYTES: usize = 512 << 10;

pub(crate) struct ShardWiring {
    pub inbox: SharedReceiver<ShardCommand>,
    pub outputs: Outputs,
    /// Every shard's exchange inbox (this one's included), and this shard's own.
    pub exchange: Vec<flume::Sender<Exchange>>,
    pub exchange_inbox: flume::Receiver<Exchange>,
    /// This shard's WAL, when the database has a storage directory.
    pub wal: Option<WalSpec>,
    /// Where and when retained rows spill, and the thread that writes them.
    pub spill: Option<(SpillPolicy, flume::Sender<SpillRequest>)>,
}

/// Shard `id` on its own thread, pinned to `cpu` if given (`cores`: every CPU the
/// process may use, where it goes while `cpu` is busy with another thread).
pub(crate) fn spawn(
    id: usize,
    cpu: Option<usize>,
    cores: Vec<usize>,
    spin_us: u64,
    wiring: ShardWiring,
    health: Arc<Health>,
) -> glommio::Result<ExecutorJoinHandle<()>, ()> {
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let mut builder = LocalExecutorBuilder::new(placement)
        .name(&format!("laminar-shard-{id}"))
        .io_memory(SHARD_IO_MEMORY_BYTES)
        .stack_size(laminardb_engine::config::ENGINE_STACK_BYTES);
    if spin_us > 0 {
        builder = builder.spin_before_park(std::time::Duration::from_micros(spin_us));
    }
    builder
        .spawn(move || async move {
            let name = format!("shard {id}");
            if let Err(why) = run(id, cpu, cores, wiring, std::time::Duration::from_micros(spin_us)).await {
                health.thread_died(&name, why);
            }
        })
}

async fn run(id: usize, cpu: Option<usize>, cores: Vec<usize>, wiring: ShardWiring, spin: std::time::Duration) -> Result<(), String> {
    let ShardWiring { inbox, outputs, exchange, exchange_inbox, wal, spill } = wiring;
    let mut wal = wal.map(WalSpec::writer);
    let inbox = inbox.connect().await;
    let own_exchange = exchange[id].clone();
    let runtime = Rc::new(RefCell::new(ShardRuntime::new(id, outputs, exchange, spill)));
    let place = format!("shard {id}");
    // The command loop's end of the exchange inbox: it takes messages while polling, the
    // peers task while the loop waits.
    let exchange_waiting = exchange_inbox.clone();
    // Not detached: it must finish inside this executor at shutdown.
    let peers = glommio::spawn_local({
        let runtime = runtime.clone();
        let place = place.clone();
        async move {
            while let Ok(msg) = (SharedRecv { rx: &exchange_inbox, fut: None }).await {
                if matches!(msg, Exchange::Stop) {
                    break;
                }
                take_exchange(&runtime, &place, msg);
            }
        }
    });
    // Connector sources read on this shard, each with its stop flag.
    let mut sources: HashMap<Arc<str>, (Rc<Cell<bool>>, glommio::task::JoinHandle<()>)> = HashMap::new();
    // A command taken from the inbox while gathering a group commit, handled next.
    let mut held: Option<ShardCommand> = None;
    let mut affinity = Affinity::new(cpu, cores);
    let result = loop {
        let cmd = match held.take() {
            Some(cmd) => cmd,
            None => match poll_commands(&inbox, &exchange_waiting, spin, sources.is_empty()) {
                Some(Polled::Command(cmd)) => cmd,
                Some(Polled::Exchange(msg)) => {
                    let large = matches!(&msg, Exchange::Data { batch, .. } if batch.num_rows() > LARGE_ROWS);
                    take_exchange(&runtime, &place, msg);
                    if large {
                        futures_lite::future::yield_now().await;
                    }
                    continue;
                }
                None => {
                    affinity.check();
                    match inbox.recv().await {
                        Some(cmd) => cmd,
                        None => break Err("coordinator channel closed without Stop".to_string()),
                    }
                }
            },
        };
        let cmd = match (cmd, wal.as_mut()) {
            (first @ ShardCommand::Append { log: Some(_), .. }, Some(wal)) => {
                let (group, next) = gather_appends(first, &inbox).await;
                held = next;
                let group = log_appends(wal, group, &place).await;
                let mut rt = runtime.borrow_mut();
                for append in group {
                    apply_append(&mut rt, append, &place);
                }
                continue;
            }
            (cmd, _) => cmd,
        };
        let mut rt = runtime.borrow_mut();
        match cmd {
            append @ ShardCommand::Append { .. } => apply_append(&mut rt, append, &place),
            ShardCommand::Watermark { source, watermark, ack } => acked(&place, &ack, || {
                rt.watermark(&source, Watermark::new(watermark), &ack);
                Ok(())
            }),
            ShardCommand::Idle { source, idle, ack } => acked(&place, &ack, || {
                rt.set_idle(&source, idle, &ack);
                Ok(())
            }),
            ShardCommand::AddStream { plan, output, marks, reply } => {
                let _ = reply.send(catch(&place, || rt.add_stream(plan, output.clone(), &marks)));
            }
            ShardCommand::Backfill { stream, ack } => acked(&place, &ack, || rt.backfill(&stream, &ack)),
            ShardCommand::DropStream { name } => rt.drop_stream(&name),
            ShardCommand::Tick { stream } => {
                let _ = catch(&place, || {
                    rt.tick(&stream);
                    Ok(())
                });
            }
            ShardCommand::Scan { source, reply } => {
                let _ = reply.send(catch(&place, || rt.scan(&source)));
            }
            ShardCommand::Stats { source, reply } => {
                let _ = reply.send(Ok(rt.store().stats(&source)));
            }
            ShardCommand::Retain { source, policy } => rt.set_retention(&source, policy),
            ShardCommand::DropSource { source } => {
                if let Some((stop, _)) = sources.remove(&source) {
                    stop.set(true);
                }
                rt.drop_source(&source);
            }
            ShardCommand::StartSource { source, connector, delay_ms, time_column, idle_after, reply } => {
                if let Some((old, _)) = sources.remove(&source) {
                    old.set(true);
                }
                let ack = Ack::background();
                match catch(&place, || rt.open_source(&source, connector.clone(), delay_ms, time_column, idle_after, &ack)) {
                    Ok(SourceStep::Ended) => {
                        let _ = reply.send(Ok(()));
                    }
                    Ok(_) => {
                        let stop = Rc::new(Cell::new(false));
                        let task = SourceTask { source: source.clone(), stop: stop.clone() };
                        let task = glommio::spawn_local(task.run(runtime.clone(), place.clone())).detach();
                        sources.insert(source, (stop, task));
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        if let Some(output) = rt.output(&source) {
                            output.record_error(&format!("reading did not start on {place}: {e}"));
                        }
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ShardCommand::InjectPanic { reply } => {
                let _ = reply.send(catch(&place, || panic!("injected panic (test hook)")));
            }
            ShardCommand::Checkpoint { root, id, reply } => {
                rt.begin_checkpoint(root, id, reply);
                drop(rt);
                if let Some(wal) = wal.as_mut() {
                    wal.roll().await;
                }
                runtime.borrow_mut().checkpoint_rolled();
            }
            ShardCommand::Restore { root, files, reply } => {
                let _ = reply.send(catch(&place, || rt.restore(&root, &files)));
            }
            ShardCommand::ReplayChannel { ack } => acked(&place, &ack, || rt.replay_channel(&ack)),
            ShardCommand::Stop => break Ok(()),
        }
    };
    if let Some(wal) = wal {
        wal.close().await;
    }
    for (_, (stop, task)) in sources.drain() {
        stop.set(true);
        task.await;
    }
    let _ = own_exchange.send(Exchange::Stop);
    peers.await;
    let _ = catch(&place, || {
        runtime.borrow_mut().close_all();
        Ok(())
    });
    result
}

/// `rx.recv_async()` for a queue the command loop also takes from (`try_recv`), with a new
/// flume future on every poll. When the loop took the message whose send woke this task,
/// flume's own future finds the queue empty and only then puts its waker back (flume
/// 0.11, `RecvFut::poll_inner`): a message sent in between wakes nobody, and waits for
/// the next one. A new future looks at the queue and registers under one lock.
struct SharedRecv<'a, T> {
    rx: &'a flume::Receiver<T>,
    fut: Option<flume::r#async::RecvFut<'a, T>>,
}

impl<T> std::future::Future for SharedRecv<'_, T> {
    type Output = Result<T, flume::RecvError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let mut fresh = self.rx.recv_async();
        let polled = std::pin::Pin::new(&mut fresh).poll(cx);
        // Registered before the old future (and its waker) goes.
        self.fut = polled.is_pending().then_some(fresh);
        polled
    }
}

/// After an exchange batch of more rows than this, the command loop goes through the
/// reactor once before polling on. Without it the OHLC bulk insert (100,000-row batches)
/// was slower in 16 of 21 runs paired with the build before the loop took exchange
/// messages, by ~4 % at the median. Why was not found. The trip costs microseconds, nothing
/// beside such a batch's milliseconds. (It comes after the batch: a message held across
/// an await would let the peers task handle the sender's next message first.)
const LARGE_ROWS: usize = 1024;

/// Where a pinned shard runs: on its core while the core is its own; on any core while
/// another thread keeps it busy (`config::contended`: a polling pause of a whole
/// scheduler slice), since a pinned thread would wait out that thread's slices on every
/// hand-over; pinned again after a quiet while, which doubles each time the contention
/// comes back (a neighbour that stays costs one slow hand-over per period, at most).
struct Affinity {
    cpu: Option<usize>,
    /// Every CPU the process may use.
    all: Vec<usize>,
    pinned: bool,
    contended_at: std::time::Instant,
    quiet: std::time::Duration,
}

impl Affinity {
    const QUIET_FIRST: std::time::Duration = std::time::Duration::from_secs(10);
    const QUIET_MAX: std::time::Duration = std::time::Duration::from_secs(600);

    fn new(cpu: Option<usize>, all: Vec<usize>) -> Affinity {
        Affinity { cpu, all, pinned: cpu.is_some(), contended_at: std::time::Instant::now(), quiet: Self::QUIET_FIRST }
    }

    /// Called when the command loop is about to sleep.
    fn check(&mut self) {
        let Some(cpu) = self.cpu else { return };
        if laminardb_engine::config::contended() {
            self.contended_at = std::time::Instant::now();
            if self.pinned && set_affinity(&self.all) {
                self.pinned = false;
                log::debug!("shard on CPU {cpu}: the core is busy with another thread; unpinned");
            }
        } else if !self.pinned && self.contended_at.elapsed() >= self.quiet && set_affinity(&[cpu]) {
            self.pinned = true;
            self.quiet = (self.quiet * 2).min(Self::QUIET_MAX);
        }
    }
}

/// Lets the calling thread run on `cpus` only.
fn set_affinity(cpus: &[usize]) -> bool {
    if cpus.is_empty() {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// What the command loop found while polling.
enum Polled {
    Command(ShardCommand),
    /// A message from another shard (or the spill thread), handled by the loop itself like
    /// a command: the peers task would take it only after a trip through the reactor.
    /// Both take from the same queue on this one thread, so messages keep their order.
    Exchange(Exchange),
}

/// The next command or exchange message if one arrives within `spin`, polled by the
/// command loop itself: what is found here runs at once, without a trip through the
/// reactor (its I/O poll and preemption timer, then the task queue), which costs several
/// microseconds per message. Polls politely (`poll_for`), and not at all while source
/// tasks want this executor (`alone` false).
fn poll_commands(
    inbox: &ConnectedReceiver<ShardCommand>,
    exchange: &flume::Receiver<Exchange>,
    spin: std::time::Duration,
    alone: bool,
) -> Option<Polled> {
    if !alone {
        return None;
    }
    poll_for(spin, || match inbox.try_recv() {
        Some(cmd) => Some(Polled::Command(cmd)),
        // `Stop` is this shard's own, sent only after the loop has ended.
        None => exchange.try_recv().ok().map(Polled::Exchange),
    })
}

/// A message from another shard or the spill thread, taken by the peers task or the
/// command loop (panics caught: a failure is counted against its stream, not fatal).
fn take_exchange(runtime: &RefCell<ShardRuntime>, place: &str, msg: Exchange) {
    let _ = catch(place, || {
        runtime.borrow_mut().on_exchange(msg);
        Ok(())
    });
}

fn apply_append(rt: &mut ShardRuntime, append: ShardCommand, place: &str) {
    let ShardCommand::Append { source, batches, watermark, ack, .. } = append else { return };
    acked(place, &ack, || {
        rt.append(&source, batches, &ack)?;
        if let Some(mark) = watermark {
            rt.watermark(&source, Watermark::new(mark), &ack);
        }
        Ok(())
    });
}

/// Runs `work` (panics caught); a failure fails the work `ack` tracks, so its caller hears.
fn acked(place: &str, ack: &AckToken, work: impl FnOnce() -> laminardb_engine::Result<()>) {
    if let Err(e) = catch(place, work) {
        ack.fail(e);
    }
}

/// Group commit: `first` and every logged append already waiting behind it, up to a
/// bound; the command that ended the group (if any) comes back to be handled next.
async fn gather_appends(first: ShardCommand, inbox: &ConnectedReceiver<ShardCommand>) -> (Vec<ShardCommand>, Option<ShardCommand>) {
    const GROUP_MAX: usize = 256;
    let mut group = vec![first];
    while group.len() < GROUP_MAX {
        match futures_lite::future::poll_once(inbox.recv()).await {
            Some(Some(next @ ShardCommand::Append { log: Some(_), .. })) => group.push(next),
            Some(Some(other)) => return (group, Some(other)),
            Some(None) | None => break,
        }
    }
    (group, None)
}

/// Writes the group's rows to the WAL in one flush; returns the appends to apply. If the
/// write fails, every append of the group fails (its caller gets the error) and none is
/// applied: nothing is visible that is not durable.
async fn log_appends(wal: &mut WalWriter, group: Vec<ShardCommand>, place: &str) -> Vec<ShardCommand> {
    let mut records = Vec::with_capacity(group.len());
    for append in &group {
        let ShardCommand::Append { source, batches, log: Some((lsn, parts, claim)), .. } = append else { continue };
        if batches.is_empty() {
            continue;
        }
        records.push((Record::Append { lsn: *lsn, parts: *parts, source: source.to_string(), batches: batches.clone() }, *claim));
    }
    let claimed: Vec<(&Record, _)> = records.iter().map(|(r, c)| (r, *c)).collect();
    let written = wal.write(&claimed, place).await;
    match written {
        Ok(()) => group,
        Err(e) => {
            for append in &group {
                if let ShardCommand::Append { ack, .. } = append {
                    ack.fail(e.clone());
                }
            }
            Vec::new()
        }
    }
}

/// The reading of one connector source's splits on this shard: polls them between
/// commands (yielding after each round, sleeping while they have nothing) until they end,
/// the source is dropped or the shard stops.
struct SourceTask {
    source: Arc<str>,
    stop: Rc<Cell<bool>>,
}

impl SourceTask {
    async fn run(self, runtime: Rc<RefCell<ShardRuntime>>, place: String) {
        // glommio runs a spawned task at once, inside the command loop that spawned it
        // (which holds the runtime): give it back first.
        futures_lite::future::yield_now().await;
        // Nobody waits on a connector's rows; each round's token still times its emissions.
        let unwaited = Arc::new(AtomicUsize::new(0));
        while !self.stop.get() {
            let ack = Ack::born_at(Some(std::time::Instant::now()), &unwaited, |_| {});
            let step = catch(&place, || runtime.borrow_mut().poll_source(&self.source, &ack));
            drop(ack);
            match step {
                Ok(SourceStep::Busy) => futures_lite::future::yield_now().await,
                Ok(SourceStep::Wait(after)) => glommio::timer::sleep(after).await,
                Ok(SourceStep::Ended) => return,
                Err(e) => {
                    // Counted in the source's metrics (errors, last_error) and logged.
                    if let Some(output) = runtime.borrow().output(&self.source) {
                        output.record_error(&format!("reading stopped on {place}: {e}"));
                    }
                    return;
                }
            }
        }
    }
}
