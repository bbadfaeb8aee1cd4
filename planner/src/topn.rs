//! Top-N in a stream: the shape
//!
//! ```text
//! Projection ─ Filter (rn <= N) ─ [SubqueryAlias] ─ Projection (…, ROW_NUMBER() OVER (…) AS rn)
//!                                                   └ Window (row_number PARTITION BY … ORDER BY …) ─ scan
//! ```
//!
//! is lowered to a map node `[partition keys…, input columns…]` behind an exchange by the
//! keys and a Top-N node: over a windowed stream partitioned by its `window_start` or
//! `window_end`, the per-window one (`laminardb_engine::stream::topn`: final rows once the
//! window closes); otherwise the changelog one (`laminardb_engine::stream::rank`: each
//! partition's current first N, updated as rows arrive). Other uses of window functions
//! stay refused by name.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Expr as DfExpr, ExprSchemable, Filter, LogicalPlan, Operator, Projection, Window};

use laminardb_engine::catalog::Catalog;
use laminardb_engine::stream::op::nullable;
use laminardb_engine::stream::rank::RankPlan;
use laminardb_engine::stream::topn::{Ranking, TopNPlan};
use laminardb_engine::stream::{PhysExpr, OP_COLUMN};
use laminardb_engine::{Error, Result};

use crate::stream::{WINDOW_END, WINDOW_START};

/// The parts of a Top-N query under its outer projection `p`, if it has that shape.
pub struct TopNShape<'a> {
    pub filter: &'a Filter,
    pub inner: &'a Projection,
    pub window: &'a Window,
}

pub fn topn_below(p: &Projection) -> Option<TopNShape<'_>> {
    let LogicalPlan::Filter(filter) = p.input.as_ref() else { return None };
    let mut below = filter.input.as_ref();
    while let LogicalPlan::SubqueryAlias(a) = below {
        below = a.input.as_ref();
    }
    let LogicalPlan::Projection(inner) = below else { return None };
    let LogicalPlan::Window(window) = inner.input.as_ref() else { return None };
    Some(TopNShape { filter, inner, window })
}

/// What the lowering needs to build the plan: the input's name and columns, then the
/// map's expressions (partition keys first) and the Top-N node.
pub struct TopNParts {
    pub partition: Vec<DfExpr>,
    pub plan: TopNKind,
}

/// Which Top-N node the query needs.
pub enum TopNKind {
    /// Partitioned by the window of a windowed stream: final rows per window.
    Window(TopNPlan),
    /// Otherwise: each partition's current first N, as a changelog.
    Changelog(RankPlan),
}

impl TopNKind {
    pub fn key_types(&self) -> &[DataType] {
        match self {
            TopNKind::Window(p) => &p.ranking.key_types,
            TopNKind::Changelog(p) => &p.ranking.key_types,
        }
    }
}

fn refused(what: &str) -> Error {
    Error::unsupported(format!(
        "{what} in a stream: window functions run as a Top-N only: SELECT … FROM (SELECT …, ROW_NUMBER() OVER \
         (PARTITION BY …  ORDER BY …) AS rn FROM a_stream) WHERE rn <= N"
    ))
}

/// Checks the shape's parts and builds the Top-N node over the map `[partition keys…,
/// input columns…]`; `physical` compiles an expression against a schema.
pub fn plan_topn(
    shape: &TopNShape<'_>,
    outer: &Projection,
    input: &str,
    catalog: &Catalog,
    physical: &dyn Fn(&DfExpr, &datafusion::common::DFSchema) -> Result<PhysExpr>,
) -> Result<TopNParts> {
    let window = shape.window;
    let [DfExpr::WindowFunction(wf)] = window.window_expr.as_slice() else { return Err(refused("several window functions")) };
    let name = wf.fun.to_string().to_ascii_lowercase();
    if name != "row_number" {
        return Err(refused(&format!("{}()", name.to_uppercase())));
    }
    let params = &wf.params;
    let windowed = catalog.streams.get(input).is_some_and(|s| s.table_schema.field_with_name(WINDOW_END).is_ok());
    let by_window = params.partition_by.iter().any(|e| matches!(e, DfExpr::Column(c) if c.name == WINDOW_END || c.name == WINDOW_START));
    let in_schema = window.input.schema();
    let keys = params.partition_by.len();
    let key_types = params.partition_by.iter().map(|e| e.get_type(in_schema)).collect::<Result<Vec<DataType>, _>>()?;
    let mut order = Vec::with_capacity(params.order_by.len());
    for sort in &params.order_by {
        let DfExpr::Column(c) = &sort.expr else { return Err(refused("ORDER BY an expression (order by a column)")) };
        order.push((keys + in_schema.index_of_column(c)?, !sort.asc, sort.nulls_first));
    }
    // The row number's column: the window node's last.
    let rn = window.schema.fields().len() - 1;
    let (n, rn_out) = bound(&shape.filter.predicate, shape.inner, rn, window)?;
    let numbered_schema = nullable(window.schema.as_arrow());
    let inner = shape.inner.expr.iter().map(|e| physical(e, window.schema.as_ref())).collect::<Result<Vec<_>>>()?;
    let inner_schema = nullable(shape.inner.schema.as_arrow());
    let filter = physical(&shape.filter.predicate, shape.filter.input.schema().as_ref())?;
    let output = outer.expr.iter().map(|e| physical(e, outer.input.schema().as_ref())).collect::<Result<Vec<_>>>()?;
    let schema = nullable(outer.schema.as_arrow());
    let ranking = Ranking { key_types, order, n, numbered_schema, inner, inner_schema, filter, output };
    let plan = if windowed && by_window {
        let time = keys + in_schema.index_of_column_by_name(None, WINDOW_END).ok_or_else(|| refused("a windowed stream without window_end"))?;
        TopNKind::Window(TopNPlan { ranking, time, schema })
    } else {
        let rank_visible = outer.expr.iter().any(|e| e.column_refs().iter().any(|c| c.name == rn_out));
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
        let rows_schema = schema;
        let schema = Arc::new(Schema::new(fields));
        TopNKind::Changelog(RankPlan { ranking, rows_schema, schema, rank_visible, append_only: false })
    };
    Ok(TopNParts { partition: params.partition_by.clone(), plan })
}

/// The `N` of `rn <= N` (`rn < N + 1`, `rn = 1`) among the filter's conjuncts, and the
/// subquery's name for the row number.
fn bound(predicate: &DfExpr, inner: &Projection, rn: usize, window: &Window) -> Result<(usize, String)> {
    let rn_name = window.schema.field(rn).name();
    // The subquery's column that is the row number.
    let column = inner.expr.iter().position(|e| matches!(e.clone().unalias(), DfExpr::Column(c) if c.name == *rn_name));
    let Some(column) = column else { return Err(refused("a Top-N without its row number in the subquery")) };
    let rn_out = inner.schema.field(column).name();
    let mut n: Option<i128> = None;
    for c in split_conjunction(predicate) {
        let DfExpr::BinaryExpr(b) = c else { continue };
        let (DfExpr::Column(col), DfExpr::Literal(value, _)) = (uncast(&b.left), uncast(&b.right)) else { continue };
        if col.name != *rn_out {
            continue;
        }
        let Some(v) = integer(value) else { continue };
        let bound = match b.op {
            Operator::LtEq => v,
            Operator::Lt => v - 1,
            Operator::Eq => v,
            _ => continue,
        };
        n = Some(n.map_or(bound, |m| m.min(bound)));
    }
    match n {
        Some(n) if n >= 1 => Ok((usize::try_from(n).map_err(|_| refused("a Top-N this large"))?, rn_out.to_string())),
        Some(_) => Err(Error::query("a Top-N filter that no row number passes (rn <= 0)")),
        None => Err(refused("ROW_NUMBER() without a bound such as WHERE rn <= 10")),
    }
}

/// `e` without the casts type coercion put around it.
fn uncast(mut e: &DfExpr) -> &DfExpr {
    while let DfExpr::Cast(c) = e {
        e = &c.expr;
    }
    e
}

fn integer(value: &ScalarValue) -> Option<i128> {
    match value {
        ScalarValue::UInt64(Some(v)) => Some(*v as i128),
        ScalarValue::Int64(Some(v)) => Some(*v as i128),
        ScalarValue::Int32(Some(v)) => Some(*v as i128),
        ScalarValue::UInt32(Some(v)) => Some(*v as i128),
        _ => None,
    }
}

/// The map node's schema: `[key0…, input columns…]`.
pub fn map_schema(partition_types: &[DataType], input: &Schema) -> Arc<Schema> {
    let keys = partition_types.iter().enumerate().map(|(i, t)| Field::new(format!("key{i}"), t.clone(), true));
    let columns = input.fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true));
    Arc::new(Schema::new(keys.chain(columns).collect::<Vec<_>>()))
}
