//! Message payloads into Arrow batches of a source's columns, for connectors that receive
//! one record per message (a Kafka record, a WebSocket frame): `json` (an object; extra
//! keys are ignored, missing ones are null), `csv` (a line in the declared column order)
//! and `raw` (the whole payload as the source's one text or binary column).
//!
//! Messages are gathered (`push`) and decoded together (`finish`) straight into arrays:
//! one decoder pass over the concatenated payloads. When that pass fails, the messages
//! are decoded one by one to tell the bad ones apart: the good ones still become rows,
//! in order, and each bad one comes back as [`Rejected`] with its error, for the
//! connector to count, log or send to a dead-letter destination. A bad message never
//! stops the others.

use arrow::array::{ArrayRef, BinaryBuilder, RecordBatch, StringBuilder};
use arrow::compute::concat_batches;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use laminardb_engine::ingest::cast_to_schema;
use laminardb_engine::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadFormat {
    Json,
    Csv,
    Raw,
}

impl PayloadFormat {
    pub fn parse(name: &str) -> Result<PayloadFormat> {
        match name.to_ascii_lowercase().as_str() {
            "json" => Ok(PayloadFormat::Json),
            "csv" => Ok(PayloadFormat::Csv),
            "raw" => Ok(PayloadFormat::Raw),
            other => Err(Error::connector(format!("format '{other}' is not one of json, csv, raw"))),
        }
    }
}

/// A message that did not decode: its place among the messages pushed since the last
/// `finish`, why, and the message itself (for a dead-letter destination).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub index: usize,
    pub error: String,
    pub payload: Vec<u8>,
}

pub struct PayloadDecoder {
    format: PayloadFormat,
    schema: SchemaRef,
    /// The columns as text (how CSV is read before the cast).
    text: SchemaRef,
    /// The payloads pushed, back to back (JSON and CSV ones each end with a newline).
    buf: Vec<u8>,
    /// Where each payload ends in `buf`.
    ends: Vec<usize>,
}

impl PayloadDecoder {
    /// A decoder into `schema`'s columns; `raw` needs exactly one column, text or binary.
    pub fn new(format: PayloadFormat, schema: SchemaRef) -> Result<PayloadDecoder> {
        if format == PayloadFormat::Raw
            && !(schema.fields().len() == 1 && matches!(schema.field(0).data_type(), DataType::Utf8 | DataType::Binary))
        {
            return Err(Error::connector("format 'raw' needs a source of one VARCHAR or BYTEA column"));
        }
        let text = Arc::new(Schema::new(
            schema.fields().iter().map(|f| Field::new(f.name(), DataType::Utf8, true)).collect::<Vec<_>>(),
        ));
        Ok(PayloadDecoder { format, schema, text, buf: Vec::new(), ends: Vec::new() })
    }

    pub fn push(&mut self, payload: &[u8]) {
        self.buf.extend_from_slice(payload);
        if self.format != PayloadFormat::Raw {
            self.buf.push(b'\n');
        }
        self.ends.push(self.buf.len());
    }

    /// Messages pushed since the last `finish`.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Decodes every message pushed: the rows of those that decode, in order (`None`
    /// without any), and those that do not.
    pub fn finish(&mut self) -> Result<(Option<RecordBatch>, Vec<Rejected>)> {
        let buf = std::mem::take(&mut self.buf);
        let ends = std::mem::take(&mut self.ends);
        let messages: Vec<&[u8]> = ends.iter().scan(0, |start, &end| Some(&buf[std::mem::replace(start, end)..end])).collect();
        if messages.is_empty() {
            return Ok((None, Vec::new()));
        }
        if self.format == PayloadFormat::Raw {
            return self.raw(&messages);
        }
        // Empty messages hold no record: rejected, not skipped in silence.
        let empty: Vec<usize> = (0..messages.len()).filter(|&i| messages[i].iter().all(u8::is_ascii_whitespace)).collect();
        if empty.is_empty() {
            if let Ok(batch) = self.decode(&buf) {
                return Ok((batch, Vec::new()));
            }
        }
        // One by one: which fail, and the rows of the others.
        let mut good = Vec::new();
        let mut rejected = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            if empty.contains(&index) {
                rejected.push(Rejected { index, error: "an empty message".into(), payload: original(messages[index]) });
                continue;
            }
            match self.decode(message) {
                Ok(Some(batch)) => good.push(batch),
                Ok(None) => rejected.push(Rejected { index, error: "no record in the message".into(), payload: original(message) }),
                Err(e) => rejected.push(Rejected { index, error: e.message, payload: original(message) }),
            }
        }
        let batch = if good.is_empty() { None } else { Some(concat_batches(&self.schema, &good)?) };
        Ok((batch, rejected))
    }

    /// One decoder pass over `bytes` (whole messages).
    fn decode(&self, bytes: &[u8]) -> Result<Option<RecordBatch>> {
        let bad = |e: arrow::error::ArrowError| Error::connector(format!("{}: {e}", self.name()));
        let rows = bytes.iter().filter(|&&b| b == b'\n').count().max(1);
        match self.format {
            PayloadFormat::Json => {
                let mut decoder =
                    arrow::json::ReaderBuilder::new(self.schema.clone()).with_batch_size(rows).build_decoder().map_err(bad)?;
                let read = decoder.decode(bytes).map_err(bad)?;
                if read < bytes.len() || decoder.has_partial_record() {
                    return Err(Error::connector("json: an incomplete object"));
                }
                decoder.flush().map_err(bad)
            }
            PayloadFormat::Csv => {
                // Read as text, then cast as an insert is (epoch numbers into timestamps too).
                let mut decoder =
                    arrow::csv::ReaderBuilder::new(self.text.clone()).with_header(false).with_batch_size(rows).build_decoder();
                let read = decoder.decode(bytes).map_err(bad)?;
                if read < bytes.len() {
                    return Err(Error::connector("csv: more lines than the decoder took"));
                }
                decoder.flush().map_err(bad)?.map(|b| cast_to_schema(&b, &self.schema)).transpose()
            }
            PayloadFormat::Raw => Err(Error::internal("raw payloads are not decoded")),
        }
    }

    fn name(&self) -> &'static str {
        match self.format {
            PayloadFormat::Json => "json",
            PayloadFormat::Csv => "csv",
            PayloadFormat::Raw => "raw",
        }
    }

    fn raw(&self, messages: &[&[u8]]) -> Result<(Option<RecordBatch>, Vec<Rejected>)> {
        let mut rejected = Vec::new();
        let column: ArrayRef = match self.schema.field(0).data_type() {
            DataType::Utf8 => {
                let mut b = StringBuilder::new();
                for (index, m) in messages.iter().enumerate() {
                    match std::str::from_utf8(m) {
                        Ok(text) => b.append_value(text),
                        Err(e) => rejected.push(Rejected { index, error: format!("raw: not UTF-8 text: {e}"), payload: m.to_vec() }),
                    }
                }
                Arc::new(b.finish())
            }
            _ => {
                let mut b = BinaryBuilder::new();
                for m in messages {
                    b.append_value(m);
                }
                Arc::new(b.finish())
            }
        };
        if column.is_empty() {
            return Ok((None, rejected));
        }
        Ok((Some(RecordBatch::try_new(self.schema.clone(), vec![column])?), rejected))
    }
}

/// A pushed JSON or CSV message without the newline `push` added.
fn original(message: &[u8]) -> Vec<u8> {
    message.strip_suffix(b"\n").unwrap_or(message).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int64Type, TimeUnit, TimestampMillisecondType};

    fn trades() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("symbol", DataType::Utf8, true),
            Field::new("price", DataType::Float64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]))
    }

    fn decode(format: PayloadFormat, schema: SchemaRef, messages: &[&str]) -> (Option<RecordBatch>, Vec<Rejected>) {
        let mut d = PayloadDecoder::new(format, schema).unwrap();
        for m in messages {
            d.push(m.as_bytes());
        }
        assert_eq!(d.len(), messages.len());
        let out = d.finish().unwrap();
        assert!(d.is_empty(), "finish starts over");
        out
    }

    fn symbols(batch: &RecordBatch) -> Vec<String> {
        batch.column(0).as_string::<i32>().iter().map(|s| s.unwrap_or("∅").to_string()).collect()
    }

    #[test]
    fn json_messages_become_rows_and_bad_ones_are_told_apart() {
        let messages = [
            r#"{"symbol": "A", "price": 1.5, "ts": 1000, "venue": "X"}"#,
            r#"{"symbol": "B", "price": "dear"}"#,
            r#"{"symbol": "C""#,
            "  ",
            r#"{"price": 3}"#,
        ];
        let (batch, rejected) = decode(PayloadFormat::Json, trades(), &messages);
        let batch = batch.unwrap();
        assert_eq!(symbols(&batch), ["A", "∅"]);
        assert_eq!(batch.column(1).as_primitive::<Float64Type>().values().to_vec(), [1.5, 3.0]);
        assert_eq!(batch.column(2).as_primitive::<TimestampMillisecondType>().value(0), 1000);
        assert_eq!(rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(rejected[0].error.contains("json"), "{}", rejected[0].error);
        assert_eq!(rejected[2].error, "an empty message");
        assert_eq!(rejected[0].payload, br#"{"symbol": "B", "price": "dear"}"#.to_vec());
        // All good: one pass.
        let (batch, rejected) = decode(PayloadFormat::Json, trades(), &[r#"{"symbol": "D"}"#, r#"{"symbol": "E"}"#]);
        assert_eq!((symbols(&batch.unwrap()), rejected.len()), (vec!["D".to_string(), "E".to_string()], 0));
    }

    #[test]
    fn csv_lines_in_the_declared_order_and_raw_payloads() {
        let (batch, rejected) = decode(PayloadFormat::Csv, trades(), &["A,1.5,1000", "B,cheap,2000", "C,2,3000"]);
        assert_eq!(symbols(&batch.unwrap()), ["A", "C"]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, 1);
        let text = Arc::new(Schema::new(vec![Field::new("line", DataType::Utf8, true)]));
        let mut d = PayloadDecoder::new(PayloadFormat::Raw, text).unwrap();
        d.push(b"hello");
        d.push(&[0xff, 0xfe]);
        d.push(b"");
        let (batch, rejected) = d.finish().unwrap();
        assert_eq!(symbols(&batch.unwrap()), ["hello", ""]);
        assert_eq!(rejected[0].index, 1);
        let bytes = Arc::new(Schema::new(vec![Field::new("b", DataType::Binary, true)]));
        assert_eq!(decode(PayloadFormat::Raw, bytes, &["x", "y"]).0.unwrap().num_rows(), 2);
        let two = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true), Field::new("b", DataType::Int64, true)]));
        assert!(PayloadDecoder::new(PayloadFormat::Raw, two.clone()).is_err());
        let (batch, _) = decode(PayloadFormat::Json, two, &[r#"{"a": 1, "b": 2}"#]);
        assert_eq!(batch.unwrap().column(1).as_primitive::<Int64Type>().value(0), 2);
        assert!(PayloadFormat::parse("avro").unwrap_err().message.contains("'avro'"));
    }
}
