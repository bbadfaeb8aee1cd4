//! Arrow IPC stream bytes for batches that go to disk (WAL records, checkpoint state).

use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::{StreamDecoder, StreamReader};
use arrow::ipc::writer::StreamWriter;

use crate::Result;

/// Writes `batches` (all of `schema`) to `out` as one IPC stream.
pub fn write(schema: &SchemaRef, batches: &[RecordBatch], out: impl std::io::Write) -> Result<()> {
    let mut writer = StreamWriter::try_new(out, schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    Ok(())
}

pub fn to_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write(schema, batches, &mut out)?;
    Ok(out)
}

pub fn read(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// The batches of one IPC stream held in `buffer`, without copying: their arrays are
/// slices of it (e.g. a memory-mapped file).
pub fn read_buffer(mut buffer: Buffer) -> Result<Vec<RecordBatch>> {
    let mut decoder = StreamDecoder::new();
    let mut out = Vec::new();
    while let Some(batch) = decoder.decode(&mut buffer)? {
        out.push(batch);
    }
    decoder.finish()?;
    Ok(out)
}
