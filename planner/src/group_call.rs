//! A Python scalar function called over a group, as the specification's example does:
//! `SELECT symbol, vwap(price, volume) FROM trades GROUP BY symbol`, with `vwap` a
//! vectorized function reducing its arrays to one value. Its arguments are not grouped, so
//! SQL could not call it once per row: it is called once per group with the group's rows
//! instead. Before planning, such a call is renamed to the function's aggregate twin
//! (`<name>__agg`, which the binding registers beside every vectorized function; its
//! result column keeps the function's own name).

use std::collections::HashSet;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use laminardb_engine::functions::Functions;

use datafusion::sql::sqlparser::ast::{
    visit_expressions, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, ObjectName, Query, Select,
    SelectItem, SetExpr, Statement, VisitMut, VisitorMut,
};

/// The name of `name`'s aggregate twin.
pub fn twin_name(name: &str) -> String {
    format!("{name}__agg")
}

/// Whether `name` is a built-in aggregate function (its arguments are read per row).
fn builtin_aggregate(name: &str) -> bool {
    static NAMES: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    NAMES
        .get_or_init(|| {
            datafusion::functions_aggregate::all_default_aggregate_functions()
                .iter()
                .flat_map(|f| std::iter::once(f.name().to_string()).chain(f.aliases().iter().cloned()))
                .collect()
        })
        .contains(name)
}

/// `rewrite` against the catalog's functions: twins are the aggregates named `<name>__agg`.
fn rewrite_statement(statement: &mut Statement, functions: &Functions) -> bool {
    if !functions.all_aggregate_names().iter().any(|n| n.ends_with("__agg")) {
        return false;
    }
    rewrite(statement, &|n| functions.aggregate(&twin_name(n)).is_some(), &|n| {
        builtin_aggregate(n) || functions.aggregate(n).is_some()
    })
}

/// `sql` rewritten, if it calls a twin-backed function over a group (else `None`).
pub fn rewrite_sql(sql: &str, functions: &Functions) -> Option<String> {
    if !functions.all_aggregate_names().iter().any(|n| n.ends_with("__agg")) {
        return None;
    }
    let mut statements = Parser::parse_sql(&GenericDialect {}, sql).ok()?;
    let [statement] = statements.as_mut_slice() else { return None };
    rewrite_statement(statement, functions).then(|| statement.to_string())
}

/// Renames, in every `SELECT … GROUP BY` of `statement`, each call of a function that has
/// a twin (`has_twin`) whose arguments read a column the `GROUP BY` does not name; calls
/// inside aggregates (`is_aggregate`) stay per row. True when something was renamed.
pub fn rewrite(statement: &mut Statement, has_twin: &dyn Fn(&str) -> bool, is_aggregate: &dyn Fn(&str) -> bool) -> bool {
    let mut rewriter = Rewriter { has_twin, is_aggregate, changed: false };
    let _ = statement.visit(&mut rewriter);
    rewriter.changed
}

struct Rewriter<'a> {
    has_twin: &'a dyn Fn(&str) -> bool,
    is_aggregate: &'a dyn Fn(&str) -> bool,
    changed: bool,
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        self.set(&mut query.body);
        ControlFlow::Continue(())
    }
}

/// The column an expression names, by its last part (`t.price` → `price`).
fn column(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(id.value.to_lowercase()),
        Expr::CompoundIdentifier(ids) => ids.last().map(|id| id.value.to_lowercase()),
        _ => None,
    }
}

struct Groups {
    exprs: HashSet<String>,
    columns: HashSet<String>,
}

impl Rewriter<'_> {
    fn set(&mut self, body: &mut SetExpr) {
        match body {
            SetExpr::Select(select) => self.select(select),
            SetExpr::SetOperation { left, right, .. } => {
                self.set(left);
                self.set(right);
            }
            _ => {}
        }
    }

    fn select(&mut self, select: &mut Select) {
        let GroupByExpr::Expressions(keys, _) = &select.group_by else { return };
        if keys.is_empty() {
            return;
        }
        let groups = Groups {
            exprs: keys.iter().map(|k| k.to_string().to_lowercase()).collect(),
            columns: keys.iter().filter_map(column).collect(),
        };
        for item in &mut select.projection {
            if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
                self.expr(e, &groups);
            }
        }
        if let Some(having) = &mut select.having {
            self.expr(having, &groups);
        }
    }

    fn expr(&mut self, e: &mut Expr, groups: &Groups) {
        if groups.exprs.contains(&e.to_string().to_lowercase()) {
            return;
        }
        match e {
            Expr::Function(f) => {
                let name = f.name.to_string().to_lowercase();
                if (self.has_twin)(&name) && reads_ungrouped(&f.args, groups) {
                    f.name = ObjectName::from(vec![Ident::new(twin_name(&name))]);
                    self.changed = true;
                    return;
                }
                if (self.is_aggregate)(&name) {
                    return;
                }
                if let FunctionArguments::List(list) = &mut f.args {
                    for arg in &mut list.args {
                        if let FunctionArg::Unnamed(FunctionArgExpr::Expr(a)) | FunctionArg::Named { arg: FunctionArgExpr::Expr(a), .. } = arg {
                            self.expr(a, groups);
                        }
                    }
                }
            }
            Expr::BinaryOp { left, right, .. } => {
                self.expr(left, groups);
                self.expr(right, groups);
            }
            Expr::UnaryOp { expr, .. } | Expr::Nested(expr) | Expr::Cast { expr, .. } => self.expr(expr, groups),
            _ => {}
        }
    }
}

fn reads_ungrouped(args: &FunctionArguments, groups: &Groups) -> bool {
    let mut ungrouped = false;
    let _ = visit_expressions(args, |e: &Expr| {
        if column(e).is_some_and(|c| !groups.columns.contains(&c)) {
            ungrouped = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    ungrouped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut statement = Parser::parse_sql(&GenericDialect {}, sql).unwrap().remove(0);
        rewrite(&mut statement, &|n| n == "vwap" || n == "bucket", &|n| n == "sum" || n == "count");
        statement.to_string()
    }

    #[test]
    fn only_calls_over_ungrouped_columns_become_aggregates() {
        assert_eq!(
            rewritten("SELECT symbol, ROUND(vwap(price, volume), 2) AS v FROM trades GROUP BY symbol"),
            "SELECT symbol, ROUND(vwap__agg(price, volume), 2) AS v FROM trades GROUP BY symbol"
        );
        // Grouped by the call itself, or over grouped columns only, or inside an aggregate,
        // or without GROUP BY: per row, as written.
        for sql in [
            "SELECT bucket(price) AS b, COUNT(*) AS n FROM trades GROUP BY bucket(price)",
            "SELECT symbol, bucket(symbol) FROM trades GROUP BY symbol",
            "SELECT symbol, SUM(bucket(price)) FROM trades GROUP BY symbol",
            "SELECT vwap(price, volume) FROM trades",
        ] {
            assert_eq!(rewritten(sql), sql);
        }
        assert_eq!(
            rewritten("SELECT s FROM (SELECT t.symbol AS s, vwap(t.price, t.volume) AS v FROM trades AS t GROUP BY t.symbol) WHERE v > 1"),
            "SELECT s FROM (SELECT t.symbol AS s, vwap__agg(t.price, t.volume) AS v FROM trades AS t GROUP BY t.symbol) WHERE v > 1"
        );
    }
}
