//! Rows into message payloads, one message per row, for sinks that send records (Kafka,
//! WebSocket): `json` (an object per row) or `csv` (a line per row, the columns in order,
//! no header). And [`base64`], for bytes carried as text (dead letters, HTTP basic
//! authentication).

use arrow::array::RecordBatch;

use laminardb_engine::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowEncoding {
    Json,
    Csv,
}

impl RowEncoding {
    /// `format`'s value (`json` when absent); `connector` names the sink in errors.
    pub fn parse(format: Option<&str>, connector: &str) -> Result<RowEncoding> {
        match format.unwrap_or("json").to_ascii_lowercase().as_str() {
            "json" => Ok(RowEncoding::Json),
            "csv" => Ok(RowEncoding::Csv),
            "avro" => Err(Error::connector(format!("{connector} sink: format 'avro' is for the kafka sink (json, csv)"))),
            other => Err(Error::connector(format!("{connector} sink: format '{other}' is not one of json, csv"))),
        }
    }

    /// Each row of `batch` as one payload.
    pub fn encode(self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let bad = |e: arrow::error::ArrowError| Error::connector(format!("encoding rows: {e}"));
        match self {
            RowEncoding::Json => {
                let mut buf = Vec::with_capacity(batch.num_rows() * 64);
                let mut writer = arrow::json::LineDelimitedWriter::new(&mut buf);
                writer.write(batch).map_err(bad)?;
                writer.finish().map_err(bad)?;
                drop(writer);
                // JSON escapes newlines inside strings: each line is one row.
                Ok(buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect())
            }
            RowEncoding::Csv => (0..batch.num_rows())
                .map(|i| {
                    // Row by row: a quoted value may hold a newline.
                    let mut buf = Vec::new();
                    let mut writer = arrow::csv::WriterBuilder::new().with_header(false).build(&mut buf);
                    writer.write(&batch.slice(i, 1)).map_err(bad)?;
                    drop(writer);
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    Ok(buf)
                })
                .collect(),
        }
    }
}

/// Standard base64 with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray};

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
    }

    #[test]
    fn rows_become_one_payload_each() {
        let batch = RecordBatch::try_from_iter([
            ("s", Arc::new(StringArray::from(vec![Some("a\nb"), None])) as _),
            ("x", Arc::new(Float64Array::from(vec![1.5, 2.0])) as _),
        ])
        .unwrap();
        let text = |e: RowEncoding| e.encode(&batch).unwrap().into_iter().map(|p| String::from_utf8(p).unwrap()).collect::<Vec<_>>();
        assert_eq!(text(RowEncoding::Json), [r#"{"s":"a\nb","x":1.5}"#, r#"{"x":2.0}"#]);
        assert_eq!(text(RowEncoding::Csv), ["\"a\nb\",1.5", ",2.0"]);
        assert!(RowEncoding::parse(Some("avro"), "websocket").unwrap_err().message.contains("is for the kafka sink"));
        assert!(RowEncoding::parse(Some("xml"), "kafka").unwrap_err().message.contains("'xml'"));
    }
}
