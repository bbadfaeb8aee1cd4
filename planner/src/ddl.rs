//! Our DDL: `CREATE SOURCE|TABLE … (…, WATERMARK FOR col [AS col - INTERVAL …]) [WITH (…)]`
//! and `DROP SOURCE|TABLE|STREAM|SINK|MATERIALIZED VIEW [IF EXISTS] name`.
//!
//! The `WATERMARK FOR` item is cut out of the column list at token level and the rest is
//! handed to sqlparser as a `CREATE TABLE`, so column syntax is exactly standard SQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, ColumnOption, CreateTableOptions, Expr, Ident, ObjectName, SqlOption,
    Statement as SqlStatement, TableConstraint,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Word};

use laminardb_engine::catalog::{SourceDef, SourceKind, WatermarkSpec};
use laminardb_engine::frontend::{ObjectKind, Statement};
use laminardb_engine::types::parse_type_string;
use laminardb_engine::{Error, Result};

use crate::interval::interval_ms;
use crate::split::leading_words;

/// Returns `Some` when the statement is our DDL, `None` when DataFusion should plan it.
pub fn plan_ddl(sql: &str, tokens: &[Token]) -> Result<Option<Statement>> {
    let words = leading_words(tokens, 5);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let after_create = match w.as_slice() {
        ["CREATE", "OR", "REPLACE", rest @ ..] => rest,
        ["CREATE", rest @ ..] => rest,
        ["DROP", ..] => return plan_drop(tokens).map(Some),
        _ => return Ok(None),
    };
    match after_create {
        ["SOURCE", ..] => plan_create_source(sql, tokens, SourceKind::Source).map(Some),
        ["TABLE", ..] => plan_create_source(sql, tokens, SourceKind::Table).map(Some),
        ["LOOKUP", "TABLE", ..] => plan_create_source(sql, tokens, SourceKind::Lookup).map(Some),
        ["VIEW", ..] => Err(Error::unsupported("CREATE VIEW: use CREATE STREAM or CREATE MATERIALIZED VIEW")),
        _ => Err(Error::unsupported(format!("statement '{}'", words.join(" ")))),
    }
}

fn plan_drop(tokens: &[Token]) -> Result<Statement> {
    let words = significant(tokens);
    let mut i = 1;
    // `DROP LOOKUP TABLE` is `DROP TABLE`.
    if words.get(1).map(|t| upper(t)).as_deref() == Some("LOOKUP") && words.get(2).map(|t| upper(t)).as_deref() == Some("TABLE") {
        i += 1;
    }
    let kind = match words.get(i).map(|t| upper(t)).as_deref() {
        Some("SOURCE") => ObjectKind::Source,
        Some("TABLE") => ObjectKind::Table,
        Some("STREAM") => ObjectKind::Stream,
        Some("SINK") => ObjectKind::Sink,
        Some("VIEW") => ObjectKind::View,
        Some("MATERIALIZED") if words.get(2).map(|t| upper(t)).as_deref() == Some("VIEW") => {
            i += 1;
            ObjectKind::View
        }
        _ => return Err(Error::parse("expected DROP SOURCE|TABLE|STREAM|SINK|MATERIALIZED VIEW <name>")),
    };
    i += 1;
    let mut if_exists = false;
    if words.get(i).map(|t| upper(t)).as_deref() == Some("IF") {
        if words.get(i + 1).map(|t| upper(t)).as_deref() != Some("EXISTS") {
            return Err(Error::parse("expected IF EXISTS"));
        }
        if_exists = true;
        i += 2;
    }
    let name = match words.get(i) {
        Some(Token::Word(w)) => ident_name(w),
        _ => return Err(Error::parse("DROP needs an object name")),
    };
    if words.len() > i + 1 {
        return Err(Error::parse(format!("unexpected '{}' after DROP {} {name}", words[i + 1], kind.sql_name())));
    }
    Ok(Statement::Drop { kind, name, if_exists })
}

fn plan_create_source(sql: &str, tokens: &[Token], kind: SourceKind) -> Result<Statement> {
    let (tokens, watermark_tokens) = cut_watermark_clause(tokens)?;
    let tokens = match kind {
        SourceKind::Lookup => without_lookup_keyword(tokens),
        _ => rename_source_keyword(tokens),
    };
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).with_tokens(tokens);
    let parsed = parser.parse_statement().map_err(|e| Error::parse(e.to_string()))?;
    let SqlStatement::CreateTable(create) = parsed else {
        return Err(Error::parse("expected CREATE SOURCE name (column type, …)"));
    };
    if create.query.is_some() {
        return Err(Error::unsupported("CREATE SOURCE … AS SELECT (use CREATE STREAM)"));
    }
    let name = object_name(&create.name)?;
    let options = with_options(&create.table_options)?;
    if create.columns.is_empty() && !options.contains_key("connector") {
        return Err(Error::invalid_schema(format!("'{name}' needs at least one column")));
    }
    let mut fields = Vec::with_capacity(create.columns.len());
    let mut primary_key = Vec::new();
    for (i, col) in create.columns.iter().enumerate() {
        let data_type = parse_type_string(&col.data_type.to_string())?;
        let mut nullable = true;
        for option in &col.options {
            match &option.option {
                ColumnOption::NotNull => nullable = false,
                ColumnOption::Null => nullable = true,
                ColumnOption::PrimaryKey(_) => {
                    primary_key.push(i);
                    nullable = false;
                }
                other => return Err(Error::unsupported(format!("column option {other}"))),
            }
        }
        fields.push(Field::new(ident_value(&col.name), data_type, nullable));
    }
    let mut schema = Arc::new(Schema::new(fields));
    let declared = (!create.columns.is_empty()).then(|| schema.clone());
    let connector = match kind {
        SourceKind::Lookup => None,
        _ => laminardb_engine::source::connector(&options, declared.as_ref())?,
    };
    if let Some(connector) = &connector {
        let produced = connector.schema();
        // A source of changes adds its `_op` column to the declared ones.
        let made = if connector.changelog() { produced.project(&(0..produced.fields().len() - 1).collect::<Vec<_>>())? } else { produced.as_ref().clone() };
        if !create.columns.is_empty() && !same_columns(&schema, &made) {
            return Err(Error::invalid_schema(format!(
                "this {} source has the columns ({}); declare those or none",
                connector.name(),
                describe_columns(&made)
            )));
        }
        schema = produced;
    }
    for constraint in &create.constraints {
        match constraint {
            TableConstraint::PrimaryKey(pk) => {
                for col in &pk.columns {
                    let col_name = col.to_string();
                    let idx = schema
                        .index_of(col_name.trim_matches('"'))
                        .map_err(|_| Error::invalid_schema(format!("PRIMARY KEY column {col_name} is not a column")))?;
                    primary_key.push(idx);
                }
            }
            other => return Err(Error::unsupported(format!("table constraint {other}"))),
        }
    }
    if kind == SourceKind::Lookup {
        if watermark_tokens.is_some() {
            return Err(Error::invalid_schema("a lookup table has no event time: WATERMARK FOR is for sources and tables"));
        }
        let source = laminardb_engine::lookup::lookup_source(&options, &schema)?;
        laminardb_engine::lookup::CacheBounds::from_options(&options)?;
        let def = SourceDef {
            name,
            kind,
            schema,
            watermark: None,
            partition_key: Vec::new(),
            primary_key,
            options,
            sql: sql.to_string(),
            connector: None,
            lookup: Some(source),
        };
        return Ok(Statement::CreateSource { def, if_not_exists: create.if_not_exists, or_replace: create.or_replace });
    }
    if !primary_key.is_empty() {
        return Err(Error::unsupported(
            "PRIMARY KEY on a source or table (rows are not upserted by key): declare it without one, or keep \
             reference rows outside the engine and join them with CREATE LOOKUP TABLE",
        ));
    }
    let mut watermark = match watermark_tokens {
        Some(tokens) => Some(parse_watermark(tokens)?),
        None => None,
    };
    if let Some(column) = options.get("watermark_column") {
        let delay_ms = match options.get("watermark_delay_ms") {
            Some(v) => v.parse().map_err(|_| Error::parse(format!("watermark_delay_ms '{v}' is not an integer")))?,
            None => 0,
        };
        if watermark.as_ref().is_some_and(|w| &w.column != column) {
            return Err(Error::parse("WATERMARK FOR and watermark_column name different columns"));
        }
        watermark.get_or_insert(WatermarkSpec { column: column.clone(), delay_ms });
    }
    if watermark.is_none() {
        // A connector whose rows come in event-time order: the watermark follows them.
        if let Some(column) = connector.as_ref().and_then(|c| c.ordered_time_column()) {
            watermark = Some(WatermarkSpec { column: column.into(), delay_ms: 0 });
        }
    }
    if let Some(w) = &watermark {
        let field = schema
            .field_with_name(&w.column)
            .map_err(|_| Error::invalid_schema(format!("watermark column '{}' is not a column of '{name}'", w.column)))?;
        if !matches!(field.data_type(), DataType::Timestamp(..) | DataType::Int64 | DataType::Int32) {
            return Err(Error::invalid_schema(format!(
                "watermark column '{}' is {}; it must be TIMESTAMP or BIGINT epoch milliseconds",
                w.column,
                field.data_type()
            )));
        }
        if w.delay_ms < 0 {
            return Err(Error::invalid_schema("a watermark delay cannot be negative"));
        }
    }
    if connector.is_none() {
        // Without a connector, only the keys every source takes (a connector checks its own).
        use laminardb_engine::source::SOURCE_KEYS;
        if let Some(key) = options.keys().find(|k| !SOURCE_KEYS.contains(&k.as_str())) {
            return Err(Error::invalid_schema(format!(
                "unknown option '{key}' in WITH: a source takes {}",
                SOURCE_KEYS.join(", ")
            )));
        }
    }
    let retention = laminardb_engine::catalog::Retention::from_options(&options)?;
    if retention.time_ms.is_some() && watermark.is_none() {
        return Err(Error::invalid_schema(format!(
            "retention = '{}' drops rows by event time, so '{name}' needs a watermark \
             (WATERMARK FOR col or watermark_column); or keep a number of rows with retention_rows",
            options["retention"]
        )));
    }
    let mut def = SourceDef {
        name,
        kind,
        schema,
        watermark,
        partition_key: Vec::new(),
        primary_key,
        options,
        sql: sql.to_string(),
        connector,
        lookup: None,
    };
    def.choose_partition_key()?;
    Ok(Statement::CreateSource { def, if_not_exists: create.if_not_exists, or_replace: create.or_replace })
}

fn same_columns(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields().iter().zip(b.fields()).all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

fn describe_columns(schema: &Schema) -> String {
    schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
}

/// Removes `WATERMARK FOR …` from the top-level column list (with its separating comma)
/// and returns the tokens after `WATERMARK`.
fn cut_watermark_clause(tokens: &[Token]) -> Result<(Vec<Token>, Option<Vec<Token>>)> {
    let mut depth = 0usize;
    let mut start = None;
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Token::LParen => depth += 1,
            Token::RParen => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 1 && w.quote_style.is_none() && w.value.eq_ignore_ascii_case("WATERMARK") => {
                let next = tokens[i + 1..].iter().find(|t| !matches!(t, Token::Whitespace(_)));
                if matches!(next, Some(Token::Word(n)) if n.value.eq_ignore_ascii_case("FOR")) {
                    start = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let Some(start) = start else { return Ok((tokens.to_vec(), None)) };
    // The clause runs to the next comma or closing parenthesis at the column-list depth.
    let mut depth = 1usize;
    let mut end = tokens.len();
    for (i, t) in tokens.iter().enumerate().skip(start) {
        match t {
            Token::LParen => depth += 1,
            Token::RParen if depth == 1 => {
                end = i;
                break;
            }
            Token::RParen => depth -= 1,
            Token::Comma if depth == 1 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let clause = tokens[start + 1..end].to_vec();
    // Drop the comma that separated the clause from the previous column.
    let mut before = tokens[..start].to_vec();
    while matches!(before.last(), Some(Token::Whitespace(_))) {
        before.pop();
    }
    let mut after = tokens[end..].to_vec();
    if matches!(before.last(), Some(Token::Comma)) {
        before.pop();
    } else if matches!(after.first(), Some(Token::Comma)) {
        after.remove(0);
    }
    before.extend(after);
    Ok((before, Some(clause)))
}

/// `CREATE [OR REPLACE] LOOKUP TABLE` → `CREATE [OR REPLACE] TABLE`.
fn without_lookup_keyword(mut tokens: Vec<Token>) -> Vec<Token> {
    if let Some(i) = tokens.iter().position(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("LOOKUP"))) {
        tokens.remove(i);
    }
    tokens
}

fn rename_source_keyword(mut tokens: Vec<Token>) -> Vec<Token> {
    if let Some(t) = tokens.iter_mut().find(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("SOURCE"))) {
        *t = Token::make_keyword("TABLE");
    }
    tokens
}

/// `FOR col [AS expr]` → the watermark column and its delay.
fn parse_watermark(tokens: Vec<Token>) -> Result<WatermarkSpec> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).with_tokens(tokens);
    parser.expect_keyword(datafusion::sql::sqlparser::keywords::Keyword::FOR).map_err(|e| Error::parse(e.to_string()))?;
    let column = parser.parse_identifier().map_err(|e| Error::parse(e.to_string()))?;
    let column = ident_value(&column);
    let delay_ms = if parser.parse_keyword(datafusion::sql::sqlparser::keywords::Keyword::AS) {
        let expr = parser.parse_expr().map_err(|e| Error::parse(e.to_string()))?;
        watermark_delay(&column, &expr)?
    } else {
        0
    };
    if parser.peek_token().token != Token::EOF {
        return Err(Error::parse(format!("unexpected '{}' in WATERMARK FOR clause", parser.peek_token().token)));
    }
    Ok(WatermarkSpec { column, delay_ms })
}

fn watermark_delay(column: &str, expr: &Expr) -> Result<i64> {
    let names_column = |e: &Expr| matches!(e, Expr::Identifier(id) if ident_value(id) == column);
    match expr {
        e if names_column(e) => Ok(0),
        Expr::BinaryOp { left, op: BinaryOperator::Minus, right } if names_column(left) => interval_ms(right),
        Expr::Nested(inner) => watermark_delay(column, inner),
        other => Err(Error::unsupported(format!(
            "watermark expression {other}: write `{column}` or `{column} - INTERVAL '…' SECOND`"
        ))),
    }
}

fn with_options(options: &CreateTableOptions) -> Result<BTreeMap<String, String>> {
    let list = match options {
        CreateTableOptions::None => return Ok(BTreeMap::new()),
        CreateTableOptions::With(list) | CreateTableOptions::Options(list) => list,
        other => return Err(Error::unsupported(format!("table options {other}"))),
    };
    let mut out = BTreeMap::new();
    for option in list {
        let SqlOption::KeyValue { key, value } = option else {
            return Err(Error::parse(format!("expected key = 'value' in WITH, found {option}")));
        };
        let value = match value {
            Expr::Value(v) => match &v.value {
                datafusion::sql::sqlparser::ast::Value::SingleQuotedString(s)
                | datafusion::sql::sqlparser::ast::Value::DoubleQuotedString(s)
                | datafusion::sql::sqlparser::ast::Value::Number(s, _) => s.clone(),
                datafusion::sql::sqlparser::ast::Value::Boolean(b) => b.to_string(),
                other => other.to_string(),
            },
            Expr::Identifier(id) => id.value.clone(),
            other => other.to_string(),
        };
        out.insert(key.value.to_ascii_lowercase(), value);
    }
    Ok(out)
}

fn object_name(name: &ObjectName) -> Result<String> {
    match name.0.as_slice() {
        [part] => Ok(part.as_ident().map(ident_value).unwrap_or_else(|| part.to_string())),
        _ => Err(Error::unsupported(format!("qualified name {name}: objects live in one namespace"))),
    }
}

/// Unquoted identifiers fold to lower case, as DataFusion folds them in queries.
fn ident_value(id: &Ident) -> String {
    if id.quote_style.is_some() { id.value.clone() } else { id.value.to_ascii_lowercase() }
}

fn ident_name(w: &Word) -> String {
    if w.quote_style.is_some() { w.value.clone() } else { w.value.to_ascii_lowercase() }
}

fn significant(tokens: &[Token]) -> Vec<&Token> {
    tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect()
}

fn upper(t: &Token) -> String {
    match t {
        Token::Word(w) => w.value.to_ascii_uppercase(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::tokenize;

    fn plan(sql: &str) -> Result<Statement> {
        plan_ddl(sql, &tokenize(sql).unwrap()).map(|s| s.expect("is DDL"))
    }

    fn source(sql: &str) -> SourceDef {
        match plan(sql).unwrap() {
            Statement::CreateSource { def, .. } => def,
            _ => panic!("not a source"),
        }
    }

    #[test]
    fn watermark_clause_with_delay() {
        let def = source(
            "CREATE SOURCE trades (ts TIMESTAMP(3), symbol VARCHAR NOT NULL, price DOUBLE, \
             WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)",
        );
        assert_eq!(def.watermark, Some(WatermarkSpec { column: "ts".into(), delay_ms: 5000 }));
        assert_eq!(def.schema.fields().len(), 3);
        assert!(!def.schema.field(1).is_nullable());
        assert_eq!(def.partition_key, Vec::<usize>::new(), "rows are dealt out by position unless told");
        let keyed = source("CREATE SOURCE q (ts BIGINT, symbol VARCHAR) WITH (partition_key = 'symbol')");
        assert_eq!(keyed.partition_key, vec![1]);
    }

    #[test]
    fn watermark_first_and_with_option() {
        let def = source("create source if not exists s (WATERMARK FOR ts, ts BIGINT, v DOUBLE)");
        assert_eq!(def.watermark.unwrap().delay_ms, 0);
        let def = source("CREATE SOURCE s (ts BIGINT, v DOUBLE) WITH (watermark_column = 'ts')");
        assert_eq!(def.watermark.unwrap().column, "ts");
    }

    #[test]
    fn bad_watermarks_are_rejected() {
        assert!(plan("CREATE SOURCE s (ts VARCHAR, WATERMARK FOR ts)").is_err());
        assert!(plan("CREATE SOURCE s (ts BIGINT, WATERMARK FOR nope)").is_err());
        assert!(plan("CREATE SOURCE s (ts BIGINT, WATERMARK FOR ts AS ts * 2)").is_err());
    }

    #[test]
    fn retention_options_are_checked_and_unknown_options_refused() {
        let def = source("CREATE SOURCE s (ts BIGINT, v DOUBLE, WATERMARK FOR ts) WITH (retention = '1 hour', retention_rows = '500')");
        let r = def.retention().unwrap();
        assert_eq!((r.time_ms, r.rows), (Some(3_600_000), Some(500)));
        assert_eq!(source("CREATE SOURCE s (v DOUBLE) WITH (retention_rows = '10')").retention().unwrap().rows, Some(10));
        let err = plan("CREATE SOURCE s (ts BIGINT, v DOUBLE) WITH (retention = '1 hour')").err().unwrap();
        assert_eq!(err.code, laminardb_engine::ErrorCode::InvalidSchema);
        assert!(err.message.contains("needs a watermark"), "{err}");
        let err = plan("CREATE SOURCE s (ts BIGINT, WATERMARK FOR ts) WITH (retention = 'forever')").err().unwrap();
        assert!(err.message.contains("retention = 'forever' is not a duration"), "{err}");
        let err = plan("CREATE SOURCE s (v DOUBLE) WITH (retension_rows = '10')").err().unwrap();
        assert_eq!(err.code, laminardb_engine::ErrorCode::InvalidSchema);
        assert!(err.message.contains("unknown option 'retension_rows'"), "{err}");
    }

    #[test]
    fn drops() {
        match plan("DROP MATERIALIZED VIEW IF EXISTS \"Mv\"").unwrap() {
            Statement::Drop { kind, name, if_exists } => {
                assert_eq!((kind, name.as_str(), if_exists), (ObjectKind::View, "Mv", true));
            }
            _ => panic!(),
        }
        assert!(plan("DROP SOURCE").is_err());
    }

    #[test]
    fn streams_are_rejected_by_name_until_supported() {
        let err = plan("CREATE STREAM s AS SELECT 1").err().unwrap();
        assert!(err.message.contains("CREATE STREAM"), "{err}");
    }
}
