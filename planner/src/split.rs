//! Splitting a SQL text into statements and looking at their leading keywords, with the
//! SQL tokenizer so that `;` or keywords inside strings and comments never count.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use laminardb_engine::{Error, Result};

pub fn tokenize(sql: &str) -> Result<Vec<Token>> {
    Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| Error::parse(e.to_string()))
}

/// The statements of `sql`, each as text, without the separating semicolons; statements
/// that hold only whitespace or comments are skipped.
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut current: Vec<Token> = Vec::new();
    for token in tokenize(sql)?.into_iter().chain(std::iter::once(Token::SemiColon)) {
        if token == Token::SemiColon {
            if current.iter().any(|t| !matches!(t, Token::Whitespace(_))) {
                out.push(current.iter().map(|t| t.to_string()).collect::<String>().trim().to_string());
            }
            current.clear();
        } else {
            current.push(token);
        }
    }
    Ok(out)
}

/// The first `n` words of a statement, upper-cased (`["CREATE", "OR", "REPLACE", …]`).
pub fn leading_words(tokens: &[Token], n: usize) -> Vec<String> {
    tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .take(n)
        .map(|t| match t {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            other => other.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semicolons_in_strings_and_comments_do_not_split() {
        let got = split_statements("SELECT ';' ; -- a; comment\n INSERT INTO t VALUES ('a;b');;  ").unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], "SELECT ';'");
        assert!(got[1].ends_with("VALUES ('a;b')"), "{}", got[1]);
    }

    #[test]
    fn leading_words_skip_whitespace() {
        let t = tokenize("  create  or replace Source x").unwrap();
        assert_eq!(leading_words(&t, 4), vec!["CREATE", "OR", "REPLACE", "SOURCE"]);
    }
}
