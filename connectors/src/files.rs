//! The `files` source: the CSV, JSON (lines or an array) or Parquet files of a directory,
//! each read once, new ones picked up as they appear.
//!
//! ```sql
//! CREATE SOURCE trades (ts TIMESTAMP(3), symbol VARCHAR, price DOUBLE)
//! WITH (connector = 'files', path = '/data/trades/*.csv', poll_interval_ms = '500')
//! ```
//!
//! `path` is a directory (every file in it) or a directory and a file-name pattern with
//! `*` and `?`; `format` (`csv`, `json`, `parquet`) defaults to the pattern's extension.
//! Columns are matched by name and cast to the declared ones, as for an insert. Files whose
//! name starts with `.` are left out: write a file under such a name (or elsewhere) and
//! rename it into place, or a reader may see it half written.
//!
//! `splits` (default 1) sets how many shards read files: a split reads the files whose
//! name hashes to it, in name order. One split is read on one shard (keyed operators
//! downstream still spread the rows over every shard); with more, files decode in
//! parallel, but a split that has no files holds the watermark back until it has been
//! idle for `idle_timeout_ms`. A split's position (what a checkpoint records) is the files it has read and how many batches of
//! the file it is reading; after a restore it reads that file again from there. A file
//! that does not decode is skipped, counted in the source's errors and logged.
//!
//! The position names every file read so far: it grows by a name per file (a directory of
//! many small files makes checkpoints larger; nothing expires names yet).

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use laminardb_engine::ingest::{cast_to_schema, read_csv, read_json};
use laminardb_engine::source::{ConnectorOptions, SourceConnector, SplitPoll, SplitReader};
use laminardb_engine::{Error, Result};

use crate::format::Format;

const OPTIONS: &[&str] = &["path", "format", "poll_interval_ms", "splits"];

#[derive(Clone, Debug)]
pub struct FilesSource {
    dir: PathBuf,
    /// The file-name pattern (`*` for every file).
    pattern: String,
    format: Format,
    schema: SchemaRef,
    poll: Duration,
    splits: usize,
}

impl FilesSource {
    /// The connector of a `CREATE SOURCE … WITH (connector = 'files', …)`.
    pub fn create(options: &ConnectorOptions, declared: Option<&SchemaRef>) -> Result<Arc<dyn SourceConnector>> {
        options.check_known(OPTIONS)?;
        let path = options.required("path")?;
        let schema = declared.cloned().ok_or_else(|| {
            Error::connector("a files source needs its columns: CREATE SOURCE name (column type, …) WITH (connector = 'files', …)")
        })?;
        let (dir, pattern) = split_path(path)?;
        let format = match options.get("format") {
            Some(name) => Format::parse(name)?,
            None => match pattern.rsplit_once('.') {
                Some((_, ext)) if !ext.contains(['*', '?']) => Format::parse(ext)?,
                _ => return Err(Error::connector("files: give format = 'csv' | 'json' | 'parquet' (the path has no file extension)")),
            },
        };
        let poll = Duration::from_millis(options.parse("poll_interval_ms", 1000u64)?.max(1));
        let splits = options.parse("splits", 1usize)?;
        if !(1..=1024).contains(&splits) {
            return Err(Error::connector(format!("files: splits = {splits}: give 1 to 1024")));
        }
        Ok(Arc::new(FilesSource { dir, pattern, format, schema, poll, splits }))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every batch of file `name`, cast to the declared columns.
    fn load(&self, name: &str) -> Result<Vec<RecordBatch>> {
        let path = self.path(name);
        let io = |e: std::io::Error| Error::connector(format!("{}: {e}", path.display()));
        match self.format {
            Format::Csv | Format::Json => {
                let bytes = std::fs::read(&path).map_err(io)?;
                let text = String::from_utf8(bytes).map_err(|_| Error::connector("not UTF-8 text"))?;
                if text.trim().is_empty() {
                    return Ok(Vec::new());
                }
                match self.format {
                    Format::Csv => read_csv(&text, &self.schema),
                    _ => read_json(&text, &self.schema),
                }
            }
            Format::Parquet => {
                let file = std::fs::File::open(&path).map_err(io)?;
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .and_then(|b| b.build())
                    .map_err(|e| Error::connector(format!("not Parquet: {e}")))?;
                reader
                    .map(|batch| {
                        let batch = batch.map_err(|e| Error::connector(format!("reading Parquet: {e}")))?;
                        cast_to_schema(&batch, &self.schema)
                    })
                    .collect()
            }
        }
    }
}

/// `path` as a directory and a file-name pattern.
fn split_path(path: &str) -> Result<(PathBuf, String)> {
    let path = Path::new(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let wild = |s: &str| s.contains(['*', '?']);
    let (dir, pattern) = if wild(name) { (path.parent().unwrap_or(Path::new(".")), name.to_string()) } else { (path, "*".to_string()) };
    if wild(&dir.to_string_lossy()) {
        return Err(Error::connector(format!("files: '{}': wildcards go in the file name only", path.display())));
    }
    Ok((dir.to_path_buf(), pattern))
}

/// Whether `name` matches `pattern` (`*`: any run of characters, `?`: one).
fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j) = (0, 0);
    // The last `*` seen and the name position it was tried at, to backtrack to.
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((s, at)) = star {
            i = s + 1;
            j = at + 1;
            star = Some((s, at + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// The split that reads file `name` (FNV-1a of the name: the same in every process).
fn owner(name: &str, splits: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % splits.max(1) as u64) as usize
}

/// What a checkpoint records of a split (JSON).
#[derive(Serialize, Deserialize, Default)]
struct Position {
    done: Vec<String>,
    /// The file being read and how many of its batches were.
    current: Option<(String, usize)>,
}

impl SourceConnector for FilesSource {
    fn name(&self) -> &'static str {
        "files"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn splits(&self, _shards: usize) -> Result<usize> {
        Ok(self.splits)
    }

    fn open(&self, split: usize, splits: usize, position: Option<&[u8]>) -> Result<Box<dyn SplitReader>> {
        let position: Position = match position {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| Error::checkpoint(format!("files split {split}: a recorded position that does not parse: {e}")))?,
            None => Position::default(),
        };
        let source = self.clone();
        let mut queue = VecDeque::new();
        if let Some((name, _)) = &position.current {
            queue.push_back(name.clone());
        }
        Ok(Box::new(FilesSplit {
            source,
            split,
            splits,
            done: position.done.into_iter().collect(),
            queue,
            resume: position.current,
            current: None,
            next_scan: Instant::now(),
            missing_said: false,
        }))
    }
}

/// The file being read: its batches not yet returned.
struct Current {
    name: String,
    batches: VecDeque<RecordBatch>,
    read: usize,
}

struct FilesSplit {
    source: FilesSource,
    split: usize,
    splits: usize,
    /// Files read to the end (or skipped).
    done: BTreeSet<String>,
    /// New files the last scan found, in name order.
    queue: VecDeque<String>,
    /// The restored file being read and how many of its batches were.
    resume: Option<(String, usize)>,
    current: Option<Current>,
    next_scan: Instant,
    /// The directory was missing at a scan, and the split said so.
    missing_said: bool,
}

/// What a scan found.
#[derive(PartialEq)]
enum Scan {
    Done,
    /// The directory does not exist (said once until it does).
    Missing,
}

impl FilesSplit {
    /// Queues this split's files that are new since the last scan. A directory that does
    /// not exist has none yet; the first scan that finds it missing says so (`Missing`).
    fn scan(&mut self) -> Result<Scan> {
        let dir = &self.source.dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(if std::mem::replace(&mut self.missing_said, true) { Scan::Done } else { Scan::Missing });
            }
            Err(e) => return Err(Error::connector(format!("listing {}: {e}", dir.display()))),
        };
        let mut found: Vec<String> = Vec::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name.starts_with('.') || !matches(&self.source.pattern, &name) || owner(&name, self.splits) != self.split {
                continue;
            }
            if self.done.contains(&name) || self.queue.contains(&name) || self.current.as_ref().is_some_and(|c| c.name == name) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()) {
                found.push(name);
            }
        }
        found.sort();
        self.queue.extend(found);
        self.missing_said = false;
        Ok(Scan::Done)
    }
}

impl SplitReader for FilesSplit {
    fn poll(&mut self) -> Result<SplitPoll> {
        loop {
            if let Some(current) = self.current.as_mut() {
                if let Some(batch) = current.batches.pop_front() {
                    current.read += 1;
                    return Ok(SplitPoll::Rows(batch));
                }
                let name = std::mem::take(&mut current.name);
                self.done.insert(name);
                self.current = None;
            }
            if let Some(name) = self.queue.pop_front() {
                let skip = match self.resume.take() {
                    Some((resumed, read)) if resumed == name => read,
                    other => {
                        self.resume = other;
                        0
                    }
                };
                match self.source.load(&name) {
                    Ok(batches) => {
                        let batches: VecDeque<RecordBatch> = batches.into_iter().skip(skip).collect();
                        self.current = Some(Current { name, batches, read: skip });
                    }
                    Err(e) => {
                        let what = format!("the file {}: {}", self.source.path(&name).display(), e.message);
                        self.done.insert(name);
                        return Ok(SplitPoll::Skipped(what));
                    }
                }
                continue;
            }
            let now = Instant::now();
            if now < self.next_scan {
                return Ok(SplitPoll::Pending(self.next_scan - now));
            }
            self.next_scan = now + self.source.poll;
            if self.scan()? == Scan::Missing {
                let what = format!("nothing: the directory {} does not exist (yet)", self.source.dir.display());
                return Ok(SplitPoll::Skipped(what));
            }
            if self.queue.is_empty() {
                return Ok(SplitPoll::Pending(self.source.poll));
            }
        }
    }

    fn position(&self) -> Vec<u8> {
        let position = Position {
            done: self.done.iter().cloned().collect(),
            current: self.current.as_ref().map(|c| (c.name.clone(), c.read)),
        };
        serde_json::to_vec(&position).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("sym", DataType::Utf8, true), Field::new("v", DataType::Int64, true)]))
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("laminardb-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn source(options: &[(&str, &str)]) -> Result<Arc<dyn SourceConnector>> {
        let options: BTreeMap<String, String> = options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        FilesSource::create(&ConnectorOptions::new("files", &options)?, Some(&schema()))
    }

    /// Polls until the split waits; the values read and what was skipped.
    fn drain(reader: &mut dyn SplitReader) -> (Vec<i64>, Vec<String>) {
        let (mut values, mut skipped) = (Vec::new(), Vec::new());
        loop {
            match reader.poll().unwrap() {
                SplitPoll::Rows(batch) => values.extend(batch.column(1).as_primitive::<Int64Type>().values().iter().copied()),
                SplitPoll::Skipped(what) => skipped.push(what),
                SplitPoll::Pending(_) | SplitPoll::End => return (values, skipped),
            }
        }
    }

    #[test]
    fn patterns_match_names() {
        assert!(matches("*.csv", "a.csv") && matches("*", "x") && matches("t?.json", "t1.json"));
        assert!(matches("a*b*c", "aXbYbc") && matches("*", ""));
        assert!(!matches("*.csv", "a.csv.tmp") && !matches("t?.json", "t10.json") && !matches("a*b", "ac"));
    }

    #[test]
    fn options_are_checked_when_the_source_is_created() {
        let need = |o: &[(&str, &str)]| source(o).unwrap_err().message;
        assert!(need(&[]).contains("needs the option 'path'"));
        assert!(need(&[("path", "/x/*.csv"), ("speed", "1")]).contains("no option 'speed'"));
        assert!(need(&[("path", "/x")]).contains("give format"));
        assert!(need(&[("path", "/x/*.xml")]).contains("format 'xml'"));
        assert!(need(&[("path", "/x/*/a.csv")]).contains("file name only"));
        assert!(need(&[("path", "/x/*.csv"), ("poll_interval_ms", "soon")]).contains("'poll_interval_ms' = 'soon'"));
        assert!(need(&[("path", "/x/*.csv"), ("splits", "0")]).contains("splits = 0"));
        let options: BTreeMap<String, String> = [("path".to_string(), "/x/*.csv".to_string())].into_iter().collect();
        let e = FilesSource::create(&ConnectorOptions::new("files", &options).unwrap(), None).unwrap_err();
        assert!(e.message.contains("needs its columns"), "{}", e.message);
        source(&[("path", "/x"), ("format", "JSON")]).unwrap();
    }

    #[test]
    fn files_are_read_once_in_name_order_and_new_ones_as_they_appear() {
        let dir = temp_dir("order");
        std::fs::write(dir.join("b.csv"), "sym,v\nB,3\nB,4\n").unwrap();
        std::fs::write(dir.join("a.csv"), "v,sym\n1,A\n2,A\n").unwrap();
        std::fs::write(dir.join(".c.csv"), "sym,v\nC,99\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a csv").unwrap();
        let path = format!("{}/*.csv", dir.display());
        let files = source(&[("path", &path), ("poll_interval_ms", "1")]).unwrap();
        let mut reader = files.open(0, 1, None).unwrap();
        assert_eq!(drain(reader.as_mut()), (vec![1, 2, 3, 4], vec![]));
        std::fs::write(dir.join("c.csv"), "sym,v\nC,5\n").unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(drain(reader.as_mut()).0, vec![5]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(drain(reader.as_mut()).0, Vec::<i64>::new(), "nothing read twice");
        // Reopened at its position, the split reads only what is new.
        let position = reader.position();
        std::fs::write(dir.join("d.csv"), "sym,v\nD,6\n").unwrap();
        let mut reopened = files.open(0, 1, Some(&position)).unwrap();
        assert_eq!(drain(reopened.as_mut()).0, vec![6]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_part_read_goes_on_from_its_batch_and_a_bad_file_is_skipped() {
        let dir = temp_dir("resume");
        // 20,000 rows: the CSV reader makes batches of 1,024.
        let rows: String = (0..20_000).map(|i| format!("S,{i}\n")).collect();
        std::fs::write(dir.join("a.csv"), format!("sym,v\n{rows}")).unwrap();
        std::fs::write(dir.join("b.csv"), "sym,v\nS,oops\n").unwrap();
        std::fs::write(dir.join("c.json"), "{\"sym\": \"J\", \"v\": 7}\n{\"sym\": \"J\", \"v\": 8}\n").unwrap();
        let csv = source(&[("path", &format!("{}/*.csv", dir.display()))]).unwrap();
        let mut reader = csv.open(0, 1, None).unwrap();
        let SplitPoll::Rows(first) = reader.poll().unwrap() else { panic!("rows first") };
        let position = reader.position();
        let mut reopened = csv.open(0, 1, Some(&position)).unwrap();
        let (rest, skipped) = drain(reopened.as_mut());
        assert_eq!(first.num_rows() + rest.len(), 20_000);
        assert_eq!(rest.first().copied(), Some(first.num_rows() as i64), "the rest starts after the first batch");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("b.csv") && skipped[0].contains("oops"), "{}", skipped[0]);
        let json = source(&[("path", &format!("{}/*.json", dir.display()))]).unwrap();
        assert_eq!(drain(json.open(0, 1, None).unwrap().as_mut()).0, vec![7, 8]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_directory_is_said_once_and_read_once_it_exists() {
        let dir = temp_dir("missing");
        std::fs::remove_dir_all(&dir).unwrap();
        let files = source(&[("path", &format!("{}/*.csv", dir.display())), ("poll_interval_ms", "1")]).unwrap();
        let mut reader = files.open(0, 1, None).unwrap();
        let (values, skipped) = drain(reader.as_mut());
        assert!(values.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("does not exist"), "{}", skipped[0]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(drain(reader.as_mut()), (vec![], vec![]), "said once");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.csv"), "sym,v\nA,1\n").unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(drain(reader.as_mut()).0, vec![1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_file_belongs_to_one_split() {
        let dir = temp_dir("splits");
        for i in 0..20 {
            std::fs::write(dir.join(format!("f{i:02}.csv")), format!("sym,v\nS,{i}\n")).unwrap();
        }
        let files = source(&[("path", &dir.display().to_string()), ("format", "csv")]).unwrap();
        let mut all: Vec<i64> = (0..3).flat_map(|split| drain(files.open(split, 3, None).unwrap().as_mut()).0).collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parquet_files_are_read_and_cast() {
        use datafusion::parquet::arrow::ArrowWriter;
        let dir = temp_dir("parquet");
        let written = Arc::new(Schema::new(vec![Field::new("v", DataType::Int32, false), Field::new("sym", DataType::Utf8, false)]));
        let batch = RecordBatch::try_new(
            written.clone(),
            vec![Arc::new(arrow::array::Int32Array::from(vec![10, 11])), Arc::new(arrow::array::StringArray::from(vec!["P", "Q"]))],
        )
        .unwrap();
        let file = std::fs::File::create(dir.join("x.parquet")).unwrap();
        let mut writer = ArrowWriter::try_new(file, written, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let files = source(&[("path", &format!("{}/*.parquet", dir.display()))]).unwrap();
        assert_eq!(drain(files.open(0, 1, None).unwrap().as_mut()).0, vec![10, 11]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
