//! Message payloads into Arrow batches of a source's columns, for connectors that receive
//! one record per message (a Kafka record, a WebSocket frame): `json` (an object; extra
//! keys are ignored, missing ones are null), `csv` (a line in the declared column order)
//! and `raw` (the whole payload as the source's one text or binary column); and
//! `debezium`, a change event's JSON envelope (`before`, `after`, `op`, bare or inside
//! Kafka Connect's `{"schema", "payload"}`), as changes: a create or snapshot read is a
//! `+I` row of `after`, an update `-U` of `before` and `+U` of `after`, a delete `-D` of
//! `before`, in the source's last column, `_op` ([`changelog_schema`]). An update or
//! delete without `before` is refused (Postgres needs `REPLICA IDENTITY FULL`), as is a
//! truncate; an empty message (the tombstone that follows a delete) holds no change. And
//! `avro` in the Confluent Schema Registry's framing ([`crate::avro`]).
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
use serde_json::{Map, Value};

use laminardb_engine::ingest::{cast_to_schema, text_reading_schema};
use laminardb_engine::stream::{OP_COLUMN, OP_DELETE, OP_INSERT, OP_RETRACT, OP_UPDATE};
use laminardb_engine::{Error, Result};

use crate::avro::{AvroDecoder, Registry};
use crate::json_flat::FlatJson;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadFormat {
    Json,
    Csv,
    Raw,
    /// Debezium's JSON change events: the rows are changes, with `_op`.
    Debezium,
    /// Avro in the Confluent Schema Registry's wire format ([`crate::avro`]).
    Avro,
}

impl PayloadFormat {
    pub fn parse(name: &str) -> Result<PayloadFormat> {
        match name.to_ascii_lowercase().as_str() {
            "json" => Ok(PayloadFormat::Json),
            "csv" => Ok(PayloadFormat::Csv),
            "raw" => Ok(PayloadFormat::Raw),
            "debezium" | "debezium-json" | "debezium_json" => Ok(PayloadFormat::Debezium),
            "avro" => Ok(PayloadFormat::Avro),
            other => Err(Error::connector(format!("format '{other}' is not one of json, csv, raw, debezium, avro"))),
        }
    }

    /// The rows are changes (the source's schema ends with `_op`).
    pub fn changelog(self) -> bool {
        self == PayloadFormat::Debezium
    }

    /// The schema of a source in this format with the `declared` columns: for changes,
    /// those and `_op`.
    pub fn source_schema(self, declared: &SchemaRef) -> Result<SchemaRef> {
        if !self.changelog() {
            return Ok(declared.clone());
        }
        changelog_schema(declared)
    }
}

/// `declared` and the change type, `_op` (which no declared column may be called).
pub fn changelog_schema(declared: &SchemaRef) -> Result<SchemaRef> {
    if declared.field_with_name(OP_COLUMN).is_ok() {
        return Err(Error::connector(format!("a source of changes adds the column '{OP_COLUMN}' itself: declare it without")));
    }
    let mut fields: Vec<Field> = declared.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
    Ok(Arc::new(Schema::new(fields)))
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
    /// The columns as JSON is read before the cast: timestamps in milliseconds, so a bare
    /// number is epoch milliseconds, as in an insert.
    reading: SchemaRef,
    /// The payloads pushed, back to back (JSON and CSV ones each end with a newline).
    buf: Vec<u8>,
    /// Where each payload ends in `buf`.
    ends: Vec<usize>,
    /// Debezium: the messages as they came (`buf` holds their rows) and where each ends;
    /// those whose envelope was refused, with why.
    originals: Vec<u8>,
    original_ends: Vec<usize>,
    refused: Vec<(usize, String)>,
    /// Avro: the decoder, which knows the registry.
    avro: Option<AvroDecoder>,
    /// JSON: the fast path for flat objects, when every column is of a type it reads.
    pub(crate) fast: Option<FlatJson>,
}

impl PayloadDecoder {
    /// A decoder into `schema`'s columns; `raw` needs exactly one column, text or binary.
    pub fn new(format: PayloadFormat, schema: SchemaRef) -> Result<PayloadDecoder> {
        if format == PayloadFormat::Raw
            && !(schema.fields().len() == 1 && matches!(schema.field(0).data_type(), DataType::Utf8 | DataType::Binary))
        {
            return Err(Error::connector("format 'raw' needs a source of one VARCHAR or BYTEA column"));
        }
        if format == PayloadFormat::Avro {
            return Err(Error::connector("format 'avro' is read from Kafka with a schema registry ('schema.registry.url')"));
        }
        if format.changelog() && schema.fields().last().is_none_or(|f| f.name() != OP_COLUMN) {
            return Err(Error::internal("a decoder of changes into a schema without _op"));
        }
        Ok(Self::build(format, schema, None))
    }

    /// A decoder of Avro messages whose writer schemas are in `registry`.
    pub fn avro(schema: SchemaRef, registry: Arc<Registry>) -> Result<PayloadDecoder> {
        let avro = AvroDecoder::new(registry, schema.clone());
        Ok(Self::build(PayloadFormat::Avro, schema, Some(avro)))
    }

    fn build(format: PayloadFormat, schema: SchemaRef, avro: Option<AvroDecoder>) -> PayloadDecoder {
        let text = Arc::new(Schema::new(
            schema.fields().iter().map(|f| Field::new(f.name(), DataType::Utf8, true)).collect::<Vec<_>>(),
        ));
        PayloadDecoder {
            format,
            reading: text_reading_schema(&schema),
            text,
            buf: Vec::new(),
            ends: Vec::new(),
            originals: Vec::new(),
            original_ends: Vec::new(),
            refused: Vec::new(),
            avro,
            fast: if matches!(format, PayloadFormat::Json | PayloadFormat::Debezium) { FlatJson::new(&schema) } else { None },
            schema,
        }
    }

    pub fn push(&mut self, payload: &[u8]) {
        if self.format == PayloadFormat::Debezium {
            let start = self.buf.len();
            if let Err(error) = changes(payload, &mut self.buf) {
                self.buf.truncate(start);
                self.refused.push((self.ends.len(), error));
            }
            self.ends.push(self.buf.len());
            self.originals.extend_from_slice(payload);
            self.original_ends.push(self.originals.len());
            return;
        }
        self.buf.extend_from_slice(payload);
        if !matches!(self.format, PayloadFormat::Raw | PayloadFormat::Avro) {
            self.buf.push(b'\n');
        }
        self.ends.push(self.buf.len());
    }

    /// The rows are changes, with `_op`.
    pub fn changelog(&self) -> bool {
        self.format.changelog()
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
        if self.format == PayloadFormat::Debezium {
            return self.changes(&buf, &messages);
        }
        if let Some(avro) = &mut self.avro {
            let (batches, rejected) = avro.decode(&messages)?;
            let batch = match batches.len() {
                0 => None,
                1 => batches.into_iter().next(),
                _ => Some(concat_batches(&self.schema, &batches)?),
            };
            return Ok((batch, rejected));
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

    /// Debezium messages, made into JSON rows with `_op` by `push`: decoded together
    /// unless one fails, then one by one. Tombstones made no rows and are no error.
    fn changes(&mut self, buf: &[u8], messages: &[&[u8]]) -> Result<(Option<RecordBatch>, Vec<Rejected>)> {
        let originals = std::mem::take(&mut self.originals);
        let ends = std::mem::take(&mut self.original_ends);
        let original = |i: usize| originals[if i == 0 { 0 } else { ends[i - 1] }..ends[i]].to_vec();
        let mut rejected: Vec<Rejected> =
            self.refused.drain(..).map(|(index, error)| Rejected { index, error, payload: original(index) }).collect();
        if let Ok(batch) = self.decode(buf) {
            return Ok((batch, rejected));
        }
        let mut good = Vec::new();
        for (index, message) in messages.iter().enumerate().filter(|(_, m)| !m.is_empty()) {
            match self.decode(message) {
                Ok(Some(batch)) => good.push(batch),
                Ok(None) => {}
                Err(e) => rejected.push(Rejected { index, error: e.message, payload: original(index) }),
            }
        }
        rejected.sort_by_key(|r| r.index);
        let batch = if good.is_empty() { None } else { Some(concat_batches(&self.schema, &good)?) };
        Ok((batch, rejected))
    }

    /// One decoder pass over `bytes` (whole messages).
    fn decode(&self, bytes: &[u8]) -> Result<Option<RecordBatch>> {
        let bad = |e: arrow::error::ArrowError| Error::connector(format!("{}: {e}", self.name()));
        let rows = bytes.iter().filter(|&&b| b == b'\n').count().max(1);
        match self.format {
            PayloadFormat::Json | PayloadFormat::Debezium => {
                if bytes.is_empty() {
                    return Ok(None);
                }
                if let Some(Ok(batch)) = self.fast.as_ref().map(|fast| fast.decode(bytes)) {
                    return Ok(batch);
                }
                let mut decoder =
                    arrow::json::ReaderBuilder::new(self.reading.clone()).with_batch_size(rows).build_decoder().map_err(bad)?;
                let read = decoder.decode(bytes).map_err(bad)?;
                if read < bytes.len() || decoder.has_partial_record() {
                    return Err(Error::connector("json: an incomplete object"));
                }
                decoder.flush().map_err(bad)?.map(|b| cast_to_schema(&b, &self.schema)).transpose()
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
            PayloadFormat::Raw | PayloadFormat::Avro => Err(Error::internal("raw and Avro payloads are not decoded here")),
        }
    }

    fn name(&self) -> &'static str {
        match self.format {
            PayloadFormat::Json => "json",
            PayloadFormat::Csv => "csv",
            PayloadFormat::Raw => "raw",
            PayloadFormat::Debezium => "debezium",
            PayloadFormat::Avro => "avro",
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

/// Writes the rows of Debezium change event `payload` to `out`, one JSON object per line,
/// each with its `_op`; nothing for a tombstone (an empty or `null` message).
fn changes(payload: &[u8], out: &mut Vec<u8>) -> std::result::Result<(), String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let mut event: Value = serde_json::from_slice(payload).map_err(|e| format!("debezium: not JSON: {e}"))?;
    // Kafka Connect's JSON converter with schemas on: {"schema": …, "payload": event}.
    if let Some(inner) = event.as_object_mut().filter(|o| o.contains_key("schema")).and_then(|o| o.remove("payload")) {
        event = inner;
    }
    let Value::Object(mut event) = event else {
        return if event.is_null() { Ok(()) } else { Err("debezium: a change event is a JSON object".into()) };
    };
    let op = match event.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => return Err("debezium: no 'op' in the change event".into()),
    };
    let mut row = |key: &str| -> std::result::Result<Map<String, Value>, String> {
        match event.remove(key) {
            Some(Value::Object(row)) => Ok(row),
            _ => Err(format!(
                "debezium: op '{op}' without '{key}' (an update or delete needs the old row: \
                 REPLICA IDENTITY FULL in Postgres, binlog_row_image=FULL in MySQL)"
            )),
        }
    };
    let rows = match op.as_str() {
        "c" | "r" => vec![(row("after")?, OP_INSERT)],
        "u" => vec![(row("before")?, OP_RETRACT), (row("after")?, OP_UPDATE)],
        "d" => vec![(row("before")?, OP_DELETE)],
        "t" => return Err("debezium: a truncate ('t'): a changelog cannot take back rows it was never sent".into()),
        other => return Err(format!("debezium: op '{other}' is not one of c, r, u, d")),
    };
    for (mut row, label) in rows {
        row.insert(OP_COLUMN.into(), Value::String(label.into()));
        serde_json::to_writer(&mut *out, &row).map_err(|e| format!("debezium: {e}"))?;
        out.push(b'\n');
    }
    Ok(())
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
        // Into a microsecond TIMESTAMP too, a bare number is epoch milliseconds (as in an
        // insert), and text is a date.
        let micros = Arc::new(Schema::new(vec![Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true)]));
        let (batch, _) = decode(PayloadFormat::Json, micros, &[r#"{"ts": 1700000000000}"#, r#"{"ts": "2023-11-14T22:13:20Z"}"#]);
        let ts = batch.unwrap().column(0).as_primitive::<arrow::datatypes::TimestampMicrosecondType>().values().to_vec();
        assert_eq!(ts, [1_700_000_000_000_000, 1_700_000_000_000_000]);
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
        assert!(PayloadFormat::parse("protobuf").unwrap_err().message.contains("'protobuf'"));
    }

    #[test]
    fn debezium_events_become_changes() {
        let declared = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let schema = PayloadFormat::Debezium.source_schema(&declared).unwrap();
        assert_eq!(schema.field(2).name(), "_op");
        let messages = [
            r#"{"before": null, "after": {"id": 1, "name": "ann"}, "op": "c", "ts_ms": 1}"#,
            r#"{"schema": {"type": "struct"}, "payload": {"before": {"id": 1, "name": "ann"}, "after": {"id": 1, "name": "bo"}, "op": "u"}}"#,
            "",
            r#"{"before": {"id": 1, "name": "bo"}, "after": null, "op": "d"}"#,
            r#"{"before": null, "after": {"id": 2, "name": "cy"}, "op": "u"}"#,
            r#"{"op": "t"}"#,
            r#"{"after": {"id": 3, "name": "di"}, "op": "r", "source": {"snapshot": "true"}}"#,
            "null",
        ];
        let (batch, rejected) = decode(PayloadFormat::Debezium, schema.clone(), &messages);
        let batch = batch.unwrap();
        let text = |c: usize| batch.column(c).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(batch.column(0).as_primitive::<Int64Type>().values().to_vec(), [1, 1, 1, 1, 3]);
        assert_eq!(text(1), ["ann", "ann", "bo", "bo", "di"]);
        assert_eq!(text(2), ["+I", "-U", "+U", "-D", "+I"]);
        assert_eq!(rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [4, 5]);
        assert!(rejected[0].error.contains("without 'before'"), "{}", rejected[0].error);
        assert_eq!(rejected[1].payload, br#"{"op": "t"}"#.to_vec());
        // A row that does not fit the columns: that message alone is rejected, with its text.
        let (batch, rejected) = decode(
            PayloadFormat::Debezium,
            schema.clone(),
            &[r#"{"after": {"id": "x"}, "op": "c"}"#, r#"{"after": {"id": 5}, "op": "c"}"#, "{"],
        );
        assert_eq!(batch.unwrap().column(0).as_primitive::<Int64Type>().values().to_vec(), [5]);
        assert_eq!(rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(rejected[0].payload, br#"{"after": {"id": "x"}, "op": "c"}"#.to_vec());
        let clash = Arc::new(Schema::new(vec![Field::new("_op", DataType::Utf8, true)]));
        assert!(PayloadFormat::Debezium.source_schema(&clash).is_err());
    }
}
