//! Avro in the Confluent Schema Registry wire format: each message is a `0x00` byte, the
//! writer schema's registry id (4 bytes, big-endian) and the Avro body. Sources look the
//! writer schema up by id (`GET /schemas/ids/{id}`, once per id and source) and decode
//! straight into Arrow with `arrow-avro`; columns are matched to the declared ones by name
//! (a field the source does not declare is left out, a declared column the schema lacks is
//! null) and cast as an insert is. Sinks derive a schema from the rows, register it under
//! `<topic>-value` (`POST /subjects/{subject}/versions`) and frame each row with its id.
//!
//! The registry is spoken to over HTTP/1.1 (`schema.registry.url = 'http://…'`), or over
//! TLS (`https://…`, the server checked against the system's certificate authorities and
//! those in `schema.registry.ssl.ca.location`), with HTTP basic authentication when
//! `schema.registry.basic.auth.user.info` is `user:password`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, FingerprintStrategy, SchemaStore};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder, WriterBuilder};
use parking_lot::Mutex;
use serde_json::Value;

use laminardb_engine::ingest::cast_to_schema;
use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

use crate::decode::Rejected;

/// How long a registry request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A Confluent-compatible schema registry, with the schemas it has told, by id.
pub struct Registry {
    /// `host:port`.
    authority: String,
    /// The host, which a TLS server's certificate must name.
    host: String,
    /// For an `https://` registry.
    tls: Option<native_tls::TlsConnector>,
    /// The `Authorization` header's value (basic authentication).
    authorization: Option<String>,
    /// The path prefix (`http://host:port/prefix`), without a trailing slash.
    prefix: String,
    schemas: Mutex<HashMap<u32, AvroSchema>>,
}

impl Registry {
    /// The registry `schema.registry.url` names (its absence is an error naming the
    /// statement's connector).
    pub fn from_options(options: &ConnectorOptions) -> Result<Arc<Registry>> {
        let url = options.get("schema.registry.url").ok_or_else(|| {
            Error::connector(format!("{}: format 'avro' needs the option 'schema.registry.url'", options.connector()))
        })?;
        let mut registry = Registry::new(url, options.get("schema.registry.ssl.ca.location"))?;
        if let Some(user_info) = options.get("schema.registry.basic.auth.user.info") {
            if !user_info.contains(':') {
                return Err(Error::connector("schema.registry.basic.auth.user.info is 'user:password'"));
            }
            registry.authorization = Some(format!("Basic {}", crate::encode::base64(user_info.as_bytes())));
        }
        Ok(Arc::new(registry))
    }

    /// The registry at `url`; `ca`: a PEM file of certificate authorities to trust besides
    /// the system's (for `https://`).
    pub fn new(url: &str, ca: Option<&str>) -> Result<Registry> {
        let (rest, secure) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(Error::connector(format!("schema.registry.url '{url}' does not start with http:// or https://"))),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(Error::connector(format!("schema.registry.url '{url}' names no host")));
        }
        let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host).trim_matches(['[', ']']).to_string();
        let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:{}", if secure { 443 } else { 80 }) };
        let tls = match (secure, ca) {
            (false, Some(_)) => return Err(Error::connector("schema.registry.ssl.ca.location is for an https:// registry")),
            (false, None) => None,
            (true, ca) => Some(crate::tls::connector(ca, "schema.registry.ssl.ca.location")?),
        };
        let prefix = format!("/{}", path.trim_matches('/'));
        Ok(Registry {
            authority,
            host,
            tls,
            authorization: None,
            prefix: prefix.trim_end_matches('/').to_string(),
            schemas: Mutex::new(HashMap::new()),
        })
    }

    /// Fails unless the registry answers (`GET /subjects`): a source or sink that could
    /// never read a schema fails its start, not each message.
    pub fn check(&self) -> Result<()> {
        self.request("GET", "/subjects", None).map(|_| ())
    }

    /// The writer schema registered under `id`.
    pub fn schema(&self, id: u32) -> Result<AvroSchema> {
        if let Some(schema) = self.schemas.lock().get(&id) {
            return Ok(schema.clone());
        }
        let body = self.request("GET", &format!("/schemas/ids/{id}"), None)?;
        let kind = body.get("schemaType").and_then(Value::as_str).unwrap_or("AVRO");
        if kind != "AVRO" {
            return Err(Error::connector(format!("schema id {id} is a {kind} schema, not Avro")));
        }
        let text = body
            .get("schema")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::connector(format!("the registry's answer for schema id {id} has no 'schema'")))?;
        let schema = AvroSchema::new(text.to_string());
        self.schemas.lock().insert(id, schema.clone());
        Ok(schema)
    }

    /// Registers `schema` under `subject` (or finds it there) and returns its id.
    pub fn register(&self, subject: &str, schema: &AvroSchema) -> Result<u32> {
        let body = serde_json::json!({ "schema": schema.json_string }).to_string();
        let answer = self.request("POST", &format!("/subjects/{subject}/versions"), Some(&body))?;
        let id = answer
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::connector(format!("the registry gave no schema id for subject '{subject}': {answer}")))?;
        self.schemas.lock().insert(id, schema.clone());
        Ok(id)
    }

    /// One request; the answer's JSON body, or an error naming the registry's status.
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value> {
        let target = format!("{}{path}", self.prefix);
        let fail = |what: String| Error::connector(format!("schema registry {}{target}: {what}", self.authority));
        let address = self
            .authority
            .to_socket_addrs()
            .map_err(|e| fail(e.to_string()))?
            .next()
            .ok_or_else(|| fail("no address".into()))?;
        let body = body.unwrap_or("");
        let authorization = self.authorization.as_ref().map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAccept: application/vnd.schemaregistry.v1+json, application/json\r\n\
             {authorization}Content-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            body.len()
        );
        let exchange = || -> std::io::Result<Vec<u8>> {
            let stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.set_write_timeout(Some(TIMEOUT))?;
            let mut stream: Box<dyn ReadWrite> = match &self.tls {
                None => Box::new(stream),
                Some(tls) => Box::new(tls.connect(&self.host, stream).map_err(|e| {
                    let kind = match &e {
                        native_tls::HandshakeError::Failure(e) if interrupted(e) => std::io::ErrorKind::Interrupted,
                        _ => std::io::ErrorKind::Other,
                    };
                    std::io::Error::new(kind, format!("TLS: {e}"))
                })?),
            };
            stream.write_all(request.as_bytes())?;
            let mut answer = Vec::new();
            match stream.read_to_end(&mut answer) {
                // A TLS server may close without a close_notify once it has answered.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => Ok(answer),
                other => other.map(|_| answer),
            }
        };
        // A signal that comes during a blocking call interrupts it, and the TLS handshake
        // does not go on after that: the request is made again (each one the registry
        // gets is a lookup or a registration, the same answer twice).
        let mut attempts = 0;
        let answer = loop {
            attempts += 1;
            match exchange() {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && attempts < ATTEMPTS => continue,
                other => break other.map_err(|e| fail(e.to_string()))?,
            }
        };
        let (status, content) = parse_response(&answer).map_err(fail)?;
        let json: Value = serde_json::from_slice(&content).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&content).into()));
        if !(200..300).contains(&status) {
            let message = json.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| json.to_string());
            return Err(fail(format!("HTTP {status}: {message}")));
        }
        Ok(json)
    }
}

/// How many times a request interrupted by a signal is made in all.
const ATTEMPTS: u32 = 3;

/// `e` or an error it wraps is an interrupted system call.
fn interrupted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::Interrupted) {
            return true;
        }
        next = e.source();
    }
    false
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("authority", &self.authority).field("prefix", &self.prefix).field("tls", &self.tls.is_some()).finish()
    }
}

/// An HTTP/1.1 response's status and body (with `Content-Length`, chunked, or to the end).
fn parse_response(answer: &[u8]) -> std::result::Result<(u16, Vec<u8>), String> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("an incomplete HTTP answer")?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| "an HTTP head that is not text")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("an HTTP answer without a status")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            "content-length" => length = value.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    let rest = &answer[split + 4..];
    if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let end = rest[at..].windows(2).position(|w| w == b"\r\n").ok_or("a cut chunked body")? + at;
            let size = std::str::from_utf8(&rest[at..end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
                .ok_or("a bad chunk size")?;
            if size == 0 {
                return Ok((status, body));
            }
            let start = end + 2;
            body.extend_from_slice(rest.get(start..start + size).ok_or("a cut chunk")?);
            at = start + size + 2;
        }
    }
    Ok((status, rest[..length.unwrap_or(rest.len()).min(rest.len())].to_vec()))
}

/// The writer schema id of a Confluent-framed message.
fn schema_id(message: &[u8]) -> std::result::Result<u32, String> {
    match message {
        [0, a, b, c, d, _, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        [0, _, _, _, _] => Err("avro: an empty body".into()),
        [] => Err("an empty message".into()),
        [m, ..] if *m != 0 => Err(format!("avro: the message starts with {m:#04x}, not the registry's 0x00")),
        _ => Err("avro: a message shorter than its 5-byte header".into()),
    }
}

/// Decodes Confluent-framed Avro messages into a source's columns.
pub struct AvroDecoder {
    registry: Arc<Registry>,
    schema: SchemaRef,
    /// A decoder per writer schema id seen (dropped after a message it failed on).
    decoders: HashMap<u32, Decoder>,
}

impl AvroDecoder {
    pub fn new(registry: Arc<Registry>, schema: SchemaRef) -> AvroDecoder {
        AvroDecoder { registry, schema, decoders: HashMap::new() }
    }

    /// The rows of `messages`, in order, and the messages that did not decode.
    pub fn decode(&mut self, messages: &[&[u8]]) -> Result<(Vec<RecordBatch>, Vec<Rejected>)> {
        let mut batches = Vec::new();
        let mut rejected = Vec::new();
        let mut run: Vec<usize> = Vec::new();
        let mut run_id = None;
        for (index, message) in messages.iter().enumerate() {
            match schema_id(message) {
                Err(error) => rejected.push(Rejected { index, error, payload: message.to_vec() }),
                Ok(id) => {
                    if run_id != Some(id) {
                        if let Some(previous) = run_id {
                            self.run(previous, messages, &std::mem::take(&mut run), &mut batches, &mut rejected);
                        }
                        run_id = Some(id);
                    }
                    run.push(index);
                }
            }
        }
        if let Some(id) = run_id {
            self.run(id, messages, &run, &mut batches, &mut rejected);
        }
        rejected.sort_by_key(|r| r.index);
        Ok((batches, rejected))
    }

    /// Messages `run` (all written with schema `id`): together, else one by one.
    fn run(&mut self, id: u32, messages: &[&[u8]], run: &[usize], batches: &mut Vec<RecordBatch>, rejected: &mut Vec<Rejected>) {
        let all: Vec<&[u8]> = run.iter().map(|&i| messages[i]).collect();
        match self.decode_together(id, &all) {
            Ok(batch) => batches.extend(batch),
            Err(_) if run.len() > 1 => {
                for &index in run {
                    match self.decode_together(id, &[messages[index]]) {
                        Ok(batch) => batches.extend(batch),
                        Err(e) => rejected.push(Rejected { index, error: e.message, payload: messages[index].to_vec() }),
                    }
                }
            }
            Err(e) => rejected.push(Rejected { index: run[0], error: e.message, payload: messages[run[0]].to_vec() }),
        }
    }

    /// Decodes `messages` of schema `id` into one batch of the source's columns; a failure
    /// drops the decoder (its state is unknown).
    fn decode_together(&mut self, id: u32, messages: &[&[u8]]) -> Result<Option<RecordBatch>> {
        let result = self.try_decode(id, messages);
        if result.is_err() {
            self.decoders.remove(&id);
        }
        result
    }

    fn try_decode(&mut self, id: u32, messages: &[&[u8]]) -> Result<Option<RecordBatch>> {
        let bad = |e: &dyn std::fmt::Display| Error::connector(format!("avro (schema id {id}): {e}"));
        if !self.decoders.contains_key(&id) {
            let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
            store.set(Fingerprint::Id(id), self.registry.schema(id)?).map_err(|e| bad(&e))?;
            let decoder = ReaderBuilder::new()
                .with_writer_schema_store(store)
                .with_active_fingerprint(Fingerprint::Id(id))
                .with_batch_size(8192)
                .build_decoder()
                .map_err(|e| bad(&e))?;
            self.decoders.insert(id, decoder);
        }
        let decoder = self.decoders.get_mut(&id).expect("made above");
        let mut parts = Vec::new();
        for message in messages {
            if decoder.batch_is_full() {
                parts.extend(decoder.flush().map_err(|e| bad(&e))?);
            }
            let before = decoder.capacity();
            let read = decoder.decode(message).map_err(|e| bad(&e))?;
            if read != message.len() || decoder.capacity() + 1 != before {
                return Err(bad(&"a message that is not exactly one record"));
            }
        }
        parts.extend(decoder.flush().map_err(|e| bad(&e))?);
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            out.push(self.to_columns(&part)?);
        }
        Ok(match out.len() {
            0 => None,
            1 => out.pop(),
            _ => Some(arrow::compute::concat_batches(&self.schema, &out)?),
        })
    }

    /// A decoded batch's fields that the source declares, cast to its columns.
    fn to_columns(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let keep: Vec<usize> =
            (0..batch.num_columns()).filter(|&i| self.schema.field_with_name(batch.schema().field(i).name()).is_ok()).collect();
        cast_to_schema(&batch.project(&keep)?, &self.schema)
    }
}

/// Encodes rows as Confluent-framed Avro messages, one per row, under the id the registry
/// gives the rows' schema (registered at the first rows).
pub struct AvroEncoder {
    registry: Arc<Registry>,
    subject: String,
    encoder: Option<Encoder>,
}

impl AvroEncoder {
    pub fn new(registry: Arc<Registry>, subject: String) -> AvroEncoder {
        AvroEncoder { registry, subject, encoder: None }
    }

    /// The Avro schema rows of `schema` are written with (a record named after the subject).
    pub fn avro_schema(schema: &Schema) -> Result<AvroSchema> {
        AvroSchema::try_from(schema).map_err(|e| Error::connector(format!("avro: the rows have no Avro schema: {e}")))
    }

    pub fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let bad = |e: &dyn std::fmt::Display| Error::connector(format!("avro: encoding rows: {e}"));
        if self.encoder.is_none() {
            let schema = batch.schema().as_ref().clone();
            let id = self.registry.register(&self.subject, &Self::avro_schema(&schema)?)?;
            let encoder = WriterBuilder::new(schema)
                .with_fingerprint_strategy(FingerprintStrategy::Id(id))
                .build_encoder::<AvroSoeFormat>()
                .map_err(|e| bad(&e))?;
            self.encoder = Some(encoder);
        }
        let encoder = self.encoder.as_mut().expect("made above");
        encoder.encode(batch).map_err(|e| bad(&e))?;
        Ok(encoder.flush().iter().map(|row| row.to_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_answers_are_read_with_a_length_chunked_or_to_the_end() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"id\": 3}\r\n";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{\"id\": 3}\r\n".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, b"{\"a\": 1}".to_vec()));
        assert_eq!(parse_response(b"HTTP/1.0 500 X\r\n\r\noops").unwrap(), (500, b"oops".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn framing_is_checked_before_any_schema_is_looked_up() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 2, 9]), Ok(258));
        assert!(schema_id(&[1, 0, 0, 0, 1, 9]).unwrap_err().contains("not the registry's 0x00"));
        assert!(schema_id(&[0, 0, 0]).unwrap_err().contains("shorter"));
        assert!(schema_id(&[0, 0, 0, 0, 1]).unwrap_err().contains("empty body"));
        assert!(Registry::new("ftp://r:8081", None).unwrap_err().message.contains("http:// or https://"));
        assert!(Registry::new("http://r:8081", Some("/ca.pem")).unwrap_err().message.contains("for an https:// registry"));
        assert_eq!(Registry::new("https://r", None).unwrap().authority, "r:443");
        let r = Registry::new("http://r:8081/api/", None).unwrap();
        assert_eq!((r.authority.as_str(), r.prefix.as_str()), ("r:8081", "/api"));
        assert_eq!(Registry::new("http://r", None).unwrap().authority, "r:80");
    }
}
