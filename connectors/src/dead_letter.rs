//! Where a source's messages that do not decode go, besides the source's error count and
//! the log: `dead_letter.path` (a file of JSON lines, appended: source, where the message
//! came from, the error, the payload as text or, when it is not UTF-8, base64) or, for a
//! Kafka source, `dead_letter.topic` (the payload as it came, with `error` and `source`
//! headers, on the same brokers).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

use crate::kafka_sink::ReportingProducer;

pub const OPTIONS: &[&str] = &["dead_letter.path", "dead_letter.topic"];

/// A dead-letter destination as configured (cheap to clone; opened per reader).
#[derive(Clone, Debug, Default)]
pub enum DeadLetterConfig {
    #[default]
    None,
    File(PathBuf),
    Topic { topic: String, config: ClientConfig },
}

impl DeadLetterConfig {
    /// From the options; `kafka` is the source's client settings when it is a Kafka
    /// source (the only kind that takes `dead_letter.topic`).
    pub fn from_options(options: &ConnectorOptions, kafka: Option<&ClientConfig>) -> Result<DeadLetterConfig> {
        match (options.get("dead_letter.path"), options.get("dead_letter.topic")) {
            (Some(_), Some(_)) => Err(Error::connector("dead_letter.path and dead_letter.topic: choose one")),
            (Some(path), None) => Ok(DeadLetterConfig::File(PathBuf::from(path))),
            (None, Some(topic)) => match kafka {
                Some(config) => Ok(DeadLetterConfig::Topic { topic: topic.to_string(), config: config.clone() }),
                None => Err(Error::connector(format!("connector '{}' has no dead_letter.topic (dead_letter.path is a file)", options.connector()))),
            },
            (None, None) => Ok(DeadLetterConfig::None),
        }
    }

    pub fn open(&self, source: &str) -> Result<DeadLetters> {
        let sink = match self {
            DeadLetterConfig::None => Sink::None,
            DeadLetterConfig::File(path) => Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| Error::connector(format!("dead letters: opening {}: {e}", path.display())))?,
            ),
            DeadLetterConfig::Topic { topic, config } => Sink::Topic {
                producer: ReportingProducer::new(&mut config.clone())
                    .map_err(|e| Error::connector(format!("dead letters: a producer for '{topic}': {}", e.message)))?,
                topic: topic.clone(),
            },
        };
        Ok(DeadLetters { source: source.to_string(), sink })
    }
}

enum Sink {
    None,
    File(File),
    Topic { producer: ReportingProducer, topic: String },
}

pub struct DeadLetters {
    source: String,
    sink: Sink,
}

impl DeadLetters {
    /// Sends `payload`, which came from `origin` ("partition 2 offset 17") and failed
    /// with `error`; a failure to send is an error for the caller to tell (the message is
    /// still counted).
    pub fn send(&mut self, origin: &str, error: &str, payload: &[u8]) -> Result<()> {
        match &mut self.sink {
            Sink::None => Ok(()),
            Sink::File(file) => {
                let (key, value) = match std::str::from_utf8(payload) {
                    Ok(text) => ("payload", serde_json::Value::from(text)),
                    Err(_) => ("payload_base64", serde_json::Value::from(crate::encode::base64(payload))),
                };
                let line = serde_json::json!({ "source": self.source, "origin": origin, "error": error, key: value });
                writeln!(file, "{line}").and_then(|()| file.flush()).map_err(|e| Error::connector(format!("dead letters: writing: {e}")))
            }
            Sink::Topic { producer, topic } => {
                producer.serve();
                producer.check(topic).map_err(|e| Error::connector(format!("dead letters: {}", e.message)))?;
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "error", value: Some(error) })
                    .insert(Header { key: "source", value: Some(self.source.as_str()) })
                    .insert(Header { key: "origin", value: Some(origin) });
                producer
                    .producer()
                    .send(BaseRecord::<(), [u8]>::to(topic).payload(payload).headers(headers))
                    .map_err(|(e, _)| Error::connector(format!("dead letters: sending to '{topic}': {e}")))
            }
        }
    }

    /// Every dead letter sent so far is kept: with the brokers (a topic), or on disk (a
    /// file). Called before a checkpoint records a position past the messages they are
    /// for, and at close (a producer dropped unflushed would discard what it holds).
    pub fn flush(&self) -> Result<()> {
        match &self.sink {
            Sink::None => Ok(()),
            Sink::File(file) => file.sync_data().map_err(|e| Error::connector(format!("dead letters: syncing the file: {e}"))),
            Sink::Topic { producer, topic } => producer.flush(topic).map_err(|e| Error::connector(format!("dead letters: {}", e.message))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_file_gets_one_json_line_per_message() {
        let dir = std::env::temp_dir().join(format!("laminardb-dead-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dead.jsonl");
        let raw: BTreeMap<String, String> = [("dead_letter.path".to_string(), path.display().to_string())].into_iter().collect();
        let config = DeadLetterConfig::from_options(&ConnectorOptions::new("websocket", &raw).unwrap(), None).unwrap();
        let mut letters = config.open("ticks").unwrap();
        letters.send("message 3", "json: bad", b"not json").unwrap();
        letters.send("message 4", "raw: not UTF-8", &[0xff]).unwrap();
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0], serde_json::json!({"source": "ticks", "origin": "message 3", "error": "json: bad", "payload": "not json"}));
        assert_eq!(lines[1]["payload_base64"], "/w==");
        let topic: BTreeMap<String, String> = [("dead_letter.topic".to_string(), "dlq".to_string())].into_iter().collect();
        let e = DeadLetterConfig::from_options(&ConnectorOptions::new("websocket", &topic).unwrap(), None).unwrap_err();
        assert!(e.message.contains("no dead_letter.topic"), "{}", e.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
