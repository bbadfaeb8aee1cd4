//! `CREATE STREAM` / `CREATE MATERIALIZED VIEW`: from SQL to a [`StreamPlan`].
//!
//! The streaming clauses DataFusion does not know are handled here: `EMIT …` and
//! `ALLOW LATENESS …` are cut off at token level, and the window call in `GROUP BY`
//! (`TUMBLE(ts, …)`, `HOP`, `SESSION`, `CUMULATE`) is replaced by the two columns it
//! defines, `window_start` and `window_end`, which the planning table carries. DataFusion
//! then plans and type-checks the query; its logical plan is lowered into a DAG of
//! operators (`laminardb_engine::dataflow`): map nodes (filter + projection) over each
//! input, a join's node, an aggregate's node (group keys, window, aggregate calls and the
//! final `HAVING` + `SELECT` list), with an exchange by key in front of the keyed ones;
//! every expression compiled to a DataFusion physical expression. Plan shapes that cannot
//! run incrementally are rejected by name.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DFSchema, TableReference};
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::type_coercion::binary::comparison_coercion;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{build_join_schema, Distinct, Expr as DfExpr, ExprSchemable, Join, JoinType, LogicalPlan, Operator};
use datafusion::common::NullEquality;
use datafusion::common::ScalarValue;
use datafusion::physical_expr::expressions::{BinaryExpr, Column as PhysColumn, Literal};
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::optimizer::Analyzer;
use datafusion::physical_expr::{create_physical_expr, execution_props::ExecutionProps};
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, JoinOperator, SelectItem, SetExpr, SetOperator, SetQuantifier,
    Statement as SqlStatement,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;

use laminardb_engine::catalog::{Catalog, StreamDef, TRANSIENT_PREFIX};
use laminardb_engine::lookup::CacheBounds;
use laminardb_engine::stream::op::nullable;
use laminardb_engine::stream::time::is_event_time;
use laminardb_engine::dataflow::{Dag, Port, Route, Upstream};
use laminardb_engine::stream::{
    asof::AsofPlan, interval::{Existence, IntervalPlan}, lookup::LookupPlan, rank::RankPlan, topn::Ranking, AggCall, AggKind, AggPlan, Domain, Emit, GroupCol, JoinPlan, MapPlan, PhysExpr, StreamPlan, UserCall, WindowKind,
    OP_COLUMN,
};
use laminardb_engine::{Error, Result};

use crate::time_bounds::time_bounds;
use crate::topn::{map_schema as topn_map_schema, plan_topn, topn_below, TopNKind, TopNShape};

use crate::interval::interval_ms;

pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";

/// A parsed `CREATE STREAM name [WITH (state_ttl = '…')] AS <query> [EMIT …] [ALLOW LATENESS …]`.
#[derive(Default)]
pub struct CreateStream {
    pub name: String,
    pub materialized: bool,
    pub or_replace: bool,
    pub if_not_exists: bool,
    pub query: String,
    pub emit: Option<Emit>,
    pub lateness_ms: i64,
    /// `WITH (state_ttl = …)`: how long a join without a time bound keeps each row after it
    /// arrived (processing time).
    pub state_ttl_ms: Option<i64>,
    /// A join may keep its rows for the stream's life without `state_ttl`: a statement the
    /// database accepted before that check (recovery replays it), or an ad-hoc query,
    /// which reads a finite set of rows.
    pub unbounded_join_ok: bool,
}

/// The options `CREATE STREAM … WITH (…)` takes.
const STREAM_OPTIONS: &[&str] = &["state_ttl"];

pub(crate) fn is_word(t: &Token, w: &str) -> bool {
    matches!(t, Token::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w))
}

fn text(tokens: &[Token]) -> String {
    tokens.iter().map(|t| t.to_string()).collect::<String>().trim().to_string()
}

/// Index of every top-level (not parenthesized) token.
fn top_level(tokens: &[Token]) -> Vec<usize> {
    let mut depth = 0i32;
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            _ if depth == 0 => out.push(i),
            _ => {}
        }
    }
    out
}

/// Cuts trailing `EMIT …` and `ALLOW LATENESS …` clauses off a query.
pub fn cut_streaming_clauses(tokens: &[Token]) -> Result<(Vec<Token>, Option<Emit>, i64)> {
    let top = top_level(tokens);
    let cut = top.iter().copied().find(|&i| {
        is_word(&tokens[i], "EMIT")
            || (is_word(&tokens[i], "ALLOW")
                && tokens[i + 1..].iter().find(|t| !matches!(t, Token::Whitespace(_))).is_some_and(|t| is_word(t, "LATENESS")))
    });
    let Some(cut) = cut else { return Ok((tokens.to_vec(), None, 0)) };
    let query = tokens[..cut].to_vec();
    let clauses: Vec<&Token> = tokens[cut..].iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect();
    let (mut emit, mut lateness) = (None, 0);
    let mut i = 0;
    let word = |i: usize| clauses.get(i).map(|t| t.to_string().to_ascii_uppercase()).unwrap_or_default();
    while i < clauses.len() {
        match word(i).as_str() {
            "EMIT" => {
                let (mode, used) = match (word(i + 1).as_str(), word(i + 2).as_str(), word(i + 3).as_str()) {
                    ("AFTER", "WATERMARK", _) => (Emit::AfterWatermark, 3),
                    ("ON", "WINDOW", "CLOSE") => (Emit::OnWindowClose, 4),
                    ("FINAL", _, _) => (Emit::OnWindowClose, 2),
                    ("ON", "UPDATE", _) => (Emit::Changes, 3),
                    ("CHANGES", _, _) => (Emit::Changes, 2),
                    ("EVERY", _, _) | ("PERIODICALLY", _, _) => {
                        let rest: Vec<String> = clauses[i + 2..]
                            .iter()
                            .take_while(|t| !is_word(t, "ALLOW"))
                            .map(|t| t.to_string())
                            .collect();
                        let expr = Parser::new(&GenericDialect {})
                            .try_with_sql(&rest.join(" "))
                            .and_then(|mut p| p.parse_expr())
                            .map_err(|e| Error::parse(format!("EMIT EVERY: {e}")))?;
                        let ms = interval_ms(&expr)?;
                        if ms <= 0 {
                            return Err(Error::parse("EMIT EVERY needs a positive interval"));
                        }
                        (Emit::Every(ms), 2 + rest.len())
                    }
                    _ => return Err(Error::parse(format!("unknown EMIT clause: EMIT {}", word(i + 1)))),
                };
                emit = Some(mode);
                i += used;
            }
            "ALLOW" => {
                let rest: Vec<Token> = clauses[i + 2..]
                    .iter()
                    .take_while(|t| !is_word(t, "EMIT"))
                    .map(|t| (*t).clone())
                    .collect();
                let sql = rest.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
                let expr = Parser::new(&GenericDialect {})
                    .try_with_sql(&sql)
                    .and_then(|mut p| p.parse_expr())
                    .map_err(|e| Error::parse(format!("ALLOW LATENESS: {e}")))?;
                lateness = interval_ms(&expr)?;
                i += 2 + rest.len();
            }
            other => return Err(Error::parse(format!("unexpected '{other}' after the query"))),
        }
    }
    Ok((query, emit, lateness))
}

/// Parses the DDL around the query; `None` when `tokens` is not a `CREATE STREAM`.
pub fn parse_create_stream(tokens: &[Token]) -> Result<Option<CreateStream>> {
    let sig: Vec<usize> = (0..tokens.len()).filter(|&i| !matches!(tokens[i], Token::Whitespace(_))).collect();
    let w = |k: usize| sig.get(k).map(|&i| &tokens[i]);
    let mut k = 0;
    if !w(k).is_some_and(|t| is_word(t, "CREATE")) {
        return Ok(None);
    }
    k += 1;
    let or_replace = w(k).is_some_and(|t| is_word(t, "OR")) && w(k + 1).is_some_and(|t| is_word(t, "REPLACE"));
    if or_replace {
        k += 2;
    }
    let materialized = if w(k).is_some_and(|t| is_word(t, "STREAM")) {
        k += 1;
        false
    } else if w(k).is_some_and(|t| is_word(t, "MATERIALIZED")) && w(k + 1).is_some_and(|t| is_word(t, "VIEW")) {
        k += 2;
        true
    } else {
        return Ok(None);
    };
    let if_not_exists = w(k).is_some_and(|t| is_word(t, "IF"))
        && w(k + 1).is_some_and(|t| is_word(t, "NOT"))
        && w(k + 2).is_some_and(|t| is_word(t, "EXISTS"));
    if if_not_exists {
        k += 3;
    }
    let name = match w(k) {
        Some(Token::Word(word)) if word.quote_style.is_some() => word.value.clone(),
        Some(Token::Word(word)) => word.value.to_ascii_lowercase(),
        _ => return Err(Error::parse("expected a stream name after CREATE STREAM")),
    };
    k += 1;
    let mut state_ttl_ms = None;
    if w(k).is_some_and(|t| is_word(t, "WITH")) {
        let (options, used) = stream_options(&sig[k + 1..].iter().map(|&i| &tokens[i]).collect::<Vec<_>>())?;
        k += 1 + used;
        for (key, value) in options {
            if !STREAM_OPTIONS.contains(&key.as_str()) {
                return Err(Error::query(format!("unknown option '{key}' in WITH: a stream takes {}", STREAM_OPTIONS.join(", "))));
            }
            let ms = laminardb_engine::catalog::parse_duration_ms(&value).ok_or_else(|| {
                Error::query(format!("state_ttl '{value}' is not a duration such as '30 s', '15 minutes' or '1 hour'"))
            })?;
            state_ttl_ms = Some(ms);
        }
    }
    if !w(k).is_some_and(|t| is_word(t, "AS")) {
        let what = if materialized { "CREATE MATERIALIZED VIEW" } else { "CREATE STREAM" };
        return Err(Error::parse(format!("expected AS after {what} {name}")));
    }
    let body = &tokens[sig[k] + 1..];
    let (query, emit, lateness_ms) = cut_streaming_clauses(body)?;
    let query = text(&query);
    Ok(Some(CreateStream { name, materialized, or_replace, if_not_exists, query, emit, lateness_ms, state_ttl_ms, unbounded_join_ok: false }))
}

/// `(key = 'value', …)` at the start of `tokens` (whitespace left out): the pairs, and how
/// many tokens they took.
fn stream_options(tokens: &[&Token]) -> Result<(Vec<(String, String)>, usize)> {
    let bad = || Error::parse("expected WITH (key = 'value', …) before AS");
    if !matches!(tokens.first(), Some(Token::LParen)) {
        return Err(bad());
    }
    let mut options = Vec::new();
    let mut i = 1;
    loop {
        let key = match tokens.get(i) {
            Some(Token::Word(w)) => w.value.to_ascii_lowercase(),
            Some(Token::SingleQuotedString(s)) => s.to_ascii_lowercase(),
            _ => return Err(bad()),
        };
        let value = match (tokens.get(i + 1), tokens.get(i + 2)) {
            (Some(Token::Eq), Some(Token::SingleQuotedString(v))) => v.clone(),
            (Some(Token::Eq), Some(Token::Number(v, _))) => v.clone(),
            _ => return Err(bad()),
        };
        options.push((key, value));
        i += 3;
        match tokens.get(i) {
            Some(Token::Comma) => i += 1,
            Some(Token::RParen) => return Ok((options, i + 1)),
            _ => return Err(bad()),
        }
    }
}

/// The window call found in a `GROUP BY`.
struct WindowCall {
    kind: WindowKind,
    column: String,
    /// The qualifier written before the column (`t` in `TUMBLE(t.ts, …)`), if any.
    qualifier: Option<String>,
    /// The catalog table that qualifier names.
    table: Option<String>,
}

fn function_args(f: &datafusion::sql::sqlparser::ast::Function) -> Result<Vec<&Expr>> {
    let FunctionArguments::List(list) = &f.args else {
        return Err(Error::parse(format!("{} needs arguments", f.name)));
    };
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
            other => Err(Error::parse(format!("unexpected window argument {other}"))),
        })
        .collect()
}

fn duration_ms(e: &Expr) -> Result<i64> {
    if let Expr::Value(v) = e {
        if let datafusion::sql::sqlparser::ast::Value::Number(n, _) = &v.value {
            return n.parse().map_err(|_| Error::parse(format!("bad window size {n}")));
        }
    }
    interval_ms(e)
}

fn window_call(e: &Expr) -> Result<Option<WindowCall>> {
    let Expr::Function(f) = e else { return Ok(None) };
    let name = f.name.to_string().to_ascii_lowercase();
    let arity = match name.as_str() {
        "tumble" | "session" => 2,
        "hop" | "cumulate" => 3,
        _ => return Ok(None),
    };
    let args = function_args(f)?;
    if args.len() != arity {
        return Err(Error::parse(format!("{} takes {arity} arguments", name.to_uppercase())));
    }
    // Resolved as DataFusion resolves identifiers: a quoted name exactly, an unquoted
    // one lowercased.
    let name_of = |id: &Ident| if id.quote_style.is_some() { id.value.clone() } else { id.value.to_lowercase() };
    let (column, qualifier) = match args[0] {
        Expr::Identifier(id) => (name_of(id), None),
        Expr::CompoundIdentifier(ids) if ids.len() >= 2 => {
            (name_of(&ids[ids.len() - 1]), Some(name_of(&ids[ids.len() - 2])))
        }
        other => return Err(Error::unsupported(format!("window over the expression {other}: name a column"))),
    };
    let d = |i: usize| duration_ms(args[i]);
    let kind = match name.as_str() {
        "tumble" => WindowKind::Tumble { size: d(1)? },
        "hop" => WindowKind::Hop { slide: d(1)?, size: d(2)? },
        "cumulate" => WindowKind::Cumulate { step: d(1)?, size: d(2)? },
        _ => WindowKind::Session { gap: d(1)? },
    };
    Ok(Some(WindowCall { kind: kind.validate().map_err(Error::parse)?, column, qualifier, table: None }))
}

/// Whether any `SELECT` of `body` has a window call in its `GROUP BY`.
pub fn has_window(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => match &select.group_by {
            GroupByExpr::Expressions(exprs, _) => exprs.iter().any(|e| matches!(window_call(e), Ok(Some(_)) | Err(_))),
            _ => false,
        },
        SetExpr::SetOperation { left, right, .. } => has_window(left) || has_window(right),
        SetExpr::Query(q) => has_window(&q.body),
        _ => false,
    }
}

/// Whether the query's `SELECT` has an ASOF JOIN (planned as a stream, `take_asof`).
pub fn has_asof(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => {
            select.from.iter().flat_map(|f| &f.joins).any(|j| matches!(j.join_operator, JoinOperator::AsOf { .. }))
        }
        SetExpr::Query(q) => has_asof(&q.body),
        _ => false,
    }
}

/// Replaces the window call of every `SELECT`'s `GROUP BY` with `window_start, window_end`;
/// returns the rewritten query and, per `SELECT` in order, its window.
fn rewrite_windows(query: &str) -> Result<(String, Vec<Option<WindowCall>>, Option<Asof>)> {
    let (query, left_asof) = strip_left_asof(query)?;
    let mut statements = Parser::parse_sql(&GenericDialect {}, &query).map_err(|e| Error::parse(e.to_string()))?;
    if statements.len() != 1 {
        return Err(Error::parse("expected one SELECT query"));
    }
    let SqlStatement::Query(q) = &mut statements[0] else {
        return Err(Error::unsupported(format!("a stream over '{}': it must be a SELECT", statements[0])));
    };
    if q.order_by.is_some() {
        return Err(Error::unsupported("ORDER BY in a stream (a stream has no end to sort by)"));
    }
    if q.limit_clause.is_some() || q.fetch.is_some() {
        return Err(Error::unsupported("LIMIT in a stream"));
    }
    if q.with.is_some() {
        return Err(Error::unsupported("WITH (common table expressions) in a stream"));
    }
    let mut windows = Vec::new();
    rewrite_set(&mut q.body, &mut windows)?;
    let asof = take_asof(&mut q.body, left_asof)?.map(|condition| Asof { condition, left: left_asof });
    Ok((statements[0].to_string(), windows, asof))
}

/// An ASOF JOIN's match condition, and whether it is a `LEFT ASOF JOIN`.
struct Asof {
    condition: Expr,
    left: bool,
}

/// `sql` with `LEFT [OUTER] ASOF JOIN` (which the SQL parser does not know) written
/// `ASOF JOIN`, and whether it was there.
pub fn strip_left_asof(sql: &str) -> Result<(String, bool)> {
    let mut tokens = crate::split::tokenize(sql)?;
    let words: Vec<usize> = (0..tokens.len()).filter(|&i| !matches!(tokens[i], Token::Whitespace(_))).collect();
    for (k, &i) in words.iter().enumerate() {
        if !is_word(&tokens[i], "LEFT") {
            continue;
        }
        let next = |n: usize| words.get(k + n).map(|&j| &tokens[j]);
        let asof = match (next(1), next(2)) {
            (Some(a), _) if is_word(a, "ASOF") => k + 1,
            (Some(o), Some(a)) if is_word(o, "OUTER") && is_word(a, "ASOF") => k + 2,
            _ => continue,
        };
        tokens.drain(i..words[asof]);
        return Ok((text(&tokens), true));
    }
    Ok((sql.to_string(), false))
}

/// Turns the `ASOF JOIN … MATCH_CONDITION(…) ON …` of the query into an inner join on
/// the `ON` keys, for DataFusion to plan and type-check; its match condition is returned
/// for the lowering (`Lowering::asof`), which makes the join an ASOF join again.
fn take_asof(body: &mut SetExpr, left: bool) -> Result<Option<Expr>> {
    let mut found = None;
    let SetExpr::Select(select) = body else { return Ok(None) };
    for from in &mut select.from {
        for join in &mut from.joins {
            if let JoinOperator::AsOf { match_condition, constraint } = &join.join_operator {
                if found.is_some() {
                    return Err(Error::unsupported("two ASOF JOINs in one stream: join a stream of the first"));
                }
                found = Some(match_condition.clone());
                join.join_operator =
                    if left { JoinOperator::LeftOuter(constraint.clone()) } else { JoinOperator::Inner(constraint.clone()) };
            }
        }
    }
    Ok(found)
}

fn rewrite_set(body: &mut SetExpr, windows: &mut Vec<Option<WindowCall>>) -> Result<()> {
    match body {
        SetExpr::Select(select) => {
            let mut found = None;
            if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
                let mut out = Vec::with_capacity(exprs.len() + 1);
                for e in exprs.drain(..) {
                    match window_call(&e)? {
                        Some(w) if found.is_none() => {
                            out.push(window_column(&w, WINDOW_START));
                            out.push(window_column(&w, WINDOW_END));
                            found = Some(w);
                        }
                        Some(_) => return Err(Error::unsupported("two windows in one GROUP BY")),
                        None => out.push(e),
                    }
                }
                *exprs = out;
            }
            if let Some(w) = &mut found {
                // The output of a windowed query always carries its window's bounds.
                for column in [WINDOW_START, WINDOW_END] {
                    let named = select.projection.iter().any(|item| match item {
                        SelectItem::UnnamedExpr(Expr::Identifier(id)) => id.value.eq_ignore_ascii_case(column),
                        SelectItem::UnnamedExpr(Expr::CompoundIdentifier(ids)) => {
                            ids.last().is_some_and(|id| id.value.eq_ignore_ascii_case(column))
                        }
                        SelectItem::ExprWithAlias { alias, .. } => alias.value.eq_ignore_ascii_case(column),
                        _ => false,
                    });
                    if !named {
                        select.projection.push(SelectItem::UnnamedExpr(window_column(w, column)));
                    }
                }
                // The table the qualifier names, so only it carries the window's columns.
                if let Some(q) = &w.qualifier {
                    w.table = Some(table_of(&select.from, q).unwrap_or_else(|| q.clone()));
                }
            }
            windows.push(found);
            Ok(())
        }
        SetExpr::SetOperation { op: SetOperator::Union, set_quantifier: SetQuantifier::All, left, right } => {
            rewrite_set(left, windows)?;
            rewrite_set(right, windows)
        }
        SetExpr::SetOperation { op, set_quantifier, .. } => {
            Err(Error::unsupported(format!("{op} {set_quantifier} in a stream (only UNION ALL)")))
        }
        SetExpr::Query(q) => rewrite_set(&mut q.body, windows),
        other => Err(Error::unsupported(format!("'{other}' in a stream"))),
    }
}

/// `window_start` / `window_end`, qualified as the window's column is.
fn window_column(w: &WindowCall, column: &str) -> Expr {
    match &w.qualifier {
        Some(q) => Expr::CompoundIdentifier(vec![Ident::with_quote('"', q.as_str()), Ident::new(column)]),
        None => Expr::Identifier(Ident::new(column)),
    }
}

/// The catalog table that `qualifier` (an alias or a table name) names in `from`.
fn table_of(from: &[datafusion::sql::sqlparser::ast::TableWithJoins], qualifier: &str) -> Option<String> {
    use datafusion::sql::sqlparser::ast::TableFactor;
    let factors = from.iter().flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)));
    let name_of = |id: &Ident| if id.quote_style.is_some() { id.value.clone() } else { id.value.to_lowercase() };
    for factor in factors {
        if let TableFactor::Table { name, alias, .. } = factor {
            let table = name.0.last().and_then(|p| p.as_ident()).map(name_of)?;
            let called = alias.as_ref().map(|a| name_of(&a.name)).unwrap_or_else(|| table.clone());
            if called == qualifier {
                return Some(table);
            }
        }
    }
    None
}

/// Plans a continuous query over `catalog`.
pub fn plan_stream(catalog: &Catalog, ddl: &CreateStream, sql: &str, runtime: &tokio::runtime::Handle) -> Result<StreamDef> {
    let temporal = crate::temporal::rewrite_temporal(&ddl.query, catalog)?;
    let query = crate::group_call::rewrite_sql(&temporal, &catalog.functions);
    let (rewritten, windows, asof) = rewrite_windows(query.as_deref().unwrap_or(&temporal))?;
    let window = match windows.as_slice() {
        [w] => w.as_ref(),
        many if many.iter().any(Option::is_some) => {
            return Err(Error::unsupported("windows inside UNION ALL branches: aggregate over a stream of the union instead"))
        }
        _ => None,
    };
    let ctx = planning_context(catalog, window)?;
    let plan = {
        let ctx = ctx.clone();
        let rewritten = rewritten.clone();
        runtime.block_on(async move { ctx.state().create_logical_plan(&rewritten).await })?
    };
    let plan = Analyzer::new().execute_and_check(plan, ctx.state().config_options(), |_, _| {})?;
    let plan = decorrelate(plan)?;
    if ddl.lateness_ms < 0 {
        return Err(Error::query(format!("ALLOW LATENESS must not be negative (got {} ms)", ddl.lateness_ms)));
    }
    let mut lowering = Lowering {
        props: ExecutionProps::new(),
        catalog,
        emit: ddl.emit,
        lateness_ms: ddl.lateness_ms,
        dag: Dag::default(),
        aggregate: None,
        asof,
        state_ttl_ms: ddl.state_ttl_ms,
        ttl_used: false,
        unbounded_join_ok: ddl.unbounded_join_ok,
    };
    let select_schema = nullable(lowering.lower(&plan, window)?.as_ref());
    if ddl.state_ttl_ms.is_some() && !lowering.ttl_used {
        return Err(Error::query(
            "state_ttl bounds the state of a join without a time bound, and this stream has none (a join bounded in time, \
             or an ASOF join, is bounded by the watermark)",
        ));
    }
    match (lowering.aggregate, ddl.emit) {
        (None, Some(Emit::AfterWatermark | Emit::OnWindowClose)) | (Some(false), Some(Emit::AfterWatermark | Emit::OnWindowClose)) => {
            return Err(Error::query("EMIT AFTER WATERMARK / ON WINDOW CLOSE / FINAL need a window in GROUP BY"))
        }
        (None, Some(Emit::Every(_))) => return Err(Error::query("EMIT EVERY needs a GROUP BY aggregation")),
        _ => {}
    }
    if ddl.lateness_ms > 0 && lowering.aggregate != Some(true) {
        return Err(Error::query("ALLOW LATENESS needs a window in GROUP BY (only windows wait for late rows)"));
    }
    let dag = lowering.dag;
    let changelog = dag.outputs().iter().any(|&n| dag.nodes[n].spec.changelog());
    let schema = if changelog {
        let mut fields: Vec<Field> = select_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    } else {
        select_schema.clone()
    };
    let hidden = ddl.name.starts_with(TRANSIENT_PREFIX) || ddl.name.starts_with(crate::sink::SINK_STREAM_PREFIX);
    let functions = user_functions(&plan, catalog)?;
    let changes_asked = changelog && ddl.emit.is_some();
    let plan = StreamPlan {
        name: ddl.name.clone(),
        sql: sql.to_string(),
        dag,
        schema,
        materialized: ddl.materialized,
        backfill: !hidden,
        functions,
        changes_asked,
    };
    Ok(StreamDef { name: ddl.name.clone(), sql: sql.to_string(), plan: Arc::new(plan), table_schema: select_schema })
}

/// `WHERE [NOT] EXISTS (…)` and `IN (subquery)` as left semi and anti joins (DataFusion's
/// own rule), which the lowering runs as joins; plans without them stay as they are.
fn decorrelate(plan: LogicalPlan) -> Result<LogicalPlan> {
    use datafusion::common::tree_node::TreeNode;
    use datafusion::optimizer::decorrelate_predicate_subquery::DecorrelatePredicateSubquery;
    use datafusion::optimizer::{Optimizer, OptimizerContext};
    let subquery = |e: &DfExpr| e.exists(|e| Ok(matches!(e, DfExpr::Exists(_) | DfExpr::InSubquery(_))));
    let has = plan.exists(|p| Ok(matches!(p, LogicalPlan::Filter(f) if subquery(&f.predicate)?)))?;
    if !has {
        return Ok(plan);
    }
    let optimizer = Optimizer::with_rules(vec![Arc::new(DecorrelatePredicateSubquery::new())]);
    Ok(optimizer.optimize(plan, &OptimizerContext::new(), |_, _| {})?)
}

/// The Python functions (`Catalog::functions`) `plan` calls, by name, once each.
fn user_functions(plan: &LogicalPlan, catalog: &Catalog) -> Result<Vec<String>> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut names = std::collections::BTreeSet::new();
    plan.apply(|node| {
        for expr in node.expressions() {
            expr.apply(|e| {
                let name = match e {
                    DfExpr::ScalarFunction(f) => Some(f.name()),
                    DfExpr::AggregateFunction(f) => Some(f.func.name()),
                    _ => None,
                };
                if let Some(name) = name.filter(|n| catalog.functions.contains(n)) {
                    names.insert(name.to_string());
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(names.into_iter().collect())
}

/// Adds the catalog's Python functions to `ctx`.
pub fn register_functions(ctx: &SessionContext, catalog: &Catalog) {
    for function in catalog.functions.all() {
        ctx.register_udf(function.as_ref().clone());
    }
    for function in catalog.functions.all_aggregates() {
        ctx.register_udaf(function.udaf().as_ref().clone());
    }
}

/// A scratch context whose tables are the catalog's sources and streams, never scanned;
/// the tables with the window's column (the one its qualifier names, if it has one) get
/// `window_start`/`window_end` typed as that column.
fn planning_context(catalog: &Catalog, window: Option<&WindowCall>) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    register_functions(&ctx, catalog);
    let names = catalog.sources.keys().chain(catalog.streams.keys());
    for name in names {
        let mut schema = catalog.table_schema(name)?;
        if let Some(stream) = catalog.streams.get(name) {
            if stream.plan.is_changelog() {
                // Readers of a changelog see its change type, `_op`, too.
                schema = stream.plan.schema.clone();
            }
        }
        let window_column = window.filter(|w| w.table.as_ref().is_none_or(|t| t == name)).map(|w| w.column.as_str());
        if let Some(col) = window_column {
            if let Ok(field) = schema.field_with_name(col) {
                if !is_event_time(field.data_type()) {
                    return Err(Error::query(format!(
                        "window column '{col}' is {}, not a TIMESTAMP or BIGINT of epoch milliseconds",
                        field.data_type()
                    )));
                }
                let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
                for extra in [WINDOW_START, WINDOW_END] {
                    if schema.field_with_name(extra).is_err() {
                        fields.push(Field::new(extra, field.data_type().clone(), true));
                    }
                }
                schema = Arc::new(Schema::new(fields));
            }
        }
        // By its exact name, as the ad-hoc catalog registers it: a name given as a string
        // would be parsed as SQL, and a quoted mixed-case name ("Trades") lowercased.
        ctx.register_table(TableReference::bare(name.as_str()), Arc::new(EmptyTable::new(schema)))?;
    }
    Ok(ctx)
}

/// Refuses to read changelog stream `input` other than through a retracting aggregate.
fn not_changelog(catalog: &Catalog, input: &str) -> Result<()> {
    not_lookup(catalog, input)?;
    if catalog.is_changelog(input) {
        return Err(Error::unsupported(format!(
            "reading the changelog {} '{input}' from another stream except through GROUP BY with COUNT, SUM \
             or AVG (its rows are updates and retractions)",
            changelog_kind(catalog, input)
        )));
    }
    Ok(())
}

/// Refuses to read lookup table `input` other than by joining a stream to it.
fn not_lookup(catalog: &Catalog, input: &str) -> Result<()> {
    if catalog.sources.get(input).is_some_and(|d| d.lookup.is_some()) {
        return Err(Error::unsupported(format!(
            "reading the lookup table '{input}' as a stream: it has no stream of rows; join a stream to it \
             (FROM s JOIN {input} t ON s.k = t.k), or query it ad hoc"
        )));
    }
    Ok(())
}

/// How an error names changelog `input`: a stream, or a source of changes.
fn changelog_kind(catalog: &Catalog, input: &str) -> &'static str {
    if catalog.sources.contains_key(input) {
        "source"
    } else {
        "stream"
    }
}

/// Simplifies (as DataFusion's optimizer would: some functions, like COALESCE, exist only
/// in simplified form) and compiles an expression.
fn physical(e: &DfExpr, schema: &DFSchema, props: &ExecutionProps) -> Result<PhysExpr> {
    let context = SimplifyContext::builder().with_schema(Arc::new(schema.clone())).build();
    let e = ExprSimplifier::new(context).simplify(e.clone())?;
    Ok(create_physical_expr(&e, schema, props)?)
}

fn plan_name(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Join(_) => {
            "a JOIN over another JOIN's result (create the inner join as a stream: CREATE STREAM j AS SELECT … \
             FROM a JOIN b ON …, then join j)"
                .into()
        }
        LogicalPlan::Sort(_) => "ORDER BY".into(),
        LogicalPlan::Limit(_) => "LIMIT".into(),
        LogicalPlan::Distinct(_) => "SELECT DISTINCT ON, or SELECT DISTINCT over a GROUP BY,".into(),
        LogicalPlan::Window(_) => {
            "window functions (OVER …) other than a Top-N (SELECT … FROM (SELECT …, ROW_NUMBER() OVER (PARTITION BY … \
             ORDER BY …) AS rn FROM a_stream) WHERE rn <= N)"
                .into()
        }
        LogicalPlan::Subquery(_) => "subqueries".into(),
        LogicalPlan::Unnest(_) => "UNNEST".into(),
        other => format!("the plan node {}", other.display()),
    }
}

fn unsupported(plan: &LogicalPlan) -> Error {
    Error::unsupported(format!("{} in a stream", plan_name(plan)))
}

/// Strips aliases to the `TableScan` under a chain of `Filter`s; returns the table name
/// and the filter predicates with the schema each is evaluated against.
fn scan_chain<'a>(plan: &'a LogicalPlan, filters: &mut Vec<(&'a DfExpr, &'a DFSchema)>) -> Result<String> {
    match scan_chain_projected(plan, filters)? {
        (name, false) => Ok(name),
        (_, true) => Err(Error::unsupported("a subquery selecting columns in a stream: select from the table itself")),
    }
}

/// `scan_chain`, also through projections of plain columns and constants under every
/// filter (what a decorrelated `EXISTS (SELECT 1 …)` leaves); says if it went through one.
/// Expressions over the chain's schema then read columns by name (`by_name`); a constant
/// of the select list, which the join never reads, is NULL in the side's rows.
fn scan_chain_projected<'a>(mut plan: &'a LogicalPlan, filters: &mut Vec<(&'a DfExpr, &'a DFSchema)>) -> Result<(String, bool)> {
    let mut projected = false;
    loop {
        match plan {
            LogicalPlan::TableScan(scan) => return Ok((scan.table_name.table().to_string(), projected)),
            LogicalPlan::Projection(p) if filters.is_empty() && p.expr.iter().all(|e| matches!(e, DfExpr::Column(_) | DfExpr::Literal(..))) => {
                projected = true;
                plan = &p.input;
            }
            LogicalPlan::Filter(f) => {
                filters.push((&f.predicate, f.input.schema().as_ref()));
                plan = &f.input;
            }
            LogicalPlan::SubqueryAlias(a) => plan = &a.input,
            other => return Err(unsupported(other)),
        }
    }
}

fn combine_filters(filters: &[(&DfExpr, &DFSchema)], props: &ExecutionProps) -> Result<Option<PhysExpr>> {
    let Some(&(first, schema)) = filters.first() else { return Ok(None) };
    // All filters of one chain evaluate against the scanned table's columns.
    let mut e = first.clone();
    for (f, _) in &filters[1..] {
        e = e.and((*f).clone());
    }
    Ok(Some(physical(&e, schema, props)?))
}

/// Builds a stream's DAG from its logical plan.
struct Lowering<'a> {
    props: ExecutionProps,
    catalog: &'a Catalog,
    emit: Option<Emit>,
    lateness_ms: i64,
    dag: Dag,
    /// `Some(windowed)` once an aggregate is planned.
    aggregate: Option<bool>,
    /// The query's ASOF JOIN (`take_asof`), until its join is lowered.
    asof: Option<Asof>,
    /// `WITH (state_ttl = …)`, and whether a join took it.
    state_ttl_ms: Option<i64>,
    ttl_used: bool,
    /// `CreateStream::unbounded_join_ok`.
    unbounded_join_ok: bool,
}

fn port(from: Upstream, route: Route) -> Port {
    Port { from, route }
}

impl Lowering<'_> {
    fn physical(&self, e: &DfExpr, schema: &DFSchema) -> Result<PhysExpr> {
        physical(e, schema, &self.props)
    }

    fn map(&mut self, from: Upstream, filter: Option<PhysExpr>, exprs: Vec<PhysExpr>, schema: SchemaRef) -> usize {
        self.dag.add(Arc::new(MapPlan { filter, exprs, schema }), vec![port(from, Route::Forward)])
    }

    /// Adds the nodes of `plan`; the nodes nobody reads carry its rows. Returns the
    /// schema of its rows.
    fn lower(&mut self, plan: &LogicalPlan, window: Option<&WindowCall>) -> Result<SchemaRef> {
        match plan {
            LogicalPlan::Union(u) => {
                let schema = nullable(plan.schema().as_arrow());
                for input in &u.inputs {
                    // Every branch emits in the union's schema.
                    self.lower_map(input, Some(schema.clone()))?;
                }
                Ok(Arc::new(plan.schema().as_arrow().clone()))
            }
            LogicalPlan::SubqueryAlias(a) => self.lower(&a.input, window),
            LogicalPlan::Distinct(Distinct::All(input)) if window.is_none() => self.lower_distinct(input),
            LogicalPlan::Projection(p) => {
                let out_schema = Arc::new(p.schema.as_arrow().clone());
                // HAVING sits between the projection and the aggregate.
                let (having, below) = match p.input.as_ref() {
                    LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)) => {
                        (Some(&f.predicate), f.input.as_ref())
                    }
                    other => (None, other),
                };
                if let LogicalPlan::Aggregate(a) = below {
                    let having = having.map(|h| self.physical(h, a.schema.as_ref())).transpose()?;
                    let output = p.expr.iter().map(|e| self.physical(e, a.schema.as_ref())).collect::<Result<Vec<_>>>()?;
                    self.lower_aggregate(a, window, having, output, &out_schema)?;
                    return Ok(out_schema);
                }
                if window.is_some() {
                    return Err(Error::unsupported("a window without GROUP BY aggregation"));
                }
                if let Some((join, filter)) = join_below(&p.input) {
                    let output = p.expr.iter().map(|e| self.physical(e, p.input.schema().as_ref())).collect::<Result<Vec<_>>>()?;
                    self.lower_join(join, filter, output, nullable(&out_schema))?;
                    return Ok(out_schema);
                }
                if let Some(shape) = topn_below(p) {
                    self.lower_topn(p, &shape)?;
                    return Ok(out_schema);
                }
                self.lower_map(plan, None)?;
                Ok(out_schema)
            }
            other => Err(unsupported(other)),
        }
    }

    /// A Top-N per window (`crate::topn`): a map node `[partition keys…, input columns…]`
    /// behind an exchange by the keys, then the top-n node. Returns the top-n node.
    fn lower_topn(&mut self, outer: &datafusion::logical_expr::Projection, shape: &TopNShape<'_>) -> Result<usize> {
        let mut filters = Vec::new();
        let input = scan_chain(&shape.window.input, &mut filters)?;
        not_changelog(self.catalog, &input)?;
        let props = self.props.clone();
        let parts = plan_topn(shape, outer, &input, self.catalog, &|e, schema| physical(e, schema, &props))?;
        let in_schema = shape.window.input.schema();
        let mut exprs: Vec<PhysExpr> = parts.partition.iter().map(|e| self.physical(e, in_schema)).collect::<Result<_>>()?;
        for (k, f) in in_schema.fields().iter().enumerate() {
            exprs.push(Arc::new(PhysColumn::new(f.name(), k)));
        }
        let keys = parts.partition.len();
        let schema = topn_map_schema(parts.plan.key_types(), in_schema.as_arrow());
        let filter = combine_filters(&filters, &self.props)?;
        let map = self.map(Upstream::Input(input), filter, exprs, schema);
        // Without PARTITION BY, every row is in the one partition, on one shard.
        let route = if keys == 0 { Route::Single } else { Route::Key(keys) };
        let spec: Arc<dyn laminardb_engine::dataflow::OperatorSpec> = match parts.plan {
            TopNKind::Window(plan) => Arc::new(plan),
            TopNKind::Changelog(plan) => Arc::new(plan),
        };
        Ok(self.dag.add(spec, vec![port(Upstream::Node(map), route)]))
    }

    /// `SELECT DISTINCT cols FROM s [WHERE …]`: a map node `[cols…, cols…]` behind an
    /// exchange by all of them, then a Top-1 per distinct row (`rank`, append-only): each
    /// distinct row goes out once, when first seen.
    fn lower_distinct(&mut self, input: &LogicalPlan) -> Result<SchemaRef> {
        let LogicalPlan::Projection(p) = input else { return Err(unsupported(input)) };
        let mut filters = Vec::new();
        let source = scan_chain(&p.input, &mut filters).map_err(|_| {
            Error::unsupported("SELECT DISTINCT over a join, an aggregate or a subquery in a stream: make that a stream first")
        })?;
        not_changelog(self.catalog, &source)?;
        let exprs: Vec<PhysExpr> = p.expr.iter().map(|e| self.physical(e, p.input.schema().as_ref())).collect::<Result<_>>()?;
        let rows_schema = nullable(p.schema.as_arrow());
        let key_types: Vec<DataType> = rows_schema.fields().iter().map(|f| f.data_type().clone()).collect();
        let width = exprs.len();
        let map_schema = topn_map_schema(&key_types, &rows_schema);
        let filter = combine_filters(&filters, &self.props)?;
        let map = self.map(Upstream::Input(source), filter, [exprs.clone(), exprs].concat(), map_schema);
        let mut numbered: Vec<Field> = rows_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        numbered.push(Field::new("rn", DataType::UInt64, true));
        let numbered_schema = Arc::new(Schema::new(numbered));
        let column = |i: usize| Arc::new(PhysColumn::new(numbered_schema.field(i).name(), i)) as PhysExpr;
        let ranking = Ranking {
            key_types,
            order: Vec::new(),
            n: 1,
            numbered_schema: numbered_schema.clone(),
            inner: (0..=width).map(column).collect(),
            inner_schema: numbered_schema.clone(),
            filter: Arc::new(Literal::new(ScalarValue::Boolean(Some(true)))),
            output: (0..width).map(column).collect(),
        };
        let plan = RankPlan {
            ranking,
            rows_schema: rows_schema.clone(),
            schema: rows_schema.clone(),
            rank_visible: false,
            append_only: true,
        };
        self.dag.add(Arc::new(plan), vec![port(Upstream::Node(map), Route::Key(width))]);
        Ok(Arc::new(p.schema.as_arrow().clone()))
    }

    /// A projection over a chain of filters over a source or stream: one map node
    /// (emitting in `schema`, if given, else the projection's own).
    fn lower_map(&mut self, plan: &LogicalPlan, schema: Option<SchemaRef>) -> Result<usize> {
        let p = match plan {
            LogicalPlan::SubqueryAlias(a) => return self.lower_map(&a.input, schema),
            LogicalPlan::Projection(p) => p,
            other => return Err(unsupported(other)),
        };
        let below = match p.input.as_ref() {
            LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)) => f.input.as_ref(),
            other => other,
        };
        if schema.is_some() {
            if matches!(below, LogicalPlan::Aggregate(_)) {
                return Err(Error::unsupported("GROUP BY inside UNION ALL branches"));
            }
            if join_below(&p.input).is_some() {
                return Err(Error::unsupported("a JOIN inside UNION ALL branches (create the join as a stream and union that)"));
            }
        }
        let mut filters = Vec::new();
        let input = scan_chain(&p.input, &mut filters)?;
        not_changelog(self.catalog, &input)?;
        let filter = combine_filters(&filters, &self.props)?;
        let exprs = p.expr.iter().map(|e| self.physical(e, p.input.schema().as_ref())).collect::<Result<Vec<_>>>()?;
        let schema = schema.unwrap_or_else(|| nullable(p.schema.as_arrow()));
        Ok(self.map(Upstream::Input(input), filter, exprs, schema))
    }

    /// An inner equi-join: each side a map node `[keys…, input columns…]` (filters that
    /// touch one side only run there, before the exchange), then the join node, where the
    /// other conditions and `output` (over the joined row) run. Returns the join node.
    fn lower_join(&mut self, j: &Join, filter: Option<&DfExpr>, output: Vec<PhysExpr>, schema: SchemaRef) -> Result<usize> {
        let props = &self.props.clone();
        let left_asof = self.asof.as_ref().is_some_and(|a| a.left);
        let kind = j.join_type.to_string().to_uppercase();
        // The sides whose unmatched rows an outer join keeps (with NULLs for the other).
        // `WHERE [NOT] EXISTS (…)` arrives decorrelated as a left semi or anti join, whose
        // output is the left rows; an anti join keeps (emits) the left rows that met nothing.
        let (preserved, existence) = match j.join_type {
            JoinType::Inner => ([false, false], None),
            JoinType::Left => ([true, false], None),
            JoinType::Right => ([false, true], None),
            JoinType::Full => ([true, true], None),
            JoinType::LeftSemi => ([false, false], Some(Existence::Semi)),
            JoinType::LeftAnti => ([true, false], Some(Existence::Anti)),
            _ => {
                return Err(Error::unsupported(format!(
                    "{kind} JOIN in a stream (INNER, LEFT, RIGHT and FULL joins, and EXISTS / NOT EXISTS subqueries)"
                )))
            }
        };
        if existence.is_some() && j.null_aware {
            return Err(Error::unsupported(
                "NOT IN (subquery) in a stream (its NULL rules need every row of the subquery): write NOT EXISTS",
            ));
        }
        // Over a semi or anti join, WHERE reads the left columns alone: it filters them.
        let (filter, left_where) = match existence {
            Some(_) => (None, filter),
            None => (filter, None),
        };
        let outer = preserved.contains(&true) && self.asof.is_none();
        if outer && filter.is_some() {
            return Err(Error::unsupported(format!(
                "a WHERE over a {kind} JOIN in a stream: put conditions on one side in a stream of that side's rows, or in ON"
            )));
        }
        if j.null_equality == NullEquality::NullEqualsNull {
            return Err(Error::unsupported("IS NOT DISTINCT FROM as a join condition in a stream"));
        }
        let schemas = [j.left.schema().as_ref(), j.right.schema().as_ref()];
        // Each side's input and the filters on its way there, read once.
        let mut scanned: [Vec<(&DfExpr, &DFSchema)>; 2] = [Vec::new(), Vec::new()];
        let (left, left_projected) = scan_chain_projected(&j.left, &mut scanned[0])?;
        let (right, right_projected) = scan_chain_projected(&j.right, &mut scanned[1])?;
        let projected = [left_projected, right_projected];
        let inputs = [left, right];
        let is_lookup = |side: usize| self.catalog.sources.get(&inputs[side]).is_some_and(|d| d.lookup.is_some());
        let lookup_side = match (is_lookup(0), is_lookup(1)) {
            (true, true) => return Err(Error::unsupported("a JOIN of two lookup tables in a stream: join a stream to a lookup table")),
            (true, false) => Some(0),
            (false, true) => Some(1),
            (false, false) => None,
        };
        let mut pairs: Vec<(DfExpr, DfExpr)> = j.on.clone();
        let mut side_filters: [Vec<PhysExpr>; 2] = [Vec::new(), Vec::new()];
        if let Some(w) = left_where {
            side_filters[0].push(physical(w, schemas[0], props)?);
        }
        let mut residual = Vec::new();
        let conjuncts = j.filter.iter().chain(filter).flat_map(|e| split_conjunction(e).into_iter().cloned());
        for c in conjuncts {
            if let DfExpr::BinaryExpr(b) = &c {
                if b.op == Operator::Eq {
                    match (side_of(&b.left, schemas[0], schemas[1]), side_of(&b.right, schemas[0], schemas[1])) {
                        (Some(0), Some(1)) => {
                            pairs.push((*b.left.clone(), *b.right.clone()));
                            continue;
                        }
                        (Some(1), Some(0)) => {
                            pairs.push((*b.right.clone(), *b.left.clone()));
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            match side_of(&c, schemas[0], schemas[1]) {
                // An ON condition on a preserved side alone decides a match, not the row.
                Some(side) if outer && preserved[side] => residual.push(c),
                // The lookup table's rows are only seen joined.
                Some(side) if lookup_side == Some(side) => residual.push(c),
                Some(side) => side_filters[side].push(physical(&c, schemas[side], props)?),
                None => residual.push(c),
            }
        }
        if pairs.is_empty() {
            return Err(Error::unsupported(
                "a JOIN without an equality between its two sides in a stream (cross joins keep every pair)",
            ));
        }
        if left_asof && (filter.is_some() || !side_filters[0].is_empty()) {
            return Err(Error::unsupported(
                "a WHERE, or an ON condition on the left side alone, with a LEFT ASOF JOIN in a stream: filter a stream of its rows",
            ));
        }
        let mut exprs: [Vec<PhysExpr>; 2] = [Vec::new(), Vec::new()];
        let mut fields: [Vec<Field>; 2] = [Vec::new(), Vec::new()];
        for (i, (l, r)) in pairs.iter().enumerate() {
            let (lt, rt) = (l.get_type(schemas[0])?, r.get_type(schemas[1])?);
            let common = if lt == rt {
                lt
            } else {
                comparison_coercion(&lt, &rt).ok_or_else(|| {
                    Error::query(format!("cannot compare {lt} with {rt} in the join condition {l} = {r}"))
                })?
            };
            for (side, e) in [l, r].into_iter().enumerate() {
                let e = if e.get_type(schemas[side])? == common { e.clone() } else { e.clone().cast_to(&common, schemas[side])? };
                exprs[side].push(physical(&e, schemas[side], props)?);
                fields[side].push(Field::new(format!("key{i}"), common.clone(), true));
            }
        }
        if lookup_side.is_some() && (existence.is_some() || projected.contains(&true)) {
            return Err(Error::unsupported("EXISTS over a lookup table in a stream: join it (FROM s JOIN t ON s.k = t.k)"));
        }
        if let Some(table) = lookup_side {
            let lookup = LookupJoin { table, inputs: &inputs, scanned, side_filters, preserved, residual, exprs, fields };
            return self.lower_lookup(j, &pairs, lookup, output, schema);
        }
        // Conditions bounding the two rows' times against each other: an interval join.
        // Equal times (`a.ts = b.ts`, a key too) bound them as well.
        let timed: Vec<DfExpr> = residual.iter().cloned().chain(pairs.iter().map(|(l, r)| l.clone().eq(r.clone()))).collect();
        let bounds = match self.asof {
            None => {
                let is_time = |side: usize, column: usize| carries_watermark_time(self.catalog, &inputs[side], schemas[side].field(column));
                time_bounds(&timed, schemas, &is_time)?
            }
            Some(_) => None,
        };
        // Why a condition on time did not bound the join, for the refusals below (only
        // worked out when one is made).
        let hint = || {
            let timestamp = |side: usize, column: usize| matches!(schemas[side].field(column).data_type(), DataType::Timestamp(..));
            match time_bounds(&timed, schemas, &timestamp) {
                Ok(Some(_)) => {
                    " (its condition on time compares TIMESTAMP columns the watermark does not measure: compare each \
                     source's WATERMARK FOR column, or a windowed stream's window_end)"
                }
                _ => "",
            }
        };
        if existence.is_some() && bounds.is_none() {
            return Err(Error::unsupported(format!(
                "{} in a stream without a time bound{}: bound the two sides' times against each other in the \
                 subquery (WHERE f.k = o.k AND f.ts BETWEEN o.ts AND o.ts + INTERVAL '1' MINUTE), so the watermark \
                 tells when a row has met every row it will",
                if existence == Some(Existence::Semi) { "EXISTS (or IN) over a subquery" } else { "NOT EXISTS over a subquery" },
                hint()
            )));
        }
        if outer && existence.is_none() && bounds.is_none() && self.state_ttl_ms.is_none() {
            return Err(Error::unsupported(format!(
                "a {kind} JOIN in a stream without a time bound{}: bound the two sides' times against each other \
                 (ON a.k = b.k AND b.ts BETWEEN a.ts - INTERVAL '1' MINUTE AND a.ts + INTERVAL '1' MINUTE), so the \
                 watermark tells when a row has met every row it will (append-only output); or keep each row for a \
                 while after it arrived, CREATE STREAM name WITH (state_ttl = '1 hour') AS …, for a changelog that \
                 retracts a row padded with NULLs when its first match arrives",
                hint()
            )));
        }
        let mut ports = Vec::with_capacity(2);
        let key_types: Vec<DataType> = fields[0].iter().map(|f| f.data_type().clone()).collect();
        for (side, (input, filters)) in inputs.into_iter().zip(scanned).enumerate() {
            not_changelog(self.catalog, &input)?;
            let mut conditions: Vec<PhysExpr> = filters
                .iter()
                .map(|(f, schema)| physical(f, schema, props))
                .collect::<Result<_>>()?;
            let mut own = std::mem::take(&mut side_filters[side]);
            if projected[side] {
                // Compiled against the projection: read the input's columns by name.
                let real = self.catalog.table_schema(&input)?;
                own = own.into_iter().map(|e| by_name(e, &real)).collect::<Result<_>>()?;
                exprs[side] = std::mem::take(&mut exprs[side]).into_iter().map(|e| by_name(e, &real)).collect::<Result<_>>()?;
            }
            conditions.append(&mut own);
            for (k, field) in schemas[side].fields().iter().enumerate() {
                exprs[side].push(branch_column(self.catalog, &input, field, k, projected[side])?);
                fields[side].push(Field::new(field.name(), field.data_type().clone(), true));
            }
            let schema = Arc::new(Schema::new(std::mem::take(&mut fields[side])));
            let map = self.map(Upstream::Input(input), and_all(conditions), std::mem::take(&mut exprs[side]), schema);
            ports.push(port(Upstream::Node(map), Route::Key(pairs.len())));
        }
        // A semi or anti join's condition reads both sides; its output, the left side.
        let both;
        let joined = match existence {
            Some(_) => {
                both = build_join_schema(schemas[0], schemas[1], &JoinType::Inner)?;
                &both
            }
            None => j.schema.as_ref(),
        };
        let residual = match residual.into_iter().reduce(|a, b| a.and(b)) {
            Some(e) => Some(physical(&e, joined, &self.props)?),
            None => None,
        };
        let join = JoinPlan {
            keys: pairs.len(),
            key_types,
            residual,
            joined_schema: nullable(joined.as_arrow()),
            output,
            schema,
            state_ttl_ms: None,
            outer: [false, false],
        };
        if let Some(asof) = self.asof.take() {
            let (left_time, right_time, strict, direction) = asof_times(&asof.condition, schemas)?;
            let (left_time, right_time) = (join.keys + left_time, join.keys + right_time);
            let (forward, nearest) = (direction == Direction::Forward, direction == Direction::Nearest);
            let plan = AsofPlan { left_time, right_time, strict, forward, nearest, left_outer: asof.left, join };
            return Ok(self.dag.add(Arc::new(plan), ports));
        }
        if let Some(b) = bounds {
            let times = [join.keys + b.times[0], join.keys + b.times[1]];
            let outer = [outer && preserved[0], outer && preserved[1]];
            let plan = IntervalPlan { times, lo: b.lo, hi: b.hi, outer, existence, join };
            return Ok(self.dag.add(Arc::new(plan), ports));
        }
        let mut join = join;
        join.state_ttl_ms = self.state_ttl_ms;
        self.ttl_used |= self.state_ttl_ms.is_some();
        if outer {
            // Bounded by state_ttl only: a changelog (the rows end with the change column).
            join.outer = preserved;
            let mut fields: Vec<Field> = join.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
            join.schema = Arc::new(Schema::new(fields));
        }
        if join.state_ttl_ms.is_none() && !self.unbounded_join_ok {
            return Err(Error::unsupported(format!(
                "a JOIN in a stream without a bound on its state{} (it would keep every row of both sides for the \
                 stream's life): bound the two sides' times against each other (ON a.k = b.k AND b.ts BETWEEN a.ts - \
                 INTERVAL '1' MINUTE AND a.ts + INTERVAL '1' MINUTE), or keep each row for a while after it arrived: \
                 CREATE STREAM name WITH (state_ttl = '1 hour') AS …",
                hint()
            )));
        }
        Ok(self.dag.add(Arc::new(join), ports))
    }
}

/// Column `k` (`field`) of join input `input`, for the side's map. The planning table's
/// window columns are not in the rows: NULL here (the aggregate above computes windows
/// from the event time).
fn branch_column(catalog: &Catalog, input: &str, field: &Field, k: usize, projected: bool) -> Result<PhysExpr> {
    let real = catalog.table_schema(input)?;
    Ok(match real.index_of(field.name()) {
        Ok(i) => Arc::new(PhysColumn::new(field.name(), i)),
        Err(_) if projected || [WINDOW_START, WINDOW_END].contains(&field.name().as_str()) => {
            Arc::new(Literal::new(ScalarValue::try_from(field.data_type())?))
        }
        Err(_) => Arc::new(PhysColumn::new(field.name(), k)),
    })
}

/// `e` (compiled against a join side's schema, a projection of its input's columns)
/// reading its columns by name from the input's rows.
fn by_name(e: PhysExpr, real: &Schema) -> Result<PhysExpr> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    Ok(e.transform(|node| {
        if let Some(c) = node.downcast_ref::<PhysColumn>() {
            if let Ok(i) = real.index_of(c.name()) {
                return Ok(Transformed::yes(Arc::new(PhysColumn::new(c.name(), i)) as PhysExpr));
            }
        }
        Ok(Transformed::no(node))
    })?
    .data)
}

/// A join of a stream with a lookup table, as `lower_join` found it.
struct LookupJoin<'a> {
    /// The lookup table's side (0: left).
    table: usize,
    inputs: &'a [String; 2],
    scanned: [Vec<(&'a DfExpr, &'a DFSchema)>; 2],
    /// Conditions on one side alone (the stream's run before the lookup).
    side_filters: [Vec<PhysExpr>; 2],
    preserved: [bool; 2],
    /// Conditions over the joined row (those on the table's columns among them).
    residual: Vec<DfExpr>,
    /// Each side's key expressions and fields so far.
    exprs: [Vec<PhysExpr>; 2],
    fields: [Vec<Field>; 2],
}

impl Lowering<'_> {
    /// A stream joining a lookup table (`CREATE LOOKUP TABLE`): the stream side's map
    /// `[keys…, columns…]`, then the lookup node on the same shard.
    fn lower_lookup(&mut self, j: &Join, pairs: &[(DfExpr, DfExpr)], lookup: LookupJoin<'_>, output: Vec<PhysExpr>, schema: SchemaRef) -> Result<usize> {
        let LookupJoin { table, inputs, scanned, mut side_filters, preserved, residual, mut exprs, mut fields } = lookup;
        let stream = 1 - table;
        let name = &inputs[table];
        if self.asof.is_some() {
            return Err(Error::unsupported(format!("an ASOF JOIN with the lookup table '{name}': join it with a plain JOIN … ON")));
        }
        if preserved[table] {
            return Err(Error::unsupported(format!(
                "a {} JOIN that keeps the lookup table '{name}''s unmatched rows: a lookup table has no stream of rows                  (an INNER JOIN, or a LEFT JOIN from the stream, looks each stream row up)",
                j.join_type.to_string().to_uppercase()
            )));
        }
        let def = self.catalog.source(name)?;
        let source = def.lookup.clone().ok_or_else(|| Error::internal("a lookup table without its source"))?;
        let schemas = [j.left.schema().as_ref(), j.right.schema().as_ref()];
        let mut key_columns = Vec::with_capacity(pairs.len());
        for (l, r) in pairs {
            let e = if table == 0 { l } else { r };
            // A cast type coercion put around the column: the operator casts the table's
            // keys to the compared type itself.
            let column = match e {
                DfExpr::Cast(c) => c.expr.as_ref(),
                DfExpr::TryCast(c) => c.expr.as_ref(),
                other => other,
            };
            let DfExpr::Column(c) = column else {
                return Err(Error::unsupported(format!(
                    "the key {e} of the lookup table '{name}': compare its columns themselves (ON s.k = t.k)"
                )));
            };
            key_columns.push(schemas[table].index_of_column(c)?);
        }
        if !scanned[table].is_empty() {
            return Err(Error::unsupported(format!(
                "a subquery filtering the lookup table '{name}' in a stream: put its conditions in ON"
            )));
        }
        let props = self.props.clone();
        let input = inputs[stream].clone();
        not_changelog(self.catalog, &input)?;
        let mut conditions: Vec<PhysExpr> = scanned[stream].iter().map(|(f, schema)| physical(f, schema, &props)).collect::<Result<_>>()?;
        conditions.append(&mut side_filters[stream]);
        for (k, field) in schemas[stream].fields().iter().enumerate() {
            exprs[stream].push(branch_column(self.catalog, &input, field, k, false)?);
            fields[stream].push(Field::new(field.name(), field.data_type().clone(), true));
        }
        let key_types: Vec<DataType> = fields[stream][..pairs.len()].iter().map(|f| f.data_type().clone()).collect();
        for t in &key_types {
            source.check_key(t)?;
        }
        let map_schema = Arc::new(Schema::new(std::mem::take(&mut fields[stream])));
        let map = self.map(Upstream::Input(input), and_all(conditions), std::mem::take(&mut exprs[stream]), map_schema);
        let joined = j.schema.as_ref();
        let residual = match residual.into_iter().reduce(|a, b| a.and(b)) {
            Some(e) => Some(physical(&e, joined, &props)?),
            None => None,
        };
        let join = JoinPlan { keys: pairs.len(), key_types, residual, joined_schema: nullable(joined.as_arrow()), output, schema, state_ttl_ms: None, outer: [false, false] };
        let plan = LookupPlan {
            join,
            table: name.clone(),
            source,
            key_columns,
            stream_left: stream == 0,
            outer: preserved[stream],
            cache: CacheBounds::from_options(&def.options)?,
        };
        Ok(self.dag.add(Arc::new(plan), vec![port(Upstream::Node(map), Route::Forward)]))
    }
}

/// Whether `field` of `input` carries the time its watermark measures, so a join can
/// bound its state by it: a source's watermark column; a windowed stream's `window_end`
/// (its rows go out as the watermark passes that; their `window_start` is behind it);
/// otherwise a TIMESTAMP column (a source whose watermark is set by hand, a stream
/// passing its input's time on). Other conditions on time leave the join unbounded.
fn carries_watermark_time(catalog: &Catalog, input: &str, field: &Field) -> bool {
    let timestamp = matches!(field.data_type(), DataType::Timestamp(..));
    if let Some(source) = catalog.sources.get(input) {
        return match &source.watermark {
            Some(spec) => spec.column == *field.name(),
            None => timestamp,
        };
    }
    match catalog.streams.get(input) {
        Some(stream) if stream.table_schema.field_with_name(WINDOW_END).is_ok() => field.name() == WINDOW_END,
        _ => timestamp,
    }
}

/// The join under a projection, with the `WHERE` filter between them if any.
fn join_below(input: &LogicalPlan) -> Option<(&Join, Option<&DfExpr>)> {
    match input {
        LogicalPlan::Join(j) => Some((j, None)),
        LogicalPlan::Filter(f) => match f.input.as_ref() {
            LogicalPlan::Join(j) => Some((j, Some(&f.predicate))),
            _ => None,
        },
        _ => None,
    }
}

/// Which side of a join the columns of `e` come from: 0 (left only), 1 (right only), or
/// `None` (both, or neither).
fn side_of(e: &DfExpr, left: &DFSchema, right: &DFSchema) -> Option<usize> {
    let columns = e.column_refs();
    if columns.is_empty() {
        return None;
    }
    if columns.iter().all(|c| left.has_column(c)) {
        Some(0)
    } else if columns.iter().all(|c| right.has_column(c)) {
        Some(1)
    } else {
        None
    }
}

/// Which right row an ASOF join matches, relative to the left row's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Backward,
    Forward,
    Nearest,
}

/// The columns an ASOF match condition compares: (left side's time column, right side's,
/// strict, direction). Backward `t.ts >= q.ts` (`>`: strict), forward `t.ts <= q.ts` (`<`),
/// or the same written the other way round; nearest `NEAREST(t.ts, q.ts)`.
fn asof_times(condition: &Expr, schemas: [&DFSchema; 2]) -> Result<(usize, usize, bool, Direction)> {
    use datafusion::sql::sqlparser::ast::BinaryOperator as Op;
    let refused = || {
        Error::unsupported(format!(
            "the ASOF match condition {condition}: write it as left.time >= right.time (or >, <=, <), or \
             NEAREST(left.time, right.time), with a column of each side"
        ))
    };
    let side_column = |e: &Expr| -> Option<(usize, usize)> {
        let (qualifier, name) = match e {
            Expr::Identifier(id) => (None, id.value.clone()),
            Expr::CompoundIdentifier(ids) if ids.len() == 2 => (Some(ids[0].value.clone()), ids[1].value.clone()),
            _ => return None,
        };
        (0..2).find_map(|side| {
            let schema = schemas[side];
            let index = match &qualifier {
                Some(q) => schema.index_of_column_by_name(Some(&TableReference::bare(q.as_str())), &name),
                None => schema.index_of_column_by_name(None, &name),
            };
            index.map(|i| (side, i))
        })
    };
    if let Expr::Function(f) = condition {
        if f.name.to_string().eq_ignore_ascii_case("nearest") {
            let FunctionArguments::List(list) = &f.args else { return Err(refused()) };
            let columns: Vec<Option<(usize, usize)>> = list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => side_column(e),
                    _ => None,
                })
                .collect();
            return match columns.as_slice() {
                [Some((0, l)), Some((1, r))] | [Some((1, r)), Some((0, l))] => Ok((*l, *r, false, Direction::Nearest)),
                _ => Err(refused()),
            };
        }
    }
    let Expr::BinaryOp { left, op, right } = condition else { return Err(refused()) };
    let (Some(a), Some(b)) = (side_column(left), side_column(right)) else { return Err(refused()) };
    // Normalised to `left side ? right side`.
    let (l, r, op) = match (a.0, b.0) {
        (0, 1) => (a.1, b.1, op.clone()),
        (1, 0) => (b.1, a.1, match op {
            Op::LtEq => Op::GtEq,
            Op::Lt => Op::Gt,
            Op::GtEq => Op::LtEq,
            Op::Gt => Op::Lt,
            other => other.clone(),
        }),
        _ => return Err(refused()),
    };
    match op {
        Op::GtEq => Ok((l, r, false, Direction::Backward)),
        Op::Gt => Ok((l, r, true, Direction::Backward)),
        Op::LtEq => Ok((l, r, false, Direction::Forward)),
        Op::Lt => Ok((l, r, true, Direction::Forward)),
        _ => Err(refused()),
    }
}

fn and_all(mut exprs: Vec<PhysExpr>) -> Option<PhysExpr> {
    let first = exprs.pop()?;
    Some(exprs.into_iter().fold(first, |acc, e| Arc::new(BinaryExpr::new(e, Operator::And, acc)) as PhysExpr))
}

fn agg_kind(af: &AggregateFunction) -> Result<AggKind> {
    let name = af.func.name().to_ascii_lowercase();
    let distinct = af.params.distinct;
    Ok(match (name.as_str(), distinct) {
        ("count", false) => AggKind::Count,
        ("count", true) => AggKind::CountDistinct,
        ("sum", false) => AggKind::Sum,
        ("avg" | "mean", false) => AggKind::Avg,
        ("min", _) => AggKind::Min,
        ("max", _) => AggKind::Max,
        ("first_value", false) => AggKind::First,
        ("last_value", false) => AggKind::Last,
        ("stddev" | "stddev_samp", false) => AggKind::StddevSamp,
        ("stddev_pop", false) => AggKind::StddevPop,
        ("var" | "var_samp" | "variance" | "var_sample", false) => AggKind::VarSamp,
        ("var_pop" | "var_population", false) => AggKind::VarPop,
        (other, true) => return Err(Error::unsupported(format!("{}(DISTINCT …) in a stream", other.to_uppercase()))),
        (other, false) => return Err(Error::unsupported(format!("the aggregate {}() in a stream", other.to_uppercase()))),
    })
}

impl Lowering<'_> {
    /// A map node `[keys…, event time?, arguments…, change type?]` over the aggregate's
    /// input (a source or stream, or a join), then the aggregate node behind an exchange by
    /// key. Returns the aggregate node.
    fn lower_aggregate(
        &mut self,
        a: &datafusion::logical_expr::Aggregate,
        window: Option<&WindowCall>,
        having: Option<PhysExpr>,
        output: Vec<PhysExpr>,
        out_schema: &SchemaRef,
    ) -> Result<usize> {
        let props = &self.props.clone();
        let catalog = self.catalog;
        let in_schema = a.input.schema().as_ref();
        let (upstream, filter, input) = match join_below(&a.input) {
            Some((j, on)) => {
                // The join emits every column of the joined row; the map below picks.
                let joined = j.schema.as_arrow();
                let all = joined.fields().iter().enumerate().map(|(k, f)| Arc::new(PhysColumn::new(f.name(), k)) as PhysExpr).collect();
                let node = self.lower_join(j, on, all, nullable(joined))?;
                if self.dag.nodes[node].spec.changelog() {
                    return Err(Error::unsupported(
                        "GROUP BY over an outer JOIN bounded by state_ttl in one stream (its rows are a changelog): \
                         create the join as a stream, then aggregate that stream with COUNT, SUM or AVG",
                    ));
                }
                (Upstream::Node(node), None, "the join".to_string())
            }
            None => {
                let mut filters = Vec::new();
                let input = scan_chain(&a.input, &mut filters)?;
                not_lookup(catalog, &input)?;
                (Upstream::Input(input.clone()), combine_filters(&filters, props)?, input)
            }
        };
        let changelog = catalog.is_changelog(&input);
        let mut exprs: Vec<PhysExpr> = Vec::new();
        let mut fields: Vec<Field> = Vec::new();
        let mut layout = Vec::new();
        // `GROUP BY k, k` groups by k once: DataFusion's output schema holds each key once.
        let mut group_expr: Vec<&DfExpr> = Vec::with_capacity(a.group_expr.len());
        for g in &a.group_expr {
            if !group_expr.contains(&g) {
                group_expr.push(g);
            }
        }
        if group_expr.len() + a.aggr_expr.len() != a.schema.fields().len() {
            return Err(Error::unsupported(format!(
                "this GROUP BY in a stream ({} keys, {} aggregates, {} output columns)",
                group_expr.len(),
                a.aggr_expr.len(),
                a.schema.fields().len()
            )));
        }
        for (i, g) in group_expr.into_iter().enumerate() {
            if let DfExpr::GroupingSet(_) = g {
                return Err(Error::unsupported("GROUPING SETS / ROLLUP / CUBE in a stream"));
            }
            match g {
                DfExpr::Column(c) if c.name == WINDOW_START && window.is_some() => layout.push(GroupCol::WindowStart),
                DfExpr::Column(c) if c.name == WINDOW_END && window.is_some() => layout.push(GroupCol::WindowEnd),
                _ => {
                    let (_, field) = a.schema.qualified_field(i);
                    layout.push(GroupCol::Key(exprs.len()));
                    exprs.push(physical(g, in_schema, props)?);
                    fields.push(Field::new(format!("key{}", exprs.len() - 1), field.data_type().clone(), true));
                }
            }
        }
        let keys = exprs.len();
        let mut window_type = DataType::Int64;
        if let Some(w) = window {
            let (qualifier, field) = match &w.qualifier {
                Some(q) => in_schema.qualified_field_with_name(Some(&TableReference::bare(q.as_str())), &w.column)?,
                None => in_schema.qualified_field_with_unqualified_name(&w.column)?,
            };
            window_type = field.data_type().clone();
            let col = DfExpr::Column((qualifier, field).into());
            exprs.push(physical(&col, in_schema, props)?);
            fields.push(Field::new("event_time", window_type.clone(), true));
        }
        let mut calls = Vec::new();
        for (i, e) in a.aggr_expr.iter().enumerate() {
            let inner = match e {
                DfExpr::Alias(alias) => alias.expr.as_ref(),
                other => other,
            };
            let DfExpr::AggregateFunction(af) = inner else {
                return Err(Error::unsupported(format!("the aggregate expression {e} in a stream")));
            };
            if af.params.filter.is_some() {
                return Err(Error::unsupported("aggregate FILTER (WHERE …) in a stream"));
            }
            let user = catalog.functions.aggregate(af.func.name());
            let kind = match &user {
                Some(_) if af.params.distinct => {
                    return Err(Error::unsupported(format!("{}(DISTINCT …) in a stream", af.func.name())))
                }
                Some(_) => AggKind::User,
                None => agg_kind(af)?,
            };
            if !af.params.order_by.is_empty() {
                return Err(Error::unsupported(format!(
                    "ORDER BY inside {}() in a stream: streams order FIRST_VALUE/LAST_VALUE by event time",
                    af.func.name().to_uppercase()
                )));
            }
            let out_type = a.schema.field(a.schema.fields().len() - a.aggr_expr.len() + i).data_type().clone();
            if let Some(function) = user {
                if function.keeps_rows() && window.is_none() {
                    let name = af.func.name().trim_end_matches("__agg");
                    return Err(Error::unsupported(format!(
                        "{name}() over the rows of each group in a stream without a window: it would keep every row \
                         for ever; group by a window, or write the aggregate as a @laminardb.udaf class"
                    )));
                }
                let (mut args, mut arg_types) = (Vec::new(), Vec::new());
                for (j, arg) in af.params.args.iter().enumerate() {
                    let t = arg.get_type(in_schema)?;
                    exprs.push(physical(arg, in_schema, props)?);
                    fields.push(Field::new(format!("arg{i}_{j}"), t.clone(), true));
                    args.push(exprs.len() - 1);
                    arg_types.push(t);
                }
                let arg = args.first().copied();
                calls.push(AggCall { kind, arg, domain: Domain::Int, out_type, user: Some(UserCall { function, args, arg_types }) });
                continue;
            }
            let (arg, domain) = match af.params.args.as_slice() {
                [] => (None, Domain::Int),
                [DfExpr::Literal(v, _)] if kind == AggKind::Count && !v.is_null() => (None, Domain::Int),
                [arg] => {
                    let t = arg.get_type(in_schema)?;
                    let domain = Domain::of(&t)
                        .ok_or_else(|| Error::unsupported(format!("{kind:?} over {t} values in a stream")))?;
                    exprs.push(physical(arg, in_schema, props)?);
                    fields.push(Field::new(format!("arg{i}"), t, true));
                    (Some(exprs.len() - 1), domain)
                }
                _ => return Err(Error::unsupported(format!("{}() with several arguments in a stream", af.func.name()))),
            };
            calls.push(AggCall { kind, arg, domain, out_type, user: None });
        }
        let mut retract = None;
        if changelog {
            if let Some(call) = calls.iter().find(|c| !matches!(c.kind, AggKind::Count | AggKind::Sum | AggKind::Avg)) {
                return Err(Error::unsupported(format!(
                    "{:?} over the changelog {} '{input}': only COUNT, SUM and AVG can take back a retracted row",
                    call.kind,
                    changelog_kind(catalog, &input)
                )));
            }
            if window.is_some() {
                return Err(Error::unsupported(format!(
                    "a window over the changelog {} '{input}'",
                    changelog_kind(catalog, &input)
                )));
            }
            let op = DfExpr::Column(in_schema.qualified_field_with_unqualified_name(OP_COLUMN)?.into());
            exprs.push(physical(&op, in_schema, props)?);
            fields.push(Field::new(OP_COLUMN, DataType::Utf8, true));
            retract = Some(exprs.len() - 1);
        }
        let windowed = window.is_some();
        let emit = match self.emit {
            None if windowed => Emit::AfterWatermark,
            None => Emit::Changes,
            Some(Emit::AfterWatermark | Emit::OnWindowClose) if !windowed => {
                return Err(Error::query("EMIT AFTER WATERMARK / ON WINDOW CLOSE / FINAL need a window in GROUP BY"))
            }
            Some(e) => e,
        };
        if retract.is_some() && emit != Emit::Changes {
            return Err(Error::unsupported("EMIT other than CHANGES for an aggregate over a changelog stream"));
        }
        let mut out_fields: Vec<Field> = nullable(out_schema).fields().iter().map(|f| f.as_ref().clone()).collect();
        if matches!(emit, Emit::Changes | Emit::Every(_)) {
            out_fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
        }
        let keys_exchange = if keys == 0 { Route::Single } else { Route::Key(keys) };
        let input_schema = Arc::new(Schema::new(fields));
        let map = self.map(upstream, filter, exprs, input_schema.clone());
        let agg = AggPlan {
            input: input_schema,
            keys,
            window: window.map(|w| w.kind),
            window_type,
            calls,
            agg_schema: nullable(a.schema.as_arrow()),
            layout,
            having,
            output,
            retract,
            emit,
            lateness_ms: self.lateness_ms,
            schema: Arc::new(Schema::new(out_fields)),
        };
        self.aggregate = Some(windowed);
        Ok(self.dag.add(Arc::new(agg), vec![port(Upstream::Node(map), keys_exchange)]))
    }
}
