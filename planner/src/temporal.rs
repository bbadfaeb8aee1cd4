//! Temporal joins: `JOIN instruments FOR SYSTEM_TIME AS OF t.ts [AS] i ON t.sym = i.sym`
//! joins each row with the version of the table's row current at its time `t.ts`: the
//! latest row of its key whose version time (the table's `WATERMARK FOR` column) is at or
//! before it. That is an ASOF join on the key, so the clause is rewritten, at token level
//! (the SQL dialect does not parse it), into one:
//!
//! ```sql
//! ASOF JOIN instruments [AS] i MATCH_CONDITION(t.ts >= i.valid_from) ON t.sym = i.sym
//! ```
//!
//! `LEFT [OUTER] JOIN … FOR SYSTEM_TIME AS OF …` becomes `LEFT ASOF JOIN`: a row with no
//! version yet is kept with NULLs. The rows of the table are its versions; an update is a
//! new row with a later version time.

use datafusion::sql::sqlparser::tokenizer::{Token, Whitespace};

use laminardb_engine::catalog::{Catalog, SourceKind};
use laminardb_engine::{Error, Result};

use crate::stream::is_word;

/// `sql` with every `FOR SYSTEM_TIME AS OF` join rewritten as an ASOF join (unchanged
/// without one).
pub fn rewrite_temporal(sql: &str, catalog: &Catalog) -> Result<String> {
    let mut tokens = crate::split::tokenize(sql)?;
    if !tokens.iter().any(|t| is_word(t, "SYSTEM_TIME")) {
        return Ok(sql.to_string());
    }
    while let Some(rewritten) = rewrite_one(&tokens, catalog)? {
        tokens = rewritten;
    }
    Ok(tokens.iter().map(|t| t.to_string()).collect())
}

/// The first temporal join of `tokens` rewritten, or `None` when there is none left.
fn rewrite_one(tokens: &[Token], catalog: &Catalog) -> Result<Option<Vec<Token>>> {
    let words: Vec<usize> = (0..tokens.len()).filter(|&i| !matches!(tokens[i], Token::Whitespace(_))).collect();
    let word = |k: usize, w: &str| words.get(k).is_some_and(|&i| is_word(&tokens[i], w));
    let Some(at) = (0..words.len()).find(|&k| word(k, "FOR") && word(k + 1, "SYSTEM_TIME") && word(k + 2, "AS") && word(k + 3, "OF")) else {
        return Ok(None);
    };
    let refused = |what: &str| Error::unsupported(format!("FOR SYSTEM_TIME AS OF {what}"));
    // `… JOIN <table> FOR SYSTEM_TIME AS OF <column> [[AS] alias] ON …`
    let table = match at.checked_sub(1).map(|k| &tokens[words[k]]) {
        Some(Token::Word(w)) => w.value.clone(),
        _ => return Err(refused("must follow the name of a table")),
    };
    let join = at.checked_sub(2).filter(|&k| word(k, "JOIN")).ok_or_else(|| refused("names a table joined with JOIN or LEFT JOIN"))?;
    let (first, left) = if join >= 1 && word(join - 1, "INNER") {
        (join - 1, false)
    } else if join >= 1 && word(join - 1, "LEFT") {
        (join - 1, true)
    } else if join >= 2 && word(join - 1, "OUTER") && word(join - 2, "LEFT") {
        (join - 2, true)
    } else if join >= 1 && ["RIGHT", "FULL", "OUTER", "CROSS"].iter().any(|w| word(join - 1, w)) {
        return Err(refused("in a RIGHT, FULL or CROSS join (only JOIN and LEFT JOIN)"));
    } else {
        (join, false)
    };
    // The time of the row it is joined at: a column, qualified or not.
    let mut k = at + 4;
    let mut column = match words.get(k).map(|&i| &tokens[i]) {
        Some(Token::Word(w)) => w.to_string(),
        _ => return Err(refused("takes a column of the other side (t.ts)")),
    };
    k += 1;
    if matches!(words.get(k).map(|&i| &tokens[i]), Some(Token::Period)) {
        match words.get(k + 1).map(|&i| &tokens[i]) {
            Some(Token::Word(w)) => column = format!("{column}.{w}"),
            _ => return Err(refused("takes a column of the other side (t.ts)")),
        }
        k += 2;
    }
    // The alias, if any, then ON.
    let mut alias_end = k;
    if word(alias_end, "AS") {
        alias_end += 1;
    }
    let alias = match words.get(alias_end).map(|&i| &tokens[i]) {
        Some(Token::Word(w)) if !is_word(&tokens[words[alias_end]], "ON") => {
            alias_end += 1;
            Some(w.to_string())
        }
        _ => {
            alias_end = k;
            None
        }
    };
    if !word(alias_end, "ON") {
        return Err(refused("needs an ON condition on the table's key"));
    }
    let version = version_column(catalog, &table)?;
    let name = alias.unwrap_or_else(|| table.clone());
    let mut out: Vec<Token> = tokens[..words[first]].to_vec();
    let prefix = if left { "LEFT ASOF JOIN " } else { "ASOF JOIN " };
    out.extend(crate::split::tokenize(prefix)?);
    // The table and its alias, without the clause.
    out.extend(tokens[words[join] + 1..words[at]].iter().cloned());
    if alias_end > k {
        out.push(Token::Whitespace(Whitespace::Space));
        out.extend(tokens[words[k]..words[alias_end - 1] + 1].iter().cloned());
    }
    out.extend(crate::split::tokenize(&format!(" MATCH_CONDITION({column} >= {name}.{version}) "))?);
    out.extend(tokens[words[alias_end]..].iter().cloned());
    Ok(Some(out))
}

/// The column that says when a row of `table` became current: its `WATERMARK FOR` column.
fn version_column(catalog: &Catalog, table: &str) -> Result<String> {
    let def = catalog
        .sources
        .get(table)
        .or_else(|| catalog.sources.get(&table.to_ascii_lowercase()))
        .ok_or_else(|| Error::table_not_found(table))?;
    if def.kind != SourceKind::Table {
        return Err(Error::unsupported(format!(
            "FOR SYSTEM_TIME AS OF over the source '{table}': it reads the versions of a TABLE; join a source's rows by time \
             with ASOF JOIN … MATCH_CONDITION(…)"
        )));
    }
    match &def.watermark {
        Some(spec) => Ok(quote(&spec.column)),
        None => Err(Error::unsupported(format!(
            "FOR SYSTEM_TIME AS OF over the table '{table}' without a version time: declare WATERMARK FOR the column that \
             says when each row became current"
        ))),
    }
}

fn quote(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use laminardb_engine::catalog::{SourceDef, WatermarkSpec};

    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        let schema = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, false),
            Field::new("valid_from", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]));
        for (name, kind) in [("instruments", SourceKind::Table), ("quotes", SourceKind::Source)] {
            catalog
                .add_source(SourceDef {
                    name: name.into(),
                    kind,
                    schema: schema.clone(),
                    watermark: Some(WatermarkSpec { column: "valid_from".into(), delay_ms: 0 }),
                    partition_key: vec![],
                    primary_key: vec![0],
                    options: Default::default(),
                    sql: String::new(),
                    connector: None,
                    lookup: None,
                })
                .unwrap();
        }
        catalog
    }

    fn squash(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn inner_and_left_temporal_joins_become_asof_joins() {
        let c = catalog();
        let sql = "SELECT t.qty, i.sym FROM trades t JOIN instruments FOR SYSTEM_TIME AS OF t.ts AS i ON t.sym = i.sym WHERE t.qty > 1";
        assert_eq!(
            squash(&rewrite_temporal(sql, &c).unwrap()),
            "SELECT t.qty, i.sym FROM trades t ASOF JOIN instruments AS i MATCH_CONDITION(t.ts >= i.valid_from) ON t.sym = i.sym WHERE t.qty > 1"
        );
        let sql = "SELECT * FROM trades LEFT OUTER JOIN instruments FOR SYSTEM_TIME AS OF ts ON trades.sym = instruments.sym";
        assert_eq!(
            squash(&rewrite_temporal(sql, &c).unwrap()),
            "SELECT * FROM trades LEFT ASOF JOIN instruments MATCH_CONDITION(ts >= instruments.valid_from) ON trades.sym = instruments.sym"
        );
        let untouched = "SELECT 'FOR SYSTEM_TIME AS OF' FROM trades";
        assert_eq!(rewrite_temporal(untouched, &c).unwrap(), untouched);
    }

    #[test]
    fn what_cannot_be_a_temporal_join_is_refused_by_name() {
        let c = catalog();
        let err = |sql: &str| rewrite_temporal(sql, &c).unwrap_err().to_string();
        assert!(err("SELECT * FROM t JOIN quotes FOR SYSTEM_TIME AS OF t.ts q ON t.sym = q.sym").contains("over the source 'quotes'"));
        assert!(err("SELECT * FROM t RIGHT JOIN instruments FOR SYSTEM_TIME AS OF t.ts i ON t.sym = i.sym").contains("RIGHT"));
        assert!(err("SELECT * FROM t JOIN instruments FOR SYSTEM_TIME AS OF t.ts i").contains("ON condition"));
        assert!(err("SELECT * FROM t JOIN nothing FOR SYSTEM_TIME AS OF t.ts n ON t.a = n.a").contains("nothing"));
    }
}
