//! A fast path for the commonest JSON payload: one flat object per message whose values
//! are numbers, strings, booleans and nulls (a trade, a quote). It scans the bytes once
//! and appends each value straight to its column's builder, where arrow-json first builds
//! a tape of the whole input and then walks it per column.
//!
//! It takes only what it reads exactly as the general path would (arrow-json into the
//! reading schema, then `cast_to_schema`): plain integers, numbers into float columns,
//! strings with the simple escapes, `true`/`false`, `null`, and bare integers into
//! timestamp columns as epoch milliseconds; keys that are not columns are skipped, whatever
//! their value. Anything else (a date string, a `\u` escape, a fraction into an integer
//! column, a repeated key, a message that is not an object) makes it give up on the whole
//! batch, which then goes the general way: results never depend on the path taken.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use laminardb_engine::ingest::cast_to_schema;

/// How a column's values are read.
#[derive(Clone, Debug)]
enum Kind {
    Int,
    Float,
    Text,
    Bool,
    /// Epoch milliseconds, with the column's time zone.
    Time(Option<Arc<str>>),
}

enum Column {
    Int(Int64Builder),
    Float(Float64Builder),
    Text(StringBuilder),
    Bool(BooleanBuilder),
    Time(Int64Builder, Option<Arc<str>>),
}

/// Why the fast path gave up (the general path then reads the batch).
#[derive(Debug, PartialEq, Eq)]
pub struct GiveUp;

type Step<T> = std::result::Result<T, GiveUp>;

#[derive(Debug)]
pub struct FlatJson {
    schema: SchemaRef,
    names: Vec<Box<[u8]>>,
    kinds: Vec<Kind>,
}

impl FlatJson {
    /// A reader into `schema`'s columns, if every one is of a type it reads (at most 64).
    pub fn new(schema: &SchemaRef) -> Option<FlatJson> {
        if schema.fields().len() > 64 {
            return None;
        }
        let kinds = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Some(Kind::Int),
                DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => Some(Kind::Int),
                DataType::Float32 | DataType::Float64 => Some(Kind::Float),
                DataType::Utf8 => Some(Kind::Text),
                DataType::Boolean => Some(Kind::Bool),
                DataType::Timestamp(_, tz) => Some(Kind::Time(tz.clone())),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        let names = schema.fields().iter().map(|f| f.name().as_bytes().into()).collect();
        Some(FlatJson { schema: schema.clone(), names, kinds })
    }

    /// The rows of `bytes`, objects separated by whitespace (each message ends with a
    /// newline), cast to the schema; `Ok(None)` for no object.
    pub fn decode(&self, bytes: &[u8]) -> Step<Option<RecordBatch>> {
        let rows = bytes.iter().filter(|&&b| b == b'\n').count().max(1);
        let mut columns: Vec<Column> = self
            .kinds
            .iter()
            .map(|k| match k {
                Kind::Int => Column::Int(Int64Builder::with_capacity(rows)),
                Kind::Float => Column::Float(Float64Builder::with_capacity(rows)),
                Kind::Text => Column::Text(StringBuilder::with_capacity(rows, rows * 8)),
                Kind::Bool => Column::Bool(BooleanBuilder::with_capacity(rows)),
                Kind::Time(tz) => Column::Time(Int64Builder::with_capacity(rows), tz.clone()),
            })
            .collect();
        let mut s = Scanner { bytes, at: 0 };
        let mut count = 0usize;
        loop {
            s.skip_ws();
            if s.at == bytes.len() {
                break;
            }
            self.object(&mut s, &mut columns)?;
            count += 1;
        }
        if count == 0 {
            return Ok(None);
        }
        let mut fields = Vec::with_capacity(columns.len());
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        for (column, field) in columns.into_iter().zip(self.schema.fields()) {
            let array: ArrayRef = match column {
                Column::Int(mut b) => Arc::new(b.finish()),
                Column::Float(mut b) => Arc::new(b.finish()),
                Column::Text(mut b) => Arc::new(b.finish()),
                Column::Bool(mut b) => Arc::new(b.finish()),
                Column::Time(mut b, tz) => {
                    let ms = b.finish();
                    Arc::new(TimestampMillisecondArray::new(ms.values().clone(), ms.nulls().cloned()).with_timezone_opt(tz))
                }
            };
            fields.push(Field::new(field.name(), array.data_type().clone(), true));
            arrays.push(array);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|_| GiveUp)?;
        cast_to_schema(&batch, &self.schema).map(Some).map_err(|_| GiveUp)
    }

    /// One object: its values appended, and a null for each column it lacks.
    fn object(&self, s: &mut Scanner, columns: &mut [Column]) -> Step<()> {
        s.expect(b'{')?;
        let mut seen = 0u64;
        s.skip_ws();
        if s.peek() == Some(b'}') {
            s.at += 1;
        } else {
            loop {
                s.skip_ws();
                let key = s.plain_string()?;
                s.skip_ws();
                s.expect(b':')?;
                s.skip_ws();
                match self.names.iter().position(|n| n.as_ref() == key) {
                    Some(i) => {
                        if seen & (1 << i) != 0 {
                            return Err(GiveUp);
                        }
                        seen |= 1 << i;
                        value(s, &mut columns[i])?;
                    }
                    None => s.skip_value(0)?,
                }
                s.skip_ws();
                match s.next() {
                    Some(b',') => continue,
                    Some(b'}') => break,
                    _ => return Err(GiveUp),
                }
            }
        }
        for (i, column) in columns.iter_mut().enumerate() {
            if seen & (1 << i) == 0 {
                append_null(column);
            }
        }
        Ok(())
    }
}

fn append_null(column: &mut Column) {
    match column {
        Column::Int(b) | Column::Time(b, _) => b.append_null(),
        Column::Float(b) => b.append_null(),
        Column::Text(b) => b.append_null(),
        Column::Bool(b) => b.append_null(),
    }
}

/// Reads one value into `column`.
fn value(s: &mut Scanner, column: &mut Column) -> Step<()> {
    if s.bytes[s.at..].starts_with(b"null") {
        s.at += 4;
        append_null(column);
        return Ok(());
    }
    match column {
        Column::Int(b) | Column::Time(b, _) => b.append_value(s.integer()?),
        Column::Float(b) => {
            let text = s.number()?;
            // ASCII digits, signs, '.', 'e': valid UTF-8.
            let text = std::str::from_utf8(text).map_err(|_| GiveUp)?;
            b.append_value(text.parse::<f64>().map_err(|_| GiveUp)?);
        }
        Column::Text(b) => {
            let raw = s.string()?;
            match raw {
                Text::Plain(bytes) => b.append_value(std::str::from_utf8(bytes).map_err(|_| GiveUp)?),
                Text::Escaped(text) => b.append_value(text),
            }
        }
        Column::Bool(b) => {
            if s.bytes[s.at..].starts_with(b"true") {
                s.at += 4;
                b.append_value(true);
            } else if s.bytes[s.at..].starts_with(b"false") {
                s.at += 5;
                b.append_value(false);
            } else {
                return Err(GiveUp);
            }
        }
    }
    Ok(())
}

enum Text<'a> {
    Plain(&'a [u8]),
    Escaped(String),
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Step<()> {
        if self.next() == Some(byte) {
            Ok(())
        } else {
            Err(GiveUp)
        }
    }

    /// A string without escapes (a key).
    fn plain_string(&mut self) -> Step<&'a [u8]> {
        match self.string()? {
            Text::Plain(bytes) => Ok(bytes),
            Text::Escaped(_) => Err(GiveUp),
        }
    }

    fn string(&mut self) -> Step<Text<'a>> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.next() {
                Some(b'"') => return Ok(Text::Plain(&self.bytes[start..self.at - 1])),
                Some(b'\\') => break,
                Some(c) if c < 0x20 => return Err(GiveUp),
                Some(_) => {}
                None => return Err(GiveUp),
            }
        }
        // Escapes: copy what came before, then decode the rest.
        let mut out = std::str::from_utf8(&self.bytes[start..self.at - 1]).map_err(|_| GiveUp)?.to_string();
        let mut plain = Vec::new();
        let mut escaped = true;
        loop {
            if escaped {
                let c = match self.next() {
                    Some(b'"') => '"',
                    Some(b'\\') => '\\',
                    Some(b'/') => '/',
                    Some(b'b') => '\u{8}',
                    Some(b'f') => '\u{c}',
                    Some(b'n') => '\n',
                    Some(b'r') => '\r',
                    Some(b't') => '\t',
                    _ => return Err(GiveUp), // \u and anything else: the general path
                };
                out.push(c);
                escaped = false;
                continue;
            }
            match self.next() {
                Some(b'"') => break,
                Some(b'\\') => {
                    out.push_str(std::str::from_utf8(&plain).map_err(|_| GiveUp)?);
                    plain.clear();
                    escaped = true;
                }
                Some(c) if c < 0x20 => return Err(GiveUp),
                Some(c) => plain.push(c),
                None => return Err(GiveUp),
            }
        }
        out.push_str(std::str::from_utf8(&plain).map_err(|_| GiveUp)?);
        Ok(Text::Escaped(out))
    }

    /// A JSON number's text.
    fn number(&mut self) -> Step<&'a [u8]> {
        let start = self.at;
        self.skip(b"-");
        self.digits()?;
        if self.skip(b".") {
            self.digits()?;
        }
        if self.skip(b"eE") {
            self.skip(b"+-");
            self.digits()?;
        }
        Ok(&self.bytes[start..self.at])
    }

    /// Steps over one byte if it is one of `any`.
    fn skip(&mut self, any: &[u8]) -> bool {
        let found = self.peek().is_some_and(|b| any.contains(&b));
        self.at += usize::from(found);
        found
    }

    /// Steps over one or more digits (none: not a JSON number).
    fn digits(&mut self) -> Step<()> {
        let first = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        if self.at == first {
            return Err(GiveUp);
        }
        Ok(())
    }

    /// A plain integer that fits an `i64`.
    fn integer(&mut self) -> Step<i64> {
        let text = self.number()?;
        let (negative, digits) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, text),
        };
        if digits.len() > 18 || digits.iter().any(|d| !d.is_ascii_digit()) {
            return Err(GiveUp);
        }
        let value = digits.iter().fold(0i64, |v, &d| v * 10 + i64::from(d - b'0'));
        Ok(if negative { -value } else { value })
    }

    /// Skips any JSON value (nested up to 64 levels).
    fn skip_value(&mut self, depth: usize) -> Step<()> {
        if depth > 64 {
            return Err(GiveUp);
        }
        match self.peek().ok_or(GiveUp)? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let close = if self.next() == Some(b'{') { b'}' } else { b']' };
                self.skip_ws();
                if self.peek() == Some(close) {
                    self.at += 1;
                    return Ok(());
                }
                loop {
                    self.skip_ws();
                    if close == b'}' {
                        self.string()?;
                        self.skip_ws();
                        self.expect(b':')?;
                        self.skip_ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.skip_ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(c) if c == close => return Ok(()),
                        _ => return Err(GiveUp),
                    }
                }
            }
            b't' if self.bytes[self.at..].starts_with(b"true") => {
                self.at += 4;
                Ok(())
            }
            b'f' if self.bytes[self.at..].starts_with(b"false") => {
                self.at += 5;
                Ok(())
            }
            b'n' if self.bytes[self.at..].starts_with(b"null") => {
                self.at += 4;
                Ok(())
            }
            _ => self.number().map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{PayloadDecoder, PayloadFormat};
    use arrow::datatypes::TimeUnit;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("symbol", DataType::Utf8, true),
            Field::new("price", DataType::Float64, true),
            Field::new("qty", DataType::Int32, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("hot", DataType::Boolean, true),
        ]))
    }

    /// What the general path makes of `text` (arrow-json, then the cast).
    fn general(text: &str) -> RecordBatch {
        let mut d = PayloadDecoder::new(PayloadFormat::Json, schema()).unwrap();
        d.push(text.as_bytes());
        d.fast = None;
        let (batch, rejected) = d.finish().unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        batch.unwrap()
    }

    #[test]
    fn what_it_reads_it_reads_as_the_general_path_does() {
        let fast = FlatJson::new(&schema()).unwrap();
        for text in [
            r#"{"symbol": "AAPL", "price": 189.5, "qty": 100, "ts": 1700000000000, "hot": true}"#,
            r#"{"venue": {"a": [1, {"b": "}"}], "c": null}, "price": -1e3, "symbol": "a\"b\\n\tc", "hot": false}"#,
            r#"{}"#,
            r#"{"qty": null, "price": 7, "ts": -5, "extra": [true, false, null, "x", 1.5e-3]}"#,
            r#"  {"symbol":"é⚡"}  "#,
        ] {
            let line = format!("{text}\n");
            assert_eq!(fast.decode(line.as_bytes()).unwrap().unwrap(), general(text), "{text}");
        }
        let many = "{\"qty\": 1}\n{\"qty\": 2}\n";
        assert_eq!(fast.decode(many.as_bytes()).unwrap().unwrap().num_rows(), 2);
        assert_eq!(fast.decode(b"  \n").unwrap(), None);
    }

    #[test]
    fn it_gives_up_on_what_the_general_path_must_judge() {
        let fast = FlatJson::new(&schema()).unwrap();
        for text in [
            r#"{"ts": "2023-11-14T22:13:20Z"}"#,
            r#"{"qty": 1.5}"#,
            r#"{"qty": 99999999999}"#,
            r#"{"symbol": "\u00e9"}"#,
            r#"{"qty": 1, "qty": 2}"#,
            r#"[1]"#,
            r#"{"symbol": 5}"#,
            r#"{"price": "1.5"}"#,
            r#"{"price": 1.}"#,
            r#"{"hot": 1}"#,
            r#"{"symbol": "a"} x"#,
            r#"{"symbol": "a""#,
        ] {
            assert_eq!(fast.decode(format!("{text}\n").as_bytes()), Err(GiveUp), "{text}");
        }
        let list = Arc::new(Schema::new(vec![Field::new("d", DataType::Date32, true)]));
        assert!(FlatJson::new(&list).is_none());
    }
}
