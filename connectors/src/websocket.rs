//! The `websocket` source: each text or binary message as one record, decoded by `format`
//! ([`crate::decode`]: json, csv, raw, debezium).
//!
//! ```sql
//! CREATE SOURCE quotes (symbol VARCHAR, bid DOUBLE, ask DOUBLE, ts BIGINT) WITH (
//!     connector = 'websocket', url = 'ws://feed.example:8080/quotes', format = 'json',
//!     auth = 'Bearer ${FEED_TOKEN}', 'subscribe.message' = '{"op": "subscribe"}')
//! CREATE SOURCE telemetry (device VARCHAR, temp DOUBLE) WITH (
//!     connector = 'websocket', mode = 'server', bind_address = '127.0.0.1:9090')
//! ```
//!
//! `mode = 'client'` (the default) connects to `url` (`ws://`, or `wss://` over TLS: the
//! server's certificate is checked against the system's certificate authorities and those
//! in `ssl.ca.location`, a PEM file), sends `subscribe.message` if given,
//! and reads; a lost connection is said (the source's errors) and made again after
//! `reconnect.initial_delay_ms`, doubling up to `reconnect.max_delay_ms`, at most
//! `reconnect.max_retries` times in a row (0: for ever; then the source stops with an
//! error). It pings every `ping_interval_ms`. `mode = 'server'` listens on `bind_address`
//! and reads every client that connects (with `auth`, only those whose `Authorization`
//! header is that value).
//!
//! The connection runs on the connectors' runtime ([`crate::runtime`]); messages cross to
//! the reading shard through a bounded queue (`queue.capacity` messages), and a full queue
//! stops the reading, so TCP holds the sender back: nothing is dropped. A WebSocket cannot
//! replay: the source is one split whose position is empty, and what was received after the
//! last checkpoint is gone if the process dies.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio::net::TcpStream;

use laminardb_engine::source::{Backlog, ConnectorOptions, SourceConnector, SplitPoll, SplitReader};
use laminardb_engine::{Error, Result};

use crate::dead_letter::{DeadLetterConfig, DeadLetters};
use crate::decode::{PayloadDecoder, PayloadFormat};

const OPTIONS: &[&str] = &[
    "url",
    "mode",
    "bind_address",
    "format",
    "auth",
    "ssl.ca.location",
    "subscribe.message",
    "reconnect.initial_delay_ms",
    "reconnect.max_delay_ms",
    "reconnect.max_retries",
    "ping_interval_ms",
    "queue.capacity",
    "max.poll.records",
    "dead_letter.path",
];

/// How long a source without messages waits before it is polled again: briefly while
/// messages keep coming (a feed's next tick is soon: each wait is latency), longer once
/// it has been quiet for `QUIET_AFTER`.
const BUSY_POLL: Duration = Duration::from_micros(50);
const IDLE_POLL: Duration = Duration::from_millis(1);
const QUIET_AFTER: Duration = Duration::from_millis(100);

/// Where the source's messages come from (or the sink's go).
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    Client { url: String, dial: Dial },
    Server { bind: String },
}

/// How a client connects: the handshake request (with `auth`'s header), and for a
/// `wss://` url the TLS connector, which trusts the system's certificate authorities and
/// those in `ssl.ca.location` (a PEM file).
#[derive(Clone)]
pub(crate) struct Dial {
    request: Request,
    tls: Option<Connector>,
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dial").field("uri", self.request.uri()).field("tls", &self.tls.is_some()).finish()
    }
}

impl Dial {
    fn new(url: &str, auth: Option<&str>, ca: Option<&str>) -> Result<Dial> {
        let mut request = url.into_client_request().map_err(|e| Error::connector(format!("websocket: url '{url}': {e}")))?;
        if let Some(auth) = auth {
            let value = HeaderValue::from_str(auth).map_err(|_| Error::connector("websocket: 'auth' is not a valid header value"))?;
            request.headers_mut().insert("authorization", value);
        }
        let tls = match (url.starts_with("wss://"), ca) {
            (false, None) => None,
            (false, Some(_)) => return Err(Error::connector("websocket: 'ssl.ca.location' is for wss:// urls")),
            (true, ca) => {
                let connector = crate::tls::connector(ca, "ssl.ca.location").map_err(|e| Error::connector(format!("websocket: {}", e.message)))?;
                Some(Connector::NativeTls(connector))
            }
        };
        Ok(Dial { request, tls })
    }

    /// Opens the connection and makes the WebSocket handshake.
    pub(crate) async fn connect(&self) -> std::result::Result<WebSocketStream<MaybeTlsStream<TcpStream>>, String> {
        match tokio_tungstenite::connect_async_tls_with_config(self.request.clone(), None, false, self.tls.clone()).await {
            Ok((ws, _)) => Ok(ws),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Client or server, from `mode`, `url` and `bind_address` (each checked against the
/// other): shared by the source and the sink, whose default mode differs.
pub(crate) fn mode(options: &ConnectorOptions, default_server: bool) -> Result<Mode> {
    let server = match options.get("mode").map(str::to_ascii_lowercase).as_deref() {
        None => default_server,
        Some("client") => false,
        Some("server") => true,
        Some(other) => return Err(Error::connector(format!("websocket: mode '{other}' is not one of client, server"))),
    };
    if server {
        if options.get("url").is_some() {
            return Err(Error::connector("websocket: 'url' is for mode = 'client'; a server takes 'bind_address'"));
        }
        if options.get("ssl.ca.location").is_some() {
            return Err(Error::connector("websocket: 'ssl.ca.location' is for mode = 'client' (a server takes plain ws://)"));
        }
        let bind = options.required("bind_address")?.to_string();
        bind.parse::<std::net::SocketAddr>()
            .map_err(|_| Error::connector(format!("websocket: bind_address '{bind}' is not host:port (e.g. 127.0.0.1:9090)")))?;
        Ok(Mode::Server { bind })
    } else {
        if options.get("bind_address").is_some() {
            return Err(Error::connector("websocket: 'bind_address' is for mode = 'server'; a client takes 'url'"));
        }
        let url = options.required("url")?.to_string();
        if !url.starts_with("ws://") && !url.starts_with("wss://") {
            return Err(Error::connector(format!("websocket: url '{url}' does not start with ws:// or wss://")));
        }
        let dial = Dial::new(&url, options.get("auth"), options.get("ssl.ca.location"))?;
        Ok(Mode::Client { url, dial })
    }
}

/// Reconnection after a lost connection: doubling delays, at most `retries` in a row.
/// Each connection loop keeps its own copy, which counts the failures since the last
/// connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// 0: no limit.
    retries: u32,
    failures: u32,
}

impl Backoff {
    pub(crate) fn from_options(options: &ConnectorOptions) -> Result<Backoff> {
        let initial = options.parse::<u64>("reconnect.initial_delay_ms", 1000)?;
        let max = options.parse::<u64>("reconnect.max_delay_ms", 30_000)?.max(initial);
        Ok(Backoff {
            initial: Duration::from_millis(initial),
            max: Duration::from_millis(max),
            retries: options.parse::<u32>("reconnect.max_retries", 0)?,
            failures: 0,
        })
    }

    /// A connection was made: the next failure is the first again.
    pub(crate) fn connected(&mut self) {
        self.failures = 0;
    }

    /// A connection was lost or could not be made: how long to wait before the next
    /// attempt, or `Err` with the attempts made when the retries are spent.
    pub(crate) fn failed(&mut self) -> std::result::Result<Duration, u32> {
        self.failures += 1;
        if self.gives_up(self.failures) {
            return Err(self.failures - 1);
        }
        Ok(self.delay(self.failures))
    }

    /// The delay before attempt `failures` (1 after the first failure).
    fn delay(&self, failures: u32) -> Duration {
        let doubled = self.initial.saturating_mul(1u32.checked_shl(failures.saturating_sub(1).min(20)).unwrap_or(u32::MAX));
        doubled.min(self.max)
    }

    fn gives_up(&self, failures: u32) -> bool {
        self.retries > 0 && failures > self.retries
    }
}

/// The handshake check of a server with `auth`: the client's `Authorization` header, or
/// its `token` query parameter, must match.
pub(crate) fn authorize(auth: Option<&str>, request: &Request) -> std::result::Result<(), ErrorResponse> {
    let Some(auth) = auth else { return Ok(()) };
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let bare = auth.strip_prefix("Bearer ").unwrap_or(auth);
    let token = request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    if header == Some(auth) || header == Some(bare) || token == Some(bare) {
        return Ok(());
    }
    let mut refusal = ErrorResponse::new(Some("a valid Authorization header is required".into()));
    *refusal.status_mut() = StatusCode::UNAUTHORIZED;
    Err(refusal)
}

/// What the connection task hands the reader.
enum Item {
    Payload(Vec<u8>),
    /// Said, counted; reading goes on.
    Problem(String),
    /// The source cannot go on (reconnection gave up, the address is taken).
    Fatal(String),
}

#[derive(Debug)]
pub struct WebSocketSource {
    schema: SchemaRef,
    format: PayloadFormat,
    mode: Mode,
    auth: Option<String>,
    subscribe: Option<String>,
    backoff: Backoff,
    ping: Duration,
    capacity: usize,
    max_poll: usize,
    dead_letters: DeadLetterConfig,
}

impl WebSocketSource {
    /// The connector of a `CREATE SOURCE … WITH (connector = 'websocket', …)`: options are
    /// checked here; nothing connects or listens before `start()`.
    pub fn create(options: &ConnectorOptions, declared: Option<&SchemaRef>) -> Result<Arc<dyn SourceConnector>> {
        options.check_known(OPTIONS)?;
        let schema = declared
            .cloned()
            .ok_or_else(|| Error::connector("websocket: declare the source's columns (CREATE SOURCE name (col TYPE, …) WITH (…))"))?;
        let format = PayloadFormat::parse(options.get("format").unwrap_or("json"))?;
        let schema = format.source_schema(&schema)?;
        PayloadDecoder::new(format, schema.clone())?;
        let mode = mode(options, false)?;
        let auth = options.get("auth").map(str::to_string);
        let subscribe = options.get("subscribe.message").map(str::to_string);
        if subscribe.is_some() && matches!(mode, Mode::Server { .. }) {
            return Err(Error::connector("websocket: 'subscribe.message' is for mode = 'client'"));
        }
        Ok(Arc::new(WebSocketSource {
            schema,
            format,
            mode,
            auth,
            subscribe,
            backoff: Backoff::from_options(options)?,
            ping: Duration::from_millis(options.parse::<u64>("ping_interval_ms", 30_000)?.max(1)),
            capacity: options.parse::<usize>("queue.capacity", 65_536)?.max(1),
            max_poll: options.parse::<usize>("max.poll.records", 8192)?.max(1),
            dead_letters: DeadLetterConfig::from_options(options, None)?,
        }))
    }
}

impl SourceConnector for WebSocketSource {
    fn name(&self) -> &'static str {
        "websocket"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn changelog(&self) -> bool {
        self.format.changelog()
    }

    fn splits(&self, _shards: usize) -> Result<usize> {
        Ok(1)
    }

    fn open(&self, _split: usize, _splits: usize, _position: Option<&[u8]>) -> Result<Box<dyn SplitReader>> {
        let (tx, rx) = mpsc::channel(self.capacity);
        let origin = match &self.mode {
            Mode::Client { url, .. } => format!("websocket {url}"),
            Mode::Server { bind } => format!("websocket server {bind}"),
        };
        let dead = self.dead_letters.open(&origin)?;
        let runtime = crate::runtime()?;
        let task = match &self.mode {
            Mode::Client { url, dial } => {
                runtime.spawn(run_client(dial.clone(), url.clone(), self.subscribe.clone(), self.backoff, self.ping, tx))
            }
            Mode::Server { bind } => {
                // Bound now, so an address in use fails `start()` at once.
                let listener = runtime
                    .block_on(tokio::net::TcpListener::bind(bind))
                    .map_err(|e| Error::connector(format!("websocket: listening on {bind}: {e}")))?;
                runtime.spawn(run_server(listener, self.auth.clone(), tx))
            }
        };
        Ok(Box::new(WebSocketSplit { rx, task, decoder: PayloadDecoder::new(self.format, self.schema.clone())?, max_poll: self.max_poll, problems: VecDeque::new(), dead, received: 0, last_message: std::time::Instant::now() }))
    }
}

/// Connects, reads, and connects again after a loss, until the reader is gone.
async fn run_client(dial: Dial, url: String, subscribe: Option<String>, mut backoff: Backoff, ping: Duration, tx: mpsc::Sender<Item>) {
    loop {
        let lost = match dial.connect().await {
            Ok(ws) => {
                backoff.connected();
                let (mut write, mut read) = ws.split();
                let mut lost = None;
                if let Some(message) = &subscribe {
                    if let Err(e) = write.send(Message::text(message.clone())).await {
                        lost = Some(format!("sending the subscribe message: {e}"));
                    }
                }
                let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
                while lost.is_none() {
                    tokio::select! {
                        message = read.next() => match message {
                            Some(Ok(Message::Text(text))) => {
                                if tx.send(Item::Payload(text.as_bytes().to_vec())).await.is_err() {
                                    return; // the reader is gone
                                }
                            }
                            Some(Ok(Message::Binary(bytes))) => {
                                if tx.send(Item::Payload(bytes.to_vec())).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(Message::Close(frame))) => lost = Some(format!("closed by the server ({frame:?})")),
                            Some(Ok(_)) => {} // ping, pong: answered by tungstenite
                            Some(Err(e)) => lost = Some(e.to_string()),
                            None => lost = Some("the connection ended".into()),
                        },
                        _ = ticks.tick() => {
                            if let Err(e) = write.send(Message::Ping(Vec::new().into())).await {
                                lost = Some(format!("ping: {e}"));
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
                lost.unwrap_or_default()
            }
            Err(e) => e,
        };
        let delay = match backoff.failed() {
            Ok(delay) => delay,
            Err(attempts) => {
                let _ = tx.send(Item::Fatal(format!("websocket {url}: {lost}; gave up after {attempts} reconnection attempts"))).await;
                return;
            }
        };
        if tx.send(Item::Problem(format!("websocket {url}: {lost}; connecting again in {} ms", delay.as_millis()))).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Accepts clients and reads each, until the reader is gone.
async fn run_server(listener: tokio::net::TcpListener, auth: Option<String>, tx: mpsc::Sender<Item>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tx.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                let _ = tx.send(Item::Problem(format!("websocket server: accepting: {e}"))).await;
                continue;
            }
        };
        let tx = tx.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            let check = |request: &Request, response: Response| authorize(auth.as_deref(), request).map(|()| response);
            let mut ws = match tokio_tungstenite::accept_hdr_async(stream, check).await {
                Ok(ws) => ws,
                Err(e) => {
                    let _ = tx.send(Item::Problem(format!("websocket server: client {peer} refused: {e}"))).await;
                    return;
                }
            };
            loop {
                let message = tokio::select! {
                    message = ws.next() => message,
                    _ = tx.closed() => return,
                };
                let payload = match message {
                    Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                    Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = tx.send(Item::Problem(format!("websocket server: client {peer}: {e}"))).await;
                        return;
                    }
                };
                if tx.send(Item::Payload(payload)).await.is_err() {
                    return;
                }
            }
        });
    }
}

struct WebSocketSplit {
    rx: mpsc::Receiver<Item>,
    task: tokio::task::JoinHandle<()>,
    decoder: PayloadDecoder,
    max_poll: usize,
    /// Messages that did not decode or connection problems, told one per poll.
    problems: VecDeque<String>,
    dead: DeadLetters,
    /// Messages received so far (a rejected one is named by its number).
    received: u64,
    last_message: std::time::Instant,
}

impl SplitReader for WebSocketSplit {
    fn poll(&mut self) -> Result<SplitPoll> {
        if let Some(what) = self.problems.pop_front() {
            return Ok(SplitPoll::Skipped(what));
        }
        while self.decoder.len() < self.max_poll {
            match self.rx.try_recv() {
                Ok(Item::Payload(payload)) => {
                    self.decoder.push(&payload);
                    self.last_message = std::time::Instant::now();
                }
                Ok(Item::Problem(what)) => {
                    self.problems.push_back(what);
                    break;
                }
                Ok(Item::Fatal(what)) => return Err(Error::connector(what)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(Error::connector("websocket: the connection task ended"));
                }
            }
        }
        let first = self.received;
        self.received += self.decoder.len() as u64;
        let (batch, rejected) = self.decoder.finish()?;
        for r in rejected {
            let origin = format!("message {}", first + r.index as u64);
            self.problems.push_back(format!("{origin} did not decode: {}", r.error));
            if let Err(e) = self.dead.send(&origin, &r.error, &r.payload) {
                self.problems.push_back(e.message);
            }
        }
        match batch {
            Some(batch) => Ok(SplitPoll::Rows(batch)),
            None => match self.problems.pop_front() {
                Some(what) => Ok(SplitPoll::Skipped(what)),
                None if self.last_message.elapsed() < QUIET_AFTER => Ok(SplitPoll::Pending(BUSY_POLL)),
                None => Ok(SplitPoll::Pending(IDLE_POLL)),
            },
        }
    }

    fn position(&self) -> Vec<u8> {
        Vec::new()
    }

    fn backlog(&self) -> Option<Backlog> {
        Some(Backlog { pending: self.rx.len() as u64, capacity: self.rx.max_capacity() as u64 })
    }

    fn close(&mut self) -> Result<()> {
        self.task.abort();
        self.rx.close();
        self.dead.flush()
    }
}

impl Drop for WebSocketSplit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn options(pairs: &[(&str, &str)]) -> ConnectorOptions {
        let raw: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ConnectorOptions::new("websocket", &raw).unwrap()
    }

    #[test]
    fn modes_and_their_options_are_checked() {
        assert!(matches!(mode(&options(&[("url", "ws://127.0.0.1:1/x")]), false).unwrap(), Mode::Client { .. }));
        assert!(matches!(mode(&options(&[("bind_address", "127.0.0.1:0")]), true).unwrap(), Mode::Server { .. }));
        let e = |pairs: &[(&str, &str)], server: bool| mode(&options(pairs), server).unwrap_err().message;
        assert!(e(&[], false).contains("'url'"));
        assert!(e(&[("mode", "server")], false).contains("'bind_address'"));
        assert!(matches!(mode(&options(&[("url", "wss://x/y")]), false).unwrap(), Mode::Client { dial: Dial { tls: Some(_), .. }, .. }));
        assert!(e(&[("url", "http://x/y")], false).contains("ws://"));
        assert!(e(&[("url", "ws://x/y"), ("ssl.ca.location", "/x.pem")], false).contains("for wss://"));
        assert!(e(&[("url", "wss://x/y"), ("ssl.ca.location", "/nonexistent.pem")], false).contains("reading ssl.ca.location"));
        assert!(e(&[("bind_address", "127.0.0.1:0"), ("ssl.ca.location", "/x.pem")], true).contains("mode = 'client'"));
        assert!(e(&[("mode", "server"), ("bind_address", "nowhere")], false).contains("host:port"));
        assert!(e(&[("mode", "sideways")], false).contains("'sideways'"));
    }

    #[test]
    fn backoff_doubles_up_to_its_limit_and_gives_up_after_its_retries() {
        let b = Backoff::from_options(&options(&[("reconnect.initial_delay_ms", "100"), ("reconnect.max_delay_ms", "350"), ("reconnect.max_retries", "3")])).unwrap();
        let delays: Vec<u128> = (1..=4).map(|f| b.delay(f).as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        assert!(!b.gives_up(3) && b.gives_up(4));
        assert!(!Backoff::from_options(&options(&[])).unwrap().gives_up(1_000_000));
        let mut looping = b;
        assert_eq!((looping.failed(), looping.failed()), (Ok(Duration::from_millis(100)), Ok(Duration::from_millis(200))));
        looping.connected();
        let spent: Vec<_> = (0..4).map(|_| looping.failed().map(|d| d.as_millis())).collect();
        assert_eq!(spent, [Ok(100), Ok(200), Ok(350), Err(3)]);
    }

    #[test]
    fn a_server_with_auth_lets_only_the_token_in() {
        let request = |header: Option<&str>, uri: &str| {
            let mut r = Request::builder().uri(uri);
            if let Some(h) = header {
                r = r.header("authorization", h);
            }
            r.body(()).unwrap()
        };
        assert!(authorize(None, &request(None, "/")).is_ok());
        let auth = Some("Bearer s3cret");
        assert!(authorize(auth, &request(Some("Bearer s3cret"), "/")).is_ok());
        assert!(authorize(auth, &request(None, "/feed?token=s3cret")).is_ok());
        let refused = authorize(auth, &request(Some("Bearer guess"), "/")).unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(authorize(auth, &request(None, "/")).is_err());
    }
}
