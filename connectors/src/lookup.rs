//! Lookup tables' connectors (`CREATE LOOKUP TABLE … WITH (connector = …)`, see
//! `laminardb_engine::lookup`).
//!
//! * `postgres`: a PostgreSQL table (`connection`, `table`). One client per lookup table,
//!   connected when first used and again after it fails, on the connectors' runtime. A
//!   fetch is one query for all the keys a batch misses: the table joined to `unnest` of
//!   one array per key column. Values come back in the binary protocol, each column cast
//!   on the server to the form its declared type reads (timestamps as epoch microseconds).
//! * `parquet`: a Parquet file read once into memory with an index per set of key
//!   columns; nothing is cached beside it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, RecordBatch, StringBuilder, UInt32Array,
};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use parking_lot::Mutex;
use tokio_postgres::types::ToSql;

use laminardb_engine::lookup::LookupSource;
use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

/// How long a lookup waits for PostgreSQL before it gives up.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Rows per batch of a scan.
const SCAN_BATCH: usize = 65_536;

/// Runs `work` on the connectors' runtime and waits for it (from any thread: a shard's, or
/// a blocking thread of the query pool).
fn block_on<T: Send + 'static>(work: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    crate::runtime()?.spawn(async move {
        let _ = tx.send(tokio::time::timeout(TIMEOUT, work).await);
    });
    match rx.recv() {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Error::connector(format!("postgres lookup: no answer within {} s", TIMEOUT.as_secs()))),
        Err(_) => Err(Error::connector("postgres lookup: the connectors' runtime stopped")),
    }
}

/// A PostgreSQL error with the server's message (`Display` says only "db error").
fn pg_error(table: &str, e: &tokio_postgres::Error) -> Error {
    let detail = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    };
    Error::connector(format!("postgres lookup of {table}: {detail}"))
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The PostgreSQL array type a key of `data_type` is sent as.
fn key_array_type(data_type: &DataType) -> Option<&'static str> {
    Some(match data_type {
        DataType::Boolean => "bool[]",
        DataType::Int16 => "int2[]",
        DataType::Int32 => "int4[]",
        DataType::Int64 => "int8[]",
        DataType::Float32 => "float4[]",
        DataType::Float64 => "float8[]",
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text[]",
        _ => return None,
    })
}

/// Column `name` as the select list reads it for `data_type`.
fn select_expr(name: &str, data_type: &DataType) -> Option<String> {
    let c = format!("t.{}", quote(name));
    Some(match data_type {
        DataType::Boolean => format!("{c}::bool"),
        DataType::Int16 => format!("{c}::int2"),
        DataType::Int32 => format!("{c}::int4"),
        DataType::Int64 => format!("{c}::int8"),
        DataType::Float32 => format!("{c}::float4"),
        DataType::Float64 => format!("{c}::float8"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => format!("{c}::text"),
        DataType::Timestamp(_, _) => format!("(extract(epoch from {c}) * 1000000)::int8"),
        DataType::Date32 => format!("({c} - date '1970-01-01')::int4"),
        _ => return None,
    })
}

/// A PostgreSQL table.
pub struct PostgresLookup {
    schema: SchemaRef,
    table: String,
    select: String,
    client: Arc<Client>,
}

/// The table's connection, shared with the tasks that use it on the connectors' runtime.
struct Client {
    connection: String,
    table: String,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Prepared fetches, by key columns.
    statements: Mutex<HashMap<String, tokio_postgres::Statement>>,
}

impl std::fmt::Debug for PostgresLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLookup").field("table", &self.table).finish()
    }
}

impl PostgresLookup {
    pub fn create(options: &ConnectorOptions, schema: &SchemaRef) -> Result<Arc<dyn LookupSource>> {
        options.check_known(&["connection", "table"])?;
        let connection = options.required("connection")?.to_string();
        connection
            .parse::<tokio_postgres::Config>()
            .map_err(|e| Error::connector(format!("postgres lookup: connection '{connection}': {e}")))?;
        let table = options.required("table")?.split('.').map(quote).collect::<Vec<_>>().join(".");
        let mut select = Vec::new();
        for f in schema.fields() {
            select.push(select_expr(f.name(), f.data_type()).ok_or_else(|| {
                Error::connector(format!(
                    "postgres lookup: column '{}' is {}; a postgres lookup table's columns are BOOLEAN, SMALLINT, INT, \
                     BIGINT, REAL, DOUBLE, VARCHAR, TIMESTAMP or DATE",
                    f.name(),
                    f.data_type()
                ))
            })?);
        }
        let client = Arc::new(Client {
            connection,
            table: table.clone(),
            client: tokio::sync::Mutex::new(None),
            statements: Mutex::new(HashMap::new()),
        });
        Ok(Arc::new(PostgresLookup { schema: schema.clone(), table, select: select.join(", "), client }))
    }

    /// The rows as a batch of the declared schema.
    fn to_batch(&self, rows: &[tokio_postgres::Row]) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        let bad = |e: tokio_postgres::Error| pg_error(&self.table, &e);
        for (i, f) in self.schema.fields().iter().enumerate() {
            macro_rules! read {
                ($builder:ty, $t:ty) => {{
                    let mut b = <$builder>::with_capacity(rows.len());
                    for row in rows {
                        b.append_option(row.try_get::<_, Option<$t>>(i).map_err(bad)?);
                    }
                    Arc::new(b.finish()) as ArrayRef
                }};
            }
            let array = match f.data_type() {
                DataType::Boolean => read!(BooleanBuilder, bool),
                DataType::Int16 => read!(Int16Builder, i16),
                DataType::Int32 => read!(Int32Builder, i32),
                DataType::Int64 => read!(Int64Builder, i64),
                DataType::Float32 => read!(Float32Builder, f32),
                DataType::Float64 => read!(Float64Builder, f64),
                DataType::Date32 => read!(Date32Builder, i32),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 8);
                    for row in rows {
                        b.append_option(row.try_get::<_, Option<&str>>(i).map_err(bad)?);
                    }
                    Arc::new(b.finish()) as ArrayRef
                }
                DataType::Timestamp(unit, _) => {
                    let mut b = Int64Builder::with_capacity(rows.len());
                    for row in rows {
                        let micros = row.try_get::<_, Option<i64>>(i).map_err(bad)?;
                        b.append_option(micros.map(|v| match unit {
                            TimeUnit::Second => v.div_euclid(1_000_000),
                            TimeUnit::Millisecond => v.div_euclid(1_000),
                            TimeUnit::Microsecond => v,
                            TimeUnit::Nanosecond => v.saturating_mul(1_000),
                        }));
                    }
                    Arc::new(b.finish()) as ArrayRef
                }
                other => return Err(Error::internal(format!("postgres lookup: column type {other}"))),
            };
            columns.push(if array.data_type() == f.data_type() { array } else { cast(&array, f.data_type())? });
        }
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.len())),
        )?)
    }
}

impl Client {
    /// Runs `sql` with `params` on the table's client (connecting first if it has none; a
    /// client whose connection ended is replaced); `keep`: the statement is prepared once
    /// per connection (a fetch's text depends only on its key columns and types).
    async fn query(self: Arc<Self>, keep: bool, sql: String, params: Vec<Box<dyn ToSql + Send + Sync>>) -> Result<Vec<tokio_postgres::Row>> {
        let fail = |e: tokio_postgres::Error| pg_error(&self.table, &e);
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.lock().clear();
            let (made, connection) = tokio_postgres::connect(&self.connection, tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    log::warn!("postgres lookup connection ended: {e}");
                }
            });
            *client = Some(made);
        }
        let c = client.as_ref().expect("connected above");
        let known = self.statements.lock().get(&sql).cloned();
        let statement = match known {
            Some(s) => s,
            None => {
                let s = c.prepare(&sql).await.map_err(fail)?;
                if keep {
                    self.statements.lock().insert(sql, s.clone());
                }
                s
            }
        };
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        c.query(&statement, &refs).await.map_err(fail)
    }

}

/// One key column's values as a PostgreSQL array parameter.
fn key_param(array: &ArrayRef) -> Result<Box<dyn ToSql + Send + Sync>> {
    macro_rules! values {
        ($t:ty) => {{
            let a = array.as_primitive::<$t>();
            Box::new((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i))).collect::<Vec<_>>())
        }};
    }
    Ok(match array.data_type() {
        DataType::Boolean => {
            let a = array.as_boolean();
            Box::new((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i))).collect::<Vec<_>>())
        }
        DataType::Int16 => values!(arrow::datatypes::Int16Type),
        DataType::Int32 => values!(arrow::datatypes::Int32Type),
        DataType::Int64 => values!(arrow::datatypes::Int64Type),
        DataType::Float32 => values!(arrow::datatypes::Float32Type),
        DataType::Float64 => values!(arrow::datatypes::Float64Type),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let a = cast(array, &DataType::Utf8)?;
            let a = a.as_string::<i32>();
            Box::new((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_string())).collect::<Vec<_>>())
        }
        other => return Err(Error::unsupported(format!("a postgres lookup key of type {other}"))),
    })
}

impl LookupSource for PostgresLookup {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn check_key(&self, data_type: &DataType) -> Result<()> {
        match key_array_type(data_type) {
            Some(_) => Ok(()),
            None => Err(Error::unsupported(format!(
                "joining a postgres lookup table on a key of type {data_type} (keys are BOOLEAN, integers, floats or text)"
            ))),
        }
    }

    fn fetch(&self, columns: &[usize], keys: &RecordBatch) -> Result<RecordBatch> {
        let mut types = Vec::with_capacity(columns.len());
        let mut on = Vec::with_capacity(columns.len());
        let mut params = Vec::with_capacity(columns.len());
        for (i, (&c, key)) in columns.iter().zip(keys.columns()).enumerate() {
            let array = key_array_type(key.data_type())
                .ok_or_else(|| Error::unsupported(format!("a postgres lookup key of type {}", key.data_type())))?;
            types.push(format!("${}::{array}", i + 1));
            on.push(format!("t.{} = k.k{i}", quote(self.schema.field(c).name())));
            params.push(key_param(key)?);
        }
        let names = (0..columns.len()).map(|i| format!("k{i}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT {} FROM {} AS t JOIN unnest({}) AS k({names}) ON {}",
            self.select,
            self.table,
            types.join(", "),
            on.join(" AND ")
        );
        let rows = block_on(self.client.clone().query(true, sql, params))?;
        self.to_batch(&rows)
    }

    fn scan(&self) -> Result<Vec<RecordBatch>> {
        let sql = format!("SELECT {} FROM {} AS t", self.select, self.table);
        let rows = block_on(self.client.clone().query(false, sql, Vec::new()))?;
        rows.chunks(SCAN_BATCH).map(|chunk| self.to_batch(chunk)).collect()
    }

    fn check(&self) -> Result<()> {
        let sql = format!("SELECT {} FROM {} AS t LIMIT 0", self.select, self.table);
        block_on(self.client.clone().query(false, sql, Vec::new())).map(|_| ())
    }
}

/// A Parquet file, read into memory when first used (a file missing when the database
/// reopens fails the joins that use it, not the open).
#[derive(Debug)]
pub struct ParquetLookup {
    schema: SchemaRef,
    path: String,
    rows: Mutex<Option<RecordBatch>>,
    /// Row indices by key, per key columns and the types they are compared in.
    indexes: Mutex<HashMap<(Vec<usize>, Vec<DataType>), Arc<Index>>>,
}

type Index = HashMap<Box<[u8]>, Vec<u32>, ahash::RandomState>;

impl ParquetLookup {
    pub fn create(options: &ConnectorOptions, schema: &SchemaRef) -> Result<Arc<dyn LookupSource>> {
        options.check_known(&["path"])?;
        let path = options.required("path")?.to_string();
        Ok(Arc::new(ParquetLookup {
            schema: schema.clone(),
            path,
            rows: Mutex::new(None),
            indexes: Mutex::new(HashMap::new()),
        }))
    }

    /// Every row, read the first time.
    fn rows(&self) -> Result<RecordBatch> {
        let mut rows = self.rows.lock();
        if let Some(r) = rows.as_ref() {
            return Ok(r.clone());
        }
        let fail = |e: &dyn std::fmt::Display| Error::connector(format!("parquet lookup '{}': {e}", self.path));
        let file = std::fs::File::open(&self.path).map_err(|e| fail(&e))?;
        let reader = datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| fail(&e))?;
        let batches = reader
            .map(|b| laminardb_engine::ingest::cast_to_schema(&b.map_err(|e| fail(&e))?, &self.schema))
            .collect::<Result<Vec<_>>>()?;
        let all = concat_batches(&self.schema, &batches)?;
        *rows = Some(all.clone());
        Ok(all)
    }
}

impl LookupSource for ParquetLookup {
    fn name(&self) -> &'static str {
        "parquet"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn fetch(&self, columns: &[usize], keys: &RecordBatch) -> Result<RecordBatch> {
        let rows = self.rows()?;
        let types: Vec<DataType> = keys.columns().iter().map(|c| c.data_type().clone()).collect();
        let converter = RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())?;
        let index = {
            let mut indexes = self.indexes.lock();
            match indexes.get(&(columns.to_vec(), types.clone())) {
                Some(index) => index.clone(),
                None => {
                    let key_columns = columns
                        .iter()
                        .zip(&types)
                        .map(|(&c, t)| cast(rows.column(c), t))
                        .collect::<Result<Vec<_>, _>>()?;
                    let encoded = converter.convert_columns(&key_columns)?;
                    let mut index = Index::default();
                    for (r, key) in encoded.iter().enumerate() {
                        if key_columns.iter().all(|c| c.is_valid(r)) {
                            index.entry(key.as_ref().into()).or_default().push(r as u32);
                        }
                    }
                    let index = Arc::new(index);
                    indexes.insert((columns.to_vec(), types), index.clone());
                    index
                }
            }
        };
        let wanted = converter.convert_columns(keys.columns())?;
        let found: Vec<u32> = wanted.iter().filter_map(|k| index.get(k.as_ref())).flatten().copied().collect();
        let indices = UInt32Array::from(found);
        let columns = rows.columns().iter().map(|c| take(c, &indices, None)).collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(indices.len())),
        )?)
    }

    fn scan(&self) -> Result<Vec<RecordBatch>> {
        Ok(vec![self.rows()?])
    }

    fn cached(&self) -> bool {
        false
    }

    fn check(&self) -> Result<()> {
        self.rows().map(|_| ())
    }
}
