//! The `files` sink: a stream's rows as Parquet, CSV or JSON-lines files in a directory,
//! each file appearing whole, at a checkpoint.
//!
//! ```sql
//! CREATE SINK bars_out FROM bars WITH (connector = 'files', path = '/data/bars', format = 'parquet')
//! ```
//!
//! Each shard writes its rows to a hidden file of its own (`.part-….inprogress`) as they
//! come. At every checkpoint barrier (and at `DROP SINK` or close) the file is finished,
//! synced and renamed to `part-<token>-<n>.<ext>`: a reader of the directory sees only
//! whole files. Files are committed nowhere else, so after a crash the rows since the last
//! checkpoint (replayed on reopen) are written once more into new files, and the
//! unfinished files of the dead process are deleted when the sink opens again: each row is
//! in exactly one committed file. A database without checkpoints commits at close.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;

use laminardb_engine::sink::{Sink, SinkContext};
use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

use crate::format::Format;

const OPTIONS: &[&str] = &["path", "format", "prefix"];
const IN_PROGRESS: &str = ".inprogress";

enum Writer {
    Csv(arrow::csv::Writer<File>),
    Json(arrow::json::LineDelimitedWriter<File>),
    Parquet(ArrowWriter<File>),
}

impl Writer {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Writer::Csv(w) => w.write(batch)?,
            Writer::Json(w) => w.write(batch)?,
            Writer::Parquet(w) => w.write(batch).map_err(|e| Error::connector(format!("writing Parquet: {e}")))?,
        }
        Ok(())
    }

    /// Writes what is buffered and the format's footer; returns the file.
    fn finish(self) -> Result<File> {
        Ok(match self {
            Writer::Csv(w) => w.into_inner(),
            Writer::Json(mut w) => {
                w.finish()?;
                w.into_inner()
            }
            Writer::Parquet(w) => w.into_inner().map_err(|e| Error::connector(format!("finishing Parquet: {e}")))?,
        })
    }
}

/// One shard's instance.
pub struct FileSink {
    dir: PathBuf,
    format: Format,
    prefix: String,
    /// Unique to this instance (process, time, counter): no two instances name a file alike.
    token: String,
    /// Files committed by this instance, and their bytes.
    committed: u64,
    bytes: u64,
    /// The file being written, and its final name.
    open: Option<(Writer, String)>,
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

impl FileSink {
    /// The instance of a `CREATE SINK … WITH (connector = 'files', …)`: nothing is opened
    /// before the first row. Unfinished files of processes that have died are deleted
    /// (by a shard's instance, not the check at `CREATE`).
    pub fn create(options: &ConnectorOptions, context: &SinkContext) -> Result<Box<dyn Sink>> {
        options.check_known(OPTIONS)?;
        let dir = PathBuf::from(options.required("path")?);
        let format = Format::parse(options.get("format").unwrap_or("parquet"))?;
        let prefix = options.get("prefix").unwrap_or("part").to_string();
        if prefix.is_empty() || prefix.contains(['/', '\0']) || prefix.starts_with('.') {
            return Err(Error::connector(format!("files sink: prefix '{prefix}' must be a plain file name")));
        }
        if context.task.is_some() {
            remove_orphans(&dir, &prefix);
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let token = format!("{}-{nanos}-{}", std::process::id(), INSTANCES.fetch_add(1, Ordering::Relaxed));
        Ok(Box::new(FileSink { dir, format, prefix, token, committed: 0, bytes: 0, open: None }))
    }

    fn hidden(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}{IN_PROGRESS}"))
    }

    fn start_file(&mut self, batch: &RecordBatch) -> Result<()> {
        let name = format!("{}-{}-{:06}.{}", self.prefix, self.token, self.committed, self.format.ext());
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let path = self.hidden(&name);
        let file = File::create(&path).map_err(|e| io(&path, e))?;
        let writer = match self.format {
            Format::Csv => Writer::Csv(arrow::csv::WriterBuilder::new().with_header(true).build(file)),
            Format::Json => Writer::Json(arrow::json::LineDelimitedWriter::new(file)),
            Format::Parquet => Writer::Parquet(
                ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| Error::connector(format!("writing Parquet: {e}")))?,
            ),
        };
        self.open = Some((writer, name));
        Ok(())
    }

    /// Finishes the file being written, syncs it and renames it into place.
    fn commit(&mut self) -> Result<()> {
        let Some((writer, name)) = self.open.take() else { return Ok(()) };
        let hidden = self.hidden(&name);
        let file = writer.finish()?;
        file.sync_all().map_err(|e| io(&hidden, e))?;
        let size = file.metadata().map_err(|e| io(&hidden, e))?.len();
        let path = self.dir.join(&name);
        std::fs::rename(&hidden, &path).map_err(|e| io(&path, e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io(&self.dir, e))?;
        self.committed += 1;
        self.bytes += size;
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.open.is_none() {
            self.start_file(batch)?;
        }
        match self.open.as_mut() {
            Some((writer, _)) => writer.write(batch),
            None => Err(Error::internal("files sink: no file open after starting one")),
        }
    }

    fn checkpoint(&mut self, _id: u64) -> Result<()> {
        self.commit()
    }

    fn close(&mut self) -> Result<()> {
        self.commit()
    }

    fn bytes_out(&self) -> u64 {
        self.bytes
    }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::connector(format!("{}: {e}", path.display()))
}

/// Deletes `dir`'s unfinished files of `prefix` written by processes no longer running
/// (their rows since the last checkpoint are written again from the replay).
fn remove_orphans(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let start = format!(".{prefix}-");
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        let Some(rest) = name.strip_prefix(&start).filter(|_| name.ends_with(IN_PROGRESS)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::Int64Type;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn sink(dir: &Path, format: &str) -> Result<Box<dyn Sink>> {
        let options: BTreeMap<String, String> =
            [("path", dir.display().to_string()), ("format", format.to_string())].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let task = Some(laminardb_engine::dataflow::TaskInfo { shard: 0, shards: 1 });
        FileSink::create(&ConnectorOptions::for_sink("files", &options)?, &SinkContext { name: "s", task })
    }

    fn batch(from: i64, n: i64) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("sym", Arc::new(StringArray::from_iter_values((from..from + n).map(|i| format!("S{i}")))) as _),
            ("v", Arc::new(Int64Array::from_iter_values(from..from + n)) as _),
        ])
        .unwrap()
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("laminardb-file-sink-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The committed files' names, sorted, and the hidden ones.
    fn listing(dir: &Path) -> (Vec<String>, Vec<String>) {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names.into_iter().partition(|n| !n.starts_with('.'))
    }

    fn parquet_values(path: &Path) -> Vec<i64> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap().build().unwrap();
        reader.flat_map(|b| b.unwrap().column(1).as_primitive::<Int64Type>().values().to_vec()).collect()
    }

    #[test]
    fn files_appear_whole_at_each_checkpoint() {
        let dir = temp_dir("commit");
        let mut s = sink(&dir, "parquet").unwrap();
        s.write(&batch(0, 3)).unwrap();
        s.write(&batch(3, 2)).unwrap();
        let (committed, hidden) = listing(&dir);
        assert!(committed.is_empty() && hidden.len() == 1, "{committed:?} {hidden:?}");
        s.checkpoint(1).unwrap();
        s.checkpoint(2).unwrap(); // nothing new: no empty file
        s.write(&batch(5, 1)).unwrap();
        s.close().unwrap();
        let (committed, hidden) = listing(&dir);
        assert_eq!(committed.len(), 2, "{committed:?}");
        assert!(hidden.is_empty());
        assert_eq!(parquet_values(&dir.join(&committed[0])), vec![0, 1, 2, 3, 4]);
        assert_eq!(parquet_values(&dir.join(&committed[1])), vec![5]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn csv_and_json_lines_are_written_with_their_columns() {
        let dir = temp_dir("text");
        for format in ["csv", "json"] {
            let mut s = sink(&dir, format).unwrap();
            s.write(&batch(7, 2)).unwrap();
            s.close().unwrap();
        }
        let (committed, _) = listing(&dir);
        let text = |ext: &str| std::fs::read_to_string(dir.join(committed.iter().find(|n| n.ends_with(ext)).unwrap())).unwrap();
        assert_eq!(text(".csv"), "sym,v\nS7,7\nS8,8\n");
        assert_eq!(text(".jsonl"), "{\"sym\":\"S7\",\"v\":7}\n{\"sym\":\"S8\",\"v\":8}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unfinished_files_of_dead_processes_go_and_options_are_checked() {
        let dir = temp_dir("orphans");
        std::fs::create_dir_all(&dir).unwrap();
        // pid 4194304 is above the kernel's pid limit: never a live process.
        std::fs::write(dir.join(".part-4194304-1-0-000000.parquet.inprogress"), b"torn").unwrap();
        let live = format!(".part-{}-1-0-000000.parquet.inprogress", std::process::id());
        std::fs::write(dir.join(&live), b"another instance of this process").unwrap();
        sink(&dir, "parquet").unwrap();
        assert_eq!(listing(&dir).1, vec![live]);
        let e = |format: &str| sink(&dir, format).err().unwrap().message;
        assert!(e("xml").contains("format 'xml'"));
        let options: BTreeMap<String, String> = [("format".to_string(), "csv".to_string())].into_iter().collect();
        let missing = FileSink::create(&ConnectorOptions::for_sink("files", &options).unwrap(), &SinkContext { name: "s", task: None }).err().unwrap();
        assert!(missing.message.contains("needs the option 'path'"), "{}", missing.message);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
