//! `CREATE SINK name FROM input [WITH (…)]` and `CREATE SINK name AS SELECT … [WITH (…)]`.

use std::collections::BTreeMap;

use datafusion::sql::sqlparser::tokenizer::Token;

use laminardb_engine::catalog::{Catalog, SinkDef};
use laminardb_engine::frontend::Statement;
use laminardb_engine::sink::{self, DEFAULT_CONNECTOR};
use laminardb_engine::{Error, Result};

use crate::stream::{is_word, plan_stream, CreateStream};

/// Streams a sink runs for itself start with this (hidden from listings).
pub const SINK_STREAM_PREFIX: &str = "__sink_";

fn name_of(t: &Token) -> Option<String> {
    match t {
        Token::Word(w) if w.quote_style.is_some() => Some(w.value.clone()),
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        _ => None,
    }
}

fn value_of(t: &Token) -> Option<String> {
    match t {
        Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => Some(s.clone()),
        Token::Number(n, _) => Some(n.clone()),
        Token::Word(w) => Some(w.value.clone()),
        _ => None,
    }
}

/// Splits a trailing `WITH (k = v, …)` off `tokens` (indices of significant tokens).
fn cut_with(tokens: &[Token]) -> Result<(Vec<Token>, BTreeMap<String, String>)> {
    let sig: Vec<usize> = (0..tokens.len()).filter(|&i| !matches!(tokens[i], Token::Whitespace(_))).collect();
    let Some(&last) = sig.last() else { return Ok((vec![], BTreeMap::new())) };
    if tokens[last] != Token::RParen {
        return Ok((tokens.to_vec(), BTreeMap::new()));
    }
    // Find the `(` matching the final `)`, then require `WITH` before it.
    let mut depth = 0;
    let mut open = None;
    for k in (0..sig.len()).rev() {
        match tokens[sig[k]] {
            Token::RParen => depth += 1,
            Token::LParen => {
                depth -= 1;
                if depth == 0 {
                    open = Some(k);
                    break;
                }
            }
            _ => {}
        }
    }
    let Some(open) = open else { return Err(Error::parse("unbalanced parentheses")) };
    if open == 0 || !is_word(&tokens[sig[open - 1]], "WITH") {
        return Ok((tokens.to_vec(), BTreeMap::new()));
    }
    let inner: Vec<&Token> = sig[open + 1..sig.len() - 1].iter().map(|&i| &tokens[i]).collect();
    let mut options = BTreeMap::new();
    for item in inner.split(|t| **t == Token::Comma) {
        match item {
            [k, Token::Eq, v] => {
                let key = value_of(k).ok_or_else(|| Error::parse(format!("bad option name {k}")))?;
                let value = value_of(v).ok_or_else(|| Error::parse(format!("bad value for option {key}")))?;
                options.insert(key.to_ascii_lowercase(), value);
            }
            [] => {}
            other => {
                let text: String = other.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
                return Err(Error::parse(format!("expected key = 'value' in WITH, found {text}")));
            }
        }
    }
    Ok((tokens[..sig[open - 1]].to_vec(), options))
}

/// `Some` when `tokens` is a `CREATE SINK`.
pub fn plan_create_sink(
    catalog: &Catalog,
    sql: &str,
    tokens: &[Token],
    runtime: &tokio::runtime::Handle,
) -> Result<Option<Statement>> {
    let sig: Vec<usize> = (0..tokens.len()).filter(|&i| !matches!(tokens[i], Token::Whitespace(_))).collect();
    let w = |k: usize| sig.get(k).map(|&i| &tokens[i]);
    let mut k = 0;
    if !w(k).is_some_and(|t| is_word(t, "CREATE")) {
        return Ok(None);
    }
    k += 1;
    if w(k).is_some_and(|t| is_word(t, "OR")) && w(k + 2).is_some_and(|t| is_word(t, "SINK")) {
        return Err(Error::unsupported("CREATE OR REPLACE SINK: drop the sink first"));
    }
    if !w(k).is_some_and(|t| is_word(t, "SINK")) {
        return Ok(None);
    }
    k += 1;
    let if_not_exists = w(k).is_some_and(|t| is_word(t, "IF")) && w(k + 2).is_some_and(|t| is_word(t, "EXISTS"));
    if if_not_exists {
        k += 3;
    }
    let name = w(k).and_then(name_of).ok_or_else(|| Error::parse("expected a sink name after CREATE SINK"))?;
    k += 1;
    let Some(&at) = sig.get(k) else { return Err(Error::parse("expected FROM or AS after the sink name")) };
    let (body, options) = cut_with(&tokens[at + 1..])?;
    let connector = options.get("connector").cloned().unwrap_or_else(|| DEFAULT_CONNECTOR.to_string());
    sink::validate(&name, &connector, &options)?;
    let (input, stream) = if is_word(&tokens[at], "FROM") {
        let names: Vec<String> = body.iter().filter(|t| !matches!(t, Token::Whitespace(_))).filter_map(name_of).collect();
        let [input] = names.as_slice() else { return Err(Error::parse("expected CREATE SINK name FROM <stream>")) };
        if !catalog.contains(input) {
            return Err(Error::table_not_found(input));
        }
        (input.clone(), None)
    } else if is_word(&tokens[at], "AS") {
        let hidden = format!("{SINK_STREAM_PREFIX}{name}");
        let query: String = body.iter().map(|t| t.to_string()).collect::<String>().trim().to_string();
        let create = CreateStream {
            name: hidden.clone(),
            materialized: false,
            or_replace: false,
            if_not_exists: false,
            query,
            ..CreateStream::default()
        };
        (hidden, Some(plan_stream(catalog, &create, sql, runtime)?))
    } else {
        return Err(Error::parse("expected FROM or AS after the sink name"));
    };
    let owns_input = stream.is_some();
    let def = SinkDef { name, input, owns_input, connector, options, sql: sql.to_string() };
    Ok(Some(Statement::CreateSink { def, stream, if_not_exists }))
}
