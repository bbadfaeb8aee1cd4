//! The `websocket` sink: each row of a stream as one text message (`format` json, the
//! default, or csv).
//!
//! ```sql
//! CREATE SINK bars_ws FROM bars WITH (connector = 'websocket', bind_address = '127.0.0.1:8765',
//!     slow_client_policy = 'disconnect', replay_buffer_size = '100', auth = '${WS_TOKEN}')
//! CREATE SINK bars_up FROM bars WITH (connector = 'websocket', mode = 'client',
//!     url = 'ws://collector:9000/bars')
//! ```
//!
//! `mode = 'server'` (the default) listens on `bind_address` and sends every row to every
//! client connected. Each client has its own queue of `client.buffer` messages (1,024); a
//! client whose queue is full is a slow client: with `slow_client_policy = 'drop'` (the
//! default) the messages it has no room for are not sent to it (the others get them), with
//! `'disconnect'` it is disconnected. Memory stays bounded either way and a slow client
//! never holds the stream back. A new client first gets the last `replay_buffer_size`
//! messages (0). With `auth`, a client must send that `Authorization` header (or the token
//! as `?token=`), else its handshake is refused with 401.
//!
//! `mode = 'client'` connects to `url` (`ws://`, or `wss://` over TLS trusting the
//! system's certificate authorities and those in `ssl.ca.location`; with `auth` as its
//! `Authorization` header) and sends every row; a lost connection is made again with the `reconnect.*` backoff of the
//! source, the rows waiting meanwhile in a queue of `client.buffer` messages; a full queue
//! holds the stream back (nothing is dropped).
//!
//! All shards of a sink share its one server or connection (another sink cannot listen on
//! the same address: its CREATE fails). There is no acknowledgement:
//! a row is delivered at most once to each client, and rows sent after the last checkpoint
//! are sent again after a crash.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arrow::array::RecordBatch;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use laminardb_engine::sink::{OptionsChecked, Sink, SinkContext};
use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

use crate::encode::RowEncoding;
use crate::websocket::{authorize, mode, Backoff, Dial, Mode};

const OPTIONS: &[&str] = &[
    "mode",
    "bind_address",
    "url",
    "format",
    "auth",
    "ssl.ca.location",
    "slow_client_policy",
    "replay_buffer_size",
    "client.buffer",
    "reconnect.initial_delay_ms",
    "reconnect.max_delay_ms",
    "reconnect.max_retries",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlowClients {
    Drop,
    Disconnect,
}

/// What the sink's shards share: one server or one connection, by address.
static HUBS: Mutex<BTreeMap<String, Weak<Hub>>> = parking_lot::const_mutex(BTreeMap::new());

enum Hub {
    /// The accept loop holds the server's state; dropping the hub (its last sink
    /// instance) stops the loop and with it every client's writer.
    Server { state: Arc<Server>, task: tokio::task::JoinHandle<()> },
    /// The writer sends what is queued, then ends once every sender is gone.
    Client { tx: mpsc::Sender<Message>, task: tokio::task::JoinHandle<()> },
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Hub::Server { task, .. } = self {
            task.abort();
        }
    }
}

struct Server {
    clients: Mutex<Clients>,
    policy: SlowClients,
    buffer: usize,
    replay: usize,
}

#[derive(Default)]
struct Clients {
    next_id: u64,
    queues: Vec<(u64, mpsc::Sender<Message>)>,
    /// The last `replay` messages, oldest first.
    recent: VecDeque<Message>,
}

impl Server {
    /// Every client gets `messages`, room permitting.
    fn broadcast(&self, messages: &[Message]) {
        let mut clients = self.clients.lock();
        let mut gone = Vec::new();
        for (id, queue) in &clients.queues {
            for message in messages {
                match queue.try_send(message.clone()) {
                    Ok(()) => {}
                    // `drop`: this client does not get the message; the others do.
                    Err(mpsc::error::TrySendError::Full(_)) if self.policy == SlowClients::Drop => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        log::warn!("websocket sink: client {id} is too slow (its {} queued messages are unread): disconnected", self.buffer);
                        gone.push(*id);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        gone.push(*id);
                        break;
                    }
                }
            }
        }
        // Dropping a queue's sender ends its writer, which closes the connection.
        clients.queues.retain(|(id, _)| !gone.contains(id));
        if self.replay > 0 {
            for message in messages.iter().rev().take(self.replay).rev() {
                if clients.recent.len() == self.replay {
                    clients.recent.pop_front();
                }
                clients.recent.push_back(message.clone());
            }
        }
    }

    /// A new client's queue, holding the replayed messages first.
    fn join(&self) -> mpsc::Receiver<Message> {
        let mut clients = self.clients.lock();
        let (tx, rx) = mpsc::channel(self.buffer.max(self.replay).max(1));
        for message in &clients.recent {
            let _ = tx.try_send(message.clone());
        }
        clients.next_id += 1;
        let id = clients.next_id;
        clients.queues.push((id, tx));
        rx
    }
}

pub struct WebSocketSink {
    hub: Arc<Hub>,
    encoding: RowEncoding,
    /// Payload bytes of the messages written.
    bytes: u64,
}

impl WebSocketSink {
    /// One shard's instance of a `CREATE SINK … WITH (connector = 'websocket', …)`; the
    /// shards of one sink share its server or connection. At `CREATE` (no shard) only the
    /// options are checked.
    pub fn create(options: &ConnectorOptions, context: &SinkContext) -> Result<Box<dyn Sink>> {
        options.check_known(OPTIONS)?;
        let encoding = RowEncoding::parse(options.get("format"), "websocket")?;
        let mode = mode(options, true)?;
        let auth = options.get("auth").map(str::to_string);
        let policy = match options.get("slow_client_policy").unwrap_or("drop").to_ascii_lowercase().as_str() {
            "drop" => SlowClients::Drop,
            "disconnect" => SlowClients::Disconnect,
            other => return Err(Error::connector(format!("websocket sink: slow_client_policy '{other}' is not one of drop, disconnect"))),
        };
        let buffer = options.parse::<usize>("client.buffer", 1024)?.max(1);
        let replay = options.parse::<usize>("replay_buffer_size", 0)?;
        let backoff = Backoff::from_options(options)?;
        let key = match &mode {
            Mode::Server { bind } => format!("server {bind} {}", context.name),
            Mode::Client { url, .. } => format!("client {url} {}", context.name),
        };
        if matches!(mode, Mode::Client { .. }) && (options.get("slow_client_policy").is_some() || replay > 0) {
            return Err(Error::connector("websocket sink: slow_client_policy and replay_buffer_size are for mode = 'server'"));
        }
        if context.task.is_none() {
            return Ok(Box::new(OptionsChecked));
        }
        let mut hubs = HUBS.lock();
        let hub = match hubs.get(&key).and_then(Weak::upgrade) {
            Some(hub) => hub,
            None => {
                let runtime = crate::runtime()?;
                let hub = Arc::new(match &mode {
                    Mode::Server { bind } => {
                        let listener = runtime
                            .block_on(tokio::net::TcpListener::bind(bind))
                            .map_err(|e| Error::connector(format!("websocket sink: listening on {bind}: {e}")))?;
                        let state = Arc::new(Server {
                            clients: Mutex::new(Clients::default()),
                            policy,
                            buffer,
                            replay,
                        });
                        Hub::Server { state: state.clone(), task: runtime.spawn(accept_clients(listener, auth, state)) }
                    }
                    Mode::Client { url, dial } => {
                        let (tx, rx) = mpsc::channel(buffer);
                        Hub::Client { tx, task: runtime.spawn(run_client(dial.clone(), url.clone(), backoff, rx)) }
                    }
                });
                hubs.insert(key, Arc::downgrade(&hub));
                hub
            }
        };
        Ok(Box::new(WebSocketSink { hub, encoding, bytes: 0 }))
    }
}

/// Accepts clients; each gets a writer task sending its queue.
async fn accept_clients(listener: tokio::net::TcpListener, auth: Option<String>, server: Arc<Server>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("websocket sink: accepting a client: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let auth = auth.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let check = |request: &Request, response: Response| authorize(auth.as_deref(), request).map(|()| response);
            let ws = match tokio_tungstenite::accept_hdr_async(stream, check).await {
                Ok(ws) => ws,
                Err(e) => {
                    log::warn!("websocket sink: client {peer} refused: {e}");
                    return;
                }
            };
            let mut queue = server.join();
            drop(server);
            let (mut write, mut read) = ws.split();
            loop {
                tokio::select! {
                    message = queue.recv() => match message {
                        Some(message) => {
                            if write.send(message).await.is_err() {
                                return;
                            }
                        }
                        None => {
                            // Disconnected as too slow, or the sink is gone.
                            let _ = write.send(Message::Close(None)).await;
                            return;
                        }
                    },
                    incoming = read.next() => match incoming {
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                        Some(Ok(_)) => {}
                    },
                }
            }
        });
    }
}

/// Sends `rx`'s messages to `url`, connecting again after a loss (the message in hand is
/// sent first on the new connection).
async fn run_client(dial: Dial, url: String, mut backoff: Backoff, mut rx: mpsc::Receiver<Message>) {
    let mut pending: Option<Message> = None;
    loop {
        let lost = match dial.connect().await {
            Ok(ws) => {
                backoff.connected();
                let (mut write, mut read) = ws.split();
                // Replies (pongs, a close) are read and dropped.
                let reader = tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
                let lost = loop {
                    let message = match pending.take() {
                        Some(m) => m,
                        None => match rx.recv().await {
                            Some(m) => m,
                            None => {
                                let _ = write.send(Message::Close(None)).await;
                                reader.abort();
                                return; // every sink instance is gone, everything sent
                            }
                        },
                    };
                    if let Err(e) = write.send(message.clone()).await {
                        pending = Some(message);
                        break e.to_string();
                    }
                };
                reader.abort();
                lost
            }
            Err(e) => e,
        };
        let delay = match backoff.failed() {
            Ok(delay) => delay,
            Err(attempts) => {
                log::error!("websocket sink {url}: {lost}; gave up after {attempts} reconnection attempts (rows are no longer sent)");
                return;
            }
        };
        log::warn!("websocket sink {url}: {lost}; connecting again in {} ms", delay.as_millis());
        tokio::time::sleep(delay).await;
    }
}

impl Sink for WebSocketSink {
    fn bytes_out(&self) -> u64 {
        self.bytes
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let payloads = self.encoding.encode(batch)?;
        // Each message once, however many clients it goes to.
        self.bytes += payloads.iter().map(|p| p.len() as u64).sum::<u64>();
        let messages: Vec<Message> = payloads
            .into_iter()
            .map(|payload| Message::text(String::from_utf8(payload).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())))
            .collect();
        match &*self.hub {
            Hub::Server { state, .. } => state.broadcast(&messages),
            Hub::Client { tx, task } => {
                for message in messages {
                    // Backpressure: the shard waits for room (the shard's thread is not
                    // the runtime's, so it may block).
                    if task.is_finished() || tx.blocking_send(message).is_err() {
                        return Err(Error::connector("websocket sink: the connection gave up reconnecting; rows are not sent"));
                    }
                }
            }
        }
        Ok(())
    }
}

