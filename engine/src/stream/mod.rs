//! Continuous queries: the plan a `CREATE STREAM` compiles to, and the operators that run
//! it incrementally on the shards.
//!
//! A [`StreamPlan`] is a [`Dag`] of operators (`crate::dataflow`): stateless
//! [`MapPlan`]s (filter, then projection) that run where their rows are, and keyed
//! operators — [`AggPlan`] ([`op::AggOperator`]: vectorized per-group state, emitting as
//! the [`Emit`] mode says) and [`JoinPlan`] ([`join::JoinOperator`]) — that read their
//! input over an exchange by key. Expressions are DataFusion physical expressions, so any
//! scalar expression DataFusion can evaluate works in a stream.
//!
//! The plan is rebuilt from the `CREATE STREAM` text (kept in the catalog), which is its
//! serialized form: planning is deterministic for a given catalog.

pub mod agg;
pub mod asof;
pub mod isolate;
pub mod interval;
pub mod join;
pub mod lookup;
pub mod map;
pub mod op;
pub mod rank;
pub mod output;
pub mod time;
pub mod topn;
pub mod user_agg;
pub mod window;

use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::physical_expr::PhysicalExpr;

use crate::dataflow::Dag;

pub use window::WindowKind;

pub type PhysExpr = Arc<dyn PhysicalExpr>;

/// The name of the trailing change-type column of a changelog stream.
pub const OP_COLUMN: &str = "_op";
/// Change types, as in Flink's RowKind short strings.
pub const OP_INSERT: &str = "+I";
pub const OP_RETRACT: &str = "-U";
pub const OP_UPDATE: &str = "+U";
pub const OP_DELETE: &str = "-D";

/// When a stream emits its aggregate rows.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Emit {
    /// Each window once, final, when the watermark passes its end plus the allowed
    /// lateness: the default for windows. `EMIT ON WINDOW CLOSE` and `EMIT FINAL` are the
    /// same, so an append-only stream never holds two rows for one window.
    AfterWatermark,
    OnWindowClose,
    /// Every change, as a changelog with retractions (`EMIT ON UPDATE`, `EMIT CHANGES`);
    /// the default for a `GROUP BY` without a window.
    Changes,
    /// The changes since the last emission, as a changelog, every this many milliseconds of
    /// processing time (`EMIT EVERY INTERVAL …`).
    Every(i64),
}

/// A stateless stage: optional filter, then the projection (a [`map::MapOperator`]).
#[derive(Clone, Debug)]
pub struct MapPlan {
    pub filter: Option<PhysExpr>,
    pub exprs: Vec<PhysExpr>,
    pub schema: SchemaRef,
}

/// How a column of the aggregate output is produced.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GroupCol {
    /// The n-th group key.
    Key(usize),
    WindowStart,
    WindowEnd,
}

/// An aggregate function, on its canonical value domain.
#[derive(Copy, Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AggKind {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    First,
    Last,
    CountDistinct,
    StddevSamp,
    StddevPop,
    VarSamp,
    VarPop,
    /// A function the user registered (`AggCall::user`).
    User,
}

/// The domain an aggregate argument is computed in: integers (and timestamps, dates),
/// floats, or strings.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Domain {
    Int,
    Float,
    Str,
}

impl Domain {
    pub fn of(data_type: &DataType) -> Option<Domain> {
        use DataType as T;
        match data_type {
            T::Float16 | T::Float32 | T::Float64 | T::Decimal128(..) | T::Decimal256(..) => Some(Domain::Float),
            T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32 | T::UInt64 => Some(Domain::Int),
            T::Timestamp(..) | T::Date32 | T::Date64 | T::Time32(_) | T::Time64(_) | T::Duration(_) => Some(Domain::Int),
            T::Boolean => Some(Domain::Int),
            T::Utf8 | T::LargeUtf8 | T::Utf8View => Some(Domain::Str),
            T::Null => Some(Domain::Int),
            _ => None,
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            Domain::Int => DataType::Int64,
            Domain::Float => DataType::Float64,
            Domain::Str => DataType::Utf8,
        }
    }
}

#[derive(Clone, Debug)]
pub struct AggCall {
    pub kind: AggKind,
    /// Column of the branch output holding the argument; `None` for `COUNT(*)`.
    pub arg: Option<usize>,
    pub domain: Domain,
    /// The type DataFusion gives this aggregate's result.
    pub out_type: DataType,
    /// `AggKind::User`: the function, and the columns holding its arguments.
    pub user: Option<UserCall>,
}

#[derive(Clone, Debug)]
pub struct UserCall {
    pub function: Arc<dyn crate::functions::UserAggregate>,
    pub args: Vec<usize>,
    pub arg_types: Vec<DataType>,
}

#[derive(Clone, Debug)]
pub struct AggPlan {
    /// The rows it reads: group keys first, then the event time (with a window), then
    /// the aggregates' arguments.
    pub input: SchemaRef,
    /// Number of group keys: the first columns of the input.
    pub keys: usize,
    /// The window, whose event time is branch column `keys`.
    pub window: Option<WindowKind>,
    /// Type of `window_start` / `window_end` (that of the event-time column).
    pub window_type: DataType,
    pub calls: Vec<AggCall>,
    /// The aggregate's own output, in DataFusion's order: group columns, then aggregates.
    pub agg_schema: SchemaRef,
    pub layout: Vec<GroupCol>,
    pub having: Option<PhysExpr>,
    /// The `SELECT` list over `agg_schema`.
    pub output: Vec<PhysExpr>,
    /// Reading a changelog stream: the input column holding each row's change type
    /// (`+I`/`+U` add the row, `-U`/`-D` take it back). Only COUNT, SUM and AVG run so.
    pub retract: Option<usize>,
    pub emit: Emit,
    pub lateness_ms: i64,
    /// What it emits: the `SELECT` list's schema, plus [`OP_COLUMN`] for a changelog.
    pub schema: SchemaRef,
}

impl AggPlan {
    /// Emits a changelog (`EMIT CHANGES`, `EMIT EVERY`) rather than final rows.
    pub fn is_changelog(&self) -> bool {
        matches!(self.emit, Emit::Changes | Emit::Every(_))
    }
}

/// An inner equi-join of two append-only inputs: port 0 (left) and port 1 (right) each
/// read `[keys…, every input column…]`; rows travel to the shard owning their key,
/// where one [`join::JoinOperator`] keeps both sides' rows and emits each matching pair
/// once, when the later of the two arrives.
#[derive(Clone, Debug)]
pub struct JoinPlan {
    /// Number of equi-join keys: the first columns of both inputs, of the same types on
    /// both sides (so they hash alike).
    pub keys: usize,
    /// The keys' types.
    pub key_types: Vec<DataType>,
    /// Conditions beyond the key equalities, over the joined row (left input columns, then
    /// right input columns: DataFusion's join schema).
    pub residual: Option<PhysExpr>,
    /// The joined row's schema.
    pub joined_schema: SchemaRef,
    /// The `SELECT` list over the joined row.
    pub output: Vec<PhysExpr>,
    /// What it emits.
    pub schema: SchemaRef,
    /// A plain join's bound (`WITH (state_ttl = …)`): each row is kept this many
    /// milliseconds of processing time after it arrived (`None`: for the stream's life).
    pub state_ttl_ms: Option<i64>,
    /// `[LEFT, RIGHT]` (both: `FULL`) of a plain join (no time bound): the join emits a
    /// changelog, a preserved row without a partner padded with NULLs until its first
    /// partner arrives and retracts it; `schema` then ends with the change column.
    pub outer: [bool; 2],
}

impl JoinPlan {
    /// LEFT, RIGHT or FULL: the join emits a changelog.
    pub fn is_outer(&self) -> bool {
        self.outer.contains(&true)
    }

    /// The indices of `joined`'s rows the residual condition keeps, ascending (every row
    /// without one; NULL does not keep a row).
    pub fn passing(&self, joined: &RecordBatch) -> crate::error::Result<Vec<usize>> {
        let Some(residual) = &self.residual else { return Ok((0..joined.num_rows()).collect()) };
        let mask = residual.evaluate(joined)?.into_array(joined.num_rows())?;
        let mask = mask.as_boolean_opt().ok_or_else(|| crate::error::Error::query("a join condition must be boolean"))?;
        Ok((0..joined.num_rows()).filter(|&i| mask.is_valid(i) && mask.value(i)).collect())
    }

    /// Joined rows from `columns` (the left input's without keys, then the right's; or
    /// the left's alone, as `schema` says), each cast where its input's type differs.
    pub fn conform(schema: &SchemaRef, columns: Vec<ArrayRef>, rows: usize) -> crate::error::Result<RecordBatch> {
        let columns = columns
            .into_iter()
            .zip(schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c) } else { arrow::compute::cast(&c, f.data_type()) })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &RecordBatchOptions::new().with_row_count(Some(rows)))?)
    }

    /// Rows of `side` (its input's columns without the keys) with the other side's
    /// columns NULL, as joined rows.
    pub fn padded(&self, side: usize, own: &[ArrayRef], rows: usize) -> crate::error::Result<RecordBatch> {
        let fields = self.joined_schema.fields();
        let nulls = |range: std::ops::Range<usize>| fields[range].iter().map(|f| new_null_array(f.data_type(), rows));
        let columns: Vec<ArrayRef> = if side == 0 {
            own.iter().cloned().chain(nulls(own.len()..fields.len())).collect()
        } else {
            nulls(0..fields.len() - own.len()).chain(own.iter().cloned()).collect()
        };
        Self::conform(&self.joined_schema, columns, rows)
    }
}

/// A continuous query: its operators and what its subscribers receive.
pub struct StreamPlan {
    pub name: String,
    pub sql: String,
    pub dag: Dag,
    /// What subscribers receive; a changelog stream ends with the [`OP_COLUMN`].
    pub schema: SchemaRef,
    /// A `MATERIALIZED VIEW` rather than a `STREAM` (same execution).
    pub materialized: bool,
    /// Starts from the rows its inputs retain, then goes on with new ones (`CREATE
    /// STREAM`, `CREATE MATERIALIZED VIEW`); a subscription's or a sink's hidden stream
    /// starts with the rows that arrive after it.
    pub backfill: bool,
    /// The Python functions it calls (`crate::functions`).
    pub functions: Vec<String>,
    /// Its SQL asked for a changelog (`EMIT CHANGES`, `EMIT EVERY`): its schema, as
    /// `schema()` reports it, shows the change column; without, a changelog stream (a
    /// GROUP BY without a window) reports the rows it holds, as queries read them.
    pub changes_asked: bool,
}

impl StreamPlan {
    /// Its rows are a changelog (updates and retractions), not appends.
    pub fn is_changelog(&self) -> bool {
        self.dag.outputs().iter().any(|&n| self.dag.nodes[n].spec.changelog())
    }

    /// Names this stream reads, in port order (duplicates kept).
    pub fn inputs(&self) -> impl Iterator<Item = &str> {
        self.dag.inputs()
    }

    /// Some operator acts on watermarks (closes windows): its inputs' watermarks matter.
    pub fn uses_watermarks(&self) -> bool {
        self.dag.nodes.iter().any(|n| n.spec.uses_watermarks())
    }

    /// The processing-time period of an operator that emits on a timer (`EMIT EVERY`).
    pub fn tick_ms(&self) -> Option<i64> {
        self.dag.nodes.iter().find_map(|n| n.spec.tick_ms())
    }
}

impl std::fmt::Debug for StreamPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPlan")
            .field("name", &self.name)
            .field("nodes", &self.dag.nodes.iter().map(|n| n.spec.name()).collect::<Vec<_>>())
            .finish()
    }
}
